"""Field: one numeric setting of a spec part, with its default and valid range."""
from __future__ import annotations

from dataclasses import dataclass

# the largest count a setting may hold (int32, as the wire format carries it)
MAX_COUNT = (1 << 31) - 1


@dataclass(frozen=True)
class Field:
    """A setting's type, default and range; ``nnkernels.spec`` validates
    every value against it and names the field in the error.

    ``kind`` is ``float`` (finite, within [lo, hi]; ``lo_open`` / ``hi_open``
    exclude an end), ``int`` (a count within [lo, hi]) or ``bool`` (a switch,
    no range). ``default`` None means the default depends on another choice
    (an optimizer's own lr, eps and weight_decay)."""

    kind: type
    default: float | int | bool | None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    doc: str = ""
