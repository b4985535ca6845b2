"""Concurrency: parallel kernels from many Python threads at once are safe
(thread-safe threading layer) and give bit-identical results."""
import threading

import numba
import numpy as np
from concurrency import all_returned, concurrently

from gradserve import nnkernels
from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec, RegularizationSpec, runtime


def make_spec(i):
    return ModelSpec(
        input_size=24, hidden=(LayerSpec(96, ("relu", "gelu", "tanh", "elu")[i % 4], dropout=0.2),
                               LayerSpec(48, "relu")),
        output=OutputSpec(6, "softmax"), optimizer=OptimizerSpec(("adam", "sgd", "rmsprop", "adagrad")[i % 4]),
        regularization=RegularizationSpec(input_noise_std=0.1, clip_grad_norm=1.0),
        dtype=("float32", "float64")[i % 2], seed=i)


def run(i, steps=12):
    rs = np.random.default_rng(i)
    m = Model(make_spec(i))
    results = []
    for _ in range(steps):
        X = rs.normal(size=(runtime.PARALLEL_MIN_ROWS * 2, 24))
        y = rs.integers(0, 6, len(X))
        results.append(m.train_step(X, y))
        results.append(m.predict(X[:50]).sum())
    return results, m.state_dict()["params"]


def test_threading_layer_is_thread_safe():
    nnkernels.warm_up(("float32",))
    assert numba.threading_layer() in ("tbb", "omp")
    assert runtime.check_threading_layer() == numba.threading_layer()


def test_eight_threads_training_concurrently_match_sequential_runs_bit_for_bit():
    sequential = [run(i) for i in range(8)]
    concurrent = all_returned(concurrently(8, run))
    for i in range(8):
        assert concurrent[i][0] == sequential[i][0]
        np.testing.assert_array_equal(concurrent[i][1], sequential[i][1])


def test_concurrent_predicts_on_one_model_agree():
    m = Model(make_spec(1))
    X = np.random.default_rng(0).normal(size=(300, 24))
    expected = [m.predict(X[: 100 + 40 * i]) for i in range(6)]
    outs = all_returned(concurrently(6, lambda i: [m.predict(X[: 100 + 40 * i]) for _ in range(5)]))
    for i in range(6):
        for out in outs[i]:
            np.testing.assert_array_equal(out, expected[i])


def test_thread_budget_is_validated():
    import pytest
    with pytest.raises(ValueError):
        nnkernels.set_thread_budget(0)


def test_warm_up_reports_seconds_and_layer():
    seconds, layer = nnkernels.warm_up(("float64",))
    assert seconds >= 0 and layer == numba.threading_layer()


def test_workqueue_layer_is_refused(monkeypatch):
    import pytest
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    with pytest.raises(RuntimeError, match="workqueue"):
        runtime.check_threading_layer()


def test_small_batches_run_on_one_thread_and_large_on_the_budget():
    assert runtime.threads_for(runtime.PARALLEL_MIN_ROWS - 1) == 1
    assert runtime.threads_for(runtime.PARALLEL_MIN_ROWS) == runtime.thread_budget()
    assert runtime.thread_config()["blas_threads"] == 1


def test_concurrent_kernel_calls_share_the_thread_budget():
    rows = runtime.PARALLEL_MIN_ROWS
    budget = runtime.thread_budget()
    started, release = threading.Event(), threading.Event()

    def hold_a_call():
        with runtime.kernel_threads(rows):
            started.set()
            release.wait(10)

    holder = threading.Thread(target=hold_a_call)
    holder.start()
    try:
        assert started.wait(10)
        with runtime.kernel_threads(rows) as share:
            assert share == max(1, budget // 2)
            assert numba.get_num_threads() == share
    finally:
        release.set()
        holder.join()
    with runtime.kernel_threads(rows) as alone:
        assert alone == budget
        assert numba.get_num_threads() == budget
