"""gradserve on a local Ray cluster (``gradserve.server.cluster``, the
``--ray-address`` mode): the data-parallel step equals the single-process
step, replicas stay bit-identical and are resynchronised when they are not;
two front-ends drive one model; a killed owner comes back at its last
acknowledged step.

One local Ray cluster (2 CPUs, no dashboard) serves the whole module; each
test closes its replica groups and deletes its models so the next one can
place its own actors."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import ray

from gradserve.nnkernels import Model, ModelSpec, SpecError


@pytest.fixture(scope="module")
def cluster():
    # actors load the kernels the warm-up compiled into Numba's cache (runtime.actor_env)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             namespace="gradserve-test", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("TMPDIR", "/tmp")))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _spec(replicas: int, dtype: str = "float64", **extra) -> ModelSpec:
    return ModelSpec.from_dict({
        "input_size": 6, "hidden": [{"units": 16, "activation": "tanh"}, {"units": 8, "activation": "relu"}],
        "output": {"units": 3, "kind": "softmax"}, "optimizer": {"name": "adam", "lr": 0.01},
        "regularization": {"clip_grad_norm": 0.2}, "dtype": dtype, "seed": 3, "replicas": replicas, **extra})


def _batches(steps: int, rows: int = 37):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        yield rng.normal(size=(rows, 6)), rng.integers(0, 3, rows)


def _run(replicas: int, steps: int, dtype: str = "float64"):
    from gradserve.server.cluster.replicas import DataParallelGroup
    spec = _spec(replicas, dtype)
    single, local = Model(spec), Model(spec)
    group = DataParallelGroup(spec, local.state_dict(), cpus=1)
    try:
        pairs = []
        for X, y in _batches(steps):
            X = X.astype(dtype)
            pairs.append((single.train_step(X, y), group.step(local, local._inputs(X), local._targets(y, len(X)))))
        return single, local, group.checksums(local), pairs
    finally:
        group.close()


def test_one_replica_is_bit_identical_to_one_process(cluster):
    single, local, sums, pairs = _run(1, 4)
    assert all(a == b for a, b in pairs), pairs  # step, loss, accuracy, grad_norm, lr: every bit
    for name, value in single.state_dict().items():
        assert np.array_equal(value, local.state_dict()[name]), name
    assert len(set(sums)) == 1


def test_two_replicas_equal_one_process_within_1e_12(cluster):
    single, local, sums, pairs = _run(2, 5)
    clipped = 0
    for a, b in pairs:
        assert a.step == b.step and a.accuracy == b.accuracy and a.lr == b.lr
        assert b.loss == pytest.approx(a.loss, rel=1e-12)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-12)
        clipped += a.grad_norm > 0.2
    assert clipped, "the test should exercise clipping, whose coefficient needs the full gradient's norm"
    for name, value in single.state_dict().items():
        other = local.state_dict()[name]
        assert np.max(np.abs(other - value)) <= 1e-12 * np.max(np.abs(value)), name
    assert not np.array_equal(single.get_weights()["layers.0.weight"], Model(_spec(1)).get_weights()["layers.0.weight"])
    assert len(set(sums)) == 1  # both replicas and the owner's copy


def test_replicas_identical_after_20_steps_and_resynced_when_not(cluster, caplog):
    from gradserve.server.cluster.replicas import DataParallelGroup
    spec = _spec(2, "float32")
    local = Model(spec)
    group = DataParallelGroup(spec, local.state_dict(), cpus=1, checksum_steps=10, label="m")
    try:
        for X, y in _batches(20):
            group.step(local, local._inputs(X), local._targets(y, len(X)))
        sums = group.checksums(local)
        assert len(set(sums)) == 1 and local.step == 20 and group.resyncs == 0
        ray.get(group.replicas[1].perturb.remote(1e-3))
        assert len(set(group.checksums(local))) == 2
        with caplog.at_level("WARNING", logger="gradserve.cluster"):
            assert group.verify(local) is False
        assert "event=replicas_diverged" in caplog.text and group.resyncs == 1
        assert len(set(group.checksums(local))) == 1
        # a copy changed outside the group (SetWeights) reaches the replicas before the next step
        local.set_weights({k: v * 0.5 for k, v in local.get_weights().items()})
        local.mutations = 1
        X, y = next(_batches(1))
        group.step(local, local._inputs(X), local._targets(y, len(X)))
        assert len(set(group.checksums(local))) == 1
        info = group.describe()
        assert [d["budget"] for d in info] == [1, 1] and len({d["pid"] for d in info}) == 2
    finally:
        group.close()


def test_dropout_is_refused_with_replicas(cluster):
    from gradserve.server.cluster.replicas import check_parallel_spec
    spec = _spec(2, hidden=[{"units": 4, "dropout": 0.5}])
    with pytest.raises(SpecError, match="replicas"):
        check_parallel_spec(spec)
