"""all_finite, the NaN/Inf check of every batch, payload and uploaded chunk:
it reads the exponent bits block by block, so every position and both
float widths are checked against NumPy's isfinite."""
import numpy as np
import pytest

from gradserve.nnkernels.finite import all_finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 4095, 4096, 9999])
def test_a_single_nan_or_inf_anywhere_is_found(dtype, bad, where):
    a = np.random.default_rng(0).standard_normal(10_000).astype(dtype)
    a[where] = bad
    assert not all_finite(a)
    assert not all_finite(a.reshape(100, 100))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_finite_values_pass(dtype):
    info = np.finfo(dtype)
    a = np.array([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0, info.eps], dtype)
    assert np.isfinite(a).all() and all_finite(a)


def test_views_integers_and_empty_arrays():
    a = np.random.default_rng(1).standard_normal((100, 100))
    assert all_finite(a[:, ::3]) and all_finite(a.T)
    a[7, 9] = np.nan
    assert not all_finite(a[:, ::3]) and not all_finite(a.T)  # column 9 is in the strided view
    assert all_finite(np.array([1, 2, 3])) and all_finite(np.zeros((3, 0)))
    assert not all_finite(np.array([1.0, np.inf], np.float16))
