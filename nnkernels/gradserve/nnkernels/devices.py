"""The devices this process can run models on, and the backend for a spec's
device. The CPU backend is always there; the CUDA one is imported only when
a CUDA model is made, so a CPU-only process never loads numba-cuda's
kernels."""
from __future__ import annotations

import numpy as np

from .backend import Backend
from .cpu.backend import CpuBackend
from .errors import DeviceUnavailableError
from .spec import ModelSpec


def available_devices() -> list[str]:
    """Devices this process can run models on: always ``cpu``; ``cuda`` when
    numba-cuda is installed and a GPU (or the simulator) is usable."""
    from .cuda import is_available  # never fails: without numba-cuda it says False
    return ["cpu", "cuda"] if is_available() else ["cpu"]


def make_backend(spec: ModelSpec, params: np.ndarray) -> Backend:
    """The backend for ``spec.device``, starting from ``params``."""
    if spec.device == "cpu":
        return CpuBackend(spec, params)
    if "cuda" not in available_devices():
        raise DeviceUnavailableError(
            "device 'cuda' was asked for but no CUDA GPU is usable in this process "
            f"(available: {', '.join(available_devices())}); install gradserve[cuda] on a GPU machine")
    from .cuda.backend import CudaBackend
    return CudaBackend(spec, params)
