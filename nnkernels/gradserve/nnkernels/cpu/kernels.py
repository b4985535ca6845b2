"""Numba CPU kernels for inference and training: fused dense layers, output
activation + loss, and the backward pass over the flat buffers (layout:
``nnkernels.params``; the optimizer pass is ``cpu.optimizer``).

Interfaces, named rather than positional:
- ``layers``: the layer table, one ``kernel_args.LAYER`` record per dense
  layer (geometry, W/b offsets, activation code and parameter, dropout,
  hidden-output and weight noise);
- ``Targets``, ``TrainSettings``, ``TrainBuffers``, ``ForwardBuffers``: the
  batch's targets, the per-call scalars and the workspaces (namedtuples;
  each kernel reads their fields before its parallel loops, which cannot).

Design rules:
- Matrix products go to BLAS's gemm (``_gemm``: SciPy's OpenBLAS at one
  thread, through Numba's own ``numba_xxgemm`` helper, with explicit leading
  dimensions, so a call reads and writes tiles of the flat buffers in
  place). Each product is cut into a FIXED 2-D grid of tiles, rows of the
  batch × output features (``_xwt``, ``_xw``, ``_dtx``), one BLAS call per
  tile inside a prange: the tiles depend on the shapes only, never on the
  thread count, so neither do the bits; each call packs only its own slice
  of W, and a small batch still splits over output features onto every
  thread. OpenBLAS's result for an element depends on the call's shape
  (seen on SkylakeX: M=1 goes to gemv, and products with M·N·K ≤ ~1e6 to
  separate small-matrix kernels; within one shape the bits do not depend
  on the element's position in the tile). Inference therefore uses
  per-layer tiles, and where needed pads the batch (the last row tile
  from ``ForwardBuffers.tail``), as ``cpu.tiling`` chose by probing: a
  row's output is the same bits whichever rows share its batch (dynamic
  batching). Every other pass (bias + activation, derivative, dropout,
  loss) is one fused prange loop.
- At one thread no parallel region should launch (each costs microseconds
  even then): the backend calls a kernel's serial twin (``cpu.twins``: the
  same source compiled without ``parallel``, prange as range) over the same
  fixed partition, so the bits are the same; the kernels themselves never
  branch on the thread count.
- Every prange iteration writes its own outputs; reductions go through
  fixed-size partial buffers summed serially, so results do not depend on how
  the threading layer schedules the iterations (bit-identical runs).
- Losses and norms accumulate in float64. No fastmath: NaN/Inf must survive
  to the finiteness check in ``Model.train_step``. One exception, which
  keeps that: the squared norm's fixed NORM_BLOCK blocks are each summed
  with ``reassoc`` alone (``_sum_of_squares``: SIMD lanes, the order a
  function of the block length on one machine).
- A prange body writes only through a call (``_bias_act_rows`` and
  friends, one thread's rows) or into an argument, its fields or items
  (``bufs.rowloss``, ``state[0]``; never unpacked: ``a, b = t``). Numba
  0.68's parfor pass takes an array returned by a call or unpacked from a
  tuple for a fresh temporary and drops the loop's stores to it when
  nothing reads it afterwards (seen: zero bias gradients, lost momentum
  buffers).
- Activations and output kinds are ``nnkernels.registry`` codes, compared
  with the registry's IntEnum members (Numba freezes them as constants), so
  each kernel compiles for few signatures (one per dtype). A code with no
  formula here computes NaN: a registry entry this backend lacks fails every
  test that uses it.
- Numba's on-disk cache notices edits of this file only: what the kernels
  read from elsewhere (the registry's codes, ``nnkernels.rng``) is frozen in
  the cache until this file changes (the registry's codes never change).

Noise regularizers while training (draws: ``nnkernels.rng``; N_k is the
normal draw number k of the named stream, added after a cast to the
parameter dtype, as the reference does, except the input noise):
- input noise: X̃[r, c] = X[r, c] + std·N_{r·inputs+c} (NOISE_STREAM), the
  sum in float64 rounded once to the dtype (as it has been since input
  noise exists: stored trajectories keep their bits; the reference and
  CUDA add std·N cast first, so float32 may differ from them by an ulp);
- hidden-input noise (``layer.noise_std``): the next layer's input is
  h̃[r, c] = h[r, c] + std·N_{r·units+c} (hidden_noise_stream(i)), h the
  dropped-out activation; Keras ``GaussianNoise(std)`` after the layer.
  Its derivative is 1: the backward pass is the one without noise, but the
  weight gradient of the next layer reads h̃ (``_noise_rows``);
- weight noise (``layer.wnoise_std``): W̃[o, i] = W[o, i] + std·N_{o·fan_in+i}
  (weight_noise_stream(l)), in a copy (``TrainBuffers.wn``, filled by
  ``perturb_weights_kernel``) that the forward products and the backward
  D·W̃ read; the gradient dL/dW̃ goes to the stored W (neither PyTorch nor
  Keras has a built-in: it is Graves (2011)'s weight noise, as
  ``W + std * torch.randn_like(W)`` in the step's forward with the update
  applied to W);
- target noise (``TrainSettings.target_noise_std``, mse only): the loss is
  taken against ỹ[r, c] = y[r, c] + std·N_{r·units+c} (TARGET_NOISE_STREAM);
  ``MSELoss()(out, y + std * torch.randn_like(y))``.
A std of 0 skips its pass entirely: bit-identical to no noise.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.linalg import ensure_blas, get_blas_kind, make_constant_slot

from .. import rng as _rng
from ..registry import ActivationCode as Act
from ..registry import OutputCode as Out

NORM_BLOCK = 16384  # elements per partial sum of the squared gradient norm
COLSUM_COLS = 64   # bias gradients: columns of D per parallel task (their float64 sums stay in L1)
# Product tiles (rows of the batch × output features per BLAS call). Fixed, so
# results do not depend on the thread count. Measured single-threaded on 2-core
# Xeon (AVX-512), 784→512 at 1024 rows, GFLOP/s: one call 165, 256×256 140,
# 256×128 132, 128×128 119, 16×64 116, 8×64 107 (no packing: small-matrix kernel).
ROW_TILE = 256     # training: batch rows per call (the last tile may be shorter)
COL_TILE = 256     # training: output features per call
SPLIT_TASKS = 4    # training: tiles are halved (down to SPLIT_MIN) until a product has this many
SPLIT_MIN = 64     # (a function of the shapes only: 2 threads get 2 tiles each, bits fixed)
SOFTPLUS_THRESHOLD = 20.0  # torch's softplus: z itself above it

_JIT = dict(nogil=True, cache=True)
_PJIT = dict(parallel=True, nogil=True, cache=True)

uniform01 = njit(inline="always", **_JIT)(_rng.uniform01)
box_muller = njit(inline="always", **_JIT)(_rng.box_muller)

_GELU_C = math.sqrt(2.0 / math.pi)

ensure_blas()  # SciPy's cython_blas, which numba_xxgemm calls
_T = ord("t")
_N = ord("n")


class Targets(NamedTuple):
    """What a training batch is scored against: int64 class ``labels`` (n,)
    for softmax, else float ``values`` (n × units); the other one is empty.
    Both always passed, so one signature per dtype serves every loss."""

    labels: np.ndarray
    values: np.ndarray


class TrainSettings(NamedTuple):
    """The scalars of one training call: the output kind (OutputCode), the
    label smoothing ε, 1/count (count: what the loss is a mean over,
    ``OutputSpec.counted``), the input noise's std and stream key, and the
    target noise's (regression)."""

    out_kind: int
    label_smoothing: float
    inv_count: float
    noise_std: float
    noise_key: np.uint64
    # --- noise regularizers (issue 12) ---
    target_noise_std: float
    target_noise_key: np.uint64


class TrainBuffers(NamedTuple):
    """Workspaces of one training call on n rows. ``z``, ``a``, ``h``
    (dropped-out and/or noisy activations, only where a layer has dropout or
    hidden-input noise) and ``d`` (dL/dz) hold every layer's n × units
    block, laid out by the layer table's unit_offset (the tiled products
    read D in place, with BLAS's transpose flag: no transposed copy);
    ``xin`` (n × inputs) the noisy input when noise is on; ``rowloss``/
    ``rowcorrect`` per-row partials; ``partials`` the squared-norm partial
    sums (NORM_BLOCK elements each); ``tiles`` (layers × 3, int64) each
    layer's forward product tile (``train_tiles``); ``wn`` the weight-noise
    copy of the flat parameters (empty when weight noise is off), ``yn``
    (n × units) the noisy targets when target noise is on; ``colsum``
    (float64, the widest layer's units) the bias gradients' running sums."""

    xin: np.ndarray
    z: np.ndarray
    a: np.ndarray
    h: np.ndarray
    d: np.ndarray
    rowloss: np.ndarray
    rowcorrect: np.ndarray
    partials: np.ndarray
    tiles: np.ndarray
    # --- noise regularizers (issue 12) ---
    wn: np.ndarray
    yn: np.ndarray
    colsum: np.ndarray


class ForwardBuffers(NamedTuple):
    """Workspaces of one inference call: every layer's Z and A blocks, for
    the batch's rows rounded up to a multiple of the padding quantum;
    ``tail`` (the first layer's tile rows × inputs): the input's last row
    tile, zero-padded; ``tiles`` (layers × 3, int64): each layer's product
    tile, rows × output features, and the quantum (``cpu.tiling``)."""

    z: np.ndarray
    a: np.ndarray
    tail: np.ndarray
    tiles: np.ndarray


# --- activations -------------------------------------------------------------
@njit(inline="always", **_JIT)
def _sigmoid(z):
    """1/(1 + exp(-z)), without overflow."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(inline="always", **_JIT)
def _softplus(z):
    """log(1 + exp(z)), and z itself above torch's threshold."""
    return z if z > SOFTPLUS_THRESHOLD else math.log1p(math.exp(z))


@njit(**_JIT)
def _act(code, z, p):
    """f(z) of activation ``code`` with parameter ``p`` (float64 in and out;
    formulas: ``registry.activations``); NaN for a code it does not know."""
    if code == Act.RELU:
        return z if z > 0.0 else 0.0
    if code == Act.IDENTITY:
        return z
    if code == Act.LEAKY_RELU:
        return z if z > 0.0 else p * z
    if code == Act.ELU:
        return z if z > 0.0 else p * math.expm1(z)
    if code == Act.SOFTPLUS:
        return _softplus(z)
    if code == Act.SIGMOID:
        return _sigmoid(z)
    if code == Act.TANH:
        return math.tanh(z)
    if code == Act.HARDSWISH:
        if z <= -3.0:
            return 0.0
        if z >= 3.0:
            return z
        return z * (z + 3.0) / 6.0
    if code == Act.GELU:
        return 0.5 * z * (1.0 + math.tanh(_GELU_C * (z + 0.044715 * z * z * z)))
    if code == Act.STEP:
        return 1.0 if z > 0.0 else 0.0
    if code == Act.SILU:
        return z * _sigmoid(z)
    if code == Act.MISH:
        return z * math.tanh(_softplus(z))
    return math.nan


@njit(**_JIT)
def _act_grad(code, z, a, p):
    """f'(z), from the output ``a`` = f(z) where that is cheaper (as
    ``nnkernels.reference``'s derivatives); NaN for a code it does not know."""
    if code == Act.RELU:
        return 1.0 if z > 0.0 else 0.0
    if code == Act.IDENTITY:
        return 1.0
    if code == Act.LEAKY_RELU:
        return 1.0 if z > 0.0 else p
    if code == Act.ELU:
        return 1.0 if z > 0.0 else p * math.exp(z)
    if code == Act.SOFTPLUS:
        return 1.0 if z > SOFTPLUS_THRESHOLD else _sigmoid(z)
    if code == Act.SIGMOID:
        return a * (1.0 - a)
    if code == Act.TANH:
        return 1.0 - a * a
    if code == Act.HARDSWISH:
        if z <= -3.0:
            return 0.0
        if z < 3.0:
            return z / 3.0 + 0.5
        return 1.0
    if code == Act.GELU:
        t = math.tanh(_GELU_C * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * 0.044715 * z * z)
    if code == Act.STEP:
        return 0.0
    if code == Act.SILU:
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if code == Act.MISH:
        t = math.tanh(_softplus(z))
        return t + z * _sigmoid(z) * (1.0 - t * t)
    return math.nan


# --- layers --------------------------------------------------------------------
@njit(**_JIT)
def _weight(params, layer):
    """The view of one dense layer's W (fan_out × fan_in) in the flat buffer."""
    return params[layer.w_offset:layer.b_offset].reshape((layer.fan_out, layer.fan_in))


@njit(**_JIT)
def _bias(params, layer):
    """The view of one dense layer's b (fan_out) in the flat buffer."""
    return params[layer.b_offset:layer.b_offset + layer.fan_out]


@njit(**_JIT)
def _rows(buf, n, layer):
    """The layer's n × units block of a per-row workspace."""
    start = n * layer.unit_offset
    return buf[start:start + n * layer.fan_out].reshape((n, layer.fan_out))


@njit(**_JIT)
def _row_blocks(n, width):
    """How many row blocks to split n rows of ``width`` into (≥ ~16k elements each)."""
    per = max(1, 16384 // max(width, 1))
    return (n + per - 1) // per, per


@intrinsic
def _gemm(typingctx, ta, tb, m, n, k, a, lda, b, ldb, c, ldc):
    """Column-major C(m × n) = op(A)·op(B), with A, B and C the 1-D arrays
    starting at each operand's first element and lda/ldb/ldc their leading
    dimensions: BLAS's sgemm/dgemm (by c's dtype; alpha 1, beta 0; op =
    transpose when ta/tb is ord('t')), through Numba's C helper
    ``numba_xxgemm`` (numba/_lapack.c, what np.dot calls): resolved by
    symbol name, so the kernels stay cacheable, and alpha/beta live on the
    stack (no allocation)."""
    sig = types.void(ta, tb, m, n, k, a, lda, b, ldb, c, ldc)

    def codegen(context, builder, sig, args):
        ta_, tb_, m_, n_, k_, a_, lda_, b_, ldb_, c_, ldc_ = args
        char, voidp, intp = ir.IntType(8), ir.IntType(8).as_pointer(), cgutils.intp_t
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, voidp, voidp, intp,
                                                voidp, intp, voidp, voidp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        dtype = sig.args[9].dtype
        alpha = make_constant_slot(context, builder, dtype, 1.0)
        beta = make_constant_slot(context, builder, dtype, 0.0)

        def data(ty, val):
            return builder.bitcast(context.make_array(ty)(context, builder, val).data, voidp)

        def as_intp(ty, val):
            return context.cast(builder, val, ty, types.intp)

        ats = sig.args
        builder.call(fn, (ir.Constant(char, ord(get_blas_kind(dtype))),
                          builder.trunc(ta_, char), builder.trunc(tb_, char),
                          as_intp(ats[2], m_), as_intp(ats[3], n_), as_intp(ats[4], k_),
                          builder.bitcast(alpha, voidp), data(ats[5], a_), as_intp(ats[6], lda_),
                          data(ats[7], b_), as_intp(ats[8], ldb_), builder.bitcast(beta, voidp),
                          data(ats[9], c_), as_intp(ats[10], ldc_)))
        return context.get_dummy_value()

    return sig, codegen


@njit(**_JIT)
def _flat(M):
    """The 1-D view of a C-contiguous matrix."""
    return M.reshape(M.shape[0] * M.shape[1])


@njit(**_JIT)
def _split(m, k, rt, ct):
    """Training's tiles for an m × k output: rt × ct, the columns then the
    rows halved (not below SPLIT_MIN) until there are SPLIT_TASKS tiles,
    so a batch of 256 rows × 256 features still spreads over two threads.
    A function of the shapes only: the bits stay independent of threads."""
    while ((m + rt - 1) // rt) * ((k + ct - 1) // ct) < SPLIT_TASKS and ct > SPLIT_MIN and ct < 2 * k:
        ct = max(SPLIT_MIN, ct // 2)
    while ((m + rt - 1) // rt) * ((k + ct - 1) // ct) < SPLIT_TASKS and rt > SPLIT_MIN and rt < 2 * m:
        rt = max(SPLIT_MIN, rt // 2)
    return rt, ct


@njit(**_JIT)
def _xwt_tile(t, nc, Hf, Wf, Zf, rows, fin, fout, rt, ct, tail, padded):
    """Tile t of Z = H·Wᵀ (rows r0.. by rt, features c0.. by ct; see _xwt);
    the last row tile reads ``tail`` when ``padded``."""
    r0 = (t // nc) * rt
    c0 = (t % nc) * ct
    cw = min(ct, fout - c0)
    rh = min(rt, rows - r0)
    if padded and r0 + rt >= rows:
        _gemm(_T, _N, cw, rh, fin, Wf[c0 * fin:], fin, tail, fin, Zf[r0 * fout + c0:], fout)
    else:
        _gemm(_T, _N, cw, rh, fin, Wf[c0 * fin:], fin, Hf[r0 * fin:], fin, Zf[r0 * fout + c0:], fout)


@njit(**_PJIT)
def _xwt(H, W, Z, rows, rt, ct, tail):
    """Z = H·Wᵀ (H: n × fin, W: fout × fin, Z: rows × fout), one BLAS call
    per fixed tile of rt rows × ct output features, tiles in parallel; the
    last row tile has the rows left over. Training passes an empty ``tail``:
    its tiles are split by ``_split``; inference's tiles are used as given. ``rows`` > n pads: Z's rows from n
    on are the product of zero rows, the last row tile's input copied into
    ``tail`` (≥ rt × fin) and zero-filled, so every call has the row count
    the tiling of ``rows`` gives it, whatever n is."""
    n, fin = H.shape
    fout = W.shape[0]
    if rows == 0:
        return
    if tail.shape[0] == 0:
        rt, ct = _split(rows, fout, rt, ct)
    nr = (rows + rt - 1) // rt
    nc = (fout + ct - 1) // ct
    padded = rows > n
    if padded:
        r0 = (nr - 1) * rt
        for i in range(rows - r0):
            for j in range(fin):
                tail[i * fin + j] = H[r0 + i, j] if r0 + i < n else 0
    Hf = _flat(H)
    Wf = _flat(W)
    Zf = _flat(Z)
    for t in prange(nr * nc):
        _xwt_tile(t, nc, Hf, Wf, Zf, rows, fin, fout, rt, ct, tail, padded)


@njit(**_JIT)
def _xw_tile(t, nc, Df, Wf, Pf, n, fout, fin, rt, ct):
    """Tile t of P = D·W (see _xw)."""
    r0 = (t // nc) * rt
    c0 = (t % nc) * ct
    _gemm(_N, _N, min(ct, fin - c0), min(rt, n - r0), fout, Wf[c0:], fin, Df[r0 * fout:], fout, Pf[r0 * fin + c0:], fin)


@njit(**_PJIT)
def _xw(D, W, P, rt, ct):
    """P = D·W (D: n × fout, W: fout × fin, P: n × fin: the layer input's
    gradient), one BLAS call per fixed tile of rt rows × ct input features."""
    n, fout = D.shape
    fin = W.shape[1]
    if n == 0:
        return
    rt, ct = _split(n, fin, rt, ct)
    nc = (fin + ct - 1) // ct
    tiles = ((n + rt - 1) // rt) * nc
    Df = _flat(D)
    Wf = _flat(W)
    Pf = _flat(P)
    for t in prange(tiles):
        _xw_tile(t, nc, Df, Wf, Pf, n, fout, fin, rt, ct)


@njit(**_JIT)
def _dtx_tile(t, nc, Df, Hf, Gf, n, fout, fin, rt, ct):
    """Tile t of G = Dᵀ·H (see _dtx)."""
    r0 = (t // nc) * rt
    c0 = (t % nc) * ct
    _gemm(_N, _T, min(ct, fin - c0), min(rt, fout - r0), n, Hf[c0:], fin, Df[r0:], fout, Gf[r0 * fin + c0:], fin)


@njit(**_PJIT)
def _dtx(D, H, G, rt, ct):
    """G = Dᵀ·H (D: n × fout, H: n × fin, G: fout × fin: the weight
    gradient, a sum over the n rows), one BLAS call per fixed tile of rt
    output features × ct input features, each over all n rows."""
    n, fout = D.shape
    fin = H.shape[1]
    rt, ct = _split(fout, fin, rt, ct)
    nc = (fin + ct - 1) // ct
    tiles = ((fout + rt - 1) // rt) * nc
    Df = _flat(D)
    Hf = _flat(H)
    Gf = _flat(G)
    if n == 0:
        G[:] = 0
        return
    for t in prange(tiles):
        _dtx_tile(t, nc, Df, Hf, Gf, n, fout, fin, rt, ct)


@njit(**_JIT)
def _column_sums(D, acc, out, off, c0, c1):
    """out[off + j] = Σ_i D[i, j] for the columns j in [c0, c1): each
    column's sum over the rows in order, accumulated in float64 (in
    ``acc[c0:c1]``) and cast once; row by row over the block, so the loads
    are contiguous and the compiler vectorizes across the columns (each
    column's order of addition unchanged)."""
    w = c1 - c0
    a = acc[c0:c1]
    for j in range(w):
        a[j] = 0.0
    for i in range(D.shape[0]):
        row = D[i, c0:c1]
        for j in range(w):
            a[j] += row[j]
    o = out[off + c0:off + c1]
    for j in range(w):
        o[j] = a[j]


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _sum_of_squares(v):
    """Σ v[i]² in float64, the block's order being the compiler's
    vectorized reduction (``reassoc``, the one fast-math flag taken here: it
    lets the sum run in SIMD lanes, ~6x a sequential sum; no flag that
    assumes finite values, so NaN and Inf still come through). The order is
    a function of the block's length and of this machine's vector width:
    the same for every call on a machine, whatever the threads (as BLAS's
    kernels, it may differ on another CPU type)."""
    s = 0.0
    for i in range(v.shape[0]):
        x = np.float64(v[i])
        s += x * x
    return s


@njit(**_JIT)
def _bias_act_rows(Z, A, b, code, p, r0, r1):
    """Z[r] += b; A[r] = f(Z[r]) for rows r0..r1 (one thread's work)."""
    u = Z.shape[1]
    for i in range(r0, r1):
        if code == Act.RELU:  # the common case, kept branch-free per element
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
def _dropout_rows(A, Hd, p, key, r0, r1):
    """Hd[r] = inverted dropout of A[r] for rows r0..r1: element (r, c)
    kept, times 1/(1-p), when uniform01(key, r·units + c) >= p, else 0."""
    u = A.shape[1]
    scale = 1.0 / (1.0 - p)
    for i in range(r0, r1):
        for j in range(u):
            if uniform01(key, i * u + j) >= p:
                Hd[i, j] = A[i, j] * scale
            else:
                Hd[i, j] = 0


@njit(**_JIT)
def _noise_rows(Src, Dst, std, key, r0, r1):
    """Dst[r] = Src[r] + std·N for rows r0..r1 (Src may be Dst): element
    (r, c) adds the normal draw number r·width + c of stream ``key``, cast
    to the array's dtype first (as the reference adds it). Hidden-input
    noise (Keras GaussianNoise) and target noise."""
    u = Src.shape[1]
    for i in range(r0, r1):
        for j in range(u):
            k = i * u + j
            g = box_muller(uniform01(key, 2 * k), uniform01(key, 2 * k + 1))
            Dst[i, j] = Src[i, j] + Dst.dtype.type(std * g)


@njit(**_JIT)
def _noisy_weight_rows(W, Wn, b, bn, std, key, r0, r1):
    """Rows r0..r1 (output units) of one layer's weight-noise copy:
    Wn[o] = W[o] + std·N (draw o·fan_in + i, see ``_noise_rows``), bn[o] = b[o]."""
    _noise_rows(W, Wn, std, key, r0, r1)
    for o in range(r0, r1):
        bn[o] = b[o]


@njit(**_PJIT)
def perturb_weights_kernel(params, layers, out):
    """out = params with every layer's W replaced by W + wnoise_std·N
    (weight noise: the W̃ one training step runs with; biases copied). Its
    own call before ``train_kernel``: the work scales with the parameters,
    not the batch, so the backend gives it threads by parameter count."""
    for l in range(layers.shape[0]):
        layer = layers[l]
        W = _weight(params, layer)
        Wn = _weight(out, layer)
        b = _bias(params, layer)
        bn = _bias(out, layer)
        std = layer.wnoise_std
        key = layer.wnoise_key
        fo = layer.fan_out
        nb, per = _row_blocks(fo, layer.fan_in)
        for k in prange(nb):
            _noisy_weight_rows(W, Wn, b, bn, std, key, k * per, min(fo, (k + 1) * per))


@njit(**_JIT)
def _backprop_rows(Dp, Zp, Ap, code, p, drop_p, key, r0, r1):
    """Rows r0..r1 of the layer below's dL/dz from dL/d(its output) in Dp:
    times its dropout mask·1/(1-p), times f'(z); written to Dp in place."""
    u = Dp.shape[1]
    scale = 1.0 / (1.0 - drop_p)
    for i in range(r0, r1):
        for j in range(u):
            g = Dp[i, j]
            if drop_p > 0.0:
                if uniform01(key, i * u + j) >= drop_p:
                    g = g * scale
                else:
                    g = g * 0
            if code == Act.RELU:
                g = g if Zp[i, j] > 0 else g * 0
            else:
                g = g * _act_grad(code, np.float64(Zp[i, j]), np.float64(Ap[i, j]), p)
            Dp[i, j] = g


@njit(**_PJIT)
def _forward_layers(H, params, layers, zbuf, abuf, hbuf, tiles, rows, tail):
    """Every dense layer from input H (n rows): Z = H·Wᵀ + b and A = f(Z)
    into the layer's blocks of zbuf and abuf, for ``rows`` rows (n, or more
    to pad: see ``_xwt``); the product in the layer's fixed tiles
    (``tiles[l]`` = rows, output features per BLAS call), then bias and
    activation in one parallel pass. Training passes ``hbuf``: a layer with
    dropout then writes its dropped-out A to its block of hbuf, the next
    layer's input: element (r, c) is kept, times 1/(1-p), when
    uniform01(drop_key, r·units + c) >= p (inverted dropout, as
    torch.nn.Dropout); a layer with noise_std > 0 then adds its Gaussian
    noise to that block (``_noise_rows``; Keras GaussianNoise), so hbuf holds
    exactly the next layer's input. Inference passes an empty hbuf: no
    dropout, no noise."""
    n = rows
    for l in range(layers.shape[0]):
        layer = layers[l]
        W = _weight(params, layer)
        b = _bias(params, layer)
        Z = _rows(zbuf, n, layer)
        A = _rows(abuf, n, layer)
        code = layer.act
        p = layer.act_param
        _xwt(H, W, Z, n, tiles[l, 0], tiles[l, 1], tail)
        nb, per = _row_blocks(n, layer.fan_out)
        for k in prange(nb):
            _bias_act_rows(Z, A, b, code, p, k * per, min(n, (k + 1) * per))
        H = A
        pk = layer.drop_p
        if pk > 0.0 and hbuf.shape[0] > 0:
            Hd = _rows(hbuf, n, layer)
            key = layer.drop_key
            for k in prange(nb):
                _dropout_rows(A, Hd, pk, key, k * per, min(n, (k + 1) * per))
            H = Hd
        # --- noise regularizers (issue 12): hidden-input noise on the (dropped-out) activation ---
        ns = layer.noise_std
        if ns > 0.0 and hbuf.shape[0] > 0:
            Hn = _rows(hbuf, n, layer)
            nkey = layer.noise_key
            for k in prange(nb):
                _noise_rows(H, Hn, ns, nkey, k * per, min(n, (k + 1) * per))
            H = Hn


@njit(**_JIT)
def _output_rows(Zo, out, out_kind, r0, r1):
    """out[r] = the output activation ``out_kind`` of logits Zo[r], rows
    r0..r1 (softmax max-shifted, in float64)."""
    u = Zo.shape[1]
    for i in range(r0, r1):
        if out_kind == Out.IDENTITY:
            for j in range(u):
                out[i, j] = Zo[i, j]
        elif out_kind == Out.SIGMOID:
            for j in range(u):
                out[i, j] = _sigmoid(np.float64(Zo[i, j]))
        elif out_kind == Out.SOFTMAX:
            m = -np.inf
            for j in range(u):
                m = max(m, np.float64(Zo[i, j]))
            s = 0.0
            for j in range(u):
                s += math.exp(np.float64(Zo[i, j]) - m)
            for j in range(u):
                out[i, j] = math.exp(np.float64(Zo[i, j]) - m) / s
        else:
            for j in range(u):
                out[i, j] = np.nan


@njit(**_PJIT)
def forward_kernel(X, params, layers, out_kind, bufs, out):
    """Inference (no dropout, no noise): writes the output activation
    ``out_kind`` (OutputCode; IDENTITY gives the logits) of the network's
    logits into ``out`` (n × units). The products run on the batch padded
    to a multiple of the quantum ``bufs.tiles[0, 2]``, in the tiles of
    ``bufs.tiles`` (chosen by ``cpu.tiling.predict_tiles`` so that a row's
    bits do not depend on the batch it came in)."""
    n = X.shape[0]
    q = bufs.tiles[0, 2]  # the padding quantum
    rows = (n + q - 1) // q * q
    _forward_layers(X, params, layers, bufs.z, bufs.a, bufs.a[:0], bufs.tiles, rows, bufs.tail)
    Zo = _rows(bufs.z, rows, layers[layers.shape[0] - 1])
    nb, per = _row_blocks(n, Zo.shape[1] * 8)
    for k in prange(nb):
        _output_rows(Zo, out, out_kind, k * per, min(n, (k + 1) * per))


# --- losses ----------------------------------------------------------------------
@njit(inline="always", **_JIT)
def _argmax_logsumexp(Zo, i):
    """(argmax, log Σ exp) of row i, max-shifted, in float64."""
    m = -np.inf
    am = 0
    for j in range(Zo.shape[1]):
        v = np.float64(Zo[i, j])
        if v > m:
            m = v
            am = j
    s = 0.0
    for j in range(Zo.shape[1]):
        s += math.exp(np.float64(Zo[i, j]) - m)
    return am, m + math.log(s)


@njit(**_JIT)
def _loss_row_labels(Zo, y, D, i, inv_n, smoothing):
    """Softmax cross-entropy of row i with an integer label; writes
    D[i] = (p - t)/n; returns (loss_i, correct_i)."""
    u = Zo.shape[1]
    am, lse = _argmax_logsumexp(Zo, i)
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
    """One row of the loss of output kind ``out_kind`` against float targets
    (mse, bce_with_logits, or softmax cross-entropy with probability
    targets). Writes D[i]; returns (row loss sum,
    correct count); NaN loss for a kind it does not know."""
    u = Zo.shape[1]
    loss = 0.0
    correct = 0
    if out_kind == Out.IDENTITY:  # mse: D = 2(z - y)/(n·u)
        for j in range(u):
            d = np.float64(Zo[i, j]) - np.float64(Y[i, j])
            loss += d * d
            D[i, j] = 2.0 * (Zo[i, j] - Y[i, j]) * inv_n
    elif out_kind == Out.SIGMOID:  # bce with logits: D = (σ(z) - y)/(n·u)
        for j in range(u):
            z = np.float64(Zo[i, j])
            yy = np.float64(Y[i, j])
            loss += max(z, 0.0) - z * yy + math.log1p(math.exp(-abs(z)))
            D[i, j] = (_sigmoid(z) - yy) * inv_n
            if (z > 0.0) == (yy > 0.5):
                correct += 1
    elif out_kind == Out.SOFTMAX:  # probability targets
        am, lse = _argmax_logsumexp(Zo, i)
        ym = -np.inf
        ay = 0
        for j in range(u):
            if np.float64(Y[i, j]) > ym:
                ym = np.float64(Y[i, j])
                ay = j
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
    else:
        loss = math.nan
    return loss, correct


# --- training ----------------------------------------------------------------------
@njit(**_PJIT)
def train_kernel(X, targets, params, grads, layers, settings, bufs):
    """Training forward + backward of one batch: fills ``grads`` with
    d(mean loss)/d(params) and returns (mean loss, correct, squared grad
    norm). Input noise (``settings.noise_std`` > 0) goes into ``bufs.xin``;
    dropout draws come from each layer's drop_key; with weight noise
    (``bufs.wn`` non-empty, filled by ``perturb_weights_kernel``) the pass
    runs with W̃, with target noise (settings) against ỹ; see the module
    docstring for the structures and the noise formulas."""
    labels = targets.labels
    Y = targets.values
    xin = bufs.xin
    zbuf = bufs.z
    abuf = bufs.a
    hbuf = bufs.h
    dbuf = bufs.d
    rowloss = bufs.rowloss
    rowcorrect = bufs.rowcorrect
    partials = bufs.partials
    colsum = bufs.colsum
    out_kind = settings.out_kind
    smoothing = settings.label_smoothing
    inv = settings.inv_count
    noise_std = settings.noise_std
    noise_key = settings.noise_key
    n = X.shape[0]
    L = layers.shape[0]
    H = X
    if noise_std > 0.0:
        fin = X.shape[1]
        for i in prange(n):
            for j in range(fin):
                k = i * fin + j
                g = box_muller(uniform01(noise_key, 2 * k), uniform01(noise_key, 2 * k + 1))
                xin[i, j] = X[i, j] + noise_std * g
        H = xin
    # --- noise regularizers (issue 12): weight noise (P: the W̃ copy) and target noise ---
    P = params
    if bufs.wn.shape[0] > 0:
        P = bufs.wn
    if settings.target_noise_std > 0.0:
        tstd = settings.target_noise_std
        tkey = settings.target_noise_key
        nbt, pert = _row_blocks(n, Y.shape[1])
        for k in prange(nbt):
            _noise_rows(Y, bufs.yn, tstd, tkey, k * pert, min(n, (k + 1) * pert))
        Y = bufs.yn
    _forward_layers(H, P, layers, zbuf, abuf, hbuf, bufs.tiles, n, zbuf[:0])
    # loss and output delta
    out_layer = layers[L - 1]
    Zo = _rows(zbuf, n, out_layer)
    Do = _rows(dbuf, n, out_layer)
    for r in prange(n):
        i = np.int64(r)  # one signature for the row functions (the parfor index is unsigned)
        if labels.shape[0] > 0:
            rl, rc = _loss_row_labels(Zo, labels, Do, i, inv, smoothing)
        else:
            rl, rc = _loss_row_targets(Zo, Y, Do, i, inv, smoothing, out_kind)
        rowloss[i] = rl
        rowcorrect[i] = rc
    loss = 0.0
    correct = 0
    for i in range(n):
        loss += rowloss[i]
        correct += rowcorrect[i]
    loss *= inv  # the mean over what the output kind counts (rows or elements)
    # backward, last layer first
    for l in range(L - 1, -1, -1):
        layer = layers[l]
        fout = layer.fan_out
        D = _rows(dbuf, n, layer)
        if l == 0:
            Hin = xin if noise_std > 0.0 else X
        elif layers[l - 1].drop_p > 0.0 or layers[l - 1].noise_std > 0.0:
            Hin = _rows(hbuf, n, layers[l - 1])
        else:
            Hin = _rows(abuf, n, layers[l - 1])
        _dtx(D, Hin, _weight(grads, layer), ROW_TILE, COL_TILE)  # gW = Dᵀ·Hin, fixed tiles of gW
        boff = layer.b_offset  # read here: a record used inside a prange breaks Numba's parfor lowering
        ncb = (fout + COLSUM_COLS - 1) // COLSUM_COLS
        for k in prange(ncb):  # bias grad: column sums of D, COLSUM_COLS columns a task
            _column_sums(D, colsum, grads, boff, k * COLSUM_COLS, min(fout, (k + 1) * COLSUM_COLS))
        if l > 0:
            below = layers[l - 1]
            W = _weight(P, layer)  # W̃ under weight noise
            Dp = _rows(dbuf, n, below)
            _xw(D, W, Dp, ROW_TILE, COL_TILE)
            Zp = _rows(zbuf, n, below)
            Ap = _rows(abuf, n, below)
            code = below.act
            p = below.act_param
            pk = below.drop_p
            key = below.drop_key
            nb, per = _row_blocks(n, below.fan_out)
            for k in prange(nb):
                _backprop_rows(Dp, Zp, Ap, code, p, pk, key, k * per, min(n, (k + 1) * per))
    # squared norm, fixed blocks (each a vectorized float64 sum) then a serial sum of the blocks
    m = grads.shape[0]
    nblk = partials.shape[0]
    for k in prange(nblk):
        partials[k] = _sum_of_squares(grads[k * NORM_BLOCK:min(m, (k + 1) * NORM_BLOCK)])
    sq = 0.0
    for k in range(nblk):
        sq += partials[k]
    return loss, correct, sq
