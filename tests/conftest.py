"""Shared pytest set-up: nnkernels is imported first (it picks Numba's
threading layer before numba starts), and the real-server fixtures
(``server``, ``client``) of ``service_fixtures`` serve every test module."""
from gradserve import nnkernels  # noqa: F401

pytest_plugins = ["service_fixtures"]
