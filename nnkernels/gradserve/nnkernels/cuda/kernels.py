"""The CUDA kernel set for MLP training and inference (numba-cuda), built per
dtype and launch geometry from the sources of each concern:

- ``products``: the three matrix products of a dense layer, fused epilogues;
- ``losses``: the noise pass, the output activation, output activation + loss;
- ``reductions``: float64 block reductions (loss, correct count, grad norm);
- ``optimizers``: the fused optimizer pass;
- ``device``: the device functions they share (activations, the staged-tile
  product loop, the block sum); ``target``: dtype, geometry and the named
  argument structures (``LayerEpilogue``, ``OptimizerCoefficients``).

:func:`build_sources` returns plain Python functions with their signatures;
:func:`kernels_for` wraps them with ``cuda.jit`` (cached per dtype). Keeping
the un-jitted functions lets ``tests/test_cuda_ptx.py`` compile each one to
real sm_90 PTX with ``cuda.compile_ptx`` on a machine without a GPU, for
both dtypes, from the same source the GPU runs.

Geometry: matrix products use square ``tile``×``tile`` thread blocks, each
thread accumulating ``reg``×``reg`` outputs in registers from shared-memory
tiles; every kernel loops grid-stride (over output tiles, rows or elements),
so results do not depend on how many blocks are launched. Under the
simulator (one Python thread per simulated thread) the backend launches tiny
blocks (``SIM_TILE``/``SIM_REG``/``SIM_THREADS``: partial tiles at test
sizes); on a GPU ``TILE``/``REG``/``THREADS``, which the PTX test compiles.

Numerics: products accumulate in the model's dtype (as cuBLAS does for fp32
without TF32); bias gradients (fused into the weight-gradient product),
losses, accuracy counts and the squared gradient norm are accumulated in
float64, and the two-stage reductions are deterministic (no atomics). Random
draws for dropout and the noise regularizers (input, hidden-input, weight
and target noise, all through ``add_noise``) are ``nnkernels.rng``'s
counter-based SplitMix64 compiled as device functions, so the GPU draws the
same masks and noise as the CPU backend and the NumPy reference.
"""
from __future__ import annotations

import threading

from numba import types

from . import SIMULATOR, losses, optimizers, products, reductions
from . import numba_cuda as cuda
from .device import device_functions
from .target import Target

# --- geometry ---------------------------------------------------------------
TILE = 16          # matmul blocks on a GPU: TILE×TILE threads ...
REG = 4            # ... each computing REG×REG outputs (64×64 outputs per block)
THREADS = 256      # threads per block for 1-D kernels on a GPU
RED_BLOCKS = 256   # blocks of the first stage of the gradient-norm reduction
SIM_TILE = 4       # the same kernels under the simulator: tiny blocks
SIM_REG = 2
SIM_THREADS = 8
SIM_RED_BLOCKS = 2

_CONCERNS = (products, losses, reductions, optimizers)


def build_sources(dtype: str, tile: int, threads: int, reg: int):
    """The kernels for one dtype and geometry, as plain Python functions
    (not yet jitted), and their signatures: ``{name: (pyfunc, signature)}``.

    ``tile``: the products' blocks are tile×tile threads, each computing
    reg×reg outputs (a block covers (tile·reg)² outputs); ``threads``: the
    block size of 1-D kernels and reductions (a power of two)."""
    target = Target(dtype, tile, reg, threads)
    dev = device_functions(target)
    sources = {}
    for concern in _CONCERNS:
        sources.update(concern.kernels(target, dev))
    return {name: (fn, types.void(*argtypes)) for name, (fn, argtypes) in sources.items()}


class KernelSet:
    """The jitted kernels of one dtype, with the launch geometry they were
    built for (``tile``, ``threads``, ``red_blocks``)."""

    def __init__(self, dtype: str):
        if cuda is None:
            raise ImportError("numba-cuda is not installed")
        self.dtype = dtype
        if SIMULATOR:
            self.tile, self.reg, self.threads, self.red_blocks = SIM_TILE, SIM_REG, SIM_THREADS, SIM_RED_BLOCKS
        else:
            self.tile, self.reg, self.threads, self.red_blocks = TILE, REG, THREADS, RED_BLOCKS
        self.sources = build_sources(dtype, self.tile, self.threads, self.reg)
        self._k = {name: cuda.jit(fn) for name, (fn, _sig) in self.sources.items()}
        self._compiled = False
        self._lock = threading.Lock()

    def __getattr__(self, name):
        try:
            return self.__dict__["_k"][name]
        except KeyError:
            raise AttributeError(name) from None

    def compile_all(self) -> None:
        """Compile every kernel for its signature now (a GPU process calls
        this once at start-up: no compile on the first request, and no race
        between threads first calling an uncompiled dispatcher)."""
        with self._lock:
            if self._compiled:
                return
            if not SIMULATOR:
                for name, (_fn, sig) in self.sources.items():
                    self._k[name].compile(sig.args)
            self._compiled = True

    # launch geometry -----------------------------------------------------
    def grid_1d(self, work: int) -> int:
        """Blocks for a grid-stride 1-D kernel over ``work`` items."""
        blocks = max(1, (work + self.threads - 1) // self.threads)
        return min(blocks, 1 if SIMULATOR else 65535)

    def grid_tiles(self, rows: int, cols: int) -> int:
        """Blocks for a product with a rows×cols output."""
        bt = self.tile * self.reg
        tiles = ((rows + bt - 1) // bt) * ((cols + bt - 1) // bt)
        return min(max(tiles, 1), 2 if SIMULATOR else 1 << 20)


_KERNELS: dict[str, KernelSet] = {}
_KERNELS_LOCK = threading.Lock()


def kernels_for(dtype: str) -> KernelSet:
    """The (cached, process-wide) kernel set for ``dtype``."""
    with _KERNELS_LOCK:
        ks = _KERNELS.get(dtype)
        if ks is None:
            ks = _KERNELS[dtype] = KernelSet(dtype)
    ks.compile_all()
    return ks
