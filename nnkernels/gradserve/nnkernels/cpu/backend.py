"""CpuBackend: one model's flat parameters, gradients, optimizer state and
workspaces in host memory, driven by the Numba kernels of ``kernels.py``."""
from __future__ import annotations

import math

import numpy as np

from .. import rng, runtime
from ..backend import Backend
from ..params import ParamLayout
from ..reference import init_state, layer_param, state_names
from ..spec import ModelSpec
from . import kernels as K

# which of the kernel's three state slots holds each named state buffer
_STATE_SLOTS = {
    "sgd": ("momentum_buffer", None, None),
    "adagrad": ("sum", None, None),
    "rmsprop": ("square_avg", "momentum_buffer", "grad_avg"),
    "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}


class _TrainWorkspace:
    """Buffers for one training batch size (capacity ``rows``); reused by
    every step with at most that many rows."""

    def __init__(self, spec: ModelSpec, rows: int, dtype):
        sizes = spec.layer_sizes
        per_row = sum(sizes[1:])
        self.rows = rows
        self.z = np.empty(rows * per_row, dtype)
        self.a = np.empty(rows * per_row, dtype)
        self.d = np.empty(rows * per_row, dtype)
        self.t = np.empty(rows * per_row, dtype)  # d transposed, per layer
        has_dropout = any(l.dropout > 0 for l in spec.hidden)
        self.h = np.empty(rows * per_row if has_dropout else 0, dtype)
        self.xin = np.empty(rows * sizes[0] if spec.regularization.input_noise_std > 0 else 0, dtype)
        self.rowloss = np.empty(rows, np.float64)
        self.rowcorrect = np.empty(rows, np.int64)


class CpuBackend(Backend):
    """The Backend contract on the host CPU (see ``nnkernels.backend``)."""

    def __init__(self, spec: ModelSpec, params: np.ndarray):
        super().__init__(spec, params)
        self.dtype = np.dtype(spec.dtype)
        self.layout = ParamLayout(spec)
        self.params = np.array(params, dtype=self.dtype, copy=True).reshape(self.layout.size)
        self.grads = np.zeros_like(self.params)
        opt = spec.optimizer
        self.state = init_state(opt, self.layout.size, self.dtype)
        empty = np.empty(0, self.dtype)
        self._slots = [self.state[name] if name in self.state else empty
                       for name in _STATE_SLOTS[opt.name]]
        self._opt_code = K.OPT_CODES[opt.name]
        self._coef = np.zeros(12, self.dtype)
        self._sizes = np.array(spec.layer_sizes, np.int64)
        self._width = sum(spec.layer_sizes[1:])  # activations per row, all layers
        nh = len(spec.hidden)
        self._acts = np.array([K.ACT_CODES[l.activation] for l in spec.hidden] + [0], np.int64)
        self._act_p = np.array([layer_param(l) for l in spec.hidden] + [0.0], np.float64)
        self._drop_p = np.array([l.dropout for l in spec.hidden] + [0.0], np.float64)
        self._drop_keys = np.zeros(nh + 1, np.uint64)
        self._out_kind = K.OUT_CODES[spec.output.kind]
        self._smoothing = float(spec.loss.label_smoothing)
        self._noise_std = float(spec.regularization.input_noise_std)
        self._partials = np.empty(max(1, -(-self.layout.size // K.NORM_BLOCK)), np.float64)
        self._train_ws: _TrainWorkspace | None = None
        self._no_labels = np.empty(0, np.int64)
        self._no_targets = np.empty((0, spec.output.units), self.dtype)
        self._free_forward: list[tuple[np.ndarray, np.ndarray]] = []  # forward buffer pairs not in use

    # -- inference ----------------------------------------------------------
    def _forward_buffers(self, n: int):
        """A Z/A buffer pair for one forward call, taken from a free list
        (grown, never shrunk): concurrent calls never share memory, and the
        pair used last (cache-warm, its pages mapped) is reused first. Per
        thread instead, a server whose Predict calls land on any of its gRPC
        workers kept one pair per worker, each sized for the largest batch
        that worker saw, and each call found its pair cold."""
        need = n * self._width
        try:
            bufs = self._free_forward.pop()  # atomic: no lock needed
        except IndexError:
            bufs = None
        if bufs is None or bufs[0].shape[0] < need:
            bufs = (np.empty(need, self.dtype), np.empty(need, self.dtype))
        return bufs

    def forward(self, X, logits=False):
        n = X.shape[0]
        bufs = self._forward_buffers(n)
        need = n * self._width
        out = np.empty((n, self.spec.output.units), self.dtype)
        try:
            with runtime.kernel_threads(n):
                K.forward_kernel(X, self.params, bufs[0][:need], bufs[1][:need], self._sizes, self._acts,
                                 self._act_p, self._out_kind, bool(logits), out)
        finally:
            self._free_forward.append(bufs)
        return out

    # -- training -----------------------------------------------------------
    def _workspace(self, n: int) -> _TrainWorkspace:
        ws = self._train_ws
        if ws is None or ws.rows < n:
            ws = self._train_ws = _TrainWorkspace(self.spec, n, self.dtype)
        return ws

    def loss_and_grads(self, X, y, step):
        n = X.shape[0]
        ws = self._workspace(n)
        spec = self.spec
        for i in range(len(spec.hidden)):
            self._drop_keys[i] = rng.stream_key(spec.seed, step, rng.dropout_stream(i)) \
                if spec.hidden[i].dropout > 0 else 0
        noise_key = np.uint64(rng.stream_key(spec.seed, step, rng.NOISE_STREAM))
        m = n * self._width
        xin = ws.xin[:n * self._sizes[0]].reshape(n, self._sizes[0]) if self._noise_std > 0 \
            else ws.xin.reshape(0, self._sizes[0])
        if y.ndim == 1:
            labels, Y = y, self._no_targets
        else:
            labels, Y = self._no_labels, y
        with runtime.kernel_threads(n):
            loss, correct, sq = K.train_kernel(
                X, labels, Y, self.params, self.grads, xin, ws.z[:m], ws.a[:m], ws.h[:m] if ws.h.size else ws.h,
                ws.d[:m], ws.t[:m], ws.rowloss[:n], ws.rowcorrect[:n], self._partials, self._sizes, self._acts,
                self._act_p, self._drop_p, self._drop_keys, self._noise_std, noise_key, self._out_kind,
                self._smoothing)
        return float(loss), int(correct), float(sq)

    def _coefficients(self, lr: float, t: int, grad_scale: float) -> np.ndarray:
        """The per-step scalars of ``optimizer_kernel`` (computed in float64
        as torch does with Python floats, then cast to the parameter dtype)."""
        opt = self.spec.optimizer
        c = [grad_scale, lr, opt.weight_decay] + [0.0] * 9
        if opt.name == "sgd":
            c[3:6] = [opt.momentum, 1 - opt.dampening, float(opt.nesterov)]
        elif opt.name == "adagrad":
            c[3:5] = [lr / (1 + (t - 1) * opt.lr_decay), opt.eps]
        elif opt.name == "rmsprop":
            c[3:9] = [opt.alpha, 1 - opt.alpha, opt.eps, opt.momentum, float(opt.centered),
                      1 - (1 - opt.alpha)]
        else:
            c[3:12] = [1 - opt.beta1, opt.beta2, 1 - opt.beta2, lr / (1 - opt.beta1 ** t),
                       math.sqrt(1 - opt.beta2 ** t), opt.eps, float(opt.amsgrad),
                       1 - lr * opt.weight_decay, 1 - (1 - opt.beta1)]
        self._coef[:] = c
        return self._coef

    def step(self, lr, t, grad_scale):
        coef = self._coefficients(lr, t, grad_scale)
        with runtime.kernel_threads(self.params.shape[0] // 2048):
            K.optimizer_kernel(self._opt_code, self.params, self.grads, self._slots[0], self._slots[1],
                               self._slots[2], coef, int(t))

    # -- transfer -----------------------------------------------------------
    def get_params(self):
        return self.params.copy()

    def set_params(self, params):
        self.params[:] = np.asarray(params, dtype=self.dtype).reshape(self.layout.size)

    def get_grads(self):
        return self.grads.copy()

    def get_state(self):
        return {name: buf.copy() for name, buf in self.state.items()}

    def set_state(self, state):
        names = set(state_names(self.spec.optimizer))
        if set(state) != names:
            raise ValueError(f"optimizer state names {sorted(state)} != {sorted(names)}")
        for name in names:
            self.state[name][:] = np.asarray(state[name], dtype=self.dtype).reshape(self.layout.size)
