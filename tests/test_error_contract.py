"""The error contract: every RPC, unary or stream, turns an unexpected
exception into INTERNAL with a logged traceback (never INVALID_ARGUMENT);
a call refused before touching any model carries the wire's retry-safe
trailer; clients retry a TrainStep only on that trailer."""
import asyncio
import collections
import inspect
import logging
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from test_service_units import Aborted, FakeContext

from gradserve.client import AsyncClient, Client
from gradserve.server import app
from gradserve.server.limits import Limits
from gradserve.server.registry import Durability, ModelRegistry
from gradserve.server.servicer import TrainerServicer
from gradserve.server.store import SqliteStore
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.dataset import content_hash
from gradserve.wire.specmsg import spec_to_message
from gradserve.wire.status import RETRY_SAFE_KEY, is_retry_safe, mark_retry_safe
from gradserve.wire.tensor import encode_tensor, tensor_chunks

SPEC = {"input_size": 3, "hidden": [{"units": 4}], "output": {"units": 2, "kind": "softmax"}, "seed": 1}
X = np.ones((2, 3), np.float32)
Y = np.array([0, 1])
DATASET_ID = "ds-" + content_hash(X, Y.astype(np.int64))[:32]
RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["Trainer"].methods]


def train_request(model_id, X=X, Y=Y):
    return pb.TrainStepRequest(model_id=model_id, inputs=encode_tensor(X), targets=encode_tensor(Y))


def calls(model_id):
    """RPC -> (the registry method it reaches, a valid request)."""
    create = pb.CreateModelRequest()
    spec_to_message(SPEC, create.spec)
    set_weights = pb.SetWeightsRequest(model_id=model_id)
    apply_gradients = pb.ApplyGradientsRequest(model_id=model_id)
    for name, shape in [("layers.0.weight", (4, 3)), ("layers.0.bias", (4,)), ("layers.1.weight", (2, 4)),
                        ("layers.1.bias", (2,))]:
        set_weights.weights.add(name=name, tensor=encode_tensor(np.zeros(shape, np.float32)))
        apply_gradients.gradients.add(name=name, tensor=encode_tensor(np.ones(shape, np.float32)))
    return {
        "CreateModel": ("create", create),
        "TrainStep": ("train_step", train_request(model_id)),
        "TrainStream": ("train_step", iter([train_request(model_id)])),
        "Predict": ("predict", pb.PredictRequest(model_id=model_id, inputs=encode_tensor(X))),
        "GetGradients": ("gradients", pb.GetGradientsRequest(model_id=model_id, inputs=encode_tensor(X),
                                                             targets=encode_tensor(Y))),
        "GetModel": ("describe", pb.GetModelRequest(model_id=model_id)),
        "ListModels": ("describe", pb.ListModelsRequest()),
        "DeleteModel": ("delete", pb.DeleteModelRequest(model_id=model_id)),
        "GetWeights": ("get_weights", pb.GetWeightsRequest(model_id=model_id)),
        "SetWeights": ("set_weights", set_weights),
        "SaveModel": ("save", pb.SaveModelRequest(model_id=model_id)),
        "SetOptimizer": ("set_optimizer", pb.SetOptimizerRequest(model_id=model_id,
                                                                 optimizer=pb.OptimizerSpec(lr=0.5))),
        "SaveCheckpoint": ("save_checkpoint", pb.SaveCheckpointRequest(model_id=model_id, tag="t")),
        "ListCheckpoints": ("list_checkpoints", pb.ListCheckpointsRequest(model_id=model_id)),
        "RestoreCheckpoint": ("restore_checkpoint", pb.RestoreCheckpointRequest(model_id=model_id, tag="t")),
        "ApplyGradients": ("apply_gradients", apply_gradients),
        "AccumulateGradients": ("accumulate_gradients", pb.AccumulateGradientsRequest(
            model_id=model_id, inputs=encode_tensor(X), targets=encode_tensor(Y))),
        "OptimizerStep": ("optimizer_step", pb.OptimizerStepRequest(model_id=model_id)),
        "GetWeightsChunks": ("get_weights", pb.GetWeightsRequest(model_id=model_id)),
        "GetGradientsChunks": ("gradients", pb.GetGradientsRequest(model_id=model_id, inputs=encode_tensor(X),
                                                                   targets=encode_tensor(Y))),
        "SetWeightsChunks": ("set_weights", iter([chunk for t in set_weights.weights for chunk in tensor_chunks(
            np.frombuffer(t.tensor.data, np.float32).reshape(t.tensor.shape), t.name, 16, model_id=model_id)])),
        # data sets and Fit: the ``model_id`` fixture stores (X, Y) as DATASET_ID
        "UploadDataset": ("datasets.put", iter([pb.DatasetChunk(inputs=encode_tensor(X), targets=encode_tensor(Y))])),
        "ListDatasets": ("datasets.infos", pb.ListDatasetsRequest()),
        "GetDataset": ("datasets.info", pb.GetDatasetRequest(dataset_id=DATASET_ID)),
        "DeleteDataset": ("delete_dataset", pb.DeleteDatasetRequest(dataset_id=DATASET_ID)),
        "Fit": ("fit_steps", pb.FitRequest(model_id=model_id, dataset_id=DATASET_ID, epochs=1, batch_size=2)),
    }


def invoke(servicer, method, request, ctx):
    """Runs one RPC to its end; a stream's replies are collected."""
    result = getattr(servicer, method)(request, ctx)
    return list(result) if inspect.isgenerator(result) else result


@pytest.fixture
def servicer(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    s = TrainerServicer(ModelRegistry(store, limits=Limits(max_models=10), durability=Durability("step")))
    s.ready.set()
    yield s
    store.close()


@pytest.fixture
def model_id(servicer):
    handle, _ = servicer.registry.create(SPEC, "m")
    servicer.registry.save_checkpoint(handle, "t")  # for RestoreCheckpoint
    servicer.registry.accumulate_gradients(handle, X, Y)  # for OptimizerStep
    servicer.registry.datasets.put(X, Y.astype(np.int64))
    return handle.model_id


def test_every_rpc_is_covered_and_goes_through_the_decorator():
    assert sorted(calls("m")) == sorted(RPCS)
    for name in RPCS:
        assert getattr(TrainerServicer, name).__wrapped__.__name__ == name  # functools.wraps of errors.rpc


@pytest.mark.parametrize("method", RPCS)
def test_every_rpc_succeeds_with_a_valid_request(servicer, model_id, method):
    ctx = FakeContext()
    invoke(servicer, method, calls(model_id)[method][1], ctx)
    assert ctx.code is None


def break_registry(servicer, target: str, error: BaseException, monkeypatch) -> None:
    """Makes the registry call ``target`` (``method`` or ``part.method``) raise ``error``."""

    def broken(*args, **kwargs):
        raise error

    *owners, attribute = target.split(".")
    owner = servicer.registry
    for name in owners:
        owner = getattr(owner, name)
    monkeypatch.setattr(owner, attribute, broken)


@pytest.mark.parametrize("error", [ValueError("bug"), TypeError("bug"), KeyError("bug"),
                                   RuntimeError("bug")], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method", RPCS)
def test_unexpected_exception_is_internal_with_a_logged_traceback(servicer, model_id, method, error,
                                                                  monkeypatch, caplog):
    target, request = calls(model_id)[method]
    break_registry(servicer, target, error, monkeypatch)
    ctx = FakeContext()
    with caplog.at_level(logging.ERROR, logger="gradserve.servicer"), pytest.raises(Aborted):
        invoke(servicer, method, request, ctx)
    assert ctx.code == grpc.StatusCode.INTERNAL, (ctx.code, ctx.details)
    assert type(error).__name__ in ctx.details and ctx.trailing_metadata == ()
    [record] = [r for r in caplog.records if r.name == "gradserve.servicer"]
    assert record.levelno == logging.ERROR and f"method={method}" in record.getMessage()
    assert record.exc_info[1] is error  # the traceback goes to the log


@pytest.mark.parametrize("method", RPCS)
def test_out_of_memory_is_resource_exhausted_with_a_logged_traceback(servicer, model_id, method, monkeypatch,
                                                                     caplog):
    target, request = calls(model_id)[method]
    error = MemoryError()
    break_registry(servicer, target, error, monkeypatch)
    ctx = FakeContext()
    with caplog.at_level(logging.ERROR, logger="gradserve.servicer"), pytest.raises(Aborted):
        invoke(servicer, method, request, ctx)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-memory-mb" in ctx.details
    assert ctx.trailing_metadata == ()  # not retry-safe: the call may have got part-way
    [record] = [r for r in caplog.records if r.name == "gradserve.servicer"]
    assert record.levelno == logging.ERROR and record.exc_info[1] is error


def test_stream_ends_with_the_status_of_a_bad_request_mid_stream(servicer, model_id):
    bad = train_request(model_id, X=np.ones((2, 5), np.float32))  # wrong feature count
    ctx, replies = FakeContext(), []
    with pytest.raises(Aborted):
        for reply in servicer.TrainStream(iter([train_request(model_id), train_request(model_id), bad]), ctx):
            replies.append(reply)
    assert [r.step for r in replies] == [1, 2]
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in ctx.details


def test_missing_spec_and_repeated_weights_are_bad_requests_naming_the_field(servicer, model_id):
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.CreateModel(pb.CreateModelRequest(), ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith("spec:")
    req = pb.SetWeightsRequest(model_id=model_id)
    for _ in range(2):
        req.weights.add(name="layers.0.bias", tensor=encode_tensor(np.zeros(4, np.float32)))
    with pytest.raises(Aborted):
        servicer.SetWeights(req, ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details.startswith("weights:")


def test_limits_are_refused_before_any_work_and_marked_retry_safe(servicer, model_id):
    servicer.registry.limits = Limits(max_batch_rows=1)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        servicer.TrainStep(train_request(model_id), ctx)
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED and ctx.trailing_metadata == ((RETRY_SAFE_KEY, "1"),)
    assert servicer.registry.get(model_id).model.step == 0


# -- a real server that is still warming up ----------------------------------------
@pytest.fixture
def warming_server(tmp_path, monkeypatch):
    """An in-process GradServer whose kernel warm-up waits for ``release``;
    the store already holds model "m"."""
    store = SqliteStore(str(tmp_path / "g.db"))
    ModelRegistry(store).create(SPEC, "m")
    store.close()
    warming, release = threading.Event(), threading.Event()

    def slow_warm_up(*args):
        warming.set()
        assert release.wait(60)
        return 0.0, "test", {}

    monkeypatch.setattr(app, "warm_up_kernels", slow_warm_up)
    server = app.GradServer(app.ServerConfig(port=0, store=str(tmp_path / "g.db"), grace_s=1))
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    assert warming.wait(60)
    server.release = release
    yield server
    release.set()
    starter.join(60)
    server.stop()


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.attempts = collections.Counter()

    def intercept_unary_unary(self, continuation, details, request):
        self.attempts[details.method.rsplit("/", 1)[-1]] += 1
        return continuation(details, request)


def test_warming_up_server_refuses_train_step_retry_safe_and_the_client_retries_it(warming_server):
    target = f"127.0.0.1:{warming_server.port}"
    with Client(target, timeout=30, retries=0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client._call("TrainStep", train_request("m"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and is_retry_safe(err.value)

    with Client(target, timeout=30, retries=8, backoff=0.05) as client:
        from gradserve.v1 import trainer_pb2_grpc as pb_grpc
        counter = CountingInterceptor()
        client._stub = pb_grpc.TrainerStub(grpc.intercept_channel(client._channel, counter))
        threading.Timer(0.3, warming_server.release.set).start()
        reply = client._call("TrainStep", train_request("m"))
    assert reply.step == 1  # trained once, after the refusals
    assert counter.attempts["TrainStep"] >= 2


def test_injected_bug_is_internal_over_grpc_for_unary_and_stream(warming_server, monkeypatch, caplog):
    warming_server.release.set()
    target = f"127.0.0.1:{warming_server.port}"
    registry = warming_server.registry
    real_train_step = registry.train_step
    done = []

    def fails_on_second_step(*args):
        if done:
            raise ValueError("a server bug, not the caller's")
        done.append(1)
        return real_train_step(*args)

    with Client(target, timeout=60) as client:
        client.wait_ready(30)
        for _ in range(600):  # until warm-up is over and the stored model is loaded
            try:
                client.get_model("m")
                break
            except grpc.RpcError:
                threading.Event().wait(0.05)
        monkeypatch.setattr(registry, "train_step", fails_on_second_step)
        replies = []
        with caplog.at_level(logging.ERROR, logger="gradserve.servicer"):
            with pytest.raises(grpc.RpcError) as stream_err:
                for reply in client._stub.TrainStream(iter([train_request("m")] * 3), timeout=60):
                    replies.append(reply)
            with pytest.raises(grpc.RpcError) as unary_err:
                client._stub.TrainStep(train_request("m"), timeout=60)
    assert [r.step for r in replies] == [1]
    for err in (stream_err.value, unary_err.value):
        assert err.code() == grpc.StatusCode.INTERNAL and "ValueError" in err.details()
        assert not is_retry_safe(err)
    logged = [r for r in caplog.records if r.name == "gradserve.servicer" and r.exc_info]
    assert {r.getMessage().split()[1] for r in logged} == {"method=TrainStream", "method=TrainStep"}


# -- what the clients do with the trailer ----------------------------------------------
class Refuser(grpc.GenericRpcHandler):
    """Answers every Trainer call UNAVAILABLE, with or without the
    retry-safe trailer, and counts the attempts."""

    def __init__(self, retry_safe: bool):
        self.retry_safe = retry_safe
        self.attempts = collections.Counter()

    def service(self, details):
        method = details.method.rsplit("/", 1)[-1]

        def refuse(request, context):
            self.attempts[method] += 1
            if self.retry_safe:
                mark_retry_safe(context)
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.fixture(params=[False, True], ids=["no-trailer", "retry-safe"])
def refuser(request):
    handler = Refuser(request.param)
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    handler.target = f"127.0.0.1:{port}"
    yield handler
    server.stop(0)


def sync_attempts(target, method, request):
    with Client(target, timeout=10, retries=2, backoff=0.01) as client:
        with pytest.raises(grpc.RpcError) as err:
            client._call(method, request)
    return err.value


def async_attempts(target, method, request):
    async def scenario():
        async with AsyncClient(target, timeout=10, retries=2, backoff=0.01) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client._call(method, request)
        return err.value
    return asyncio.run(scenario())


@pytest.mark.parametrize("attempt", [sync_attempts, async_attempts], ids=["sync", "aio"])
def test_clients_retry_train_step_only_on_the_trailer_and_idempotent_calls_always(refuser, attempt):
    err = attempt(refuser.target, "TrainStep", train_request("m"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and is_retry_safe(err) == refuser.retry_safe
    # without the trailer the step may have been applied (e.g. the connection dropped mid-call)
    assert refuser.attempts["TrainStep"] == (3 if refuser.retry_safe else 1)
    attempt(refuser.target, "Predict", pb.PredictRequest(model_id="m"))
    assert refuser.attempts["Predict"] == 3


def test_missing_token_is_unauthenticated_and_retry_safe():
    handler = Refuser(False)
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler],
                         interceptors=[app.BearerTokenInterceptor("secret")])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10, retries=2, token="wrong") as client:
            with pytest.raises(grpc.RpcError) as err:
                client._call("TrainStep", train_request("m"))
    finally:
        server.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and is_retry_safe(err.value)
    assert handler.attempts["TrainStep"] == 0  # refused before the service
