"""The CUDA kernels build for a real GPU, checked WITHOUT a GPU: every kernel
of ``nnkernels.cuda.kernels`` is compiled to sm_90 PTX, for float32 and
float64, at the GPU tile size, with ``cuda.compile_ptx`` (numba-cuda's cu13
wheels carry NVVM). Runs in the main (non-simulator) pytest process.

Also: asking for a cuda model in a process without a GPU raises
DeviceUnavailableError. Neither test skips: without numba-cuda they fail.
"""
import os
import types as pytypes
from unittest import mock

import pytest

# This file must not run under the simulator: compile_ptx does not exist there.
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _real_cuda():
    assert not SIM, "tests/test_cuda_ptx.py runs in the main pytest process, without NUMBA_ENABLE_CUDASIM"
    from gradserve.nnkernels.cuda import numba_cuda
    assert numba_cuda is not None, "numba-cuda is not installed (pip install 'gradserve[cuda]')"
    return numba_cuda


_SOURCES = []


def _sources():
    from gradserve.nnkernels.cuda import kernels as K
    if _SOURCES:
        return _SOURCES
    _SOURCES[:] = [(dt, name, fn, sig)
            for dt in ("float32", "float64")
            for name, (fn, sig) in K.build_sources(dt, K.TILE, K.THREADS, K.REG).items()]
    return _SOURCES


_PTX = {}


def _compile_ptx(cuda, fn, sig):
    """``cuda.compile_ptx`` for sm_90. Device functions (activations, lerp,
    rng.uniform01/box_muller) are compiled for "the current device" when a
    kernel calls them; with no GPU there is none, so say it is a compute
    capability 9.0 device (what we target)."""
    key = (fn, str(sig))  # build_sources makes new functions per call: key on both
    if key in _PTX:
        return _PTX[key]
    import numba.cuda.dispatcher as dispatcher
    fake_device = pytypes.SimpleNamespace(compute_capability=(9, 0))
    with mock.patch.object(dispatcher, "get_current_device", lambda: fake_device):
        ptx = _PTX[key] = cuda.compile_ptx(fn, sig.args, cc=(9, 0))[0]
    return ptx


EXPECTED = {
    "linear_forward", "linear_backward_input", "linear_backward_weight",
    "add_noise", "output_activation", "loss_dense", "loss_labels", "reduce_rows",
    "sq_norm_partial", "sum_to_slot", "optimizer_step",
}


def test_every_kernel_is_listed():
    _real_cuda()
    names = {name for _dt, name, _fn, _sig in _sources()}
    assert names == EXPECTED


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_kernel_compiles_to_sm90_ptx(dtype):
    cuda = _real_cuda()
    compiled = []
    for dt, name, fn, sig in _sources():
        if dt != dtype:
            continue
        ptx = _compile_ptx(cuda, fn, sig)
        assert ".target sm_90" in ptx, name
        assert ".entry" in ptx, name
        compiled.append(name)
    assert set(compiled) == EXPECTED


def test_float32_products_stay_float32():
    """float32 optimizer passes do their arithmetic in float32 (fp64 is
    slow on most GPUs), and the products' inner loops are float32 fma; only
    the dropout draw, the fused bias gradient and the reductions use float64
    (as the reference)."""
    cuda = _real_cuda()
    src = {name: (fn, sig) for dt, name, fn, sig in _sources() if dt == "float32"}
    fn, sig = src["optimizer_step"]
    assert ".f64" not in _compile_ptx(cuda, fn, sig)
    for name in ("linear_forward", "linear_backward_input", "linear_backward_weight"):
        fn, sig = src[name]
        ptx = _compile_ptx(cuda, fn, sig)
        assert ptx.count("fma.rn.f32") >= 16 and "fma.rn.f64" not in ptx, name


def test_cuda_model_without_gpu_raises_device_unavailable():
    _real_cuda()
    import numpy as np

    from gradserve.nnkernels import DeviceUnavailableError, LayerSpec, ModelSpec, OutputSpec
    from gradserve.nnkernels.cuda import is_available
    from gradserve.nnkernels.devices import available_devices, make_backend
    spec = ModelSpec(input_size=3, hidden=(LayerSpec(5),), output=OutputSpec(2), device="cuda")
    params = np.zeros(spec.num_params, np.float32)
    if is_available():  # a GPU machine: the same request must succeed instead
        assert "cuda" in available_devices()
        assert type(make_backend(spec, params)).__name__ == "CudaBackend"
        return
    assert "cuda" not in available_devices()
    with pytest.raises(DeviceUnavailableError):
        make_backend(spec, params)
    from gradserve.nnkernels.model import Model
    with pytest.raises(DeviceUnavailableError):
        Model(spec)
