"""The registry walk both test processes run (tests/test_registry.py on the
CPU, tests/cuda/test_cuda_registry.py under the CUDA simulator): a backend
must compute what the reference computes for every activation, output kind
and optimizer the registry lists. A backend with no formula for a code
yields NaN (or a KeyError in the reference), so a new registry entry fails
here until every backend has it."""
import numpy as np

from gradserve.nnkernels import LayerSpec, LossSpec, Model, ModelSpec, OptimizerSpec, OutputSpec
from gradserve.nnkernels import reference as R
from gradserve.nnkernels.params import init_params
from gradserve.nnkernels.registry import ACTIVATIONS, OPTIMIZERS, OUTPUTS, init_state

# hyper-parameters that make an optimizer keep every state buffer it has
# (an optimizer not named here runs with its defaults)
EVERY_BUFFER = {"sgd": dict(momentum=0.9), "rmsprop": dict(momentum=0.5, centered=True),
                "adam": dict(amsgrad=True), "adamw": dict(amsgrad=True)}
TOL = dict(rtol=1e-9, atol=1e-12)  # float64


def _spec(device, activation="tanh", kind="softmax", optimizer=None):
    layer = LayerSpec(4, activation, negative_slope=0.2, alpha=0.7)
    return ModelSpec(input_size=3, hidden=(layer,), output=OutputSpec(3, kind), dtype="float64", device=device,
                     seed=3, optimizer=optimizer or OptimizerSpec("sgd", lr=0.1),
                     loss=LossSpec(label_smoothing=0.1 if kind == "softmax" else 0.0))


def _batch(kind, rs, n=5):
    X = 2 * rs.normal(size=(n, 3))
    if OUTPUTS[kind].class_labels:
        return X, rs.integers(0, 3, n)
    lo, hi = OUTPUTS[kind].target_range or (-2.0, 2.0)
    return X, rs.uniform(lo, hi, size=(n, 3))


def _same_as_reference(spec, X, y, what):
    params = init_params(spec)
    model = Model(spec)
    np.testing.assert_allclose(model.predict(X), R.predict(spec, params, X), **TOL, err_msg=f"{what}: predict")
    loss, grads = model.gradients(X, y)
    ref_loss, _, ref_grads = R.loss_and_grads(spec, params, X, y)
    np.testing.assert_allclose(loss, ref_loss, **TOL, err_msg=f"{what}: loss")
    np.testing.assert_allclose(np.concatenate([g.ravel() for g in grads.values()]), ref_grads, **TOL,
                               err_msg=f"{what}: gradients")


def assert_backend_handles_every_registry_entry(device: str) -> None:
    """Every activation, output kind and optimizer of the registry, run on
    ``device`` through Model, equals the NumPy reference (float64)."""
    rs = np.random.default_rng(0)
    for name in ACTIVATIONS:
        _same_as_reference(_spec(device, activation=name), *_batch("softmax", rs), f"activation {name}")
    for kind in OUTPUTS:
        _same_as_reference(_spec(device, kind=kind), *_batch(kind, rs), f"output kind {kind}")
    for name in OPTIMIZERS:
        opt = OptimizerSpec(name, lr=0.05, **EVERY_BUFFER.get(name, {}))
        spec = _spec(device, optimizer=opt)
        model, params = Model(spec), init_params(spec)
        state = init_state(opt, params.size, params.dtype)
        for step in range(3):
            X, y = _batch("softmax", rs)
            model.train_step(X, y)
            R.train_step(spec, params, state, X, y, step)
        saved = model.state_dict()
        np.testing.assert_allclose(saved["params"], params, **TOL, err_msg=f"optimizer {name}: params")
        assert {k for k in saved if k.startswith("optimizer.")} == {f"optimizer.{k}" for k in state}, name
        for k, buf in state.items():
            np.testing.assert_allclose(saved[f"optimizer.{k}"], buf, **TOL, err_msg=f"optimizer {name}: {k}")
