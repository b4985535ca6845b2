"""The three matrix-product kernels (and the bias gradient fused into the
weight gradient) alone, against NumPy, on shapes that are
not multiples of the block tile (and larger than one tile, so the
grid-stride loop over tiles runs), in both dtypes."""
import numpy as np
import pytest

from gradserve.nnkernels.cuda import numba_cuda as cuda
from gradserve.nnkernels.cuda.kernels import kernels_for
from gradserve.nnkernels.cuda.target import LayerEpilogue
from gradserve.nnkernels.registry import ActivationCode

SHAPES = [(1, 3, 1), (9, 10, 11), (17, 5, 3)]  # (rows n, inputs k, outputs m)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_products_match_numpy(n, k, m, dtype):
    ks = kernels_for(dtype)
    r = np.random.default_rng(n * 100 + k * 10 + m)
    A = r.normal(size=(n, k)).astype(dtype)
    W = r.normal(size=(m, k)).astype(dtype)
    b = r.normal(size=m).astype(dtype)
    dZ = r.normal(size=(n, m)).astype(dtype)
    Zp = r.normal(size=(n, k)).astype(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
    dA, dW, db, ddZ, dZp = (cuda.to_device(x) for x in (A, W, b, dZ, Zp))
    Z = cuda.device_array((n, m), dtype)
    Out = cuda.device_array((n, m), dtype)
    blk = (ks.tile, ks.tile)
    T = np.dtype(dtype).type
    relu = LayerEpilogue(int(ActivationCode.RELU), T(0), np.uint64(0), 0.0, T(1))
    identity = relu._replace(act=int(ActivationCode.IDENTITY))
    # forward with relu, keeping Z
    ks.linear_forward[ks.grid_tiles(n, m), blk](dA, dW, db, Z, Out, n, k, m, relu, 1)
    ref = A.astype(np.float64) @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(Z.copy_to_host(), ref, **tol)
    np.testing.assert_allclose(Out.copy_to_host(), np.maximum(ref, 0), **tol)
    # input gradient through identity (act'(z) = 1)
    dAp = cuda.device_array((n, k), dtype)
    ks.linear_backward_input[ks.grid_tiles(n, k), blk](ddZ, dW, dZp, dAp, n, k, m, identity)
    np.testing.assert_allclose(dAp.copy_to_host(), dZ.astype(np.float64) @ W.astype(np.float64), **tol)
    # weight gradient
    dWg = cuda.device_array((m, k), dtype)
    dbg = cuda.device_array(m, dtype)
    ks.linear_backward_weight[ks.grid_tiles(m, k), blk](ddZ, dA, dWg, dbg, n, k, m)
    np.testing.assert_allclose(dWg.copy_to_host(), dZ.T.astype(np.float64) @ A.astype(np.float64), **tol)
    np.testing.assert_allclose(dbg.copy_to_host(), dZ.astype(np.float64).sum(axis=0), **tol)


def test_warm_up_builds_both_dtypes():
    from gradserve.nnkernels.cuda import warm_up
    from gradserve.nnkernels.cuda.kernels import _KERNELS
    warm_up()
    assert {"float32", "float64"} <= set(_KERNELS)
    assert all(ks._compiled for ks in _KERNELS.values())
