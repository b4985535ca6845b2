"""ModelRegistry: model id -> ModelHandle, and the rules for locking,
logging mutations, snapshots and recovery. Plain Python over nnkernels;
knows nothing of gRPC.

Locking: each handle has a reader/writer lock. Predict and GetWeights
read; TrainStep, GetGradients (it writes the model's gradient buffer),
SetWeights and Delete write. ``save_lock`` orders snapshots of one model:
a snapshot copies the state under the read lock and writes it with no
model lock held, so training and predictions never wait for the store.
Different models share no lock (the log's append lock is held for a few
microseconds).

Durability (``Durability.mode``):

- ``step``: every mutation (TrainStep's batch, SetWeights' arrays) is
  appended to the mutation log (``wal.py``) under the model's write lock,
  before it is computed; the log's writer makes it durable while the step
  computes, and the reply waits for the later of the two (``Commit.wait``,
  outside the lock, so the next step of the model may already compute).
  Snapshots are written in the background once a model has done
  ``checkpoint_steps`` mutations, logged ``checkpoint_log_mb``, or spent
  ``checkpoint_replay_seconds`` computing since its last one (this bounds
  the replay at restart), and ``checkpoint_seconds`` after a change.
- ``interval``: no log; a snapshot after ``checkpoint_steps`` mutations or
  ``checkpoint_seconds``, and of every changed model at shutdown.
- ``none``: memory only; nothing is read or written.

Recovery (``load_stored``): per model, the newest snapshot whose CRC holds
(else the one before), then the log records after it, through the same
kernels (bit-exact: nnkernels is deterministic whatever the threads). A
record is applied when its version is one past the model's; a gap (a
record lost to damage) stops that model's replay there, loudly. A model
that cannot be loaded stays listed with the reason and refuses calls.

Never acknowledging a broken state: after each mutation the parameters and
optimizer state are checked to be finite; if not, the model is rebuilt
from its last in-memory base (the last snapshot's copy) plus the
mutations since (the same replay), and the call is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradserve.nnkernels import (
    DeviceUnavailableError,
    InputError,
    Model,
    ModelSpec,
    NonFiniteError,
    NotTrainableError,
    OptimizerSpec,
    ParamLayout,
    StepResult,
)

from . import mutations
from .datasets import DatasetCatalog
from .gradients import GradientAccumulator, flat_gradients
from .limits import LimitExceeded, Limits
from .mutations import Mutation
from .rwlock import ReadWriteLock
from .store import KEEP_SNAPSHOTS, SnapshotCorrupt, SqliteStore, StoredModel
from .tenants import ADMIN_TENANT, visible_to
from .wal import DURABLE, Commit, Damage, WriteAheadLog, lsn, remove_segments_before, scan, segment_numbers

log = logging.getLogger("gradserve.registry")

MODEL_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REPLIES_KEPT = 16  # TrainStep replies kept per model for retried requests


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


class ModelUnavailable(RuntimeError):
    """A stored model that could not be loaded (the reason says why); it is
    listed, and refuses every call but delete. Server: FAILED_PRECONDITION."""


class DurabilityOff(RuntimeError):
    """SaveModel on a server that keeps models in memory only. Server: FAILED_PRECONDITION."""


class StateOverflow(NonFiniteError):
    """A mutation (or a spec's initialization) would leave parameters or
    optimizer state with Inf or NaN; it was not applied. Server: FAILED_PRECONDITION."""


class CheckpointNotFound(KeyError):
    """RestoreCheckpoint names a tag the model has no checkpoint under. Server: NOT_FOUND."""

    def __str__(self) -> str:
        return self.args[0]


class NothingAccumulated(RuntimeError):
    """OptimizerStep with no AccumulateGradients since the model's last step. Server: FAILED_PRECONDITION."""


class DatasetInUse(RuntimeError):
    """DeleteDataset of a data set a running Fit trains on. Server: FAILED_PRECONDITION."""


class StepConflict(Exception):
    """A TrainStep's ``expected_step`` does not follow the model's step (and
    is not a retry of a step whose reply is kept); nothing was trained.
    ``current_step`` is the model's step. Server: ABORTED."""

    def __init__(self, model_id: str, expected: int, current: int, reason: str):
        super().__init__(f"expected_step={expected}: {reason}; model {model_id!r} is at step {current} "
                         f"(its next step is {current + 1}); nothing was trained")
        self.expected = expected
        self.current_step = current


MODES = ("step", "interval", "none")


@dataclass
class Durability:
    mode: str = "step"  # "step" | "interval" | "none"
    checkpoint_steps: int = 1000
    checkpoint_seconds: float = 60.0
    checkpoint_log_mb: float = 64.0
    checkpoint_replay_seconds: float = 0.25
    segment_mb: float = 64.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"durability must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("checkpoint_steps", "checkpoint_seconds", "checkpoint_log_mb", "checkpoint_replay_seconds",
                     "segment_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)!r}")


@dataclass
class _Applied:
    mutation: Mutation
    seconds: float  # compute time: what replaying it will cost


@dataclass
class _Reply:
    digest: int
    result: StepResult
    commit: Commit


class ModelHandle:
    """One served model: the nnkernels Model, its locks and its durability
    bookkeeping. ``model`` is None and ``load_error`` set for a stored
    model that could not be loaded."""

    def __init__(self, model_id: str, uid: int, spec: ModelSpec | None, created: float, model: Model | None = None,
                 tenant: str = ""):
        self.model_id = model_id
        self.tenant = tenant  # the creator's tenant under --auth-tokens; "" for none
        self.uid = uid
        self._spec = spec
        self.spec_dict: dict = spec.to_dict() if spec is not None else {}
        self.created = created
        self.model = model
        self.load_error: str | None = None
        self.lock = ReadWriteLock()
        self.save_lock = threading.Lock()
        self.deleted = False
        self.version = 0  # mutations applied (steps, set-weights)
        # the in-memory base: a state copy at base_version, and what was applied since
        self.base_state: dict[str, np.ndarray] = {}
        self.base_version = 0
        self.applied: list[_Applied] = []
        self.applied_bytes = 0
        self.applied_seconds = 0.0
        self.replies: OrderedDict[int, _Reply] = OrderedDict()
        # persisted snapshots, newest first: (version, log position)
        self.kept: list[tuple[int, int]] = []
        self.persisted_version = 0
        self.persisted_at = time.monotonic()
        self.stored_step = 0  # for describing a model that did not load
        self.fell_back = False  # loaded from an older snapshot than the newest
        # the spec the base state runs on: the created spec with the optimizer
        # hyper-parameters SetOptimizer / RestoreCheckpoint gave it
        self.base_spec: ModelSpec | None = spec
        self.accumulator: GradientAccumulator | None = None  # AccumulateGradients' sums, in memory only

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def set_base(self, state: dict, version: int, spec: ModelSpec | None = None) -> None:
        self.base_state, self.base_version = state, version
        if spec is not None:
            self.base_spec = spec
        self.applied = [a for a in self.applied if a.mutation.version > version]
        self.applied_bytes = sum(a.mutation.nbytes for a in self.applied)
        self.applied_seconds = sum(a.seconds for a in self.applied)

    def log_needed_from(self) -> int | None:
        """The log position replay may start from (the oldest kept
        snapshot), or None when every kept snapshot is the current state."""
        if not self.kept:
            return None
        if self.model is not None and all(v == self.version for v, _ in self.kept):
            return None
        return min(p for _, p in self.kept)


class ModelRegistry:
    def __init__(self, store: SqliteStore | None, *, limits: Limits = Limits(),
                 durability: Durability = Durability(), default_device: str = "cpu",
                 log_dir: str | Path | None = None, model_class: type[Model] = Model):
        """``model_class``: what models are built as; data-parallel replicas
        (spec.replicas > 1) need one that trains them (a Ray owner actor's
        ``cluster.owner.ReplicatedModel``), else they are refused."""
        self.store = store
        self.model_class = model_class
        self.limits = limits
        self.durability = durability
        self.default_device = default_device
        if store is None and durability.mode != "none":
            raise ValueError(f"durability {durability.mode!r} needs a store")
        self.log_dir = Path(log_dir) if log_dir is not None else (
            Path(store.path + ".mutations") if store is not None else None)
        # where records written from now on start: past everything on disk
        segments = segment_numbers(self.log_dir) if self.log_dir is not None else []
        self._recovered_end = lsn(segments[-1] + 1, 0) if segments else 0
        # step durability appends to a new segment after those a recovery reads
        self._log: WriteAheadLog | None = (
            WriteAheadLog(self.log_dir, segment_bytes=int(durability.segment_mb * (1 << 20)))
            if durability.mode == "step" else None)
        self._models: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()  # guards _models and _datasets_in_use
        self.datasets = DatasetCatalog(store, limits)
        self._datasets_in_use: dict[str, int] = {}  # data set id -> Fit calls training on it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._snapshotter: threading.Thread | None = None
        # counters for metrics (see ``stats``)
        self._stats = {"snapshots": 0, "snapshot_seconds": 0.0, "snapshot_seconds_max": 0.0, "snapshot_bytes": 0,
                       "snapshot_failures": 0, "replayed_records": 0, "replay_seconds": 0.0,
                       "dropped_records": 0, "damaged_log_bytes": 0, "rollbacks": 0}

    def stats(self) -> dict:
        """Durability counters: log_bytes, log_records, log_fsyncs,
        log_fsync_seconds (sum), log_fsync_seconds_max, log_segments_removed,
        snapshots, snapshot_seconds (sum), snapshot_seconds_max,
        snapshot_bytes, snapshot_failures, replayed_records, replay_seconds,
        dropped_records, damaged_log_bytes, rollbacks."""
        out = dict(self._stats)
        if self._log is not None:
            out.update(self._log.stats.as_dict())
        return out

    # -- lifecycle ----------------------------------------------------------------
    def load_stored(self) -> int:
        """Serves every stored model at its last durable state (newest good
        snapshot + the log after it); returns how many loaded. Log segments
        no kept snapshot needs any more are removed."""
        if self.store is None:
            return 0
        t0 = time.perf_counter()
        handles = [self._load_snapshot(stored) for stored in self.store.models()]
        by_uid = {h.uid: h for h in handles if h.model is not None}
        # replay from the snapshot loaded (kept[0]); older kept ones only hold the log back
        progress = {h.uid: _Replay(start=h.kept[0][1], fell_back=h.fell_back) for h in by_uid.values()}
        damage: list[Damage] = []
        segments = segment_numbers(self.log_dir) if self.log_dir is not None else []
        if by_uid and segments:
            start = min(p.start for p in progress.values())
            for position, payload in scan(self.log_dir, start, damage):
                try:
                    m = Mutation.decode(payload)
                except ValueError as exc:
                    log.error("event=log_record_unreadable position=%d error=%r", position, str(exc))
                    continue
                handle = by_uid.get(m.uid)
                if handle is None or position < progress[m.uid].start:
                    continue
                self._replay_record(handle, m, progress[m.uid])
        for d in damage:
            self._stats["damaged_log_bytes"] += d.nbytes
            log.error("event=log_damaged %s action=dropped", d)
        replayed = sum(p.applied for p in progress.values())
        self._stats["replayed_records"] += replayed
        self._stats["replay_seconds"] += time.perf_counter() - t0
        for h in handles:
            self._models[h.model_id] = h
            if h.model is None:
                log.error("event=model_not_loaded model_id=%s reason=%r", h.model_id, h.load_error)
                continue
            p = progress[h.uid]
            self._stats["dropped_records"] += p.dropped
            if p.dropped or p.stopped:
                log.error("event=replay_incomplete model_id=%s version=%d step=%d dropped_records=%d reason=%r",
                          h.model_id, h.version, h.model.step, p.dropped, p.stopped or "a record is missing (log damage)")
            log.info("event=model_loaded model_id=%s step=%d version=%d snapshot_version=%d replayed=%d params=%d",
                     h.model_id, h.model.step, h.version, h.base_version, p.applied, h.model.num_params)
            # a fresh snapshot, so a model that fell back or stopped short never
            # meets the records it skipped again, and other modes need no log
            if self.durability.mode != "none" and (p.fell_back or p.dropped or p.stopped or
                                                   (p.applied and self.durability.mode != "step")):
                self.snapshot(h, persist=True)
        loaded = sum(h.model is not None for h in handles)
        self._trim_log()  # under interval, a log left by a run with step durability goes once covered
        log.info("event=recovered models=%d loaded=%d replayed_records=%d damaged_log_bytes=%d seconds=%.3f",
                 len(handles), loaded, replayed, sum(d.nbytes for d in damage), time.perf_counter() - t0)
        return loaded

    def _load_snapshot(self, stored: StoredModel) -> ModelHandle:
        try:
            spec = ModelSpec.from_dict(stored.spec)
        except Exception as exc:  # noqa: BLE001 — kept and listed with the reason
            handle = ModelHandle(stored.model_id, stored.uid, None, stored.created, tenant=stored.tenant)
            handle.spec_dict = stored.spec
            handle.load_error = f"stored spec is not valid here: {exc}"
            return handle
        handle = ModelHandle(stored.model_id, stored.uid, spec, stored.created, tenant=stored.tenant)
        reasons = []
        snapshots = self.store.snapshots(stored.model_id)
        for i, snap in enumerate(snapshots):
            handle.stored_step = max(handle.stored_step, snap.step)
            try:
                state, extra = snap.unpack()
                snap_spec = spec
                if "optimizer" in extra:  # hyper-parameters changed by SetOptimizer
                    snap_spec = dataclasses.replace(spec, optimizer=OptimizerSpec(**extra["optimizer"]))
                model = self.model_class(snap_spec, state)
            except DeviceUnavailableError as exc:  # an older snapshot would not help
                handle.load_error = str(exc)
                return handle
            except (SnapshotCorrupt, InputError, ValueError) as exc:
                reasons.append(f"snapshot of version {snap.version}: {exc}")
                log.error("event=snapshot_unusable model_id=%s seq=%d version=%d step=%d error=%r action=%s",
                          stored.model_id, snap.seq, snap.version, snap.step, str(exc),
                          "use_previous" if i + 1 < len(snapshots) else "none_left")
                continue
            handle.model = model
            handle.version = handle.persisted_version = snap.version
            handle.set_base(state, snap.version, snap_spec)
            handle.kept = [(s.version, s.log_position) for s in snapshots[i:]]
            handle.fell_back = i > 0
            for step, digest, loss, accuracy, grad_norm, lr in extra.get("replies", []):
                handle.replies[step] = _Reply(digest, StepResult(step, loss, accuracy, grad_norm, lr), DURABLE)
            for bad in snapshots[:i]:  # never fall back onto them again
                self.store.drop_snapshot(bad.seq)
            return handle
        handle.load_error = "no usable snapshot: " + ("; ".join(reasons) or "none stored")
        return handle

    def _replay_record(self, handle: ModelHandle, m: Mutation, p: "_Replay") -> None:
        if p.stopped or m.version > handle.version + 1:
            p.dropped += 1
            if not p.stopped:
                p.stopped = f"record of version {m.version} follows version {handle.version}: the ones between are lost"
            return
        if m.version <= handle.version:
            return
        try:
            if m.kind == mutations.FIT_STEPS:
                m.source = self.datasets.arrays(m.fields["dataset"])
            t0 = time.perf_counter()
            result = self._apply_checked(handle, m)
            seconds = time.perf_counter() - t0
        except (NonFiniteError, InputError, NotTrainableError):
            return  # refused when first sent, refused again: it was never acknowledged
        except Exception as exc:  # noqa: BLE001 — the model stays at its last good version
            log.exception("event=replay_failed model_id=%s version=%d", handle.model_id, m.version)
            p.stopped = f"replay of version {m.version} failed: {exc!r}"
            p.dropped += 1
            return
        p.applied += 1
        self._remember(handle, m, seconds, result, DURABLE)

    def start_checkpointer(self) -> None:
        if self._snapshotter is None:  # in-memory bases are refreshed in every mode
            self._snapshotter = threading.Thread(target=self._snapshot_loop, name="snapshotter", daemon=True)
            self._snapshotter.start()

    def close(self) -> int:
        """Stops the snapshotter, snapshots every changed model, makes the log
        durable and closes it; returns how many snapshots were written."""
        self._stop.set()
        self._wake.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        written = 0
        if self.durability.mode != "none":
            for h in self.handles():
                try:
                    written += self.snapshot(h, persist=True) is not None
                except Exception:
                    log.exception("event=snapshot_failed model_id=%s", h.model_id)
        if self._log is not None:
            self._log.close()
            self._trim_log()
        return written

    # -- snapshots -------------------------------------------------------------------
    def _due(self, h: ModelHandle, now: float) -> tuple[bool, bool]:
        """(persist, refresh): whether to write a snapshot to the store, and
        whether (at least) to refresh the in-memory base."""
        d = self.durability
        bounded = (len(h.applied) >= d.checkpoint_steps or h.applied_bytes >= d.checkpoint_log_mb * (1 << 20)
                   or h.applied_seconds >= d.checkpoint_replay_seconds)
        idle = now - h.persisted_at >= d.checkpoint_seconds
        changed = h.version != h.persisted_version
        if d.mode == "step":
            # an unchanged model whose older snapshot is behind gets a second copy
            # of the newest, so it pins no log segment
            unpinned = not changed and len(h.kept) > 1 and any(v != h.version for v, _ in h.kept)
            return bounded or (idle and (changed or unpinned)), bounded
        if d.mode == "interval":
            return h.version - h.persisted_version >= d.checkpoint_steps or (idle and changed), bounded
        return False, bounded

    def _snapshot_loop(self) -> None:
        period = max(0.02, min(1.0, self.durability.checkpoint_seconds / 4))
        while not self._stop.is_set():
            self._wake.wait(period)
            self._wake.clear()
            now = time.monotonic()
            for handle in self.handles():
                if self._stop.is_set():
                    return
                if handle.model is None or handle.deleted:
                    continue
                persist, refresh = self._due(handle, now)
                if persist or refresh:
                    try:
                        self.snapshot(handle, persist=persist, unpin=True)
                    except Exception:
                        self._stats["snapshot_failures"] += 1
                        log.exception("event=snapshot_failed model_id=%s", handle.model_id)
                        self._stop.wait(1.0)  # a failing store is not retried on every step
            if self._log is not None:
                self._trim_log()

    def snapshot(self, handle: ModelHandle, persist: bool = True, unpin: bool = False) -> int | None:
        """Copies the model's state under its read lock; with ``persist``
        writes it to the store (outside every model lock); then makes it the
        in-memory base. Returns the step written, None when nothing changed.
        ``unpin``: an unchanged model whose older snapshot is behind is
        written again, so that its log records can go."""
        with handle.save_lock:
            with handle.lock.read():
                if handle.deleted or handle.model is None:
                    return None
                version = handle.version
                if persist and self.store is not None:
                    behind = any(v != version for v, _ in handle.kept)
                    if version == handle.persisted_version and not (unpin and behind):
                        return None
                elif version == handle.base_version:
                    return None
                state = handle.model.state_dict()
                step = handle.model.step
                model_spec = handle.model.spec
                replies = [[s, r.digest, r.result.loss, r.result.accuracy, r.result.grad_norm, r.result.lr]
                           for s, r in handle.replies.items()]
                position = self._next_position()
            if persist and self.store is not None:
                t0 = time.perf_counter()
                extra = {"replies": replies}
                if model_spec.optimizer != handle.spec.optimizer:  # SetOptimizer's hyper-parameters
                    extra["optimizer"] = dataclasses.asdict(model_spec.optimizer)
                try:
                    self.store.put_snapshot(handle.model_id, version, step, position, state, extra)
                except KeyError:  # deleted meanwhile
                    return None
                seconds = time.perf_counter() - t0
                self._stats["snapshots"] += 1
                self._stats["snapshot_seconds"] += seconds
                self._stats["snapshot_seconds_max"] = max(self._stats["snapshot_seconds_max"], seconds)
                self._stats["snapshot_bytes"] += sum(a.nbytes for a in state.values())
                handle.kept = [(version, position), *handle.kept][:KEEP_SNAPSHOTS]
                handle.persisted_version = version
                handle.persisted_at = time.monotonic()
                log.debug("event=snapshot model_id=%s version=%d step=%d seconds=%.4f", handle.model_id, version,
                          step, seconds)
            with handle.lock.write():
                if version > handle.base_version:
                    handle.set_base(state, version, model_spec)
        return step

    def _next_position(self) -> int:
        """Where records appended from now on start (every later one is at or past it)."""
        return self._log.next_position() if self._log is not None else self._recovered_end

    def _trim_log(self) -> None:
        """Removes the log segments no kept snapshot needs for its replay."""
        needed = [p for p in (h.log_needed_from() for h in self.handles()) if p is not None]
        before = min(needed, default=self._next_position())
        if self._log is not None:
            self._log.remove_segments_before(before)
        elif self.log_dir is not None and self.durability.mode != "none":
            remove_segments_before(self.log_dir, before)

    # -- lookup -------------------------------------------------------------------------
    def handles(self, tenant: str | None = None) -> list[ModelHandle]:
        """Every model, or those ``tenant`` may see (see ``visible_to``)."""
        with self._lock:
            return [h for h in self._models.values() if visible_to(h.tenant, tenant)]

    def get(self, model_id: str, tenant: str | None = None) -> ModelHandle:
        """The model, or NOT_FOUND, also when it belongs to a tenant other
        than ``tenant`` (None: no tenant scoping), so another tenant's ids
        cannot be told from absent ones."""
        with self._lock:
            handle = self._models.get(model_id)
        if handle is None or not visible_to(handle.tenant, tenant):
            raise ModelNotFound(model_id)
        return handle

    # -- create / delete ------------------------------------------------------------------
    def create(self, spec_dict: dict, model_id: str = "", tenant: str | None = None) -> tuple[ModelHandle, bool]:
        """Creates (and stores) a model owned by ``tenant`` (None or admin:
        owned by none); returns (handle, created). An id that exists with an
        equal spec returns that model (idempotent) when ``tenant`` may see
        it; one it may not see is ALREADY_EXISTS, as ids are global."""
        if model_id and not MODEL_ID.match(model_id):
            raise InputError("model_id", f"{model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
        spec_dict = dict(spec_dict)
        spec_dict.setdefault("device", self.default_device)
        spec = ModelSpec.from_dict(spec_dict)
        self.limits.check_spec(spec)
        if spec.replicas > 1 and self.model_class is Model:
            raise ModelUnavailable(f"spec.replicas={spec.replicas}: data-parallel replicas need a server started "
                                   "with --ray-address")
        if model_id:
            with self._lock:
                existing = self._models.get(model_id)
            if existing is not None:
                if not visible_to(existing.tenant, tenant):
                    raise ModelExists(f"model_id={model_id!r} is taken; choose another id")
                if existing.spec != spec:
                    raise ModelExists(f"model_id={model_id!r} exists with a different spec")
                return existing, False
        model = self.model_class(spec)
        bad = model.nonfinite_state()
        if bad:
            raise StateOverflow(f"spec: the initial {' and '.join(bad)} are not finite (an initializer's values "
                                f"overflow {spec.dtype}); nothing was created")
        owner = "" if tenant is None or tenant == ADMIN_TENANT else tenant
        handle = ModelHandle(model_id or uuid.uuid4().hex, secrets.randbits(63), spec, time.time(), model, owner)
        state = model.state_dict()
        handle.set_base(state, 0)
        with self._lock:
            if handle.model_id in self._models:  # a concurrent create of the same id won
                existing = self._models[handle.model_id]
                if not visible_to(existing.tenant, tenant):
                    raise ModelExists(f"model_id={model_id!r} is taken; choose another id")
                if existing.spec != spec:
                    raise ModelExists(f"model_id={model_id!r} exists with a different spec")
                return existing, False
            if len(self._models) >= self.limits.max_models:
                raise LimitExceeded("max_models", self.limits.max_models, len(self._models) + 1,
                                    "this model would make models:")
            self._models[handle.model_id] = handle
        if self.store is not None:
            try:
                with handle.save_lock:
                    position = self._next_position()
                    self.store.create(StoredModel(handle.model_id, handle.uid, spec.to_dict(), handle.created, owner),
                                      0, 0, position, state, {})
                    handle.kept = [(0, position)]
            except BaseException:
                with self._lock:
                    self._models.pop(handle.model_id, None)
                raise
        log.info("event=model_created model_id=%s params=%d device=%s", handle.model_id, model.num_params, spec.device)
        return handle, True

    def delete(self, model_id: str, tenant: str | None = None) -> None:
        handle = self.get(model_id, tenant)
        with handle.save_lock, handle.lock.write():
            if handle.deleted:
                raise ModelNotFound(model_id)
            handle.deleted = True
            with self._lock:
                self._models.pop(model_id, None)
            if self.store is not None:
                self.store.delete(model_id)
        log.info("event=model_deleted model_id=%s", model_id)

    # -- mutations -------------------------------------------------------------------------
    def _usable(self, handle: ModelHandle) -> Model:
        if handle.deleted:
            raise ModelNotFound(handle.model_id)
        if handle.model is None:
            raise ModelUnavailable(f"model {handle.model_id!r} could not be loaded: {handle.load_error}; "
                                   "delete it (or restore its store) to use the id")
        return handle.model

    def _apply_checked(self, handle: ModelHandle, m: Mutation):
        """Applies ``m``; refuses it (model as before) when it leaves a
        non-finite parameter or optimizer state."""
        handle.model, result = mutations.apply(handle.model, m)
        bad = handle.model.nonfinite_state()
        if bad:
            self._stats["rollbacks"] += 1
            self._rebuild(handle)
            what = f"step {m.step + 1}" if m.kind == mutations.TRAIN_STEP else mutations.KINDS[m.kind][0]
            raise StateOverflow(f"{what} not applied: it would make {' and '.join(bad)} non-finite (overflow: "
                                f"lower the learning rate or scale the inputs); the model is unchanged at step "
                                f"{handle.model.step}")
        return result

    def _rebuild(self, handle: ModelHandle) -> None:
        """Puts the model back at its current version: the in-memory base plus
        the mutations applied since, replayed through the same kernels."""
        model = self.model_class(handle.base_spec, handle.base_state)
        for a in handle.applied:
            model, _ = mutations.apply(model, a.mutation)
        handle.model = model

    def _remember(self, handle: ModelHandle, m: Mutation, seconds: float, result, commit: Commit) -> None:
        handle.version = m.version
        handle.applied.append(_Applied(m, seconds))
        handle.applied_bytes += m.nbytes
        handle.applied_seconds += seconds
        if m.kind == mutations.TRAIN_STEP:
            digest = mutations.batch_digest(m.arrays["inputs"], m.arrays["targets"])
            handle.replies[result.step] = _Reply(digest, result, commit)
            while len(handle.replies) > REPLIES_KEPT:
                handle.replies.popitem(last=False)

    def _mutate(self, handle: ModelHandle, build, expected_step: int | None = None, digest: int | None = None):
        """Logs and applies the mutation ``build(uid, version, step)`` makes,
        under the write lock; returns (result, commit): the caller waits on
        the commit (outside every lock) before acknowledging."""
        with handle.lock.write():
            model = self._usable(handle)
            if expected_step is not None:
                kept = self._expected(handle, model, expected_step, digest)
                if kept is not None:
                    return kept.result, kept.commit
            m = build(handle.uid, handle.version + 1, model.step)
            if self._log is not None:
                commit = self._log.append(m.encode())  # becomes durable while the step computes
            else:
                commit = DURABLE
                m.nbytes = sum(np.asarray(a).nbytes for a in m.arrays.values())
            t0 = time.perf_counter()
            result = self._apply_checked(handle, m)
            self._remember(handle, m, time.perf_counter() - t0, result, commit)
            persist, refresh = self._due(handle, time.monotonic())
        if persist or refresh:
            self._wake.set()
        return result, commit

    def _expected(self, handle: ModelHandle, model: Model, expected: int, digest: int | None) -> _Reply | None:
        if expected < 1:
            raise InputError("expected_step", f"is {expected}: must be >= 1 (the model's step after this one)")
        current = model.step
        if expected == current + 1:
            return None
        if expected > current + 1:
            raise StepConflict(handle.model_id, expected, current, "is ahead of the model (steps are missing)")
        kept = handle.replies.get(expected)
        if kept is None:
            raise StepConflict(handle.model_id, expected, current,
                               f"was applied before the last {REPLIES_KEPT} steps, whose replies are kept")
        if kept.digest != digest:
            raise StepConflict(handle.model_id, expected, current, "was produced by a different batch")
        return kept

    def train_step(self, handle: ModelHandle, X: np.ndarray, y: np.ndarray, expected_step: int | None = None):
        """(StepResult, Commit): the step is applied; wait on the commit before
        acknowledging it. With ``expected_step`` a retry of an applied step
        returns its original result and trains nothing."""
        self.limits.check_rows(len(X) if getattr(X, "ndim", 0) else 0)
        digest = mutations.batch_digest(X, y) if expected_step is not None else None
        return self._mutate(handle, lambda uid, version, step: mutations.train_step(uid, version, step, X, y),
                            expected_step, digest)

    def set_weights(self, handle: ModelHandle, weights: dict[str, np.ndarray]) -> None:
        _, commit = self._mutate(handle, lambda uid, version, step: mutations.set_weights(uid, version, step, weights))
        commit.wait()

    # -- server-side Fit (data sets) -----------------------------------------------------
    def fit_steps(self, handle: ModelHandle, source: tuple, **fields) -> tuple["mutations.StepsResult", Commit]:
        """Applies a run of a Fit's steps (``mutations.fit_steps``) as one
        logged mutation, under the write lock taken once for the run; returns
        (StepsResult: what Model.train_steps did, Commit)."""
        return self._mutate(handle, lambda uid, version, step: mutations.fit_steps(uid, version, step, source,
                                                                                  **fields))

    @contextlib.contextmanager
    def use_datasets(self, ids: list[str]):
        """While open, DeleteDataset refuses these data sets (raises
        DatasetNotFound when one is gone already)."""
        with self._lock:
            for i in ids:
                self.datasets.info(i)
            for i in ids:
                self._datasets_in_use[i] = self._datasets_in_use.get(i, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for i in ids:
                    self._datasets_in_use[i] -= 1
                    if not self._datasets_in_use[i]:
                        del self._datasets_in_use[i]

    def delete_dataset(self, dataset_id: str) -> None:
        """Deletes a data set no Fit is using. Every changed model is
        snapshotted first, so no log record a recovery replays names it."""
        self.datasets.info(dataset_id)
        self._refuse_in_use(dataset_id)
        if self.store is not None and self.durability.mode != "none":
            for h in self.handles():
                if h.model is not None and not h.deleted:
                    self.snapshot(h, persist=True, unpin=True)
        with self._lock:  # no Fit starts on it between the check and the delete
            self._refuse_in_use(dataset_id, locked=True)
            self.datasets.delete(dataset_id)

    def _refuse_in_use(self, dataset_id: str, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                return self._refuse_in_use(dataset_id, True)
        if self._datasets_in_use.get(dataset_id):
            raise DatasetInUse(f"dataset_id: data set {dataset_id!r} is being trained on by "
                               f"{self._datasets_in_use[dataset_id]} Fit call(s); cancel them first")

    # -- reads -------------------------------------------------------------------------------
    def gradients(self, handle: ModelHandle, X: np.ndarray, y: np.ndarray):
        self.limits.check_rows(len(X))
        with handle.lock.write():  # writes the model's gradient buffer
            model = self._usable(handle)
            loss, grads = model.gradients(X, y)
            return loss, grads, model.step

    def predict(self, handle: ModelHandle, X: np.ndarray, logits: bool) -> tuple[np.ndarray, int]:
        """The outputs and the step of the weights that computed them."""
        self.limits.check_rows(len(X) if getattr(X, "ndim", 0) else 0)
        with handle.lock.read():
            model = self._usable(handle)
            return model.predict(X, logits=logits), model.step

    def get_weights(self, handle: ModelHandle) -> tuple[int, dict[str, np.ndarray]]:
        with handle.lock.read():
            model = self._usable(handle)
            return model.step, model.get_weights()

    def describe(self, handle: ModelHandle, listing: bool = False) -> dict:
        """What GetModel/ListModels report. A model that did not load is
        described (with ``load_error``) only when ``listing``."""
        with handle.lock.read():
            if handle.model is None and listing and not handle.deleted:
                layout = ParamLayout(handle.spec) if handle.spec is not None else None
                return {"model_id": handle.model_id, "num_params": layout.size if layout else 0,
                        "spec": handle.spec_dict, "step": handle.stored_step, "created": handle.created,
                        "params": layout.shapes() if layout else [], "load_error": handle.load_error}
            m = self._usable(handle)
            return {"model_id": handle.model_id, "num_params": m.num_params, "spec": m.spec.to_dict(),
                    "step": m.step, "created": handle.created, "params": m.param_shapes(), "load_error": ""}

    def save(self, handle: ModelHandle) -> int:
        """Writes a snapshot now (SaveModel); returns the step saved."""
        if self.store is None:
            raise DurabilityOff("SaveModel: the server runs with --durability none and keeps models in memory only")
        with handle.lock.read():
            self._usable(handle)
        step = self.snapshot(handle, persist=True)
        if step is None:  # nothing new since the last snapshot
            step = self.describe(handle)["step"]
        return step

    # -- optimizer hyper-parameters and named checkpoints ----------------------------------
    def set_optimizer(self, handle: ModelHandle, changes: dict) -> OptimizerSpec:
        """Changes optimizer hyper-parameters from the next step on (a logged
        mutation; see ``mutations.changed_optimizer`` for which may change).
        A new ``lr`` replaces the spec's ``optimizer.lr``, the base of the
        schedule (as torch's ReduceLROnPlateau sets ``param_group['lr']``):
        the rate of step t is then ``schedule(lr_new, t)``. Returns the
        optimizer now in force."""
        if not changes:
            raise InputError("optimizer", "sets no hyper-parameter to change")

        changed = []

        def build(uid, version, step):  # validated under the lock, before anything is logged
            changed.append(mutations.changed_optimizer(handle.model.spec.optimizer, changes))
            return mutations.set_optimizer(uid, version, step, changed[0])

        _, commit = self._mutate(handle, build)
        commit.wait()
        log.info("event=optimizer_changed model_id=%s changes=%s", handle.model_id, changes)
        return changed[0]

    # -- gradients in and out (see gradients.py for the semantics) ------------------------------
    def apply_gradients(self, handle: ModelHandle, grads: dict):
        """(StepResult, Commit): one optimizer step on the caller's gradients
        (loss NaN: the caller computed them); logged with the flat gradient."""
        def build(uid, version, step):  # validated under the lock, before anything is logged
            return mutations.apply_gradients(uid, version, step, flat_gradients(handle.model, grads), math.nan)

        return self._mutate(handle, build)

    def accumulate_gradients(self, handle: ModelHandle, X: np.ndarray, y: np.ndarray) -> tuple[int, float, int]:
        """Adds the batch's gradient to the model's accumulation, begun anew
        when the model took a step since; returns (rows accumulated, this
        batch's loss, the model's step). Not logged: an unfinished
        accumulation is lost on restart (OptimizerStep logs the result)."""
        self.limits.check_rows(len(X) if getattr(X, "ndim", 0) else 0)
        with handle.lock.write():  # writes the model's gradient buffer
            model = self._usable(handle)
            acc = handle.accumulator
            if acc is None or acc.step != model.step:
                acc = GradientAccumulator(model.step, np.zeros(model.num_params, np.float64))
            before = acc.loss_sum
            acc.add(model, X, y)
            handle.accumulator = acc
            return acc.rows, (acc.loss_sum - before) / len(X), model.step

    def optimizer_step(self, handle: ModelHandle):
        """(StepResult, Commit): one optimizer step on the accumulated mean
        gradient; the accumulation is used up (also when the step is refused)."""
        def build(uid, version, step):
            acc, handle.accumulator = handle.accumulator, None
            if acc is None or acc.step != step:
                raise NothingAccumulated(f"model {handle.model_id!r}: no gradients accumulated at step {step} "
                                         "(call AccumulateGradients first; an accumulation ends with the step "
                                         "it was computed at, and a server restart)")
            flat, loss = acc.mean(handle.model.dtype)
            return mutations.apply_gradients(uid, version, step, flat, loss)

        return self._mutate(handle, build)

    def _checkpoint_store(self) -> SqliteStore:
        if self.store is None:
            raise DurabilityOff("checkpoints are kept in the store: the server runs with --durability none")
        return self.store

    def save_checkpoint(self, handle: ModelHandle, tag: str) -> int:
        """Stores the model's whole state (parameters, optimizer state and
        hyper-parameters) under ``tag``, replacing what it held; returns the
        step saved. Not a mutation: the model does not change."""
        if not MODEL_ID.match(tag):
            raise InputError("tag", f"{tag!r}: use 1-128 characters from A-Z a-z 0-9 . _ -")
        store = self._checkpoint_store()
        with handle.lock.read():
            model = self._usable(handle)
            state, step, optimizer = model.state_dict(), model.step, model.spec.optimizer
        try:
            store.put_checkpoint(handle.model_id, tag, step, state, {"optimizer": dataclasses.asdict(optimizer)})
        except KeyError:
            raise ModelNotFound(handle.model_id) from None
        return step

    def list_checkpoints(self, handle: ModelHandle):
        """[CheckpointInfo(tag, step, saved)], oldest first."""
        with handle.lock.read():
            self._usable(handle)
        return self._checkpoint_store().checkpoints(handle.model_id)

    def restore_checkpoint(self, handle: ModelHandle, tag: str) -> tuple[int, int]:
        """Puts back the parameters, optimizer state and hyper-parameters
        saved under ``tag`` (a logged mutation carrying that state); the step
        counter keeps counting. Returns (the checkpoint's step, the model's step)."""
        with handle.lock.read():
            self._usable(handle)
        found = self._checkpoint_store().checkpoint(handle.model_id, tag)
        if found is None:
            raise CheckpointNotFound(f"tag: model {handle.model_id!r} has no checkpoint {tag!r}")
        info, state, extra = found
        optimizer = OptimizerSpec(**extra["optimizer"])
        _, commit = self._mutate(handle, lambda uid, version, step: mutations.restore_checkpoint(
            uid, version, step, tag, state, optimizer))
        commit.wait()
        return info.step, handle.model.step


@dataclass
class _Replay:
    start: int | None = None
    applied: int = 0
    dropped: int = 0
    stopped: str = ""
    fell_back: bool = False
