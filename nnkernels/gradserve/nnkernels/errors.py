"""The exceptions nnkernels raises; the server maps each to one gRPC status code."""


class SpecError(ValueError):
    """A model specification is invalid. ``field`` names the offending field
    (dotted path, e.g. ``hidden[1].units``) and ``value`` is what was given.
    Server: INVALID_ARGUMENT."""

    def __init__(self, field: str, value, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class InputError(ValueError):
    """A batch (inputs or targets) or a weights payload is invalid: wrong
    shape, dtype, non-finite values, labels out of range, empty batch.
    ``field`` is ``inputs``, ``targets`` or a parameter name.
    Server: INVALID_ARGUMENT."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class NonFiniteError(ArithmeticError):
    """A training step produced a non-finite loss or gradient. The step was
    not applied: parameters, optimizer state and step count are unchanged.
    Server: FAILED_PRECONDITION."""


class NotTrainableError(RuntimeError):
    """The model can be evaluated but not trained (every hidden layer is a
    ``step`` unit, whose derivative is zero everywhere). Server:
    FAILED_PRECONDITION."""


class DeviceUnavailableError(RuntimeError):
    """The spec asks for a device this process cannot use (``cuda`` with no
    GPU or no numba-cuda). Server: FAILED_PRECONDITION."""
