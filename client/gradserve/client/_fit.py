"""What the blocking and asyncio clients share for data sets and server-side
Fit: upload chunks, request and reply conversion, the history."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from gradserve.v1 import trainer_pb2 as pb
from gradserve.wire.dataset import content_hash, dataset_id
from gradserve.wire.tensor import CHUNK_BYTES, encode_tensor, wire_array


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    content_hash: str
    rows: int
    inputs_shape: tuple
    targets_shape: tuple
    nbytes: int
    created_unix: float
    name: str


def dataset_info(msg: pb.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(msg.dataset_id, msg.content_hash, msg.rows, tuple(msg.inputs_shape),
                       tuple(msg.targets_shape), msg.nbytes, msg.created_unix, msg.name)


def wire_arrays(X, y) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) as they travel (and as the server stores and hashes them)."""
    X, y = wire_array(X, "inputs"), wire_array(y, "targets")
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"a data set needs X (n, features) and y with the same n >= 1; got {X.shape} and {y.shape}")
    return X, y


def content_id(X: np.ndarray, y: np.ndarray) -> str:
    """The dataset_id the server gives (X, y) (wire arrays)."""
    return dataset_id(content_hash(X, y))


def dataset_chunks(X, y, max_message_bytes: int, name: str = ""):
    """DatasetChunk messages of as many rows as fit in ``wire.tensor.CHUNK_BYTES``
    (at most half the message limit), one row at least."""
    row_bytes = max(1, X[0].nbytes + y[0].nbytes)
    rows = max(1, min(CHUNK_BYTES, max_message_bytes // 2) // row_bytes)
    for i in range(0, len(X), rows):
        chunk = pb.DatasetChunk(name=name if i == 0 else "")
        encode_tensor(X[i:i + rows], "inputs", chunk.inputs)  # in place: a message given to the constructor is copied
        encode_tensor(y[i:i + rows], "targets", chunk.targets)
        yield chunk


def fit_request(model_id: str, dataset_id: str, *, epochs: int, batch_size: int, shuffle: bool, seed: int,
                validation_dataset_id: str = "", patience: int = 0, min_delta: float = 0.0,
                restore_best_weights: bool = False, progress_every_steps: int = 0,
                start_step: int | None = None) -> pb.FitRequest:
    return pb.FitRequest(model_id=model_id, dataset_id=dataset_id, epochs=epochs, batch_size=batch_size,
                         shuffle=shuffle, seed=seed, validation_dataset_id=validation_dataset_id, patience=patience,
                         min_delta=min_delta, restore_best_weights=restore_best_weights,
                         progress_every_steps=progress_every_steps, start_step=start_step)


def fit_seed(seed: int | None) -> int:
    """The shuffle seed of a Fit: ``seed``, or a fresh random one."""
    return secrets.randbits(63) if seed is None else int(seed)


class FitHistory:
    """Per-epoch ``loss``/``accuracy``/``val_loss``/``val_accuracy`` lists
    from a Fit's epoch-end messages (as the per-batch fit's history)."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.stopped_early = False
        self.best_epoch = 0
        self.restored_best = False

    def add(self, msg: pb.FitProgress) -> dict[str, float] | None:
        """The epoch's metrics for an epoch-end message, else None."""
        if not msg.epoch_end:
            return None
        metrics = {"loss": msg.loss}
        for key in ("accuracy", "val_loss", "val_accuracy"):
            if msg.HasField(key):
                metrics[key] = getattr(msg, key)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)
        self.stopped_early |= msg.stopped_early
        self.best_epoch = msg.best_epoch
        self.restored_best |= msg.restored_best
        return metrics


def check_server_side_only(**options) -> None:
    given = [k for k, v in options.items() if v]
    if given:
        raise ValueError(f"{', '.join(given)}: only with server_side=True")
