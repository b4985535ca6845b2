"""The output-kind registry: each output layer's activation with the loss it
trains with (fused in the backward pass: dL/dlogits comes out directly), and
what its targets, loss mean and accuracy are counted over.

Adding an output kind is one entry here plus its formulas in each backend
(reference, CPU and CUDA kernels). Codes are fixed once given (see
``registry.activations``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


@dataclass(frozen=True)
class OutputKind:
    """One output kind. ``per_row``: the loss is a mean over rows and
    accuracy counts rows (else both count every element). ``classifier``:
    steps report accuracy. ``class_labels``: integer labels (n,) are
    accepted as targets besides (n, units) floats; ``target_range``: the
    interval float targets must lie in."""

    name: str
    code: int
    loss: str
    activation: str
    loss_formula: str
    torch: str
    per_row: bool
    classifier: bool
    accuracy: str = ""
    class_labels: bool = False
    target_range: tuple[float, float] | None = None
    min_units: int = 1


_ENTRIES = (
    OutputKind("identity", 0, "mse", "z (regression)",
               "mean((z - y)²) over all n·k elements; dL/dz = 2·(z - y)/(n·k)",
               "torch.nn.MSELoss()", per_row=False, classifier=False),
    OutputKind("sigmoid", 1, "bce_with_logits", "1 / (1 + exp(-z)) (binary / multi-label)",
               "mean over all elements of max(z, 0) - z·y + log(1 + exp(-|z|)); dL/dz = (σ(z) - y)/(n·k)",
               "torch.nn.BCEWithLogitsLoss()", per_row=False, classifier=True,
               accuracy="elements where (z > 0) == (y > 0.5)", target_range=(0.0, 1.0)),
    OutputKind("softmax", 2, "softmax_cross_entropy", "exp(z - logsumexp(z)) per row (multi-class)",
               "mean over rows of -Σ_c t_c·log_softmax(z)_c, t = (one-hot or given probabilities)·(1 - ε) + ε/C; "
               "dL/dz = (p·Σt - t)/n",
               "torch.nn.CrossEntropyLoss(label_smoothing=ε)", per_row=True, classifier=True,
               accuracy="rows whose argmax equals the label (or the target's argmax)", class_labels=True,
               min_units=2),
)

OUTPUTS: dict[str, OutputKind] = {o.name: o for o in _ENTRIES}
LOSSES: tuple[str, ...] = tuple(o.loss for o in _ENTRIES)

OutputCode = IntEnum("OutputCode", {o.name.upper(): o.code for o in _ENTRIES}, module=__name__)
