"""ModelRegistry: model id -> ModelHandle, and the rules for locking and
checkpointing. Plain Python over nnkernels; knows nothing of gRPC.

Locking: each handle has a reader/writer lock. Predict and GetWeights
read; TrainStep, GetGradients (it writes the model's gradient buffer),
SetWeights and Delete write. A second lock per handle, ``save_lock``,
orders checkpoints: it is always taken before the model lock, so a
checkpoint snapshots the state under the read lock, lets predictions
continue while it writes to SQLite, and two checkpoints of one model land
in the order their snapshots were taken. Different models share no lock
except the store's (SQLite writes one transaction at a time).

Durability: ``step`` commits every mutation (step, set-weights) before the
call returns; ``interval`` commits a model after ``checkpoint_steps``
mutations or ``checkpoint_seconds`` (background thread), and all models at
shutdown.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from gradserve.nnkernels import Model, ModelSpec

from .limits import LimitExceeded, Limits
from .rwlock import ReadWriteLock
from .store import SqliteStore

log = logging.getLogger("gradserve.registry")

MODEL_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class ModelNotFound(KeyError):
    def __init__(self, model_id: str):
        super().__init__(model_id)
        self.model_id = model_id

    def __str__(self) -> str:
        return f"model_id: no model {self.model_id!r}"


class ModelExists(Exception):
    """A client-chosen id is taken by a model with a different spec."""


class ShuttingDown(Exception):
    pass


@dataclass
class Durability:
    mode: str = "step"  # "step" | "interval"
    checkpoint_steps: int = 100
    checkpoint_seconds: float = 30.0

    def __post_init__(self):
        if self.mode not in ("step", "interval"):
            raise ValueError(f"durability must be 'step' or 'interval', not {self.mode!r}")


class ModelHandle:
    """One served model: the nnkernels Model, its locks and bookkeeping."""

    def __init__(self, model_id: str, model: Model, created: float):
        self.model_id = model_id
        self.model = model
        self.created = created
        self.lock = ReadWriteLock()
        self.save_lock = threading.Lock()
        self.deleted = False
        self.version = 0  # mutations so far (steps, set-weights)
        self.saved_version = 0
        self.saved_at = time.monotonic()

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec


class ModelRegistry:
    def __init__(self, store: SqliteStore, *, limits: Limits = Limits(), durability: Durability = Durability(),
                 default_device: str = "cpu"):
        self.store = store
        self.limits = limits
        self.durability = durability
        self.default_device = default_device
        self._models: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()  # guards _models only
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    def load_stored(self) -> int:
        """Serves every model in the store at its committed step; returns how many."""
        loaded = 0
        for model_id in self.store.model_ids():
            stored = self.store.load(model_id)
            try:
                model = Model(ModelSpec.from_dict(stored.spec))
                model.load_state_dict(stored.state)
            except Exception as exc:  # e.g. a cuda model on a machine without a GPU: keep it stored
                log.error("event=model_not_loaded model_id=%s error=%r", model_id, str(exc))
                continue
            handle = ModelHandle(model_id, model, stored.created)
            self._models[model_id] = handle
            loaded += 1
            log.info("event=model_loaded model_id=%s step=%d params=%d", model_id, model.step, model.num_params)
        return loaded

    def start_checkpointer(self) -> None:
        if self.durability.mode == "interval":
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="checkpointer", daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        period = max(0.05, min(1.0, self.durability.checkpoint_seconds / 2))
        while not self._stop.wait(period):
            for handle in self.handles():
                if handle.version != handle.saved_version and \
                        time.monotonic() - handle.saved_at >= self.durability.checkpoint_seconds:
                    try:
                        self.checkpoint(handle)
                    except Exception:
                        log.exception("event=checkpoint_failed model_id=%s", handle.model_id)

    def close(self) -> int:
        """Stops the checkpointer and checkpoints every model; returns how many were written."""
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        return sum(self.checkpoint(h) is not None for h in self.handles())

    # -- lookup -------------------------------------------------------------
    def handles(self) -> list[ModelHandle]:
        with self._lock:
            return list(self._models.values())

    def get(self, model_id: str) -> ModelHandle:
        with self._lock:
            handle = self._models.get(model_id)
        if handle is None:
            raise ModelNotFound(model_id)
        return handle

    # -- create / delete ----------------------------------------------------
    def create(self, spec_dict: dict, model_id: str = "") -> tuple[ModelHandle, bool]:
        """Creates (and commits) a model; returns (handle, created). An id
        that exists with an equal spec returns that model (idempotent)."""
        if model_id and not MODEL_ID.match(model_id):
            raise ValueError(f"model_id={model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
        spec_dict = dict(spec_dict)
        spec_dict.setdefault("device", self.default_device)
        spec = ModelSpec.from_dict(spec_dict)
        self.limits.check_spec(spec)
        if model_id:
            with self._lock:
                existing = self._models.get(model_id)
            if existing is not None:
                if existing.spec != spec:
                    raise ModelExists(f"model_id={model_id!r} exists with a different spec")
                return existing, False
        model = Model(spec)
        handle = ModelHandle(model_id or uuid.uuid4().hex, model, time.time())
        with self._lock:
            if handle.model_id in self._models:  # a concurrent create of the same id won
                existing = self._models[handle.model_id]
                if existing.spec != spec:
                    raise ModelExists(f"model_id={model_id!r} exists with a different spec")
                return existing, False
            if len(self._models) >= self.limits.max_models:
                raise LimitExceeded("max_models", self.limits.max_models, len(self._models) + 1,
                                    "this model would make models:")
            self._models[handle.model_id] = handle
        try:
            with handle.save_lock:
                self.store.save(handle.model_id, spec.to_dict(), handle.created, model.state_dict())
        except BaseException:
            with self._lock:
                self._models.pop(handle.model_id, None)
            raise
        log.info("event=model_created model_id=%s params=%d device=%s", handle.model_id, model.num_params, spec.device)
        return handle, True

    def delete(self, model_id: str) -> None:
        handle = self.get(model_id)
        with handle.save_lock, handle.lock.write():
            if handle.deleted:
                raise ModelNotFound(model_id)
            handle.deleted = True
            with self._lock:
                self._models.pop(model_id, None)
            self.store.delete(model_id)
        log.info("event=model_deleted model_id=%s", model_id)

    # -- the calls ------------------------------------------------------------
    def _live(self, handle: ModelHandle) -> None:
        if handle.deleted:
            raise ModelNotFound(handle.model_id)

    def _mutate(self, handle: ModelHandle, fn):
        """Runs fn(model) under the write lock as a mutation, then applies the
        durability policy before returning fn's result."""
        if self.durability.mode == "step":
            with handle.save_lock:
                with handle.lock.write():
                    self._live(handle)
                    result = fn(handle.model)
                    handle.version += 1
                    state = handle.model.state_dict()
                    version = handle.version
                # predictions may run while the state is written
                try:
                    self.store.save(handle.model_id, handle.spec.to_dict(), handle.created, state)
                except Exception:
                    self._restore_committed(handle)
                    raise
                handle.saved_version = version
                handle.saved_at = time.monotonic()
            return result
        with handle.lock.write():
            self._live(handle)
            result = fn(handle.model)
            handle.version += 1
            due = handle.version - handle.saved_version >= self.durability.checkpoint_steps
        if due:
            self.checkpoint(handle)
        return result

    def _restore_committed(self, handle: ModelHandle) -> None:
        """After a failed commit under ``step`` durability: put the model back
        at its last committed state, so an unacknowledged step is not kept.
        (The caller holds save_lock, so no other mutation came in between.)"""
        log.error("event=commit_failed model_id=%s action=restore_last_commit", handle.model_id)
        try:
            stored = self.store.load(handle.model_id)
            with handle.lock.write():
                handle.model.load_state_dict(stored.state)
                handle.version = handle.saved_version
        except Exception:
            log.exception("event=restore_failed model_id=%s", handle.model_id)

    def train_step(self, handle: ModelHandle, X: np.ndarray, y: np.ndarray):
        self.limits.check_rows(len(X))
        return self._mutate(handle, lambda m: m.train_step(X, y))

    def set_weights(self, handle: ModelHandle, weights: dict[str, np.ndarray]) -> None:
        self._mutate(handle, lambda m: m.set_weights(weights))

    def gradients(self, handle: ModelHandle, X: np.ndarray, y: np.ndarray):
        self.limits.check_rows(len(X))
        with handle.lock.write():  # writes the model's gradient buffer
            self._live(handle)
            loss, grads = handle.model.gradients(X, y)
            return loss, grads, handle.model.step

    def predict(self, handle: ModelHandle, X: np.ndarray, logits: bool) -> tuple[np.ndarray, int]:
        """The outputs and the step of the weights that computed them."""
        self.limits.check_rows(len(X) if getattr(X, "ndim", 0) else 0)
        with handle.lock.read():
            self._live(handle)
            return handle.model.predict(X, logits=logits), handle.model.step

    def get_weights(self, handle: ModelHandle) -> tuple[int, dict[str, np.ndarray]]:
        with handle.lock.read():
            self._live(handle)
            return handle.model.step, handle.model.get_weights()

    def describe(self, handle: ModelHandle) -> dict:
        with handle.lock.read():
            self._live(handle)
            m = handle.model
            return {"model_id": handle.model_id, "num_params": m.num_params, "spec": m.spec.to_dict(),
                    "step": m.step, "created": handle.created, "params": m.param_shapes()}

    def checkpoint(self, handle: ModelHandle, force: bool = False) -> int | None:
        """Commits the model's current state if it changed since the last
        commit (or ``force``); returns the step written, None when skipped."""
        with handle.save_lock:
            with handle.lock.read():
                if handle.deleted:
                    return None
                if handle.version == handle.saved_version and not force:
                    return None
                version = handle.version
                state = handle.model.state_dict()
                step = handle.model.step
            self.store.save(handle.model_id, handle.spec.to_dict(), handle.created, state)
            handle.saved_version = version
            handle.saved_at = time.monotonic()
        log.debug("event=checkpoint model_id=%s step=%d", handle.model_id, step)
        return step
