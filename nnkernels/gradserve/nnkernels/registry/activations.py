"""The activation registry: every hidden-layer activation by name, with the
code the kernels know it by, the layer field holding its parameter, and its
definition (formula, derivative, and the same function in PyTorch).

Adding an activation is one entry here plus its formula in each backend: the
NumPy reference (``nnkernels.reference``), the CPU kernels (``_act`` and
``_act_grad`` in ``nnkernels.cpu.kernels``) and the CUDA device functions
(``nnkernels.cuda.device``). A backend with no formula for a code computes
NaN, so every test that iterates this registry fails until it has one.

Codes are fixed once given: Numba's on-disk cache holds compiled kernels
with the codes frozen in and notices only edits of the kernel's own file, so
give a new entry the next free code and never renumber.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .fields import Field


@dataclass(frozen=True)
class Activation:
    """One activation f. ``torch`` is the same function of ``z`` as a PyTorch
    expression over ``torch``, ``F`` (torch.nn.functional), ``z`` and the
    parameter by its field name; tests/test_reference.py evaluates it.
    ``param`` names the LayerSpec field the kernels receive as the
    activation's one parameter (None: it takes none). ``trainable`` is False
    when f' is zero everywhere: no gradient passes through such a layer."""

    name: str
    code: int
    formula: str
    derivative: str
    torch: str
    param: str | None = None
    trainable: bool = True


# the LayerSpec fields that hold an activation's parameter
PARAMETERS = {
    "negative_slope": Field(float, 0.01, doc="leaky_relu: the slope for z <= 0"),
    "alpha": Field(float, 1.0, lo=0.0, lo_open=True, doc="elu: the scale of the negative branch"),
}

_ENTRIES = (
    Activation("identity", 0, "z", "1", "z"),
    Activation("relu", 1, "max(z, 0)", "1 if z > 0 else 0 (torch's threshold_backward)", "F.relu(z)"),
    Activation("leaky_relu", 2, "z if z > 0 else negative_slope·z", "1 if z > 0 else negative_slope",
               "F.leaky_relu(z, negative_slope)", param="negative_slope"),
    Activation("elu", 3, "z if z > 0 else alpha·(exp(z) - 1)", "1 if z > 0 else alpha·exp(z)",
               "F.elu(z, alpha)", param="alpha"),
    Activation("softplus", 4, "log(1 + exp(z)), and z where z > 20 (beta 1, threshold 20)",
               "sigmoid(z), and 1 where z > 20", "F.softplus(z)"),
    Activation("sigmoid", 5, "1 / (1 + exp(-z))", "a·(1 - a) with a = f(z)", "torch.sigmoid(z)"),
    Activation("tanh", 6, "tanh(z)", "1 - a² with a = f(z)", "torch.tanh(z)"),
    Activation("hardswish", 7, "0 if z <= -3; z if z >= 3; z·(z + 3)/6 between",
               "0 if z <= -3; z/3 + 1/2 if -3 < z < 3; 1 if z >= 3 (torch 2.x, kinks included)",
               "F.hardswish(z)"),
    Activation("gelu", 8, "0.5·z·(1 + tanh(sqrt(2/π)·(z + 0.044715·z³)))",
               "0.5·(1 + t) + 0.5·z·(1 - t²)·sqrt(2/π)·(1 + 3·0.044715·z²), t = tanh(sqrt(2/π)·(z + 0.044715·z³))",
               "F.gelu(z, approximate='tanh')"),
    Activation("step", 9, "1 if z > 0 else 0 (threshold unit)",
               "0 everywhere: the jump at 0 has no usable derivative", "(z > 0).to(z.dtype)", trainable=False),
    Activation("silu", 10, "z·σ(z) (swish with beta 1)", "σ(z)·(1 + z·(1 - σ(z))) (torch's silu_backward)",
               "F.silu(z)"),
    Activation("mish", 11, "z·tanh(softplus(z)), softplus with threshold 20",
               "t + z·σ(z)·(1 - t²) with t = tanh(softplus(z)) (torch's mish_backward)", "F.mish(z)"),
)

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in _ENTRIES}

# ActivationCode.RELU etc.: the codes as constants the kernels compare with
ActivationCode = IntEnum("ActivationCode", {a.name.upper(): a.code for a in _ENTRIES}, module=__name__)
