"""Every bad request gets the right status code and a message naming the
field or limit, and the server (and every other model) keeps working."""
import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.nnkernels import available_devices
from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.tensor import encode_tensor

SPEC = dict(input_size=4, hidden=[(8, "tanh")], output=(3, "softmax"), optimizer="sgd", seed=3)
X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
Y = np.array([0, 1, 2, 1, 0])


@pytest.fixture
def model(client):
    return client.create_model(**SPEC)


@pytest.fixture(autouse=True)
def bystander_keeps_working(client):
    """A model that trains before and after each test's bad request."""
    other = client.create_model(**SPEC)
    first = other.train_step(X, Y)
    yield
    assert other.train_step(X, Y).step == first.step + 1


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def check(err: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    for word in words:
        assert word in err.details(), (word, err.details())


def raw_train(client, model_id, inputs: pb.Tensor, targets: pb.Tensor):
    return client._stub.TrainStep(pb.TrainStepRequest(model_id=model_id, inputs=inputs, targets=targets), timeout=30)


# -- unknown model --------------------------------------------------------------
@pytest.mark.parametrize("method", ["TrainStep", "Predict", "GetGradients", "GetModel", "DeleteModel",
                                    "GetWeights", "SetWeights", "SaveModel"])
def test_unknown_model_is_not_found(client, method):
    request_type = getattr(pb, {"GetGradients": "GetGradientsRequest"}.get(method, method + "Request"))
    err = refused(getattr(client._stub, method), request_type(model_id="no-such-model"), timeout=30)
    check(err, grpc.StatusCode.NOT_FOUND, "model_id", "no-such-model")


def test_unknown_model_in_a_stream_is_not_found(client):
    req = pb.TrainStepRequest(model_id="no-such-model")
    err = refused(lambda: list(client._stub.TrainStream(iter([req]), timeout=30)))
    check(err, grpc.StatusCode.NOT_FOUND, "no-such-model")


def test_bad_batch_mid_stream_ends_the_stream_with_invalid_argument(client, model):
    good = pb.TrainStepRequest(model_id=model.model_id, inputs=encode_tensor(X), targets=encode_tensor(Y))
    bad = pb.TrainStepRequest(model_id=model.model_id, inputs=encode_tensor(X[:, :3]), targets=encode_tensor(Y))
    replies = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in client._stub.TrainStream(iter([good, good, bad, good]), timeout=30):
            replies.append(reply)
    assert [r.step for r in replies] == [1, 2]
    check(err.value, grpc.StatusCode.INVALID_ARGUMENT, "inputs")
    assert model.step == 2  # the batch after the bad one was not trained on


# -- bad specs ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"input_size": 0}, "input_size"),
    ({"hidden": [(8, "swish")]}, "hidden[0].activation"),
    ({"hidden": [0]}, "hidden[0].units"),
    ({"output": (1, "softmax")}, "output.units"),
    ({"optimizer": {"name": "adam", "lr": -1.0}}, "optimizer.lr"),
    ({"optimizer": {"name": "adam", "momentum": 0.9}}, "optimizer.momentum"),
    ({"loss": "mse"}, "loss.name"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_spec_is_invalid_argument_naming_the_field(client, kwargs, field):
    check(refused(client.create_model, **{**SPEC, **kwargs}), grpc.StatusCode.INVALID_ARGUMENT, field)


def test_bad_model_id_is_invalid_argument(client):
    check(refused(client.create_model, **SPEC, model_id="a b/c"), grpc.StatusCode.INVALID_ARGUMENT, "model_id")


def test_cuda_model_without_a_gpu_is_failed_precondition(client):
    if "cuda" in available_devices():
        pytest.skip("this machine has a usable CUDA device")
    check(refused(client.create_model, **SPEC, device="cuda"), grpc.StatusCode.FAILED_PRECONDITION, "cuda")


# -- bad tensors -------------------------------------------------------------------
def test_unknown_dtype_is_invalid_argument(client, model):
    bad = pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[5, 4], data=X.tobytes())
    check(refused(raw_train, client, model.model_id, bad, encode_tensor(Y)),
          grpc.StatusCode.INVALID_ARGUMENT, "inputs", "unknown dtype")


def test_byte_length_not_matching_shape_is_invalid_argument(client, model):
    bad = pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[5], data=Y.astype(np.int64).tobytes()[:-3])
    check(refused(raw_train, client, model.model_id, encode_tensor(X), bad),
          grpc.StatusCode.INVALID_ARGUMENT, "targets", "bytes")


@pytest.mark.parametrize("inputs, targets, field", [
    (X[:, :3], Y, "inputs"),                                    # wrong number of features
    (np.where(np.eye(5, 4) > 0, np.nan, X).astype(np.float32), Y, "inputs"),  # NaN
    (np.full((5, 4), np.inf, np.float32), Y, "inputs"),         # Inf
    (X, np.array([0, 1, 2, 3, 0]), "targets"),                  # label out of range
    (X, np.array([0, 1, -1, 1, 0]), "targets"),                 # negative label
    (X, Y[:4], "targets"),                                      # rows differ
    (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), "inputs"),  # empty batch
])
def test_bad_batch_is_invalid_argument_naming_the_field(model, inputs, targets, field):
    check(refused(model.train_step, inputs, targets), grpc.StatusCode.INVALID_ARGUMENT, field)
    check(refused(model.gradients, inputs, targets), grpc.StatusCode.INVALID_ARGUMENT, field)
    assert model.step == 0


def test_bad_predict_input_is_invalid_argument(model):
    check(refused(model.predict, X[:, :2]), grpc.StatusCode.INVALID_ARGUMENT, "inputs")


def test_set_weights_with_wrong_shape_is_invalid_argument_naming_the_parameter(model):
    weights = model.get_weights()
    weights["layers.0.weight"] = np.zeros((2, 2), np.float32)
    check(refused(model.set_weights, weights), grpc.StatusCode.INVALID_ARGUMENT, "layers.0.weight")


# -- limits --------------------------------------------------------------------------
def test_too_many_layers_is_resource_exhausted_naming_the_limit(client):
    err = refused(client.create_model, **{**SPEC, "hidden": [4] * 8})
    check(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_layers=8", "--max-layers")


def test_too_many_parameters_is_resource_exhausted_naming_the_limit(client):
    err = refused(client.create_model, **{**SPEC, "input_size": 1000, "hidden": [1000]})
    check(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_params=1000000")


def test_too_many_rows_is_resource_exhausted_naming_the_limit(client):
    model = client.create_model(input_size=1, output=1)
    big = np.zeros((20_001, 1), np.float32)
    check(refused(model.train_step, big, big), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_rows=20000")


def test_too_large_message_is_resource_exhausted_naming_the_limit(server):
    with Client(server.target, max_message_mb=64) as big_client:  # the client would send it; the server refuses
        model = big_client.create_model(input_size=1000, output=1)
        X = np.zeros((2400, 1000), np.float32)  # 9.6 MB > 8 MiB
        err = refused(model.train_step, X, np.zeros((2400, 1), np.float32))
    check(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_message_mb=8", "--max-message-mb")


# -- steps that cannot be taken ---------------------------------------------------------
def test_non_finite_step_is_rolled_back_and_the_next_sane_step_works(client):
    model = client.create_model(input_size=4, hidden=[8], output=1, optimizer="sgd", seed=1)
    model.train_step(X, np.ones((5, 1), np.float32))
    before = model.get_weights()
    huge = np.full((5, 4), 1e30, np.float32)  # finite inputs whose squared error overflows float32
    check(refused(model.train_step, huge, np.ones((5, 1), np.float32)), grpc.StatusCode.FAILED_PRECONDITION)
    assert model.step == 1
    for name, w in model.get_weights().items():
        np.testing.assert_array_equal(w, before[name])
    assert model.train_step(X, np.ones((5, 1), np.float32)).step == 2


def test_model_of_only_step_units_is_not_trainable(client):
    model = client.create_model(input_size=4, hidden=[(8, "step")], output=1)
    err = refused(model.train_step, X, np.ones((5, 1), np.float32))
    check(err, grpc.StatusCode.FAILED_PRECONDITION)
    assert model.predict(X).shape == (5, 1)  # still evaluates
