"""Durability: what a restarted server serves after SIGKILL or SIGTERM, for
each --durability setting. Each test starts its own server processes on
one SQLite file; weights are checked against an in-process replay of the
same batches, then one more step on both checks the optimizer state too."""
import signal
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.nnkernels import Model, ModelSpec
from service_fixtures import ServerProcess

SPEC = dict(input_size=5, hidden=[(16, "relu")], output=(3, "softmax"),
            optimizer={"name": "adam", "lr": 0.01}, seed=11)


def batch(k: int):
    rng = np.random.default_rng(1000 + k)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.integers(0, 3, 8)


def replay(spec: dict, steps: int) -> Model:
    local = Model(ModelSpec.from_dict(spec))
    for k in range(steps):
        local.train_step(*batch(k))
    return local


def assert_matches_replay(remote, steps: int) -> None:
    """The remote model is exactly the in-process model after ``steps``
    batches: same step, same weights, and (next step) same optimizer state."""
    local = replay(remote.info.spec, steps)
    assert remote.step == local.step == steps
    want = local.get_weights()
    for name, w in remote.get_weights().items():
        np.testing.assert_array_equal(w, want[name], err_msg=name)
    r, l = remote.train_step(*batch(steps)), local.train_step(*batch(steps))
    assert (r.step, r.loss) == (l.step, l.loss)
    want = local.get_weights()
    for name, w in remote.get_weights().items():
        np.testing.assert_array_equal(w, want[name], err_msg=name)


def wait_for_snapshot(store, model_id: str, version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(store) as db:
            row = db.execute("SELECT MAX(version) FROM snapshots WHERE model_id = ?", (model_id,)).fetchone()
        if row[0] is not None and row[0] >= version:
            return
        time.sleep(0.05)
    raise AssertionError(f"no snapshot of {model_id} at version {version} after {timeout} s")


def test_step_durability_survives_sigkill_mid_training_at_the_last_acknowledged_step(tmp_path):
    store = tmp_path / "g.db"
    proc = ServerProcess(store, "--durability", "step")
    acked = {}
    with Client(proc.target, timeout=30, retries=0) as c:
        models = [c.create_model(**SPEC, model_id=f"m{i}") for i in range(2)]

        def train(model):
            try:
                for k in range(10_000):
                    acked[model.model_id] = model.train_step(*batch(k)).step
            except grpc.RpcError:
                pass  # the server died under us

        threads = [threading.Thread(target=train, args=(m,)) for m in models]
        for t in threads:
            t.start()
        time.sleep(2.0)
        proc.kill()
        for t in threads:
            t.join()
    assert all(acked.get(m.model_id, 0) > 0 for m in models), acked

    restarted = ServerProcess(store, "--durability", "step")
    try:
        with Client(restarted.target, timeout=30) as c:
            for model_id, last in acked.items():
                remote = c.get_model(model_id)
                # every acknowledged step is there; the one in flight at the kill
                # may also be (committed, reply never sent) — never anything else
                assert last <= remote.info.step <= last + 1
                assert_matches_replay(remote, remote.info.step)
    finally:
        assert restarted.stop() == 0


def test_interval_durability_after_sigkill_serves_the_last_checkpoint(tmp_path):
    store = tmp_path / "g.db"
    flags = ("--durability", "interval", "--checkpoint-steps", "5", "--checkpoint-seconds", "3600")
    proc = ServerProcess(store, *flags)
    with Client(proc.target, timeout=30) as c:
        remote = c.create_model(**SPEC, model_id="interval")
        for k in range(12):
            remote.train_step(*batch(k))
    wait_for_snapshot(store, "interval", version=10)  # written in the background
    proc.kill()
    with sqlite3.connect(store) as db:  # the background snapshot copied the model at 10, 11 or 12
        (saved,) = db.execute("SELECT MAX(step) FROM snapshots WHERE model_id = 'interval'").fetchone()
    assert 10 <= saved <= 12
    restarted = ServerProcess(store, *flags)
    try:
        with Client(restarted.target, timeout=30) as c:
            assert_matches_replay(c.get_model("interval"), saved)
    finally:
        assert restarted.stop() == 0


def test_sigterm_checkpoints_every_model_and_exits_zero(tmp_path):
    store = tmp_path / "g.db"
    flags = ("--durability", "interval", "--checkpoint-steps", "1000", "--checkpoint-seconds", "3600")
    proc = ServerProcess(store, *flags)
    with Client(proc.target, timeout=30) as c:
        a = c.create_model(**SPEC, model_id="a")
        b = c.create_model(**{**SPEC, "seed": 12}, model_id="b")
        for k in range(7):
            a.train_step(*batch(k))
        for k in range(3):
            b.train_step(*batch(k))
    assert proc.stop(signal.SIGTERM) == 0
    assert "event=checkpointed models=2" in proc.log()
    restarted = ServerProcess(store, *flags)
    try:
        with Client(restarted.target, timeout=30) as c:
            assert sorted(m.model_id for m in c.list_models()) == ["a", "b"]
            assert_matches_replay(c.get_model("a"), 7)
            assert_matches_replay(c.get_model("b"), 3)
    finally:
        assert restarted.stop(signal.SIGINT) == 0


def test_save_model_forces_a_checkpoint_under_interval_durability(tmp_path):
    store = tmp_path / "g.db"
    flags = ("--durability", "interval", "--checkpoint-steps", "1000", "--checkpoint-seconds", "3600")
    proc = ServerProcess(store, *flags)
    with Client(proc.target, timeout=30) as c:
        remote = c.create_model(**SPEC, model_id="saved")
        for k in range(4):
            remote.train_step(*batch(k))
        assert remote.save() == 4
        remote.train_step(*batch(4))
    proc.kill()
    restarted = ServerProcess(store, *flags)
    try:
        with Client(restarted.target, timeout=30) as c:
            assert_matches_replay(c.get_model("saved"), 4)
    finally:
        restarted.stop()


def test_interval_durability_commits_a_changed_model_after_checkpoint_seconds(tmp_path):
    store = tmp_path / "g.db"
    flags = ("--durability", "interval", "--checkpoint-steps", "1000", "--checkpoint-seconds", "0.5")
    proc = ServerProcess(store, *flags)
    with Client(proc.target, timeout=30) as c:
        remote = c.create_model(**SPEC, model_id="timed")
        for k in range(3):
            remote.train_step(*batch(k))
        time.sleep(2.0)  # the background checkpointer's turn
    proc.kill()
    restarted = ServerProcess(store, *flags)
    try:
        with Client(restarted.target, timeout=30) as c:
            assert_matches_replay(c.get_model("timed"), 3)
    finally:
        restarted.stop()


def test_durability_none_keeps_models_in_memory_only(tmp_path):
    store = tmp_path / "g.db"
    proc = ServerProcess(store, "--durability", "none")
    with Client(proc.target, timeout=30) as c:
        remote = c.create_model(**SPEC, model_id="volatile")
        for k in range(3):
            remote.train_step(*batch(k))
        assert_matches_replay(remote, 3)
        with pytest.raises(grpc.RpcError) as err:
            remote.save()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "memory only" in err.value.details()
    assert proc.stop() == 0
    assert not store.exists() and not (tmp_path / "g.db.mutations").exists()
    restarted = ServerProcess(store, "--durability", "none")
    try:
        with Client(restarted.target, timeout=30) as c:
            assert c.list_models() == []
    finally:
        restarted.stop()
