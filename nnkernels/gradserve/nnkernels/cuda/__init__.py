"""The CUDA target of nnkernels (numba-cuda, the maintained CUDA target of
Numba; ``from numba import cuda``).

This is the ONLY module that imports ``numba.cuda``: the kernels and the
backend take ``numba_cuda`` from here, so moving to another CUDA binding
later touches one place. Importing this package never fails: without
numba-cuda, ``numba_cuda`` is None and ``is_available()`` is False.

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is
first imported) ``is_available()`` is True and every kernel runs, slowly, in
Python; ``SIMULATOR`` says which mode this process is in.
"""
from __future__ import annotations

try:  # numba-cuda is the optional extra gradserve[cuda]
    from numba import config as _numba_config
    from numba import cuda as numba_cuda
except ImportError:  # pragma: no cover - depends on the installation
    numba_cuda = None
    SIMULATOR = False
else:
    SIMULATOR = bool(getattr(_numba_config, "ENABLE_CUDASIM", False))


def _fix_simulator_shared_arrays() -> None:
    """numba-cuda 0.30's simulator allocates a block's ``cuda.shared.array``
    on the first thread that reaches the line, with an unlocked
    check-then-insert: two simulated threads arriving together each get
    their own array, and the block silently computes garbage (seen: tiled
    products wrong in random rows). Same semantics (one array per source
    line per launch), allocated under a lock; it also keys on the caller's
    frame instead of formatting the whole stack on every call."""
    import sys
    import threading

    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        key = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _fix_simulator_shared_arrays()


def is_available() -> bool:
    """True when numba-cuda imports and a CUDA GPU (or the simulator) is
    usable in this process."""
    if numba_cuda is None:
        return False
    try:
        return bool(numba_cuda.is_available())
    except Exception:  # a broken driver install reports as "no GPU", not a crash
        return False


def warm_up(dtypes=("float32", "float64")) -> None:
    """Compile every CUDA kernel for ``dtypes`` now (about a second per
    kernel and dtype on a GPU; nothing to do under the simulator). A server
    calls this before it reports ready, so the first request does not pay
    for compilation and no two threads race to compile one kernel. The
    first CudaBackend of a dtype does the same for that dtype."""
    from .kernels import kernels_for
    for dtype in dtypes:
        kernels_for(dtype)
