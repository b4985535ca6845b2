"""DatasetCatalog: the data sets server-side Fit trains on: a row each in
the store, their raw bytes (no pickle) in a file beside it
(``SqliteStore.put_dataset``), mapped read-only once used.

A data set is identified by its content: ``content_hash`` is the sha256 of
the arrays' dtypes, shapes and little-endian bytes, and ``dataset_id`` is
derived from it, so uploading the same content twice stores it once. Its
size counts against ``--max-dataset-mb`` and, with every other stored data
set, ``--max-datasets-mb``."""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from gradserve.wire.dataset import content_hash
from gradserve.wire.dataset import dataset_id as id_of

from .limits import Limits
from .store import SqliteStore

log = logging.getLogger("gradserve.datasets")


class DatasetNotFound(KeyError):
    def __init__(self, dataset_id: str, field: str = "dataset_id"):
        super().__init__(dataset_id)
        self.dataset_id = dataset_id
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: no data set {self.dataset_id!r}"


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    content_hash: str
    name: str
    created: float
    nbytes: int
    inputs_shape: tuple
    inputs_dtype: str
    targets_shape: tuple
    targets_dtype: str

    @property
    def rows(self) -> int:
        return self.inputs_shape[0]


def _info(dataset_id, digest, name, created, nbytes, layout) -> DatasetInfo:
    shapes = {n: (dt, tuple(shape)) for n, dt, shape in layout}
    return DatasetInfo(dataset_id, digest, name, created, nbytes, shapes["inputs"][1], np.dtype(shapes["inputs"][0]).name,
                       shapes["targets"][1], np.dtype(shapes["targets"][0]).name)


class DatasetCatalog:
    """Thread-safe. With ``store`` None (durability none) data sets live in memory only."""

    def __init__(self, store: SqliteStore | None, limits: Limits):
        self.store = store
        self.limits = limits
        self._lock = threading.Lock()
        self._infos: dict[str, DatasetInfo] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if store is not None:
            for dataset_id, digest, name, created, nbytes, meta in store.datasets():
                self._infos[dataset_id] = _info(dataset_id, digest, name, created, nbytes, json.loads(meta))

    def total_bytes(self) -> int:
        with self._lock:
            return sum(i.nbytes for i in self._infos.values())

    def put(self, X, y, name: str = "") -> tuple[DatasetInfo, bool]:
        """Stores (X, y) unless the same content is stored; returns (info,
        created). X and y are arrays, or lists of row chunks of one dtype
        (an upload as it arrived: with a store they go to its file as they
        are and come back mapped, never concatenated in memory)."""
        xs, ys = (X if isinstance(X, list) else [X]), (y if isinstance(y, list) else [y])
        nbytes = sum(a.nbytes for a in xs) + sum(a.nbytes for a in ys)
        self.limits.check_dataset(nbytes)
        digest = content_hash(xs, ys)
        dataset_id = id_of(digest)
        with self._lock:
            known = self._infos.get(dataset_id)
            if known is not None:
                return known, False
            self.limits.check_dataset(nbytes, sum(i.nbytes for i in self._infos.values()) + nbytes)
            x_shape = (sum(len(a) for a in xs), *xs[0].shape[1:])
            y_shape = (sum(len(a) for a in ys), *ys[0].shape[1:])
            info = DatasetInfo(dataset_id, digest, name, time.time(), nbytes, x_shape, xs[0].dtype.name, y_shape,
                               ys[0].dtype.name)
            if self.store is not None:  # mapped from its file on first use (``arrays``)
                self.store.put_dataset(dataset_id, digest, name, info.created, {"inputs": xs, "targets": ys})
            else:
                self._arrays[dataset_id] = tuple(np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))
                                                 for parts in (xs, ys))
            self._infos[dataset_id] = info
        log.info("event=dataset_stored dataset_id=%s rows=%d bytes=%d", dataset_id, info.rows, nbytes)
        return info, True

    def infos(self) -> list[DatasetInfo]:
        with self._lock:
            return list(self._infos.values())

    def info(self, dataset_id: str, field: str = "dataset_id") -> DatasetInfo:
        with self._lock:
            info = self._infos.get(dataset_id)
        if info is None:
            raise DatasetNotFound(dataset_id, field)
        return info

    def arrays(self, dataset_id: str, field: str = "dataset_id") -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), read from the store on first use and kept (read-only)."""
        self.info(dataset_id, field)
        with self._lock:
            cached = self._arrays.get(dataset_id)
            if cached is None:
                arrays = self.store.dataset_arrays(dataset_id) if self.store is not None else None
                if arrays is None:
                    raise DatasetNotFound(dataset_id, field)
                cached = self._arrays[dataset_id] = (arrays["inputs"], arrays["targets"])
            return cached

    def delete(self, dataset_id: str) -> None:
        with self._lock:
            if self._infos.pop(dataset_id, None) is None:
                raise DatasetNotFound(dataset_id)
            self._arrays.pop(dataset_id, None)
            if self.store is not None:
                self.store.delete_dataset(dataset_id)
        log.info("event=dataset_deleted dataset_id=%s", dataset_id)
