"""CUDA kernels for MLP training and inference (numba-cuda).

Every kernel is written once and built per dtype (float32, float64) and per
launch geometry by :func:`build_sources`, which returns plain Python
functions; :func:`kernels_for` wraps them with ``cuda.jit`` (cached per
dtype). Keeping the un-jitted functions lets ``tests/test_cuda_ptx.py``
compile each one to real sm_90 PTX with ``cuda.compile_ptx`` on a machine
without a GPU, for both dtypes, from the same source the GPU runs.

Geometry: matrix products use square ``tile``×``tile`` thread blocks, each
thread accumulating ``reg``×``reg`` outputs in registers from shared-memory
tiles; every kernel loops grid-stride (over output tiles, rows
or elements), so results do not depend on how many blocks are launched. Under
the simulator (one Python thread per simulated thread) the backend launches
tiny blocks (``SIM_TILE``/``SIM_REG``/``SIM_THREADS``: partial tiles at
test sizes); on a GPU ``TILE``/``REG``/``THREADS``, which the PTX test
compiles.

Numerics: products accumulate in the model's dtype (as cuBLAS does for
fp32 without TF32); bias gradients (fused into the weight-gradient
product), losses, accuracy counts and the squared gradient norm are
accumulated in float64, and the two-stage reductions are deterministic (no
atomics). Random draws for dropout and input noise are ``nnkernels.rng``'s
counter-based SplitMix64 compiled as device functions, so the GPU draws the
same masks and noise as the CPU backend and the NumPy reference.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import types

from .. import rng
from . import SIMULATOR, numba_cuda as cuda

# --- geometry ---------------------------------------------------------------
TILE = 16          # matmul blocks on a GPU: TILE×TILE threads ...
REG = 4            # ... each computing REG×REG outputs (64×64 outputs per block)
THREADS = 256      # threads per block for 1-D kernels on a GPU
RED_BLOCKS = 256   # blocks of the first stage of the gradient-norm reduction
SIM_TILE = 4       # the same kernels under the simulator: tiny blocks
SIM_REG = 2
SIM_THREADS = 8
SIM_RED_BLOCKS = 2

# --- codes passed to kernels ------------------------------------------------
ACTIVATION_CODES = {
    "identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "softplus": 4,
    "sigmoid": 5, "tanh": 6, "hardswish": 7, "gelu": 8, "step": 9,
}
LOSS_MSE, LOSS_BCE, LOSS_CE = 0, 1, 2
LOSS_CODES = {"mse": LOSS_MSE, "bce_with_logits": LOSS_BCE, "softmax_cross_entropy": LOSS_CE}
OUT_IDENTITY, OUT_SIGMOID, OUT_SOFTMAX = 0, 1, 2
OUTPUT_CODES = {"identity": OUT_IDENTITY, "sigmoid": OUT_SIGMOID, "softmax": OUT_SOFTMAX}

_NUMBA_DTYPES = {"float32": types.float32, "float64": types.float64}

# rng device functions (shared by both dtypes: they work in uint64/float64)
_uniform01 = cuda.jit(device=True)(rng.uniform01) if cuda is not None else None
_box_muller = cuda.jit(device=True)(rng.box_muller) if cuda is not None else None


def build_sources(dtype: str, tile: int, threads: int, reg: int):
    """The kernels for one dtype and geometry, as plain Python functions
    (not yet jitted), and their signatures: ``{name: (pyfunc, signature)}``.

    ``tile``: the products' blocks are tile×tile threads, each computing
    reg×reg outputs (a block covers (tile·reg)² outputs); ``threads``: the
    block size of 1-D kernels and reductions (a power of two)."""
    T = _NUMBA_DTYPES[dtype]
    ZERO = T(0.0)
    ONE = T(1.0)
    HALF = T(0.5)
    THREE = T(3.0)
    SIXTH = T(1.0 / 6.0)
    TWENTY = T(20.0)
    GELU_K = T(math.sqrt(2.0 / math.pi))
    GELU_C = T(0.044715)
    GELU_C3 = T(3.0 * 0.044715)
    BT = tile * reg    # output tile edge per block
    KT = tile          # reduction slice staged in shared memory per step
    KP = KT + 1        # padded shared row: conflict-free reads
    NT = tile * tile   # threads per block
    f64 = types.float64
    i64 = types.int64
    u64 = types.uint64
    A2 = T[:, ::1]
    A1 = T[::1]
    F1 = f64[::1]
    I1 = i64[::1]
    uniform01 = _uniform01
    box_muller = _box_muller

    # ---- device functions ------------------------------------------------
    @cuda.jit(device=True)
    def sigmoid(x):
        if x >= ZERO:
            return ONE / (ONE + math.exp(-x))
        e = math.exp(x)
        return e / (ONE + e)

    @cuda.jit(device=True)
    def act_fwd(x, code, p1):
        if code == 0:
            return x
        if code == 1:
            return x if x > ZERO else ZERO
        if code == 2:
            return x if x > ZERO else p1 * x
        if code == 3:
            return x if x > ZERO else p1 * math.expm1(x)
        if code == 4:
            return x if x > TWENTY else math.log1p(math.exp(x))
        if code == 5:
            return sigmoid(x)
        if code == 6:
            return math.tanh(x)
        if code == 7:
            if x <= -THREE:
                return ZERO
            if x >= THREE:
                return x
            return x * (x + THREE) * SIXTH
        if code == 8:
            return HALF * x * (ONE + math.tanh(GELU_K * (x + GELU_C * x * x * x)))
        # 9: step
        return ONE if x > ZERO else ZERO

    @cuda.jit(device=True)
    def act_deriv(z, code, p1):
        if code == 0:
            return ONE
        if code == 1:
            return ONE if z > ZERO else ZERO
        if code == 2:
            return ONE if z > ZERO else p1
        if code == 3:
            return ONE if z > ZERO else p1 * math.exp(z)
        if code == 4:
            return ONE if z > TWENTY else sigmoid(z)
        if code == 5:
            s = sigmoid(z)
            return s * (ONE - s)
        if code == 6:
            t = math.tanh(z)
            return ONE - t * t
        if code == 7:  # torch 2.x hardswish_backward, kinks included
            if z <= -THREE:
                return ZERO
            if z < THREE:
                return z / THREE + HALF
            return ONE
        if code == 8:
            t = math.tanh(GELU_K * (z + GELU_C * z * z * z))
            return HALF * (ONE + t) + HALF * z * (ONE - t * t) * GELU_K * (ONE + GELU_C3 * z * z)
        return ZERO  # step: zero derivative everywhere

    @cuda.jit(device=True)
    def lerp(start, end, w):
        # torch.lerp's two-sided form (what torch.optim's exp_avg / grad_avg use)
        if w < HALF:
            return start + w * (end - start)
        return end - (end - start) * (ONE - w)

    @cuda.jit(device=True)
    def dropout_factor(key, index, p, scale):
        # inverted dropout: a unit is kept when its uniform draw is >= p
        if uniform01(key, index) >= p:
            return scale
        return ZERO

    # ---- products with fused epilogues -------------------------------------
    # Register-blocked tiled products. A block of tile×tile threads computes a
    # BT×BT output tile (BT = tile·reg): thread (ty, tx) owns the reg×reg
    # outputs at rows ty + i·tile and columns tx + j·tile, accumulated in
    # registers. The reduction runs over KT-wide slices staged in shared
    # memory (one row of padding: conflict-free reads), loaded by all
    # threads with consecutive threads reading consecutive global addresses.
    # Out-of-range elements load as zero, so any shape works. Tiles are
    # visited grid-stride.

    def linear_forward(A, W, b, Z, Out, n, k, m, act, p1, key, drop_p, drop_scale, store_z):
        """Z = A·Wᵀ + b (A: n×k, W: m×k, Z: n×m); Out = act(Z), then inverted
        dropout with probability drop_p (index row*m + col of stream key).
        Z is written only when store_z (training keeps it for the backward)."""
        sA = cuda.shared.array((BT, KP), T)
        sB = cuda.shared.array((BT, KP), T)
        acc = cuda.local.array((reg, reg), T)
        av = cuda.local.array(reg, T)
        bv = cuda.local.array(reg, T)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tile + tx
        tiles_m = (m + BT - 1) // BT
        ntiles = ((n + BT - 1) // BT) * tiles_m
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            row0 = (t // tiles_m) * BT
            col0 = (t % tiles_m) * BT
            for i in range(reg):
                for j in range(reg):
                    acc[i, j] = ZERO
            for k0 in range(0, k, KT):
                for e in range(tid, BT * KT, NT):
                    li = e // KT
                    q = e - li * KT
                    r = row0 + li
                    kk = k0 + q
                    sA[li, q] = A[r, kk] if (r < n and kk < k) else ZERO
                    c = col0 + li
                    sB[li, q] = W[c, kk] if (c < m and kk < k) else ZERO
                cuda.syncthreads()
                for q in range(KT):
                    for i in range(reg):
                        av[i] = sA[ty + i * tile, q]
                    for j in range(reg):
                        bv[j] = sB[tx + j * tile, q]
                    for i in range(reg):
                        for j in range(reg):
                            acc[i, j] += av[i] * bv[j]
                cuda.syncthreads()
            for i in range(reg):
                r = row0 + ty + i * tile
                for j in range(reg):
                    c = col0 + tx + j * tile
                    if r < n and c < m:
                        z = acc[i, j] + b[c]
                        if store_z != 0:
                            Z[r, c] = z
                        a = act_fwd(z, act, p1)
                        if drop_p > 0.0:
                            a = a * dropout_factor(key, r * m + c, drop_p, drop_scale)
                        Out[r, c] = a

    def linear_backward_input(dZ, W, Zp, dZp, n, m, k, act, p1, key, drop_p, drop_scale):
        """dZp = ((dZ·W) ⊙ dropout mask·scale) ⊙ act'(Zp): the gradient of the
        previous layer's pre-activation (dZ: n×m, W: m×k, Zp, dZp: n×k)."""
        sA = cuda.shared.array((BT, KP), T)
        sB = cuda.shared.array((BT, KP), T)
        acc = cuda.local.array((reg, reg), T)
        av = cuda.local.array(reg, T)
        bv = cuda.local.array(reg, T)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tile + tx
        tiles_k = (k + BT - 1) // BT
        ntiles = ((n + BT - 1) // BT) * tiles_k
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            row0 = (t // tiles_k) * BT
            col0 = (t % tiles_k) * BT
            for i in range(reg):
                for j in range(reg):
                    acc[i, j] = ZERO
            for j0 in range(0, m, KT):
                for e in range(tid, BT * KT, NT):
                    # sA[li, q] = dZ[row0+li, j0+q]: consecutive e along the dZ row
                    li = e // KT
                    q = e - li * KT
                    r = row0 + li
                    jj = j0 + q
                    sA[li, q] = dZ[r, jj] if (r < n and jj < m) else ZERO
                    # sB[lc, q] = W[j0+q, col0+lc]: consecutive e along the W row
                    q2 = e // BT
                    lc = e - q2 * BT
                    jw = j0 + q2
                    c = col0 + lc
                    sB[lc, q2] = W[jw, c] if (jw < m and c < k) else ZERO
                cuda.syncthreads()
                for q in range(KT):
                    for i in range(reg):
                        av[i] = sA[ty + i * tile, q]
                    for j in range(reg):
                        bv[j] = sB[tx + j * tile, q]
                    for i in range(reg):
                        for j in range(reg):
                            acc[i, j] += av[i] * bv[j]
                cuda.syncthreads()
            for i in range(reg):
                r = row0 + ty + i * tile
                for j in range(reg):
                    c = col0 + tx + j * tile
                    if r < n and c < k:
                        d = acc[i, j]
                        if drop_p > 0.0:
                            d = d * dropout_factor(key, r * k + c, drop_p, drop_scale)
                        dZp[r, c] = d * act_deriv(Zp[r, c], act, p1)

    def linear_backward_weight(dZ, A, dW, db, n, m, k):
        """dW = dZᵀ·A (dZ: n×m, A: n×k, dW: m×k), reducing over the batch;
        fused: db = Σ_rows dZ (the bias gradient, accumulated in float64 as
        the reference does) by the first thread column of the blocks that
        own output column 0, from the dZ slices already in shared memory."""
        sA = cuda.shared.array((BT, KP), T)
        sB = cuda.shared.array((BT, KP), T)
        acc = cuda.local.array((reg, reg), T)
        bacc = cuda.local.array(reg, f64)
        av = cuda.local.array(reg, T)
        bv = cuda.local.array(reg, T)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tile + tx
        tiles_k = (k + BT - 1) // BT
        ntiles = ((m + BT - 1) // BT) * tiles_k
        for t in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            row0 = (t // tiles_k) * BT
            col0 = (t % tiles_k) * BT
            for i in range(reg):
                bacc[i] = 0.0
                for j in range(reg):
                    acc[i, j] = ZERO
            bias_thread = col0 == 0 and tx == 0
            for r0 in range(0, n, KT):
                for e in range(tid, BT * KT, NT):
                    # both operands are read along their rows (the batch is
                    # the reduction): sA[li, q] = dZ[r0+q, row0+li],
                    # sB[lc, q] = A[r0+q, col0+lc]
                    q = e // BT
                    l = e - q * BT
                    rr = r0 + q
                    ia = row0 + l
                    sA[l, q] = dZ[rr, ia] if (rr < n and ia < m) else ZERO
                    c = col0 + l
                    sB[l, q] = A[rr, c] if (rr < n and c < k) else ZERO
                cuda.syncthreads()
                for q in range(KT):
                    for i in range(reg):
                        av[i] = sA[ty + i * tile, q]
                    for j in range(reg):
                        bv[j] = sB[tx + j * tile, q]
                    for i in range(reg):
                        for j in range(reg):
                            acc[i, j] += av[i] * bv[j]
                    if bias_thread:
                        for i in range(reg):
                            bacc[i] += f64(av[i])
                cuda.syncthreads()
            for i in range(reg):
                r = row0 + ty + i * tile
                for j in range(reg):
                    c = col0 + tx + j * tile
                    if r < m and c < k:
                        dW[r, c] = acc[i, j]
                if bias_thread and r < m:
                    db[r] = T(bacc[i])

    # ---- elementwise ------------------------------------------------------
    def add_noise(X, Xn, n, k, std, key):
        """Xn = X + std·N(0, 1), normal draw number row*k + col of stream key."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for i in range(start, n * k, stride):
            r = i // k
            c = i - r * k
            g = box_muller(uniform01(key, 2 * i), uniform01(key, 2 * i + 1))
            Xn[r, c] = X[r, c] + T(std * g)

    def output_activation(Z, Out, n, m, kind):
        """Out = the output activation of the logits Z, one thread per row:
        identity (copy), sigmoid, or softmax (max-shifted)."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for r in range(start, n, stride):
            if kind == 0:
                for c in range(m):
                    Out[r, c] = Z[r, c]
            elif kind == 1:
                for c in range(m):
                    Out[r, c] = sigmoid(Z[r, c])
            else:
                mx = Z[r, 0]
                for c in range(1, m):
                    if Z[r, c] > mx:
                        mx = Z[r, c]
                s = 0.0
                for c in range(m):
                    s += math.exp(f64(Z[r, c] - mx))
                for c in range(m):
                    Out[r, c] = T(math.exp(f64(Z[r, c] - mx)) / s)

    # ---- fused output activation + loss: value (per row, float64) and gradient
    def loss_dense(Z, Y, dZ, rowloss, rowcorrect, n, m, kind, smoothing, gscale):
        """One thread per row. kind 0: MSE (Σ (z-y)², grad 2(z-y)·gscale);
        1: BCE with logits (max(z,0) - z·y + log1p(exp(-|z|)), grad
        (σ(z) - y)·gscale; correct counts the elements where (z > 0) equals
        (y > 0.5)); 2: softmax cross entropy against probability targets
        with label smoothing q' = (1-ε)·y + ε/m (-Σ q'·log_softmax(z), grad
        (Σq'·p - q')·gscale; correct when argmax z == argmax y). gscale is
        1/(n·m) for MSE and BCE, 1/n for cross entropy (the mean)."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for r in range(start, n, stride):
            total = 0.0
            correct = 0.0
            if kind == 0:
                for c in range(m):
                    d = Z[r, c] - Y[r, c]
                    total += f64(d) * f64(d)
                    dZ[r, c] = T(2.0 * f64(d) * gscale)
            elif kind == 1:
                for c in range(m):
                    z = f64(Z[r, c])
                    y = f64(Y[r, c])
                    total += max(z, 0.0) - z * y + math.log1p(math.exp(-abs(z)))
                    if z >= 0.0:
                        s = 1.0 / (1.0 + math.exp(-z))
                    else:
                        e = math.exp(z)
                        s = e / (1.0 + e)
                    dZ[r, c] = T((s - y) * gscale)
                    if (z > 0.0) == (y > 0.5):
                        correct += 1.0
            else:
                mx = f64(Z[r, 0])
                amax = 0
                ymax = f64(Y[r, 0])
                ya = 0
                for c in range(1, m):
                    z = f64(Z[r, c])
                    if z > mx:
                        mx = z
                        amax = c
                    y = f64(Y[r, c])
                    if y > ymax:
                        ymax = y
                        ya = c
                s = 0.0
                qs = 0.0
                for c in range(m):
                    s += math.exp(f64(Z[r, c]) - mx)
                    qs += f64(Y[r, c])
                lse = mx + math.log(s)
                off = smoothing / m
                qsum = (1.0 - smoothing) * qs + smoothing
                for c in range(m):
                    z = f64(Z[r, c])
                    q = (1.0 - smoothing) * f64(Y[r, c]) + off
                    total -= q * (z - lse)
                    p = math.exp(z - lse)
                    dZ[r, c] = T((qsum * p - q) * gscale)
                correct = 1.0 if amax == ya else 0.0
            rowloss[r] = total
            rowcorrect[r] = correct

    def loss_labels(Z, labels, dZ, rowloss, rowcorrect, n, m, smoothing, gscale):
        """Softmax cross entropy against integer labels with label smoothing:
        (1-ε)·(-log p_y) + (ε/m)·Σ_c (-log p_c), grad (p - q')·gscale with
        q' = (1-ε)·onehot + ε/m; correct when argmax z == label."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for r in range(start, n, stride):
            lab = labels[r]
            mx = f64(Z[r, 0])
            amax = 0
            for c in range(1, m):
                z = f64(Z[r, c])
                if z > mx:
                    mx = z
                    amax = c
            s = 0.0
            zsum = 0.0
            for c in range(m):
                z = f64(Z[r, c])
                s += math.exp(z - mx)
                zsum += z
            lse = mx + math.log(s)
            off = smoothing / m
            total = (1.0 - smoothing) * (lse - f64(Z[r, lab])) + off * (m * lse - zsum)
            for c in range(m):
                p = math.exp(f64(Z[r, c]) - lse)
                q = off + ((1.0 - smoothing) if c == lab else 0.0)
                dZ[r, c] = T((p - q) * gscale)
            rowloss[r] = total
            rowcorrect[r] = 1.0 if amax == lab else 0.0

    # ---- reductions (float64, deterministic) --------------------------------
    def reduce_rows(rowloss, rowcorrect, n, out):
        """One block: out[0] = Σ rowloss, out[1] = Σ rowcorrect."""
        sl = cuda.shared.array(threads, f64)
        sc = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        a = 0.0
        b = 0.0
        for i in range(tid, n, threads):
            a += rowloss[i]
            b += rowcorrect[i]
        sl[tid] = a
        sc[tid] = b
        cuda.syncthreads()
        h = threads // 2
        while h > 0:
            if tid < h:
                sl[tid] += sl[tid + h]
                sc[tid] += sc[tid + h]
            cuda.syncthreads()
            h //= 2
        if tid == 0:
            out[0] = sl[0]
            out[1] = sc[0]

    def sq_norm_partial(g, size, partial):
        """Stage 1 of Σ g²: each block writes its float64 partial sum."""
        sh = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        acc = 0.0
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            v = f64(g[i])
            acc += v * v
        sh[tid] = acc
        cuda.syncthreads()
        h = threads // 2
        while h > 0:
            if tid < h:
                sh[tid] += sh[tid + h]
            cuda.syncthreads()
            h //= 2
        if tid == 0:
            partial[cuda.blockIdx.x] = sh[0]

    def sum_to_slot(partial, count, out, slot):
        """Stage 2, one block: out[slot] = Σ partial[:count]."""
        sh = cuda.shared.array(threads, f64)
        tid = cuda.threadIdx.x
        acc = 0.0
        for i in range(tid, count, threads):
            acc += partial[i]
        sh[tid] = acc
        cuda.syncthreads()
        h = threads // 2
        while h > 0:
            if tid < h:
                sh[tid] += sh[tid + h]
            cuda.syncthreads()
            h //= 2
        if tid == 0:
            out[slot] = sh[0]

    # ---- fused optimizers over the flat buffers (torch.optim formulas) -----
    def sgd_step(p, g, buf, size, lr, momentum, one_m_dampening, nesterov, wd, gs, first):
        """torch.optim.SGD: d = g·gs + wd·p; with momentum, buf = d on the
        first step, else momentum·buf + (1-dampening)·d; nesterov d += momentum·buf,
        else d = buf; p -= lr·d."""
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            d = g[i] * gs
            if wd != ZERO:
                d = d + wd * p[i]
            if momentum != ZERO:
                if first != 0:
                    bv = d
                else:
                    bv = buf[i] * momentum + one_m_dampening * d
                buf[i] = bv
                if nesterov != 0:
                    d = d + momentum * bv
                else:
                    d = bv
            p[i] = p[i] - lr * d

    def adagrad_step(p, g, acc_sum, size, clr, wd, eps, gs):
        """torch.optim.Adagrad: d = g·gs + wd·p; sum += d²;
        p -= clr·d/(sqrt(sum) + eps), clr = lr/(1 + (t-1)·lr_decay)."""
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            d = g[i] * gs
            if wd != ZERO:
                d = d + wd * p[i]
            s = acc_sum[i] + d * d
            acc_sum[i] = s
            p[i] = p[i] - clr * d / (math.sqrt(s) + eps)

    def rmsprop_step(p, g, sq, mom, gavg, size, lr, alpha, one_m_alpha, eps, momentum, centered, wd, gs):
        """torch.optim.RMSprop: d = g·gs + wd·p; sq = α·sq + (1-α)·d²;
        centered: gavg = lerp(gavg, d, 1-α), avg = sqrt(sq - gavg²) + eps, else
        sqrt(sq) + eps; momentum: buf = momentum·buf + d/avg, p -= lr·buf;
        else p -= lr·d/avg."""
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            d = g[i] * gs
            if wd != ZERO:
                d = d + wd * p[i]
            s = sq[i] * alpha + one_m_alpha * d * d
            sq[i] = s
            if centered != 0:
                ga = lerp(gavg[i], d, one_m_alpha)
                gavg[i] = ga
                avg = math.sqrt(s - ga * ga) + eps
            else:
                avg = math.sqrt(s) + eps
            if momentum != ZERO:
                bv = mom[i] * momentum + d / avg
                mom[i] = bv
                p[i] = p[i] - lr * bv
            else:
                p[i] = p[i] - lr * d / avg

    def adam_step(p, g, m1, m2, vmax, size, lr, one_m_beta1, beta2, one_m_beta2, eps, wd, decoupled,
                  amsgrad, step_size, bc2_sqrt, gs):
        """torch.optim.Adam / AdamW: d = g·gs; AdamW (decoupled) p *= 1 - lr·wd,
        Adam d += wd·p; m = lerp(m, d, 1-β1); v = β2·v + (1-β2)·d²;
        amsgrad: vmax = max(vmax, v) and v̂ = vmax; denom = sqrt(v̂)/sqrt(1-β2^t) + eps;
        p -= (lr/(1-β1^t))·m/denom."""
        for i in range(cuda.grid(1), size, cuda.gridsize(1)):
            d = g[i] * gs
            pv = p[i]
            if wd != ZERO:
                if decoupled != 0:
                    pv = pv * (ONE - lr * wd)
                else:
                    d = d + wd * pv
            a = lerp(m1[i], d, one_m_beta1)
            m1[i] = a
            v = m2[i] * beta2 + one_m_beta2 * d * d
            m2[i] = v
            if amsgrad != 0:
                if vmax[i] > v:
                    v = vmax[i]
                vmax[i] = v
            denom = math.sqrt(v) / bc2_sqrt + eps
            p[i] = pv - step_size * a / denom

    sources = {
        "linear_forward": (linear_forward, (A2, A2, A1, A2, A2, i64, i64, i64, i64, T, u64, f64, T, i64)),
        "linear_backward_input": (linear_backward_input, (A2, A2, A2, A2, i64, i64, i64, i64, T, u64, f64, T)),
        "linear_backward_weight": (linear_backward_weight, (A2, A2, A2, A1, i64, i64, i64)),
        "add_noise": (add_noise, (A2, A2, i64, i64, f64, u64)),
        "output_activation": (output_activation, (A2, A2, i64, i64, i64)),
        "loss_dense": (loss_dense, (A2, A2, A2, F1, F1, i64, i64, i64, f64, f64)),
        "loss_labels": (loss_labels, (A2, I1, A2, F1, F1, i64, i64, f64, f64)),
        "reduce_rows": (reduce_rows, (F1, F1, i64, F1)),
        "sq_norm_partial": (sq_norm_partial, (A1, i64, F1)),
        "sum_to_slot": (sum_to_slot, (F1, i64, F1, i64)),
        "sgd_step": (sgd_step, (A1, A1, A1, i64, T, T, T, i64, T, T, i64)),
        "adagrad_step": (adagrad_step, (A1, A1, A1, i64, T, T, T, T)),
        "rmsprop_step": (rmsprop_step, (A1, A1, A1, A1, A1, i64, T, T, T, T, T, i64, T, T)),
        "adam_step": (adam_step, (A1, A1, A1, A1, A1, i64, T, T, T, T, T, T, i64, i64, T, T, T)),
    }
    return {name: (fn, types.void(*sig)) for name, (fn, sig) in sources.items()}


class KernelSet:
    """The jitted kernels of one dtype, with the launch geometry they were
    built for (``tile``, ``threads``, ``red_blocks``)."""

    def __init__(self, dtype: str):
        if cuda is None:
            raise ImportError("numba-cuda is not installed")
        self.dtype = dtype
        if SIMULATOR:
            self.tile, self.reg, self.threads, self.red_blocks = SIM_TILE, SIM_REG, SIM_THREADS, SIM_RED_BLOCKS
        else:
            self.tile, self.reg, self.threads, self.red_blocks = TILE, REG, THREADS, RED_BLOCKS
        self.sources = build_sources(dtype, self.tile, self.threads, self.reg)
        self._k = {name: cuda.jit(fn) for name, (fn, _sig) in self.sources.items()}
        self._compiled = False
        self._lock = threading.Lock()

    def __getattr__(self, name):
        try:
            return self.__dict__["_k"][name]
        except KeyError:
            raise AttributeError(name) from None

    def compile_all(self) -> None:
        """Compile every kernel for its signature now (a GPU process calls
        this once at start-up: no compile on the first request, and no race
        between threads first calling an uncompiled dispatcher)."""
        with self._lock:
            if self._compiled:
                return
            if not SIMULATOR:
                for name, (_fn, sig) in self.sources.items():
                    self._k[name].compile(sig.args)
            self._compiled = True

    # launch geometry -----------------------------------------------------
    def grid_1d(self, work: int) -> int:
        """Blocks for a grid-stride 1-D kernel over ``work`` items."""
        blocks = max(1, (work + self.threads - 1) // self.threads)
        return min(blocks, 1 if SIMULATOR else 65535)

    def grid_tiles(self, rows: int, cols: int) -> int:
        """Blocks for a product with a rows×cols output."""
        bt = self.tile * self.reg
        tiles = ((rows + bt - 1) // bt) * ((cols + bt - 1) // bt)
        return min(max(tiles, 1), 2 if SIMULATOR else 1 << 20)


_KERNELS: dict[str, KernelSet] = {}
_KERNELS_LOCK = threading.Lock()


def kernels_for(dtype: str) -> KernelSet:
    """The (cached, process-wide) kernel set for ``dtype``."""
    with _KERNELS_LOCK:
        ks = _KERNELS.get(dtype)
        if ks is None:
            ks = _KERNELS[dtype] = KernelSet(dtype)
    ks.compile_all()
    return ks
