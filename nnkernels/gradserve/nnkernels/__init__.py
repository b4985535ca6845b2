"""nnkernels: gradserve's compute core — model spec, flat parameters, a NumPy
reference, and Numba kernels for the CPU and CUDA. Knows nothing of gRPC."""
from . import runtime  # noqa: F401  (first: picks the threading layer before numba starts)
from .devices import available_devices
from .errors import DeviceUnavailableError, InputError, NonFiniteError, NotTrainableError, SpecError
from .model import Model, StepResult
from .params import ParamLayout, init_params
from .runtime import set_thread_budget, thread_budget, thread_config
from .spec import InitSpec, LayerSpec, LossSpec, ModelSpec, OptimizerSpec, OutputSpec, RegularizationSpec, ScheduleSpec
from .warmup import warm_up

__all__ = [
    "DeviceUnavailableError", "InputError", "NonFiniteError", "NotTrainableError", "SpecError",
    "InitSpec", "LayerSpec", "LossSpec", "ModelSpec", "OptimizerSpec", "OutputSpec",
    "RegularizationSpec", "ScheduleSpec", "available_devices", "ParamLayout", "init_params",
    "Model", "StepResult", "set_thread_budget", "thread_budget", "thread_config", "warm_up",
]
