"""The CPU kernels' tiled matrix products (cpu.kernels._xwt/_xw/_dtx, tiles
from cpu.tiling): right against NumPy, bit-identical at every thread count,
on the serial and the parallel path and under concurrent callers; and a
predicted row's bits do not depend on which rows share its batch."""

import numba
import numpy as np
import pytest
from concurrency import all_returned, concurrently

from gradserve import nnkernels
from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec, runtime
from gradserve.nnkernels.cpu import tiling
from gradserve.nnkernels.cpu.kernels import COL_TILE, ROW_TILE, _dtx, _xw, _xwt
from gradserve.nnkernels.cpu.tiling import PREDICT_COLS, PREDICT_ROWS
from gradserve.nnkernels.cpu.twins import serial_twin

THREADS = sorted({1, 2, numba.config.NUMBA_NUM_THREADS} & set(range(1, numba.config.NUMBA_NUM_THREADS + 1)))


def spec(sizes, dtype="float32", kind="softmax", act="relu"):
    return ModelSpec(input_size=sizes[0], hidden=tuple(LayerSpec(u, act) for u in sizes[1:-1]),
                     output=OutputSpec(sizes[-1], kind), optimizer=OptimizerSpec("adam"), dtype=dtype, seed=3)


def at_threads(k, fn):
    """fn() with the calling thread's Numba thread count at k."""
    before = numba.get_num_threads()
    numba.set_num_threads(k)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def products(dtype, n, fin, fout, rt, ct, rows=None, serial=False):
    """The three products on random data: (Z = H·Wᵀ, P = D·W, G = Dᵀ·H);
    ``serial``: through their serial twins (what a one-thread call runs)."""
    xwt, xw, dtx = (serial_twin(f) for f in (_xwt, _xw, _dtx)) if serial else (_xwt, _xw, _dtx)
    rs = np.random.default_rng(n * 7 + fin)
    H = rs.standard_normal((n, fin)).astype(dtype)
    W = rs.standard_normal((fout, fin)).astype(dtype)
    D = rs.standard_normal((n, fout)).astype(dtype)
    rows = n if rows is None else rows
    Z = np.full((rows, fout), np.nan, dtype)
    tail = np.empty(rt * fin if rows > n else 0, dtype)
    xwt(H, W, Z, rows, rt, ct, tail)
    P = np.full((n, fin), np.nan, dtype)
    xw(D, W, P, rt, ct)
    G = np.full((fout, fin), np.nan, dtype)
    dtx(D, H, G, rt, ct)
    return (H, W, D), (Z, P, G)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, fin, fout, rt, ct", [
    (1, 3, 2, ROW_TILE, COL_TILE), (37, 70, 300, 16, 64), (300, 129, 257, ROW_TILE, COL_TILE),
    (19, 33, 5, PREDICT_ROWS, PREDICT_COLS), (0, 4, 3, 8, 8),
])
def test_tiled_products_match_numpy(dtype, n, fin, fout, rt, ct):
    (H, W, D), (Z, P, G) = products(dtype, n, fin, fout, rt, ct)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Z, H @ W.T, **tol)
    np.testing.assert_allclose(P, D @ W, **tol)
    np.testing.assert_allclose(G, D.T @ H, **tol)


def test_padded_product_pads_with_zero_rows_and_keeps_the_real_rows():
    (H, W, _), (Z, _, _) = products("float64", 13, 20, 30, 8, 16, rows=16)
    np.testing.assert_allclose(Z[:13], H @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(Z[13:], 0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiled_products_are_bit_identical_at_every_thread_count(dtype):
    # shapes spanning several tiles both ways; the serial twins (a one-thread call) too
    for args in [(300, 130, 520, ROW_TILE, COL_TILE), (40, 70, 300, 16, 64), (16, 1024, 700, 256, 256)]:
        runs = [at_threads(k, lambda: products(dtype, *args)[1]) for k in THREADS]
        runs.append(products(dtype, *args, serial=True)[1])
        assert not any(np.isnan(a).any() for a in runs[0])  # every cell written (products() fills with NaN)
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                np.testing.assert_array_equal(a, b)


def test_training_is_bit_identical_at_every_thread_budget():
    X = np.random.default_rng(0).standard_normal((300, 64))
    y = np.random.default_rng(1).integers(0, 10, 300)
    finals = []
    for k in THREADS:
        nnkernels.set_thread_budget(k)
        try:
            m = Model(spec((64, 300, 70, 10), "float32"))
            for i in range(3):
                m.train_step(X[: 100 + 100 * i], y[: 100 + 100 * i])  # parallel from the first step: 12M multiply-adds
            finals.append((m.state_dict()["params"], m.predict(X)))
        finally:
            nnkernels.set_thread_budget(numba.config.NUMBA_NUM_THREADS)
    for p, out in finals[1:]:
        np.testing.assert_array_equal(p, finals[0][0])
        np.testing.assert_array_equal(out, finals[0][1])


NETS = [((784, 512, 256, 10), "float32"), ((64, 32, 1), "float64"), ((256, 256, 256, 10), "float32"),
        ((1024, 300, 10), "float32"), ((3, 5, 2), "float64")]


@pytest.mark.parametrize("sizes, dtype", NETS)
def test_a_predicted_row_has_the_same_bits_alone_and_in_any_batch(sizes, dtype):
    kind = "identity" if sizes[-1] == 1 else "softmax"
    m = Model(spec(sizes, dtype, kind))
    X = np.random.default_rng(5).standard_normal((600, sizes[0]))
    full = m.predict(X)
    for n in (1, 2, 7, 8, 9, 16, 100, 257):
        np.testing.assert_array_equal(m.predict(X[:n]), full[:n], err_msg=f"batch {n}")
    for i in (0, 3, 255, 256, 599):
        np.testing.assert_array_equal(m.predict(X[i:i + 1]), full[i:i + 1], err_msg=f"row {i} alone")
    # logits too, and the same at a budget of one thread (the serial twin)
    nnkernels.set_thread_budget(1)
    try:
        alone = m.predict(X[7:8], logits=True)
        batch = m.predict(X[:300], logits=True)
    finally:
        nnkernels.set_thread_budget(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(alone, m.predict(X, logits=True)[7:8])
    np.testing.assert_array_equal(batch, m.predict(X, logits=True)[:300])


@pytest.mark.parametrize("tiles", [
    [[PREDICT_ROWS, PREDICT_COLS, PREDICT_ROWS]] * 3,  # the fallback: PREDICT_ROWS rows per call, always
    [[ROW_TILE, COL_TILE, 4], [ROW_TILE, COL_TILE, 4], [PREDICT_ROWS, PREDICT_COLS, 4]],  # padded big tiles
    [[8, 64, 1], [8, 64, 1], [1, PREDICT_COLS, 1]],  # small tiles, output layer row by row
])
def test_every_tiling_computes_the_same_network(tiles):
    reference = Model(spec((784, 512, 256, 10)))
    m = Model(spec((784, 512, 256, 10)))
    m._backend._predict_tiles = np.array(tiles, np.int64)
    m._backend._quantum = tiles[0][2]
    m._backend._free_forward.clear()
    X = np.random.default_rng(6).standard_normal((300, 784))
    full = m.predict(X, logits=True)
    assert np.abs(full - reference.predict(X, logits=True)).max() < 1e-4
    if tiles[0][0] == PREDICT_ROWS:  # one call shape for every batch: rows independent of it on any BLAS
        for n in (1, 3, 8, 9, 17):
            np.testing.assert_array_equal(m.predict(X[:n], logits=True), full[:n])
        np.testing.assert_array_equal(m.predict(X[100:101], logits=True), full[100:101])


def test_predict_tiles_have_one_quantum_and_known_shapes():
    for sizes in [s for s, _ in NETS]:
        for dtype in ("float32", "float64"):
            t = tiling.predict_tiles(dtype, sizes)
            assert t.shape == (len(sizes) - 1, 3)
            assert len(set(t[:, 2])) == 1 and t[0, 2] in tiling.QUANTA
            allowed = {(ROW_TILE, COL_TILE), (1, PREDICT_COLS), (PREDICT_ROWS, PREDICT_COLS)} | set(tiling.SMALL_TILES)
            assert {tuple(r[:2]) for r in t} <= allowed


def test_concurrent_predicts_of_different_batches_give_each_row_its_own_bits():
    m = Model(spec((256, 256, 256, 10)))
    X = np.random.default_rng(7).standard_normal((400, 256))
    full = m.predict(X)

    def caller(i):
        for r in range(10):
            lo = (i * 37 + r * 11) % 300
            n = (1, 3, 16, 100)[(i + r) % 4]
            np.testing.assert_array_equal(m.predict(X[lo:lo + n]), full[lo:lo + n])

    all_returned(concurrently(8, caller))


def test_small_batches_of_big_networks_run_parallel():
    assert runtime.threads_for(1, 1, runtime.PARALLEL_MIN_WORK - 1) == 1
    assert runtime.threads_for(1, 1, runtime.PARALLEL_MIN_WORK) == runtime.thread_budget()
    assert runtime.threads_for(1, 2, runtime.PARALLEL_MIN_WORK) == max(1, runtime.thread_budget() // 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_sums_are_the_float64_sums_with_the_same_bits_serial_or_parallel(dtype):
    """The two reductions the train kernel makes beside the products: the
    bias gradients (column sums of D, COLSUM_COLS columns a task) are the
    float64 sums over the rows in order, cast once, exactly; the squared
    norm (NORM_BLOCK blocks, each a vectorized float64 sum) equals Σ g² to
    rounding. Both have the same bits on the serial twin and at every
    thread count; 41,280 parameters are three norm blocks, and 300 units
    make five column tasks, the last one short."""
    m = Model(spec((64, 300, 70, 10), dtype))
    X = np.random.default_rng(2).standard_normal((200, 64))
    y = np.random.default_rng(3).integers(0, 10, 200)
    runs = []
    for k in THREADS:
        nnkernels.set_thread_budget(k)  # 1: the serial twin
        try:
            loss, _, sq = m.backend.loss_and_grads(m._inputs(X), y, 0)
        finally:
            nnkernels.set_thread_budget(numba.config.NUMBA_NUM_THREADS)
        runs.append((loss, sq, m.backend.get_grads()))
    for loss, sq, g in runs[1:]:
        assert (loss, sq) == runs[0][:2]
        np.testing.assert_array_equal(g, runs[0][2])
    _, sq, g = runs[0]
    wide = g.astype(np.float64)
    assert sq == pytest.approx(float(np.dot(wide, wide)), rel=1e-12)
    # bias gradients: each layer's float64 column sums of its delta D (the workspace's n × units block)
    n, sizes = len(X), (64, 300, 70, 10)
    biases = m.backend.layout.named_views(g)
    for l, units in enumerate(sizes[1:]):
        start = n * sum(sizes[1:l + 1])
        D = m.backend._train_ws.d[start:start + n * units].reshape(n, units)
        want = np.zeros(units)
        for i in range(n):
            want += D[i].astype(np.float64)
        np.testing.assert_array_equal(biases[f"layers.{l}.bias"], want.astype(dtype))
