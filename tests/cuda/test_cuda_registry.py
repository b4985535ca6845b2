"""The CUDA backend handles every activation, output kind and optimizer of
the registry (the walk tests/test_registry.py runs on the CPU)."""
from registry_walk import assert_backend_handles_every_registry_entry


def test_cuda_backend_handles_every_registry_entry():
    assert_backend_handles_every_registry_entry("cuda")
