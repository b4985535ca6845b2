"""gradserve.nnkernels.reference against PyTorch: activations, losses, gradients of a
whole network, 50 steps of every optimizer, and the LR schedules."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradserve.nnkernels import (
    LayerSpec,
    LossSpec,
    ModelSpec,
    OptimizerSpec,
    OutputSpec,
    ParamLayout,
    ScheduleSpec,
    init_params,
)
from gradserve.nnkernels import reference as R
from gradserve.nnkernels.registry import (
    ACTIVATION_PARAMETERS,
    ACTIVATIONS,
    clip_coefficient,
    init_state,
    scheduled_lr,
    state_names,
)


def torch_activation(z, layer):
    """The registry's PyTorch twin of ``layer``'s activation, applied to z."""
    params = {name: getattr(layer, name) for name in ACTIVATION_PARAMETERS}
    return eval(ACTIVATIONS[layer.activation].torch, {"torch": torch, "F": F, "z": z, **params})


LAYER = {"leaky_relu": LayerSpec(6, "leaky_relu", negative_slope=0.2), "elu": LayerSpec(6, "elu", alpha=0.7)}
Z = np.concatenate([np.linspace(-25, 25, 201), [-3.0, 3.0, 0.0, 19.9, 20.1, -1e-3]])


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_and_derivative_match_torch(name):
    layer = LAYER.get(name, LayerSpec(6, name))
    z = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    out = torch_activation(z, layer)
    f, f_grad = R.ACTIVATIONS[name]
    a = f(Z, layer.activation_param)
    np.testing.assert_allclose(a, out.detach().numpy(), rtol=1e-13, atol=1e-15)
    if out.requires_grad:
        (grad,) = torch.autograd.grad(out.sum(), z)
        expected = grad.numpy()
    else:
        expected = np.zeros_like(Z)
    np.testing.assert_allclose(f_grad(Z, a, layer.activation_param), expected, rtol=1e-12, atol=1e-14)


def test_losses_match_torch():
    rs = np.random.default_rng(1)
    z = rs.normal(size=(7, 4)) * 5
    y = rs.uniform(size=(7, 4))
    loss, _ = R.mse_loss_and_delta(z, y)
    assert loss == pytest.approx(F.mse_loss(torch.tensor(z), torch.tensor(y)).item(), rel=1e-14)
    loss, _ = R.bce_with_logits_loss_and_delta(z * 10, y)
    assert loss == pytest.approx(F.binary_cross_entropy_with_logits(torch.tensor(z * 10), torch.tensor(y)).item(),
                                 rel=1e-13)
    labels = rs.integers(0, 4, 7)
    for eps in (0.0, 0.3):
        loss, _ = R.softmax_cross_entropy_loss_and_delta(z, labels, eps)
        ref = F.cross_entropy(torch.tensor(z), torch.tensor(labels), label_smoothing=eps).item()
        assert loss == pytest.approx(ref, rel=1e-13)
        probs = rs.dirichlet(np.ones(4), 7)
        loss, _ = R.softmax_cross_entropy_loss_and_delta(z, probs, eps)
        ref = F.cross_entropy(torch.tensor(z), torch.tensor(probs), label_smoothing=eps).item()
        assert loss == pytest.approx(ref, rel=1e-13)


def test_cross_entropy_is_finite_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e30, 1e30, 5.0]])
    loss, delta = R.softmax_cross_entropy_loss_and_delta(z, np.array([1, 0]))
    assert math.isfinite(loss) and np.all(np.isfinite(delta))


def torch_loss_and_grads(spec, params, X, y):
    layout = ParamLayout(spec)
    tensors = [torch.tensor(v, requires_grad=True) for pair in layout.views(params) for v in pair]
    h = torch.tensor(X)
    for i, layer in enumerate(spec.hidden):
        h = torch_activation(F.linear(h, tensors[2 * i], tensors[2 * i + 1]), layer)
    z = F.linear(h, tensors[-2], tensors[-1])
    kind = spec.output.kind
    if kind == "identity":
        loss = F.mse_loss(z, torch.tensor(y))
    elif kind == "sigmoid":
        loss = F.binary_cross_entropy_with_logits(z, torch.tensor(y))
    else:
        loss = F.cross_entropy(z, torch.tensor(y), label_smoothing=spec.loss.label_smoothing)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    flat = np.concatenate([(g if g is not None else torch.zeros_like(t)).numpy().ravel()
                           for g, t in zip(grads, tensors)])
    return loss.item(), flat


def net_spec(act, kind, **kw):
    units = {"identity": 2, "sigmoid": 3, "softmax": 4}[kind]
    layer = LAYER.get(act, LayerSpec(6, act))
    return ModelSpec(input_size=5, hidden=(layer, LayerSpec(5, "tanh")), output=OutputSpec(units, kind),
                     dtype="float64", seed=11, **kw)


def targets(kind, n, units, rs):
    if kind == "softmax":
        return rs.integers(0, units, n)
    return rs.uniform(size=(n, units)) if kind == "sigmoid" else rs.normal(size=(n, units))


@pytest.mark.parametrize("kind", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_network_gradients_match_torch_autograd(act, kind):
    spec = net_spec(act, kind, loss=LossSpec(label_smoothing=0.1 if kind == "softmax" else 0.0))
    rs = np.random.default_rng(5)
    X = rs.normal(size=(8, 5))
    y = targets(kind, 8, spec.output.units, rs)
    params = init_params(spec)
    loss, _, grads = R.loss_and_grads(spec, params, X, y)
    tloss, tgrads = torch_loss_and_grads(spec, params, X, y)
    assert loss == pytest.approx(tloss, rel=1e-12)
    np.testing.assert_allclose(grads, tgrads, rtol=1e-10, atol=1e-14)


OPTIMIZERS = [
    (OptimizerSpec("sgd", lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05, foreach=False)),
    (OptimizerSpec("sgd", lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.01, foreach=False)),
    (OptimizerSpec("sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.02),
     lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.02, foreach=False)),
    (OptimizerSpec("adagrad", lr=0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.3, eps=1e-8),
     lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.3,
                                   eps=1e-8, foreach=False)),
    (OptimizerSpec("rmsprop", lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5,
                                   centered=True, foreach=False)),
    (OptimizerSpec("rmsprop", lr=0.01, alpha=0.3),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.3, centered=False, foreach=False)),
    # eps keeps sqrt(v - ḡ²) away from 0: torch's vectorized lerp uses a fused
    # multiply-add, so 1-ulp differences would otherwise grow chaotically
    (OptimizerSpec("rmsprop", lr=0.01, alpha=0.4, centered=True, eps=0.05),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.4, centered=True, eps=0.05, foreach=False)),
    (OptimizerSpec("adam", lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05, amsgrad=True),
     lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True,
                                foreach=False)),
    (OptimizerSpec("adam", lr=0.02, beta1=0.4, beta2=0.9),
     lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.4, 0.9), foreach=False)),
    (OptimizerSpec("adamw", lr=0.01, beta1=0.85, beta2=0.99, weight_decay=0.1),
     lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.85, 0.99), weight_decay=0.1, foreach=False)),
    (OptimizerSpec("adamw", lr=0.01, weight_decay=0.3, amsgrad=True, eps=1e-5),
     lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.3, amsgrad=True, eps=1e-5, foreach=False)),
]


def synthetic_grad(p, t):
    """A gradient sequence that depends on the parameters (like a real one)."""
    return np.sin(3.0 * p + 0.1 * t) + 0.5 * p


@pytest.mark.parametrize("opt, make_torch", OPTIMIZERS, ids=[o.name for o, _ in OPTIMIZERS])
def test_optimizer_matches_torch_for_50_steps(opt, make_torch):
    p0 = np.random.default_rng(3).normal(size=37)
    p = p0.copy()
    state = init_state(opt, p.size, p.dtype)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = make_torch([tp])
    for t in range(1, 51):
        g = synthetic_grad(p, t)
        R.optimizer_step(opt, p, g, state, opt.lr, t)
        tp.grad = torch.tensor(synthetic_grad(tp.detach().numpy(), t))
        topt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-13, err_msg=f"step {t}")
    tstate = topt.state[tp]
    for name in state_names(opt):
        np.testing.assert_allclose(state[name], tstate[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("schedule, make", [
    (ScheduleSpec("constant"), lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)),
    (ScheduleSpec("step", step_size=7, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 7, gamma=0.5)),
    (ScheduleSpec("exponential", gamma=0.93), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.93)),
    (ScheduleSpec("cosine", t_max=20, eta_min=0.01),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.01)),
])
def test_schedule_matches_torch_stepped_per_optimizer_step(schedule, make):
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.3)
    sched = make(topt)
    for t in range(50):
        assert scheduled_lr(schedule, 0.3, t) == pytest.approx(topt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), t
        tp.grad = torch.ones(1)
        topt.step()
        sched.step()


def test_clip_coefficient_matches_clip_grad_norm():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    g.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([g], 1.0)
    coef = clip_coefficient(5.0, 1.0)
    np.testing.assert_allclose(np.array([3.0, 4.0]) * coef, g.grad.numpy(), rtol=1e-15)
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(5.0, 0.0) == 1.0
