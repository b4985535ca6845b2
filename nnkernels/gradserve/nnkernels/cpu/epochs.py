"""The compiled run of training steps: a run of an epoch's batches gathered
from a stored data set by the epoch's row order and trained one after the
other inside one Numba call, with no Python between steps.

Step ``s`` of a run is exactly ``Model.train_step`` on the batch
``X[order[b·B:(b+1)·B]]`` (b = first + s, B = batch size; the last batch of
an epoch holds the remaining rows): the same gather (rows copied and cast to
the model's dtype, as NumPy's ``astype``), the same ``train_kernel`` with
the dropout/noise keys of that step, the same finiteness test (loss and
gradient norm), the same clip coefficient and scheduled learning rate, and
the same ``optimizer_kernel`` with the same coefficients. Everything a step
computes on the host in ``Model.train_step`` / ``CpuBackend`` (the
scheduled lr, the optimizer's float64 coefficients, the stream keys) is
computed here before the run by the very same Python functions, one row per
step, so no formula is written twice. The run stops before the first step
whose loss or gradient norm is not finite: that step is not applied (the
parameters, optimizer state and step count are those of the last finite
step), as ``Model.train_step`` refuses it.

Where the run gets one thread (``runtime.threads_for``: small batches) the
loop's serial twin runs (``cpu.twins.for_threads``), which calls the
kernels' twins: same bits, no parallel launches. Numba's on-disk cache keys a caller by its own file only, and a
compiled caller holds a copy of its callees' code, so the loop's closure
carries a digest of the kernel sources it calls: an edit of them compiles
the loop afresh instead of running stale kernels.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from numba import njit

from ..kernel_args import optimizer_coefficients, set_step_keys, step_noise_keys
from ..registry import clip_coefficient, scheduled_lr
from .kernels import Targets, TrainBuffers, TrainSettings, perturb_weights_kernel, train_kernel
from .optimizer import optimizer_kernel
from .twins import for_threads

_clip = njit(inline="always", nogil=True, cache=True)(clip_coefficient)


def _sources_digest() -> str:
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py")) + [here.parent / "rng.py", here.parent / "registry" / "optimizers.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _make_run_kernel(sources: str):
    def run_steps_kernel(X, labels, values, order, first, steps, batch_size, params, grads, state, step_layers,
                         opt_code, coefs, noise_keys, target_keys, max_norm, out_kind, smoothing, counted_per_row,
                         noise_std, target_noise_std, xb, lb, vb, ws, out):
        """Steps ``first .. first + steps - 1`` of the epoch in ``order`` (see
        the module docstring). ``labels`` (int, rows) or ``values`` (rows ×
        units) holds the targets, the other is empty; ``xb``/``lb``/``vb``
        are the gathered batch's buffers (flat, batch_size rows), ``ws`` the
        full-capacity TrainBuffers. Per step s: ``coefs[s]`` (its grad_scale
        is set here from the clip), ``step_layers[s]`` (the layer table with
        that step's dropout, hidden-noise and weight-noise keys),
        ``noise_keys[s]`` and ``target_keys[s]`` (input and target noise).
        With weight noise (``ws.wn`` not empty) each step first fills W̃, as
        ``CpuBackend.loss_and_grads`` does.
        Writes loss, correct, squared norm and rows of each step tried to
        ``out[s, 0..3]``; returns the steps applied (a step not finite is
        tried, not applied)."""
        if len(sources) == 0:  # the digest only keys the cache (see the module docstring)
            return -1
        rows = order.shape[0]
        fin = X.shape[1]
        units = vb.shape[0] // batch_size
        with_noise = noise_std > 0.0
        with_target_noise = target_noise_std > 0.0
        per_row = ws.z.shape[0] // batch_size
        for s in range(steps):
            r0 = (first + s) * batch_size
            n = min(rows, r0 + batch_size) - r0
            xv = xb[:n * fin].reshape((n, fin))
            for i in range(n):
                src = order[r0 + i]
                for j in range(fin):
                    xv[i, j] = X[src, j]
            if labels.shape[0] > 0:
                lv = lb[:n]
                for i in range(n):
                    lv[i] = labels[order[r0 + i]]
                targets = Targets(lv, vb[:0].reshape((0, units)))
            else:
                vv = vb[:n * units].reshape((n, units))
                for i in range(n):
                    src = order[r0 + i]
                    for j in range(units):
                        vv[i, j] = values[src, j]
                targets = Targets(lb[:0], vv)
            layers = step_layers[s]
            settings = TrainSettings(out_kind, smoothing, 1.0 / (counted_per_row * n), noise_std,
                                     noise_keys[s] if with_noise else np.uint64(0), target_noise_std,
                                     target_keys[s] if with_target_noise else np.uint64(0))
            m = n * per_row
            bufs = TrainBuffers(ws.xin[:n], ws.z[:m], ws.a[:m], ws.h[:m], ws.d[:m], ws.rowloss[:n],
                                ws.rowcorrect[:n], ws.partials, ws.tiles, ws.wn, ws.yn[:n], ws.colsum)
            if ws.wn.shape[0] > 0:
                perturb_weights_kernel(params, layers, ws.wn)
            loss, correct, sq = train_kernel(xv, targets, params, grads, layers, settings, bufs)
            out[s, 0] = loss
            out[s, 1] = correct
            out[s, 2] = sq
            out[s, 3] = n
            norm = math.sqrt(sq) if sq >= 0 else math.nan
            if not (math.isfinite(loss) and math.isfinite(norm)):
                return s
            coefs[s].grad_scale = _clip(norm, max_norm)
            optimizer_kernel(params, grads, state, opt_code, coefs[s:s + 1])
        return steps

    run_steps_kernel.__qualname__ = "run_steps_kernel"
    return njit(nogil=True, cache=True)(run_steps_kernel)


run_steps_kernel = _make_run_kernel(_sources_digest())


def run_steps(backend, X, y, order, first: int, steps: int, batch_size: int, step: int) -> tuple[int, np.ndarray]:
    """Runs the steps on ``backend`` (a CpuBackend) from optimizer step
    ``step`` (the Model's count before the run). ``X``: (rows, inputs)
    float32/float64, C-contiguous; ``y``: int64 labels (rows,) or float
    targets (rows, units) in the model's dtype (``Model._targets``), checked by the caller;
    ``order``: int64 row order. Returns (steps applied, out) with
    ``out[s] = (loss, correct, squared gradient norm, rows)`` for each step
    tried."""
    spec = backend.spec
    opt = spec.optimizer
    dtype = backend.dtype
    coefs = np.zeros(steps, backend._coef.dtype)
    for s in range(steps):
        lr = scheduled_lr(spec.schedule, opt.lr, step + s)
        coefs[s] = optimizer_coefficients(opt, lr, step + s + 1, 1.0)
    step_layers = np.repeat(backend.layers[None, :], steps, axis=0)  # each step's keys, as train_step sets them
    for s in range(steps):
        set_step_keys(step_layers[s], spec, step + s)
    keys = np.array([step_noise_keys(spec, step + s) for s in range(steps)], np.uint64).reshape(steps, 2)
    noise_keys, target_keys = keys[:, 0].copy(), keys[:, 1].copy()
    units = spec.output.units
    labels = y if y.ndim == 1 else backend._no_labels
    values = y if y.ndim == 2 else backend._no_targets
    ws = backend._workspace(batch_size).buffers(batch_size, backend._partials, backend._train_tiles)
    xb = np.empty(batch_size * X.shape[1], dtype)
    lb = np.empty(batch_size, np.int64)
    vb = np.empty(batch_size * units, dtype)
    out = np.zeros((steps, 4), np.float64)
    with backend._train_threads(batch_size) as k:
        done = for_threads(run_steps_kernel, k)(
            X, labels, values, order, first, steps, batch_size, backend.params, backend.grads, backend._slots,
            step_layers, backend._opt_code, coefs, noise_keys, target_keys, float(spec.regularization.clip_grad_norm),
            backend._out_kind, backend._smoothing, float(spec.output.counted(1)), backend._noise_std,
            backend._target_noise_std, xb, lb, vb, ws, out)
    return int(done), out
