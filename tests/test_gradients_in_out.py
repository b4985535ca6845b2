"""ApplyGradients, AccumulateGradients and OptimizerStep over a real server:
PyTorch's ``param.grad = g; clip_grad_norm_; optimizer.step(); scheduler.step()``
for every optimizer, the accumulated step equal to the full batch's, and
exact replay after a SIGKILL."""
import dataclasses
import math

import grpc
import numpy as np
import pytest
import torch

from gradserve.client import Client
from gradserve.nnkernels import Model, ModelSpec
from gradserve.server.gradients import GradientAccumulator, apply_gradients, flat_gradients
from service_fixtures import ServerProcess, client, server  # noqa: F401  (fixtures)
from test_reference import OPTIMIZERS

CLIP = 1.5


def spec(optimizer: dict, **kw) -> dict:
    return dict(input_size=4, hidden=[(6, "tanh")], output=(3, "softmax"), optimizer=optimizer,
                schedule={"name": "step", "step_size": 2, "gamma": 0.5}, regularization={"clip_grad_norm": CLIP},
                dtype="float64", seed=5, **kw)


@pytest.mark.parametrize("opt, make_torch", OPTIMIZERS, ids=[o.name for o, _ in OPTIMIZERS])
def test_apply_gradients_is_torch_grad_then_clip_then_step_then_schedule(client, opt, make_torch):
    remote = client.create_model(**spec(dataclasses.asdict(opt)))
    weights = remote.get_weights()
    params = [torch.tensor(w, requires_grad=True) for w in weights.values()]
    topt = make_torch(params)
    sched = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
    rng = np.random.default_rng(7)
    for t in range(6):
        scale = 0.1 if t % 2 else 2.0  # clipping acts on every other step
        grads = {name: scale * rng.standard_normal(w.shape) for name, w in weights.items()}
        expected_lr = sched.get_last_lr()[0]
        for p, g in zip(params, grads.values()):
            p.grad = torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        topt.step()
        sched.step()
        result = remote.apply_gradients(grads)
        assert result.step == t + 1 and math.isnan(result.loss)
        assert result.lr == pytest.approx(expected_lr, rel=1e-15)
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-12)
        for (name, got), p in zip(remote.get_weights().items(), params):
            np.testing.assert_allclose(got, p.detach().numpy(), rtol=1e-10, atol=1e-13, err_msg=f"{name} step {t}")


def test_accumulated_gradients_step_equals_the_full_batch_step(client):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)
    opt = {"name": "adam", "lr": 0.05}
    split, whole = client.create_model(**spec(opt)), client.create_model(**spec(opt))
    for _ in range(2):  # the second round checks the optimizer state too
        assert split.accumulate_gradients(X[:5], y[:5]) == 5
        assert split.accumulate_gradients(X[5:], y[5:]) == 16
        got, want = split.optimizer_step(), whole.train_step(X, y)
        assert got.step == want.step and got.lr == want.lr
        assert got.loss == pytest.approx(want.loss, rel=1e-12)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12)
        w_split, w_whole = split.get_weights(), whole.get_weights()
        for name in w_whole:
            np.testing.assert_allclose(w_split[name], w_whole[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_optimizer_step_needs_gradients_accumulated_at_the_current_step(client):
    remote = client.create_model(**spec({"name": "sgd", "lr": 0.1}))
    X, y = np.ones((2, 4)), np.array([0, 1])
    with pytest.raises(grpc.RpcError) as err:
        remote.optimizer_step()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "AccumulateGradients" in err.value.details()
    remote.accumulate_gradients(X, y)
    remote.train_step(X, y)  # the model moved on: the accumulation is stale
    with pytest.raises(grpc.RpcError) as err:
        remote.optimizer_step()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert remote.accumulate_gradients(X, y) == 2  # a new accumulation begins at the new step
    assert remote.optimizer_step().step == 2


@pytest.mark.parametrize("bad, field", [
    (lambda g: {k: v for k, v in g.items() if k != "layers.1.bias"}, "layers.1.bias"),
    (lambda g: {**g, "layers.9.weight": np.ones(3)}, "layers.9.weight"),
    (lambda g: {**g, "layers.0.weight": np.ones((4, 6))}, "layers.0.weight"),
    (lambda g: {**g, "layers.0.bias": np.full(6, np.nan)}, "layers.0.bias"),
], ids=["missing", "unknown", "shape", "nan"])
def test_apply_gradients_refuses_bad_gradients_naming_the_parameter(client, bad, field):
    remote = client.create_model(**spec({"name": "sgd", "lr": 0.1}))
    grads = {name: np.zeros_like(w) for name, w in remote.get_weights().items()}
    with pytest.raises(grpc.RpcError) as err:
        remote.apply_gradients(bad(grads))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
    assert remote.refresh().step == 0


def test_gradient_steps_replay_exactly_after_sigkill(tmp_path):
    store = tmp_path / "g.db"
    s = spec({"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True}, model_id="m")
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    proc = ServerProcess(store, "--durability", "step")
    with Client(proc.target, timeout=60) as c:
        remote = c.create_model(**s)
        local = Model(ModelSpec.from_dict({**_spec_dict(s), "device": "cpu"}))
        for k in range(2):
            grads = {n: rng.standard_normal(w.shape) for n, w in remote.get_weights().items()}
            remote.apply_gradients(grads)
            apply_gradients(local, flat_gradients(local, grads))
        remote.accumulate_gradients(X[:4], y[:4]), remote.accumulate_gradients(X[4:], y[4:])
        remote.optimizer_step()
        acc = GradientAccumulator(local.step, np.zeros(local.num_params))
        acc.add(local, X[:4], y[:4]), acc.add(local, X[4:], y[4:])
        apply_gradients(local, *acc.mean(local.dtype))
        remote.accumulate_gradients(X, y)  # unfinished at the kill: lost, as documented
    proc.kill()
    restarted = ServerProcess(store, "--durability", "step")
    try:
        with Client(restarted.target, timeout=60) as c:
            remote = c.get_model("m")
            assert remote.info.step == local.step == 3
            want = local.get_weights()
            for name, w in remote.get_weights().items():
                np.testing.assert_array_equal(w, want[name], err_msg=name)
            with pytest.raises(grpc.RpcError) as err:
                remote.optimizer_step()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            r, l = remote.train_step(X, y), local.train_step(X, y)
            assert (r.step, r.loss) == (l.step, l.loss)
            want = local.get_weights()
            for name, w in remote.get_weights().items():
                np.testing.assert_array_equal(w, want[name], err_msg=name)  # the optimizer state matched too
    finally:
        assert restarted.stop() == 0


def _spec_dict(kwargs: dict) -> dict:
    from gradserve.client import build_spec
    return build_spec(**{k: v for k, v in kwargs.items() if k != "model_id"})
