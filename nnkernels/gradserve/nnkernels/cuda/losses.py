"""The per-row and per-element CUDA kernels around the products: input
noise, the output activation (inference), and the output activation fused
with its loss (training: per-row float64 loss and correct count, and
dL/dlogits). One thread per row or element, grid-stride. Output kinds are
``nnkernels.registry`` codes; a kind with no formula here yields NaN."""
from __future__ import annotations

import math

from numba import types

from ..registry import OutputCode
from . import numba_cuda as cuda


def kernels(target, dev) -> dict:
    """``{name: (pyfunc, argument types)}`` for ``target``."""
    T = target.T
    f64 = types.float64
    i64 = types.int64
    NAN = math.nan
    sigmoid, uniform01, box_muller = dev.sigmoid, dev.uniform01, dev.box_muller

    @cuda.jit(device=True)
    def softmax_stats(Z, r, m):
        """(max, argmax, logsumexp) of row r of Z, in float64."""
        mx = f64(Z[r, 0])
        amax = 0
        for c in range(1, m):
            z = f64(Z[r, c])
            if z > mx:
                mx = z
                amax = c
        s = 0.0
        for c in range(m):
            s += math.exp(f64(Z[r, c]) - mx)
        return mx, amax, mx + math.log(s)

    def add_noise(X, Xn, n, k, std, key):
        """Xn = X + T(std·N(0, 1)), normal draw number row*k + col of stream
        key; X may be Xn (in place). Input noise (X: n×inputs), hidden-input
        noise (a hidden layer's dropped-out activation, in place; Keras
        GaussianNoise), target noise (the targets) and weight noise (X: one
        layer's W, fan_out×fan_in, so the draw is o·fan_in + i). The draw
        runs in float64 (as the reference), in its own kernel so the
        products stay float32 for float32 models."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for i in range(start, n * k, stride):
            r = i // k
            c = i - r * k
            g = box_muller(uniform01(key, 2 * i), uniform01(key, 2 * i + 1))
            Xn[r, c] = X[r, c] + T(std * g)

    def output_activation(Z, Out, n, m, kind):
        """Out = the output activation ``kind`` of the logits Z, one thread
        per row: identity (copy), sigmoid, or softmax (max-shifted)."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for r in range(start, n, stride):
            if kind == OutputCode.IDENTITY:
                for c in range(m):
                    Out[r, c] = Z[r, c]
            elif kind == OutputCode.SIGMOID:
                for c in range(m):
                    Out[r, c] = sigmoid(Z[r, c])
            elif kind == OutputCode.SOFTMAX:
                mx = Z[r, 0]
                for c in range(1, m):
                    if Z[r, c] > mx:
                        mx = Z[r, c]
                s = 0.0
                for c in range(m):
                    s += math.exp(f64(Z[r, c] - mx))
                for c in range(m):
                    Out[r, c] = T(math.exp(f64(Z[r, c] - mx)) / s)
            else:
                for c in range(m):
                    Out[r, c] = T(NAN)

    def loss_dense(Z, Y, dZ, rowloss, rowcorrect, n, m, kind, smoothing, gscale):
        """The loss of output kind ``kind`` against float targets Y, one
        thread per row. identity: MSE (Σ (z-y)², grad 2(z-y)·gscale);
        sigmoid: BCE with logits (max(z,0) - z·y + log1p(exp(-|z|)), grad
        (σ(z) - y)·gscale; correct counts the elements where (z > 0) equals
        (y > 0.5)); softmax: cross entropy against probability targets with
        label smoothing q' = (1-ε)·y + ε/m (-Σ q'·log_softmax(z), grad
        (Σq'·p - q')·gscale; correct when argmax z == argmax y). gscale is
        1/(what the kind averages over: n·m or n)."""
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for r in range(start, n, stride):
            total = 0.0
            correct = 0.0
            if kind == OutputCode.IDENTITY:
                for c in range(m):
                    d = Z[r, c] - Y[r, c]
                    total += f64(d) * f64(d)
                    dZ[r, c] = T(2.0 * f64(d) * gscale)
            elif kind == OutputCode.SIGMOID:
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
            elif kind == OutputCode.SOFTMAX:
                _, amax, lse = softmax_stats(Z, r, m)
                ymax = f64(Y[r, 0])
                ya = 0
                qs = f64(Y[r, 0])
                for c in range(1, m):
                    y = f64(Y[r, c])
                    qs += y
                    if y > ymax:
                        ymax = y
                        ya = c
                off = smoothing / m
                qsum = (1.0 - smoothing) * qs + smoothing
                for c in range(m):
                    z = f64(Z[r, c])
                    q = (1.0 - smoothing) * f64(Y[r, c]) + off
                    total -= q * (z - lse)
                    p = math.exp(z - lse)
                    dZ[r, c] = T((qsum * p - q) * gscale)
                correct = 1.0 if amax == ya else 0.0
            else:
                total = NAN
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
            _, amax, lse = softmax_stats(Z, r, m)
            zsum = 0.0
            for c in range(m):
                zsum += f64(Z[r, c])
            off = smoothing / m
            total = (1.0 - smoothing) * (lse - f64(Z[r, lab])) + off * (m * lse - zsum)
            for c in range(m):
                p = math.exp(f64(Z[r, c]) - lse)
                q = off + ((1.0 - smoothing) if c == lab else 0.0)
                dZ[r, c] = T((p - q) * gscale)
            rowloss[r] = total
            rowcorrect[r] = 1.0 if amax == lab else 0.0

    M, F1, I1 = target.matrix, f64[::1], i64[::1]
    return {
        "add_noise": (add_noise, (M, M, i64, i64, f64, types.uint64)),
        "output_activation": (output_activation, (M, M, i64, i64, i64)),
        "loss_dense": (loss_dense, (M, M, M, F1, F1, i64, i64, i64, f64, f64)),
        "loss_labels": (loss_labels, (M, I1, M, F1, F1, i64, i64, f64, f64)),
    }
