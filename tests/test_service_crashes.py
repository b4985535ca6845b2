"""Crash and network-failure behaviour of a real server with step
durability: SIGKILLs at random moments during TrainStep, TrainStream and
SetWeights from several clients; a TrainStep whose reply is lost with its
connection; fit() across a server restart; a damaged log tail; a model that
cannot be loaded; overflow refused.

GRADSERVE_KILLS sets how many SIGKILLs the kill test deals (default 4, to
keep CI short; 20 for the full run). GRADSERVE_KILL_SEED replays a run."""
import os
import random
import socket
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.client import Client, _wire
from gradserve.nnkernels import Model, ModelSpec
from gradserve.server.store import Snapshot
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.shuffle import fit_batches
from service_fixtures import ServerProcess, free_port

KILLS = int(os.environ.get("GRADSERVE_KILLS", "4"))
# small snapshots policy and segments, so kills land in snapshots, rotations and trims too
FLAGS = ("--durability", "step", "--checkpoint-steps", "40", "--log-segment-mb", "0.05")


def spec(seed: int, **extra) -> dict:
    return dict(input_size=6, hidden=[{"units": 16, "activation": "relu", "dropout": 0.2}],
                output=(3, "softmax"), optimizer={"name": "adam", "lr": 0.01},
                schedule={"name": "step", "step_size": 25, "gamma": 0.7},
                regularization={"input_noise_std": 0.05}, seed=seed, **extra)


def batch(model: str, j: int, rows: int = 8):
    rng = np.random.default_rng([sum(model.encode()), j])
    return rng.standard_normal((rows, 6)).astype(np.float32), rng.integers(0, 3, rows)


def weights(shapes, j: int) -> dict:
    rng = np.random.default_rng(7000 + j)
    return {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in shapes}


def stored_state(store, model_id: str) -> dict:
    """The newest snapshot's state_dict, read from the SQLite file."""
    with sqlite3.connect(store) as db:
        row = db.execute("SELECT seq, version, step, log_position, saved, meta, crc, data FROM snapshots "
                         "WHERE model_id = ? ORDER BY seq DESC LIMIT 1", (model_id,)).fetchone()
    return Snapshot(*row).unpack()[0]


class Writer:
    """One client thread's model: the mutations it sent, in order (j = 0, 1, ...),
    and an in-process Model at the last version known to be applied."""

    def __init__(self, model_id: str, kind: str, seed: int):
        self.model_id, self.kind, self.seed = model_id, kind, seed
        self.spec = self.local = None

    def created(self, info) -> None:
        self.spec = ModelSpec.from_dict(info.spec)
        self.local = Model(self.spec)
        self.version = 0  # mutations applied to self.local (all acknowledged or verified)
        self.sent = 0     # mutations sent (some may be in flight at a kill)

    def mutation(self, j: int):
        if self.kind == "set_weights" and j % 5 == 4:
            return "set", weights(self.local.param_shapes(), j)
        return "step", batch(self.model_id, j)

    def apply(self, model: Model, j: int) -> None:
        what, payload = self.mutation(j)
        model.set_weights(payload) if what == "set" else model.train_step(*payload)

    def acknowledged(self, j: int) -> None:
        assert j == self.version, (self.model_id, j, self.version)
        self.apply(self.local, j)
        self.version += 1

    def run(self, target: str, stop: threading.Event) -> None:
        try:
            with Client(target, timeout=30, retries=0) as c:
                remote = c.get_model(self.model_id)
                if self.kind == "stream":
                    def batches():
                        j = self.version
                        while not stop.is_set():
                            self.sent = j + 1
                            yield batch(self.model_id, j)
                            j += 1
                    for result in remote.train_stream(batches()):
                        self.acknowledged(result.step - 1)
                    return
                while not stop.is_set():
                    j = self.version
                    self.sent = j + 1
                    what, payload = self.mutation(j)
                    remote.set_weights(payload) if what == "set" else remote.train_step(*payload)
                    self.acknowledged(j)
        except grpc.RpcError:
            pass  # the server died under us

    def verify(self, c: Client, store) -> None:
        """The restarted server holds this model at or past its last
        acknowledged mutation, equal bit for bit (parameters, optimizer state,
        step) to the in-process model after the same mutations."""
        remote = c.get_model(self.model_id)
        assert remote.save() == remote.info.step
        state = stored_state(store, self.model_id)
        candidate = Model(self.spec, self.local.state_dict())
        for version in range(self.version, self.sent + 1):
            if version > self.version:
                self.apply(candidate, version - 1)
            if candidate.step != remote.info.step:
                continue
            local = candidate.state_dict()
            if all(np.array_equal(local[k], state[k]) for k in local):
                self.local, self.version = candidate, version
                got = remote.get_weights()
                for name, w in candidate.get_weights().items():
                    np.testing.assert_array_equal(got[name], w, err_msg=name)
                return
        raise AssertionError(f"{self.model_id}: server at step {remote.info.step} matches no replay of versions "
                             f"{self.version}..{self.sent} (acknowledged: {self.version})")


def test_sigkills_during_steps_streams_and_set_weights_lose_no_acknowledged_mutation(tmp_path):
    seed = int(os.environ.get("GRADSERVE_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    store = tmp_path / "g.db"
    writers = [Writer("unary", "unary", 1), Writer("stream", "stream", 2), Writer("weights", "set_weights", 3),
               Writer("unary2", "unary", 4)]
    proc = ServerProcess(store, *FLAGS)
    with Client(proc.target, timeout=30) as c:
        for w in writers:
            w.created(c.create_model(**spec(w.seed), model_id=w.model_id).info)
    for kill in range(KILLS):
        stop = threading.Event()
        threads = [threading.Thread(target=w.run, args=(proc.target, stop)) for w in writers]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 1.2))
        proc.kill()
        stop.set()
        for t in threads:
            t.join(60)
        proc = ServerProcess(store, *FLAGS)
        with Client(proc.target, timeout=30) as c:
            for w in writers:
                w.verify(c, store)
    assert proc.stop() == 0
    assert all(w.version > 10 for w in writers), ([w.version for w in writers], f"seed={seed}")


class CuttingProxy:
    """A TCP proxy on loopback. ``hold()``: replies from the server are kept
    back from then on; ``cut()`` closes every connection, dropping what was
    kept back (the request arrived, the reply never does)."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (replies and self.holding):
                    dst.sendall(data)
        except OSError:
            pass

    def hold(self) -> None:
        self.holding = True

    def cut(self) -> None:
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.sockets = []
        self.holding = False

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_train_step_retried_after_its_connection_dropped_is_applied_once(tmp_path):
    proc = ServerProcess(tmp_path / "g.db", *FLAGS)
    proxy = CuttingProxy(proc.port)
    try:
        with Client(proc.target, timeout=30) as direct, \
                Client(f"127.0.0.1:{proxy.port}", timeout=30, retries=3) as c:
            remote = c.create_model(**spec(9), model_id="dropped")
            local = Model(ModelSpec.from_dict(remote.info.spec))
            for j in range(3):
                assert remote.train_step(*batch("dropped", j)) == _result(local.train_step(*batch("dropped", j)))
            proxy.hold()
            outcome = {}
            caller = threading.Thread(target=lambda: outcome.update(r=remote.train_step(*batch("dropped", 3))))
            caller.start()
            deadline = time.monotonic() + 30
            while direct.get_model("dropped").info.step < 4:  # the server applied it; its reply is held back
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proxy.cut()
            caller.join(30)
            assert outcome["r"] == _result(local.train_step(*batch("dropped", 3)))  # the original reply
            assert direct.get_model("dropped").info.step == 4  # applied once
            got = direct.get_model("dropped").get_weights()
            for name, w in local.get_weights().items():
                np.testing.assert_array_equal(got[name], w, err_msg=name)
    finally:
        proxy.close()
        proc.stop()


def _result(r) -> _wire.StepResult:
    return _wire.StepResult(r.step, r.loss, r.accuracy, r.grad_norm, r.lr)


def test_fit_survives_a_server_restart_mid_epoch_without_losing_or_repeating_a_batch(tmp_path):
    store, port = tmp_path / "g.db", free_port()
    flags = (*FLAGS, "--port", str(port))
    proc = ServerProcess(store, *flags)
    X = np.random.default_rng(0).standard_normal((3000, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 3000)
    with Client(proc.target, timeout=60, retries=12, backoff=0.05) as c:
        remote = c.create_model(**spec(5), model_id="fit")
        history = {}
        fitting = threading.Thread(target=lambda: history.update(
            remote.fit(X, y, epochs=2, batch_size=8, seed=3, progress=False, server_side=False)))
        fitting.start()
        with Client(proc.target, timeout=30) as probe:
            while probe.get_model("fit").info.step < 100:
                time.sleep(0.01)
        proc.kill()
        assert fitting.is_alive()  # killed mid-fit
        proc = ServerProcess(store, *flags)
        fitting.join(120)
        assert history and len(history["loss"]) == 2
    local = Model(ModelSpec.from_dict(remote.info.spec))
    for _, Xb, yb in fit_batches(X, y, epochs=2, batch_size=8, seed=3):
        local.train_step(Xb, yb)
    try:
        with Client(proc.target, timeout=30) as c:
            remote = c.get_model("fit")
            assert remote.info.step == local.step == 750
            remote.save()
            state = stored_state(store, "fit")
            for name, value in local.state_dict().items():
                np.testing.assert_array_equal(state[name], value, err_msg=name)
    finally:
        assert proc.stop() == 0


def test_a_torn_log_tail_after_a_kill_is_dropped_and_logged(tmp_path):
    store = tmp_path / "g.db"
    proc = ServerProcess(store, *FLAGS)
    with Client(proc.target, timeout=30) as c:
        remote = c.create_model(**spec(6), model_id="torn")
        for j in range(5):
            remote.train_step(*batch("torn", j))
    proc.kill()
    segment = sorted((tmp_path / "g.db.mutations").glob("*.wal"))[-1]
    segment.write_bytes(segment.read_bytes()[:-40])
    proc = ServerProcess(store, *FLAGS)
    try:
        assert "event=log_damaged" in proc.log() and "runs past the end" in proc.log()
        local = Model(ModelSpec.from_dict(remote.info.spec))
        for j in range(4):
            local.train_step(*batch("torn", j))
        with Client(proc.target, timeout=30) as c:
            got = c.get_model("torn")
            assert got.info.step == 4
            for name, w in got.get_weights().items():
                np.testing.assert_array_equal(w, local.get_weights()[name], err_msg=name)
    finally:
        proc.stop()


def test_a_stored_model_that_cannot_be_loaded_is_listed_with_its_reason_and_refused(tmp_path):
    store = tmp_path / "g.db"
    proc = ServerProcess(store, *FLAGS)
    with Client(proc.target, timeout=30) as c:
        c.create_model(**spec(7), model_id="ok")
        c.create_model(**spec(8), model_id="bad")
    proc.kill()
    with sqlite3.connect(store) as db:
        db.execute("UPDATE snapshots SET crc = crc + 1 WHERE model_id = 'bad'")
    proc = ServerProcess(store, *FLAGS)
    try:
        assert "event=model_not_loaded model_id=bad" in proc.log()
        with Client(proc.target, timeout=30) as c:
            listed = {m.model_id: m for m in c.list_models()}
            assert set(listed) == {"ok", "bad"}
            reasons = {m.model_id: m.load_error for m in c._call("ListModels", pb.ListModelsRequest()).models}
            assert reasons["ok"] == "" and "no usable snapshot" in reasons["bad"] and "CRC mismatch" in reasons["bad"]
            with pytest.raises(grpc.RpcError) as err:
                c.get_model("bad")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "could not be loaded" in \
                err.value.details()
            c.delete_model("bad")
            assert [m.model_id for m in c.list_models()] == ["ok"]
    finally:
        proc.stop()


def test_a_step_that_would_overflow_the_weights_is_refused_naming_it(tmp_path):
    proc = ServerProcess(tmp_path / "g.db", *FLAGS)
    try:
        with Client(proc.target, timeout=30) as c:
            remote = c.create_model(input_size=6, output=(3, "softmax"), optimizer={"name": "sgd", "lr": 1e38})
            before = remote.get_weights()
            with pytest.raises(grpc.RpcError) as err:
                remote.train_step(batch("x", 0)[0] * 100, batch("x", 0)[1])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "params" in err.value.details() and "overflow" in err.value.details()
            assert remote.step == 0
            for name, w in remote.get_weights().items():
                np.testing.assert_array_equal(w, before[name])
            with pytest.raises(grpc.RpcError) as err:
                c.create_model(input_size=3, output=1, weight_init={"name": "constant", "value": 1e39})
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not finite" in err.value.details()
    finally:
        proc.stop()
