"""SqliteStore: every model's spec, state arrays and step in one SQLite file.

stdlib sqlite3 in WAL mode. A model is a row in ``models`` (spec as the JSON
of ``ModelSpec.to_dict``, step, creation time) plus one row per array of its
``state_dict`` in ``arrays`` (raw little-endian bytes, dtype and shape) —
no pickle. A checkpoint replaces a model's arrays and step in one
transaction, so a crash leaves either the old state or the new one.

With ``synchronous=FULL`` (the default for ``step`` durability) each commit
is fsynced before it returns and survives a power loss; with ``NORMAL`` (the
default for ``interval``, or ``--sqlite-sync normal``) a commit survives a
crash of the process but maybe not of the machine, and costs about half.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    step INTEGER NOT NULL,
    saved REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS arrays (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (model_id, name)
);
"""


@dataclass
class StoredModel:
    model_id: str
    spec: dict
    created: float
    step: int
    state: dict[str, np.ndarray]


def _blob(array: np.ndarray) -> tuple[str, str, bytes]:
    a = np.asarray(array)
    shape = list(a.shape)  # taken first: ascontiguousarray makes a 0-d array 1-d
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return a.dtype.str, json.dumps(shape), a.tobytes()


class SqliteStore:
    """One SQLite file; safe to call from any thread (one connection, one lock:
    SQLite has one writer at a time anyway)."""

    def __init__(self, path: str, *, synchronous: str = "FULL"):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # A checkpoint is a few MB of blobs: 64 KiB pages write them with a
        # tenth of the page overhead (measured: 784-512-256-10 Adam state,
        # 120 -> 45 ms per fsynced commit). Only takes effect on a new file.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"synchronous={synchronous!r}: use full or normal")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # move WAL pages into the database every ~128 MB, not every 4 MB
        # (the default would do it on almost every big checkpoint)
        self._db.execute("PRAGMA wal_autocheckpoint=2000")
        self._db.execute(f"PRAGMA journal_size_limit={128 << 20}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, model_id: str, spec: dict, created: float, state: dict[str, np.ndarray]) -> None:
        """Inserts or replaces the model and its state in one transaction."""
        step = int(np.asarray(state.get("step", 0)))
        rows = [(model_id, name, *_blob(a)) for name, a in state.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO models (id, spec, created, step, saved) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET step = excluded.step, saved = excluded.saved",
                    (model_id, json.dumps(spec), created, step, time.time()))
                self._db.execute("DELETE FROM arrays WHERE model_id = ?", (model_id,))
                self._db.executemany("INSERT INTO arrays VALUES (?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, model_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM arrays WHERE model_id = ?", (model_id,))
            self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            self._db.execute("COMMIT")

    def model_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM models ORDER BY created, id")]

    def load(self, model_id: str) -> StoredModel:
        with self._lock:
            row = self._db.execute("SELECT spec, created, step FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                raise KeyError(model_id)
            arrays = self._db.execute("SELECT name, dtype, shape, data FROM arrays WHERE model_id = ?",
                                      (model_id,)).fetchall()
        state = {name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(tuple(json.loads(shape))).copy()
                 for name, dtype, shape, data in arrays}
        return StoredModel(model_id, json.loads(row[0]), row[1], row[2], state)
