"""The CPU backend against central finite differences and the reference:
every activation × loss, every optimizer, dropout and noise, inference."""
import numpy as np
import pytest

from gradserve.nnkernels import (
    LayerSpec,
    LossSpec,
    Model,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    RegularizationSpec,
    ScheduleSpec,
    init_params,
)
from gradserve.nnkernels import reference as R
from gradserve.nnkernels.registry import ACTIVATIONS, init_state, state_names

UNITS = {"identity": 2, "sigmoid": 3, "softmax": 4}
LAYER = {"leaky_relu": dict(negative_slope=0.2), "elu": dict(alpha=0.7)}


def net_spec(act, kind, dtype="float64", **kw):
    return ModelSpec(input_size=4, hidden=(LayerSpec(5, act, **LAYER.get(act, {})), LayerSpec(3, "tanh")),
                     output=OutputSpec(UNITS[kind], kind), dtype=dtype, seed=2, **kw)


def batch(kind, n=6, seed=0, probs=False):
    rs = np.random.default_rng(seed)
    X = rs.normal(size=(n, 4))
    units = UNITS[kind]
    if kind == "softmax":
        y = rs.dirichlet(np.ones(units), n) if probs else rs.integers(0, units, n)
    elif kind == "sigmoid":
        y = rs.uniform(size=(n, units))
    else:
        y = rs.normal(size=(n, units))
    return X, y


def central_differences(backend, params, X, y, h=1e-6):
    grads = np.empty_like(params)
    for i in range(params.size):
        p = params.copy()
        p[i] += h
        backend.set_params(p)
        up = backend.loss_and_grads(X, y, 0)[0]
        p[i] -= 2 * h
        backend.set_params(p)
        down = backend.loss_and_grads(X, y, 0)[0]
        grads[i] = (up - down) / (2 * h)
    backend.set_params(params)
    return grads


@pytest.mark.parametrize("kind", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gradients_match_finite_differences_and_reference(act, kind):
    spec = net_spec(act, kind, loss=LossSpec(label_smoothing=0.2 if kind == "softmax" else 0.0))
    model = Model(spec)
    X, y = batch(kind)
    y = model._targets(y, X.shape[0])
    loss, grads = model.gradients(X, y)
    flat = np.concatenate([g.ravel() for g in grads.values()])
    params = init_params(spec)
    ref_loss, _, ref = R.loss_and_grads(spec, params, X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(flat, ref, rtol=1e-10, atol=1e-15)
    fd = central_differences(model.backend, params, X, y)
    np.testing.assert_allclose(flat, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("act", ["relu", "gelu", "softplus", "elu", "hardswish"])
def test_float32_gradients_match_reference(act, kind):
    spec = net_spec(act, kind, dtype="float32")
    X, y = batch(kind, n=9, seed=1)
    loss, grads = Model(spec).gradients(X, y)
    ref_loss, _, ref = R.loss_and_grads(spec, init_params(spec), X.astype(np.float32), y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    flat = np.concatenate([g.ravel() for g in grads.values()])
    np.testing.assert_allclose(flat, ref, rtol=1e-4, atol=1e-6)


def test_probability_targets_with_label_smoothing_match_reference():
    spec = net_spec("relu", "softmax", loss=LossSpec(label_smoothing=0.3))
    X, y = batch("softmax", probs=True)
    loss, grads = Model(spec).gradients(X, y)
    ref_loss, _, ref = R.loss_and_grads(spec, init_params(spec), X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(np.concatenate([g.ravel() for g in grads.values()]), ref, rtol=1e-10, atol=1e-15)


OPTIMIZERS = [
    OptimizerSpec("sgd", lr=0.05),
    OptimizerSpec("sgd", lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.01),
    OptimizerSpec("sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.02),
    OptimizerSpec("adagrad", lr=0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.3, eps=1e-8),
    OptimizerSpec("rmsprop", lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True),
    OptimizerSpec("rmsprop", lr=0.01, alpha=0.3),
    OptimizerSpec("rmsprop", lr=0.01, alpha=0.4, centered=True, eps=0.05),
    OptimizerSpec("adam", lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05, amsgrad=True),
    OptimizerSpec("adam", lr=0.02, beta1=0.4, beta2=0.9),
    OptimizerSpec("adamw", lr=0.01, beta1=0.85, beta2=0.99, weight_decay=0.1),
    OptimizerSpec("adamw", lr=0.01, weight_decay=0.3, amsgrad=True, eps=1e-5),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o.name for o in OPTIMIZERS])
def test_50_optimizer_steps_equal_the_reference(opt):
    spec = net_spec("elu", "softmax", optimizer=opt, schedule=ScheduleSpec("cosine", t_max=30, eta_min=1e-3),
                    regularization=RegularizationSpec(clip_grad_norm=0.5))
    model = Model(spec)
    params = init_params(spec)
    state = init_state(opt, params.size, params.dtype)
    for t in range(50):
        X, y = batch("softmax", n=8, seed=t)
        result = model.train_step(X, y)
        loss, correct, norm, lr = R.train_step(spec, params, state, X, y, t)
        assert result.loss == pytest.approx(loss, rel=1e-10)
        assert result.grad_norm == pytest.approx(norm, rel=1e-10)
        assert result.lr == lr and result.step == t + 1
        assert result.accuracy == correct / 8
    sd = model.state_dict()
    np.testing.assert_allclose(sd["params"], params, rtol=1e-10, atol=1e-13)
    for name in state_names(opt):
        np.testing.assert_allclose(sd[f"optimizer.{name}"], state[name], rtol=1e-10, atol=1e-13)


def test_dropout_and_noise_are_reproducible_and_equal_the_reference():
    spec = ModelSpec(input_size=6, hidden=(LayerSpec(300, "relu", dropout=0.3), LayerSpec(7, "sigmoid", dropout=0.5)),
                     output=OutputSpec(2), regularization=RegularizationSpec(input_noise_std=0.5),
                     optimizer=OptimizerSpec("sgd", lr=0.1), dtype="float64", seed=9)
    rs = np.random.default_rng(4)
    X, y = rs.normal(size=(150, 6)), rs.normal(size=(150, 2))
    a, b = Model(spec), Model(spec)
    params = init_params(spec)
    state = init_state(spec.optimizer, params.size, params.dtype)
    for t in range(3):
        loss_a, grads_a = a.gradients(X, y)
        _, _, ref = R.loss_and_grads(spec, params, X, y, step=t)
        np.testing.assert_allclose(np.concatenate([g.ravel() for g in grads_a.values()]), ref, rtol=1e-10, atol=1e-14)
        ra, rb = a.train_step(X, y), b.train_step(X, y)
        assert ra == rb
        assert ra.loss == loss_a
        R.train_step(spec, params, state, X, y, t)
    np.testing.assert_array_equal(a.state_dict()["params"], b.state_dict()["params"])
    # the masks change with the step: two steps' gradients differ
    g1 = a.gradients(X, y)[1]["layers.0.weight"]
    a.train_step(X, y)
    assert not np.array_equal(g1, a.gradients(X, y)[1]["layers.0.weight"])


def test_dropout_drops_about_p_of_the_units():
    spec = ModelSpec(input_size=4, hidden=(LayerSpec(1000, "identity", dropout=0.3),), output=OutputSpec(1),
                     weight_init=R_init_ones(), bias_init=R_init_ones(), dtype="float64")
    # every activation is 5 (= 4 ones + bias): a dropped unit's hidden value is 0
    cache = R.forward(spec, init_params(spec), np.ones((20, 4)), training=True, step=3)
    dropped = np.mean(cache["hs"][1] == 0)
    assert 0.27 < dropped < 0.33
    assert np.allclose(cache["hs"][1][cache["hs"][1] != 0], 5 / 0.7)


def R_init_ones():
    from gradserve.nnkernels import InitSpec
    return InitSpec("constant", value=1.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["identity", "sigmoid", "softmax"])
def test_predict_matches_reference(kind, dtype):
    spec = net_spec("gelu", kind, dtype=dtype)
    model = Model(spec)
    X = np.random.default_rng(2).normal(size=(300, 4)) * 3
    tol = 1e-12 if dtype == "float64" else 1e-5
    out = model.predict(X)
    assert out.dtype == np.dtype(dtype) and out.shape == (300, UNITS[kind])
    np.testing.assert_allclose(out, R.predict(spec, init_params(spec), X), rtol=tol, atol=tol)
    np.testing.assert_allclose(model.predict(X, logits=True), R.predict(spec, init_params(spec), X, logits=True),
                               rtol=tol, atol=tol)


def test_softmax_predict_is_finite_for_huge_logits():
    spec = ModelSpec(input_size=2, output=OutputSpec(3, "softmax"), dtype="float32",
                     weight_init=R_init_ones())
    out = Model(spec).predict(np.array([[1e37, 1e37]]))
    assert np.all(np.isfinite(out))
