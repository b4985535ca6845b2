"""Numba CPU kernels: fused dense layers, output+loss, backward and optimizer
passes over the flat buffers (layout: ``nnkernels.params``).

Design rules (see /work/shared/NUMBA_NOTES.md):
- Matrix products go to BLAS through ``np.dot`` outside any prange; every
  other pass (bias + activation, derivative, dropout, loss, optimizer) is one
  fused prange loop.
- Every prange iteration writes its own outputs; reductions go through
  fixed-size partial buffers summed serially, so results do not depend on how
  the threading layer schedules the iterations (bit-identical runs).
- Losses and norms accumulate in float64. No fastmath: NaN/Inf must survive
  to the finiteness check in ``Model.train_step``.
- Kinds are small int codes so each kernel compiles for few signatures
  (dtype × label kind).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import rng as _rng

# activation codes (hidden layers)
ACT_CODES = {
    "identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "softplus": 4,
    "sigmoid": 5, "tanh": 6, "hardswish": 7, "gelu": 8, "step": 9,
}
# output kinds
OUT_CODES = {"identity": 0, "sigmoid": 1, "softmax": 2}
# optimizers
OPT_CODES = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3, "adamw": 4}

NORM_BLOCK = 16384  # elements per partial sum of the squared gradient norm

_JIT = dict(nogil=True, cache=True)
_PJIT = dict(parallel=True, nogil=True, cache=True)

uniform01 = njit(inline="always", **_JIT)(_rng.uniform01)
box_muller = njit(inline="always", **_JIT)(_rng.box_muller)

_GELU_C = math.sqrt(2.0 / math.pi)


@njit(**_JIT)
def _act(code, z, p):
    """f(z) for activation ``code`` (float64 in, float64 out)."""
    if code == 1:
        return z if z > 0.0 else 0.0
    if code == 0:
        return z
    if code == 2:
        return z if z > 0.0 else p * z
    if code == 3:
        return z if z > 0.0 else p * math.expm1(z)
    if code == 4:
        return z if z > 20.0 else math.log1p(math.exp(z))
    if code == 5:
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)
    if code == 6:
        return math.tanh(z)
    if code == 7:
        if z <= -3.0:
            return 0.0
        if z >= 3.0:
            return z
        return z * (z + 3.0) / 6.0
    if code == 8:
        return 0.5 * z * (1.0 + math.tanh(_GELU_C * (z + 0.044715 * z * z * z)))
    return 1.0 if z > 0.0 else 0.0


@njit(**_JIT)
def _act_grad(code, z, a, p):
    """f'(z), from the output ``a`` where that is cheaper (as
    ``nnkernels.reference``'s DERIVATIVES)."""
    if code == 1:
        return 1.0 if z > 0.0 else 0.0
    if code == 0:
        return 1.0
    if code == 2:
        return 1.0 if z > 0.0 else p
    if code == 3:
        return 1.0 if z > 0.0 else p * math.exp(z)
    if code == 4:
        if z > 20.0:
            return 1.0
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)
    if code == 5:
        return a * (1.0 - a)
    if code == 6:
        return 1.0 - a * a
    if code == 7:
        if z <= -3.0:
            return 0.0
        if z < 3.0:
            return z / 3.0 + 0.5
        return 1.0
    if code == 8:
        t = math.tanh(_GELU_C * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * z * z)
    return 0.0


@njit(**_JIT)
def _bias_act_rows(Z, A, b, code, p, r0, r1):
    """Z[r] += b; A[r] = f(Z[r]) for rows r0..r1 (one thread's work)."""
    u = Z.shape[1]
    for i in range(r0, r1):
        if code == 1:  # relu, the common case, kept branch-free per element
            for j in range(u):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = z if z > 0 else 0
        else:
            for j in range(u):
                z = Z[i, j] + b[j]
                Z[i, j] = z
                A[i, j] = _act(code, np.float64(z), p)


@njit(**_JIT)
def _dot_nt(A, B, out):
    """out = A @ B.T (BLAS). Kept out of the parallel functions: their array
    analysis mis-asserts shapes of loop-carried arrays around np.dot."""
    np.dot(A, B.T, out)


@njit(**_JIT)
def _dot_tn(A, B, out):
    """out = A.T @ B (BLAS)."""
    np.dot(A.T, B, out)


@njit(**_JIT)
def _dot_nn(A, B, out):
    """out = A @ B (BLAS)."""
    np.dot(A, B, out)


BLOCK = 128  # rows per BLAS call: fixed, so results do not depend on thread count;
# 64-row blocks measured ~1.5-2x slower (OpenBLAS repacks W per call)


@njit(**_JIT)
def _row_blocks(n, width):
    """How many row blocks to split n rows of ``width`` into (≥ ~16k elements each)."""
    per = max(1, 16384 // max(width, 1))
    return (n + per - 1) // per, per


@njit(**_JIT)
def _mlp_views(buf, n, sizes, layer):
    off = 0
    for l in range(layer):
        off += n * sizes[l + 1]
    u = sizes[layer + 1]
    return buf[off:off + n * u].reshape((n, u))


@njit(**_JIT)
def _mlp_views_t(buf, n, sizes, layer):
    """Layer ``layer``'s (units × n) transposed slice of a workspace."""
    off = 0
    for l in range(layer):
        off += n * sizes[l + 1]
    u = sizes[layer + 1]
    return buf[off:off + n * u].reshape((u, n))


@njit(**_PJIT)
def _dense_forward(H, W, b, Z, A, code, p):
    """One dense layer: Z = H·Wᵀ + b, A = f(Z). The product runs in fixed
    BLOCK-row slices (results independent of the thread count), then bias
    and activation in one parallel pass."""
    n = H.shape[0]
    for k in prange((n + BLOCK - 1) // BLOCK):
        r0 = k * BLOCK
        r1 = min(n, r0 + BLOCK)
        _dot_nt(H[r0:r1], W, Z[r0:r1])
    nb, per = _row_blocks(n, W.shape[0])
    for k in prange(nb):
        _bias_act_rows(Z, A, b, code, p, k * per, min(n, (k + 1) * per))


@njit(**_PJIT)
def forward_kernel(X, params, zbuf, abuf, sizes, acts, act_p, out_kind, logits, out):
    """Inference: writes the outputs (probabilities/values, or logits) into
    ``out`` (n × units). ``zbuf``/``abuf`` hold every layer's Z and A."""
    n = X.shape[0]
    L = sizes.shape[0] - 1
    H = X
    off = 0
    for l in range(L):
        fin, fout = sizes[l], sizes[l + 1]
        W = params[off:off + fout * fin].reshape((fout, fin))
        b = params[off + fout * fin:off + fout * fin + fout]
        off += fout * fin + fout
        Z = _mlp_views(zbuf, n, sizes, l)
        A = _mlp_views(abuf, n, sizes, l)
        code = acts[l] if l < L - 1 else 0
        p = act_p[l] if l < L - 1 else 0.0
        _dense_forward(H, W, b, Z, A, code, p)
        H = A
    Zo = _mlp_views(zbuf, n, sizes, L - 1)
    u = Zo.shape[1]
    for i in prange(n):
        if logits or out_kind == 0:
            for j in range(u):
                out[i, j] = Zo[i, j]
        elif out_kind == 1:
            for j in range(u):
                out[i, j] = _act(5, np.float64(Zo[i, j]), 0.0)
        else:
            m = -np.inf
            for j in range(u):
                m = max(m, np.float64(Zo[i, j]))
            s = 0.0
            for j in range(u):
                s += math.exp(np.float64(Zo[i, j]) - m)
            for j in range(u):
                out[i, j] = math.exp(np.float64(Zo[i, j]) - m) / s


@njit(**_JIT)
def _loss_row_labels(Zo, y, D, i, inv_n, smoothing):
    """Softmax cross-entropy of row i with an integer label; writes
    D[i] = (p - t)/n; returns (loss_i, correct_i)."""
    u = Zo.shape[1]
    m = -np.inf
    am = 0
    for j in range(u):
        v = np.float64(Zo[i, j])
        if v > m:
            m = v
            am = j
    s = 0.0
    for j in range(u):
        s += math.exp(np.float64(Zo[i, j]) - m)
    lse = m + math.log(s)
    lab = y[i]
    eps_c = smoothing / u
    loss = 0.0
    if smoothing > 0.0:
        tot = 0.0
        for j in range(u):
            tot += lse - np.float64(Zo[i, j])
        loss = (1.0 - smoothing) * (lse - np.float64(Zo[i, lab])) + eps_c * tot
    else:
        loss = lse - np.float64(Zo[i, lab])
    for j in range(u):
        t = eps_c + (1.0 - smoothing if j == lab else 0.0)
        D[i, j] = (math.exp(np.float64(Zo[i, j]) - lse) - t) * inv_n
    return loss, 1 if am == lab else 0


@njit(**_JIT)
def _loss_row_targets(Zo, Y, D, i, inv_n, smoothing, out_kind):
    """One row of a loss with float targets (mse, bce_with_logits, or softmax
    cross-entropy with probability targets). Writes D[i]; returns
    (row loss sum, correct count)."""
    u = Zo.shape[1]
    loss = 0.0
    correct = 0
    if out_kind == 0:  # mse: D = 2(z - y)/(n·u)
        for j in range(u):
            d = np.float64(Zo[i, j]) - np.float64(Y[i, j])
            loss += d * d
            D[i, j] = 2.0 * (Zo[i, j] - Y[i, j]) * inv_n
    elif out_kind == 1:  # bce with logits: D = (σ(z) - y)/(n·u)
        for j in range(u):
            z = np.float64(Zo[i, j])
            yy = np.float64(Y[i, j])
            loss += max(z, 0.0) - z * yy + math.log1p(math.exp(-abs(z)))
            D[i, j] = (_act(5, z, 0.0) - yy) * inv_n
            if (z > 0.0) == (yy > 0.5):
                correct += 1
    else:  # softmax with probability targets
        m = -np.inf
        am = 0
        ym = -np.inf
        ay = 0
        for j in range(u):
            v = np.float64(Zo[i, j])
            if v > m:
                m = v
                am = j
            if np.float64(Y[i, j]) > ym:
                ym = np.float64(Y[i, j])
                ay = j
        s = 0.0
        for j in range(u):
            s += math.exp(np.float64(Zo[i, j]) - m)
        lse = m + math.log(s)
        eps_c = smoothing / u
        tsum = 0.0
        for j in range(u):
            t = np.float64(Y[i, j]) * (1.0 - smoothing) + eps_c
            tsum += t
            loss += t * (lse - np.float64(Zo[i, j]))
        for j in range(u):
            t = np.float64(Y[i, j]) * (1.0 - smoothing) + eps_c
            D[i, j] = (math.exp(np.float64(Zo[i, j]) - lse) * tsum - t) * inv_n
        correct = 1 if am == ay else 0
    return loss, correct


@njit(**_PJIT)
def train_kernel(X, labels, Y, params, grads, xin, zbuf, abuf, hbuf, dbuf, tbuf, rowloss, rowcorrect, partials,
                 sizes, acts, act_p, drop_p, drop_keys, noise_std, noise_key, out_kind, smoothing):
    """Training forward + backward on targets ``labels`` (int64 class labels,
    softmax only) or, when ``labels`` is empty, ``Y`` (float, n × units) —
    both always passed so one signature per dtype serves every loss.
    Fills ``grads`` and returns
    (mean loss, correct, squared grad norm). ``xin`` (n×in) receives the noisy
    input when noise_std > 0; ``hbuf`` the dropped-out activations of layers
    with dropout. zbuf/abuf/hbuf/dbuf are laid out like ``_mlp_views``."""
    n = X.shape[0]
    L = sizes.shape[0] - 1
    H = X
    if noise_std > 0.0:
        fin = X.shape[1]
        for i in prange(n):
            for j in range(fin):
                k = i * fin + j
                g = box_muller(uniform01(noise_key, 2 * k), uniform01(noise_key, 2 * k + 1))
                xin[i, j] = X[i, j] + noise_std * g
        H = xin
    # forward
    off = 0
    for l in range(L):
        fin, fout = sizes[l], sizes[l + 1]
        W = params[off:off + fout * fin].reshape((fout, fin))
        b = params[off + fout * fin:off + fout * fin + fout]
        off += fout * fin + fout
        Z = _mlp_views(zbuf, n, sizes, l)
        A = _mlp_views(abuf, n, sizes, l)
        code = acts[l] if l < L - 1 else 0
        p = act_p[l] if l < L - 1 else 0.0
        _dense_forward(H, W, b, Z, A, code, p)
        H = A
        if l < L - 1 and drop_p[l] > 0.0:
            Hd = _mlp_views(hbuf, n, sizes, l)
            pk = drop_p[l]
            scale = 1.0 / (1.0 - pk)
            key = drop_keys[l]
            for i in prange(n):
                for j in range(fout):
                    if uniform01(key, i * fout + j) >= pk:
                        Hd[i, j] = A[i, j] * scale
                    else:
                        Hd[i, j] = 0
            H = Hd
    # loss and output delta
    Zo = _mlp_views(zbuf, n, sizes, L - 1)
    Do = _mlp_views(dbuf, n, sizes, L - 1)
    u = Zo.shape[1]
    inv = 1.0 / n if out_kind == 2 else 1.0 / (n * u)
    for i in prange(n):
        if labels.shape[0] > 0:
            rl, rc = _loss_row_labels(Zo, labels, Do, i, inv, smoothing)
        else:
            rl, rc = _loss_row_targets(Zo, Y, Do, i, inv, smoothing, out_kind)
        rowloss[i] = rl
        rowcorrect[i] = rc
    Dot = _mlp_views_t(tbuf, n, sizes, L - 1)
    for j in prange(u):
        for i in range(n):
            Dot[j, i] = Do[i, j]
    loss = 0.0
    correct = 0
    for i in range(n):
        loss += rowloss[i]
        correct += rowcorrect[i]
    loss *= inv  # softmax: mean over rows; mse, bce: mean over all elements
    # backward
    off_end = params.shape[0]
    for l in range(L - 1, -1, -1):
        fin, fout = sizes[l], sizes[l + 1]
        woff = off_end - fout * fin - fout
        boff = off_end - fout
        off_end = woff
        D = _mlp_views(dbuf, n, sizes, l)
        Dt = _mlp_views_t(tbuf, n, sizes, l)
        if l == 0:
            Hin = xin if noise_std > 0.0 else X
        elif drop_p[l - 1] > 0.0:
            Hin = _mlp_views(hbuf, n, sizes, l - 1)
        else:
            Hin = _mlp_views(abuf, n, sizes, l - 1)
        gW = grads[woff:woff + fout * fin].reshape((fout, fin))
        for k in prange((fout + BLOCK - 1) // BLOCK):  # gW = D.T @ Hin, by blocks of output rows
            o0 = k * BLOCK
            o1 = min(fout, o0 + BLOCK)
            _dot_nn(Dt[o0:o1], Hin, gW[o0:o1])
        for j in prange(fout):  # bias grad: row sums of D.T, float64 accumulation
            s = 0.0
            for i in range(n):
                s += Dt[j, i]
            grads[boff + j] = s
        if l > 0:
            W = params[woff:woff + fout * fin].reshape((fout, fin))
            Dp = _mlp_views(dbuf, n, sizes, l - 1)
            Dpt = _mlp_views_t(tbuf, n, sizes, l - 1)
            for k in prange((n + BLOCK - 1) // BLOCK):
                r0 = k * BLOCK
                r1 = min(n, r0 + BLOCK)
                _dot_nn(D[r0:r1], W, Dp[r0:r1])
            Zp = _mlp_views(zbuf, n, sizes, l - 1)
            Ap = _mlp_views(abuf, n, sizes, l - 1)
            code = acts[l - 1]
            p = act_p[l - 1]
            pk = drop_p[l - 1]
            key = drop_keys[l - 1]
            scale = 1.0 / (1.0 - pk)
            up = fin
            nb, per = _row_blocks(n, up)
            for k in prange(nb):
                for i in range(k * per, min(n, (k + 1) * per)):
                    for j in range(up):
                        g = Dp[i, j]
                        if pk > 0.0:
                            if uniform01(key, i * up + j) >= pk:
                                g = g * scale
                            else:
                                g = g * 0
                        if code == 1:
                            g = g if Zp[i, j] > 0 else g * 0
                        else:
                            g = g * _act_grad(code, np.float64(Zp[i, j]), np.float64(Ap[i, j]), p)
                        Dp[i, j] = g
                        Dpt[j, i] = g
    # squared norm, fixed blocks then a serial sum
    m = grads.shape[0]
    nblk = partials.shape[0]
    for k in prange(nblk):
        s = 0.0
        for i in range(k * NORM_BLOCK, min(m, (k + 1) * NORM_BLOCK)):
            v = np.float64(grads[i])
            s += v * v
        partials[k] = s
    sq = 0.0
    for k in range(nblk):
        sq += partials[k]
    return loss, correct, sq


@njit(**_PJIT)
def optimizer_kernel(code, p, g, s1, s2, s3, c, t):
    """One fused pass of optimizer ``code`` over the flat buffers (formulas:
    ``nnkernels.reference``). ``c`` holds per-step coefficients in the
    parameter dtype (see ``CpuBackend.step``): c[0] grad_scale, c[1] lr,
    c[2] weight_decay, then per optimizer:
    sgd: c[3] momentum, c[4] 1-dampening, c[5] nesterov;
    adagrad: c[3] clr, c[4] eps;
    rmsprop: c[3] alpha, c[4] 1-alpha, c[5] eps, c[6] momentum, c[7] centered,
    c[8] 1-(1-alpha) (torch.lerp's second form);
    adam(w): c[3] 1-β1 (lerp weight), c[4] β2, c[5] 1-β2, c[6] step_size,
    c[7] sqrt(1-β2^t), c[8] eps, c[9] amsgrad, c[10] 1 - lr·wd (adamw),
    c[11] 1-(1-β1)."""
    n = p.shape[0]
    scale = c[0]
    lr = c[1]
    wd = c[2]
    if code == 0:
        mom = c[3]
        damp1 = c[4]
        nest = c[5] != 0
        for i in prange(n):
            d = g[i] * scale
            if wd != 0:
                d = d + wd * p[i]
            if mom != 0:
                if t == 1:
                    b = d
                else:
                    b = s1[i] * mom + damp1 * d
                s1[i] = b
                d = d + mom * b if nest else b
            p[i] = p[i] - lr * d
    elif code == 1:
        clr = c[3]
        eps = c[4]
        for i in prange(n):
            d = g[i] * scale
            if wd != 0:
                d = d + wd * p[i]
            s = s1[i] + d * d
            s1[i] = s
            p[i] = p[i] - clr * d / (np.sqrt(s) + eps)
    elif code == 2:
        alpha = c[3]
        oma = c[4]
        eps = c[5]
        mom = c[6]
        centered = c[7] != 0
        alpha_l = c[8]
        for i in prange(n):
            d = g[i] * scale
            if wd != 0:
                d = d + wd * p[i]
            v = s1[i] * alpha + oma * d * d
            s1[i] = v
            if centered:
                ga = s3[i]
                if oma < 0.5:
                    ga = ga + oma * (d - ga)
                else:
                    ga = d - (d - ga) * alpha_l
                s3[i] = ga
                avg = np.sqrt(v - ga * ga) + eps
            else:
                avg = np.sqrt(v) + eps
            if mom > 0:
                b = s2[i] * mom + d / avg
                s2[i] = b
                p[i] = p[i] - lr * b
            else:
                p[i] = p[i] - lr * d / avg
    else:
        w1 = c[3]
        b2 = c[4]
        omb2 = c[5]
        step_size = c[6]
        bc2s = c[7]
        eps = c[8]
        ams = c[9] != 0
        decay = c[10]
        omw1 = c[11]
        adamw = code == 4
        for i in prange(n):
            d = g[i] * scale
            x = p[i]
            if adamw:
                x = x * decay
            elif wd != 0:
                d = d + wd * x
            m = s1[i]
            if w1 < 0.5:
                m = m + w1 * (d - m)
            else:
                m = d - (d - m) * omw1
            s1[i] = m
            v = s2[i] * b2 + omb2 * d * d
            s2[i] = v
            if ams:
                vm = max(s3[i], v)
                s3[i] = vm
                v = vm
            p[i] = x - step_size * m / (np.sqrt(v) / bc2s + eps)


@njit(**_JIT)
def all_finite(a):
    """True when no element of ``a`` (any shape, contiguous) is NaN or ±Inf."""
    flat = a.reshape(a.size)
    for i in range(flat.shape[0]):
        if not np.isfinite(flat[i]):
            return False
    return True
