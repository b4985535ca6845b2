"""The CUDA optimizer pass: one fused grid-stride loop over the flat
parameter, gradient and state buffers, by optimizer code (formulas:
``nnkernels.reference``; codes: ``nnkernels.registry``). Arithmetic stays in
the parameter dtype (fp64 is slow on most GPUs); the step's scalars arrive
as an ``OptimizerCoefficients`` namedtuple. Two of them are recomputed here
in the dtype rather than read: torch.lerp's 1 - weight and AdamW's
1 - lr·wd (this backend has always done so; the CPU reads the float64
values). An optimizer code with no formula here sets the parameters to NaN.
Decaying state values below the dtype's smallest normal number are stored
as zero, as on the CPU (``nnkernels.reference.flushed``)."""
from __future__ import annotations

import math

import numpy as np
from numba import types

from ..registry import OptimizerCode as Opt
from . import numba_cuda as cuda


def kernels(target, dev) -> dict:
    """``{name: (pyfunc, argument types)}`` for ``target``."""
    T = target.T
    ZERO, ONE = T(0.0), T(1.0)
    NAN = T(math.nan)
    lerp = dev.lerp
    device = cuda.jit(device=True)
    TINY = T(np.finfo(target.dtype).tiny)

    @device
    def flush(x):
        """x, or +0 where x is subnormal; zeros, NaN and Inf pass."""
        if x != ZERO and abs(x) < TINY:
            return ZERO
        return x

    @device
    def sgd(p, g, buf, i, c):
        """torch.optim.SGD: d = g·gs + wd·p; with momentum, buf = d on the
        first step, else momentum·buf + (1-dampening)·d; nesterov d +=
        momentum·buf, else d = buf; p -= lr·d."""
        d = g[i] * c.grad_scale
        if c.weight_decay != ZERO:
            d = d + c.weight_decay * p[i]
        if c.momentum != ZERO:
            if c.first_step != ZERO:
                bv = d
            else:
                bv = flush(buf[i] * c.momentum + c.one_minus_dampening * d)
            buf[i] = bv
            if c.nesterov != ZERO:
                d = d + c.momentum * bv
            else:
                d = bv
        p[i] = p[i] - c.lr * d

    @device
    def adagrad(p, g, acc_sum, i, c):
        """torch.optim.Adagrad: d = g·gs + wd·p; sum += d²;
        p -= clr·d/(sqrt(sum) + eps), clr = lr/(1 + (t-1)·lr_decay)."""
        d = g[i] * c.grad_scale
        if c.weight_decay != ZERO:
            d = d + c.weight_decay * p[i]
        s = acc_sum[i] + d * d
        acc_sum[i] = s
        p[i] = p[i] - c.clr * d / (math.sqrt(s) + c.eps)

    @device
    def rmsprop(p, g, sq, mom, gavg, i, c):
        """torch.optim.RMSprop: d = g·gs + wd·p; sq = α·sq + (1-α)·d²;
        centered: gavg = lerp(gavg, d, 1-α), avg = sqrt(sq - gavg²) + eps,
        else sqrt(sq) + eps; momentum: buf = momentum·buf + d/avg, p -=
        lr·buf; else p -= lr·d/avg."""
        d = g[i] * c.grad_scale
        if c.weight_decay != ZERO:
            d = d + c.weight_decay * p[i]
        s = flush(sq[i] * c.sq_decay + c.sq_weight * d * d)
        sq[i] = s
        if c.centered != ZERO:
            ga = flush(lerp(gavg[i], d, c.avg_weight))
            gavg[i] = ga
            avg = math.sqrt(s - ga * ga) + c.eps
        else:
            avg = math.sqrt(s) + c.eps
        if c.momentum != ZERO:
            bv = flush(mom[i] * c.momentum + d / avg)
            mom[i] = bv
            p[i] = p[i] - c.lr * bv
        else:
            p[i] = p[i] - c.lr * d / avg

    @device
    def adam(p, g, m1, m2, vmax, i, c):
        """torch.optim.Adam / AdamW: d = g·gs; AdamW (decoupled) p *= 1 -
        lr·wd, Adam d += wd·p; m = lerp(m, d, 1-β1); v = β2·v + (1-β2)·d²;
        amsgrad: vmax = max(vmax, v) and v̂ = vmax; denom =
        sqrt(v̂)/sqrt(1-β2^t) + eps; p -= (lr/(1-β1^t))·m/denom."""
        d = g[i] * c.grad_scale
        pv = p[i]
        wd = c.weight_decay
        if wd != ZERO:
            if c.decoupled != ZERO:
                pv = pv * (ONE - c.lr * wd)
            else:
                d = d + wd * pv
        a = flush(lerp(m1[i], d, c.avg_weight))
        m1[i] = a
        v = flush(m2[i] * c.sq_decay + c.sq_weight * d * d)
        m2[i] = v
        if c.amsgrad != ZERO:
            if vmax[i] > v:
                v = vmax[i]
            vmax[i] = v
        denom = math.sqrt(v) / c.bc2_sqrt + c.eps
        p[i] = pv - c.step_size * a / denom

    def optimizer_step(params, grads, state, code, c):
        """One update of ``params`` (in place) by optimizer ``code`` from
        ``grads``·grad_scale; ``state``: the optimizer's buffers in registry
        order (``kernel_args.state_slots``; a 1-element dummy where none)."""
        s1 = state[0]
        s2 = state[1]
        s3 = state[2]
        for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):
            if code == Opt.SGD:
                sgd(params, grads, s1, i, c)
            elif code == Opt.ADAGRAD:
                adagrad(params, grads, s1, i, c)
            elif code == Opt.RMSPROP:
                rmsprop(params, grads, s1, s2, s3, i, c)
            elif code == Opt.ADAM or code == Opt.ADAMW:
                adam(params, grads, s1, s2, s3, i, c)
            else:
                params[i] = NAN

    V = target.vector
    return {"optimizer_step": (optimizer_step, (V, V, target.state, types.int64, target.coefficients))}
