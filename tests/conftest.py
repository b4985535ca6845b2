"""Shared pytest set-up for the nnkernels tests: nothing but the import
order (nnkernels first, so it picks the threading layer before numba)."""
from gradserve import nnkernels  # noqa: F401
