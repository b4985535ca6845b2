"""Request building and response decoding shared by Client and AsyncClient:
keyword arguments -> spec dict, arrays -> requests, responses -> numpy."""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Iterator

import grpc
import numpy as np

from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.metrics import validation_metrics as wire_validation_metrics
from gradserve.wire.specmsg import spec_from_message, spec_to_message
from gradserve.wire.status import is_retry_safe
from gradserve.wire.tensor import decode_tensor, encode_tensor

DEFAULT_MAX_MESSAGE_MB = 64


def _part(value, key: str = "name") -> dict | None:
    """A spec part given as a dict, or as its name / units for short."""
    if value is None or isinstance(value, dict):
        return value
    return {key: value}


def build_spec(input_size: int, hidden=(), output=None, *, loss=None, optimizer=None, schedule=None,
               weight_init=None, bias_init=None, regularization=None, dtype=None, device=None,
               seed=None, replicas=None) -> dict[str, Any]:
    """The spec dict for ``create_model``'s keyword arguments, which mirror
    ``nnkernels.ModelSpec``. Shorthands: a hidden layer may be ``units`` or
    ``(units, activation)``; ``output`` may be ``units`` (identity) or
    ``(units, kind)``; ``loss``/``optimizer``/``schedule``/initializers may be
    a name."""
    layers = []
    for layer in hidden or ():
        if isinstance(layer, dict):
            layers.append(layer)
        elif isinstance(layer, (tuple, list)):
            layers.append({"units": layer[0], "activation": layer[1]})
        else:
            layers.append({"units": layer})
    if isinstance(output, (tuple, list)):
        output = {"units": output[0], "kind": output[1]}
    spec = {"input_size": input_size, "hidden": layers, "output": _part(output, "units"),
            "loss": _part(loss), "optimizer": _part(optimizer), "schedule": _part(schedule),
            "weight_init": _part(weight_init), "bias_init": _part(bias_init),
            "regularization": regularization, "dtype": dtype, "device": device, "seed": seed,
            "replicas": replicas}  # replicas > 1: data-parallel on a server started with --ray-address
    return {k: v for k, v in spec.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One acknowledged optimizer step, as the server reported it."""
    step: int
    loss: float
    accuracy: float | None
    grad_norm: float
    lr: float


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the server knows of a model: id, parameter count and shapes, the
    full spec (every default filled in), step count, creation time."""
    model_id: str
    num_params: int
    spec: dict
    step: int
    created_unix: float
    param_shapes: list

    @property
    def output_units(self) -> int:
        return int(self.spec["output"]["units"])

    @property
    def input_size(self) -> int:
        return int(self.spec["input_size"])

    @property
    def is_classifier(self) -> bool:
        return self.spec["output"].get("kind", "identity") in ("sigmoid", "softmax")


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.model_id, msg.num_params, spec_from_message(msg.spec), msg.step,
                     msg.created_unix, [(p.name, tuple(p.shape)) for p in msg.params])


def step_result(msg: pb.TrainStepResponse) -> StepResult:
    return StepResult(msg.step, msg.loss, msg.accuracy if msg.HasField("accuracy") else None,
                      msg.grad_norm, msg.lr)


def create_request(spec: dict, model_id: str | None) -> pb.CreateModelRequest:
    req = pb.CreateModelRequest(model_id=model_id or "")
    spec_to_message(spec, req.spec)
    return req


def train_request(model_id: str, X, y, expected_step: int | None = None) -> pb.TrainStepRequest:
    req = pb.TrainStepRequest(model_id=model_id)
    encode_tensor(X, "inputs", req.inputs)
    encode_tensor(y, "targets", req.targets)
    if expected_step is not None:
        req.expected_step = expected_step
    return req


STEP_METADATA = "gradserve-model-step"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def conflict_step(exc) -> int | None:
    """The model's step a TrainStep refused with ABORTED names (its
    ``expected_step`` did not follow the model's step), else None."""
    if exc.code() != grpc.StatusCode.ABORTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == STEP_METADATA:
            return int(value)
    return None


class StepCounter:
    """The step a model is known to have reached (from ModelInfo and every
    reply); TrainStep requests name ``known + 1`` as their expected step.
    Shared by threads using one RemoteModel: a stale value costs a refusal
    (ABORTED, naming the step) and a resend, never a double step."""

    def __init__(self, step: int):
        self.known = step

    def observe(self, step: int) -> None:
        if step > self.known:
            self.known = step


class TrainAttempts:
    """The exactly-once retry policy of one TrainStep, shared by the blocking
    and the asyncio client. Each attempt sends ``request`` (the batch is
    encoded once), naming the step it produces. After a failure,
    ``retry_delay(exc)`` returns the seconds to wait before the next attempt
    or raises ``exc``:

    - ABORTED naming the model's step, before any attempt that may have been
      applied: another writer moved the model on; resend for the next step
      at once;
    - UNAVAILABLE (a refusal, or a connection lost mid-call, after which the
      step may have been applied): resend unchanged after exponential
      back-off with jitter; the server answers an applied step with its
      original reply. A failure without the retry-safe trailer marks the
      step as possibly applied, so a later step conflict is raised rather
      than resent for yet another step;
    - anything else, or ``retries`` exhausted: raise.
    """

    def __init__(self, model_id: str, X, y, steps: StepCounter, retries: int, backoff: float):
        self.steps = steps
        self.request = train_request(model_id, X, y, steps.known + 1)
        self.maybe_applied = False
        self.retries_left = retries
        self.delay = backoff

    def retry_delay(self, exc) -> float:
        current = conflict_step(exc)
        if current is not None and not self.maybe_applied:
            self.steps.observe(current)
            self.request.expected_step = self.steps.known + 1
            return 0.0
        if exc.code() not in RETRYABLE or self.retries_left <= 0:
            raise exc
        self.maybe_applied = self.maybe_applied or not is_retry_safe(exc)
        self.retries_left -= 1
        delay = self.delay * (1 + random.random())
        self.delay *= 2
        return delay

    def result(self, resp: pb.TrainStepResponse) -> StepResult:
        result = step_result(resp)
        self.steps.observe(result.step)
        return result


def gradients_request(model_id: str, X, y) -> pb.GetGradientsRequest:
    req = pb.GetGradientsRequest(model_id=model_id)
    encode_tensor(X, "inputs", req.inputs)
    encode_tensor(y, "targets", req.targets)
    return req


def named_arrays(tensors) -> dict[str, np.ndarray]:
    """Repeated NamedTensor -> {name: writable ndarray}."""
    return {t.name: np.array(decode_tensor(t.tensor, t.name)) for t in tensors}


def set_weights_request(model_id: str, weights: dict) -> pb.SetWeightsRequest:
    req = pb.SetWeightsRequest(model_id=model_id)
    for name, array in weights.items():
        encode_tensor(np.asarray(array), name, req.weights.add(name=name).tensor)
    return req


def predict_chunks(model_id: str, X, output_units: int, max_message_bytes: int,
                   logits: bool) -> Iterator[pb.PredictRequest]:
    """Predict requests over row chunks small enough that each request and
    each reply stays under ``max_message_bytes`` (with room for framing)."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:  # let the server name the problem
        req = pb.PredictRequest(model_id=model_id, logits=logits)
        encode_tensor(X, "inputs", req.inputs)
        yield req
        return
    row_bytes = max(X.shape[1] * max(X.dtype.itemsize, 4), output_units * 8, 1)
    rows = max(1, int(max_message_bytes * 0.9 - 4096) // row_bytes)
    for start in range(0, X.shape[0], rows):
        req = pb.PredictRequest(model_id=model_id, logits=logits)
        encode_tensor(X[start:start + rows], "inputs", req.inputs)
        yield req


def batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def take(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    # contiguous slices avoid a copy when not shuffling
    if len(index) and index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
        return a[index[0]:index[-1] + 1]
    return a[index]


def validation_metrics(info: ModelInfo, outputs: np.ndarray, y) -> dict[str, float]:
    """``gradserve.wire.metrics.validation_metrics`` for a remote model."""
    return wire_validation_metrics(info.spec["output"].get("kind", "identity"), outputs, np.asarray(y))


class EpochAccumulator:
    """Row-weighted means of loss and accuracy over one epoch's steps."""

    def __init__(self):
        self.rows = 0
        self.loss = 0.0
        self.correct = 0.0
        self.has_accuracy = False

    def add(self, result: StepResult, rows: int) -> None:
        self.rows += rows
        self.loss += result.loss * rows
        if result.accuracy is not None:
            self.has_accuracy = True
            self.correct += result.accuracy * rows

    def summary(self) -> dict[str, float]:
        out = {"loss": self.loss / max(self.rows, 1)}
        if self.has_accuracy:
            out["accuracy"] = self.correct / max(self.rows, 1)
        return out


def check_fit_args(X, y, epochs: int, batch_size: int):
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"fit needs X (n, features) and y with the same n >= 1; got {X.shape} and {y.shape}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    return X, y, math.ceil(len(X) / batch_size)


def set_optimizer_request(model_id: str, changes: dict) -> pb.SetOptimizerRequest:
    """SetOptimizer with the hyper-parameters in ``changes`` set (ValueError
    naming an unknown one)."""
    req = pb.SetOptimizerRequest(model_id=model_id)
    req.optimizer.CopyFrom(spec_to_message({"optimizer": changes}).optimizer)
    return req


def apply_gradients_request(model_id: str, grads: dict) -> pb.ApplyGradientsRequest:
    req = pb.ApplyGradientsRequest(model_id=model_id)
    for name, g in grads.items():
        encode_tensor(np.asarray(g), name, req.gradients.add(name=name).tensor)
    return req


def accumulate_request(model_id: str, X, y) -> pb.AccumulateGradientsRequest:
    return pb.AccumulateGradientsRequest(model_id=model_id, inputs=encode_tensor(np.asarray(X), "inputs"),
                                         targets=encode_tensor(np.asarray(y), "targets"))
