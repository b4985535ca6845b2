"""The Open Inference Protocol (KServe V2, Triton's dialect), called with
Triton's own client (``tritonclient[grpc]``, sync and asyncio) against a
live gradserve; dynamic batching seen through real concurrent callers and
through /metrics, parsed with prometheus_client's own parser.

Rows computed in a batch with other callers' rows may differ from the same
rows computed alone in the last bits (BLAS blocks its products by the
batch's row count), so batched results are compared with a tolerance of a
few float32 ulps; any mix-up of callers' rows would be far outside it.

This module never imports ``gradserve.inference``: tritonclient registers
the same proto names, and both cannot live in one process."""
import asyncio
import re
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from concurrency import concurrently
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gradserve.client import Client
from service_fixtures import ServerProcess

SPEC = dict(input_size=6, hidden=[{"units": 8, "activation": "tanh"}], output={"units": 3, "kind": "softmax"},
            seed=3)


@pytest.fixture(scope="module")
def model(server):  # noqa: F811
    with Client(server.target, timeout=120) as c:
        yield c.create_model(**SPEC)


@pytest.fixture
def triton_client(server):  # noqa: F811
    with triton.InferenceServerClient(server.target) as c:
        yield c


def infer_input(X, name="inputs"):
    tensor = triton.InferInput(name, list(X.shape), "FP32" if X.dtype == np.float32 else "FP64")
    tensor.set_data_from_numpy(X)
    return tensor


def rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, SPEC["input_size"])).astype(np.float32)


def assert_same_rows(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_server_and_model_report_live_ready_and_their_metadata(triton_client, model):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(model.model_id)
    assert not triton_client.is_model_ready("no-such-model")
    meta = triton_client.get_model_metadata(model.model_id, as_json=True)
    assert meta["name"] == model.model_id and meta["versions"] == [str(model.step)]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("inputs", "FP32", ["-1", "6"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("outputs", "FP32", ["-1", "3"])]
    server_meta = triton_client.get_server_metadata(as_json=True)
    assert server_meta["name"] == "gradserve" and "statistics" in server_meta["extensions"]


def test_reflection_lists_the_inference_service_beside_the_trainer(server):  # noqa: F811
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"inference.GRPCInferenceService", "gradserve.v1.Trainer"} <= set(services)


def test_model_config_carries_max_batch_size_and_dims_without_the_batch_dimension(triton_client, model):
    config = triton_client.get_model_config(model.model_id, as_json=True)["config"]
    assert config["name"] == model.model_id
    assert int(config["max_batch_size"]) == 20000  # the shared server's --max-batch-rows
    assert config["input"][0]["name"] == "inputs" and config["input"][0]["dims"] == ["6"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][0]["dims"] == ["3"]
    assert "dynamic_batching" in config


def test_infer_returns_the_outputs_of_gradserve_predict(triton_client, model):
    X = rows(5)
    result = triton_client.infer(model.model_id, [infer_input(X)],
                                 outputs=[triton.InferRequestedOutput("outputs")])
    np.testing.assert_array_equal(result.as_numpy("outputs"), model.predict(X))
    response = result.get_response()
    assert response.model_name == model.model_id and response.model_version == str(model.step)
    logits = triton_client.infer(model.model_id, [infer_input(X)], parameters={"logits": True})
    np.testing.assert_array_equal(logits.as_numpy("outputs"), model.predict(X, logits=True))


def test_float64_inputs_are_accepted_by_a_float32_model(triton_client, model):
    X = rows(2).astype(np.float64)
    out = triton_client.infer(model.model_id, [infer_input(X)]).as_numpy("outputs")
    np.testing.assert_array_equal(out, model.predict(X.astype(np.float32)))


def test_typed_contents_inputs_give_the_same_outputs_as_raw(server, model):  # noqa: F811
    X = rows(3, seed=4)
    request = service_pb2.ModelInferRequest(model_name=model.model_id)
    tensor = request.inputs.add(name="inputs", datatype="FP32", shape=list(X.shape))
    tensor.contents.fp32_contents.extend(X.ravel().tolist())
    with grpc.insecure_channel(server.target) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert len(reply.raw_output_contents) == 1 and list(reply.outputs[0].shape) == [3, 3]
    out = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 3)
    np.testing.assert_array_equal(out, model.predict(X))


@pytest.mark.parametrize("mutate, code, message", [
    (lambda X: X[:, :4], "INVALID_ARGUMENT", "inputs: has 4 columns, the model takes 6"),
    (lambda X: np.where(X > 0, np.nan, X).astype(np.float32), "INVALID_ARGUMENT", "contains NaN or Inf"),
])
def test_bad_inputs_are_refused_with_the_field_named(triton_client, model, mutate, code, message):
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer(model.model_id, [infer_input(np.ascontiguousarray(mutate(rows(2))))])
    assert refused.value.status() == f"StatusCode.{code}" and message in refused.value.message()


def test_unknown_model_input_name_and_version_are_refused(triton_client, model):
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("no-such-model", [infer_input(rows(1))])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as wrong_name:
        triton_client.infer(model.model_id, [infer_input(rows(1), name="INPUT__0")])
    assert "inputs[0].name" in wrong_name.value.message()
    with pytest.raises(InferenceServerException) as wrong_version:
        triton_client.infer(model.model_id, [infer_input(rows(1))], model_version="999")
    assert wrong_version.value.status() == "StatusCode.NOT_FOUND" and "version" in wrong_version.value.message()
    current = triton_client.infer(model.model_id, [infer_input(rows(1))], model_version=str(model.step))
    assert current.as_numpy("outputs").shape == (1, 3)


def test_asyncio_client_checks_readiness_and_infers(server, model):  # noqa: F811
    X = rows(4, seed=9)

    async def go():
        async with triton_aio.InferenceServerClient(server.target) as c:
            assert await c.is_server_live()
            assert await c.is_model_ready(model.model_id)
            meta = await c.get_model_metadata(model.model_id, as_json=True)
            results = await asyncio.gather(*(c.infer(model.model_id, [infer_input(X)]) for _ in range(4)))
            return meta, [r.as_numpy("outputs") for r in results]

    meta, outputs = asyncio.run(go())
    assert meta["inputs"][0]["shape"] == ["-1", "6"]
    for out in outputs:  # the four calls may have shared a batch
        assert_same_rows(out, model.predict(X))


def test_model_statistics_count_inferences_and_executions(triton_client, client):  # noqa: F811
    fresh = client.create_model(**SPEC)
    for n in (1, 2, 3):
        triton_client.infer(fresh.model_id, [infer_input(rows(n))])
    stats = triton_client.get_inference_statistics(fresh.model_id, as_json=True)["model_stats"][0]
    assert stats["name"] == fresh.model_id
    assert int(stats["inference_count"]) == 6 and int(stats["execution_count"]) == 3
    assert int(stats["inference_stats"]["success"]["count"]) == 3
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0


def test_a_deleted_models_series_leave_metrics(server, triton_client):  # noqa: F811
    with Client(server.target, timeout=60) as c:
        doomed = c.create_model(**SPEC)
        triton_client.infer(doomed.model_id, [infer_input(rows(2))])
        label = (("model", doomed.model_id),)
        assert scrape(server)[("gradserve_inference_count_total", label)] == 2
        doomed.delete()
    samples = scrape(server)
    assert not [key for key in samples if ("model", doomed.model_id) in key[1]]


# -- dynamic batching, on a private server whose queue delay makes coalescing certain

TOKEN = "batching-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("batching") / "gradserve.db", "--metrics-port", "0",
                         "--max-queue-delay-us", "300000", "--preferred-batch-sizes", "16",
                         "--auth-token", TOKEN, "--workers", "20")
    yield proc
    proc.stop()


def scrape(proc) -> dict:
    url = re.search(r"event=metrics url=(\S+)", proc.log()).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_sixteen_concurrent_callers_each_get_their_own_rows_from_fewer_kernel_calls(batching_server):
    with Client(batching_server.target, token=TOKEN, timeout=60) as c:
        remote = c.create_model(**SPEC)
        inputs = [rows(1, seed=100 + i) for i in range(16)]
        expected = [remote.predict(x) for x in inputs]  # one by one: batches of one
        before = scrape(batching_server)
        outputs = concurrently(16, lambda i: remote.predict(inputs[i]))
        after = scrape(batching_server)
    for i in range(16):
        assert_same_rows(outputs[i], expected[i])
    label = (("model", remote.model_id),)
    inferences = after[("gradserve_inference_count_total", label)] - before[("gradserve_inference_count_total", label)]
    executions = (after[("gradserve_inference_exec_count_total", label)]
                  - before[("gradserve_inference_exec_count_total", label)])
    assert inferences == 16
    assert executions < inferences  # coalesced: 16 rows in fewer kernel calls
    assert after[("gradserve_inference_request_success_total", label)] == 32
    assert after[("gradserve_inference_queue_duration_us_total", label)] > 0
    assert after[("gradserve_inference_compute_infer_duration_us_total", label)] > 0
    assert after[("gradserve_inference_pending_request_count", label)] == 0
    assert after[("gradserve_requests_in_flight", (("method", "Predict"),))] >= 0
    assert after[("gradserve_models", ())] >= 1


def test_one_callers_bad_rows_never_fail_the_others_batch(batching_server):
    with Client(batching_server.target, token=TOKEN, timeout=60) as c:
        remote = c.create_model(**SPEC)
        inputs = [rows(2, seed=200 + i) for i in range(8)]
        inputs[3] = np.full((2, 6), np.inf, np.float32)
        results = concurrently(8, lambda i: remote.predict(inputs[i]))
    assert isinstance(results[3], grpc.RpcError) and results[3].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(r, np.ndarray) and r.shape == (2, 3) for i, r in enumerate(results) if i != 3)


def test_a_caller_whose_deadline_passes_in_the_queue_gets_deadline_exceeded(batching_server):
    with Client(batching_server.target, token=TOKEN, timeout=60, retries=0) as c:
        remote = c.create_model(**SPEC)
        with pytest.raises(grpc.RpcError) as late:
            remote.predict(rows(1), timeout=0.05)  # the queue waits up to 300 ms for 16 rows
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert remote.predict(rows(1)).shape == (1, 3)  # the queue serves on
    after = scrape(batching_server)
    label = (("model", remote.model_id),)
    assert after[("gradserve_inference_pending_request_count", label)] == 0
    assert after[("gradserve_inference_exec_count_total", label)] == 1  # the late call left without computing
    assert after[("gradserve_inference_count_total", label)] == 1


def test_v2_and_predict_calls_share_batches_and_need_the_token(batching_server):
    with Client(batching_server.target, token=TOKEN, timeout=60) as c:
        remote = c.create_model(**SPEC)
        X = rows(1, seed=7)
        with triton.InferenceServerClient(batching_server.target) as t:
            assert t.is_server_live()  # probes stay open
            with pytest.raises(InferenceServerException) as refused:
                t.infer(remote.model_id, [infer_input(X)])
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            before = scrape(batching_server)
            results = concurrently(8, lambda i: t.infer(remote.model_id, [infer_input(X)], headers=AUTH)
                                   .as_numpy("outputs") if i % 2 else remote.predict(X))
        after = scrape(batching_server)
    for r in results:
        assert_same_rows(r, results[0])
    label = (("model", remote.model_id),)
    assert after[("gradserve_inference_exec_count_total", label)] - before.get(
        ("gradserve_inference_exec_count_total", label), 0) < 8
