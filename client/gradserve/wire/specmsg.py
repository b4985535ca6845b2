"""ModelSpec message <-> the plain dict form of ``nnkernels.ModelSpec.to_dict``.

The dict is what both ends speak: the client builds one from keyword
arguments, the server hands it to ``ModelSpec.from_dict`` (which validates
and fills defaults) and echoes ``to_dict()`` back. Unset optionals and
empty strings are left out of the dict, so they take nnkernels' defaults.
"""
from __future__ import annotations

from typing import Any

from gradserve.v1 import trainer_pb2 as pb

# spec part (dict key) -> message class; "hidden" is a repeated LayerSpec
_PART_MESSAGES = {
    "hidden": pb.LayerSpec, "output": pb.OutputSpec, "loss": pb.LossSpec,
    "optimizer": pb.OptimizerSpec, "schedule": pb.ScheduleSpec,
    "weight_init": pb.InitSpec, "bias_init": pb.InitSpec,
    "regularization": pb.RegularizationSpec,
}


def _part_to_dict(msg) -> dict[str, Any]:
    out = {}
    for fd in msg.DESCRIPTOR.fields:
        if fd.has_presence:
            if msg.HasField(fd.name):
                out[fd.name] = getattr(msg, fd.name)
        else:
            value = getattr(msg, fd.name)
            if value != "":  # empty string: the default name; numbers always go (0 units is an error to report)
                out[fd.name] = value
    return out


def _fill_part(msg, data: dict[str, Any], path: str) -> None:
    names = {fd.name for fd in msg.DESCRIPTOR.fields}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{path}.{key}: unknown field of {msg.DESCRIPTOR.name}")
        if value is None:
            continue
        try:
            setattr(msg, key, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}.{key}={value!r}: {exc}") from None


def spec_from_message(msg: pb.ModelSpec) -> dict[str, Any]:
    """The fields the message sets, as a dict for ``ModelSpec.from_dict``."""
    out: dict[str, Any] = {"input_size": msg.input_size}
    out["hidden"] = [_part_to_dict(layer) for layer in msg.hidden]
    for key in _PART_MESSAGES:
        if key != "hidden" and msg.HasField(key):
            out[key] = _part_to_dict(getattr(msg, key))
    for key in ("dtype", "device"):
        if getattr(msg, key):
            out[key] = getattr(msg, key)
    if msg.HasField("seed"):
        out["seed"] = msg.seed
    if msg.replicas:
        out["replicas"] = msg.replicas
    return out


def spec_to_message(data: dict[str, Any], out: pb.ModelSpec | None = None) -> pb.ModelSpec:
    """A spec dict (``ModelSpec.to_dict()`` form, possibly partial) as a
    message. Raises ValueError naming the field for unknown keys or values
    of the wrong type."""
    msg = pb.ModelSpec() if out is None else out
    for key, value in data.items():
        if value is None:
            continue
        if key == "hidden":
            for i, layer in enumerate(value):
                _fill_part(msg.hidden.add(), layer, f"hidden[{i}]")
        elif key in _PART_MESSAGES:
            _fill_part(getattr(msg, key), value, key)
        elif key in ("input_size", "dtype", "device", "seed", "replicas"):
            _fill_part(msg, {key: value}, "spec")
        else:
            raise ValueError(f"{key}: unknown field of ModelSpec")
    return msg


def optimizer_changes(msg: pb.OptimizerSpec) -> dict[str, Any]:
    """The fields an OptimizerSpec message sets (SetOptimizer's changes)."""
    return _part_to_dict(msg)
