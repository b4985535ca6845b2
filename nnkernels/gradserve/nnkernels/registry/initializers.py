"""The initializer registry: each parameter initializer's settings and its
draw, as torch.nn.init defines it. Draws are float64 from the layer's
generator (``nnkernels.params.layer_rng``); a bias uses its layer's fan_in
and fan_out."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .fields import Field

# InitSpec's settings
FIELDS = {
    "value": Field(float, 0.0, doc="constant"),
    "a": Field(float, 0.0, doc="uniform: lower bound"),
    "b": Field(float, 1.0, doc="uniform: upper bound (> a)"),
    "mean": Field(float, 0.0, doc="normal"),
    "std": Field(float, 1.0, lo=0.0, doc="normal"),
    "gain": Field(float, 1.0, doc="xavier_uniform, xavier_normal"),
}


@dataclass(frozen=True)
class Initializer:
    """One initializer: ``draw(init_spec, shape, fan_in, fan_out, rng)``
    returns a float64 array of ``shape``; ``uses``: the settings it reads."""

    name: str
    torch: str
    uses: tuple[str, ...]
    draw: Callable
    formula: str


def _uniform(bound, shape, rng):
    return rng.uniform(-bound, bound, size=shape)


_ENTRIES = (
    Initializer("zeros", "nn.init.zeros_", (), lambda i, shape, fi, fo, rng: np.zeros(shape), "0"),
    Initializer("constant", "nn.init.constant_", ("value",),
                lambda i, shape, fi, fo, rng: np.full(shape, float(i.value)), "value"),
    Initializer("uniform", "nn.init.uniform_", ("a", "b"),
                lambda i, shape, fi, fo, rng: rng.uniform(i.a, i.b, size=shape), "U(a, b)"),
    Initializer("normal", "nn.init.normal_", ("mean", "std"),
                lambda i, shape, fi, fo, rng: rng.normal(i.mean, i.std, size=shape), "N(mean, std²)"),
    Initializer("xavier_uniform", "nn.init.xavier_uniform_", ("gain",),
                lambda i, shape, fi, fo, rng: _uniform(i.gain * math.sqrt(6.0 / (fi + fo)), shape, rng),
                "U(±gain·sqrt(6/(fan_in + fan_out)))"),
    Initializer("xavier_normal", "nn.init.xavier_normal_", ("gain",),
                lambda i, shape, fi, fo, rng: rng.normal(0.0, i.gain * math.sqrt(2.0 / (fi + fo)), size=shape),
                "N(0, (gain·sqrt(2/(fan_in + fan_out)))²)"),
    Initializer("kaiming_uniform", "nn.init.kaiming_uniform_ (fan_in, relu gain)", (),
                lambda i, shape, fi, fo, rng: _uniform(math.sqrt(2.0) * math.sqrt(3.0 / fi), shape, rng),
                "U(±sqrt(2)·sqrt(3/fan_in))"),
    Initializer("kaiming_normal", "nn.init.kaiming_normal_ (fan_in, relu gain)", (),
                lambda i, shape, fi, fo, rng: rng.normal(0.0, math.sqrt(2.0) / math.sqrt(fi), size=shape),
                "N(0, (sqrt(2)/sqrt(fan_in))²)"),
    Initializer("torch_default", "nn.Linear.reset_parameters (weight and bias)", (),
                lambda i, shape, fi, fo, rng: _uniform(1.0 / math.sqrt(fi), shape, rng),
                "U(±1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5))"),
)

INITIALIZERS: dict[str, Initializer] = {i.name: i for i in _ENTRIES}
