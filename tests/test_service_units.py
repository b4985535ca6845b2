"""Server parts without a server: store, lock, registry, servicer (with a
stand-in context), CLI flags and their environment twins."""
import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.server import wal
from gradserve.server.cli import build_parser, config_from_args
from gradserve.server.limits import Limits
from gradserve.server.registry import Durability, ModelRegistry
from gradserve.server.rwlock import ReadWriteLock
from gradserve.server.servicer import TrainerServicer
from gradserve.server.store import SqliteStore, StoredModel
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.specmsg import spec_to_message
from gradserve.wire.status import RETRY_SAFE_KEY
from gradserve.wire.tensor import encode_tensor

SPEC = {"input_size": 3, "hidden": [{"units": 4}], "output": {"units": 2, "kind": "softmax"}, "seed": 1}


class Aborted(Exception):
    pass


class FakeContext:
    """Enough of grpc.ServicerContext for the servicer: abort raises."""

    code = details = None
    trailing_metadata = ()

    def set_trailing_metadata(self, pairs):
        self.trailing_metadata = tuple(pairs)

    def is_active(self):
        return True

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code, details)


@pytest.fixture
def servicer(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    s = TrainerServicer(ModelRegistry(store, limits=Limits(max_models=2), durability=Durability("step")))
    s.ready.set()
    yield s
    store.close()


def create(servicer, model_id=""):
    req = pb.CreateModelRequest(model_id=model_id)
    spec_to_message(SPEC, req.spec)
    return servicer.CreateModel(req, FakeContext())


def test_store_round_trips_snapshots_including_zero_d_arrays_and_keeps_the_newest_two(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    state = {"params": np.arange(5, dtype=np.float32), "step": np.array(7, dtype=np.int64)}
    store.create(StoredModel("m", 42, {"x": 1}, 1.5), 0, 0, 16, state, {})
    for version in (1, 2, 3):
        oldest = store.put_snapshot("m", version, 7, 100 * version, {**state, "params": state["params"] + version},
                                    {"replies": [[version]]})
    assert oldest == 200  # versions 3 and 2 kept
    (m,) = store.models()
    assert (m.model_id, m.uid, m.spec, m.created) == ("m", 42, {"x": 1}, 1.5)
    newest, older = store.snapshots("m")
    assert (newest.version, newest.log_position, older.version) == (3, 300, 2)
    got, extra = newest.unpack()
    assert got["step"].shape == () and int(got["step"]) == 7 and extra == {"replies": [[3]]}
    np.testing.assert_array_equal(got["params"], state["params"] + 3)
    store.delete("m")
    assert store.model_ids() == [] and store.snapshots("m") == []
    store.close()


def test_rwlock_lets_readers_share_and_writers_exclude():
    lock = ReadWriteLock()
    inside = []
    with lock.read(), lock.read():  # two readers at once
        pass

    def writer():
        with lock.write():
            inside.append("w")

    with lock.read():
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.05)
        assert inside == []  # the writer waits for the reader
    t.join(5)
    assert inside == ["w"]


def test_servicer_creates_trains_and_predicts_without_a_server(servicer):
    info = create(servicer)
    X = np.ones((2, 3), np.float32)
    req = pb.TrainStepRequest(model_id=info.model_id, inputs=encode_tensor(X), targets=encode_tensor(np.array([0, 1])))
    assert servicer.TrainStep(req, FakeContext()).step == 1
    out = servicer.Predict(pb.PredictRequest(model_id=info.model_id, inputs=encode_tensor(X)), FakeContext())
    assert list(out.outputs.shape) == [2, 2]


def test_models_beyond_the_limit_are_resource_exhausted(servicer):
    create(servicer)
    create(servicer)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        req = pb.CreateModelRequest()
        spec_to_message(SPEC, req.spec)
        servicer.CreateModel(req, ctx)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_models=2" in ctx.details


def test_calls_before_ready_are_unavailable_and_marked_retry_safe(servicer):
    servicer.ready.clear()
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.ListModels(pb.ListModelsRequest(), ctx)
    assert ctx.code == grpc.StatusCode.UNAVAILABLE
    assert ctx.trailing_metadata == ((RETRY_SAFE_KEY, "1"),)


def test_refusals_after_the_admission_check_are_not_marked_retry_safe(servicer):
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.GetModel(pb.GetModelRequest(model_id="no-such-model"), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND and ctx.trailing_metadata == ()


def test_every_flag_has_an_environment_twin(monkeypatch):
    monkeypatch.setenv("GRADSERVE_PORT", "6000")
    monkeypatch.setenv("GRADSERVE_DURABILITY", "interval")
    monkeypatch.setenv("GRADSERVE_MAX_MESSAGE_MB", "16")
    cfg = config_from_args(build_parser().parse_args(["serve", "--max-models", "3"]))
    assert cfg.port == 6000 and cfg.durability.mode == "interval"
    assert cfg.limits.max_message_mb == 16 and cfg.limits.max_models == 3
    cfg = config_from_args(build_parser().parse_args(["serve", "--port", "7000"]))
    assert cfg.port == 7000  # the flag wins over the variable


def test_console_script_is_installed_with_the_serve_command():
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    script = shutil.which("gradserve", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the project is not pip-installed in this environment")
    out = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "GRADSERVE_MAX_MESSAGE_MB" in out.stdout


def test_a_failed_log_write_fails_the_step_and_every_later_mutation(tmp_path, monkeypatch):
    store = SqliteStore(str(tmp_path / "s.db"))
    registry = ModelRegistry(store, durability=Durability("step"))
    handle, _ = registry.create(SPEC)
    X, y = np.ones((2, 3), np.float32), np.array([0, 1])
    registry.train_step(handle, X, y)[1].wait()

    def failing_writev(fd, buffers):
        raise OSError("disk full")

    monkeypatch.setattr(wal.os, "writev", failing_writev)
    with pytest.raises(wal.LogFailed, match="disk full"):
        registry.train_step(handle, X, y)[1].wait()  # never acknowledged
    with pytest.raises(wal.LogFailed):  # and the log takes nothing more
        registry.train_step(handle, X, y)
    monkeypatch.undo()
    restarted = ModelRegistry(SqliteStore(str(tmp_path / "s.db")), durability=Durability("step"))
    restarted.load_stored()
    assert restarted.get(handle.model_id).model.step == 1  # the last durable step
