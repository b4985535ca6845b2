"""ModelSpec and its parts: plain frozen dataclasses, validated on construction.

A spec describes an MLP completely: layers, output kind and loss, optimizer
and learning-rate schedule, initializers, regularization, dtype, device and
seed. Every invalid value raises :class:`SpecError` naming the field and the
value. ``ModelSpec.to_dict`` / ``ModelSpec.from_dict`` give a JSON-safe form
(the store and the gRPC layer use it); ``from_dict`` rejects unknown keys.

Names, settings, defaults and ranges come from ``nnkernels.registry``, so
error messages can list what is allowed; the numerical meaning of each name
is stated there and computed by ``nnkernels.reference`` (the oracle).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError
from .registry import (
    ACTIVATION_PARAMETERS,
    ACTIVATIONS,
    HYPERPARAMETERS,
    INIT_FIELDS,
    INITIALIZERS,
    LOSSES,
    OPTIMIZERS,
    OUTPUTS,
    SCHEDULE_FIELDS,
    SCHEDULES,
    SHARED_HYPERPARAMETERS,
    Field,
)

DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")

# Sanity bounds on sizes; the server's configurable limits are tighter.
MAX_UNITS = 1 << 20
MAX_LAYERS = 256
MAX_PARAMS = (1 << 31) - 1
MAX_REPLICAS = 1024  # data-parallel replicas of one model (one Ray actor each)
MAX_SEED = (1 << 63) - 1


def _choice(path: str, value: str, allowed) -> None:
    if value not in allowed:
        raise SpecError(path, value, f"must be one of {', '.join(allowed)}")


def _finite(path: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(path, value, "must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise SpecError(path, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise SpecError(path, value, f"must be {'<' if hi_open else '<='} {hi}")


def _count(path: str, value, *, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, value, "must be an integer")
    if not lo <= value <= hi:
        raise SpecError(path, value, f"must be between {lo} and {hi}")


def _settings(part, path: str, fields: dict[str, Field]) -> None:
    """Check every setting of ``part`` named in ``fields`` against its range."""
    for name, f in fields.items():
        value = getattr(part, name)
        if f.kind is int:
            _count(f"{path}.{name}", value, lo=f.lo, hi=f.hi)
        elif f.kind is float:
            _finite(f"{path}.{name}", value, lo=f.lo, hi=f.hi, lo_open=f.lo_open, hi_open=f.hi_open)


@dataclass(frozen=True)
class LayerSpec:
    """One hidden dense layer: ``units`` outputs, then ``activation`` (with
    its parameter, when it takes one), then dropout with probability
    ``dropout`` while training (inverted dropout: kept units are scaled by
    1/(1-p), as torch.nn.Dropout), then, while training, Gaussian noise
    N(0, noise_std²) added to that (dropped-out) activation, which is the
    next layer's input (Keras ``GaussianNoise(noise_std)`` placed after the
    layer and its dropout; noise on the first layer's input is
    ``RegularizationSpec.input_noise_std``)."""

    units: int
    activation: str = "relu"
    negative_slope: float = ACTIVATION_PARAMETERS["negative_slope"].default  # leaky_relu
    alpha: float = ACTIVATION_PARAMETERS["alpha"].default  # elu
    dropout: float = 0.0
    # --- noise regularizers (issue 12) ---
    noise_std: float = 0.0
    # --- end noise regularizers ---

    def validate(self, path: str) -> None:
        _count(f"{path}.units", self.units, lo=1, hi=MAX_UNITS)
        _choice(f"{path}.activation", self.activation, tuple(ACTIVATIONS))
        _settings(self, path, ACTIVATION_PARAMETERS)
        _finite(f"{path}.dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        _finite(f"{path}.noise_std", self.noise_std, lo=0.0)

    @property
    def activation_param(self) -> float:
        """The value of the activation's parameter (0.0 when it takes none):
        what the kernels receive for this layer."""
        name = ACTIVATIONS[self.activation].param
        return float(getattr(self, name)) if name else 0.0


@dataclass(frozen=True)
class OutputSpec:
    """The output dense layer: ``units`` outputs and the output kind (see
    ``registry.outputs``): ``identity`` (regression), ``sigmoid`` (binary /
    multi-label), ``softmax`` (multi-class; needs units >= 2)."""

    units: int
    kind: str = "identity"

    def validate(self, path: str) -> None:
        _count(f"{path}.units", self.units, lo=1, hi=MAX_UNITS)
        _choice(f"{path}.kind", self.kind, tuple(OUTPUTS))
        least = OUTPUTS[self.kind].min_units
        if self.units < least:
            raise SpecError(f"{path}.units", self.units, f"{self.kind} output needs at least {least} units")

    def counted(self, rows: int) -> int:
        """What the loss is a mean over and the accuracy counts in a batch of
        ``rows``: the rows (per-row kinds) or every element."""
        return rows if OUTPUTS[self.kind].per_row else rows * self.units


@dataclass(frozen=True)
class LossSpec:
    """The training loss (mean reduction over the batch). ``name`` empty means
    the loss paired with the output kind. ``label_smoothing`` is
    CrossEntropyLoss's and applies to softmax_cross_entropy only."""

    name: str = ""
    label_smoothing: float = 0.0

    def validate(self, path: str, output_kind: str) -> None:
        expected = OUTPUTS[output_kind].loss
        if self.name != expected:
            _choice(f"{path}.name", self.name, LOSSES)
            raise SpecError(f"{path}.name", self.name,
                            f"does not match output kind {output_kind!r}, which trains with {expected!r}")
        _finite(f"{path}.label_smoothing", self.label_smoothing, lo=0.0, hi=1.0)
        if self.label_smoothing and self.name != "softmax_cross_entropy":
            raise SpecError(f"{path}.label_smoothing", self.label_smoothing,
                            "applies only to softmax_cross_entropy")


_HP = {name: f.default for name, f in HYPERPARAMETERS.items()}


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer and hyper-parameters, named and defaulted as in torch.optim
    (see ``registry.optimizers``).

    ``eps``, ``weight_decay`` and ``lr`` left as None take the torch default
    of the chosen optimizer (e.g. eps 1e-10 for Adagrad, weight_decay 1e-2
    for AdamW). Fields an optimizer does not use must stay at their default.
    """

    name: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    eps: float | None = None
    momentum: float = _HP["momentum"]  # sgd, rmsprop
    dampening: float = _HP["dampening"]  # sgd
    nesterov: bool = _HP["nesterov"]  # sgd
    beta1: float = _HP["beta1"]  # adam, adamw
    beta2: float = _HP["beta2"]  # adam, adamw
    amsgrad: bool = _HP["amsgrad"]  # adam, adamw
    alpha: float = _HP["alpha"]  # rmsprop
    centered: bool = _HP["centered"]  # rmsprop
    lr_decay: float = _HP["lr_decay"]  # adagrad
    initial_accumulator_value: float = _HP["initial_accumulator_value"]  # adagrad

    def __post_init__(self):
        entry = OPTIMIZERS.get(self.name)
        if entry is not None:
            for attr, default in entry.defaults.items():
                if getattr(self, attr) is None:
                    object.__setattr__(self, attr, default)

    def validate(self, path: str) -> None:
        _choice(f"{path}.name", self.name, tuple(OPTIMIZERS))
        _settings(self, path, HYPERPARAMETERS)
        if self.name == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise SpecError(f"{path}.nesterov", True, "Nesterov momentum requires momentum > 0 and zero dampening")
        uses = OPTIMIZERS[self.name].uses
        for attr, f in HYPERPARAMETERS.items():
            if attr in SHARED_HYPERPARAMETERS or attr in uses:
                continue
            if getattr(self, attr) != f.default:
                raise SpecError(f"{path}.{attr}", getattr(self, attr), f"is not a hyper-parameter of {self.name!r}")


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate schedule, a function of t = optimizer steps already
    taken (see ``registry.schedules``): constant: lr; step:
    lr·gamma^(t // step_size) (StepLR); exponential: lr·gamma^t
    (ExponentialLR); cosine: eta_min + (lr - eta_min)·(1 + cos(π·t / t_max)) / 2
    (CosineAnnealingLR's closed form). Stepped once per optimizer step."""

    name: str = "constant"
    step_size: int = SCHEDULE_FIELDS["step_size"].default
    gamma: float = SCHEDULE_FIELDS["gamma"].default
    t_max: int = SCHEDULE_FIELDS["t_max"].default
    eta_min: float = SCHEDULE_FIELDS["eta_min"].default

    def validate(self, path: str) -> None:
        _choice(f"{path}.name", self.name, tuple(SCHEDULES))
        _settings(self, path, SCHEDULE_FIELDS)


@dataclass(frozen=True)
class InitSpec:
    """A parameter initializer, as torch.nn.init (see
    ``registry.initializers``): zeros; constant(value); uniform(a, b);
    normal(mean, std); xavier_uniform/xavier_normal(gain);
    kaiming_uniform/kaiming_normal (mode fan_in, gain sqrt(2): relu);
    torch_default: nn.Linear's reset_parameters (weights kaiming_uniform
    with a=sqrt(5), i.e. U(±1/sqrt(fan_in)); biases U(±1/sqrt(fan_in)))."""

    name: str = "torch_default"
    value: float = INIT_FIELDS["value"].default
    a: float = INIT_FIELDS["a"].default
    b: float = INIT_FIELDS["b"].default
    mean: float = INIT_FIELDS["mean"].default
    std: float = INIT_FIELDS["std"].default
    gain: float = INIT_FIELDS["gain"].default

    def validate(self, path: str) -> None:
        _choice(f"{path}.name", self.name, tuple(INITIALIZERS))
        _settings(self, path, INIT_FIELDS)
        if self.name == "uniform" and not self.a < self.b:
            raise SpecError(f"{path}.b", self.b, f"uniform needs a < b (a={self.a})")
        # numpy draws U(lo, hi) as lo + (hi - lo)·u: the width must be a finite float64
        if self.name == "uniform" and not math.isfinite(self.b - self.a):
            raise SpecError(f"{path}.b", self.b, f"uniform's range b - a overflows float64 (a={self.a})")
        if self.name.startswith("xavier") and not math.isfinite(2.0 * math.sqrt(6.0) * self.gain):
            raise SpecError(f"{path}.gain", self.gain, "overflows float64 in the initializer's range")


@dataclass(frozen=True)
class RegularizationSpec:
    """Gaussian noise N(0, input_noise_std²) added to the inputs while
    training; gradient clipping by global L2 norm when clip_grad_norm > 0
    (torch.nn.utils.clip_grad_norm_). L2 weight decay is the optimizer's
    ``weight_decay`` (as torch.optim); dropout and the noise on a hidden
    layer's output are per hidden layer (``LayerSpec``).

    Weight noise (``weight_noise_std``): each training step draws a fresh
    W̃ = W + N(0, weight_noise_std²) for the W of every dense layer (not the
    biases) and runs its forward and backward pass with W̃; the gradient
    dL/dW̃ is applied to the stored W, which is what the optimizer updates
    and Predict uses (W̃ is never stored). One std for all layers, as the
    course's "add noise to the weights" and Graves (2011)'s weight noise
    have it, like ``weight_decay``: it is one knob of the whole model, and a
    per-layer setting can be added beside it without changing this one.

    Target noise (``target_noise_std``): regression only (identity output,
    mse): each step trains on y + N(0, target_noise_std²); the reported loss
    is the one against those noisy targets."""

    input_noise_std: float = 0.0
    clip_grad_norm: float = 0.0
    # --- noise regularizers (issue 12) ---
    weight_noise_std: float = 0.0
    target_noise_std: float = 0.0
    # --- end noise regularizers ---

    def validate(self, path: str) -> None:
        _finite(f"{path}.input_noise_std", self.input_noise_std, lo=0.0)
        _finite(f"{path}.clip_grad_norm", self.clip_grad_norm, lo=0.0)
        _finite(f"{path}.weight_noise_std", self.weight_noise_std, lo=0.0)
        _finite(f"{path}.target_noise_std", self.target_noise_std, lo=0.0)


_PARTS = {
    "hidden": LayerSpec, "output": OutputSpec, "loss": LossSpec,
    "optimizer": OptimizerSpec, "schedule": ScheduleSpec,
    "weight_init": InitSpec, "bias_init": InitSpec,
    "regularization": RegularizationSpec,
}


@dataclass(frozen=True)
class ModelSpec:
    """A fully connected network: ``input_size`` features → each hidden layer
    → the output layer. ``hidden`` may be empty (a linear / logistic model)."""

    input_size: int
    output: OutputSpec
    hidden: tuple[LayerSpec, ...] = ()
    loss: LossSpec = field(default_factory=LossSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    weight_init: InitSpec = field(default_factory=InitSpec)
    bias_init: InitSpec = field(default_factory=InitSpec)
    regularization: RegularizationSpec = field(default_factory=RegularizationSpec)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    # data-parallel replicas on a Ray cluster (gradserve.server.cluster); only a
    # server started with --ray-address trains a model with more than one
    replicas: int = 1

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if isinstance(self.loss, LossSpec) and isinstance(self.output, OutputSpec) and not self.loss.name \
                and self.output.kind in OUTPUTS:
            object.__setattr__(self, "loss", dataclasses.replace(self.loss, name=OUTPUTS[self.output.kind].loss))
        self.validate()

    def validate(self) -> None:
        _count("input_size", self.input_size, lo=1, hi=MAX_UNITS)
        if not isinstance(self.output, OutputSpec):
            raise SpecError("output", self.output, "an output layer is required")
        self.output.validate("output")
        if len(self.hidden) > MAX_LAYERS:
            raise SpecError("hidden", len(self.hidden), f"at most {MAX_LAYERS} hidden layers")
        for i, layer in enumerate(self.hidden):
            if not isinstance(layer, LayerSpec):
                raise SpecError(f"hidden[{i}]", layer, "must be a LayerSpec")
            layer.validate(f"hidden[{i}]")
        self.loss.validate("loss", self.output.kind)
        self.optimizer.validate("optimizer")
        self.schedule.validate("schedule")
        self.weight_init.validate("weight_init")
        self.bias_init.validate("bias_init")
        self.regularization.validate("regularization")
        if self.regularization.target_noise_std > 0 and self.output.kind != "identity":
            raise SpecError("regularization.target_noise_std", self.regularization.target_noise_std,
                            f"applies only to regression (identity output, mse), not to {self.output.kind!r} output")
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _count("seed", self.seed, lo=0, hi=MAX_SEED)
        _count("replicas", self.replicas, lo=1, hi=MAX_REPLICAS)
        if self.num_params > MAX_PARAMS:
            raise SpecError("hidden", [l.units for l in self.hidden], f"{self.num_params} parameters exceed {MAX_PARAMS}")

    # -- derived facts ---------------------------------------------------
    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """(input_size, hidden units..., output units)."""
        return (self.input_size, *(l.units for l in self.hidden), self.output.units)

    @property
    def num_params(self) -> int:
        s = self.layer_sizes
        return sum(s[i + 1] * s[i] + s[i + 1] for i in range(len(s) - 1))

    @property
    def trainable(self) -> bool:
        """False when every hidden layer is a ``step`` unit (an activation
        whose derivative is zero everywhere): no gradient reaches any hidden
        weight, only the output layer would learn."""
        return not self.hidden or any(ACTIVATIONS[l.activation].trainable for l in self.hidden)

    # -- plain-data form -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        """Build and validate a spec from ``to_dict``'s form. Missing keys
        take defaults; unknown keys are a SpecError."""
        if not isinstance(data, dict):
            raise SpecError("spec", data, "must be a mapping")
        kwargs = {}
        for key, value in data.items():
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise SpecError(key, value, "unknown field of ModelSpec")
            part = _PARTS.get(key)
            if part is None:
                kwargs[key] = value
            elif key == "hidden":
                kwargs[key] = tuple(_build(part, f"hidden[{i}]", v) for i, v in enumerate(value or ()))
            else:
                kwargs[key] = _build(part, key, value)
        if "output" not in kwargs:
            raise SpecError("output", None, "an output layer is required")
        if "input_size" not in kwargs:
            raise SpecError("input_size", None, "is required")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong types deep inside, e.g. a str where a tuple goes
            raise SpecError("spec", data, str(exc)) from None


def _build(part, path: str, value):
    if isinstance(value, part):
        return value
    if not isinstance(value, dict):
        raise SpecError(path, value, "must be a mapping")
    names = {f.name for f in dataclasses.fields(part)}
    for key in value:
        if key not in names:
            raise SpecError(f"{path}.{key}", value[key], f"unknown field of {part.__name__}")
    return part(**value)
