"""The service end to end: a real server (subprocess, free loopback port,
SQLite store) driven through the client library, checked against nnkernels
run in this process on the same spec and batches."""
import grpc
import numpy as np
import pytest

from gradserve.nnkernels import Model, ModelSpec, available_devices

SPEC = dict(input_size=6, hidden=[{"units": 16, "activation": "tanh"}, {"units": 8, "activation": "relu"}],
            output={"units": 3, "kind": "softmax"}, optimizer={"name": "adam", "lr": 0.01}, seed=7)


def batches(n_batches, rows=16, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((rows, features)).astype(np.float32), rng.integers(0, classes, rows))
            for _ in range(n_batches)]


def local_twin(remote):
    """An in-process Model with the remote model's full spec (same seed: same initial weights)."""
    return Model(ModelSpec.from_dict(remote.info.spec))


def assert_same_weights(remote, local):
    got = remote.get_weights()
    want = local.get_weights()
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_new_model_starts_from_the_same_weights_as_in_process(client):
    remote = client.create_model(**SPEC)
    assert remote.info.step == 0
    assert remote.info.num_params == 6 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    assert_same_weights(remote, local_twin(remote))


def test_train_step_fit_and_stream_give_bit_identical_weights_to_in_process(client):
    remote = client.create_model(**SPEC)
    local = local_twin(remote)
    data = batches(3)
    for X, y in data:  # unary TrainStep
        r = remote.train_step(X, y)
        l = local.train_step(X, y)
        assert (r.step, r.loss, r.accuracy, r.grad_norm, r.lr) == (l.step, l.loss, l.accuracy, l.grad_norm, l.lr)
    X = np.concatenate([b[0] for b in batches(5, seed=1)])
    y = np.concatenate([b[1] for b in batches(5, seed=1)])
    history = remote.fit(X, y, epochs=2, batch_size=16, shuffle=False, progress=False)
    for _ in range(2):
        for i in range(0, len(X), 16):
            local.train_step(X[i:i + 16], y[i:i + 16])
    assert len(history["loss"]) == 2 and len(history["accuracy"]) == 2
    results = list(remote.train_stream(batches(4, seed=2)))  # TrainStream directly
    for X, y in batches(4, seed=2):
        local.train_step(X, y)
    assert [r.step for r in results] == [14, 15, 16, 17]
    assert remote.step == local.step == 17
    assert_same_weights(remote, local)


def test_fit_shuffles_reproducibly_and_reports_validation_metrics(client):
    remote = client.create_model(**SPEC)
    local = local_twin(remote)
    X = np.concatenate([b[0] for b in batches(4, seed=3)])
    y = np.concatenate([b[1] for b in batches(4, seed=3)])
    history = remote.fit(X, y, epochs=2, batch_size=10, shuffle=True, seed=5, validation_data=(X, y),
                         progress=False)
    for epoch in range(2):  # the Fit schedule: numpy PCG64 seeded with [seed, epoch]
        order = np.random.Generator(np.random.PCG64([5, epoch])).permutation(len(X))
        for i in range(0, len(X), 10):
            local.train_step(X[order[i:i + 10]], y[order[i:i + 10]])
    assert_same_weights(remote, local)
    p = local.predict(X)
    assert history["val_accuracy"][-1] == pytest.approx(np.mean(p.argmax(1) == y))
    assert history["val_loss"][-1] == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])), rel=1e-5)


def test_gradients_equal_in_process_and_leave_weights_untouched(client):
    remote = client.create_model(**SPEC)
    local = local_twin(remote)
    X, y = batches(1)[0]
    remote.train_step(X, y)
    local.train_step(X, y)
    before = remote.get_weights()
    loss, grads = remote.gradients(X, y)
    want_loss, want = local.gradients(X, y)
    assert loss == want_loss
    assert grads.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(grads[name], want[name], err_msg=name)
    after = remote.get_weights()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert remote.step == 1


@pytest.mark.parametrize("rows", [1, 10_000])
def test_predict_equals_in_process(client, rows):
    remote = client.create_model(**SPEC)
    local = local_twin(remote)
    remote.train_step(*batches(1)[0])
    local.train_step(*batches(1)[0])
    X = np.random.default_rng(rows).standard_normal((rows, 6)).astype(np.float32)
    np.testing.assert_array_equal(remote.predict(X), local.predict(X))
    np.testing.assert_array_equal(remote.predict(X, logits=True), local.predict(X, logits=True))


def test_predict_splits_batches_above_the_message_limit(client):
    spec = dict(input_size=784, hidden=[{"units": 32}], output={"units": 10, "kind": "softmax"}, seed=1)
    remote = client.create_model(**spec)
    X = np.random.default_rng(0).standard_normal((10_000, 784)).astype(np.float32)  # 31 MB > 8 MB limit
    # chunks are products of other shapes, so BLAS may round differently: close, not bit-equal
    np.testing.assert_allclose(remote.predict(X), local_twin(remote).predict(X), rtol=1e-5, atol=1e-7)


def test_set_weights_replaces_parameters_and_keeps_step(client):
    remote = client.create_model(**SPEC)
    remote.train_step(*batches(1)[0])
    weights = {k: np.full_like(v, 0.01) for k, v in remote.get_weights().items()}
    remote.set_weights(weights)
    assert remote.info.step == 1
    for name, w in remote.get_weights().items():
        np.testing.assert_array_equal(w, weights[name])


def test_list_get_save_and_delete(client):
    remote = client.create_model(**SPEC, model_id="listed-model")
    assert "listed-model" in [m.model_id for m in client.list_models()]
    assert client.get_model("listed-model").info.spec == remote.info.spec
    remote.train_step(*batches(1)[0])
    assert remote.save() == 1
    remote.delete()
    with pytest.raises(grpc.RpcError) as err:
        client.get_model("listed-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "listed-model" in err.value.details()


def test_create_with_same_id_and_spec_is_idempotent_and_different_spec_is_refused(client):
    a = client.create_model(**SPEC, model_id="idem")
    a.train_step(*batches(1)[0])
    b = client.create_model(**SPEC, model_id="idem")
    assert b.info.step == 1
    with pytest.raises(grpc.RpcError) as err:
        client.create_model(**{**SPEC, "seed": 8}, model_id="idem")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_health_is_serving(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradserve.v1.Trainer"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert "threading_layer=" in server.log() and "event=kernels_warm seconds=" in server.log()


def test_reflection_lists_the_trainer_and_all_its_methods(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "gradserve.v1.Trainer" in db.get_services()
        service = DescriptorPool(db).FindServiceByName("gradserve.v1.Trainer")
        assert {m.name for m in service.methods} == {
            "CreateModel", "TrainStep", "Predict", "GetGradients", "GetModel", "ListModels", "DeleteModel",
            "GetWeights", "SetWeights", "SaveModel", "TrainStream",
            "SetOptimizer", "SaveCheckpoint", "ListCheckpoints", "RestoreCheckpoint",
            "ApplyGradients", "AccumulateGradients", "OptimizerStep",
            "GetWeightsChunks", "SetWeightsChunks", "GetGradientsChunks",
            "UploadDataset", "ListDatasets", "GetDataset", "DeleteDataset", "Fit"}


def test_prometheus_metrics_count_calls_steps_and_models(server, client):
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    remote = client.create_model(**SPEC)
    remote.train_step(*batches(1)[0])
    remote.fit(*batches(1)[0], epochs=1, batch_size=8, progress=False)  # UploadDataset and Fit: one-sided streams
    with pytest.raises(grpc.RpcError):
        client.get_model("not-there")
    url = re.search(r"event=metrics url=(\S+)", server.log()).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("gradserve_requests_total", (("code", "OK"), ("method", "TrainStep")))] >= 1
    assert samples[("gradserve_request_seconds_count", (("method", "CreateModel"),))] >= 1
    assert samples[("gradserve_requests_total", (("code", "NOT_FOUND"), ("method", "GetModel")))] >= 1
    assert samples[("gradserve_train_steps_total", ())] >= 1
    assert samples[("gradserve_requests_total", (("code", "OK"), ("method", "Fit")))] >= 1
    assert samples[("gradserve_requests_total", (("code", "OK"), ("method", "UploadDataset")))] >= 1
    assert samples[("gradserve_models", ())] >= 1
    # the shared server runs step durability: the step above was logged and synced
    assert samples[("gradserve_durability_log_records_total", ())] >= 1
    assert samples[("gradserve_durability_log_fsyncs_total", ())] >= 1
    assert samples[("gradserve_durability_log_bytes_total", ())] > 0


@pytest.mark.skipif("cuda" in available_devices(), reason="a GPU is usable here: cuda is a valid default")
def test_server_asked_for_an_unusable_default_device_refuses_to_start(tmp_path):
    from service_fixtures import ServerProcess
    with pytest.raises(RuntimeError) as refused:
        ServerProcess(tmp_path / "gradserve.db", "--default-device", "cuda", startup_timeout=120)
    message = str(refused.value)
    assert "exited with" in message and "--default-device 'cuda' is not usable here" in message
