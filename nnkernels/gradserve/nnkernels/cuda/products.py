"""The three matrix-product kernels of a dense layer, each with its fused
epilogue: the forward product (bias, activation, dropout), the input
gradient (dropout mask, activation derivative) and the weight gradient
(bias gradient). All take (n, fan_in, fan_out) in that order and loop
grid-stride over their output tiles, so results do not depend on how many
blocks are launched. The staged-tile loop is ``device.product_tile``."""
from __future__ import annotations

from numba import types

from . import numba_cuda as cuda
from .device import ALONG_ROWS, DOWN_COLUMNS


def kernels(target, dev) -> dict:
    """``{name: (pyfunc, argument types)}`` for ``target``."""
    T = target.T
    tile, reg = target.tile, target.reg
    f64 = types.float64
    i64 = types.int64
    tiles, product_tile, each_output = dev.tiles, dev.product_tile, dev.each_output
    act_fwd, act_deriv, dropout_factor = dev.act_fwd, dev.act_deriv, dev.dropout_factor
    inline = cuda.jit(device=True, inline="always")

    # epilogues: what each kernel does with one output (r, c) of the product
    @inline
    def activate(v, r, c, args):
        """Z = v + b (kept when store_z), Out = dropout(act(Z))."""
        b, Z, Out, fan_out, layer, store_z = args
        z = v + b[c]
        if store_z != 0:
            Z[r, c] = z
        a = act_fwd(layer.act, z, layer.act_param)
        if layer.drop_p > 0.0:
            a = a * dropout_factor(layer.drop_key, r * fan_out + c, layer.drop_p, layer.drop_scale)
        Out[r, c] = a

    @inline
    def through_activation(v, r, c, args):
        """dZp = dropout mask·scale ⊙ v ⊙ act'(Zp), for the layer below."""
        Zp, dZp, fan_in, below = args
        if below.drop_p > 0.0:
            v = v * dropout_factor(below.drop_key, r * fan_in + c, below.drop_p, below.drop_scale)
        dZp[r, c] = v * act_deriv(below.act, Zp[r, c], below.act_param)

    @inline
    def store(v, r, c, out):
        out[r, c] = v

    def linear_forward(A, W, b, Z, Out, n, fan_in, fan_out, layer, store_z):
        """Z = A·Wᵀ + b (A: n×fan_in, W: fan_out×fan_in, Z: n×fan_out);
        Out = the layer's activation of Z, then its dropout (``layer``: a
        LayerEpilogue). Z is written only when store_z (training keeps it
        for the backward pass)."""
        acc = cuda.local.array((reg, reg), T)
        for t in range(cuda.blockIdx.x, tiles(n, fan_out), cuda.gridDim.x):
            row0, col0 = product_tile(t, acc, A, ALONG_ROWS, W, ALONG_ROWS, n, fan_out, fan_in, None)
            each_output(acc, row0, col0, n, fan_out, activate, (b, Z, Out, fan_out, layer, store_z))

    def linear_backward_input(dZ, W, Zp, dZp, n, fan_in, fan_out, below):
        """dZp = ((dZ·W) ⊙ dropout mask·scale) ⊙ act'(Zp): the gradient of
        the pre-activation of the layer below (dZ: n×fan_out, W:
        fan_out×fan_in, Zp, dZp: n×fan_in; ``below``: that layer's
        LayerEpilogue)."""
        acc = cuda.local.array((reg, reg), T)
        for t in range(cuda.blockIdx.x, tiles(n, fan_in), cuda.gridDim.x):
            row0, col0 = product_tile(t, acc, dZ, ALONG_ROWS, W, DOWN_COLUMNS, n, fan_in, fan_out, None)
            each_output(acc, row0, col0, n, fan_in, through_activation, (Zp, dZp, fan_in, below))

    def linear_backward_weight(dZ, A, dW, db, n, fan_in, fan_out):
        """dW = dZᵀ·A (dZ: n×fan_out, A: n×fan_in, dW: fan_out×fan_in),
        reducing over the batch (both operands run down their columns);
        fused: db = Σ_rows dZ (the bias gradient, accumulated in float64 as
        the reference does) by the threads of tile column 0, from the dZ
        slices already in shared memory."""
        acc = cuda.local.array((reg, reg), T)
        bias = cuda.local.array(reg, f64)
        for t in range(cuda.blockIdx.x, tiles(fan_out, fan_in), cuda.gridDim.x):
            row0, col0 = product_tile(t, acc, dZ, DOWN_COLUMNS, A, DOWN_COLUMNS, fan_out, fan_in, n, bias)
            each_output(acc, row0, col0, fan_out, fan_in, store, dW)
            if col0 == 0 and cuda.threadIdx.x == 0:
                for i in range(reg):
                    r = row0 + cuda.threadIdx.y + i * tile
                    if r < fan_out:
                        db[r] = T(bias[i])

    M, V, epi = target.matrix, target.vector, target.epilogue
    return {
        "linear_forward": (linear_forward, (M, M, V, M, M, i64, i64, i64, epi, i64)),
        "linear_backward_input": (linear_backward_input, (M, M, M, M, i64, i64, i64, epi)),
        "linear_backward_weight": (linear_backward_weight, (M, M, M, V, i64, i64, i64)),
    }
