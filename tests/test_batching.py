"""Dynamic batching, without a server: ModelQueue forms batches Triton's
way, gives every caller its own rows, lets cancelled callers leave, and
fails only the callers of a failed batch; validation refuses bad rows
before they are queued."""
import threading
import time

import numpy as np
import pytest

from gradserve.nnkernels import InputError
from gradserve.server.batching import (
    BatchingConfig,
    CallCancelled,
    CallDeadlineExceeded,
    ModelQueue,
    QueuedCall,
    validated_inputs,
)
from gradserve.server.limits import Limits


class FakeHandle:
    model_id = "m"
    deleted = False


class RecordingModel:
    """run_batch stand-in: output row = input row * 2 (so each caller can
    check its rows), records batch sizes; ``gate`` holds the first batch
    until released so that others queue behind it."""

    def __init__(self, hold_first=False, fail=False):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.hold_first = hold_first
        self.fail = fail

    def __call__(self, X, logits):
        self.batches.append(X.shape[0])
        self.started.set()
        if self.hold_first and len(self.batches) == 1:
            assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("kernel failed")
        return (X * (3 if logits else 2)).copy(), 7


def make_queue(model, **config):
    return ModelQueue(FakeHandle(), model, BatchingConfig(**config), Limits())


def rows(value, n=1, cols=3):
    return np.full((n, cols), float(value), np.float32)


def run_callers(queue, inputs, logits=None):
    """One thread per input; returns the finished calls (or exceptions) in order."""
    results = [None] * len(inputs)

    def worker(i):
        try:
            results[i] = queue.predict(QueuedCall(inputs[i], bool(logits and logits[i])))
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    return threads, results


def wait_pending(queue, n, timeout=10):
    deadline = time.monotonic() + timeout
    while queue.pending < n:
        assert time.monotonic() < deadline, f"only {queue.pending} of {n} callers queued"
        time.sleep(0.001)


def test_lone_caller_runs_at_once_on_its_own_thread():
    model = RecordingModel()
    queue = make_queue(model, max_queue_delay_us=0)
    call = queue.predict(QueuedCall(rows(1.5, 2), False))
    assert model.batches == [2] and call.step == 7
    np.testing.assert_array_equal(call.outputs, rows(3.0, 2))
    assert queue.pending == 0


def test_callers_queued_behind_a_running_batch_form_the_next_batch_and_get_their_own_rows():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model)
    first, first_results = run_callers(queue, [rows(-1)])
    assert model.started.wait(10)
    inputs = [rows(i, n=1 + i % 3) for i in range(16)]
    threads, results = run_callers(queue, inputs)
    wait_pending(queue, 16)
    model.gate.set()
    for t in first + threads:
        t.join(10)
    assert model.batches == [1, sum(x.shape[0] for x in inputs)]
    for x, call in zip(inputs, results):
        np.testing.assert_array_equal(call.outputs, x * 2)
        assert call.batch_rows == model.batches[1]


def test_batch_stops_at_max_batch_size_and_the_rest_runs_next():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model, max_batch_size=4)
    first, _ = run_callers(queue, [rows(0)])
    assert model.started.wait(10)
    threads, results = run_callers(queue, [rows(i) for i in range(1, 7)])
    wait_pending(queue, 6)
    model.gate.set()
    for t in first + threads:
        t.join(10)
    assert model.batches == [1, 4, 2]
    assert [float(c.outputs[0, 0]) for c in results] == [2.0 * i for i in range(1, 7)]


def test_preferred_batch_size_cuts_the_batch_at_the_longest_preferred_prefix():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model, preferred_batch_sizes=(2, 4), max_batch_size=8)
    first, _ = run_callers(queue, [rows(0)])
    assert model.started.wait(10)
    threads, _ = run_callers(queue, [rows(1, n=2), rows(2, n=2), rows(3, n=1)])
    wait_pending(queue, 3)
    model.gate.set()
    for t in first + threads:
        t.join(10)
    assert model.batches == [1, 4, 1]


def test_queue_delay_waits_for_more_rows_until_the_preferred_size_is_queued():
    model = RecordingModel()
    queue = make_queue(model, max_queue_delay_us=5_000_000, preferred_batch_sizes=(4,))
    start = time.monotonic()
    threads, results = run_callers(queue, [rows(i) for i in range(4)])
    for t in threads:
        t.join(10)
    assert model.batches == [4]  # one batch although the callers arrived one by one
    assert time.monotonic() - start < 4  # and nobody waited the whole delay


def test_logits_and_outputs_never_share_a_batch():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model)
    first, _ = run_callers(queue, [rows(0)])
    assert model.started.wait(10)
    threads, results = run_callers(queue, [rows(1), rows(2), rows(3)], logits=[False, True, False])
    wait_pending(queue, 3)
    model.gate.set()
    for t in first + threads:
        t.join(10)
    assert sorted(model.batches[1:]) == [1, 2]
    np.testing.assert_array_equal(results[1].outputs, rows(2) * 3)
    np.testing.assert_array_equal(results[2].outputs, rows(3) * 2)


def test_a_cancelled_caller_leaves_the_queue_and_is_not_computed():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model)
    first, _ = run_callers(queue, [rows(0)])
    assert model.started.wait(10)
    ended = {}
    leaving = QueuedCall(rows(5), False)
    staying = QueuedCall(rows(6), False)
    errors = []

    def leave():
        try:
            queue.predict(leaving, on_end=lambda cb: ended.setdefault("cb", cb))
        except CallCancelled as exc:
            errors.append(exc)

    t1 = threading.Thread(target=leave)
    t1.start()
    wait_pending(queue, 1)
    t2 = threading.Thread(target=queue.predict, args=(staying,))
    t2.start()
    wait_pending(queue, 2)
    ended["cb"]()  # what gRPC calls when the RPC is cancelled
    t1.join(10)
    assert errors and queue.pending == 1
    model.gate.set()
    for t in first + [t2]:
        t.join(10)
    assert model.batches == [1, 1] and not leaving.done
    np.testing.assert_array_equal(staying.outputs, rows(6) * 2)


def test_a_caller_whose_deadline_passes_while_queued_leaves_with_deadline_exceeded():
    model = RecordingModel(hold_first=True)
    queue = make_queue(model)
    first, _ = run_callers(queue, [rows(0)])
    assert model.started.wait(10)
    deadline = time.monotonic() + 0.05
    with pytest.raises(CallDeadlineExceeded):
        queue.predict(QueuedCall(rows(1), False), time_remaining=lambda: deadline - time.monotonic())
    assert queue.pending == 0
    model.gate.set()
    for t in first:
        t.join(10)
    assert model.batches == [1]


def test_a_failed_batch_fails_its_callers_and_the_queue_keeps_serving():
    model = RecordingModel(fail=True)
    queue = make_queue(model)
    call = queue.predict(QueuedCall(rows(1), False))
    assert isinstance(call.error, RuntimeError)
    model.fail = False
    assert queue.predict(QueuedCall(rows(2), False)).error is None


def test_validation_refuses_bad_rows_with_the_models_messages():
    limits = Limits(max_batch_rows=10)
    f32 = np.dtype(np.float32)
    with pytest.raises(InputError, match="inputs: has 4 columns, the model takes 3"):
        validated_inputs(np.zeros((2, 4)), 3, f32, limits)
    with pytest.raises(InputError, match="contains NaN or Inf"):
        validated_inputs(np.array([[1.0, np.nan, 0.0]]), 3, f32, limits)
    with pytest.raises(InputError, match="beyond float32"):
        validated_inputs(np.array([[1e300, 0.0, 0.0]]), 3, f32, limits)
    with pytest.raises(InputError, match="is empty"):
        validated_inputs(np.zeros((0, 3)), 3, f32, limits)
    with pytest.raises(Exception, match="max_batch_rows"):
        validated_inputs(np.zeros((11, 3)), 3, f32, limits)
    raw = np.frombuffer(np.ones((2, 3), np.float32).tobytes(), np.float32).reshape(2, 3)
    assert validated_inputs(raw, 3, f32, limits) is raw  # no copy before the batch's own


def test_config_refuses_preferred_sizes_above_the_maximum():
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        BatchingConfig(preferred_batch_sizes=(8,), max_batch_size=4)


def test_an_executor_cancelled_while_waiting_out_the_delay_hands_the_queue_on():
    model = RecordingModel()
    queue = make_queue(model, max_queue_delay_us=30_000_000, preferred_batch_sizes=(3,))
    ended = {}
    first = QueuedCall(rows(1), False)
    errors = []

    def lead():
        try:
            queue.predict(first, on_end=lambda cb: ended.setdefault("cb", cb))
        except CallCancelled as exc:
            errors.append(exc)

    t1 = threading.Thread(target=lead)
    t1.start()
    wait_pending(queue, 1)
    second = QueuedCall(rows(2), False)
    t2 = threading.Thread(target=queue.predict, args=(second,))
    t2.start()
    wait_pending(queue, 2)
    ended["cb"]()  # the first caller's RPC is cancelled while it waits for a third row
    t1.join(10)
    assert errors and not first.done
    third = queue.predict(QueuedCall(rows(3, n=2), False))  # with the second (now executor): 3 rows
    t2.join(10)
    assert model.batches == [3] and second.done and third.done
    np.testing.assert_array_equal(second.outputs, rows(2) * 2)
