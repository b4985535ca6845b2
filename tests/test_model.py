"""Model: input checks, refused non-finite steps, weights and state transfer."""
import numpy as np
import pytest

from gradserve.nnkernels import (
    InputError,
    LayerSpec,
    Model,
    ModelSpec,
    NonFiniteError,
    NotTrainableError,
    OptimizerSpec,
    OutputSpec,
    StepResult,
)
from gradserve.nnkernels import reference as R


def clf(dtype="float32", **kw):
    return Model(ModelSpec(input_size=3, hidden=(LayerSpec(5, "relu"),), output=OutputSpec(4, "softmax"),
                           optimizer=OptimizerSpec("adam", lr=0.01), dtype=dtype, **kw))


def reg(units=1, kind="identity", **kw):
    return Model(ModelSpec(input_size=3, hidden=(LayerSpec(5, "tanh"),), output=OutputSpec(units, kind), **kw))


X = np.arange(12, dtype=np.float64).reshape(4, 3) / 10
LABELS = np.array([0, 1, 2, 3])


def test_model_reports_size_and_names():
    m = clf()
    assert m.num_params == 5 * 3 + 5 + 4 * 5 + 4
    assert m.param_shapes() == [("layers.0.weight", (5, 3)), ("layers.0.bias", (5,)),
                                ("layers.1.weight", (4, 5)), ("layers.1.bias", (4,))]
    assert m.step == 0


def test_train_step_reports_step_loss_accuracy_norm_lr():
    m = clf()
    r = m.train_step(X, LABELS)
    assert isinstance(r, StepResult)
    assert r.step == 1 == m.step and r.lr == 0.01
    assert 0 <= r.accuracy <= 1 and r.loss > 0 and r.grad_norm > 0
    assert reg().train_step(X, X[:, 0]).accuracy is None
    r = reg(2, "sigmoid").train_step(X, np.array([[0, 1]] * 4))
    assert r.accuracy in {k / 8 for k in range(9)}


@pytest.mark.parametrize("bad, reason", [
    (np.zeros(3), "2-D"),
    (np.zeros((0, 3)), "empty"),
    (np.zeros((4, 2)), "columns"),
    (np.array([[1, 2, np.nan]] * 4), "NaN"),
    (np.array([[1, 2, np.inf]] * 4), "NaN or Inf"),
    (np.array([[1e300, 0, 0]] * 4), "NaN or Inf"),  # overflows float32
    (np.zeros((4, 3), complex), "real numbers"),
    (np.array([["a", "b", "c"]] * 4), "real numbers"),
    (np.array([[1, 2, None]] * 4, dtype=object), "real numbers"),
    ([[1, 2], [3]], "rectangular"),
])
def test_bad_inputs_raise_input_error_naming_inputs(bad, reason):
    with pytest.raises(InputError) as info:
        clf().train_step(bad, LABELS)  # inputs are checked first
    assert info.value.field == "inputs"
    assert reason in str(info.value)


@pytest.mark.parametrize("model, bad, reason", [
    (clf, np.array([0, 1, 2, 4]), "[0, 4)"),
    (clf, np.array([0, 1, 2, -1]), "[0, 4)"),
    (clf, np.array([0, 1, 2]), "rows"),
    (clf, np.array([0.0, 1.0, 2.0, 3.0]), "integers"),
    (clf, np.zeros((4, 3)), "probabilities"),
    (clf, np.full((4, 4), np.nan), "NaN"),
    (reg, np.zeros((4, 2)), "shape"),
    (reg, np.array([0.0, 1.0, np.inf, 0.0]), "NaN"),
    (lambda: reg(2, "sigmoid"), np.full((4, 2), 1.5), "[0, 1]"),
    (lambda: reg(2, "sigmoid"), np.zeros(4), "shape"),
])
def test_bad_targets_raise_input_error_naming_targets(model, bad, reason):
    with pytest.raises(InputError) as info:
        model().train_step(X, bad)
    assert info.value.field == "targets"
    assert reason in str(info.value)


def test_int_bool_and_readonly_inputs_are_accepted():
    m = clf(dtype="float64")
    ro = np.frombuffer(X.tobytes(), dtype=np.float64).reshape(4, 3)
    assert not ro.flags.writeable
    expected = m.predict(X)
    np.testing.assert_array_equal(m.predict(ro), expected)
    np.testing.assert_array_equal(m.predict(X.astype(np.float32)), m.predict(X.astype(np.float32).astype(np.float64)))
    assert m.predict(np.ones((2, 3), dtype=bool)).shape == (2, 4)
    assert m.predict(np.ones((2, 3), dtype=np.int8)).shape == (2, 4)
    m.train_step(ro, LABELS.astype(np.uint8))
    m.train_step(np.asfortranarray(X), LABELS)


def test_step_with_nonfinite_loss_raises_and_leaves_model_unchanged():
    m = Model(ModelSpec(input_size=3, hidden=(LayerSpec(5, "relu"),), output=OutputSpec(1),
                        optimizer=OptimizerSpec("sgd", lr=1e6), dtype="float32"))
    y = np.full(4, 1e3)
    with pytest.raises(NonFiniteError):
        for _ in range(100):
            before = m.state_dict()
            m.train_step(X, y)
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    # a sane step on sane weights works again
    m.set_weights({k: np.zeros_like(v) for k, v in m.get_weights().items()})
    m2 = Model(ModelSpec(input_size=3, hidden=(LayerSpec(5, "relu"),), output=OutputSpec(1),
                         optimizer=OptimizerSpec("sgd", lr=1e-3)), state=None)
    m2.load_state_dict({**m.state_dict(), "params": m.state_dict()["params"]})
    r = m2.train_step(X, np.zeros(4))
    assert np.isfinite(r.loss) and r.step == m.step + 1


def test_not_trainable_model_refuses_training_but_predicts():
    m = Model(ModelSpec(input_size=3, hidden=(LayerSpec(5, "step"),), output=OutputSpec(2, "softmax")))
    with pytest.raises(NotTrainableError):
        m.train_step(X, np.array([0, 1, 0, 1]))
    assert m.predict(X).shape == (4, 2)


def test_gradients_equal_what_the_next_train_step_uses_and_change_nothing():
    spec = ModelSpec(input_size=3, hidden=(LayerSpec(6, "relu", dropout=0.5),), output=OutputSpec(4, "softmax"),
                     optimizer=OptimizerSpec("sgd", lr=0.1), dtype="float64", seed=5)
    m = Model(spec)
    m.train_step(X, LABELS)
    before = m.state_dict()
    loss, grads = m.gradients(X, LABELS)
    assert list(grads) == [n for n, _ in m.param_shapes()]
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    r = m.train_step(X, LABELS)
    assert r.loss == loss
    expected = before["params"] - 0.1 * np.concatenate([g.ravel() for g in grads.values()])
    np.testing.assert_allclose(m.state_dict()["params"], expected, rtol=1e-14)


def test_weights_round_trip_and_are_validated():
    m = clf()
    w = m.get_weights()
    w["layers.1.bias"] = np.array([1, 2, 3, 4])  # ints are converted
    m.set_weights(w)
    assert m.get_weights()["layers.1.bias"].dtype == np.float32
    np.testing.assert_array_equal(m.get_weights()["layers.1.bias"], [1, 2, 3, 4])
    for bad, field in [({**w, "layers.0.weight": np.zeros((3, 5))}, "layers.0.weight"),
                       ({**w, "layers.0.bias": np.full(5, np.nan)}, "layers.0.bias"),
                       ({**w, "layers.2.weight": np.zeros(1)}, "layers.2.weight"),
                       ({k: v for k, v in w.items() if k != "layers.1.weight"}, "layers.1.weight"),
                       ({**w, "layers.1.bias": np.array(["a"] * 4)}, "layers.1.bias")]:
        with pytest.raises(InputError) as info:
            m.set_weights(bad)
        assert info.value.field == field
    np.testing.assert_array_equal(m.get_weights()["layers.1.bias"], [1, 2, 3, 4])


def test_state_dict_round_trip_continues_the_same_trajectory():
    a = clf(dtype="float64")
    for _ in range(3):
        a.train_step(X, LABELS)
    sd = a.state_dict()
    assert set(sd) == {"params", "step", "optimizer.exp_avg", "optimizer.exp_avg_sq"}
    assert sd["step"].dtype == np.int64 and sd["step"].shape == () and int(sd["step"]) == 3
    b = Model(a.spec, state=sd)
    assert b.step == 3
    ra, rb = a.train_step(X, LABELS), b.train_step(X, LABELS)
    assert ra == rb
    np.testing.assert_array_equal(a.state_dict()["params"], b.state_dict()["params"])


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("optimizer.exp_avg"), "optimizer.exp_avg"),
    (lambda d: d.update({"optimizer.momentum_buffer": d["params"]}), "optimizer.momentum_buffer"),
    (lambda d: d.update(params=d["params"][:-1]), "params"),
    (lambda d: d.update(step=np.array(-1)), "step"),
    (lambda d: d.update(step=np.array([1, 2])), "step"),
])
def test_load_state_dict_validates_names_and_sizes(change, field):
    m = clf()
    sd = m.state_dict()
    change(sd)
    with pytest.raises(InputError) as info:
        m.load_state_dict(sd)
    assert info.value.field == field


def test_float32_state_loads_into_float64_model():
    a = clf(dtype="float32")
    a.train_step(X, LABELS)
    b = clf(dtype="float64")
    b.load_state_dict(a.state_dict())
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-5)


def test_reference_agrees_with_model_on_accuracy_rule_for_sigmoid():
    m = reg(2, "sigmoid", dtype="float64")
    y = np.array([[0, 1], [1, 1], [0, 0], [1, 0]], dtype=float)
    r = m.train_step(X, y)
    from gradserve.nnkernels.params import init_params
    _, correct, _ = R.loss_and_grads(m.spec, init_params(m.spec), X, y)
    assert r.accuracy == correct / 8
