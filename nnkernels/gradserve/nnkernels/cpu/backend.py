"""CpuBackend: one model's flat parameters, gradients, optimizer state and
workspaces in host memory, driven by the Numba kernels of ``kernels.py`` and
``optimizer.py`` (their serial twins when a call gets one thread: ``twins.py``)."""
from __future__ import annotations

import numpy as np

from .. import runtime
from ..backend import Backend
from ..finite import all_finite
from ..kernel_args import (
    coefficient_dtype,
    layer_table,
    optimizer_coefficients,
    set_step_keys,
    state_slots,
    step_noise_keys,
)
from ..params import ParamLayout
from ..registry import OPTIMIZERS, OUTPUTS, OutputCode, init_state, state_names
from ..spec import ModelSpec
from .epochs import run_steps
from .kernels import (
    NORM_BLOCK,
    ForwardBuffers,
    Targets,
    TrainBuffers,
    TrainSettings,
    forward_kernel,
    perturb_weights_kernel,
    train_kernel,
)
from .optimizer import optimizer_kernel
from .tiling import predict_tiles, train_tiles
from .twins import for_threads


class _TrainWorkspace:
    """Buffers for one training batch size (capacity ``rows``); reused by
    every step with at most that many rows."""

    def __init__(self, spec: ModelSpec, rows: int, dtype, wn: np.ndarray):
        sizes = spec.layer_sizes
        per_row = sum(sizes[1:])
        self.rows = rows
        self.z = np.empty(rows * per_row, dtype)
        self.a = np.empty(rows * per_row, dtype)
        self.d = np.empty(rows * per_row, dtype)
        has_dropout = any(l.dropout > 0 or l.noise_std > 0 for l in spec.hidden)  # h: dropped-out and/or noisy
        self.h = np.empty(rows * per_row if has_dropout else 0, dtype)
        self.xin = np.empty(rows * sizes[0] if spec.regularization.input_noise_std > 0 else 0, dtype)
        # --- noise regularizers (issue 12): W̃ (the model's, any batch size) and ỹ ---
        self.wn = wn
        self.yn = np.empty(rows * sizes[-1] if spec.regularization.target_noise_std > 0 else 0, dtype)
        self.rowloss = np.empty(rows, np.float64)
        self.rowcorrect = np.empty(rows, np.int64)
        self.colsum = np.empty(max(sizes[1:]), np.float64)
        self._views: tuple[int, TrainBuffers] | None = None

    def buffers(self, n: int, partials: np.ndarray, tiles: np.ndarray) -> TrainBuffers:
        """Views of the first ``n`` rows (kept while n repeats: steady-state
        training builds nothing per call)."""
        if self._views is None or self._views[0] != n:
            m = n * (self.z.shape[0] // self.rows)
            inputs = self.xin.shape[0] // self.rows
            outputs = self.yn.shape[0] // self.rows
            self._views = (n, TrainBuffers(
                xin=self.xin[:n * inputs].reshape(n if inputs else 0, inputs),
                z=self.z[:m], a=self.a[:m], h=self.h[:m], d=self.d[:m],
                rowloss=self.rowloss[:n], rowcorrect=self.rowcorrect[:n], partials=partials, tiles=tiles,
                wn=self.wn, yn=self.yn[:n * outputs].reshape(n if outputs else 0, outputs), colsum=self.colsum))
        return self._views[1]


class _ForwardSlot:
    """One forward call's Z and A buffers and padding tile, with views of
    their first ``rows`` rows' worth kept for the next call of that size."""

    __slots__ = ("z", "a", "tail", "rows", "views")

    def __init__(self, z: np.ndarray, a: np.ndarray, tail: np.ndarray):
        self.z, self.a, self.tail, self.rows, self.views = z, a, tail, -1, None


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
        self._slots = state_slots(opt, self.state, np.empty(0, self.dtype))
        self._opt_code = OPTIMIZERS[opt.name].code
        self._coef = np.zeros(1, coefficient_dtype(self.dtype))
        self.layers = layer_table(spec)
        self._width = sum(spec.layer_sizes[1:])  # activations per row, all layers
        sizes = spec.layer_sizes
        self._macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # multiply-adds per row, forward
        self._train_tiles = train_tiles(len(sizes) - 1)
        self._predict_tiles = predict_tiles(self.dtype, sizes)
        self._quantum = int(self._predict_tiles[0, 2])  # inference pads batches to a multiple of it
        self._out_kind = OUTPUTS[spec.output.kind].code
        self._logits_kind = int(OutputCode.IDENTITY)
        self._smoothing = float(spec.loss.label_smoothing)
        self._noise_std = float(spec.regularization.input_noise_std)
        self._target_noise_std = float(spec.regularization.target_noise_std)
        self._partials = np.empty(max(1, -(-self.layout.size // NORM_BLOCK)), np.float64)
        self._train_ws: _TrainWorkspace | None = None
        # weight noise's W̃: sized by the parameters, so one per model whatever the batch size
        self._wn = np.empty(self.layout.size if spec.regularization.weight_noise_std > 0 else 0, self.dtype)
        self._no_labels = np.empty(0, np.int64)
        self._no_targets = np.empty((0, spec.output.units), self.dtype)
        self._free_forward: list[_ForwardSlot] = []  # forward buffers not in use

    # -- inference ----------------------------------------------------------
    def _padded(self, n: int) -> int:
        """Rows an n-row inference call computes (cpu.tiling's quantum)."""
        return -(-n // self._quantum) * self._quantum

    def _forward_buffers(self, n: int) -> _ForwardSlot:
        """A Z/A buffer pair for one forward call, taken from a free list
        (grown, never shrunk): concurrent calls never share memory, and the
        pair used last (cache-warm, its pages mapped) is reused first. Per
        thread instead, a server whose Predict calls land on any of its gRPC
        workers kept one pair per worker, each sized for the largest batch
        that worker saw, and each call found its pair cold. The slot keeps
        its views for the last row count, so a repeated batch size (the
        common case) builds no slices per call."""
        try:
            slot = self._free_forward.pop()  # atomic: no lock needed
        except IndexError:
            slot = None
        need = self._padded(n) * self._width
        if slot is None or slot.z.shape[0] < need:
            slot = _ForwardSlot(np.empty(need, self.dtype), np.empty(need, self.dtype),
                                np.empty(self._predict_tiles[0, 0] * self.spec.input_size, self.dtype))
        if slot.rows != n:
            slot.rows, slot.views = n, ForwardBuffers(slot.z[:need], slot.a[:need], slot.tail, self._predict_tiles)
        return slot

    def forward(self, X, logits=False):
        n = X.shape[0]
        slot = self._forward_buffers(n)
        out = np.empty((n, self.spec.output.units), self.dtype)
        out_kind = self._logits_kind if logits else self._out_kind
        try:
            with runtime.kernel_threads(n, self._padded(n) * self._macs) as k:
                for_threads(forward_kernel, k)(X, self.params, self.layers, out_kind, slot.views, out)
        finally:
            self._free_forward.append(slot)
        return out

    # -- training -----------------------------------------------------------
    def _train_threads(self, n: int):
        """``runtime.kernel_threads`` for a training call on n rows (forward and backward: 3 products)."""
        return runtime.kernel_threads(n, 3 * n * self._macs)

    def _per_parameter_threads(self):
        """``runtime.kernel_threads`` for a pass over the parameters (optimizer, W̃): 2048 of them count as a row."""
        return runtime.kernel_threads(self.params.shape[0] // 2048)

    def _workspace(self, n: int) -> _TrainWorkspace:
        ws = self._train_ws
        if ws is None or ws.rows < n:
            ws = self._train_ws = _TrainWorkspace(self.spec, n, self.dtype, self._wn)
        return ws

    def loss_and_grads(self, X, y, step):
        n = X.shape[0]
        spec = self.spec
        set_step_keys(self.layers, spec, step)  # dropout, hidden-input and weight noise
        noise_key, target_key = step_noise_keys(spec, step)
        settings = TrainSettings(self._out_kind, self._smoothing, 1.0 / spec.output.counted(n), self._noise_std,
                                 np.uint64(noise_key), self._target_noise_std, np.uint64(target_key))
        targets = Targets(y, self._no_targets) if y.ndim == 1 else Targets(self._no_labels, y)
        bufs = self._workspace(n).buffers(n, self._partials, self._train_tiles)
        if bufs.wn.shape[0] > 0:  # weight noise: this step's W̃, threads by parameter count as the optimizer
            with self._per_parameter_threads() as k:
                for_threads(perturb_weights_kernel, k)(self.params, self.layers, bufs.wn)
        with self._train_threads(n) as k:
            loss, correct, sq = for_threads(train_kernel, k)(X, targets, self.params, self.grads, self.layers,
                                                             settings, bufs)
        return float(loss), int(correct), float(sq)

    def step(self, lr, t, grad_scale):
        # computed in float64 as torch does with Python floats, then cast to the parameter dtype
        self._coef[0] = optimizer_coefficients(self.spec.optimizer, lr, t, grad_scale)
        with self._per_parameter_threads() as k:
            for_threads(optimizer_kernel, k)(self.params, self.grads, self._slots, self._opt_code, self._coef)

    def train_steps(self, X, y, order, first, steps, batch_size, step):
        # every step of the run inside one compiled call (cpu.epochs)
        return run_steps(self, X, y, order, first, steps, batch_size, step)

    # -- transfer -----------------------------------------------------------
    def get_params(self):
        return self.params.copy()

    def set_params(self, params):
        self.params[:] = np.asarray(params, dtype=self.dtype).reshape(self.layout.size)

    def get_grads(self):
        return self.grads.copy()

    def set_grads(self, grads):
        self.grads[:] = np.asarray(grads, dtype=self.dtype).reshape(self.layout.size)

    def nonfinite_buffers(self):
        # in place: one compiled pass per buffer, no copies (runs after every step)
        buffers = {"params": self.params, **{f"optimizer.{k}": v for k, v in self.state.items()}}
        return [name for name, buf in buffers.items() if not all_finite(buf)]

    def get_state(self):
        return {name: buf.copy() for name, buf in self.state.items()}

    def set_state(self, state):
        names = set(state_names(self.spec.optimizer))
        if set(state) != names:
            raise ValueError(f"optimizer state names {sorted(state)} != {sorted(names)}")
        for name in names:
            self.state[name][:] = np.asarray(state[name], dtype=self.dtype).reshape(self.layout.size)
