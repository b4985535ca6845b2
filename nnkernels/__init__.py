"""nnkernels: gradserve's compute core — model spec, flat parameters, a NumPy
reference, and Numba kernels for the CPU and CUDA. Knows nothing of gRPC."""
from .errors import (DeviceUnavailableError, InputError, NonFiniteError,
                     NotTrainableError, SpecError)
from .spec import (InitSpec, LayerSpec, LossSpec, ModelSpec, OptimizerSpec,
                   OutputSpec, RegularizationSpec, ScheduleSpec)
from .backend import available_devices
