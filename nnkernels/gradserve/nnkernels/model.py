"""Model: a spec, its flat parameters and a backend, with the input checks
and the training-step protocol (non-finite steps are refused, clipping, lr
schedule) that every device shares."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from .devices import make_backend
from .errors import InputError, NonFiniteError, NotTrainableError
from .finite import all_finite
from .params import ParamLayout, init_params
from .registry import OUTPUTS, clip_coefficient, scheduled_lr, state_names
from .spec import ModelSpec


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports. ``step`` is the count after the
    step; ``accuracy`` is None for regression; ``grad_norm`` is the global
    L2 norm of the gradient before clipping; ``lr`` the rate used."""

    step: int
    loss: float
    accuracy: float | None
    grad_norm: float
    lr: float


@dataclass(frozen=True)
class StepsResult:
    """What ``Model.train_steps`` did: one StepResult and the batch's rows
    per step applied, and the NonFiniteError of the step that stopped the
    run early (that step and the rest were not applied), else None."""

    results: list
    rows: list
    error: NonFiniteError | None = None


def _real_array(value, field: str) -> np.ndarray:
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"is not a rectangular numeric array ({exc})") from None
    if a.dtype.kind not in "biuf":
        raise InputError(field, f"must hold real numbers (bool, int or float), got dtype {a.dtype}")
    return a


def _norm(sq: float) -> float:
    """The gradient norm from its square (NaN for a NaN or negative one)."""
    return math.sqrt(sq) if sq >= 0 else float("nan")


def _normalized(a: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous, writable, of ``dtype``: copies only when needed."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught as non-finite
        out = np.ascontiguousarray(a, dtype=dtype)
    if not out.flags.writeable:
        out = out.copy()
    return out


class Model:
    """One MLP: ``Model(spec, state=None)``; ``state`` is a ``state_dict()``
    to resume from. Not thread-safe for training: callers serialize
    train_step / train_steps / set_weights / load_state_dict per model; predict may run
    concurrently with predict and gradients."""

    def __init__(self, spec: ModelSpec, state: dict | None = None):
        self.spec = spec
        self.layout = ParamLayout(spec)
        self.dtype = np.dtype(spec.dtype)
        self.step = 0
        self._backend = make_backend(spec, init_params(spec))
        self._grad_lock = threading.Lock()  # the training workspace is shared
        if state is not None:
            self.load_state_dict(state)

    @property
    def backend(self):
        return self._backend

    @property
    def num_params(self) -> int:
        return self.layout.size

    def param_shapes(self) -> list[tuple[str, tuple]]:
        return self.layout.shapes()

    # -- input checks ---------------------------------------------------------
    def _inputs(self, X) -> np.ndarray:
        a = _real_array(X, "inputs")
        if a.ndim != 2:
            raise InputError("inputs", f"must be 2-D (rows, {self.spec.input_size}), got shape {a.shape}")
        if a.shape[0] < 1:
            raise InputError("inputs", "is empty: a batch needs at least one row")
        if a.shape[1] != self.spec.input_size:
            raise InputError("inputs", f"has {a.shape[1]} columns, the model takes {self.spec.input_size}")
        a = _normalized(a, self.dtype)
        if not all_finite(a):
            raise InputError("inputs", f"contains NaN or Inf (or values beyond {self.dtype.name})")
        return a

    def _targets(self, y, n: int) -> np.ndarray:
        a = _real_array(y, "targets")
        units = self.spec.output.units
        kind = OUTPUTS[self.spec.output.kind]
        if a.ndim == 0 or a.shape[0] != n:
            raise InputError("targets", f"has shape {a.shape}, expected {n} rows to match the inputs")
        if kind.class_labels:
            if a.ndim == 1:
                if a.dtype.kind not in "iub":
                    raise InputError("targets", f"1-D class labels must be integers, got dtype {a.dtype} "
                                     f"(send probabilities as ({n}, {units}) floats)")
                labels = a.astype(np.int64)
                if labels.min() < 0 or labels.max() >= units:
                    raise InputError("targets", f"class labels must be in [0, {units}), got "
                                     f"min {labels.min()} max {labels.max()}")
                return _normalized(labels, np.int64)
            if a.ndim != 2 or a.shape[1] != units:
                raise InputError("targets", f"must be labels ({n},) or probabilities ({n}, {units}), "
                                 f"got shape {a.shape}")
        else:
            if a.ndim == 1 and units == 1:
                a = a.reshape(n, 1)
            if a.ndim != 2 or a.shape[1] != units:
                raise InputError("targets", f"must have shape ({n}, {units}), got {a.shape}")
        a = _normalized(a, self.dtype)
        if not all_finite(a):
            raise InputError("targets", "contains NaN or Inf")
        if kind.target_range is not None:
            lo, hi = kind.target_range
            if a.min() < lo or a.max() > hi:
                raise InputError("targets", f"{kind.loss} targets must lie in [{lo:g}, {hi:g}]")
        return a

    # -- compute ---------------------------------------------------------------
    def train_step(self, X, y) -> StepResult:
        """One optimizer step on the batch; raises NonFiniteError (model
        unchanged) when the loss or gradient is not finite."""
        if not self.spec.trainable:
            raise NotTrainableError("every hidden layer is a 'step' unit (zero derivative): nothing can be trained")
        X = self._inputs(X)
        return self._step(X, self._targets(y, X.shape[0]))

    def _step(self, X: np.ndarray, y: np.ndarray) -> StepResult:
        """``train_step`` on a batch already checked and in the model's dtypes."""
        with self._grad_lock:
            loss, correct, sq = self._backend.loss_and_grads(X, y, self.step)
            norm = _norm(sq)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise self._not_applied(loss, norm)
            scale = clip_coefficient(norm, self.spec.regularization.clip_grad_norm)
            lr = scheduled_lr(self.spec.schedule, self.spec.optimizer.lr, self.step)
            self._backend.step(lr, self.step + 1, scale)
            self.step += 1
        return StepResult(self.step, loss, self._accuracy(correct, X.shape[0]), norm, lr)

    def train_steps(self, X, y, order, batch_size: int, first: int = 0, steps: int | None = None) -> StepsResult:
        """Optimizer steps on batches of (X, y) taken in ``order``: step s
        trains on rows ``order[b·B:(b+1)·B]`` (b = first + s, B =
        ``batch_size``; the last batch holds what remains), exactly as
        ``train_step(X[rows], y[rows])`` would, bit for bit (dropout and
        noise draws, schedule and clipping included). ``steps`` defaults to
        the rest of ``order``. Stops before the first step whose loss or
        gradient is not finite and returns its error in the result (the
        model at its last finite step) instead of raising.

        The CPU backend runs every step inside one compiled call
        (``cpu.epochs``); a backend without one is driven step by step. X is
        checked for shape here, not for NaN/Inf (a whole data set per call
        would cost more than the steps: check it once, as ``train_step``'s
        batches are): a non-finite input shows as a non-finite step."""
        if not self.spec.trainable:
            raise NotTrainableError("every hidden layer is a 'step' unit (zero derivative): nothing can be trained")
        X = self._data_inputs(X)
        y = self._targets(y, X.shape[0])
        order = _real_array(order, "order")
        if order.ndim != 1 or order.dtype.kind not in "iu" or (
                order.size and (order.min() < 0 or order.max() >= X.shape[0])):
            raise InputError("order", f"must be 1-D integer row indices in [0, {X.shape[0]})")
        order = np.ascontiguousarray(order, dtype=np.int64)
        if batch_size < 1:
            raise InputError("batch_size", f"is {batch_size}: must be >= 1")
        batches = -(-order.shape[0] // batch_size)
        steps = batches - first if steps is None else steps
        if not (0 <= first and 0 <= steps and first + steps <= batches):
            raise InputError("steps", f"batches {first} .. {first + steps - 1} are not within the {batches} "
                             f"batches of {batch_size} rows of order")
        out = StepsResult([], [])
        with self._grad_lock:
            run = self._backend.train_steps(X, y, order, first, steps, batch_size, self.step) if steps else (0, None)
        if run is None:
            for b in range(first, first + steps):
                rows = order[b * batch_size:(b + 1) * batch_size]
                try:  # each batch cast as the compiled run gathers it (a NaN input: a non-finite step)
                    out.results.append(self._step(_normalized(X[rows], self.dtype), y[rows]))
                except NonFiniteError as exc:
                    return StepsResult(out.results, out.rows, exc)
                out.rows.append(len(rows))
            return out
        done, table = run
        for s in range(done):
            loss, correct, sq, n = table[s]
            n = int(n)
            lr = scheduled_lr(self.spec.schedule, self.spec.optimizer.lr, self.step)
            self.step += 1
            out.results.append(StepResult(self.step, float(loss), self._accuracy(int(correct), n), math.sqrt(sq), lr))
            out.rows.append(n)
        if done < steps:
            loss, _, sq = (float(v) for v in table[done, :3])
            return StepsResult(out.results, out.rows, self._not_applied(loss, _norm(sq)))
        return out

    def _not_applied(self, loss: float, norm: float) -> NonFiniteError:
        return NonFiniteError(f"step {self.step + 1} not applied: loss={loss!r}, gradient norm={norm!r}")

    def _data_inputs(self, X) -> np.ndarray:
        """A data set's inputs for ``train_steps``: shape checked; float32 and
        float64 C-contiguous arrays kept as they are (read-only too: the
        steps cast the rows they gather), others converted once. Returns a
        read-only view."""
        a = _real_array(X, "inputs")
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != self.spec.input_size:
            raise InputError("inputs", f"must be 2-D (rows >= 1, {self.spec.input_size}), got shape {a.shape}")
        if a.dtype not in (np.float32, np.float64) or not a.flags.c_contiguous:
            a = _normalized(a, self.dtype)
        a = a.view()
        a.flags.writeable = False  # always read-only (stored data sets are): one compiled signature, not two
        return a

    def _accuracy(self, correct: int, n: int):
        """The share of rows or elements (what the output kind counts) classified right; None for regression."""
        if not OUTPUTS[self.spec.output.kind].classifier:
            return None
        return correct / self.spec.output.counted(n)

    def gradients(self, X, y) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, raw gradients by name) with the draws of the next step;
        nothing in the model changes."""
        X = self._inputs(X)
        y = self._targets(y, X.shape[0])
        with self._grad_lock:
            loss, _, _ = self._backend.loss_and_grads(X, y, self.step)
            grads = self._backend.get_grads()
        return loss, {k: v.copy() for k, v in self.layout.named_views(grads).items()}

    def predict(self, X, logits: bool = False) -> np.ndarray:
        """Probabilities (classifiers) / values, or logits; (n, output units)."""
        return self._backend.forward(self._inputs(X), logits=bool(logits))

    # -- weights and state -------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.layout.named_views(self._backend.get_params()).items()}

    def set_weights(self, weights: dict) -> None:
        """Replace every parameter; all names, exact shapes, finite reals."""
        if not isinstance(weights, dict):
            raise InputError("weights", "must be a mapping of parameter name to array")
        expected = dict(self.layout.shapes())
        missing = [k for k in expected if k not in weights]
        unknown = [k for k in weights if k not in expected]
        if unknown:
            raise InputError(str(unknown[0]), f"is not a parameter of this model (expected {list(expected)})")
        if missing:
            raise InputError(missing[0], "is missing: set_weights needs every parameter")
        flat = np.empty(self.layout.size, self.dtype)
        views = self.layout.named_views(flat)
        for name, shape in expected.items():
            a = _real_array(weights[name], name)
            if a.shape != shape:
                raise InputError(name, f"has shape {a.shape}, expected {shape}")
            views[name][...] = a.astype(self.dtype)
            if not all_finite(views[name]):
                raise InputError(name, "contains NaN or Inf")
        with self._grad_lock:
            self._backend.set_params(flat)

    def nonfinite_state(self) -> list[str]:
        """Names of the state parts (``params``, ``optimizer.<name>``) holding
        NaN or ±Inf, e.g. after an update overflowed from finite gradients;
        empty when the model is sound. No copies on the CPU."""
        return self._backend.nonfinite_buffers()

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {"params": self._backend.get_params(), "step": np.array(self.step, dtype=np.int64)}
        for name, buf in self._backend.get_state().items():
            d[f"optimizer.{name}"] = buf
        return d

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict):
            raise InputError("state", "must be a mapping")
        names = {"params", "step"} | {f"optimizer.{n}" for n in state_names(self.spec.optimizer)}
        for k in d:
            if k not in names:
                raise InputError(str(k), f"is not part of this model's state (expected {sorted(names)})")
        for k in names:
            if k not in d:
                raise InputError(k, "is missing from the state")
        step = np.asarray(d["step"])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise InputError("step", f"must be a non-negative integer scalar, got {d['step']!r}")
        arrays = {}
        for k in names - {"step"}:
            a = _real_array(d[k], k)
            if a.shape != (self.layout.size,):
                raise InputError(k, f"has shape {a.shape}, expected ({self.layout.size},)")
            a = a.astype(self.dtype)
            if not all_finite(a):
                raise InputError(k, "contains NaN or Inf")
            arrays[k] = a
        with self._grad_lock:
            self._backend.set_params(arrays["params"])
            self._backend.set_state({k[len("optimizer."):]: v for k, v in arrays.items() if k != "params"})
            self.step = int(step)
