"""Recovery of the registry's models from snapshots and the mutation log,
in process (real SQLite file, real log segments): a replayed model equals
the original bit for bit; damage to the log or to a snapshot costs only
the damaged part, loudly; a mutation that would leave Inf in the state is
refused and undone; a retried TrainStep is answered, not applied."""
import logging
import sqlite3

import numpy as np
import pytest

from gradserve.nnkernels import Model, ModelSpec
from gradserve.server.registry import Durability, ModelRegistry, ModelUnavailable, StateOverflow, StepConflict
from gradserve.server.store import SqliteStore

# dropout, input noise and a step schedule: replay must redraw the same
# masks and noise and resume the schedule at the right place
SPEC = {"input_size": 6, "hidden": [{"units": 16, "activation": "relu", "dropout": 0.25},
                                    {"units": 8, "activation": "tanh", "dropout": 0.1}],
        "output": {"units": 3, "kind": "softmax"}, "optimizer": {"name": "adam", "lr": 0.01, "amsgrad": True},
        "schedule": {"name": "step", "step_size": 7, "gamma": 0.5},
        "regularization": {"input_noise_std": 0.1, "clip_grad_norm": 1.0}, "seed": 5}


def batch(k: int, rows: int = 8):
    rng = np.random.default_rng(100 + k)
    return rng.standard_normal((rows, 6)).astype(np.float32), rng.integers(0, 3, rows)


def weights_for(model: Model, k: int) -> dict:
    rng = np.random.default_rng(900 + k)
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in model.param_shapes()}


def open_registry(path, **policy) -> ModelRegistry:
    """A registry over the store at ``path``, recovered as a restarted server
    would (no background snapshotter: the tests take snapshots explicitly)."""
    registry = ModelRegistry(SqliteStore(str(path)), durability=Durability("step", **policy))
    registry.load_stored()
    return registry


def crash(registry: ModelRegistry) -> None:
    """Abandons the registry as a SIGKILL would: nothing is flushed or snapshotted
    (every acknowledged record is already durable)."""
    registry._stop.set()


def train(registry, handle, local: Model, ks) -> None:
    for k in ks:
        result, commit = registry.train_step(handle, *batch(k))
        commit.wait()
        assert result == local.train_step(*batch(k))


def assert_same_state(a: Model, b: Model) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def test_replay_after_a_crash_equals_the_original_bit_for_bit(tmp_path):
    registry = open_registry(tmp_path / "g.db")
    handle, _ = registry.create(SPEC, "m")
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    train(registry, handle, local, range(0, 12))
    registry.snapshot(handle)  # replay starts here
    train(registry, handle, local, range(12, 20))
    registry.set_weights(handle, weights_for(local, 1))
    local.set_weights(weights_for(local, 1))
    train(registry, handle, local, range(20, 31))
    crash(registry)

    recovered = open_registry(tmp_path / "g.db")
    h = recovered.get("m")
    assert (h.model.step, h.version) == (31, 32)
    assert h.base_version == 12  # from the snapshot, then 20 records replayed
    assert_same_state(h.model, local)
    # and it goes on identically (masks, noise and schedule position included)
    train(recovered, h, local, range(31, 40))
    assert_same_state(h.model, local)


def last_segment(path):
    return sorted((path.parent / (path.name + ".mutations")).glob("*.wal"))[-1]


def test_a_torn_log_tail_recovers_to_the_last_whole_record_and_says_so(tmp_path, caplog):
    store = tmp_path / "g.db"
    registry = open_registry(store)
    handle, _ = registry.create(SPEC, "m")
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    train(registry, handle, local, range(5))
    crash(registry)
    segment = last_segment(store)
    segment.write_bytes(segment.read_bytes()[:-50])  # the fifth step's record half written

    caplog.set_level(logging.INFO, logger="gradserve")
    h = open_registry(store).get("m")
    expected = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    for k in range(4):
        expected.train_step(*batch(k))
    assert h.model.step == 4
    assert_same_state(h.model, expected)
    assert "event=log_damaged" in caplog.text and "runs past the end" in caplog.text


def test_a_flipped_byte_in_a_record_stops_that_model_there_and_later_runs_stay_consistent(tmp_path, caplog):
    store = tmp_path / "g.db"
    registry = open_registry(store)
    handle, _ = registry.create(SPEC, "m")
    train(registry, handle, Model(ModelSpec.from_dict(handle.spec.to_dict())), range(6))
    crash(registry)
    segment = last_segment(store)
    data = bytearray(segment.read_bytes())
    record = (len(data) - 16) // 6  # six records of one size
    data[16 + 3 * record + record // 2] ^= 0x40  # inside the fourth step's batch
    segment.write_bytes(bytes(data))

    caplog.set_level(logging.INFO, logger="gradserve")
    recovered = open_registry(store)
    h = recovered.get("m")
    assert h.model.step == 3
    assert "CRC mismatch" in caplog.text
    assert "event=replay_incomplete model_id=m" in caplog.text and "dropped_records=2" in caplog.text
    # new steps 4.. and another crash: the stale records 5 and 6 of the first run are not replayed
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    for k in range(3):
        local.train_step(*batch(k))
    train(recovered, h, local, range(10, 14))
    crash(recovered)
    again = open_registry(store).get("m")
    assert again.model.step == 7
    assert_same_state(again.model, local)


def flip_newest_snapshot_byte(store) -> None:
    with sqlite3.connect(store) as db:
        seq, data = db.execute("SELECT seq, data FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
        data = bytearray(data)
        data[len(data) // 2] ^= 0x10
        db.execute("UPDATE snapshots SET data = ? WHERE seq = ?", (bytes(data), seq))


def test_a_corrupt_snapshot_falls_back_to_the_previous_one_and_a_longer_replay(tmp_path, caplog):
    store = tmp_path / "g.db"
    registry = open_registry(store)
    handle, _ = registry.create(SPEC, "m")
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    train(registry, handle, local, range(8))
    registry.snapshot(handle)
    train(registry, handle, local, range(8, 15))
    registry.snapshot(handle)
    train(registry, handle, local, range(15, 18))
    crash(registry)
    flip_newest_snapshot_byte(store)

    caplog.set_level(logging.INFO, logger="gradserve")
    h = open_registry(store).get("m")
    assert h.model.step == 18
    assert_same_state(h.model, local)
    assert "event=snapshot_unusable model_id=m" in caplog.text and "CRC mismatch" in caplog.text
    assert "replayed=10" in caplog.text  # from the snapshot at 8, not 15


def test_a_model_with_no_usable_snapshot_stays_listed_with_its_reason_until_deleted(tmp_path):
    store = tmp_path / "g.db"
    registry = open_registry(store)
    registry.create(SPEC, "broken")
    registry.create({**SPEC, "seed": 6}, "fine")
    crash(registry)
    with sqlite3.connect(store) as db:
        db.execute("UPDATE snapshots SET crc = crc + 1 WHERE model_id = 'broken'")

    recovered = open_registry(store)
    handle = recovered.get("broken")
    assert "no usable snapshot" in handle.load_error and "CRC mismatch" in handle.load_error
    listed = recovered.describe(handle, listing=True)
    assert listed["load_error"] == handle.load_error and listed["num_params"] > 0
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        recovered.predict(handle, batch(0)[0], logits=False)
    with pytest.raises(ModelUnavailable):
        recovered.train_step(handle, *batch(0))
    recovered.delete("broken")
    assert [h.model_id for h in recovered.handles()] == ["fine"]
    crash(recovered)
    assert [h.model_id for h in open_registry(store).handles()] == ["fine"]


@pytest.mark.parametrize("spec, good_steps, inputs_scale, what", [
    ({"optimizer": {"name": "sgd", "lr": 1e38}}, 0, 100.0, "params"),
    ({"optimizer": {"name": "adam", "lr": 1e-3}}, 3, 1e25, "optimizer.exp_avg_sq"),
])
def test_a_step_that_overflows_the_state_is_refused_and_the_model_is_unchanged(tmp_path, spec, good_steps,
                                                                              inputs_scale, what):
    registry = open_registry(tmp_path / "g.db")
    full = {"input_size": 6, "hidden": [{"units": 8}], "output": {"units": 3, "kind": "softmax"}, **spec}
    handle, _ = registry.create(full, "m")
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    X, y = batch(0)
    train(registry, handle, local, range(good_steps))  # the rollback replays these onto the base
    before = handle.model.state_dict()
    with pytest.raises(StateOverflow, match=what.replace(".", r"\.")):
        registry.train_step(handle, X * inputs_scale, y)
    after = handle.model.state_dict()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # nothing of it comes back after a restart either
    crash(registry)
    h = open_registry(tmp_path / "g.db").get("m")
    for name, value in h.model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # nnkernels' initializer, as expected here
def test_a_spec_whose_initial_weights_overflow_is_refused(tmp_path):
    registry = open_registry(tmp_path / "g.db")
    with pytest.raises(StateOverflow, match="initial params are not finite"):
        registry.create({"input_size": 3, "output": {"units": 1},
                         "weight_init": {"name": "constant", "value": 1e39}}, "m")
    assert registry.handles() == []


def test_a_retried_step_gets_its_original_reply_even_after_a_restart(tmp_path):
    store = tmp_path / "g.db"
    registry = open_registry(store)
    handle, _ = registry.create(SPEC, "m")
    replies = [registry.train_step(handle, *batch(k), expected_step=k + 1)[0] for k in range(6)]
    assert registry.train_step(handle, *batch(5), expected_step=6)[0] == replies[5]  # trains nothing
    assert handle.model.step == 6
    with pytest.raises(StepConflict, match="different batch") as conflict:
        registry.train_step(handle, *batch(99), expected_step=6)
    assert conflict.value.current_step == 6
    with pytest.raises(StepConflict, match="ahead"):
        registry.train_step(handle, *batch(6), expected_step=8)
    registry.snapshot(handle)  # replies 1-6 come back from the snapshot, 7 from the replay
    registry.train_step(handle, *batch(6), expected_step=7)[1].wait()
    replies.append(handle.replies[7].result)
    crash(registry)

    recovered = open_registry(store)
    h = recovered.get("m")
    for k in range(7):
        assert recovered.train_step(h, *batch(k), expected_step=k + 1)[0] == replies[k]
    assert h.model.step == 7


def test_log_segments_go_once_both_kept_snapshots_cover_them(tmp_path):
    store = tmp_path / "g.db"
    registry = open_registry(store, segment_mb=0.002)  # 2 KiB segments: a few records each
    handle, _ = registry.create(SPEC, "m")
    local = Model(ModelSpec.from_dict(handle.spec.to_dict()))
    segments = lambda: sorted((tmp_path / "g.db.mutations").glob("*.wal"))  # noqa: E731
    train(registry, handle, local, range(30))
    registry.snapshot(handle)
    registry._trim_log()
    at_first_snapshot = len(segments())  # the snapshot at creation still needs all of them
    train(registry, handle, local, range(30, 40))
    registry.snapshot(handle)  # kept: versions 40 and 30
    registry._trim_log()
    assert len(segments()) < at_first_snapshot
    crash(registry)
    flip_newest_snapshot_byte(store)  # the fallback to version 30 finds its records
    recovered = open_registry(store, segment_mb=0.002)
    h = recovered.get("m")
    assert_same_state(h.model, local)
    # an idle model gets a second copy of its newest snapshot, and then needs no log at all
    recovered.snapshot(h, unpin=True)
    recovered._trim_log()
    assert len(segments()) == 1  # the one being written
