"""CUDA device functions the kernel sources share, built per ``Target`` (they
close over its dtype and geometry): the activations and their derivatives,
sigmoid/softplus/lerp, the dropout factor, the staged-tile product loop of
the three matrix kernels (``product_tile``), and the shared-memory block sum
of the reductions.

Activation and output codes are ``nnkernels.registry``'s; a code with no
formula here computes NaN, so a registry entry this backend lacks fails every
test that uses it. The tile loop and block sum are inlined into each kernel
at Numba's IR level (``inline="always"``), so they compile as if written out
in place (their shared arrays become the kernel's).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from numba import types

from .. import rng
from ..registry import ActivationCode as Act
from . import numba_cuda as cuda

SOFTPLUS_THRESHOLD = 20.0  # torch's softplus: z itself above it
ALONG_ROWS, DOWN_COLUMNS = 0, 1  # how a product operand's staged slice lies in memory (see product_tile)
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715

# rng device functions (shared by both dtypes: they work in uint64/float64)
uniform01 = cuda.jit(device=True)(rng.uniform01) if cuda is not None else None
box_muller = cuda.jit(device=True)(rng.box_muller) if cuda is not None else None


def device_functions(target) -> SimpleNamespace:
    """The device functions for ``target``, by name."""
    T = target.T
    f64 = types.float64
    tile, reg, threads = target.tile, target.reg, target.threads
    BT, KT = target.bt, target.kt
    KP = KT + 1  # padded shared row: conflict-free reads
    NT = tile * tile  # threads per product block
    ZERO, ONE, HALF, THREE = T(0.0), T(1.0), T(0.5), T(3.0)
    SIXTH = T(1.0 / 6.0)
    TWENTY = T(SOFTPLUS_THRESHOLD)
    NAN = T(math.nan)
    K_GELU, C_GELU, C3_GELU = T(GELU_K), T(GELU_C), T(3.0 * GELU_C)
    device = cuda.jit(device=True)
    inline = cuda.jit(device=True, inline="always")

    # ---- activations (formulas: registry.activations) ------------------------
    @device
    def sigmoid(x):
        if x >= ZERO:
            return ONE / (ONE + math.exp(-x))
        e = math.exp(x)
        return e / (ONE + e)

    @device
    def softplus(x):
        return x if x > TWENTY else math.log1p(math.exp(x))

    @device
    def act_fwd(code, x, p):
        """f(x) of activation ``code`` with parameter ``p``."""
        if code == Act.IDENTITY:
            return x
        if code == Act.RELU:
            return x if x > ZERO else ZERO
        if code == Act.LEAKY_RELU:
            return x if x > ZERO else p * x
        if code == Act.ELU:
            return x if x > ZERO else p * math.expm1(x)
        if code == Act.SOFTPLUS:
            return softplus(x)
        if code == Act.SIGMOID:
            return sigmoid(x)
        if code == Act.TANH:
            return math.tanh(x)
        if code == Act.HARDSWISH:
            if x <= -THREE:
                return ZERO
            if x >= THREE:
                return x
            return x * (x + THREE) * SIXTH
        if code == Act.GELU:
            return HALF * x * (ONE + math.tanh(K_GELU * (x + C_GELU * x * x * x)))
        if code == Act.STEP:
            return ONE if x > ZERO else ZERO
        if code == Act.SILU:
            return x * sigmoid(x)
        if code == Act.MISH:
            return x * math.tanh(softplus(x))
        return NAN

    @device
    def act_deriv(code, z, p):
        """f'(z), from z alone (the backward pass keeps Z, not A)."""
        if code == Act.IDENTITY:
            return ONE
        if code == Act.RELU:
            return ONE if z > ZERO else ZERO
        if code == Act.LEAKY_RELU:
            return ONE if z > ZERO else p
        if code == Act.ELU:
            return ONE if z > ZERO else p * math.exp(z)
        if code == Act.SOFTPLUS:
            return ONE if z > TWENTY else sigmoid(z)
        if code == Act.SIGMOID:
            s = sigmoid(z)
            return s * (ONE - s)
        if code == Act.TANH:
            t = math.tanh(z)
            return ONE - t * t
        if code == Act.HARDSWISH:  # torch 2.x hardswish_backward, kinks included
            if z <= -THREE:
                return ZERO
            if z < THREE:
                return z / THREE + HALF
            return ONE
        if code == Act.GELU:
            t = math.tanh(K_GELU * (z + C_GELU * z * z * z))
            return HALF * (ONE + t) + HALF * z * (ONE - t * t) * K_GELU * (ONE + C3_GELU * z * z)
        if code == Act.STEP:
            return ZERO  # zero derivative everywhere
        if code == Act.SILU:
            s = sigmoid(z)
            return s * (ONE + z * (ONE - s))
        if code == Act.MISH:
            t = math.tanh(softplus(z))
            return t + z * sigmoid(z) * (ONE - t * t)
        return NAN

    @device
    def lerp(start, end, w):
        # torch.lerp's two-sided form (what torch.optim's exp_avg / grad_avg use)
        if w < HALF:
            return start + w * (end - start)
        return end - (end - start) * (ONE - w)

    @device
    def dropout_factor(key, index, p, scale):
        # inverted dropout: a unit is kept when its uniform draw is >= p
        if uniform01(key, index) >= p:
            return scale
        return ZERO

    # ---- the staged-tile product loop ------------------------------------------
    # A block of tile×tile threads computes a BT×BT output tile of
    # op(A)·op(B)ᵀ: thread (ty, tx) owns the reg×reg outputs at rows
    # ty + i·tile and columns tx + j·tile, accumulated in registers. The
    # reduction runs over KT-wide slices staged in shared memory (rows padded
    # by one: conflict-free reads), loaded by all threads with consecutive
    # threads reading consecutive global addresses; out-of-range elements
    # load as zero, so any shape works. How an operand's slice lies in memory:
    # ALONG_ROWS, s[l, q] = M[base + l, k0 + q] (the reduction runs along M's
    # rows); DOWN_COLUMNS, s[l, q] = M[k0 + q, base + l] (it runs down M's
    # columns). The layouts are constants at each call: the branches fold.
    @inline
    def staged_element(M, layout, e, base, k0, extent, depth):
        """Element ``e`` of the slice at k0 of the BT lines from ``base``
        (``extent`` lines, ``depth`` long): its place (l, q) in the shared
        tile and its value, zero out of range. Consecutive e read
        consecutive addresses in both layouts."""
        if layout == ALONG_ROWS:  # s[l, q] = M[base + l, k0 + q]
            l = e // KT
            q = e - l * KT
            r = base + l
            kk = k0 + q
            return l, q, M[r, kk] if (r < extent and kk < depth) else ZERO
        q = e // BT  # DOWN_COLUMNS: s[l, q] = M[k0 + q, base + l]
        l = e - q * BT
        kk = k0 + q
        c = base + l
        return l, q, M[kk, c] if (kk < depth and c < extent) else ZERO

    @inline
    def tiles(rows, cols):
        """Output tiles of a rows × cols product (blocks visit them grid-stride)."""
        return ((rows + BT - 1) // BT) * ((cols + BT - 1) // BT)

    @inline
    def product_tile(t, acc, A, a_layout, B, b_layout, rows, cols, depth, row_sums):
        """Output tile ``t`` (row-major over the tiles) of op(A)·op(B)ᵀ,
        rows × cols, summed over ``depth``: each thread's reg×reg outputs
        into ``acc``. ``row_sums`` (or None): a float64 array that, for the
        threads of tile column 0, also receives Σ_depth op(A) of the
        thread's rows. Returns the tile's origin (row0, col0)."""
        sA = cuda.shared.array((BT, KP), T)
        sB = cuda.shared.array((BT, KP), T)
        av = cuda.local.array(reg, T)
        bv = cuda.local.array(reg, T)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tile + tx
        tiles_c = (cols + BT - 1) // BT
        row0 = (t // tiles_c) * BT
        col0 = (t % tiles_c) * BT
        sums = col0 == 0 and tx == 0
        for i in range(reg):
            for j in range(reg):
                acc[i, j] = ZERO
        if row_sums is not None:  # (a None argument prunes every row_sums branch at compile time)
            for i in range(reg):
                row_sums[i] = 0.0
        for k0 in range(0, depth, KT):
            for e in range(tid, BT * KT, NT):
                l, q, v = staged_element(A, a_layout, e, row0, k0, rows, depth)
                sA[l, q] = v
                l, q, v = staged_element(B, b_layout, e, col0, k0, cols, depth)
                sB[l, q] = v
            cuda.syncthreads()
            for q in range(KT):
                for i in range(reg):
                    av[i] = sA[ty + i * tile, q]
                for j in range(reg):
                    bv[j] = sB[tx + j * tile, q]
                for i in range(reg):
                    for j in range(reg):
                        acc[i, j] += av[i] * bv[j]
                if row_sums is not None:
                    if sums:
                        for i in range(reg):
                            row_sums[i] += f64(av[i])
            cuda.syncthreads()
        return row0, col0

    @inline
    def each_output(acc, row0, col0, rows, cols, epilogue, args):
        """``epilogue(acc[i, j], r, c, args)`` for each of the thread's
        outputs (r, c) of the tile at (row0, col0) that lies inside rows ×
        cols. The loop bounds are constants: it unrolls, so acc stays in
        registers, and the epilogue (a device function) is inlined."""
        for i in range(reg):
            r = row0 + cuda.threadIdx.y + i * tile
            for j in range(reg):
                c = col0 + cuda.threadIdx.x + j * tile
                if r < rows and c < cols:
                    epilogue(acc[i, j], r, c, args)

    # ---- the block reduction ------------------------------------------------------
    @inline
    def block_sum(sh, tid):
        """Σ sh[0..threads) by a tree in shared memory: every thread of the
        block calls it after writing its sh[tid]; the sum is in sh[0]."""
        cuda.syncthreads()
        h = threads // 2
        while h > 0:
            if tid < h:
                sh[tid] += sh[tid + h]
            cuda.syncthreads()
            h //= 2
        return sh[0]

    return SimpleNamespace(
        sigmoid=sigmoid, softplus=softplus, act_fwd=act_fwd, act_deriv=act_deriv, lerp=lerp,
        dropout_factor=dropout_factor, uniform01=uniform01, box_muller=box_muller,
        tiles=tiles, product_tile=product_tile, each_output=each_output, block_sum=block_sum)
