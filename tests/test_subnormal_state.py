"""Optimizer state never holds subnormal numbers (``reference.flushed``): a
state value that decays once its gradient is zero (an always-zero input
pixel's weights) would otherwise sink into the subnormal range, stay there
(rounding back to itself) and cost ~100 cycles an operation every step.

The state is started just above the smallest normal float32 so a few
steps of zero gradient carry it across. PyTorch, fed the same gradients,
ends with subnormals in that state (the situation is real); the CPU
backend and the reference end with zeros there, agree bit for bit, and
their parameters stay within rounding of PyTorch's."""
import numpy as np
import pytest
import torch

from gradserve.nnkernels import LayerSpec, Model, ModelSpec, OptimizerSpec, OutputSpec
from gradserve.nnkernels import reference as ref
from gradserve.nnkernels.registry import state_names

TINY = np.finfo(np.float32).tiny
CASES = [
    (OptimizerSpec("sgd", lr=0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=False)),
    (OptimizerSpec("rmsprop", lr=0.01, alpha=0.9, momentum=0.9, centered=True),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.9, centered=True, foreach=False)),
    (OptimizerSpec("adam", lr=0.01, beta1=0.9, beta2=0.9),
     lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.9), foreach=False)),
    (OptimizerSpec("adamw", lr=0.01, beta1=0.9, beta2=0.9, weight_decay=0.01),
     lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.9), weight_decay=0.01, foreach=False)),
]


def subnormal(a):
    return (a != 0) & (np.abs(a) < TINY)


@pytest.mark.parametrize("opt, make_torch", CASES, ids=[o.name for o, _ in CASES])
def test_decayed_state_is_flushed_to_zero_not_left_subnormal(opt, make_torch):
    spec = ModelSpec(input_size=3, hidden=(LayerSpec(2, "relu"),), output=OutputSpec(2, "identity"),
                     optimizer=opt, dtype="float32", seed=1)
    model = Model(spec)
    be = model.backend
    n = be.params.size  # 3·2+2 + 2·2+2 = 14
    rs = np.random.default_rng(0)
    g1 = rs.standard_normal(n).astype(np.float32)
    params = be.get_params()
    state = {k: np.zeros(n, np.float32) for k in state_names(opt)}
    tp = torch.tensor(params.copy(), requires_grad=True)
    topt = make_torch([tp])
    # step 1 on all three with the same gradient, then the state's first half set just above TINY
    be.set_grads(g1)
    be.step(opt.lr, 1, 1.0)
    ref.optimizer_step(opt, params, g1, state, opt.lr, 1)
    tp.grad = torch.from_numpy(g1.copy())
    topt.step()
    start = be.get_state()
    for k in start:
        sign = 1 if "sq" in k or "square" in k else np.sign(g1[: n // 2])  # square averages stay >= 0
        start[k][: n // 2] = np.float32(3 * TINY) * sign
        state[k][:] = start[k]
        topt.state[tp][k].copy_(torch.from_numpy(start[k]))
    be.set_state(start)
    be.set_params(params)
    with torch.no_grad():
        tp.copy_(torch.from_numpy(params))
    for t in range(2, 40):  # the first half's gradient is zero from now on
        g = rs.standard_normal(n).astype(np.float32)
        g[: n // 2] = 0
        be.set_grads(g)
        be.step(opt.lr, t, 1.0)
        ref.optimizer_step(opt, params, g, state, opt.lr, t)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    got = be.get_state()
    torch_state = {k: topt.state[tp][k].numpy() for k in got}
    assert any(subnormal(v).any() for v in torch_state.values())  # torch keeps them
    for k, v in got.items():
        assert not subnormal(v).any(), k
        np.testing.assert_array_equal(v, state[k], err_msg=k)  # the reference flushes the same values
        np.testing.assert_array_equal(v, np.where(subnormal(torch_state[k]), 0, v), err_msg=k)
    assert np.isfinite(params).all()
    np.testing.assert_array_equal(be.get_params(), params)
    np.testing.assert_allclose(be.get_params(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_nan_inf_and_zero_state_values_pass_the_flush():
    a = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, TINY, -TINY, TINY / 2, -TINY / 3], np.float32)
    out = ref.flushed(a.copy())
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf
    assert np.signbit(out[4]) and not np.signbit(out[3])  # zeros keep their sign
    np.testing.assert_array_equal(out[5:], [TINY, -TINY, 0, 0])
    assert not np.signbit(out[8])  # +0, as the kernels store
