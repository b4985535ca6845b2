"""Data sets on the server and server-side Fit, end to end against a real
server, checked against nnkernels run in this process on the batches
``gradserve.wire.shuffle`` schedules."""
import re
import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.nnkernels import Model, ModelSpec, NonFiniteError
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.shuffle import epoch_order, fit_batches, steps_per_epoch
from gradserve.wire.tensor import encode_tensor
from service_fixtures import ServerProcess

SPEC = dict(input_size=6, hidden=[{"units": 16, "activation": "tanh"}, {"units": 8, "activation": "relu"}],
            output={"units": 3, "kind": "softmax"}, optimizer={"name": "adam", "lr": 0.01}, seed=7)


def data(rows, seed=0, features=6, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, features)).astype(np.float32), rng.integers(0, classes, rows)


def local_twin(remote):
    return Model(ModelSpec.from_dict(remote.info.spec))


def assert_same_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_shuffle_is_a_function_of_seed_and_epoch_only():
    a, b = epoch_order(5, 3, 100), epoch_order(5, 3, 100)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_order(5, 4, 100)) and not np.array_equal(a, epoch_order(6, 3, 100))
    np.testing.assert_array_equal(epoch_order(5, 3, 10, shuffle=False), np.arange(10))


def test_server_side_fit_equals_the_same_batches_sent_as_train_steps(client):
    X, y = data(203)
    server_side = client.create_model(**SPEC)
    history = server_side.fit(X, y, epochs=3, batch_size=10, seed=11, progress=False, progress_every_steps=5)
    # the same epochs, batch by batch through TrainStep, on a twin model
    one_by_one = client.create_model(**SPEC)
    local = local_twin(one_by_one)
    losses, rows = [0.0] * 3, [0] * 3
    for epoch, Xb, yb in fit_batches(X, y, epochs=3, batch_size=10, seed=11):
        r = one_by_one.train_step(Xb, yb)
        local.train_step(Xb, yb)
        losses[epoch] += r.loss * len(Xb)
        rows[epoch] += len(Xb)
    assert server_side.step == one_by_one.step == 3 * 21
    assert_same_weights(server_side.get_weights(), one_by_one.get_weights())
    assert_same_weights(server_side.get_weights(), local.get_weights())
    assert history["loss"] == [loss / n for loss, n in zip(losses, rows)]
    # and per-batch streaming (server_side=False) trains on the same batches
    streamed = client.create_model(**SPEC)
    streamed_history = streamed.fit(X, y, epochs=3, batch_size=10, seed=11, progress=False, server_side=False)
    assert_same_weights(streamed.get_weights(), local.get_weights())
    assert streamed_history == history


def test_fit_streams_progress_every_k_steps_and_per_epoch(client):
    X, y = data(100, seed=1)
    remote = client.create_model(**SPEC)
    dataset = client.upload_dataset(X, y)
    request = pb.FitRequest(model_id=remote.model_id, dataset_id=dataset.dataset_id, epochs=2, batch_size=8,
                            shuffle=True, seed=3, progress_every_steps=4)
    marks = [(m.epoch, m.epoch_step, m.step, m.epoch_end) for m in client._stub.Fit(request)]
    assert marks == [(1, 4, 4, False), (1, 8, 8, False), (1, 12, 12, False), (1, 13, 13, True),
                     (2, 4, 17, False), (2, 8, 21, False), (2, 12, 25, False), (2, 13, 26, True)]


def test_datasets_are_stored_once_by_content_listed_and_deleted(client):
    X, y = data(57, seed=2)
    first = client.upload_dataset(X, y, name="digits-ish")
    again = client.upload_dataset(X.copy(), y.copy())
    assert first.dataset_id == again.dataset_id and first.content_hash == again.content_hash
    assert (first.rows, first.inputs_shape, first.targets_shape, first.name) == (57, (57, 6), (57,), "digits-ish")
    assert first.nbytes == X.nbytes + y.astype(np.int64).nbytes
    other = client.upload_dataset(X[:-1], y[:-1])
    assert other.dataset_id != first.dataset_id
    assert {first.dataset_id, other.dataset_id} <= {d.dataset_id for d in client.list_datasets()}
    assert client.get_dataset(first.dataset_id) == first
    # an upload in many chunks (a small message limit) stores the same content as one chunk
    X2, y2 = data(91, seed=12)
    with Client(client.target, max_message_mb=0.001) as small:
        chunked = small.upload_dataset(X2, y2)
    whole = client._stub.UploadDataset(iter([pb.DatasetChunk(inputs=encode_tensor(X2), targets=encode_tensor(y2))]))
    assert whole.dataset_id == chunked.dataset_id and whole.rows == 91
    client.delete_dataset(other.dataset_id)
    with pytest.raises(grpc.RpcError) as err:
        client.get_dataset(other.dataset_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and other.dataset_id in err.value.details()


def test_fit_refuses_unknown_or_unfitting_data_sets_naming_both(client):
    remote = client.create_model(**SPEC)

    def fit_error(**fields):
        request = pb.FitRequest(model_id=remote.model_id, epochs=1, batch_size=4, **fields)
        with pytest.raises(grpc.RpcError) as err:
            list(client._stub.Fit(request))
        return err.value

    err = fit_error(dataset_id="ds-nope")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ds-nope" in err.details()
    wide = client.upload_dataset(*data(20, features=7))
    err = fit_error(dataset_id=wide.dataset_id)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wide.dataset_id in err.details() and remote.model_id in err.details() and "7" in err.details()
    floats = client.upload_dataset(data(20)[0], np.zeros(20, np.float32))  # float labels for a softmax
    err = fit_error(dataset_id=floats.dataset_id)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "softmax" in err.details()
    huge = data(20)[0].astype(np.float64)
    huge[3, 2] = 1e39  # finite in float64, Inf in the float32 model
    err = fit_error(dataset_id=client.upload_dataset(huge, data(20)[1]).dataset_id)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in err.details()
    good = client.upload_dataset(*data(20))
    err = fit_error(dataset_id=good.dataset_id, validation_dataset_id=wide.dataset_id)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "validation_dataset_id" in err.details()
    assert remote.step == 0


def test_data_set_limits_are_refused_naming_the_flag_and_the_new_rpcs_need_the_token(tmp_path):
    proc = ServerProcess(tmp_path / "g.db", "--max-dataset-mb", "0.01", "--max-datasets-mb", "0.015",
                         "--auth-token", "sesame")
    try:
        with Client(proc.target, timeout=30, token="sesame") as c:
            c.upload_dataset(*data(300))  # 300 * (24 + 8) bytes: under 0.01 MiB
            with pytest.raises(grpc.RpcError) as err:
                c.upload_dataset(*data(400, seed=1))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-dataset-mb" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                c.upload_dataset(*data(300, seed=2))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-datasets-mb" in err.value.details()
        with Client(proc.target, timeout=30) as anonymous:  # the streaming RPCs are guarded like the rest
            chunk = pb.DatasetChunk(inputs=encode_tensor(data(3)[0]), targets=encode_tensor(data(3)[1]))
            for call in (lambda: anonymous._stub.UploadDataset(iter([chunk])),
                         lambda: list(anonymous._stub.Fit(pb.FitRequest(model_id="m", dataset_id="d")))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert proc.stop() == 0


def test_an_upload_whose_chunks_disagree_is_refused_naming_the_field(client):
    X, y = data(10)
    chunks = [pb.DatasetChunk(inputs=encode_tensor(X[:5]), targets=encode_tensor(y[:5])),
              pb.DatasetChunk(inputs=encode_tensor(X[5:].astype(np.float64)), targets=encode_tensor(y[5:]))]
    with pytest.raises(grpc.RpcError) as err:
        client._stub.UploadDataset(iter(chunks))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("inputs:") and "chunk 1" in err.value.details()
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(grpc.RpcError) as err:
        client.upload_dataset(bad, y)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.value.details()


def test_early_stopping_restores_the_weights_of_the_best_validation_epoch(client):
    # random labels and a large learning rate: the validation loss gets worse after a few epochs
    X, y = data(64, seed=3)
    Xv, yv = data(64, seed=4)
    spec = dict(SPEC, optimizer={"name": "adam", "lr": 0.05})
    remote = client.create_model(**spec)
    history = remote.fit(X, y, epochs=40, batch_size=16, seed=1, validation_data=(Xv, yv), patience=3,
                         restore_best_weights=True, progress=False)
    epochs_run = len(history["val_loss"])
    best = int(np.argmin(history["val_loss"])) + 1
    assert best < epochs_run < 40  # stopped early, after the best epoch
    assert epochs_run == best + 3
    local = local_twin(remote)
    for epoch, Xb, yb in fit_batches(X, y, epochs=best, batch_size=16, seed=1):
        local.train_step(Xb, yb)
    assert_same_weights(remote.get_weights(), local.get_weights())
    assert remote.step == epochs_run * 4  # the optimizer's steps are kept; the weights are the best epoch's


def test_a_cancelled_fit_keeps_every_completed_step(client):
    X, y = data(20_000, seed=5)
    remote = client.create_model(**SPEC)
    dataset = client.upload_dataset(X, y)
    request = pb.FitRequest(model_id=remote.model_id, dataset_id=dataset.dataset_id, epochs=50, batch_size=4,
                            shuffle=True, seed=9, progress_every_steps=32)
    call = client._stub.Fit(request)
    reported = next(call).step
    call.cancel()
    time.sleep(0.5)
    stopped = remote.step
    time.sleep(0.3)
    assert remote.step == stopped >= reported  # stopped, and kept what it reported
    assert stopped < 50 * steps_per_epoch(len(X), 4)
    local = local_twin(remote)
    for _, Xb, yb in fit_batches(X, y, epochs=1, batch_size=4, seed=9):
        if local.step == stopped:
            break
        local.train_step(Xb, yb)
    assert_same_weights(remote.get_weights(), local.get_weights())


def test_other_models_train_and_predict_while_a_model_fits(client):
    X, y = data(20_000, seed=6)
    fitted, other = client.create_model(**SPEC), client.create_model(**SPEC)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (fitted.fit(X, y, epochs=2, batch_size=4, seed=1, progress=False),
                                              done.set()))
    thread.start()
    while fitted.step == 0:
        time.sleep(0.01)
    during = 0
    while not done.is_set() and during < 20:
        other.train_step(X[:8], y[:8])
        assert fitted.predict(X[:4]).shape == (4, 3)
        during += 1
    thread.join(120)
    assert done.is_set() and during > 0 and other.step == during


def test_a_non_finite_step_stops_the_fit_with_the_model_at_its_last_finite_step(client):
    # plain SGD with a learning rate far too large on a regression: the weights grow until float32 overflows
    spec = dict(input_size=4, hidden=[{"units": 8, "activation": "relu"}], output={"units": 1, "kind": "identity"},
                optimizer={"name": "sgd", "lr": 3.0}, seed=1)
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((64, 4)) * 3).astype(np.float32)
    y = rng.standard_normal((64, 1)).astype(np.float32)
    remote = client.create_model(**spec)
    with pytest.raises(grpc.RpcError) as err:
        remote.fit(X, y, epochs=50, batch_size=8, seed=2, progress=False)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    kept = remote.step
    assert kept > 0
    local = local_twin(remote)
    batches = fit_batches(X, y, epochs=50, batch_size=8, seed=2)
    for _, Xb, yb in batches:
        if local.step == kept:
            break
        local.train_step(Xb, yb)
    weights = remote.get_weights()
    assert all(np.isfinite(w).all() for w in weights.values())
    assert_same_weights(weights, local.get_weights())
    # and the next step of the schedule is indeed not finite
    try:
        local.train_step(Xb, yb)
        assert not all(np.isfinite(a).all() for a in local.state_dict().values())
    except NonFiniteError:
        pass


def test_sigkill_during_a_fit_then_restart_keeps_its_reported_steps_and_the_fit_continues(tmp_path):
    store = tmp_path / "g.db"
    flags = ("--durability", "step", "--checkpoint-steps", "40")
    X, y = data(40_000, seed=7)
    proc = ServerProcess(store, *flags)
    try:
        with Client(proc.target, timeout=30) as c:
            remote = c.create_model(**SPEC, model_id="fit")
            dataset = c.upload_dataset(X, y)
            request = pb.FitRequest(model_id="fit", dataset_id=dataset.dataset_id, epochs=3, batch_size=8,
                                    shuffle=True, seed=4, progress_every_steps=32, start_step=0)
            for progress in c._stub.Fit(request):
                if progress.step >= 300:
                    break
            reported = progress.step
            proc.kill()  # SIGKILL mid-Fit: the Fit's steps since were logged as runs, not batches
        proc = ServerProcess(store, *flags)
        with Client(proc.target, timeout=30) as c:
            assert c.get_dataset(dataset.dataset_id).rows == 40_000  # the data set survived
            remote = c.get_model("fit")
            recovered = remote.info.step
            assert re.search(r"event=model_loaded model_id=fit .* replayed=[1-9]", proc.log())  # runs replayed
            assert recovered >= reported
            total = 3 * steps_per_epoch(len(X), 8)
            assert recovered < total
            local = local_twin(remote)
            schedule = fit_batches(X, y, epochs=3, batch_size=8, seed=4)
            for _, Xb, yb in schedule:  # the in-process replay of the steps the server kept
                local.train_step(Xb, yb)
                if local.step == recovered:
                    break
            assert_same_weights(remote.get_weights(), local.get_weights())
            # the same Fit sent again (same start_step) continues where the model is, and says so
            msgs = list(c._stub.Fit(request))
            spe = steps_per_epoch(len(X), 8)
            assert recovered < msgs[0].step <= recovered + 32
            assert msgs[0].step == (msgs[0].epoch - 1) * spe + msgs[0].epoch_step
            assert msgs[-1].step == total and msgs[-1].epoch == 3 and msgs[-1].epoch_end
            for _, Xb, yb in schedule:
                local.train_step(Xb, yb)
            assert_same_weights(remote.get_weights(), local.get_weights())
    finally:
        assert proc.stop() == 0


def train_steps_total(server) -> float:
    import urllib.request
    url = re.search(r"event=metrics url=(\S+)", server.log()).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(r"^gradserve_train_steps_total (\S+)$", text, re.M).group(1))


def test_predict_during_a_fit_sees_whole_steps_only_and_steps_are_counted(server, client):
    X, y = data(2_000, seed=8)
    probe = X[:5]
    remote = client.create_model(**SPEC)
    before = train_steps_total(server)
    seen, done = [], threading.Event()
    # runs last ~50 ms or an epoch, whichever is less: six epochs give Predict several states to see
    thread = threading.Thread(target=lambda: (remote.fit(X, y, epochs=6, batch_size=4, seed=2, progress=False),
                                              done.set()))
    thread.start()
    while not done.is_set():
        seen.append(remote.predict(probe).tobytes())
    thread.join(120)
    assert done.is_set() and len(set(seen)) > 2  # predictions came from several states of the model
    local = local_twin(remote)
    states = {local.predict(probe).tobytes()}
    for _, Xb, yb in fit_batches(X, y, epochs=6, batch_size=4, seed=2):
        local.train_step(Xb, yb)
        states.add(local.predict(probe).tobytes())
    assert set(seen) <= states  # each one is the model after a whole number of steps
    assert train_steps_total(server) - before >= 1_000


def test_a_data_set_a_fit_trains_on_cannot_be_deleted_meanwhile(client):
    X, y = data(20_000, seed=9)
    remote = client.create_model(**SPEC)
    dataset = client.upload_dataset(X, y)
    call = client._stub.Fit(pb.FitRequest(model_id=remote.model_id, dataset_id=dataset.dataset_id, epochs=20,
                                          batch_size=4, progress_every_steps=32))
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        client.delete_dataset(dataset.dataset_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and dataset.dataset_id in err.value.details()
    call.cancel()
    deadline = time.monotonic() + 10
    while True:  # the Fit lets go of it at its next run boundary
        try:
            client.delete_dataset(dataset.dataset_id)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline
            time.sleep(0.05)
    assert dataset.dataset_id not in {d.dataset_id for d in client.list_datasets()}


def test_a_data_set_is_one_fsynced_file_beside_the_store_read_back_mapped(tmp_path):
    import json
    import sqlite3

    from gradserve.server.store import SqliteStore
    path = str(tmp_path / "s.db")
    X, y = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 0, 1])
    store = SqliteStore(path)
    store.put_dataset("ds1", "h1", "four rows", 1.0, {"inputs": [X[:1], X[1:]], "targets": [y[:3], y[3:]]})  # chunks
    assert (tmp_path / "s.db.datasets" / "ds1").stat().st_size == X.nbytes + y.nbytes
    (tmp_path / "s.db.datasets" / ".ds2.tmp").write_bytes(b"torn")  # a crash mid-write
    (tmp_path / "s.db.datasets" / "ds3").write_bytes(b"never committed")  # a crash before the row
    # a row of an older store, its bytes in SQLite
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO datasets (id, content_hash, name, created, nbytes, meta, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
               ("old", "h0", "", 0.5, X.nbytes, json.dumps([["inputs", "<f4", [4, 3]]]), X.tobytes()))
    db.close()
    store.close()
    store = SqliteStore(path)  # reopened: leftovers without a row are gone
    assert sorted(f.name for f in (tmp_path / "s.db.datasets").iterdir()) == ["ds1"]
    arrays = store.dataset_arrays("ds1")
    np.testing.assert_array_equal(arrays["inputs"], X)
    np.testing.assert_array_equal(arrays["targets"], y)
    assert not arrays["inputs"].flags.writeable
    np.testing.assert_array_equal(store.dataset_arrays("old")["inputs"], X)
    store.delete_dataset("ds1")
    assert store.dataset_arrays("ds1") is None and not (tmp_path / "s.db.datasets" / "ds1").exists()
    store.close()


def test_the_content_hash_of_row_chunks_is_that_of_their_concatenation():
    from gradserve.wire.dataset import content_hash
    rs = np.random.default_rng(2)
    X, y = rs.standard_normal((10, 3)).astype(np.float32), rs.integers(0, 4, 10)
    whole = content_hash(X, y)
    assert content_hash([X[:4], X[4:4], X[4:]], [y[:7], y[7:]]) == whole
    assert content_hash([X[:4], X[5:]], [y[:4], y[5:]]) != whole  # a row missing


def test_an_upload_is_cut_into_chunks_of_at_most_four_megabytes_in_row_order():
    from gradserve.client._fit import dataset_chunks
    from gradserve.wire.tensor import CHUNK_BYTES, decode_tensor
    rs = np.random.default_rng(4)
    X, y = rs.standard_normal((5000, 500)).astype(np.float32), rs.integers(0, 10, 5000)  # 10 MB
    chunks = list(dataset_chunks(X, y, 64 << 20))
    assert len(chunks) == 3 and all(c.ByteSize() <= CHUNK_BYTES + 1024 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([decode_tensor(c.inputs, "inputs") for c in chunks]), X)
    np.testing.assert_array_equal(np.concatenate([decode_tensor(c.targets, "targets") for c in chunks]), y)
    assert len(list(dataset_chunks(X, y, 2 << 20))) == 10  # a smaller message limit: half of it a chunk
