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


def _run(replicas: int, steps: int, dtype: str = "float64", **extra):
    from gradserve.server.cluster.replicas import DataParallelGroup
    spec = _spec(replicas, dtype, **extra)
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


@pytest.mark.parametrize("extra", [{}, {"regularization": {"clip_grad_norm": 0.2, "weight_noise_std": 0.05}}],
                         ids=["plain", "weight-noise"])
def test_two_replicas_equal_one_process_within_1e_12(cluster, extra):
    single, local, sums, pairs = _run(2, 5, **extra)
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
        # each replica's thread budget is its reservation (1 CPU), and it loads the kernels from this process's cache
        import numba
        info = group.describe()
        assert [d["budget"] for d in info] == [1, 1] and [d["numba_num_threads"] for d in info] == [1, 1]
        assert len({d["pid"] for d in info}) == 2
        assert {d["numba_cache_dir"] for d in info} == {numba.config.CACHE_DIR or "(beside the sources)"}
        from gradserve.nnkernels.cpu.kernels import train_kernel
        for d in info:  # the kernels were loaded from the cache this process uses, not compiled
            assert d["kernel_cache"]["misses"] == 0 and d["kernel_cache"]["hits"] >= 2, d["kernel_cache"]
            assert d["kernel_cache"]["cache_path"] == train_kernel.stats.cache_path
    finally:
        group.close()


@pytest.mark.parametrize("extra", [
    {"hidden": [{"units": 4, "dropout": 0.5}]},
    {"hidden": [{"units": 4, "noise_std": 0.1}]},
    {"regularization": {"input_noise_std": 0.1}},
    {"output": {"units": 3, "kind": "identity"}, "regularization": {"target_noise_std": 0.1}},
])
def test_per_row_draws_are_refused_with_replicas(extra):
    from gradserve.server.cluster.replicas import check_parallel_spec
    with pytest.raises(SpecError, match="replicas"):
        check_parallel_spec(_spec(2, **extra))
    check_parallel_spec(_spec(1, **extra))  # one replica draws as one process


def test_weight_noise_is_allowed_with_replicas():
    from gradserve.server.cluster.replicas import check_parallel_spec
    check_parallel_spec(_spec(2, regularization={"weight_noise_std": 0.1}))  # per weight, the same on every replica


# -- front-ends and owners -----------------------------------------------------------------
@pytest.fixture(scope="module")
def frontends(cluster, tmp_path_factory):
    """Two stateless front-ends (gRPC servers in this process) attached to the cluster, one store root."""
    from gradserve.server.app import GradServer, ServerConfig
    store = str(tmp_path_factory.mktemp("ray-store") / "gradserve.db")
    servers = [GradServer(ServerConfig(port=0, store=store, ray_address=cluster, workers=4, grace_s=1,
                                       ray_checksum_steps=5)) for _ in range(2)]
    for s in servers:
        s.start()
    yield [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        s.stop()


SPEC = dict(input_size=4, hidden=[(8, "tanh")], output=(3, "softmax"), optimizer={"name": "adam", "lr": 0.01},
            dtype="float64", seed=7)


def _reference(batches) -> dict:
    """The same steps on one process, in this one."""
    model = Model(ModelSpec.from_dict({"input_size": 4, "hidden": [{"units": 8, "activation": "tanh"}],
                                       "output": {"units": 3, "kind": "softmax"},
                                       "optimizer": {"name": "adam", "lr": 0.01}, "dtype": "float64", "seed": 7}))
    for X, y in batches:
        model.train_step(X, y)
    return model.get_weights()


def _batches4(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, 4)), rng.integers(0, 3, 16)) for _ in range(count)]


def test_two_frontends_drive_one_model(frontends):
    import threading

    from gradserve.client import Client
    clients = [Client(t, timeout=60, retries=8) for t in frontends]
    try:
        models = [c.create_model(**SPEC, model_id="shared") for c in clients]  # the second create finds the first
        assert models[0].model_id == models[1].model_id == "shared"
        steps = [[], []]

        def drive(i):
            for X, y in _batches4(6, i):
                steps[i].append(models[i].train_step(X, y).step)
        threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(steps[0] + steps[1]) == list(range(1, 13))  # every step counted once, by one owner
        assert models[0].step == models[1].step == 12
        assert [m.model_id for m in clients[1].list_models()] == ["shared"]
        w0, w1 = models[0].get_weights(), models[1].get_weights()
        assert all(np.array_equal(w0[k], w1[k]) for k in w0)
        models[1].delete()
        assert clients[0].list_models() == []
    finally:
        for c in clients:
            c.close()


def test_killed_owner_comes_back_at_its_last_acknowledged_step(frontends, caplog):
    import signal
    import threading
    import time

    from gradserve.client import Client
    from gradserve.server.cluster.owner import NAMESPACE, actor_name
    batches = _batches4(24, 42)
    with Client(frontends[0], timeout=60, retries=12, backoff=0.2) as c:
        model = c.create_model(**SPEC, model_id="phoenix")
        owner = ray.get_actor(actor_name("phoenix"), namespace=NAMESPACE)
        first = ray.get(owner.ping.remote())
        acked = []
        killed = threading.Event()

        def kill_after(n):
            deadline = time.monotonic() + 120
            while len(acked) < n:
                if time.monotonic() > deadline:
                    return  # the steps failed: the assertions below say so, and pytest is not held up
                time.sleep(0.005)
            os.kill(first["pid"], signal.SIGKILL)
            killed.set()
        killer = threading.Thread(target=kill_after, args=(8,), daemon=True)
        killer.start()
        with caplog.at_level("WARNING", logger="gradserve.cluster"):
            for X, y in batches:
                acked.append(model.train_step(X, y).step)
        killer.join()
        # the calls made while the owner restarted were refused UNAVAILABLE (retry-safe) and retried by the client
        assert "event=owner_unavailable model_id=phoenix" in caplog.text
        assert killed.is_set()
        again = ray.get(owner.ping.remote())
        assert again["pid"] != first["pid"] and again["restarted"] is True
        assert acked == list(range(1, 25))  # no acknowledged step lost, none applied twice
        assert model.step == 24
        expected = _reference(batches)
        got = model.get_weights()
        assert all(np.array_equal(got[k], expected[k]) for k in expected)  # bit for bit: the log replays exactly
        model.delete()


def test_replicated_model_through_a_frontend(frontends):
    from gradserve.client import Client
    from gradserve.server.cluster.owner import NAMESPACE, actor_name
    batches = _batches4(10, 5)
    with Client(frontends[1], timeout=120, retries=3) as c:
        model = c.create_model(**SPEC, replicas=2, model_id="dp")
        assert model.info.spec["replicas"] == 2
        for X, y in batches[:4]:
            model.train_step(X, y)
        assert [r.step for r in model.train_stream(batches[4:])] == list(range(5, 11))  # TrainStream too
        expected = _reference(batches)
        got = model.get_weights()
        for k in expected:
            assert np.max(np.abs(got[k] - expected[k])) <= 1e-12 * np.max(np.abs(expected[k])), k
        info = ray.get(ray.get_actor(actor_name("dp"), namespace=NAMESPACE).replica_info.remote())
        assert len(info["replicas"]) == 2 and info["resyncs"] == 0 and info["timing"]["steps"] == 10
        model.delete()


def test_data_set_calls_are_refused_under_a_frontend_naming_the_mode(frontends):
    import grpc

    from gradserve.client import Client
    with Client(frontends[0], timeout=30, retries=0) as c:
        for call in (lambda: c.upload_dataset(np.zeros((2, 4)), np.zeros(2, np.int64)),
                     lambda: c.delete_dataset("ds-" + "0" * 32)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert "--ray-address" in err.value.details()


def test_single_process_server_refuses_replicas_and_imports_no_ray(tmp_path):
    import subprocess
    import sys
    code = """
import sys
from gradserve.server.app import GradServer, ServerConfig
from gradserve.client import Client
s = GradServer(ServerConfig(port=0, store=sys.argv[1], grace_s=1))
s.start()
import grpc
with Client(f"127.0.0.1:{s.port}", retries=0) as c:
    c.create_model(2, output=1).train_step([[0.0, 1.0]], [[1.0]])
    try:
        c.create_model(2, output=1, replicas=2)
    except grpc.RpcError as exc:
        print(exc.code().name, exc.details())
s.stop()
print("ray" in sys.modules, any(m.startswith("ray.") for m in sys.modules))
"""
    from service_fixtures import source_env
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.db")], env=source_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("FAILED_PRECONDITION") and "--ray-address" in lines[-2]
    assert lines[-1] == "False False"


def test_killed_owner_of_a_replicated_model_places_its_replicas_again(frontends):
    import signal

    from gradserve.client import Client
    from gradserve.server.cluster.owner import NAMESPACE, actor_name
    batches = _batches4(6, 9)
    with Client(frontends[0], timeout=180, retries=12, backoff=0.2) as c:
        model = c.create_model(**SPEC, replicas=2, model_id="dp-phoenix")
        for X, y in batches[:3]:
            model.train_step(X, y)
        owner = ray.get_actor(actor_name("dp-phoenix"), namespace=NAMESPACE)
        os.kill(ray.get(owner.ping.remote())["pid"], signal.SIGKILL)
        for X, y in batches[3:]:
            model.train_step(X, y)
        assert model.step == 6
        expected, got = _reference(batches), model.get_weights()
        for k in expected:
            assert np.max(np.abs(got[k] - expected[k])) <= 1e-12 * np.max(np.abs(expected[k])), k
        info = ray.get(owner.replica_info.remote())
        # the new owner placed new replicas: its steps are the 3 new ones and those it replayed from the log
        assert len(info["replicas"]) == 2 and 3 <= info["timing"]["steps"] <= 6
        model.delete()
