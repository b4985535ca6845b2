"""CudaBackend: one model's parameters, gradients and optimizer state resident
on the GPU between calls.

Only batches go to the device and only results come back: a training call
copies X (and y) in, runs every kernel on the backend's stream, and copies
back one small float64 vector (loss sum, correct count, squared gradient
norm) — one synchronization per call, not one per layer. Parameters and
optimizer state cross the bus only through get/set (checkpoints, weight
import/export), as flat host arrays in ``nnkernels.params``'s layout, so a
state_dict is device-neutral: a model trained here loads on the CPU backend
and vice versa.

Concurrency: training calls (``loss_and_grads``, ``step``, ``set_*``) are
serialized by the caller (the model's lock) and run on the training stream.
``forward`` may be called from several threads at once while no training
call runs: each call borrows an inference context (its own CUDA stream and
workspaces) from a pool, so concurrent predictions neither share buffers nor
serialize on the legacy default stream.

A run of steps (``Backend.train_steps``, a server-side Fit's epochs) has no
single-call form here yet: ``Model.train_steps`` drives it step by step
through ``loss_and_grads`` and ``step`` (one host round trip per step).
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..backend import Backend
from ..kernel_args import layer_table, optimizer_coefficients, set_step_keys, state_slots, step_noise_keys
from ..registry import OPTIMIZERS, OUTPUTS, OutputCode, init_state, state_names
from ..spec import ModelSpec
from . import SIMULATOR
from . import numba_cuda as cuda
from .kernels import kernels_for
from .target import LayerEpilogue, OptimizerCoefficients

# The simulator is not thread-safe (a launch configures the shared kernel
# object, and blocks run as Python threads): under it, every backend call in
# the process takes this lock. On a GPU calls run concurrently.
_SIM_LOCK = threading.RLock()


def _serialized():
    return _SIM_LOCK if SIMULATOR else contextlib.nullcontext()


class _Context:
    """A CUDA stream and the workspaces of calls on it, grown to the largest
    batch seen (views of the first n rows are used; no allocation per call in
    steady state)."""

    def __init__(self, sizes, dtype, training: bool):
        self.stream = cuda.stream()
        self.sizes = sizes
        self.dtype = dtype
        self.training = training
        self.capacity = 0
        self.result = np.zeros(4, np.float64)  # host landing spot for scalars

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        s, dt, st = self.sizes, self.dtype, self.stream
        L = len(s) - 1

        def arr(*shape, dtype=dt):
            return cuda.device_array(shape, dtype=dtype, stream=st)

        self.X = arr(cap, s[0])
        # A[i]: input of layer i (A[0] = X or the noisy X); Z[i]: its pre-activation
        self.A = [None] + [arr(cap, s[i]) for i in range(1, L)]
        self.Z = [arr(cap, s[i + 1]) for i in range(L)]
        self.out = arr(cap, s[-1])
        if self.training:
            self.Xn = arr(cap, s[0])
            self.dZ = [arr(cap, s[i + 1]) for i in range(L)]
            self.Y = arr(cap, s[-1])
            self.Yn = arr(cap, s[-1])  # the noisy targets (target noise)
            self.labels = arr(cap, dtype=np.int64)
            self.rowloss = arr(cap, dtype=np.float64)
            self.rowcorrect = arr(cap, dtype=np.float64)
        self.capacity = cap


class CudaBackend(Backend):
    """Backend on the CUDA device (or the simulator)."""

    def __init__(self, spec: ModelSpec, params: np.ndarray):
        super().__init__(spec, params)
        self.dtype = np.dtype(spec.dtype)
        self._T = self.dtype.type
        self.k = kernels_for(spec.dtype)
        self.sizes = spec.layer_sizes
        self.L = len(self.sizes) - 1
        self.num_params = spec.num_params
        self.layers = layer_table(spec)
        T = self._T
        # each layer's epilogue at inference, and while training (with the
        # step's dropout key filled in per call)
        self._infer = [LayerEpilogue(int(l["act"]), T(l["act_param"]), np.uint64(0), 0.0,
                                     T(1.0 / (1.0 - l["drop_p"]))) for l in self.layers]
        self._dropout = [float(l["drop_p"]) for l in self.layers]
        self._out_kind = OUTPUTS[spec.output.kind].code
        self._opt_code = OPTIMIZERS[spec.optimizer.name].code

        self._train = _Context(self.sizes, self.dtype, training=True)
        self._pool: list[_Context] = []
        self._pool_lock = threading.Lock()
        s = self._train.stream
        self.d_params = cuda.to_device(self._check_flat(params, "params"), stream=s)
        self.d_grads = cuda.to_device(np.zeros(self.num_params, self.dtype), stream=s)
        self.d_scalars = cuda.to_device(np.zeros(4, np.float64), stream=s)
        self.d_partial = cuda.device_array(self.k.red_blocks, np.float64, stream=s)
        self.d_dummy = cuda.to_device(np.zeros(1, self.dtype), stream=s)
        self._W = [self._weight(self.d_params, l) for l in self.layers]
        self._b = [self._bias(self.d_params, l) for l in self.layers]
        self._dW = [self._weight(self.d_grads, l) for l in self.layers]
        self._db = [self._bias(self.d_grads, l) for l in self.layers]
        # --- noise regularizers (issue 12): the step's W̃ (weight noise), never copied back ---
        self._weight_noise = float(spec.regularization.weight_noise_std)
        self._target_noise = float(spec.regularization.target_noise_std)
        self._Wn = self._W
        if self._weight_noise > 0:
            self.d_wnoisy = cuda.device_array(self.num_params, self.dtype, stream=s)
            self._Wn = [self._weight(self.d_wnoisy, l) for l in self.layers]
        self._state_names = state_names(spec.optimizer)
        self.d_state = {name: cuda.to_device(buf, stream=s)
                        for name, buf in init_state(spec.optimizer, self.num_params, self.dtype).items()}
        self._slots = state_slots(spec.optimizer, self.d_state, self.d_dummy)
        s.synchronize()

    # -- helpers -----------------------------------------------------------
    def _check_flat(self, arr: np.ndarray, what: str) -> np.ndarray:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape != (self.num_params,):
            raise ValueError(f"{what}: expected shape ({self.num_params},), got {arr.shape}")
        return arr

    def _acquire(self) -> _Context:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        return _Context(self.sizes, self.dtype, training=False)

    def _release(self, ctx: _Context) -> None:
        with self._pool_lock:
            self._pool.append(ctx)

    @staticmethod
    def _weight(flat, layer):
        return flat[layer["w_offset"]:layer["b_offset"]].reshape(int(layer["fan_out"]), int(layer["fan_in"]))

    @staticmethod
    def _bias(flat, layer):
        return flat[layer["b_offset"]:layer["b_offset"] + layer["fan_out"]]

    def _epilogue(self, i: int) -> LayerEpilogue:
        """Layer i's epilogue while training, with the dropout key
        ``set_step_keys`` put in the layer table."""
        return self._infer[i]._replace(drop_key=np.uint64(self.layers[i]["drop_key"]), drop_p=self._dropout[i])

    def _linear_forward(self, ctx, i, A_in, n, *, Z, Out, epilogue, store_z, W=None):
        k = self.k
        fan_in, fan_out = self.sizes[i], self.sizes[i + 1]
        k.linear_forward[k.grid_tiles(n, fan_out), (k.tile, k.tile), ctx.stream](
            A_in, self._W[i] if W is None else W, self._b[i], Z, Out, n, fan_in, fan_out, epilogue, store_z)

    # -- Backend -----------------------------------------------------------
    def forward(self, X: np.ndarray, logits: bool = False) -> np.ndarray:
        with _serialized():
            return self._forward(X, logits)

    def _forward(self, X: np.ndarray, logits: bool = False) -> np.ndarray:
        n = X.shape[0]
        ctx = self._acquire()
        try:
            ctx.ensure(n)
            s = ctx.stream
            Xd = ctx.X[:n]
            Xd.copy_to_device(np.ascontiguousarray(X, dtype=self.dtype), stream=s)
            A = Xd
            for i in range(self.L):
                Z = ctx.Z[i][:n]
                Out = ctx.A[i + 1][:n] if i < self.L - 1 else Z
                self._linear_forward(ctx, i, A, n, Z=Z, Out=Out, epilogue=self._infer[i], store_z=0)
                A = Out
            m = self.sizes[-1]
            res = A
            if not logits and self._out_kind != OutputCode.IDENTITY:
                res = ctx.out[:n]
                self.k.output_activation[self.k.grid_1d(n), self.k.threads, s](A, res, n, m, self._out_kind)
            host = res.copy_to_host(stream=s)
            s.synchronize()
            return host
        finally:
            self._release(ctx)

    def loss_and_grads(self, X: np.ndarray, y: np.ndarray, step: int) -> tuple[float, int, float]:
        with _serialized():
            return self._loss_and_grads(X, y, step)

    def _loss_and_grads(self, X: np.ndarray, y: np.ndarray, step: int) -> tuple[float, int, float]:
        k, ctx, spec = self.k, self._train, self.spec
        n = X.shape[0]
        ctx.ensure(n)
        s = ctx.stream
        m_out = self.sizes[-1]
        Xd = ctx.X[:n]
        Xd.copy_to_device(np.ascontiguousarray(X, dtype=self.dtype), stream=s)
        labels = y.ndim == 1
        if labels:
            Yd = ctx.labels[:n]
            Yd.copy_to_device(np.ascontiguousarray(y, dtype=np.int64), stream=s)
        else:
            Yd = ctx.Y[:n]
            Yd.copy_to_device(np.ascontiguousarray(y, dtype=self.dtype), stream=s)

        A0 = Xd
        std = float(spec.regularization.input_noise_std)
        noise_key, target_key = step_noise_keys(spec, step)
        if std > 0.0:
            A0 = ctx.Xn[:n]
            k.add_noise[k.grid_1d(n * self.sizes[0]), k.threads, s](Xd, A0, n, self.sizes[0], std,
                                                                    np.uint64(noise_key))
        inputs = [A0]
        set_step_keys(self.layers, spec, step)
        epilogues = [self._epilogue(i) for i in range(self.L)]
        # --- noise regularizers (issue 12): the step's W̃ = W + std·N, and noisy targets ---
        Ws = self._Wn
        if self._weight_noise > 0:
            for i in range(self.L):
                fan_in, fan_out = self.sizes[i], self.sizes[i + 1]
                k.add_noise[k.grid_1d(fan_out * fan_in), k.threads, s](
                    self._W[i], Ws[i], fan_out, fan_in, self._weight_noise, np.uint64(self.layers[i]["wnoise_key"]))
        if self._target_noise > 0 and not labels:
            Yn = ctx.Yn[:n]
            k.add_noise[k.grid_1d(n * m_out), k.threads, s](Yd, Yn, n, m_out, self._target_noise,
                                                            np.uint64(target_key))
            Yd = Yn
        A = A0
        for i in range(self.L):
            hidden = i < self.L - 1
            Z = ctx.Z[i][:n]
            Out = ctx.A[i + 1][:n] if hidden else Z
            self._linear_forward(ctx, i, A, n, Z=Z, Out=Out, epilogue=epilogues[i], store_z=int(hidden), W=Ws[i])
            noise_std = float(self.layers[i]["noise_std"])
            if noise_std > 0:  # hidden-input noise, in place on the (dropped-out) activation: the next input
                k.add_noise[k.grid_1d(n * self.sizes[i + 1]), k.threads, s](
                    Out, Out, n, self.sizes[i + 1], noise_std, np.uint64(self.layers[i]["noise_key"]))
            A = Out
            inputs.append(A)

        # fused output activation + loss: per-row float64 values and dZ of the output layer
        Zo = ctx.Z[-1][:n]
        dZo = ctx.dZ[-1][:n]
        ls = float(spec.loss.label_smoothing)
        denom = spec.output.counted(n)  # what the loss is a mean over: rows or elements
        gscale = 1.0 / denom
        rl, rc = ctx.rowloss[:n], ctx.rowcorrect[:n]
        if labels:
            k.loss_labels[k.grid_1d(n), k.threads, s](Zo, Yd, dZo, rl, rc, n, m_out, ls, gscale)
        else:
            k.loss_dense[k.grid_1d(n), k.threads, s](Zo, Yd, dZo, rl, rc, n, m_out, self._out_kind, ls, gscale)
        k.reduce_rows[1, k.threads, s](rl, rc, n, self.d_scalars)

        # backward, last layer first
        for i in range(self.L - 1, -1, -1):
            fan_in, fan_out = self.sizes[i], self.sizes[i + 1]
            dZ = ctx.dZ[i][:n]
            k.linear_backward_weight[k.grid_tiles(fan_out, fan_in), (k.tile, k.tile), s](
                dZ, inputs[i], self._dW[i], self._db[i], n, fan_in, fan_out)
            if i > 0:
                k.linear_backward_input[k.grid_tiles(n, fan_in), (k.tile, k.tile), s](
                    dZ, Ws[i], ctx.Z[i - 1][:n], ctx.dZ[i - 1][:n], n, fan_in, fan_out, epilogues[i - 1])

        self._sq_norm(s)
        self.d_scalars.copy_to_host(ctx.result, stream=s)
        s.synchronize()
        loss_sum, correct, gsq = ctx.result[0], ctx.result[1], ctx.result[2]
        return float(loss_sum / denom), int(round(correct)), float(gsq)

    def _sq_norm(self, s) -> None:
        k = self.k
        blocks = min(k.red_blocks, k.grid_1d(self.num_params))
        k.sq_norm_partial[blocks, k.threads, s](self.d_grads, self.num_params, self.d_partial)
        k.sum_to_slot[1, k.threads, s](self.d_partial, blocks, self.d_scalars, 2)

    def step(self, lr: float, t: int, grad_scale: float) -> None:
        with _serialized():
            return self._step(lr, t, grad_scale)

    def _step(self, lr: float, t: int, grad_scale: float) -> None:
        k, T = self.k, self._T
        s = self._train.stream
        # computed in float64 as torch does with Python floats, then cast to the parameter dtype
        coef = OptimizerCoefficients(*map(T, optimizer_coefficients(self.spec.optimizer, lr, t, grad_scale)))
        k.optimizer_step[k.grid_1d(self.num_params), k.threads, s](
            self.d_params, self.d_grads, self._slots, self._opt_code, coef)
        s.synchronize()  # inference streams must see the new parameters

    def get_params(self) -> np.ndarray:
        s = self._train.stream
        host = self.d_params.copy_to_host(stream=s)
        s.synchronize()
        return host

    def set_params(self, params: np.ndarray) -> None:
        s = self._train.stream
        self.d_params.copy_to_device(self._check_flat(params, "params"), stream=s)
        s.synchronize()

    def get_grads(self) -> np.ndarray:
        s = self._train.stream
        host = self.d_grads.copy_to_host(stream=s)
        s.synchronize()
        return host

    def set_grads(self, grads: np.ndarray) -> None:
        s = self._train.stream
        self.d_grads.copy_to_device(self._check_flat(grads, "grads"), stream=s)
        s.synchronize()

    def get_state(self) -> dict[str, np.ndarray]:
        s = self._train.stream
        out = {name: d.copy_to_host(stream=s) for name, d in self.d_state.items()}
        s.synchronize()
        return out

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != set(self._state_names):
            raise ValueError(f"optimizer state: expected buffers {sorted(self._state_names)}, got {sorted(state)}")
        arrays = {name: self._check_flat(v, f"state {name}") for name, v in state.items()}
        s = self._train.stream
        for name, v in arrays.items():
            self.d_state[name].copy_to_device(v, stream=s)
        s.synchronize()
