"""TrainingCurves: every model's loss, accuracy, learning rate and gradient
norm per optimizer step, written as TensorBoard event files (tensorboardX)
under ``--tensorboard-dir``, one run directory per model id.

Scalars (tags ``train/loss``, ``train/accuracy`` for classifiers,
``train/lr``, ``train/grad_norm``) are written at global step = the model's
step count after the step, for the steps the server acknowledges live
(TrainStep, TrainStream); a restart's replay writes nothing again. A retried
step answered from the kept replies is not written twice. tensorboardX
queues events and a background thread of each writer writes them, so a
step never waits for the disk; ``flush_secs`` bounds how stale the files
are, and ``close`` (at shutdown, or a model's deletion) flushes.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("gradserve.curves")


def run_name(model_id: str) -> str:
    """The run directory of a model: its id (ids are [A-Za-z0-9._-]), with
    ids made only of dots (., ..) prefixed so they stay inside the log dir."""
    return "_" + model_id if set(model_id) <= {"."} else model_id


class TrainingCurves:
    def __init__(self, log_dir: str | Path, flush_secs: float = 5.0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("--tensorboard-dir needs tensorboardX: pip install 'gradserve[tensorboard]'") from exc
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flush_secs = flush_secs
        self._writers: dict[str, object] = {}
        self._last_step: dict[str, int] = {}
        self._lock = threading.Lock()

    def _writer(self, model_id: str):
        with self._lock:
            w = self._writers.get(model_id)
            if w is None:
                w = self._writers[model_id] = self._writer_class(str(self.log_dir / run_name(model_id)),
                                                                 flush_secs=self.flush_secs)
            return w

    def step(self, model_id: str, result) -> None:
        """Writes one acknowledged step (an ``nnkernels.StepResult``)."""
        with self._lock:
            if self._last_step.get(model_id, -1) >= result.step:  # a retry answered from the kept replies
                return
            self._last_step[model_id] = result.step
        w = self._writer(model_id)
        w.add_scalar("train/loss", result.loss, result.step)
        if result.accuracy is not None:
            w.add_scalar("train/accuracy", result.accuracy, result.step)
        w.add_scalar("train/lr", result.lr, result.step)
        w.add_scalar("train/grad_norm", result.grad_norm, result.step)

    def forget(self, model_id: str) -> None:
        """Closes a deleted model's writer (a new model of that id starts a new event file)."""
        with self._lock:
            w = self._writers.pop(model_id, None)
            self._last_step.pop(model_id, None)
        if w is not None:
            w.close()

    def close(self) -> None:
        with self._lock:
            writers, self._writers = list(self._writers.values()), {}
        for w in writers:
            w.close()
