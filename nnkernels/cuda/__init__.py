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


def is_available() -> bool:
    """True when numba-cuda imports and a CUDA GPU (or the simulator) is
    usable in this process."""
    if numba_cuda is None:
        return False
    try:
        return bool(numba_cuda.is_available())
    except Exception:  # a broken driver install reports as "no GPU", not a crash
        return False
