"""Hostile callers against a real server: malformed tensors and ids get
INVALID_ARGUMENT naming the field (never INTERNAL), unparseable bytes get
INVALID_ARGUMENT naming the method (and do not break shutdown), idle
streams cannot starve unary calls or health, and the client's create and
delete are safe to retry."""
import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from gradserve.client import AsyncClient, Client
from gradserve.v1 import trainer_pb2 as pb
from gradserve.v1 import trainer_pb2_grpc as pb_grpc
from gradserve.wire.tensor import encode_tensor
from service_fixtures import ServerProcess

SPEC = dict(input_size=4, hidden=[{"units": 8, "activation": "relu"}], output={"units": 3, "kind": "softmax"},
            optimizer={"name": "sgd", "lr": 0.1}, seed=3)
UNPARSEABLE = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # field 1, a length varint over 10 bytes


def code_and_details(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TrainerStub(channel)


@pytest.fixture
def model(client):
    return client.create_model(**SPEC)


def tensor(shape, dtype=np.float32, data=None):
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32 if dtype == np.float32 else pb.DATA_TYPE_INT64)
    t.shape[:] = shape
    t.data = data if data is not None else b""
    return t


BAD_INPUTS = {
    "0-d": tensor([], data=b"\0" * 4),
    "1-D": tensor([4], data=b"\0" * 16),
    "huge empty axis": tensor([2**40, 0]),
    "65 axes": tensor([1] * 65, data=b"\0" * 4),
    "huge zero-size": tensor([2**62, 2**62, 0]),
    "missing": None,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_malformed_inputs_are_invalid_argument_naming_inputs(stub, model, case):
    y = encode_tensor(np.zeros(1, np.int64))
    calls = {
        "TrainStep": lambda req: stub.TrainStep(req, timeout=10),
        "TrainStream": lambda req: list(stub.TrainStream(iter([req]), timeout=10)),
        "GetGradients": lambda req: stub.GetGradients(pb.GetGradientsRequest(
            model_id=req.model_id, inputs=req.inputs, targets=req.targets), timeout=10),
        "Predict": lambda req: stub.Predict(pb.PredictRequest(model_id=req.model_id, inputs=req.inputs), timeout=10),
    }
    for method, call in calls.items():
        req = pb.TrainStepRequest(model_id=model.model_id, targets=y)
        if BAD_INPUTS[case] is not None:
            req.inputs.CopyFrom(BAD_INPUTS[case])
        code, details = code_and_details(call, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
        assert details.startswith("inputs:"), (method, details)
    assert model.refresh().step == 0


def test_missing_targets_are_named(stub, model):
    req = pb.TrainStepRequest(model_id=model.model_id, inputs=encode_tensor(np.zeros((1, 4), np.float32)))
    code, details = code_and_details(stub.TrainStep, req, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("targets: is required"), details


@pytest.mark.parametrize("init, field", [
    ({"name": "uniform", "a": -1e308, "b": 1e308}, "weight_init.b"),
    ({"name": "xavier_uniform", "gain": 1e308}, "weight_init.gain"),
    ({"name": "xavier_normal", "gain": -1e308}, "weight_init.gain"),
])
def test_overflowing_initializer_bounds_are_refused_naming_the_field(client, init, field):
    with pytest.raises(grpc.RpcError) as info:
        client.create_model(**SPEC, weight_init=init)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()


@pytest.mark.parametrize("bad_id", ["abc\n", "a b", "x" * 129, "é", "x" * 16384])
def test_ids_are_fully_validated_on_every_rpc_and_not_echoed_whole(stub, bad_id):
    requests = {
        "CreateModel": pb.CreateModelRequest(model_id=bad_id, spec=pb.ModelSpec(input_size=2)),
        "GetModel": pb.GetModelRequest(model_id=bad_id),
        "DeleteModel": pb.DeleteModelRequest(model_id=bad_id),
        "GetWeights": pb.GetWeightsRequest(model_id=bad_id),
        "SaveModel": pb.SaveModelRequest(model_id=bad_id),
        "Predict": pb.PredictRequest(model_id=bad_id),
    }
    for method, req in requests.items():
        code, details = code_and_details(getattr(stub, method), req, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
        assert details.startswith("model_id:") and len(details) < 300, (method, details[:300])


def test_an_empty_id_is_required_except_on_create(stub):
    code, details = code_and_details(stub.GetModel, pb.GetModelRequest(), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "model_id: is required"


# The V2 methods gradserve serves (all unary; each takes inference.<Method>Request). The
# generated module is not imported here: tritonclient, which other test modules load
# into this process, registers the same proto names.
V2_METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
              "ModelStatistics", "ModelInfer")


def test_unparseable_bytes_are_invalid_argument_naming_the_method_on_every_rpc(server):
    methods = []  # (path, client streaming, server streaming, request type)
    for desc in (pb.DESCRIPTOR.services_by_name["Trainer"], health_pb2.DESCRIPTOR.services_by_name["Health"],
                 reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]):
        methods += [(f"/{desc.full_name}/{m.name}", m.client_streaming, m.server_streaming, m.input_type.full_name)
                    for m in desc.methods]
    methods += [(f"/inference.GRPCInferenceService/{name}", False, False, f"inference.{name}Request")
                for name in V2_METHODS]
    with grpc.insecure_channel(server.target) as channel:
        for path, client_streaming, server_streaming, request_type in methods:
            if client_streaming:
                call = channel.stream_stream(path)
                code, details = code_and_details(lambda: list(call(iter([UNPARSEABLE]), timeout=10)))
            elif server_streaming:
                call = channel.unary_stream(path)
                code, details = code_and_details(lambda: list(call(UNPARSEABLE, timeout=10)))
            else:
                code, details = code_and_details(channel.unary_unary(path), UNPARSEABLE, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, code, details)
            assert path.rsplit("/", 1)[1] in details and request_type in details, details
        # a V2 method gradserve does not serve stays UNIMPLEMENTED
        code, _ = code_and_details(lambda: list(channel.stream_stream("/inference.GRPCInferenceService/"
                                                                      "ModelStreamInfer")(iter([b""]), timeout=10)))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        # the server still serves
        assert pb_grpc.TrainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=10) is not None


def test_sigterm_after_an_unparseable_stream_exits_in_grace_and_checkpoints(tmp_path):
    proc = ServerProcess(tmp_path / "s.db", "--durability", "interval", "--checkpoint-steps", "100000",
                         "--checkpoint-seconds", "100000", "--grace-s", "3")
    try:
        with Client(proc.target, timeout=30) as c:
            m = c.create_model(**SPEC, model_id="kept")
            X, y = np.ones((5, 4), np.float32), np.zeros(5, np.int64)
            for _ in range(3):
                m.train_step(X, y)
        with grpc.insecure_channel(proc.target) as channel:
            stream = channel.stream_stream(f"/{pb.DESCRIPTOR.services_by_name['Trainer'].full_name}/TrainStream")
            code, _ = code_and_details(lambda: list(stream(iter([UNPARSEABLE]), timeout=10)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        start = time.monotonic()
        assert proc.stop(timeout=30) == 0
        assert time.monotonic() - start < 3 + 5, "shutdown took longer than the grace period"
        assert "event=checkpointed" in proc.log()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    again = ServerProcess(tmp_path / "s.db")
    try:
        with Client(again.target, timeout=30) as c:
            assert c.get_model("kept").step == 3  # acknowledged steps survived (interval durability)
    finally:
        again.stop()


def test_idle_streams_do_not_starve_unary_calls_or_health(tmp_path):
    proc = ServerProcess(tmp_path / "s.db", "--durability", "none", "--workers", "2", "--max-streams", "2")
    stop = threading.Event()

    def idle_requests():
        stop.wait()
        return
        yield  # a generator that sends nothing until the test ends

    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.TrainerStub(channel)
            streams = [stub.TrainStream(idle_requests(), timeout=60) for _ in range(2)]
            time.sleep(1.0)  # both streams are open on the server
            start = time.monotonic()
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - start < 2.0
            # a stream over the budget is refused, naming the flag
            code, details = code_and_details(lambda: list(stub.TrainStream(idle_requests(), timeout=10)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in details, details
            stop.set()
            for s in streams:
                assert list(s) == []
    finally:
        stop.set()
        proc.stop()


def test_an_idle_stream_is_cancelled_after_stream_idle_s(tmp_path):
    proc = ServerProcess(tmp_path / "s.db", "--durability", "none", "--stream-idle-s", "1")
    stop = threading.Event()

    def idle_requests():
        stop.wait(30)
        return
        yield

    try:
        with grpc.insecure_channel(proc.target) as channel:
            start = time.monotonic()
            stream = pb_grpc.TrainerStub(channel).TrainStream(idle_requests(), timeout=30)
            code, _ = code_and_details(lambda: list(stream))
            assert code == grpc.StatusCode.CANCELLED
            assert time.monotonic() - start < 10
            assert "event=stream_idle_cancelled" in proc.log()
    finally:
        stop.set()
        proc.stop()


class LostReply(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection lost after the server received the call"


def lose_first_reply(client, method):
    """The first ``method`` call reaches the server but its reply is lost."""
    real = getattr(client._stub, method)
    calls = []

    def flaky(request, **kwargs):
        calls.append(request)
        reply = real(request, **kwargs)
        if len(calls) == 1:
            raise LostReply()
        return reply
    setattr(client._stub, method, flaky)
    return calls


def test_a_retried_create_without_an_id_makes_one_model(server):
    with Client(server.target, timeout=30, backoff=0.01) as c:
        before = {m.model_id for m in c.list_models()}
        calls = lose_first_reply(c, "CreateModel")
        m = c.create_model(**SPEC)
        assert len(calls) == 2 and calls[0].model_id == calls[1].model_id == m.model_id
        assert {x.model_id for x in c.list_models()} - before == {m.model_id}


def test_a_retried_delete_that_already_happened_succeeds(server):
    with Client(server.target, timeout=30, backoff=0.01) as c:
        m = c.create_model(**SPEC)
        calls = lose_first_reply(c, "DeleteModel")
        c.delete_model(m.model_id)
        assert len(calls) == 2
        with pytest.raises(grpc.RpcError) as info:
            c.delete_model(m.model_id)  # a first attempt's NOT_FOUND is still an error
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_spec_whose_activations_would_not_fit_is_refused_naming_max_memory_mb(client):
    # 900,001 parameters (under the shared server's --max-params 1000000), but
    # 300,001 activations per row x --max-batch-rows 20000 rows of workspace
    with pytest.raises(grpc.RpcError) as info:
        client.create_model(input_size=1, hidden=[{"units": 300_000}], output={"units": 1, "kind": "identity"})
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-memory-mb" in info.value.details()


def test_the_memory_budget_counts_every_model_and_frees_on_delete(tmp_path):
    proc = ServerProcess(tmp_path / "s.db", "--durability", "none", "--max-memory-mb", "64",
                         "--max-batch-rows", "1000")
    spec = dict(input_size=100, hidden=[{"units": 1000}], output={"units": 10, "kind": "identity"})
    try:
        with Client(proc.target, timeout=30) as c:
            first, _ = c.create_model(**spec), c.create_model(**spec)  # about 29 MiB each at worst
            with pytest.raises(grpc.RpcError) as info:
                c.create_model(**spec)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-memory-mb" in info.value.details() and "max_memory_mb=64" in info.value.details()
            assert c.create_model(**spec, model_id=first.model_id).model_id == first.model_id  # idempotent: no check
            first.delete()
            c.create_model(**spec)
            assert len(c.list_models()) == 2
    finally:
        proc.stop()


def test_predict_is_refused_before_computing_a_reply_over_the_message_limit(client):
    model = client.create_model(input_size=1, output={"units": 1000, "kind": "identity"})
    X = np.zeros((20000, 1), np.float32)  # 80 KB in, 80 MB out: over the shared server's 8 MiB
    req = pb.PredictRequest(model_id=model.model_id, inputs=encode_tensor(X))
    code, details = code_and_details(client._stub.Predict, req, timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the reply would have bytes: 80000064" in details, details


def test_the_token_can_come_from_a_file_and_stays_out_of_the_process_list(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    proc = ServerProcess(tmp_path / "s.db", "--durability", "none", "--auth-token-file", str(token_file))
    try:
        assert b"s3cret-token" not in open(f"/proc/{proc.proc.pid}/cmdline", "rb").read()
        with Client(proc.target, timeout=10, token="s3cret-token") as c:
            assert c.list_models() == []
        with Client(proc.target, timeout=10, token="wrong") as c:
            with pytest.raises(grpc.RpcError) as info:
                c.list_models()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "event=auth_token_in_argv" not in proc.log()
    finally:
        proc.stop()
    proc = ServerProcess(tmp_path / "t.db", "--durability", "none", "--auth-token", "in-argv")
    try:
        assert "event=auth_token_in_argv" in proc.log()
    finally:
        proc.stop()


def test_the_client_warns_before_sending_a_token_in_plaintext_off_the_machine():
    with pytest.warns(UserWarning, match="plaintext to 10.1.2.3:50051"):
        Client("10.1.2.3:50051", token="t").close()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client("127.0.0.1:50051", token="t").close()
        Client("[::1]:50051", token="t").close()


def test_a_20m_parameter_model_moves_in_chunks(tmp_path):
    """Over the message limit (8 MiB here; 80 MB of float32 parameters),
    get_weights, set_weights and gradients go through the chunked RPCs."""
    proc = ServerProcess(tmp_path / "s.db", "--durability", "none", "--max-params", "25000000",
                         "--max-message-mb", "8", "--max-batch-rows", "16")
    try:
        with Client(proc.target, timeout=120, max_message_mb=8) as c:
            m = c.create_model(input_size=2000, hidden=[{"units": 10000, "activation": "relu"}],
                               output={"units": 10, "kind": "softmax"}, seed=5)
            assert m.info.num_params == 20_110_010
            with pytest.raises(grpc.RpcError) as info:  # the unary RPC cannot carry it
                c._stub.GetWeights(pb.GetWeightsRequest(model_id=m.model_id), timeout=60)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            weights = m.get_weights()
            assert sum(w.size for w in weights.values()) == 20_110_010
            halved = {name: w * np.float32(0.5) for name, w in weights.items()}
            m.set_weights(halved)
            for name, w in m.get_weights().items():
                np.testing.assert_array_equal(w, halved[name], err_msg=name)
            X = np.random.default_rng(0).standard_normal((4, 2000)).astype(np.float32)
            loss, grads = m.gradients(X, np.array([0, 1, 2, 3]))
            assert np.isfinite(loss) and {n: g.shape for n, g in grads.items()} == \
                {n: w.shape for n, w in weights.items()}
            # a chunk naming no parameter, or at the wrong place, is refused before anything is allocated
            bad = pb.TensorChunk(model_id=m.model_id, name="layers.0.weight", dtype=pb.DATA_TYPE_FLOAT32,
                                 shape=[10000, 2000], offset=4, data=b"\0" * 4)
            code, details = code_and_details(lambda: c._stub.SetWeightsChunks(iter([bad]), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected the next one at byte 0" in details
            bad = pb.TensorChunk(model_id=m.model_id, name="nope", dtype=pb.DATA_TYPE_FLOAT32, shape=[2**30])
            code, details = code_and_details(lambda: c._stub.SetWeightsChunks(iter([bad]), timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "'nope' is not one of" in details
            for name, w in m.get_weights().items():  # refused streams changed nothing
                np.testing.assert_array_equal(w, halved[name], err_msg=name)


        async def through_asyncio():  # the asyncio client switches to chunks the same way
            async with AsyncClient(proc.target, timeout=120, max_message_mb=8) as ac:
                am = await ac.get_model(m.model_id)
                await am.set_weights(weights)
                got = await am.get_weights()
                loss_async, _ = await am.gradients(X, np.array([0, 1, 2, 3]))
                return got, loss_async
        got, _ = asyncio.run(through_asyncio())
        for name, w in got.items():
            np.testing.assert_array_equal(w, weights[name], err_msg=name)
    finally:
        proc.stop()


def test_v2_model_names_are_validated_too(server):
    """ModelReady's name (field 1) and ModelInfer's model_name (field 1), as
    raw bytes: the V2 messages are not imported here (see V2_METHODS)."""
    with grpc.insecure_channel(server.target) as channel:
        for method in ("ModelReady", "ModelMetadata", "ModelInfer"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            for bad in (b"abc\n", b"x" * 16384):
                code, details = code_and_details(call, b"\x0a" + encode_varint(len(bad)) + bad, timeout=10)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300, (method, details[:300])
        # ModelStatistics without a name: every model's statistics
        channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")(b"", timeout=10)


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
