"""The noise regularizers beyond input noise: Gaussian noise on hidden
layers' inputs (LayerSpec.noise_std), weight noise
(RegularizationSpec.weight_noise_std) and target noise (target_noise_std).
The CPU kernels against the reference and finite differences, the statistics
of the injected noise, std 0, determinism, validation, and the wire."""
import dataclasses
import math

import grpc
import numpy as np
import pytest
from concurrency import all_returned, concurrently

from gradserve import nnkernels
from gradserve.nnkernels import (
    LayerSpec,
    Model,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    RegularizationSpec,
    SpecError,
    init_params,
    rng,
    runtime,
)
from gradserve.nnkernels import reference as R
from gradserve.nnkernels.cpu import kernels as K
from gradserve.nnkernels.registry import init_state
from gradserve.nnkernels.spec import MAX_LAYERS

NOISY = RegularizationSpec(input_noise_std=0.3, weight_noise_std=0.1, target_noise_std=0.4)


def noisy_spec(dtype="float64", hidden=None, reg=NOISY, out=OutputSpec(2), **kw):
    hidden = hidden or (LayerSpec(9, "tanh", dropout=0.3, noise_std=0.5), LayerSpec(5, "gelu", noise_std=0.2))
    return ModelSpec(input_size=4, hidden=hidden, output=out, regularization=reg, dtype=dtype, seed=3, **kw)


def data(n=7, seed=0, inputs=4, units=2):
    rs = np.random.default_rng(seed)
    return rs.normal(size=(n, inputs)), rs.normal(size=(n, units))


def flat(grads: dict) -> np.ndarray:
    return np.concatenate([g.ravel() for g in grads.values()])


# -- the CPU kernels compute the reference's formulas --------------------------------
@pytest.mark.parametrize("which", ["hidden", "weights", "targets", "all"])
def test_cpu_gradients_and_steps_equal_the_reference_in_float64(which):
    hidden = (LayerSpec(9, "tanh", dropout=0.3), LayerSpec(5, "gelu"))
    reg = RegularizationSpec()
    if which in ("hidden", "all"):
        hidden = (LayerSpec(9, "tanh", dropout=0.3, noise_std=0.5), LayerSpec(5, "gelu", noise_std=0.2))
    if which in ("weights", "all"):
        reg = dataclasses.replace(reg, weight_noise_std=0.1)
    if which in ("targets", "all"):
        reg = dataclasses.replace(reg, target_noise_std=0.4)
    if which == "all":
        reg = dataclasses.replace(reg, input_noise_std=0.3)
    spec = noisy_spec(hidden=hidden, reg=reg, optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9))
    X, y = data(150)
    model = Model(spec)
    params = init_params(spec)
    state = init_state(spec.optimizer, params.size, params.dtype)
    for t in range(3):  # each step draws new noise: every one must match
        loss, grads = model.gradients(X, y)
        ref_loss, _, ref = R.loss_and_grads(spec, params, X, y, step=t)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        np.testing.assert_allclose(flat(grads), ref, rtol=1e-10, atol=1e-14)
        result = model.train_step(X, y)
        ref_loss, _, ref_norm, _ = R.train_step(spec, params, state, X, y, t)
        assert result.loss == pytest.approx(ref_loss, rel=1e-12)
        assert result.grad_norm == pytest.approx(ref_norm, rel=1e-10)
    np.testing.assert_allclose(model.state_dict()["params"], params, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_noise_changes_the_gradient_and_the_draws_change_each_step(dtype):
    spec = noisy_spec(dtype)
    X, y = data(20)
    params = init_params(spec)
    plain = dataclasses.replace(spec, regularization=RegularizationSpec(),
                                hidden=tuple(dataclasses.replace(h, noise_std=0.0) for h in spec.hidden))
    g_plain = R.loss_and_grads(plain, params, X, y, step=0)[2]
    for part in ("hidden", "weight", "target"):
        one = plain
        if part == "hidden":
            one = dataclasses.replace(plain, hidden=spec.hidden)
        elif part == "weight":
            one = dataclasses.replace(plain, regularization=RegularizationSpec(weight_noise_std=0.1))
        else:
            one = dataclasses.replace(plain, regularization=RegularizationSpec(target_noise_std=0.4))
        m = Model(one)
        g0 = flat(m.gradients(X, y)[1])
        assert np.isfinite(g0).all() and not np.allclose(g0, g_plain, rtol=1e-3), part
        # the next step's draws, at the same parameters: the gradient differs by the draws alone
        be = m.backend
        be.loss_and_grads(m._inputs(X), m._targets(y, len(X)), 1)
        g1 = be.get_grads()
        assert np.isfinite(g1).all() and not np.allclose(g1 - g0, 0), part


def central_differences(backend, params, X, y, step, h=1e-6):
    grads = np.empty_like(params)
    for i in range(params.size):
        p = params.copy()
        p[i] += h
        backend.set_params(p)
        up = backend.loss_and_grads(X, y, step)[0]
        p[i] -= 2 * h
        backend.set_params(p)
        down = backend.loss_and_grads(X, y, step)[0]
        grads[i] = (up - down) / (2 * h)
    backend.set_params(params)
    return grads


@pytest.mark.parametrize("step", [0, 5])
def test_gradient_with_the_noise_draws_fixed_matches_finite_differences(step):
    """At a fixed step every draw is fixed, so the loss is a smooth function
    of the parameters: dL/dW̃ (what weight noise applies to W) is dL/dW,
    since W̃ = W + a constant."""
    spec = noisy_spec(hidden=(LayerSpec(6, "tanh", noise_std=0.5), LayerSpec(4, "gelu", noise_std=0.2)))
    X, y = data(8)
    model = Model(spec)
    params = model.state_dict()["params"]
    model.backend.loss_and_grads(X, y, step)
    analytic = model.backend.get_grads()
    numeric = central_differences(model.backend, params, X, y, step)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# -- statistics of the injected noise -----------------------------------------------
def assert_standard_gaussian_scaled(noise: np.ndarray, std: float):
    """mean ≈ 0 and variance ≈ std² within 5 standard errors (the mean's SE
    is std/√n, the sample variance's std²·√(2/(n-1)) for Gaussian draws);
    the draws are deterministic, so this either always or never passes."""
    v = noise.astype(np.float64).ravel()
    n = v.size
    assert abs(v.mean()) < 5 * std / math.sqrt(n)
    assert abs(v.var(ddof=1) - std ** 2) < 5 * std ** 2 * math.sqrt(2 / (n - 1))
    # and the tails are Gaussian: about 4.55% beyond 2 std (binomial SE)
    beyond = np.mean(np.abs(v) > 2 * std)
    assert abs(beyond - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernels_noise_pass_adds_mean_zero_variance_std2_noise(dtype):
    key = np.uint64(rng.stream_key(11, 2, rng.hidden_noise_stream(0)))
    src = np.full((400, 250), 3.0, dtype)
    dst = np.empty_like(src)
    K._noise_rows(src, dst, 0.7, key, 0, 400)
    assert_standard_gaussian_scaled(dst - src, 0.7)


def test_each_noise_in_a_training_step_has_mean_zero_and_variance_std2():
    """The noise the CPU kernels add to the hidden-layer input, the weights
    and the targets, read from their workspaces after a step: it is the
    reference's draw (to the last bit of log/cos: NumPy's vectorized ones
    and the compiled libm calls may differ by an ulp), and it is N(0, std²)."""
    std_h, std_w, std_t = 0.5, 0.05, 0.8
    spec = ModelSpec(input_size=30, hidden=(LayerSpec(200, "relu", noise_std=std_h),), output=OutputSpec(40),
                     regularization=RegularizationSpec(weight_noise_std=std_w, target_noise_std=std_t),
                     dtype="float64", seed=5)
    X, y = data(300, inputs=30, units=40)
    model = Model(spec)
    model.backend.loss_and_grads(X, y, 4)
    ws = model.backend._train_ws
    params = model.state_dict()["params"]
    # hidden-input noise: h̃ - a, a = relu(z) the kernel's own activation (its
    # product's last bits are BLAS's, so a and h̃ equal the reference's to rounding)
    cache = R.forward(spec, params, X, training=True, step=4)
    h_noisy = ws.h[:300 * 200].reshape(300, 200)
    a = ws.a[:300 * 200].reshape(300, 200)
    np.testing.assert_allclose(h_noisy, cache["hs"][1], rtol=1e-13, atol=1e-15)
    expected = R.gaussian_noise(spec, 4, rng.hidden_noise_stream(0), std_h, (300, 200))
    np.testing.assert_allclose(h_noisy - a, expected, rtol=1e-12, atol=1e-15)
    assert_standard_gaussian_scaled(h_noisy - a, std_h)
    # weight noise: W̃ - W, every layer (biases are copied, not perturbed)
    wn = ws.wn
    layout = nnkernels.ParamLayout(spec)
    for l, ((W, b), (Wn, bn)) in enumerate(zip(layout.views(params), layout.views(wn))):
        np.testing.assert_allclose(Wn, cache["ws"][l], rtol=1e-14, atol=1e-17)
        np.testing.assert_array_equal(bn, b)
        assert_standard_gaussian_scaled(Wn - W, std_w)
    # target noise
    y_noisy = ws.yn[:300 * 40].reshape(300, 40)
    np.testing.assert_allclose(y_noisy, R.noisy_targets(spec, y, 4, np.float64), rtol=1e-14, atol=1e-16)
    assert_standard_gaussian_scaled(y_noisy - y, std_t)
    # the draws of different streams are uncorrelated
    u, v = (h_noisy - a).ravel()[:12000], (y_noisy - y).ravel()
    assert abs(np.corrcoef(u, v)[0, 1]) < 5 / math.sqrt(v.size)


def test_new_streams_never_meet_the_old_ones():
    """Stored models replay their input-noise and dropout draws: the new
    kinds' stream numbers lie outside those, and apart from each other."""
    old = {rng.NOISE_STREAM} | {rng.dropout_stream(i) for i in range(MAX_LAYERS + 1)}
    hidden = {rng.hidden_noise_stream(i) for i in range(MAX_LAYERS + 1)}
    weights = {rng.weight_noise_stream(i) for i in range(MAX_LAYERS + 1)}
    new = [hidden, weights, {rng.TARGET_NOISE_STREAM}]
    assert rng.NOISE_STREAM == 0 and rng.dropout_stream(0) == 1  # the old numbering stays
    for i, s in enumerate(new):
        assert not s & old
        for t in new[i + 1:]:
            assert not s & t


# -- std 0, the stored W, Predict -----------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_std_zero_is_bit_identical_to_no_noise(dtype):
    """Explicit zeros (as a client sends them) train exactly as a spec that
    never names the fields, dropout and input noise included."""
    base = dict(input_size=4, output={"units": 2}, dtype=dtype, seed=3,
                optimizer={"name": "adam", "lr": 0.01},
                hidden=[{"units": 9, "activation": "tanh", "dropout": 0.3}, {"units": 5, "activation": "relu"}],
                regularization={"input_noise_std": 0.2})
    zeros = dict(base, hidden=[dict(h, noise_std=0.0) for h in base["hidden"]],
                 regularization=dict(base["regularization"], weight_noise_std=0.0, target_noise_std=0.0))
    a, b = Model(ModelSpec.from_dict(base)), Model(ModelSpec.from_dict(zeros))
    X, y = data(200)
    for _ in range(3):
        assert a.train_step(X, y) == b.train_step(X, y)
    np.testing.assert_array_equal(a.state_dict()["params"], b.state_dict()["params"])
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def test_weight_noise_is_never_stored_and_predict_uses_the_clean_weights():
    spec = noisy_spec(reg=RegularizationSpec(weight_noise_std=0.2), optimizer=OptimizerSpec("sgd", lr=0.1))
    X, y = data(30)
    model = Model(spec)
    before = model.state_dict()["params"]
    _, grads = model.gradients(X, y)
    np.testing.assert_array_equal(model.state_dict()["params"], before)  # gradients() stores nothing
    np.testing.assert_allclose(model.predict(X), R.predict(spec, before, X), rtol=1e-12)
    model.train_step(X, y)
    # SGD: W ← W - lr·dL/dW̃: the clean W moved by the gradient, no noise added to it
    np.testing.assert_allclose(model.state_dict()["params"], before - 0.1 * flat(grads), rtol=1e-12, atol=1e-15)
    after = model.state_dict()["params"]
    np.testing.assert_array_equal(model.predict(X), model.predict(X))
    np.testing.assert_allclose(model.predict(X), R.predict(spec, after, X), rtol=1e-12)


# -- determinism ----------------------------------------------------------------------
def run_noisy(i, steps=4):
    spec = noisy_spec(("float32", "float64")[i % 2],
                      hidden=(LayerSpec(64, "relu", dropout=0.2, noise_std=0.3), LayerSpec(32, "tanh", noise_std=0.1)),
                      optimizer=OptimizerSpec("adam"))
    rs = np.random.default_rng(i)
    m = Model(spec)
    results = []
    for _ in range(steps):
        X, y = rs.normal(size=(runtime.PARALLEL_MIN_ROWS * 3, 4)), rs.normal(size=(runtime.PARALLEL_MIN_ROWS * 3, 2))
        results.append(m.train_step(X, y))
    return results, m.state_dict()["params"]


def test_noisy_training_is_bit_identical_at_every_thread_count_and_under_concurrency():
    budget = runtime.thread_budget()
    try:
        runs = {}
        for threads in sorted({1, 2, budget}):
            runtime.set_thread_budget(threads)
            runs[threads] = [run_noisy(i) for i in range(2)]
    finally:
        runtime.set_thread_budget(budget)
    first = runs[1]
    for threads, got in runs.items():
        for i in range(2):
            assert got[i][0] == first[i][0], threads
            np.testing.assert_array_equal(got[i][1], first[i][1])
    concurrent = all_returned(concurrently(4, lambda i: run_noisy(i % 2)))
    for i in range(4):
        assert concurrent[i][0] == first[i % 2][0]
        np.testing.assert_array_equal(concurrent[i][1], first[i % 2][1])


# -- validation -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_target_noise_is_refused_on_classifier_outputs_naming_the_field(kind):
    with pytest.raises(SpecError) as err:
        noisy_spec(out=OutputSpec(3, kind))
    assert err.value.field == "regularization.target_noise_std"
    assert kind in str(err.value) and "identity" in str(err.value)


@pytest.mark.parametrize("field, bad", [("hidden[1].noise_std", -0.1), ("hidden[1].noise_std", math.inf),
                                        ("regularization.weight_noise_std", -1.0),
                                        ("regularization.weight_noise_std", math.nan),
                                        ("regularization.target_noise_std", -0.5)])
def test_bad_noise_std_is_a_spec_error_naming_the_field(field, bad):
    d = noisy_spec().to_dict()
    if field.startswith("hidden"):
        d["hidden"][1]["noise_std"] = bad
    else:
        d["regularization"][field.split(".")[1]] = bad
    with pytest.raises(SpecError) as err:
        ModelSpec.from_dict(d)
    assert err.value.field == field


# -- over the wire ----------------------------------------------------------------------
def test_noise_fields_travel_through_the_client_and_train_as_the_reference(client):
    X, y = data(16)
    model = client.create_model(4, hidden=[{"units": 6, "activation": "tanh", "dropout": 0.25, "noise_std": 0.3},
                                           {"units": 5, "activation": "relu", "noise_std": 0.2}],
                                output=2, optimizer={"name": "sgd", "lr": 0.05}, dtype="float64", seed=8,
                                regularization={"weight_noise_std": 0.05, "target_noise_std": 0.1})
    try:
        assert [h["noise_std"] for h in model.info.spec["hidden"]] == [0.3, 0.2]
        assert model.info.spec["regularization"]["weight_noise_std"] == 0.05
        assert model.info.spec["regularization"]["target_noise_std"] == 0.1
        spec = ModelSpec.from_dict(model.info.spec)
        params = flat(model.get_weights())
        loss, grads = model.gradients(X, y)
        ref_loss, _, ref = R.loss_and_grads(spec, params, X, y, step=0)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        np.testing.assert_allclose(flat(grads), ref, rtol=1e-10, atol=1e-14)
        assert model.train_step(X, y).step == 1
    finally:
        model.delete()
    with pytest.raises(grpc.RpcError) as err:
        client.create_model(4, hidden=[6], output=(3, "softmax"), regularization={"target_noise_std": 0.1})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "regularization.target_noise_std" in err.value.details()


def test_the_memory_limit_counts_the_noise_workspaces():
    """--max-memory-mb's worst case grows by the h buffer (hidden-input
    noise without dropout), the noisy targets (rows × units) and W̃ (one per
    parameter), in the model's itemsize."""
    from gradserve.server.limits import Limits
    limits = Limits(max_batch_rows=100)
    plain = ModelSpec(input_size=4, hidden=(LayerSpec(9),), output=OutputSpec(2))
    base = limits.model_bytes(plain)
    hidden = dataclasses.replace(plain, hidden=(LayerSpec(9, noise_std=0.1),))
    assert limits.model_bytes(hidden) - base == 4 * 100 * (9 + 2)
    reg = dataclasses.replace(plain, regularization=RegularizationSpec(weight_noise_std=0.1, target_noise_std=0.1))
    assert limits.model_bytes(reg) - base == 4 * (100 * 2 + plain.num_params)
