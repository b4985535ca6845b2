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
- Matrix products go to BLAS through ``np.dot`` outside any prange, in fixed
  BLOCK-row slices (``_blocked_dot``); every other pass (bias + activation,
  derivative, dropout, loss) is one fused prange loop.
- Every prange iteration writes its own outputs; reductions go through
  fixed-size partial buffers summed serially, so results do not depend on how
  the threading layer schedules the iterations (bit-identical runs).
- Losses and norms accumulate in float64. No fastmath: NaN/Inf must survive
  to the finiteness check in ``Model.train_step``.
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
parameter dtype, as the reference does):
- input noise: X̃[r, c] = X[r, c] + std·N_{r·inputs+c} (NOISE_STREAM);
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
from numba import njit, prange

from .. import rng as _rng
from ..registry import ActivationCode as Act
from ..registry import OutputCode as Out

NORM_BLOCK = 16384  # elements per partial sum of the squared gradient norm
BLOCK = 128  # rows per BLAS call: fixed, so results do not depend on thread count;
# 64-row blocks measured ~1.5-2x slower (OpenBLAS repacks W per call)
SOFTPLUS_THRESHOLD = 20.0  # torch's softplus: z itself above it

_JIT = dict(nogil=True, cache=True)
_PJIT = dict(parallel=True, nogil=True, cache=True)

uniform01 = njit(inline="always", **_JIT)(_rng.uniform01)
box_muller = njit(inline="always", **_JIT)(_rng.box_muller)

_GELU_C = math.sqrt(2.0 / math.pi)


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
    hidden-input noise), ``d`` (dL/dz) and ``dt`` (d transposed) hold every
    layer's n × units block, laid out by the layer table's unit_offset;
    ``xin`` (n × inputs) the noisy input when noise is on; ``rowloss``/
    ``rowcorrect`` per-row partials; ``partials`` the squared-norm partial
    sums (NORM_BLOCK elements each); ``wn`` the weight-noise copy of the
    flat parameters (empty when weight noise is off), ``yn`` (n × units) the
    noisy targets when target noise is on."""

    xin: np.ndarray
    z: np.ndarray
    a: np.ndarray
    h: np.ndarray
    d: np.ndarray
    dt: np.ndarray
    rowloss: np.ndarray
    rowcorrect: np.ndarray
    partials: np.ndarray
    # --- noise regularizers (issue 12) ---
    wn: np.ndarray
    yn: np.ndarray


class ForwardBuffers(NamedTuple):
    """Workspaces of one inference call: every layer's Z and A blocks."""

    z: np.ndarray
    a: np.ndarray


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
def _rows_t(buf, n, layer):
    """The layer's units × n (transposed) block of a per-row workspace."""
    start = n * layer.unit_offset
    return buf[start:start + n * layer.fan_out].reshape((layer.fan_out, n))


@njit(**_JIT)
def _row_blocks(n, width):
    """How many row blocks to split n rows of ``width`` into (≥ ~16k elements each)."""
    per = max(1, 16384 // max(width, 1))
    return (n + per - 1) // per, per


@njit(**_JIT)
def _dot(A, B, out):
    """out = A @ B (BLAS; B may be a transposed view). Kept out of the
    parallel functions: their array analysis mis-asserts shapes of
    loop-carried arrays around np.dot."""
    np.dot(A, B, out)


@njit(**_PJIT)
def _blocked_dot(A, B, out):
    """out = A @ B in fixed BLOCK-row slices of A and out, one
    single-threaded BLAS call per slice, in parallel: the slices, hence the
    bits, do not depend on the thread count."""
    n = A.shape[0]
    for k in prange((n + BLOCK - 1) // BLOCK):
        r0 = k * BLOCK
        r1 = min(n, r0 + BLOCK)
        _dot(A[r0:r1], B, out[r0:r1])


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
def _backprop_rows(Dp, Dpt, Zp, Ap, code, p, drop_p, key, r0, r1):
    """Rows r0..r1 of the layer below's dL/dz from dL/d(its output) in Dp:
    times its dropout mask·1/(1-p), times f'(z); written to Dp and, as
    columns, to Dpt (its transpose, what the weight gradient reads)."""
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
            Dpt[j, i] = g


@njit(**_PJIT)
def _forward_layers(H, params, layers, zbuf, abuf, hbuf):
    """Every dense layer from input H (n rows): Z = H·Wᵀ + b and A = f(Z)
    into the layer's blocks of zbuf and abuf; bias and activation run in one
    parallel pass after the blocked product. Training passes ``hbuf``: a
    layer with dropout then writes its dropped-out A to its block of hbuf,
    the next layer's input: element (r, c) is kept, times 1/(1-p), when
    uniform01(drop_key, r·units + c) >= p (inverted dropout, as
    torch.nn.Dropout); a layer with noise_std > 0 then adds its Gaussian
    noise to that block (``_noise_rows``; Keras GaussianNoise), so hbuf holds
    exactly the next layer's input. Inference passes an empty hbuf: no
    dropout, no noise."""
    n = H.shape[0]
    for l in range(layers.shape[0]):
        layer = layers[l]
        W = _weight(params, layer)
        b = _bias(params, layer)
        Z = _rows(zbuf, n, layer)
        A = _rows(abuf, n, layer)
        code = layer.act
        p = layer.act_param
        _blocked_dot(H, W.T, Z)
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


@njit(**_PJIT)
def forward_kernel(X, params, layers, out_kind, bufs, out):
    """Inference (no dropout, no noise): writes the output activation
    ``out_kind`` (OutputCode; IDENTITY gives the logits) of the network's
    logits into ``out`` (n × units)."""
    zbuf = bufs.z
    abuf = bufs.a
    n = X.shape[0]
    _forward_layers(X, params, layers, zbuf, abuf, abuf[:0])
    Zo = _rows(zbuf, n, layers[layers.shape[0] - 1])
    u = Zo.shape[1]
    for i in prange(n):
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
def _loss_row_labels(Zo, y, D, Dt, i, inv_n, smoothing):
    """Softmax cross-entropy of row i with an integer label; writes
    D[i] = (p - t)/n and its column of Dt = Dᵀ; returns (loss_i, correct_i)."""
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
        D[i, j] = Dt[j, i] = (math.exp(np.float64(Zo[i, j]) - lse) - t) * inv_n
    return loss, 1 if am == lab else 0


@njit(**_JIT)
def _loss_row_targets(Zo, Y, D, Dt, i, inv_n, smoothing, out_kind):
    """One row of the loss of output kind ``out_kind`` against float targets
    (mse, bce_with_logits, or softmax cross-entropy with probability
    targets). Writes D[i] and its column of Dt = Dᵀ; returns (row loss sum,
    correct count); NaN loss for a kind it does not know."""
    u = Zo.shape[1]
    loss = 0.0
    correct = 0
    if out_kind == Out.IDENTITY:  # mse: D = 2(z - y)/(n·u)
        for j in range(u):
            d = np.float64(Zo[i, j]) - np.float64(Y[i, j])
            loss += d * d
            D[i, j] = Dt[j, i] = 2.0 * (Zo[i, j] - Y[i, j]) * inv_n
    elif out_kind == Out.SIGMOID:  # bce with logits: D = (σ(z) - y)/(n·u)
        for j in range(u):
            z = np.float64(Zo[i, j])
            yy = np.float64(Y[i, j])
            loss += max(z, 0.0) - z * yy + math.log1p(math.exp(-abs(z)))
            D[i, j] = Dt[j, i] = (_sigmoid(z) - yy) * inv_n
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
            D[i, j] = Dt[j, i] = (math.exp(np.float64(Zo[i, j]) - lse) * tsum - t) * inv_n
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
    tbuf = bufs.dt
    rowloss = bufs.rowloss
    rowcorrect = bufs.rowcorrect
    partials = bufs.partials
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
    _forward_layers(H, P, layers, zbuf, abuf, hbuf)
    # loss and output delta
    out_layer = layers[L - 1]
    Zo = _rows(zbuf, n, out_layer)
    Do = _rows(dbuf, n, out_layer)
    Dot = _rows_t(tbuf, n, out_layer)
    for r in prange(n):
        i = np.int64(r)  # one signature for the row functions (the parfor index is unsigned)
        if labels.shape[0] > 0:
            rl, rc = _loss_row_labels(Zo, labels, Do, Dot, i, inv, smoothing)
        else:
            rl, rc = _loss_row_targets(Zo, Y, Do, Dot, i, inv, smoothing, out_kind)
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
        Dt = _rows_t(tbuf, n, layer)
        if l == 0:
            Hin = xin if noise_std > 0.0 else X
        elif layers[l - 1].drop_p > 0.0 or layers[l - 1].noise_std > 0.0:
            Hin = _rows(hbuf, n, layers[l - 1])
        else:
            Hin = _rows(abuf, n, layers[l - 1])
        _blocked_dot(Dt, Hin, _weight(grads, layer))  # gW = D.T @ Hin, by blocks of output rows
        boff = layer.b_offset
        for j in prange(fout):  # bias grad: row sums of D.T, float64 accumulation
            s = 0.0
            for i in range(n):
                s += Dt[j, i]
            grads[boff + j] = s
        if l > 0:
            below = layers[l - 1]
            W = _weight(P, layer)  # W̃ under weight noise
            Dp = _rows(dbuf, n, below)
            Dpt = _rows_t(tbuf, n, below)
            _blocked_dot(D, W, Dp)
            Zp = _rows(zbuf, n, below)
            Ap = _rows(abuf, n, below)
            code = below.act
            p = below.act_param
            pk = below.drop_p
            key = below.drop_key
            nb, per = _row_blocks(n, below.fan_out)
            for k in prange(nb):
                _backprop_rows(Dp, Dpt, Zp, Ap, code, p, pk, key, k * per, min(n, (k + 1) * per))
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
