"""Model.train_steps on the CUDA backend, which has no single-call run: the
Model drives the steps one by one, each exactly a train_step."""
import numpy as np

from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec, RegularizationSpec


def test_a_run_of_steps_on_cuda_equals_train_step_on_the_same_batches():
    spec = ModelSpec(input_size=3, hidden=(LayerSpec(5, "tanh", dropout=0.2),), output=OutputSpec(3, "softmax"),
                     optimizer=OptimizerSpec("adam", lr=0.05), regularization=RegularizationSpec(clip_grad_norm=0.5),
                     device="cuda", seed=7)
    rs = np.random.default_rng(0)
    X = rs.normal(size=(10, 3)).astype(np.float32)
    y = rs.integers(0, 3, 10)
    order = rs.permutation(10)
    run, steps = Model(spec), Model(spec)
    r = run.train_steps(X, y, order, 4)
    want = [steps.train_step(X[order[b * 4:(b + 1) * 4]], y[order[b * 4:(b + 1) * 4]]) for b in range(3)]
    assert r.error is None and r.rows == [4, 4, 2] and r.results == want
    for k, v in run.state_dict().items():
        np.testing.assert_array_equal(v, steps.state_dict()[k], err_msg=k)
