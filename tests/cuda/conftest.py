"""tests/cuda: the CUDA backend against the NumPy reference and the CPU
backend. Run in their own process, under the simulator on a machine without
a GPU:

    NUMBA_ENABLE_CUDASIM=1 .venv/bin/python -m pytest tests/cuda

or on a GPU machine as is (``.venv/bin/python -m pytest tests/cuda``). With
neither a GPU nor the simulator every test FAILS (it never skips): the CUDA
target is part of what CI checks.
"""
import os
import sys

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

if SIMULATOR:
    # The simulator runs every simulated thread as a Python thread and
    # syncthreads() waits on a barrier: with the default 5 ms GIL switch
    # interval each barrier costs milliseconds. A short interval makes the
    # tiled kernels ~6x faster here and changes nothing numerically.
    sys.setswitchinterval(1e-6)


@pytest.fixture(autouse=True)
def _cuda_usable():
    if "numba" in sys.modules and SIMULATOR:
        from numba import config
        assert config.ENABLE_CUDASIM, "numba was imported before NUMBA_ENABLE_CUDASIM was set"
    from gradserve.nnkernels.cuda import is_available
    assert is_available(), (
        "no CUDA device and no simulator: run these tests with NUMBA_ENABLE_CUDASIM=1 "
        "(in their own pytest process) or on a GPU machine")
    yield


def pytest_configure(config):
    # Under the simulator nnkernels.rng.uniform01 runs as plain NumPy scalar
    # code, where SplitMix64's intended uint64 wrap-around warns.
    config.addinivalue_line("filterwarnings", "ignore:overflow encountered in scalar:RuntimeWarning")
