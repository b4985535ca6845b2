"""all_finite: the NaN/Inf check ``Model`` runs on every batch, weights
payload and loaded state, in host memory whatever the model's device."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _all_finite(a):
    flat = a.reshape(a.size)
    for i in range(flat.shape[0]):
        if not np.isfinite(flat[i]):
            return False
    return True


def all_finite(a: np.ndarray) -> bool:
    """True when no element of ``a`` is NaN or ±Inf (integer arrays always
    are). One compiled pass that stops at the first bad value: cheaper than
    NumPy's reductions on the small batches most calls carry."""
    if a.size == 0 or a.dtype.kind != "f":
        return True
    return bool(_all_finite(np.ascontiguousarray(a)))
