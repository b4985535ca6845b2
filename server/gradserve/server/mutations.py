"""The mutations a model's state goes through, as log records: what each
kind carries and how it is applied, both live and in replay (the same call
on the same nnkernels Model, so a replay is bit-exact).

A record's payload::

    kind u8 | format u8 | reserved u16 | meta length u32 | uid u64 | version u64 | step i64
    | meta (JSON: {"arrays": [[name, dtype, shape], ...], ...fields of the kind})
    | the arrays' bytes (see ``wal.pack_arrays``)

``uid`` names one incarnation of a model (a deleted and re-created id gets
a new one); ``version`` counts the model's mutations (1, 2, ...): a replay
applies the record whose version is one past the model's. ``step`` is the
optimizer step the mutation produces (TrainStep) or keeps (others).

Adding a kind (say, a learning-rate change): a new code in ``KINDS`` with
its ``apply`` function; old logs stay readable, and a server that meets a
kind it does not know stops that model's replay there and says so.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gradserve.nnkernels import InputError, Model, OptimizerSpec
from gradserve.nnkernels.model import StepsResult
from gradserve.nnkernels.registry import state_names
from gradserve.wire.shuffle import epoch_order

from . import gradients
from .wal import checksum, pack_arrays, unpack_arrays

HEADER = struct.Struct("<BBHIQQq")
FORMAT = 1

TRAIN_STEP = 1
SET_WEIGHTS = 2
SET_OPTIMIZER = 3
RESTORE_CHECKPOINT = 4
APPLY_GRADIENTS = 5
FIT_STEPS = 6  # a run of a server-side Fit's steps: its parameters, not its batches


@dataclass
class Mutation:
    kind: int
    uid: int
    version: int
    step: int
    arrays: dict[str, np.ndarray]
    fields: dict = field(default_factory=dict)
    nbytes: int = 0  # payload size, once encoded or decoded
    # FIT_STEPS: the data set's (inputs, targets), attached by the registry (never logged)
    source: tuple | None = field(default=None, repr=False, compare=False)

    def encode(self) -> list:
        """The payload as a list of bytes-like parts (arrays not copied)."""
        layout, buffers = pack_arrays(self.arrays)
        meta = json.dumps({"arrays": layout, **self.fields}, separators=(",", ":")).encode()
        parts = [HEADER.pack(self.kind, FORMAT, 0, len(meta), self.uid, self.version, self.step), meta, *buffers]
        self.nbytes = sum(len(p) for p in parts)
        return parts

    @classmethod
    def decode(cls, payload) -> "Mutation":
        """Raises ValueError when the payload is not a record this server reads."""
        if len(payload) < HEADER.size:
            raise ValueError("record shorter than its header")
        kind, fmt, _, meta_len, uid, version, step = HEADER.unpack_from(payload, 0)
        if fmt != FORMAT:
            raise ValueError(f"record format {fmt} (this server reads {FORMAT})")
        meta = json.loads(bytes(payload[HEADER.size:HEADER.size + meta_len]))
        layout = meta.pop("arrays")
        arrays = unpack_arrays(layout, payload, HEADER.size + meta_len)
        return cls(kind, uid, version, step, arrays, meta, len(payload))


def arrays_digest(arrays: dict) -> int:
    """CRC-32C of named arrays (names, shapes, dtypes and bytes)."""
    layout, buffers = pack_arrays(arrays)
    return checksum([json.dumps(layout).encode(), *buffers])


def batch_digest(X: np.ndarray, y: np.ndarray) -> int:
    """CRC-32C of a batch: tells a retried TrainStep from a different batch
    sent with the same expected step."""
    return arrays_digest({"inputs": X, "targets": y})


def _train_step(model: Model, m: Mutation):
    return model.train_step(m.arrays["inputs"], m.arrays["targets"])


def _set_weights(model: Model, m: Mutation):
    model.set_weights(dict(m.arrays))


# an epoch's order serves all its runs (a permutation of 60,000 rows costs ~1 ms); shared, so never
# written (left writable: a read-only order is another Numba signature of the compiled run)
_epoch_order = functools.lru_cache(maxsize=8)(epoch_order)


def _fit_steps(model: Model, m: Mutation) -> StepsResult:
    """Steps ``first .. first + steps - 1`` of epoch ``epoch`` (0-based) of
    the schedule in ``gradserve.wire.shuffle``, in one ``Model.train_steps``
    call (one compiled loop on the CPU): each step is exactly a TrainStep
    with its gathered batch. Stops at the first step whose loss or gradient
    is not finite (deterministic, so a replay stops at the same step)."""
    if m.source is None:
        raise ValueError(f"fit record of version {m.version}: data set {m.fields['dataset']!r} not attached")
    X, y = m.source
    f = m.fields
    order = _epoch_order(f["seed"], f["epoch"], len(X), f["shuffle"])
    return model.train_steps(X, y, order, f["batch_size"], f["first"], f["steps"])


# -- optimizer hyper-parameters and checkpoints ---------------------------------
# A change of hyper-parameters is a new spec: the model is rebuilt on it and
# given its state back (``apply`` returns the new Model). Only numbers that
# keep the optimizer's state buffers may change: the name and the flags
# (nesterov, amsgrad, centered) choose which buffers exist, momentum may not
# cross zero for the same reason, and initial_accumulator_value only fills
# Adagrad's sum at creation.
FIXED_HYPERPARAMETERS = ("name", "nesterov", "amsgrad", "centered", "initial_accumulator_value")


def changed_optimizer(current: OptimizerSpec, changes: dict) -> OptimizerSpec:
    """``current`` with ``changes`` applied; raises InputError naming the
    field for a fixed or unknown one, SpecError for a value out of range."""
    names = {f.name for f in dataclasses.fields(OptimizerSpec)}
    for key, value in changes.items():
        if key not in names:
            raise InputError(f"optimizer.{key}", f"is not an optimizer hyper-parameter (known: {sorted(names)})")
        if key in FIXED_HYPERPARAMETERS and value != getattr(current, key):
            raise InputError(f"optimizer.{key}", "cannot change after creation: it decides which optimizer "
                             "state buffers exist")
    new = dataclasses.replace(current, **changes)
    new.validate("optimizer")
    if state_names(new) != state_names(current):
        raise InputError("optimizer.momentum", f"cannot change from {current.momentum} to {new.momentum}: "
                         "momentum on or off decides whether a momentum buffer exists")
    return new


def with_optimizer(model: Model, optimizer: OptimizerSpec) -> Model:
    """A new Model on ``model``'s spec with ``optimizer``, holding the same
    parameters, optimizer state and step."""
    return type(model)(dataclasses.replace(model.spec, optimizer=optimizer), model.state_dict())


def _set_optimizer(model: Model, m: Mutation):
    return with_optimizer(model, OptimizerSpec(**m.fields["optimizer"]))


def _restore_checkpoint(model: Model, m: Mutation):
    """The checkpoint's parameters, optimizer state and hyper-parameters; the
    step counter keeps counting (steps name replies for exactly-once retries
    and the schedule is a function of the step, so it goes on from here)."""
    state = dict(m.arrays)
    state["step"] = np.array(model.step, dtype=np.int64)
    return type(model)(dataclasses.replace(model.spec, optimizer=OptimizerSpec(**m.fields["optimizer"])), state)


# kind -> (name, apply(model, mutation) -> result, or a new Model that replaces it)
KINDS: dict[int, tuple[str, Callable[[Model, Mutation], object]]] = {
    TRAIN_STEP: ("train_step", _train_step),
    SET_WEIGHTS: ("set_weights", _set_weights),
    SET_OPTIMIZER: ("set_optimizer", _set_optimizer),
    RESTORE_CHECKPOINT: ("restore_checkpoint", _restore_checkpoint),
    APPLY_GRADIENTS: ("apply_gradients", lambda model, m: gradients.apply_gradients(
        model, m.arrays["gradients"], m.fields["loss"])),
    FIT_STEPS: ("fit_steps", _fit_steps),
}


def train_step(uid: int, version: int, step: int, X, y) -> Mutation:
    return Mutation(TRAIN_STEP, uid, version, step, {"inputs": X, "targets": y})


def set_weights(uid: int, version: int, step: int, weights: dict) -> Mutation:
    return Mutation(SET_WEIGHTS, uid, version, step, dict(weights))


def set_optimizer(uid: int, version: int, step: int, optimizer: OptimizerSpec) -> Mutation:
    return Mutation(SET_OPTIMIZER, uid, version, step, {}, {"optimizer": dataclasses.asdict(optimizer)})


def restore_checkpoint(uid: int, version: int, step: int, tag: str, state: dict,
                       optimizer: OptimizerSpec) -> Mutation:
    """The record carries the checkpoint's state itself, so a replay does not
    depend on the tag still holding it."""
    arrays = {k: v for k, v in state.items() if k != "step"}
    return Mutation(RESTORE_CHECKPOINT, uid, version, step, arrays,
                    {"tag": tag, "optimizer": dataclasses.asdict(optimizer)})


def apply_gradients(uid: int, version: int, step: int, flat: np.ndarray, loss: float) -> Mutation:
    """ApplyGradients, or OptimizerStep with the accumulated mean: the flat
    gradient the step uses (the reported loss rides along: NaN when unknown)."""
    return Mutation(APPLY_GRADIENTS, uid, version, step, {"gradients": flat}, {"loss": loss})


def fit_steps(uid: int, version: int, step: int, source: tuple, *, dataset: str, seed: int, shuffle: bool,
              epoch: int, first: int, steps: int, batch_size: int) -> Mutation:
    return Mutation(FIT_STEPS, uid, version, step, {},
                    {"dataset": dataset, "seed": seed, "shuffle": shuffle, "epoch": epoch, "first": first,
                     "steps": steps, "batch_size": batch_size}, source=source)


def apply(model: Model, m: Mutation) -> tuple[Model, object]:
    """(the model after ``m``, ``m``'s result): kinds that change the spec
    return a new Model, the others change ``model`` in place."""
    if m.kind not in KINDS:
        raise ValueError(f"unknown mutation kind {m.kind} (known: {sorted(KINDS)})")
    result = KINDS[m.kind][1](model, m)
    if isinstance(result, Model):
        return result, None
    return model, result
