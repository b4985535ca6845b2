"""The flat parameter buffer: where each layer's weight and bias live, named
views into it, and its seeded initialization.

Layout (the same on every backend, in checkpoints and on the wire): dense
layer 0's W (out×in, row-major, as torch.nn.Linear.weight), layer 0's b,
layer 1's W, layer 1's b, ... — the hidden layers in order, then the output
layer. Gradients and every optimizer state buffer use the same layout.
Names follow a PyTorch ``nn.Sequential`` of Linear layers numbered over the
dense layers only: ``layers.{i}.weight`` and ``layers.{i}.bias``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registry import INITIALIZERS
from .spec import ModelSpec


@dataclass(frozen=True)
class DenseSlot:
    """Where one dense layer's parameters sit in the flat buffer."""

    index: int
    fan_in: int
    fan_out: int
    w_offset: int
    b_offset: int

    @property
    def end(self) -> int:
        return self.b_offset + self.fan_out

    @property
    def weight_name(self) -> str:
        return f"layers.{self.index}.weight"

    @property
    def bias_name(self) -> str:
        return f"layers.{self.index}.bias"


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

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter, in buffer order."""
        out = []
        for s in self.slots:
            out += [(s.weight_name, (s.fan_out, s.fan_in)), (s.bias_name, (s.fan_out,))]
        return out

    def offsets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (offset, shape)."""
        out = {}
        for s in self.slots:
            out[s.weight_name] = (s.w_offset, (s.fan_out, s.fan_in))
            out[s.bias_name] = (s.b_offset, (s.fan_out,))
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
            out[s.weight_name] = w
            out[s.bias_name] = b
        return out


def layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator for dense layer ``layer`` of a model seeded ``seed``:
    PCG64 seeded by SeedSequence([seed, layer]) — the same on every machine."""
    return np.random.Generator(np.random.PCG64([seed, layer]))


def init_params(spec: ModelSpec) -> np.ndarray:
    """A new flat parameter buffer (spec.dtype) initialized by
    spec.weight_init and spec.bias_init (``registry.initializers``). Each
    dense layer draws its weight, then its bias, from
    ``layer_rng(spec.seed, i)``, in float64, then casts."""
    layout = ParamLayout(spec)
    flat = np.empty(layout.size, dtype=np.float64)
    weight, bias = INITIALIZERS[spec.weight_init.name], INITIALIZERS[spec.bias_init.name]
    for s, (w, b) in zip(layout.slots, layout.views(flat)):
        rng = layer_rng(spec.seed, s.index)
        w[...] = weight.draw(spec.weight_init, w.shape, s.fan_in, s.fan_out, rng)
        b[...] = bias.draw(spec.bias_init, b.shape, s.fan_in, s.fan_out, rng)
    return flat.astype(spec.dtype)
