"""What a CUDA kernel set is built for, and the named structures its kernels
take: ``Target`` (dtype and launch geometry, with the constants the kernel
sources close over), ``LayerEpilogue`` (one dense layer's activation and
dropout) and ``OptimizerCoefficients`` (the scalars of one optimizer step,
``kernel_args.COEFFICIENTS``). Namedtuples travel to the device by value, as
kernel parameters: no copy, no allocation per launch."""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

from numba import types

from ..kernel_args import COEFFICIENTS
from ..registry import STATE_SLOTS

_NUMBA_DTYPES = {"float32": types.float32, "float64": types.float64}

LayerEpilogue = namedtuple("LayerEpilogue", "act act_param drop_key drop_p drop_scale")
LayerEpilogue.__doc__ = """What follows a dense layer's product: activation ``act`` (ActivationCode)
with parameter ``act_param``, then inverted dropout with probability
``drop_p`` (0: none) keeping element (r, c) when uniform01(drop_key, r·units
+ c) >= drop_p, scaled by ``drop_scale`` = 1/(1 - drop_p)."""

OptimizerCoefficients = namedtuple("OptimizerCoefficients", COEFFICIENTS)
OptimizerCoefficients.__doc__ = """The scalars of one optimizer step, each in the parameter dtype
(meanings: ``kernel_args.COEFFICIENTS``)."""


@dataclass(frozen=True)
class Target:
    """A dtype (``float32`` or ``float64``) and the launch geometry: products
    run in blocks of tile×tile threads, each computing reg×reg outputs (a
    block covers bt×bt outputs, bt = tile·reg, and stages kt-wide slices of
    the reduction in shared memory); 1-D kernels and reductions use blocks
    of ``threads`` (a power of two)."""

    dtype: str
    tile: int
    reg: int
    threads: int
    T: types.Float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "T", _NUMBA_DTYPES[self.dtype])

    @property
    def bt(self) -> int:
        return self.tile * self.reg

    @property
    def kt(self) -> int:
        return self.tile

    # numba types of the kernels' arguments ---------------------------------
    @property
    def matrix(self):
        return self.T[:, ::1]

    @property
    def vector(self):
        return self.T[::1]

    @property
    def epilogue(self):
        return types.NamedTuple((types.int64, self.T, types.uint64, types.float64, self.T), LayerEpilogue)

    @property
    def coefficients(self):
        return types.NamedUniTuple(self.T, len(COEFFICIENTS), OptimizerCoefficients)

    @property
    def state(self):
        return types.UniTuple(self.vector, STATE_SLOTS)
