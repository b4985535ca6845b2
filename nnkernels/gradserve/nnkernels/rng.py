"""Counter-based random numbers for dropout and the noise regularizers
(input, hidden-input, weight and target noise), identical on every backend.

Each training draw is a pure function of (seed, step, stream, index):
``stream_key(seed, step, stream)`` is computed once per call on the host, and
``uniform01(key, index)`` maps it and an element index to a float in [0, 1)
with SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014). No state is shared between threads, so draws
inside ``prange`` or a CUDA grid are reproducible and equal on CPU, GPU and
in the NumPy reference. Streams: ``NOISE_STREAM`` for the Gaussian input
noise, ``dropout_stream(i)`` for hidden layer i; the element index is
``row * width + column``. The later noise kinds each own a range of 2³²
stream numbers, clear of the dropout streams (at most ``spec.MAX_LAYERS``
of them) and of each other: ``hidden_noise_stream(i)`` for the noise on
hidden layer i's output (the next layer's input; index ``row * units +
column``), ``weight_noise_stream(l)`` for dense layer l's W (index ``out *
fan_in + in``, the row-major position in W), ``TARGET_NOISE_STREAM`` for the
regression targets (index ``row * units + column``). Adding a kind never
moves an existing stream, so stored models replay their old draws.

``uniform01`` and ``box_muller`` are written in the Numba subset with explicit
uint64 constants (mixing uint64 with int64 promotes to float64 in Numba);
``nnkernels.cpu`` wraps them with ``njit`` and ``nnkernels.cuda`` with
``cuda.jit(device=True)``. ``uniform01_array`` / ``normal_array`` are the
vectorized NumPy twins used by the reference.
"""
from __future__ import annotations

import math

import numpy as np

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

NOISE_STREAM = 0


def dropout_stream(layer: int) -> int:
    return 1 + layer


# --- noise kinds added later: one 2**32 range of stream numbers each ---
TARGET_NOISE_STREAM = 1 << 32


def hidden_noise_stream(layer: int) -> int:
    """Noise on hidden layer ``layer``'s (dropped-out) activation."""
    return (2 << 32) + layer


def weight_noise_stream(layer: int) -> int:
    """Noise on dense layer ``layer``'s W (the output layer is the last)."""
    return (3 << 32) + layer


def _splitmix64(z: int) -> int:
    z = (z + _GAMMA) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def stream_key(seed: int, step: int, stream: int) -> int:
    """A 64-bit key for one (seed, step, stream); host-side Python ints."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ (step & _MASK)) ^ (stream & _MASK))


def uniform01(key, index):
    """SplitMix64 of ``key + (index + 1)·γ``, top 53 bits scaled to [0, 1)."""
    z = np.uint64(key) + (np.uint64(index) + np.uint64(1)) * np.uint64(_GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


def box_muller(u1, u2):
    """A standard normal from two uniforms in [0, 1). The normal draw number
    ``index`` of a stream is ``box_muller(uniform01(key, 2·index),
    uniform01(key, 2·index + 1))``."""
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def uniform01_array(key: int, n: int) -> np.ndarray:
    """``uniform01(key, i)`` for i in range(n), vectorized (float64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def normal_array(key: int, n: int) -> np.ndarray:
    """Normal draws 0..n-1 of the stream (see ``box_muller``), vectorized."""
    u = uniform01_array(key, 2 * n)
    return np.sqrt(-2.0 * np.log(1.0 - u[0::2])) * np.cos(2.0 * np.pi * u[1::2])
