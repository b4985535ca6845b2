"""CudaBackend against the NumPy reference (and the CPU backend) on the same
seeds: forward, loss, accuracy count, gradients, gradient norm, 20 optimizer
steps, dropout and noise draws (input, hidden-input, weight, target), state
transfer between devices.

Shapes are tiny (the simulator runs ~0.1 ms per simulated thread and
launch): 3→5→4→3 with batches of 1, 5 and 7 rows, so every product has
partial tiles (the simulator's tile is 4). float64 must agree within 1e-9,
float32 within 1e-4.
"""
import dataclasses
import math

import numpy as np
import pytest

from gradserve.nnkernels import (
    LayerSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    RegularizationSpec,
    ScheduleSpec,
)
from gradserve.nnkernels import reference as ref
from gradserve.nnkernels.cuda.backend import CudaBackend
from gradserve.nnkernels.params import init_params
from gradserve.nnkernels.registry import ACTIVATIONS, clip_coefficient, init_state, scheduled_lr

TOL = {"float64": dict(rtol=1e-9, atol=1e-9), "float32": dict(rtol=1e-4, atol=1e-4)}


def make_spec(dtype="float64", hidden=((5, "tanh"), (4, "relu")), out=(3, "softmax"), input_size=3,
              **kw):
    layers = tuple(h if isinstance(h, LayerSpec) else LayerSpec(h[0], h[1]) for h in hidden)
    return ModelSpec(input_size=input_size, hidden=layers, output=OutputSpec(*out), dtype=dtype,
                     device="cuda", seed=7, **kw)


def batch(spec, n, *, labels=True, seed=1, scale=2.0):
    r = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    X = (scale * r.normal(size=(n, spec.input_size))).astype(dt)
    m = spec.output.units
    kind = spec.output.kind
    if kind == "softmax":
        if labels:
            y = r.integers(0, m, n).astype(np.int64)
        else:
            y = r.dirichlet(np.ones(m), size=n).astype(dt)
    elif kind == "sigmoid":
        y = r.uniform(size=(n, m)).astype(dt)
        y[::2] = np.round(y[::2])
    else:
        y = r.normal(size=(n, m)).astype(dt)
    return X, y


def close(a, b, dtype, what=""):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **TOL[dtype], err_msg=what)


def check_forward_and_grads(spec, X, y, step=0):
    params = init_params(spec)
    be = CudaBackend(spec, params)
    dt = spec.dtype
    # inference: probabilities and logits
    close(be.forward(X), ref.predict(spec, params, X), dt, "forward")
    close(be.forward(X, logits=True), ref.predict(spec, params, X, logits=True), dt, "logits")
    # training: loss, correct count, gradients, squared norm
    loss, correct, gsq = be.loss_and_grads(X, y, step)
    rloss, rcorrect, rgrads = ref.loss_and_grads(spec, params, X, y, step)
    close(loss, rloss, dt, "loss")
    assert correct == rcorrect
    grads = be.get_grads()
    assert grads.dtype == np.dtype(dt)
    close(grads, rgrads, dt, "grads")
    close(gsq, float(np.sum(rgrads.astype(np.float64) ** 2)), dt, "grad sq norm")
    # parameters untouched
    assert np.array_equal(be.get_params(), params)
    return be


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_every_activation(act, dtype):
    hidden = (LayerSpec(5, act, negative_slope=0.2, alpha=0.7), LayerSpec(4, act, negative_slope=0.2, alpha=0.7))
    spec = make_spec(dtype, hidden=hidden)
    X, y = batch(spec, 5)
    check_forward_and_grads(spec, X, y)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", ["mse", "bce", "ce_labels", "ce_labels_smooth", "ce_soft_smooth"])
def test_every_loss(case, dtype):
    out, labels, loss = {
        "mse": ((3, "identity"), True, LossSpec()),
        "bce": ((3, "sigmoid"), True, LossSpec()),
        "ce_labels": ((3, "softmax"), True, LossSpec()),
        "ce_labels_smooth": ((3, "softmax"), True, LossSpec("softmax_cross_entropy", 0.2)),
        "ce_soft_smooth": ((3, "softmax"), False, LossSpec("softmax_cross_entropy", 0.15)),
    }[case]
    spec = make_spec(dtype, hidden=((5, "elu"),), out=out, loss=loss)
    X, y = batch(spec, 7, labels=labels)
    check_forward_and_grads(spec, X, y)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_of_one_and_no_hidden_layer(dtype):
    spec = make_spec(dtype)
    X, y = batch(spec, 1)
    check_forward_and_grads(spec, X, y)
    linear = make_spec(dtype, hidden=(), out=(2, "sigmoid"), input_size=6)
    X, y = batch(linear, 3)
    check_forward_and_grads(linear, X, y)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dropout_and_input_noise_draw_the_reference_masks(dtype):
    hidden = (LayerSpec(5, "relu", dropout=0.4), LayerSpec(4, "gelu", dropout=0.25))
    spec = make_spec(dtype, hidden=hidden, regularization=RegularizationSpec(input_noise_std=0.3))
    X, y = batch(spec, 6)
    for step in (0, 3):  # different steps draw different masks: both must match
        check_forward_and_grads(spec, X, y, step=step)
    # the masks really drop something and differ from an eval pass
    params = init_params(spec)
    _, _, g_train = ref.loss_and_grads(spec, params, X, y, 3)
    no_reg = dataclasses.replace(spec, hidden=tuple(dataclasses.replace(l, dropout=0.0) for l in hidden),
                                 regularization=RegularizationSpec())
    _, _, g_plain = ref.loss_and_grads(no_reg, params, X, y, 3)
    assert np.isfinite(g_train).all() and not np.allclose(g_train, g_plain)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("out", [(3, "identity"), (3, "softmax")])
def test_hidden_weight_and_target_noise_draw_the_reference_noise(dtype, out):
    """Hidden-input noise (after dropout), weight noise (W̃ in the forward and
    the backward product) and, for regression, target noise: the same draws
    as the reference; the stored parameters stay clean."""
    hidden = (LayerSpec(5, "relu", dropout=0.4, noise_std=0.3), LayerSpec(4, "gelu", noise_std=0.2))
    reg = RegularizationSpec(input_noise_std=0.3, weight_noise_std=0.1,
                             target_noise_std=0.5 if out[1] == "identity" else 0.0)
    spec = make_spec(dtype, hidden=hidden, out=out, regularization=reg)
    X, y = batch(spec, 6)
    for step in (0, 3):
        check_forward_and_grads(spec, X, y, step=step)
    # each kind alone changes the gradient (the draws are really applied)
    params = init_params(spec)
    plain = dataclasses.replace(spec, hidden=tuple(dataclasses.replace(l, noise_std=0.0) for l in hidden),
                                regularization=RegularizationSpec(input_noise_std=0.3))
    _, _, g_plain = ref.loss_and_grads(plain, params, X, y, 3)
    kinds = [dataclasses.replace(plain, hidden=hidden),
             dataclasses.replace(plain, regularization=dataclasses.replace(plain.regularization, weight_noise_std=0.1))]
    if out[1] == "identity":
        kinds.append(dataclasses.replace(plain, regularization=dataclasses.replace(plain.regularization,
                                                                                    target_noise_std=0.5)))
    for one in kinds:
        be = CudaBackend(one, params)
        be.loss_and_grads(X, y, 3)
        got = be.get_grads()
        assert np.isfinite(got).all() and not np.allclose(got, g_plain, rtol=1e-3)


OPTIMIZERS = {
    "sgd_momentum_dampening_wd": OptimizerSpec("sgd", lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov": OptimizerSpec("sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
    "sgd_plain": OptimizerSpec("sgd", lr=0.1),
    "adagrad": OptimizerSpec("adagrad", lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-8,
                             weight_decay=0.01),
    "rmsprop_centered_momentum": OptimizerSpec("rmsprop", lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5,
                                               centered=True, weight_decay=0.01),
    "rmsprop_plain": OptimizerSpec("rmsprop", lr=0.01),
    "adam_amsgrad_l2": OptimizerSpec("adam", lr=0.01, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.01,
                                     amsgrad=True),
    "adamw": OptimizerSpec("adamw", lr=0.01, beta1=0.85, beta2=0.995, weight_decay=0.05),
    "adamw_amsgrad": OptimizerSpec("adamw", lr=0.02, amsgrad=True),
}


def run_steps(spec, be, params, state, X, y, steps):
    """``steps`` training steps on the backend and on the reference, in
    lockstep, as Model.train_step drives a backend."""
    for step in range(steps):
        loss, correct, gsq = be.loss_and_grads(X, y, step)
        norm = math.sqrt(gsq)
        scale = clip_coefficient(norm, spec.regularization.clip_grad_norm)
        lr = scheduled_lr(spec.schedule, spec.optimizer.lr, step)
        be.step(lr, step + 1, scale)
        rloss, rcorrect, rnorm, rlr = ref.train_step(spec, params, state, X, y, step)
        close(loss, rloss, spec.dtype, f"loss at step {step}")
        close(norm, rnorm, spec.dtype, f"grad norm at step {step}")
        assert correct == rcorrect


def trained_20_steps(spec):
    """A CudaBackend after 20 steps on one batch, and the reference's params and optimizer state after the same."""
    X, y = batch(spec, 5)
    params = init_params(spec)
    state = init_state(spec.optimizer, params.size, params.dtype)
    be = CudaBackend(spec, params)
    run_steps(spec, be, params, state, X, y, 20)
    return be, params, state


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_twenty_optimizer_steps(name, dtype):
    spec = make_spec(dtype, hidden=((4, "tanh"),), out=(3, "softmax"), optimizer=OPTIMIZERS[name])
    be, params, state = trained_20_steps(spec)
    close(be.get_params(), params, dtype, "params after 20 steps")
    got = be.get_state()
    assert set(got) == set(state)
    for k in state:
        close(got[k], state[k], dtype, f"state {k}")


@pytest.mark.parametrize("opt", [OptimizerSpec("sgd", lr=0.01, momentum=0.9),
                                 OptimizerSpec("rmsprop", lr=0.01, alpha=0.9, momentum=0.5, centered=True),
                                 OptimizerSpec("adamw", lr=0.01, beta1=0.9, beta2=0.9, weight_decay=0.05)],
                         ids=["sgd", "rmsprop", "adamw"])
def test_decayed_optimizer_state_is_flushed_as_on_the_cpu(opt):
    """State started just above the smallest normal float32, then zero
    gradients: every decaying buffer crosses into the subnormal range,
    where the kernel (as the CPU's and the reference) stores +0 instead."""
    spec = make_spec("float32", hidden=((2, "tanh"),), out=(2, "identity"), optimizer=opt)
    params = init_params(spec)
    be = CudaBackend(spec, params)
    tiny = np.finfo(np.float32).tiny
    state = {k: np.full(params.size, 3 * tiny, np.float32) for k in be.get_state()}
    be.set_state(state)
    zero = np.zeros_like(params)
    for t in range(2, 22):  # t = 2..: SGD's buffer is not overwritten by the first-step rule
        be.set_grads(zero)
        be.step(0.01, t, 1.0)
        ref.optimizer_step(spec.optimizer, params, zero, state, 0.01, t)
    got = be.get_state()
    for k in state:
        assert not ((got[k] != 0) & (np.abs(got[k]) < tiny)).any(), k
        assert (state[k] == 0).any(), k  # the reference flushed something: the test crossed the range
        close(got[k], state[k], "float32", f"state {k}")
    close(be.get_params(), params, "float32", "params")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_clipping_schedule_dropout_noise_training(dtype):
    """grad_scale (clipping by global norm) fused into the optimizer, with a
    schedule, dropout and input noise, over 20 steps."""
    spec = make_spec(dtype, hidden=(LayerSpec(5, "leaky_relu", negative_slope=0.1, dropout=0.3),),
                     out=(2, "identity"),
                     optimizer=OptimizerSpec("adam", lr=0.05),
                     schedule=ScheduleSpec("cosine", t_max=20, eta_min=0.001),
                     regularization=RegularizationSpec(input_noise_std=0.2, clip_grad_norm=0.05))
    be, params, state = trained_20_steps(spec)
    close(be.get_params(), params, dtype, "params after 20 clipped steps")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_with_every_noise_kind(dtype):
    """20 steps with hidden-input, weight and target noise (new draws each
    step) track the reference."""
    spec = make_spec(dtype, hidden=(LayerSpec(5, "tanh", dropout=0.2, noise_std=0.2),), out=(2, "identity"),
                     optimizer=OptimizerSpec("adam", lr=0.05),
                     regularization=RegularizationSpec(input_noise_std=0.1, weight_noise_std=0.05, target_noise_std=0.3))
    be, params, state = trained_20_steps(spec)
    close(be.get_params(), params, dtype, "params after 20 noisy steps")


def test_state_dict_moves_between_cuda_and_cpu():
    """A model trained on CUDA saves and loads on the CPU (and back) with
    identical parameters and optimizer state; training continues the same."""
    from gradserve.nnkernels.model import Model
    spec = make_spec("float64", hidden=((4, "relu"),), out=(3, "softmax"),
                     optimizer=OptimizerSpec("rmsprop", lr=0.01, momentum=0.5, centered=True))
    cpu_spec = dataclasses.replace(spec, device="cpu")
    X, y = batch(spec, 5)
    gpu = Model(spec)
    assert type(gpu.backend).__name__ == "CudaBackend"
    cpu = Model(cpu_spec)
    assert np.array_equal(gpu.backend.get_params(), cpu.backend.get_params())  # same init on both
    for _ in range(3):
        gpu.train_step(X, y)
    saved = gpu.state_dict()
    moved = Model(cpu_spec, state=saved)
    for k, v in moved.state_dict().items():
        assert np.array_equal(v, saved[k]), k
    back = Model(spec, state=moved.state_dict())
    for k, v in back.state_dict().items():
        assert np.array_equal(v, saved[k]), k
    a, b = moved.train_step(X, y), back.train_step(X, y)
    close(a.loss, b.loss, "float64")
    close(back.state_dict()["params"], moved.state_dict()["params"], "float64")


def test_cpu_and_cuda_backends_agree_through_model():
    from gradserve.nnkernels.model import Model
    spec = make_spec("float32", hidden=(LayerSpec(5, "hardswish", dropout=0.2), LayerSpec(4, "softplus")),
                     out=(3, "softmax"), loss=LossSpec("softmax_cross_entropy", 0.1),
                     optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9))
    X, y = batch(spec, 7)
    gpu, cpu = Model(spec), Model(dataclasses.replace(spec, device="cpu"))
    for _ in range(5):
        a, b = gpu.train_step(X, y), cpu.train_step(X, y)
        close(a.loss, b.loss, "float32")
        assert a.accuracy == b.accuracy
    close(gpu.predict(X), cpu.predict(X), "float32")
    la, ga = gpu.gradients(X, y)
    lb, gb = cpu.gradients(X, y)
    for k in ga:
        close(ga[k], gb[k], "float32", k)


def test_set_params_and_state_round_trip():
    spec = make_spec("float64", optimizer=OptimizerSpec("adam", amsgrad=True))
    params = init_params(spec)
    be = CudaBackend(spec, params)
    new = np.arange(params.size, dtype=np.float64) / params.size
    be.set_params(new)
    assert np.array_equal(be.get_params(), new)
    st = {k: np.full(params.size, i + 1.0) for i, k in enumerate(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))}
    be.set_state(st)
    got = be.get_state()
    for k in st:
        assert np.array_equal(got[k], st[k])
    with pytest.raises(ValueError):
        be.set_state({"exp_avg": st["exp_avg"]})
    with pytest.raises(ValueError):
        be.set_params(new[:-1])


def test_concurrent_predictions_match_serial():
    """forward from several threads at once (each borrows its own stream and
    workspaces; under the simulator the calls are serialized) gives what
    one thread gets, for batches of different sizes."""
    from concurrent.futures import ThreadPoolExecutor
    spec = make_spec("float64")
    params = init_params(spec)
    be = CudaBackend(spec, params)
    batches = [batch(spec, n, seed=n)[0] for n in (1, 3, 6, 2)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(be.forward, batches * 2))
    for X, out in zip(batches * 2, got):
        close(out, ref.predict(spec, params, X), "float64")
