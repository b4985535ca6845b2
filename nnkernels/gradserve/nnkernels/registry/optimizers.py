"""The optimizer registry: every optimizer by name, with its kernel code, the
hyper-parameters it reads (defaults and valid ranges as torch.optim's), its
state buffers (names as in torch.optim's state dicts, when each is kept,
initial value), and the step policy every device shares: which buffers a
spec keeps, fresh state, and the gradient-clipping coefficient.

Adding an optimizer is one entry here plus its formula in each backend:
``nnkernels.reference`` (the oracle), the coefficient function in
``nnkernels.kernel_args`` and the CPU and CUDA optimizer kernels. Codes are
fixed once given (see ``registry.activations``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import numpy as np

from .fields import Field

# OptimizerSpec's hyper-parameters. lr, weight_decay and eps (default None)
# take the chosen optimizer's own default; every other one an optimizer does
# not read must stay at its default.
HYPERPARAMETERS = {
    "lr": Field(float, None, lo=0.0, doc="learning rate (before the schedule)"),
    "weight_decay": Field(float, None, lo=0.0, doc="L2 penalty (AdamW: decoupled decay)"),
    "eps": Field(float, None, lo=0.0, doc="added to the denominator"),
    "momentum": Field(float, 0.0, lo=0.0, doc="sgd, rmsprop"),
    "dampening": Field(float, 0.0, lo=0.0, hi=1.0, doc="sgd"),
    "nesterov": Field(bool, False, doc="sgd; needs momentum > 0 and zero dampening"),
    "beta1": Field(float, 0.9, lo=0.0, hi=1.0, hi_open=True, doc="adam(w): decay of the mean"),
    "beta2": Field(float, 0.999, lo=0.0, hi=1.0, hi_open=True, doc="adam(w): decay of the squared mean"),
    "amsgrad": Field(bool, False, doc="adam(w): keep the maximum squared mean"),
    "alpha": Field(float, 0.99, lo=0.0, hi=1.0, doc="rmsprop: decay of the squared mean"),
    "centered": Field(bool, False, doc="rmsprop: divide by the variance estimate"),
    "lr_decay": Field(float, 0.0, lo=0.0, doc="adagrad"),
    "initial_accumulator_value": Field(float, 0.0, lo=0.0, doc="adagrad: the sum's start"),
}
# the hyper-parameters every optimizer has, with a default of its own
SHARED = tuple(name for name, f in HYPERPARAMETERS.items() if f.default is None)


@dataclass(frozen=True)
class StateBuffer:
    """One state buffer, shaped like the flat parameters. ``kept(opt)``: the
    spec keeps it (torch.optim creates a buffer only when its feature is on);
    ``initial(opt)``: its starting value."""

    name: str
    kept: Callable = lambda opt: True
    initial: Callable = lambda opt: 0.0


@dataclass(frozen=True)
class Optimizer:
    """One optimizer. ``defaults``: its values of the SHARED hyper-parameters;
    ``uses``: the other hyper-parameters it reads; ``state``: its buffers, in
    the order of the kernels' state slots."""

    name: str
    code: int
    torch: str
    defaults: dict
    uses: tuple[str, ...]
    state: tuple[StateBuffer, ...]
    formula: str


_ENTRIES = (
    Optimizer("sgd", 0, "torch.optim.SGD", dict(lr=1e-3, weight_decay=0.0, eps=0.0),
              ("momentum", "dampening", "nesterov"),
              (StateBuffer("momentum_buffer", kept=lambda o: o.momentum != 0),),
              "g ← g + wd·p; if momentum: b ← g at t = 1, else b ← μ·b + (1-τ)·g; "
              "g ← g + μ·b (nesterov) or g ← b; p ← p - lr·g"),
    Optimizer("adagrad", 1, "torch.optim.Adagrad", dict(lr=1e-2, weight_decay=0.0, eps=1e-10),
              ("lr_decay", "initial_accumulator_value"),
              (StateBuffer("sum", initial=lambda o: o.initial_accumulator_value),),
              "g ← g + wd·p; clr = lr/(1 + (t-1)·lr_decay); s ← s + g²; p ← p - clr·g/(sqrt(s) + eps)"),
    Optimizer("rmsprop", 2, "torch.optim.RMSprop", dict(lr=1e-2, weight_decay=0.0, eps=1e-8),
              ("alpha", "momentum", "centered"),
              (StateBuffer("square_avg"),
               StateBuffer("momentum_buffer", kept=lambda o: o.momentum > 0),
               StateBuffer("grad_avg", kept=lambda o: o.centered)),
              "g ← g + wd·p; v ← α·v + (1-α)·g²; centered: ḡ ← lerp(ḡ, g, 1-α), d = sqrt(v - ḡ²) + eps, "
              "else d = sqrt(v) + eps; momentum: b ← μ·b + g/d, p ← p - lr·b; else p ← p - lr·g/d"),
    Optimizer("adam", 3, "torch.optim.Adam", dict(lr=1e-3, weight_decay=0.0, eps=1e-8),
              ("beta1", "beta2", "amsgrad"),
              (StateBuffer("exp_avg"), StateBuffer("exp_avg_sq"),
               StateBuffer("max_exp_avg_sq", kept=lambda o: o.amsgrad)),
              "g ← g + wd·p; m ← lerp(m, g, 1-β1); v ← β2·v + (1-β2)·g²; amsgrad: v̂ ← max(v̂, v), else v̂ = v; "
              "p ← p - (lr/(1-β1^t))·m/(sqrt(v̂)/sqrt(1-β2^t) + eps)"),
    Optimizer("adamw", 4, "torch.optim.AdamW", dict(lr=1e-3, weight_decay=1e-2, eps=1e-8),
              ("beta1", "beta2", "amsgrad"),
              (StateBuffer("exp_avg"), StateBuffer("exp_avg_sq"),
               StateBuffer("max_exp_avg_sq", kept=lambda o: o.amsgrad)),
              "Adam with p ← p·(1 - lr·wd) first instead of g ← g + wd·p (decoupled weight decay)"),
)

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in _ENTRIES}

OptimizerCode = IntEnum("OptimizerCode", {o.name.upper(): o.code for o in _ENTRIES}, module=__name__)

# state slots every optimizer kernel takes (buffers a spec does not keep are empty)
STATE_SLOTS = max(len(o.state) for o in _ENTRIES)


def state_names(opt) -> tuple[str, ...]:
    """The state buffers an OptimizerSpec keeps, named as in torch.optim's
    state dicts, in slot order."""
    return tuple(b.name for b in OPTIMIZERS[opt.name].state if b.kept(opt))


def init_state(opt, size: int, dtype) -> dict[str, np.ndarray]:
    """Fresh state as torch.optim creates it: flat buffers of ``size``
    (Adagrad's sum at initial_accumulator_value, everything else at 0)."""
    return {b.name: np.full(size, b.initial(opt), dtype=dtype)
            for b in OPTIMIZERS[opt.name].state if b.kept(opt)}


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: min(1, max_norm/(total_norm + 1e-6));
    1.0 when clipping is off (max_norm == 0)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))
