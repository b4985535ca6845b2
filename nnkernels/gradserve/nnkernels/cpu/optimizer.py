"""The Numba CPU optimizer pass: one fused parallel loop over the flat
parameter, gradient and state buffers per step (formulas:
``nnkernels.reference``; the optimizer codes: ``nnkernels.registry``).

Each element's update reads and writes only that element, so the result
does not depend on the thread count. A decaying state value that falls
below the dtype's smallest normal number is stored as zero
(``nnkernels.reference.flushed``: subnormals would cost ~100 cycles an
operation from then on, and torch's would never leave that range). Arithmetic is in the parameter dtype,
as torch.optim's; the step's scalars arrive computed in float64 and cast
(``kernel_args.optimizer_coefficients``). Numba's on-disk cache notices
edits of this file only (see ``cpu.kernels``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..registry import OptimizerCode as Opt


@njit(inline="always", nogil=True, cache=True)
def _lerp(start, end, weight, keep):
    """torch.lerp: start + w·(end - start) for w < 0.5, else end - (end -
    start)·(1 - w), with ``keep`` = 1 - w computed in float64 by the host."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * keep


@njit(inline="always", nogil=True, cache=True)
def _flush(x, tiny):
    """x, or +0 where x is subnormal (0 < |x| < tiny, the dtype's smallest
    normal number); zeros, NaN and Inf pass. (``x - x``: a zero of x's
    type, which a literal 0 would widen to float64.)"""
    return x - x if x != 0 and abs(x) < tiny else x


@njit(parallel=True, nogil=True, cache=True)
def optimizer_kernel(params, grads, state, code, coef):
    """One update of ``params`` (in place) by optimizer ``code`` from
    ``grads`` · grad_scale. ``state``: the optimizer's buffers in its
    registry order (``kernel_args.state_slots``; empty where the spec keeps
    none). ``coef``: a one-element record of ``kernel_args.COEFFICIENTS`` in
    the parameter dtype. A code it does not know sets every parameter to NaN."""
    c = coef[0]
    s1 = state[0]  # by index: unpacked, prange writes to them are lost (see cpu.kernels)
    s2 = state[1]
    s3 = state[2]
    n = params.shape[0]
    scale = c.grad_scale
    lr = c.lr
    wd = c.weight_decay
    eps = c.eps
    tiny = np.finfo(params.dtype).tiny
    if code == Opt.SGD:  # s1: momentum_buffer
        mom = c.momentum
        damp1 = c.one_minus_dampening
        nest = c.nesterov != 0
        first = c.first_step != 0
        for i in prange(n):
            d = grads[i] * scale
            if wd != 0:
                d = d + wd * params[i]
            if mom != 0:
                if first:
                    b = d
                else:
                    b = _flush(s1[i] * mom + damp1 * d, tiny)
                s1[i] = b
                d = d + mom * b if nest else b
            params[i] = params[i] - lr * d
    elif code == Opt.ADAGRAD:  # s1: sum
        clr = c.clr
        for i in prange(n):
            d = grads[i] * scale
            if wd != 0:
                d = d + wd * params[i]
            s = s1[i] + d * d
            s1[i] = s
            params[i] = params[i] - clr * d / (np.sqrt(s) + eps)
    elif code == Opt.RMSPROP:  # s1: square_avg, s2: momentum_buffer, s3: grad_avg
        alpha = c.sq_decay
        oma = c.sq_weight
        mom = c.momentum
        centered = c.centered != 0
        w = c.avg_weight
        keep = c.avg_keep
        for i in prange(n):
            d = grads[i] * scale
            if wd != 0:
                d = d + wd * params[i]
            v = _flush(s1[i] * alpha + oma * d * d, tiny)
            s1[i] = v
            if centered:
                ga = _flush(_lerp(s3[i], d, w, keep), tiny)
                s3[i] = ga
                avg = np.sqrt(v - ga * ga) + eps
            else:
                avg = np.sqrt(v) + eps
            if mom > 0:
                b = _flush(s2[i] * mom + d / avg, tiny)
                s2[i] = b
                params[i] = params[i] - lr * b
            else:
                params[i] = params[i] - lr * d / avg
    elif code == Opt.ADAM or code == Opt.ADAMW:  # s1: exp_avg, s2: exp_avg_sq, s3: max_exp_avg_sq
        w = c.avg_weight
        keep = c.avg_keep
        b2 = c.sq_decay
        omb2 = c.sq_weight
        step_size = c.step_size
        bc2s = c.bc2_sqrt
        ams = c.amsgrad != 0
        decoupled = c.decoupled != 0
        decay = c.param_decay
        for i in prange(n):
            d = grads[i] * scale
            x = params[i]
            if decoupled:
                x = x * decay
            elif wd != 0:
                d = d + wd * x
            m = _flush(_lerp(s1[i], d, w, keep), tiny)
            s1[i] = m
            v = _flush(s2[i] * b2 + omb2 * d * d, tiny)
            s2[i] = v
            if ams:
                vm = max(s3[i], v)
                s3[i] = vm
                v = vm
            params[i] = x - step_size * m / (np.sqrt(v) / bc2s + eps)
    else:
        for i in range(n):  # serial: an unknown code is a bug to surface, not a pass to speed up
            params[i] = np.nan
