"""Client behaviours beyond the happy path of test_service: the asyncio
client, retries with back-off on UNAVAILABLE, deadlines, spec shorthands."""
import asyncio
import time

import grpc
import numpy as np
import pytest

from gradserve.client import AsyncClient, Client, build_spec
from service_fixtures import free_port

X = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
Y = np.random.default_rng(1).integers(0, 2, 12)
SPEC = dict(input_size=3, hidden=[(6, "relu")], output=(2, "softmax"), optimizer="adam", seed=2)


def test_async_client_makes_the_same_calls_as_the_blocking_one(server, client):
    async def scenario():
        async with AsyncClient(server.target, timeout=60) as ac:
            await ac.wait_ready()
            model = await ac.create_model(**SPEC)
            r = await model.train_step(X, Y)
            history = await model.fit(X, Y, epochs=2, batch_size=4, shuffle=False)
            loss, grads = await model.gradients(X, Y)
            p = await model.predict(X)
            w = await model.get_weights()
            await model.set_weights(w)
            saved = await model.save()
            ids = [m.model_id for m in await ac.list_models()]
            await model.delete()
            return model.model_id, r, history, grads, p, saved, ids

    model_id, r, history, grads, p, saved, ids = asyncio.run(scenario())
    assert r.step == 1 and saved == 7 and model_id in ids
    assert len(history["loss"]) == 2
    assert grads["layers.0.weight"].shape == (6, 3) and p.shape == (12, 2)
    blocking = client.create_model(**SPEC)  # same spec and batches through the blocking client
    blocking.train_step(X, Y)
    blocking.fit(X, Y, epochs=2, batch_size=4, shuffle=False, progress=False)
    np.testing.assert_array_equal(blocking.predict(X), p)


def test_unavailable_is_retried_with_exponential_backoff_then_raised():
    with Client(f"127.0.0.1:{free_port()}", timeout=5, retries=3, backoff=0.05) as c:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.list_models()
        elapsed = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed >= 0.05 + 0.1 + 0.2  # three waits, doubling


class _Failure(grpc.RpcError):
    def __init__(self, code, details, trailing_metadata=()):
        self._code, self._details, self._trailing = code, details, trailing_metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_train_step_is_not_retried_when_the_connection_dropped_mid_call():
    from gradserve.client.sync import retryable
    dropped = _Failure(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert not retryable("TrainStep", dropped)  # it may have been applied: a retry would train twice
    assert retryable("Predict", dropped) and retryable("GetGradients", dropped)


def test_train_step_is_retried_only_when_the_server_marked_it_retry_safe():
    from gradserve.client.sync import retryable
    from gradserve.wire.status import RETRY_SAFE_KEY
    marked = ((RETRY_SAFE_KEY, "1"),)
    assert retryable("TrainStep", _Failure(grpc.StatusCode.UNAVAILABLE, "warming up", marked))
    # the words of a refusal mean nothing without the trailer
    assert not retryable("TrainStep", _Failure(grpc.StatusCode.UNAVAILABLE, "server is not serving yet"))
    assert not retryable("TrainStep", _Failure(grpc.StatusCode.INTERNAL, "bug", marked))  # only UNAVAILABLE


def test_deadline_exceeded_is_reported(client):
    model = client.create_model(**SPEC)
    big = np.zeros((20_000, 3), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        model.predict(big, timeout=1e-6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_spec_shorthands_expand_to_the_spec_fields():
    assert build_spec(4, [8, (4, "tanh")], (3, "softmax"), optimizer="adam", seed=1) == {
        "input_size": 4, "hidden": [{"units": 8}, {"units": 4, "activation": "tanh"}],
        "output": {"units": 3, "kind": "softmax"}, "optimizer": {"name": "adam"}, "seed": 1}


def test_created_model_reports_its_full_spec_with_defaults(client):
    model = client.create_model(**SPEC)
    assert model.info.spec["optimizer"]["lr"] == pytest.approx(1e-3)  # torch's Adam default
    assert model.info.spec["device"] == "cpu"
    assert model.info.param_shapes == [("layers.0.weight", (6, 3)), ("layers.0.bias", (6,)),
                                       ("layers.1.weight", (2, 6)), ("layers.1.bias", (2,))]
