"""The flat parameter buffer: where each layer's weight and bias live, named
views into it, and the seeded initializers.

Layout (the same on every backend, in checkpoints and on the wire): dense
layer 0's W (out×in, row-major, as torch.nn.Linear.weight), layer 0's b,
layer 1's W, layer 1's b, ... — the hidden layers in order, then the output
layer. Gradients and every optimizer state buffer use the same layout.
Names follow a PyTorch ``nn.Sequential`` of Linear layers numbered over the
dense layers only: ``layers.{i}.weight`` and ``layers.{i}.bias``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import InitSpec, ModelSpec


@dataclass(frozen=True)
class DenseSlot:
    """Where one dense layer's parameters sit in the flat buffer."""

    index: int
    fan_in: int
    fan_out: int
    w_offset: int
    b_offset: int

    @property
    def w_size(self) -> int:
        return self.fan_out * self.fan_in

    @property
    def end(self) -> int:
        return self.b_offset + self.fan_out


class ParamLayout:
    """Offsets of every dense layer's W and b in one flat buffer."""

    def __init__(self, spec: ModelSpec):
        sizes = spec.layer_sizes
        slots, offset = [], 0
        for i in range(len(sizes) - 1):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            slots.append(DenseSlot(i, fan_in, fan_out, offset, offset + fan_out * fan_in))
            offset += fan_out * fan_in + fan_out
        self.slots: tuple[DenseSlot, ...] = tuple(slots)
        self.size = offset

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    def names(self) -> list[str]:
        out = []
        for s in self.slots:
            out += [f"layers.{s.index}.weight", f"layers.{s.index}.bias"]
        return out

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter, in buffer order."""
        out = []
        for s in self.slots:
            out.append((f"layers.{s.index}.weight", (s.fan_out, s.fan_in)))
            out.append((f"layers.{s.index}.bias", (s.fan_out,)))
        return out

    def offsets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (offset, shape)."""
        out = {}
        for s in self.slots:
            out[f"layers.{s.index}.weight"] = (s.w_offset, (s.fan_out, s.fan_in))
            out[f"layers.{s.index}.bias"] = (s.b_offset, (s.fan_out,))
        return out

    def views(self, flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(W, b)] per dense layer: views (no copy) into ``flat``."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.size},)")
        return [(flat[s.w_offset:s.b_offset].reshape(s.fan_out, s.fan_in), flat[s.b_offset:s.end])
                for s in self.slots]

    def named_views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for s, (w, b) in zip(self.slots, self.views(flat)):
            out[f"layers.{s.index}.weight"] = w
            out[f"layers.{s.index}.bias"] = b
        return out


def _fill(init: InitSpec, shape: tuple[int, ...], fan_in: int, fan_out: int,
          rng: np.random.Generator) -> np.ndarray:
    """One tensor drawn as torch.nn.init defines ``init.name`` (float64).

    zeros: 0; constant: value; uniform: U(a, b); normal: N(mean, std²);
    xavier_uniform: U(±gain·sqrt(6/(fan_in+fan_out)));
    xavier_normal: N(0, (gain·sqrt(2/(fan_in+fan_out)))²);
    kaiming_uniform: U(±sqrt(2)·sqrt(3/fan_in)); kaiming_normal:
    N(0, (sqrt(2)/sqrt(fan_in))²) (mode fan_in, relu gain);
    torch_default: U(±1/sqrt(fan_in)) (nn.Linear.reset_parameters, for both
    weight and bias). A bias uses its layer's fan_in and fan_out.
    """
    name = init.name
    if name == "zeros":
        return np.zeros(shape)
    if name == "constant":
        return np.full(shape, float(init.value))
    if name == "uniform":
        return rng.uniform(init.a, init.b, size=shape)
    if name == "normal":
        return rng.normal(init.mean, init.std, size=shape)
    if name == "xavier_uniform":
        bound = init.gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape)
    if name == "xavier_normal":
        return rng.normal(0.0, init.gain * math.sqrt(2.0 / (fan_in + fan_out)), size=shape)
    if name == "kaiming_uniform":
        bound = math.sqrt(2.0) * math.sqrt(3.0 / fan_in)
        return rng.uniform(-bound, bound, size=shape)
    if name == "kaiming_normal":
        return rng.normal(0.0, math.sqrt(2.0) / math.sqrt(fan_in), size=shape)
    if name == "torch_default":
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape)
    raise ValueError(f"unknown initializer {name!r}")


def layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator for dense layer ``layer`` of a model seeded ``seed``:
    PCG64 seeded by SeedSequence([seed, layer]) — the same on every machine."""
    return np.random.Generator(np.random.PCG64([seed, layer]))


def init_params(spec: ModelSpec) -> np.ndarray:
    """A new flat parameter buffer (spec.dtype) initialized by
    spec.weight_init and spec.bias_init. Each dense layer draws its weight,
    then its bias, from ``layer_rng(spec.seed, i)``, in float64, then casts."""
    layout = ParamLayout(spec)
    flat = np.empty(layout.size, dtype=np.float64)
    for s, (w, b) in zip(layout.slots, layout.views(flat)):
        rng = layer_rng(spec.seed, s.index)
        w[...] = _fill(spec.weight_init, w.shape, s.fan_in, s.fan_out, rng)
        b[...] = _fill(spec.bias_init, b.shape, s.fan_in, s.fan_out, rng)
    return flat.astype(spec.dtype)
