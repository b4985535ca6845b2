"""What the kernels of every backend are handed, built on the host from a
spec and the registries, so the CPU and CUDA backends derive nothing twice:

- the layer table: one ``LAYER`` record per dense layer (geometry, where its
  W and b sit in the flat buffer, activation code and parameter, dropout,
  the noise on its output and on its W), with ``set_step_keys`` filling in
  the stream keys of the step being trained;
- the optimizer's state buffers in the kernels' slot order;
- the coefficients of one optimizer step, named (``COEFFICIENTS``): every
  scalar the fused optimizer passes read, computed in float64 as torch does
  with Python floats, then cast to the parameter dtype by the backend.
"""
from __future__ import annotations

import math

import numpy as np

from . import rng
from .params import ParamLayout
from .registry import ACTIVATIONS, OPTIMIZERS, STATE_SLOTS, ActivationCode
from .spec import ModelSpec, OptimizerSpec

LAYER = np.dtype([
    ("fan_in", np.int64),       # the layer's inputs
    ("fan_out", np.int64),      # its units
    ("w_offset", np.int64),     # W (fan_out × fan_in, row-major) in the flat parameter buffer
    ("b_offset", np.int64),     # b (fan_out) in the flat parameter buffer
    ("unit_offset", np.int64),  # units of the layers before it: its block of an n-row workspace starts at n·unit_offset
    ("act", np.int64),          # ActivationCode; the output layer's is identity (its output kind acts on the logits)
    ("act_param", np.float64),  # the activation's parameter (LayerSpec.activation_param)
    ("drop_p", np.float64),     # dropout probability while training; 0 for the output layer
    ("drop_key", np.uint64),    # the dropout stream key of the step being trained: set by each training call
    # --- noise regularizers (issue 12); keys set by each training call, as drop_key ---
    ("noise_std", np.float64),  # Gaussian noise on the (dropped-out) activation, the next layer's input; 0 for the output layer
    ("noise_key", np.uint64),   # its stream key (rng.hidden_noise_stream)
    ("wnoise_std", np.float64), # Gaussian noise on W while training (RegularizationSpec.weight_noise_std)
    ("wnoise_key", np.uint64),  # its stream key (rng.weight_noise_stream)
    # --- end noise regularizers ---
])


def layer_table(spec: ModelSpec) -> np.ndarray:
    """The LAYER records of ``spec``'s dense layers, hidden layers first."""
    layout = ParamLayout(spec)
    table = np.zeros(layout.num_layers, LAYER)
    units = 0
    for slot, row in zip(layout.slots, table):
        row["fan_in"], row["fan_out"] = slot.fan_in, slot.fan_out
        row["w_offset"], row["b_offset"] = slot.w_offset, slot.b_offset
        row["unit_offset"] = units
        units += slot.fan_out
        if slot.index < len(spec.hidden):
            layer = spec.hidden[slot.index]
            row["act"] = ACTIVATIONS[layer.activation].code
            row["act_param"] = layer.activation_param
            row["drop_p"] = layer.dropout
            row["noise_std"] = layer.noise_std
        else:
            row["act"] = ActivationCode.IDENTITY
        row["wnoise_std"] = spec.regularization.weight_noise_std
    return table


def set_step_keys(table: np.ndarray, spec: ModelSpec, step: int) -> None:
    """Fill in the dropout and noise stream keys of training step ``step``
    (``nnkernels.rng``) where the layer draws them; the others stay as they are."""
    for i, layer in enumerate(spec.hidden):
        if layer.dropout > 0:
            table[i]["drop_key"] = rng.stream_key(spec.seed, step, rng.dropout_stream(i))
        if layer.noise_std > 0:
            table[i]["noise_key"] = rng.stream_key(spec.seed, step, rng.hidden_noise_stream(i))
    if spec.regularization.weight_noise_std > 0:
        for l in range(table.shape[0]):
            table[l]["wnoise_key"] = rng.stream_key(spec.seed, step, rng.weight_noise_stream(l))


def step_noise_keys(spec: ModelSpec, step: int) -> tuple[int, int]:
    """(input-noise key, target-noise key) of training step ``step``; 0
    where that noise is off (TrainSettings' noise_key, target_noise_key)."""
    reg = spec.regularization
    noise = rng.stream_key(spec.seed, step, rng.NOISE_STREAM) if reg.input_noise_std > 0 else 0
    target = rng.stream_key(spec.seed, step, rng.TARGET_NOISE_STREAM) if reg.target_noise_std > 0 else 0
    return noise, target


def state_slots(opt: OptimizerSpec, state: dict, empty) -> tuple:
    """The optimizer's state buffers in the kernels' STATE_SLOTS slots
    (``registry.optimizers`` order); ``empty`` where the spec keeps none."""
    slots = tuple(state.get(b.name, empty) for b in OPTIMIZERS[opt.name].state)
    return slots + (empty,) * (STATE_SLOTS - len(slots))


# The optimizer kernels' coefficients, by name. Where torch.lerp is involved
# (rmsprop's grad_avg, adam's exp_avg) both avg_weight and avg_keep = 1 -
# avg_weight are given: torch.lerp uses the second form when weight >= 0.5.
COEFFICIENTS = (
    "grad_scale",           # multiplies the gradient first (clipping; 1 when off)
    "lr",                   # the scheduled learning rate
    "weight_decay",
    "eps",
    "first_step",           # 1 on step t = 1 (SGD's momentum buffer starts as the gradient)
    "momentum",             # sgd, rmsprop
    "one_minus_dampening",  # sgd
    "nesterov",             # sgd: 1 or 0
    "clr",                  # adagrad: lr/(1 + (t-1)·lr_decay)
    "sq_decay",             # v ← sq_decay·v + sq_weight·g²: rmsprop α, adam β2
    "sq_weight",            # rmsprop 1-α, adam 1-β2
    "avg_weight",           # lerp weight of the running mean: rmsprop 1-α (grad_avg), adam 1-β1 (exp_avg)
    "avg_keep",             # 1 - avg_weight, computed in float64
    "centered",             # rmsprop: 1 or 0
    "amsgrad",              # adam(w): 1 or 0
    "decoupled",            # adamw: 1 (p ← p·param_decay first), adam: 0 (g ← g + wd·p)
    "step_size",            # adam(w): lr/(1-β1^t)
    "bc2_sqrt",             # adam(w): sqrt(1-β2^t)
    "param_decay",          # adamw: 1 - lr·wd
)


def coefficient_dtype(dtype) -> np.dtype:
    """A record of every COEFFICIENTS field in ``dtype`` (the parameters')."""
    return np.dtype([(name, dtype) for name in COEFFICIENTS])


def _sgd(opt, lr, t):
    return dict(momentum=opt.momentum, one_minus_dampening=1 - opt.dampening, nesterov=float(opt.nesterov))


def _adagrad(opt, lr, t):
    return dict(clr=lr / (1 + (t - 1) * opt.lr_decay))


def _rmsprop(opt, lr, t):
    return dict(sq_decay=opt.alpha, sq_weight=1 - opt.alpha, avg_weight=1 - opt.alpha,
                avg_keep=1 - (1 - opt.alpha), momentum=opt.momentum, centered=float(opt.centered))


def _adam(opt, lr, t):
    return dict(avg_weight=1 - opt.beta1, avg_keep=1 - (1 - opt.beta1), sq_decay=opt.beta2, sq_weight=1 - opt.beta2,
                step_size=lr / (1 - opt.beta1 ** t), bc2_sqrt=math.sqrt(1 - opt.beta2 ** t),
                amsgrad=float(opt.amsgrad), decoupled=float(opt.name == "adamw"),
                param_decay=1 - lr * opt.weight_decay)


# each optimizer's own coefficients (registry name -> function of (opt, lr, t))
_OWN = {"sgd": _sgd, "adagrad": _adagrad, "rmsprop": _rmsprop, "adam": _adam, "adamw": _adam}
_ZERO = dict.fromkeys(COEFFICIENTS, 0.0)


def optimizer_coefficients(opt: OptimizerSpec, lr: float, t: int, grad_scale: float) -> tuple[float, ...]:
    """The COEFFICIENTS of step ``t`` (1-based) at learning rate ``lr``, in
    order, as float64 Python floats; the ones the optimizer does not read are 0."""
    values = dict(_ZERO, grad_scale=grad_scale, lr=lr, weight_decay=opt.weight_decay, eps=opt.eps,
                  first_step=float(t == 1))
    values.update(_OWN[opt.name](opt, lr, t))
    return tuple(values.values())
