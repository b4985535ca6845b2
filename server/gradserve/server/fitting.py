"""Server-side Fit: epochs over a stored data set, as runs of steps logged
as their parameters (``mutations.FIT_STEPS``), with progress, validation
and early stopping.

Each run of steps takes the model's write lock once, is one log record and
one compiled call (``Model.train_steps``: the gather and every step inside
Numba): a Predict waits at most one run and sees whole steps only, other
models are never blocked, and the log grows by ~200 bytes per run instead
of a batch per step. A run lasts about ``RUN_SECONDS`` (its length is set
from the steps' measured time, at most ``MAX_RUN_STEPS``, never past the
epoch's end or a progress report), so that Predict latency and
cancellation stay bounded whatever a step costs while tiny steps are not
cut into runs whose fixed costs (lock, log record, fsync) outweigh them. A
cancelled call stops at the next run boundary; every completed run is kept
(and durable). A run's length is in its record, so a replay repeats it.

The batches are ``gradserve.wire.shuffle.fit_batches``: each step equals a
TrainStep with that batch, bit for bit."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from gradserve.nnkernels import InputError, NonFiniteError
from gradserve.wire.metrics import validation_metrics
from gradserve.wire.shuffle import steps_per_epoch

from .datasets import DatasetInfo
from .errors import BadRequest
from .registry import ModelHandle, ModelRegistry, StateOverflow

RUN_SECONDS = 0.05  # a run's target duration: how long a Predict may wait, how late a cancel is seen
FIRST_RUN_STEPS = 8  # a Fit's first run, before its steps have been timed
MAX_RUN_STEPS = 4096


@dataclass
class FitParams:
    dataset_id: str
    epochs: int
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    validation_dataset_id: str = ""
    patience: int = 0
    min_delta: float = 0.0
    restore_best_weights: bool = False
    progress_every_steps: int = 0
    start_step: int | None = None

    def check(self, registry: ModelRegistry) -> None:
        if not self.dataset_id:
            raise BadRequest("dataset_id", "is required")
        if self.epochs < 1:
            raise BadRequest("epochs", f"is {self.epochs}: must be >= 1")
        if self.batch_size < 1:
            raise BadRequest("batch_size", f"is {self.batch_size}: must be >= 1")
        registry.limits.check_rows(self.batch_size, "batch_size")
        if self.patience < 0:
            raise BadRequest("patience", f"is {self.patience}: must be >= 0")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise BadRequest("min_delta", f"is {self.min_delta}: must be finite and >= 0")
        if self.progress_every_steps < 0:
            raise BadRequest("progress_every_steps", f"is {self.progress_every_steps}: must be >= 0")
        if self.start_step is not None and self.start_step < 0:
            raise BadRequest("start_step", f"is {self.start_step}: must be >= 0")


@dataclass
class Progress:
    epoch: int  # 1-based
    epoch_step: int
    steps_per_epoch: int
    step: int
    loss: float
    accuracy: float | None
    lr: float
    epoch_end: bool = False
    val: dict = field(default_factory=dict)
    stopped_early: bool = False
    best_epoch: int = 0
    restored_best: bool = False


def _fitting_arrays(registry: ModelRegistry, handle: ModelHandle, info: DatasetInfo,
                    field_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The data set's (inputs, targets) as the Fit's runs read them, or
    INVALID_ARGUMENT naming the data set and the model when its features or
    targets do not fit the model (a batch's checks: shapes, and the targets'
    kind and range). The values were checked finite at upload, so float
    inputs are only checked for shape, not copied (a batch's check of the
    whole mapped, read-only data set copied it: 188 MB on 60,000 x 784),
    unless the model's dtype is narrower than theirs (float64 values beyond
    float32's range would turn into Inf); integer inputs are cast to the
    model's dtype here, once, not by every run."""
    X, y = registry.datasets.arrays(info.dataset_id, field_name)
    with handle.lock.read():
        model = registry._usable(handle)
        try:
            if X.dtype.kind == "f" and X.dtype.itemsize > model.dtype.itemsize:
                model._inputs(X)
            X = model._data_inputs(X)
            model._targets(y, len(X))
        except InputError as exc:
            spec = model.spec
            raise BadRequest(field_name, f"data set {info.dataset_id!r} (inputs {info.inputs_shape} "
                                         f"{info.inputs_dtype}, targets {info.targets_shape} {info.targets_dtype}) "
                                         f"does not fit model {handle.model_id!r} (input_size {spec.input_size}, "
                                         f"{spec.output.kind} output of {spec.output.units} units): "
                                         f"{exc}") from None
    return X, y


def _predict(registry: ModelRegistry, handle: ModelHandle, X: np.ndarray) -> np.ndarray:
    rows = registry.limits.max_batch_rows
    parts = [registry.predict(handle, X[i:i + rows], False)[0] for i in range(0, len(X), rows)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@contextmanager
def _finally(action: Callable[[], None]):
    """Runs ``action`` however the block ends (a return, an exception, the
    generator closed by a cancelled call)."""
    try:
        yield
    finally:
        action()


def fit(registry: ModelRegistry, handle: ModelHandle, p: FitParams, is_active: Callable[[], bool],
        on_steps: Callable[[int], None] | None = None) -> Iterator[Progress]:
    """Runs the Fit, yielding Progress (each sent once its steps are durable).
    Stops when ``is_active()`` turns false (at a run boundary). Raises
    NonFiniteError/StateOverflow (the model at its last finite step).
    ``on_steps(n)`` is told of every run's n applied steps (metrics).

    A run's log record is made durable while the next run computes: a
    report is queued, and sent once the commits before it are durable, after
    the next run is computed (or when the Fit ends or raises), so no report
    runs ahead of the log and no run waits for an fsync (measured on digits,
    one run per epoch: waiting after every run was 30% of the Fit's time)."""
    p.check(registry)
    info = registry.datasets.info(p.dataset_id)
    X, y = _fitting_arrays(registry, handle, info, "dataset_id")
    val = None
    if p.validation_dataset_id:
        val_info = registry.datasets.info(p.validation_dataset_id, "validation_dataset_id")
        val = _fitting_arrays(registry, handle, val_info, "validation_dataset_id")
    kind = handle.spec.output.kind
    spe = steps_per_epoch(len(X), p.batch_size)
    done = 0
    if p.start_step is not None:
        step_now = registry.describe(handle)["step"]
        done = step_now - p.start_step
        if not 0 <= done <= p.epochs * spe:
            raise BadRequest("start_step", f"is {p.start_step}: model {handle.model_id!r} is at step {step_now}, "
                                           f"which is not within this Fit's {p.epochs * spe} steps from it")
    every = p.progress_every_steps
    run = FIRST_RUN_STEPS
    fields = dict(dataset=p.dataset_id, seed=int(p.seed), shuffle=bool(p.shuffle), batch_size=int(p.batch_size))
    track_best = p.patience > 0 or p.restore_best_weights
    best, best_epoch, best_weights, wait = math.inf, 0, None, 0
    ids = [p.dataset_id] + ([p.validation_dataset_id] if val is not None else [])
    pending = []  # commits of runs applied and logged, not yet known durable
    reports: list[Progress] = []  # progress to send once every commit made before it is durable

    def durable(commits: int | None = None) -> None:
        """Waits for the first ``commits`` pending commits (all by default)."""
        upto = len(pending) if commits is None else commits
        for commit in pending[:upto]:
            commit.wait()
        del pending[:upto]

    def released(commits: int | None = None) -> list[Progress]:
        """The queued reports, once the commits they follow are durable."""
        durable(commits)
        out = reports[:]
        reports.clear()
        return out

    with registry.use_datasets(ids), _finally(durable):
        for epoch in range(done // spe, p.epochs):
            b = done % spe if epoch == done // spe else 0
            loss_sum, correct, rows, has_accuracy = 0.0, 0.0, 0, False
            last_lr, last_step, reported = 0.0, 0, b
            single_until = -1  # after a run overflowed: its steps again one by one, to keep the finite ones
            while b < spe:
                if not is_active():
                    return  # (durable on the way out)
                n = 1 if b < single_until else min(run, spe - b, every - b % every if every else spe)
                t0 = time.perf_counter()
                try:
                    r, commit = registry.fit_steps(handle, (X, y), epoch=epoch, first=b, steps=n, **fields)
                    if len(r.results) == n:
                        per_step = (time.perf_counter() - t0) / n
                        run = max(1, min(MAX_RUN_STEPS, int(RUN_SECONDS / max(per_step, 1e-7))))
                except StateOverflow:
                    if n == 1:
                        yield from released()
                        raise
                    single_until = b + n
                    continue
                pending.append(commit)
                yield from released(len(pending) - 1)  # those queued before this run
                if on_steps is not None and r.results:
                    on_steps(len(r.results))
                for result, k in zip(r.results, r.rows):
                    loss_sum += result.loss * k
                    rows += k
                    if result.accuracy is not None:
                        has_accuracy = True
                        correct += result.accuracy * k
                    last_lr, last_step = result.lr, result.step
                b += len(r.results)
                if r.error is not None:
                    yield from released()
                    raise NonFiniteError(f"{r.error}; the Fit stopped at epoch {epoch + 1}, step {b + 1} of "
                                         f"{spe}; the model keeps its last finite step") from None
                if every and b < spe and b // every > reported // every:
                    reported = b
                    reports.append(Progress(epoch + 1, b, spe, last_step, loss_sum / max(rows, 1),
                                            correct / max(rows, 1) if has_accuracy else None, last_lr))
            metrics = {}
            if val is not None:
                metrics = validation_metrics(kind, _predict(registry, handle, val[0]), val[1])
            end = Progress(epoch + 1, spe, spe, last_step or registry.describe(handle)["step"], loss_sum / max(rows, 1),
                           correct / max(rows, 1) if has_accuracy else None, last_lr, epoch_end=True, val=metrics)
            if track_best:
                value = metrics.get("val_loss", end.loss)
                if value < best - p.min_delta:
                    best, best_epoch, wait = value, epoch + 1, 0
                    if p.restore_best_weights:
                        best_weights = registry.get_weights(handle)[1]
                else:
                    wait += 1
                end.best_epoch = best_epoch
                end.stopped_early = p.patience > 0 and wait >= p.patience
                if (end.stopped_early or epoch + 1 == p.epochs) and best_weights is not None and best_epoch != epoch + 1:
                    registry.set_weights(handle, best_weights)
                    end.restored_best = True
            reports.append(end)
            if end.stopped_early or epoch + 1 == p.epochs:
                yield from released()
            if end.stopped_early:
                return
