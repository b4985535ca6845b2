"""The server's gradient steps (ApplyGradients, OptimizerStep) on a CUDA
model equal the same steps on the CPU: the gradient reaches the device's
buffer."""
import numpy as np

from gradserve.nnkernels import Model, ModelSpec
from gradserve.server.gradients import GradientAccumulator, apply_gradients, flat_gradients

SPEC = dict(input_size=3, hidden=[{"units": 5, "activation": "tanh"}], output={"units": 2, "kind": "softmax"},
            optimizer={"name": "adam", "lr": 0.05}, regularization={"clip_grad_norm": 1.0}, dtype="float64", seed=2)


def test_apply_gradients_and_accumulated_step_match_the_cpu():
    cpu, gpu = (Model(ModelSpec.from_dict({**SPEC, "device": d})) for d in ("cpu", "cuda"))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3)), rng.integers(0, 2, 6)
    for model in (cpu, gpu):
        grads = {n: np.sin(np.arange(w.size).reshape(w.shape) + 1.0) for n, w in model.get_weights().items()}
        r = apply_gradients(model, flat_gradients(model, grads))
        assert r.step == 1
        acc = GradientAccumulator(model.step, np.zeros(model.num_params))
        acc.add(model, X[:2], y[:2]), acc.add(model, X[2:], y[2:])
        apply_gradients(model, *acc.mean(model.dtype))
    want = cpu.get_weights()
    for name, w in gpu.get_weights().items():
        np.testing.assert_allclose(w, want[name], rtol=1e-12, atol=1e-14, err_msg=name)
    assert not np.allclose(want["layers.0.weight"], Model(ModelSpec.from_dict(SPEC)).get_weights()["layers.0.weight"])
