"""Dynamic batching for Predict: concurrent calls to one model are coalesced
into one kernel call, with the semantics of Triton's dynamic batcher.

Each model has one ``ModelQueue``. A call is validated first (so one
caller's bad input never fails another's batch), then queued. At most one
batch per model runs at a time, executed by one of the waiting callers'
own gRPC threads (leader/follower: a lone caller runs its own rows at once,
with no hand-off to another thread). The executing caller forms a batch
Triton's way:

- it waits at most ``max_queue_delay_us`` after the oldest queued call's
  arrival for more rows, and stops waiting as soon as the queue holds the
  largest preferred batch size (or ``max_batch_size`` rows);
- it takes queued calls in arrival order up to ``max_batch_size`` rows,
  preferring the longest prefix whose rows make a preferred batch size;
- calls asking for logits and calls asking for outputs go in separate
  batches (they differ in the output layer's activation).

With a delay of 0 (the default, as Triton's) nobody waits: the calls that
queued while the previous batch ran form the next one, so batches grow with
the load. When the batch ends, each caller gets its own rows back (a view
of the batch's output), and the oldest still-queued caller takes over as
executor. A caller whose deadline passes or whose RPC is cancelled while
queued leaves the queue without computing. A batch runs under the model's
read lock (``ModelRegistry.predict``), so it never observes a half-applied
train step, and every row of it sees the same weights; different models
have different queues and never wait for each other.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from gradserve.nnkernels import InputError

from .limits import Limits


@dataclass(frozen=True)
class BatchingConfig:
    """Server-wide batching settings (``--max-queue-delay-us``,
    ``--preferred-batch-sizes``, ``--max-batch-size``, ``--no-batching``)."""

    enabled: bool = True
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_batch_size: int = 0  # rows in one kernel call; 0: the --max-batch-rows limit

    def __post_init__(self):
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us={self.max_queue_delay_us}: must be >= 0")
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size={self.max_batch_size}: must be >= 0")
        if any(p < 1 for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes={list(self.preferred_batch_sizes)}: each must be >= 1")
        if self.max_batch_size and any(p > self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes={list(self.preferred_batch_sizes)}: each must be <= "
                             f"max_batch_size={self.max_batch_size}")


class CallCancelled(Exception):
    """The caller's RPC was cancelled while it was queued."""


class CallDeadlineExceeded(CallCancelled):
    """The caller's deadline passed while it was queued."""


def validated_inputs(X: np.ndarray, input_size: int, dtype: np.dtype, limits: Limits) -> np.ndarray:
    """Checks one caller's rows before they are queued, with the messages of
    ``Model.predict``: 2-D, at least one row, ``input_size`` columns, at most
    the row limit, real numbers, all finite in the model's dtype. Returns
    them in ``dtype``; a read-only array of that dtype is returned as is (the
    batch copies it into its own buffer: one copy, not two)."""
    if X.dtype.kind not in "biuf":
        raise InputError("inputs", f"must hold real numbers (bool, int or float), got dtype {X.dtype}")
    if X.ndim != 2:
        raise InputError("inputs", f"must be 2-D (rows, {input_size}), got shape {X.shape}")
    if X.shape[0] < 1:
        raise InputError("inputs", "is empty: a batch needs at least one row")
    if X.shape[1] != input_size:
        raise InputError("inputs", f"has {X.shape[1]} columns, the model takes {input_size}")
    limits.check_rows(X.shape[0])
    if X.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught as non-finite below
            X = X.astype(dtype)
    if dtype.kind == "f" and not np.isfinite(X).all():  # 3x faster than a scalar loop, SIMD
        raise InputError("inputs", f"contains NaN or Inf (or values beyond {dtype.name})")
    return X


@dataclass(eq=False)
class QueuedCall:
    """One caller's validated rows and, once its batch ran, its outputs."""

    inputs: np.ndarray
    logits: bool
    arrived: float = field(default_factory=time.perf_counter)
    wake: threading.Event = field(default_factory=threading.Event)
    outputs: np.ndarray | None = None
    step: int = -1
    error: BaseException | None = None
    executor: bool = False  # handed the queue: this caller runs the next batch
    done: bool = False
    ended: str = ""  # "cancelled" / "deadline" once the RPC ended while queued
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    batch_rows: int = 0

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]


class ModelQueue:
    """The Predict queue of one model (see the module docstring)."""

    def __init__(self, handle, run_batch, config: BatchingConfig, limits: Limits):
        self.handle = handle
        self._run_batch = run_batch  # (inputs, logits) -> (outputs, step)
        self.config = config
        self.max_rows = min(config.max_batch_size or limits.max_batch_rows, limits.max_batch_rows)
        self.preferred = tuple(sorted(p for p in config.preferred_batch_sizes if p <= self.max_rows))
        self._fill_target = self.preferred[-1] if self.preferred else self.max_rows
        self._delay = config.max_queue_delay_us / 1e6
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[QueuedCall] = deque()
        self._pending_rows = 0
        self._busy = False  # a caller is forming or running a batch
        self._buffer: np.ndarray | None = None  # the batch's input rows, reused (one batch at a time)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def predict(self, call: QueuedCall, time_remaining=lambda: None, on_end=None) -> QueuedCall:
        """Queues ``call`` and returns it once its batch ran (``outputs``,
        ``step``, or ``error`` set). ``time_remaining()`` gives the RPC's
        seconds left (None: no deadline); ``on_end(callback)`` registers a
        callback for the RPC's end (gRPC's ``context.add_callback``).
        Raises CallCancelled (CallDeadlineExceeded) when the RPC ended while
        the call was queued; its rows are then never computed."""
        with self._cond:
            self._pending.append(call)
            self._pending_rows += call.rows
            if not self._busy:
                self._busy = True
                call.executor = True
            else:
                self._cond.notify_all()  # an executor waiting out the delay counts rows again
        if on_end is not None:
            on_end(lambda: self._end(call, "cancelled"))
        while True:
            with self._cond:
                if call.done:
                    return call
                run = call.executor
                if call.ended and not run:
                    if call.ended == "deadline":
                        raise CallDeadlineExceeded("deadline passed while queued for a batch")
                    raise CallCancelled("cancelled while queued for a batch")
                if not run:
                    call.wake.clear()
            if run:
                self._execute_one_batch(call)
                continue
            remaining = time_remaining()
            if remaining is not None and remaining > 3600:  # no deadline reads as ~forever: too long for wait()
                remaining = 3600
            if remaining is not None and remaining <= 0:
                self._end(call, "deadline")
                remaining = None  # if still here, its batch is running: wait for it
            call.wake.wait(remaining)

    def _end(self, call: QueuedCall, reason: str) -> None:
        """The RPC ended (gRPC's callback, or the deadline seen by the
        caller): the call leaves the queue if it is still in it; a call
        already taken into a batch is computed anyway. An executor that
        leaves hands the queue on from its own thread."""
        with self._cond:
            if call.done or call.ended:
                return
            try:
                self._pending.remove(call)
            except ValueError:
                return
            self._pending_rows -= call.rows
            call.ended = reason
            self._cond.notify_all()  # an executor waiting out the delay: it may be this call
        call.wake.set()

    def _hand_over_locked(self) -> None:
        if self._pending:
            nxt = self._pending[0]
            nxt.executor = True
            nxt.wake.set()
        else:
            self._busy = False

    def _take_batch_locked(self, me: QueuedCall) -> list[QueuedCall]:
        """Waits out the queue delay (Triton's rule), then removes and
        returns the calls of one batch; [] when ``me`` left meanwhile."""
        if self._delay > 0:
            deadline = me.arrived + self._delay  # me is the oldest queued call
            while self._pending_rows < self._fill_target and not me.ended:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
        if me.ended:
            return []
        logits = self._pending[0].logits
        batch, rows, best, best_rows = [], 0, 0, 0
        for c in self._pending:
            if c.logits != logits:
                continue
            if batch and rows + c.rows > self.max_rows:
                break
            batch.append(c)
            rows += c.rows
            if rows in self.preferred:
                best, best_rows = len(batch), rows
        if best and best_rows != rows:
            batch = batch[:best]
        for c in batch:
            self._pending.remove(c)
            self._pending_rows -= c.rows
        return batch

    def _execute_one_batch(self, me: QueuedCall) -> None:
        with self._cond:
            batch = [] if me.ended else self._take_batch_locked(me)
            if not batch:  # me left the queue before its batch ran: the next oldest takes over
                me.executor = False
                self._hand_over_locked()
                return
        start = time.perf_counter()
        try:
            X = self._batch_inputs(batch)
            outputs, step = self._run_batch(X, batch[0].logits)
            error = None
        except BaseException as exc:  # every caller of the batch gets the failure
            outputs, step, error = None, -1, exc
        end = time.perf_counter()
        offset = 0
        rows = sum(c.rows for c in batch)
        for c in batch:
            if error is None:
                c.outputs = outputs[offset:offset + c.rows]
                offset += c.rows
            c.error, c.step = error, step
            c.queue_seconds, c.compute_seconds, c.batch_rows = start - c.arrived, end - start, rows
        with self._cond:
            me.executor = False
            for c in batch:
                c.done = True
                if c is not me:
                    c.wake.set()
            self._hand_over_locked()

    def _batch_inputs(self, batch: list[QueuedCall]) -> np.ndarray:
        if len(batch) == 1 and batch[0].inputs.flags.writeable:
            return batch[0].inputs
        first = batch[0].inputs
        rows = sum(c.rows for c in batch)
        if self._buffer is None or self._buffer.shape[0] < rows or self._buffer.dtype != first.dtype:
            self._buffer = np.empty((max(rows, 1), first.shape[1]), first.dtype)
        X = self._buffer[:rows]
        offset = 0
        for c in batch:
            X[offset:offset + c.rows] = c.inputs
            offset += c.rows
        return X


class PredictBatcher:
    """The Predict path both protocols share: validate one caller's rows,
    queue them on their model's ``ModelQueue`` (made on first use), return
    the finished ``QueuedCall``. With batching off, each call runs alone.
    Records each kernel call in ``stats`` (execution count, batch sizes)."""

    def __init__(self, registry, config: BatchingConfig, stats=None):
        self.registry = registry
        self.config = config
        self.stats = stats
        self._queues: dict[str, ModelQueue] = {}
        self._lock = threading.Lock()

    def predict(self, handle, X: np.ndarray, logits: bool, context=None) -> QueuedCall:
        """``handle``'s outputs for ``X``: returns the call with ``outputs``
        (its own rows) and ``step`` (the weights' step) set. Raises what
        validation or the batch raised, or CallCancelled."""
        spec = handle.spec
        call = QueuedCall(validated_inputs(X, spec.input_size, np.dtype(spec.dtype), self.registry.limits),
                          bool(logits))
        if not self.config.enabled:
            start = time.perf_counter()
            call.outputs, call.step = self.registry.predict(handle, call.inputs, call.logits)
            call.compute_seconds = time.perf_counter() - start
            call.batch_rows = call.rows
            self._record(handle.model_id, call.rows, call.compute_seconds)
            return call
        queue = self._queue_for(handle)
        if context is None:
            queue.predict(call)
        else:
            queue.predict(call, context.time_remaining,
                          lambda callback: context.add_callback(callback) or callback())
        if call.error is not None:
            raise call.error
        return call

    def _record(self, model_id: str, rows: int, seconds: float) -> None:
        if self.stats is not None:
            self.stats.batch_done(model_id, rows, seconds)

    def _queue_for(self, handle) -> ModelQueue:
        with self._lock:
            queue = self._queues.get(handle.model_id)
            if queue is None or queue.handle is not handle:  # new, or the id was deleted and made again
                for model_id in [k for k, q in self._queues.items() if q.handle.deleted]:
                    del self._queues[model_id]  # with their input buffers
                registry, model_id = self.registry, handle.model_id

                def run_batch(X, logits):
                    start = time.perf_counter()
                    out = registry.predict(handle, X, logits)
                    self._record(model_id, X.shape[0], time.perf_counter() - start)
                    return out

                queue = self._queues[handle.model_id] = ModelQueue(handle, run_batch, self.config,
                                                                   registry.limits)
            return queue

    def pending_by_model(self) -> dict[str, int]:
        """Calls queued now, by model id (for /metrics)."""
        with self._lock:
            return {model_id: q.pending for model_id, q in self._queues.items() if not q.handle.deleted}
