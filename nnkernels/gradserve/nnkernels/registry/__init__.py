"""The registries: one home per concept the kernels, the spec and the
reference share — names, kernel codes, parameters with defaults and ranges,
definitions, and the step policy every device follows.

- ``fields``: Field, a setting's type, default and valid range.
- ``activations``: hidden-layer activations (code, parameter, formulas, PyTorch twin).
- ``outputs``: output kinds with the loss each trains with.
- ``optimizers``: optimizers (hyper-parameters, state buffers, initial state),
  ``state_names``, ``init_state``, ``clip_coefficient``.
- ``schedules``: learning-rate schedules and ``scheduled_lr``.
- ``initializers``: parameter initializers and their draws.

Plain Python and NumPy: no Numba here, so ``nnkernels.spec`` can validate a
spec without loading any compiler.
"""
from .activations import ACTIVATIONS, Activation, ActivationCode
from .activations import PARAMETERS as ACTIVATION_PARAMETERS
from .fields import MAX_COUNT, Field
from .initializers import FIELDS as INIT_FIELDS
from .initializers import INITIALIZERS, Initializer
from .optimizers import (
                         HYPERPARAMETERS,
                         OPTIMIZERS,
                         STATE_SLOTS,
                         Optimizer,
                         OptimizerCode,
                         StateBuffer,
                         clip_coefficient,
                         init_state,
                         state_names,
)
from .optimizers import SHARED as SHARED_HYPERPARAMETERS
from .outputs import LOSSES, OUTPUTS, OutputCode, OutputKind
from .schedules import FIELDS as SCHEDULE_FIELDS
from .schedules import SCHEDULES, Schedule, scheduled_lr

# the registries whose entries carry kernel codes, by what they name
CODED = {"activation": ACTIVATIONS, "output kind": OUTPUTS, "optimizer": OPTIMIZERS}

__all__ = [
    "ACTIVATIONS", "ACTIVATION_PARAMETERS", "Activation", "ActivationCode", "MAX_COUNT", "Field",
    "INIT_FIELDS", "INITIALIZERS", "Initializer", "HYPERPARAMETERS", "OPTIMIZERS", "SHARED_HYPERPARAMETERS",
    "STATE_SLOTS", "Optimizer", "OptimizerCode", "StateBuffer", "clip_coefficient", "init_state", "state_names",
    "LOSSES", "OUTPUTS", "OutputCode", "OutputKind", "SCHEDULE_FIELDS", "SCHEDULES", "Schedule", "scheduled_lr",
    "CODED",
]
