"""SqliteStore: every model's spec and its newest snapshots in one SQLite file.

stdlib sqlite3 in WAL mode. A model is a row in ``models`` (spec as the
JSON of ``ModelSpec.to_dict``, creation time, ``uid``: the incarnation its
log records name) and up to ``KEEP_SNAPSHOTS`` rows in ``snapshots``: the
model's ``state_dict`` packed into one blob (``wal.pack_arrays``; no
pickle), its mutation version and step, the log position from which later
mutations must be replayed, and a CRC-32C of meta and blob, so a damaged
snapshot is detected and the previous one used instead. Writing a snapshot
and dropping the oldest is one transaction.

With ``synchronous=FULL`` (the default for ``step`` durability) each commit
is fsynced before it returns; the mutation log is trimmed only behind
snapshots, so they must be. With ``NORMAL`` (the default for ``interval``)
a commit survives a crash of the process but maybe not of the machine.
"""
from __future__ import annotations

import json
import mmap
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .wal import checksum, fsync_dir, pack_arrays, unpack_arrays

KEEP_SNAPSHOTS = 2
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    uid INTEGER NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    log_position INTEGER NOT NULL,
    saved REAL NOT NULL,
    meta TEXT NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_model ON snapshots (model_id, seq);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    nbytes INTEGER NOT NULL,
    meta TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    step INTEGER NOT NULL,
    saved REAL NOT NULL,
    meta TEXT NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (model_id, tag)
);
"""


class SnapshotCorrupt(ValueError):
    pass


@dataclass
class StoredModel:
    model_id: str
    uid: int
    spec: dict
    created: float
    tenant: str = ""  # the owning tenant of --auth-tokens; "" for none (admin and single-token setups)


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    saved: float


@dataclass
class Snapshot:
    """One stored state of a model: ``state`` is a ``state_dict``;
    ``extra`` what the registry keeps beside it (recent step replies)."""
    seq: int
    version: int
    step: int
    log_position: int
    saved: float
    meta: str
    crc: int
    data: bytes

    def verify(self) -> None:
        if checksum([self.meta.encode(), self.data]) != self.crc:
            raise SnapshotCorrupt(f"snapshot seq={self.seq} version={self.version}: CRC mismatch")

    def unpack(self) -> tuple[dict[str, np.ndarray], dict]:
        """(state, extra) after checking the CRC; raises SnapshotCorrupt."""
        self.verify()
        try:
            meta = json.loads(self.meta)
            state = {k: np.array(v) for k, v in unpack_arrays(meta["arrays"], self.data).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotCorrupt(f"snapshot seq={self.seq}: unreadable ({exc})") from None
        return state, meta.get("extra", {})


def pack_snapshot(state: dict[str, np.ndarray], extra: dict) -> tuple[str, bytes, int]:
    layout, buffers = pack_arrays(state)
    meta = json.dumps({"arrays": layout, "extra": extra}, separators=(",", ":"))
    data = b"".join(buffers)
    return meta, data, checksum([meta.encode(), data])


class SqliteStore:
    """One SQLite file; safe to call from any thread (one connection, one lock:
    SQLite has one writer at a time anyway)."""

    def __init__(self, path: str, *, synchronous: str = "FULL"):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # A snapshot is a few MB of blob: 64 KiB pages write it with a
        # tenth of the page overhead (784-512-256-10 Adam state: 120 -> 45 ms
        # per fsynced commit). Only takes effect on a new file.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"synchronous={synchronous!r}: use full or normal")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA wal_autocheckpoint=2000")
        self._db.execute(f"PRAGMA journal_size_limit={128 << 20}")
        self._db.execute("PRAGMA foreign_keys=ON")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "arrays" in tables:
            raise RuntimeError(f"{path}: written by an earlier gradserve (one state per model, no snapshots "
                               "or mutation log); start with a new --store")
        self._db.executescript(SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(models)")}
        if "tenant" not in columns:  # a store from before tenants: its models belong to none
            self._db.execute("ALTER TABLE models ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._drop_orphan_dataset_files()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, statements) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def create(self, model: StoredModel, version: int, step: int, log_position: int,
               state: dict[str, np.ndarray], extra: dict) -> None:
        """Stores a new model and its first snapshot in one transaction
        (replacing any stored model of that id)."""
        meta, data, crc = pack_snapshot(state, extra)
        self._transaction([
            ("DELETE FROM models WHERE id = ?", (model.model_id,)),
            ("INSERT INTO models (id, uid, spec, created, tenant) VALUES (?, ?, ?, ?, ?)",
             (model.model_id, model.uid, json.dumps(model.spec), model.created, model.tenant)),
            ("INSERT INTO snapshots (model_id, version, step, log_position, saved, meta, crc, data) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (model.model_id, version, step, log_position, time.time(), meta,
                                                 crc, data)),
        ])

    def put_snapshot(self, model_id: str, version: int, step: int, log_position: int,
                     state: dict[str, np.ndarray], extra: dict, keep: int = KEEP_SNAPSHOTS) -> int:
        """Adds a snapshot and drops all but the newest ``keep``; returns the
        oldest kept snapshot's log position (replay may need the log from there)."""
        meta, data, crc = pack_snapshot(state, extra)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone() is None:
                    raise KeyError(model_id)  # deleted meanwhile
                self._db.execute(
                    "INSERT INTO snapshots (model_id, version, step, log_position, saved, meta, crc, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (model_id, version, step, log_position, time.time(), meta,
                                                        crc, data))
                self._db.execute("DELETE FROM snapshots WHERE model_id = ? AND seq NOT IN "
                                 "(SELECT seq FROM snapshots WHERE model_id = ? ORDER BY seq DESC LIMIT ?)",
                                 (model_id, model_id, keep))
                oldest = self._db.execute("SELECT MIN(log_position) FROM snapshots WHERE model_id = ?",
                                          (model_id,)).fetchone()[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return oldest

    def drop_snapshot(self, seq: int) -> None:
        self._transaction([("DELETE FROM snapshots WHERE seq = ?", (seq,))])

    def delete(self, model_id: str) -> None:
        self._transaction([("DELETE FROM snapshots WHERE model_id = ?", (model_id,)),
                           ("DELETE FROM models WHERE id = ?", (model_id,))])

    def models(self) -> list[StoredModel]:
        with self._lock:
            rows = self._db.execute("SELECT id, uid, spec, created, tenant FROM models ORDER BY created, id").fetchall()
        return [StoredModel(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]

    def model_ids(self) -> list[str]:
        return [m.model_id for m in self.models()]

    def snapshots(self, model_id: str) -> list[Snapshot]:
        """The model's snapshots, newest first (not yet verified)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, version, step, log_position, saved, meta, crc, data FROM snapshots "
                "WHERE model_id = ? ORDER BY seq DESC", (model_id,)).fetchall()
        return [Snapshot(*r) for r in rows]

    # -- named checkpoints (SaveCheckpoint / ListCheckpoints / RestoreCheckpoint) ----------
    # Kept apart from snapshots: the caller names them, they are never trimmed,
    # and a model's recovery never reads them. Same packing and CRC as snapshots.
    def put_checkpoint(self, model_id: str, tag: str, step: int, state: dict[str, np.ndarray], extra: dict) -> None:
        """Stores the state under ``tag``, replacing what the tag held; raises
        KeyError when the model is not stored (deleted meanwhile)."""
        meta, data, crc = pack_snapshot(state, extra)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone() is None:
                    raise KeyError(model_id)
                self._db.execute("INSERT OR REPLACE INTO checkpoints (model_id, tag, step, saved, meta, crc, data) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (model_id, tag, step, time.time(), meta, crc, data))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def checkpoints(self, model_id: str) -> list[CheckpointInfo]:
        """The model's checkpoints, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT tag, step, saved FROM checkpoints WHERE model_id = ? ORDER BY saved, tag",
                                    (model_id,)).fetchall()
        return [CheckpointInfo(*r) for r in rows]

    def checkpoint(self, model_id: str, tag: str) -> tuple[CheckpointInfo, dict[str, np.ndarray], dict] | None:
        """(info, state, extra) of the tag, None when it holds nothing;
        raises SnapshotCorrupt when its CRC does not hold."""
        with self._lock:
            row = self._db.execute("SELECT step, saved, meta, crc, data FROM checkpoints WHERE model_id = ? AND "
                                   "tag = ?", (model_id, tag)).fetchone()
        if row is None:
            return None
        step, saved, meta, crc, data = row
        state, extra = Snapshot(-1, -1, step, 0, saved, meta, crc, data).unpack()
        return CheckpointInfo(tag, step, saved), state, extra

    # -- data sets (server-side Fit) ------------------------------------------------
    # A data set is one row: ``meta`` holds the JSON layout of its arrays
    # (``inputs``, ``targets``; ``wal.pack_arrays``); their bytes are one file,
    # STORE.datasets/<id>, written whole and fsynced (temporary name, then
    # renamed) before the row is committed, and mapped read-only when loaded.
    # A blob in SQLite wrote a 188 MB data set twice (WAL, then checkpoint):
    # 0.62 s against 0.2 s for the file. Rows of older stores keep their bytes
    # in ``data`` and are read from there.

    @property
    def datasets_dir(self) -> Path:
        return Path(self.path + ".datasets")

    def put_dataset(self, dataset_id: str, content_hash: str, name: str, created: float,
                    arrays: dict[str, list[np.ndarray]]) -> None:
        """``arrays``: name -> its row chunks (one dtype), written one after
        the other: the file holds their concatenation, never made in memory."""
        layout, buffers = [], []
        for array_name, parts in arrays.items():
            chunk_layout, chunk_buffers = pack_arrays({str(i): a for i, a in enumerate(parts)})
            layout.append([array_name, chunk_layout[0][1], [sum(len(a) for a in parts), *parts[0].shape[1:]]])
            buffers += chunk_buffers
        folder = self.datasets_dir
        if not folder.exists():
            folder.mkdir(exist_ok=True)
            fsync_dir(folder.parent)  # the folder's own entry, or a power loss could keep the row and lose the file
        final, tmp = folder / dataset_id, folder / f".{dataset_id}.tmp"
        with open(tmp, "wb") as f:
            for buf in buffers:
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
        nbytes = sum(len(b) for b in buffers)
        self._transaction([("INSERT OR IGNORE INTO datasets (id, content_hash, name, created, nbytes, meta, data) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (dataset_id, content_hash, name, created, nbytes, json.dumps(layout), b""))])

    def datasets(self) -> list[tuple[str, str, str, float, int, str]]:
        """(id, content_hash, name, created, nbytes, meta) of every data set, without their bytes."""
        with self._lock:
            return self._db.execute("SELECT id, content_hash, name, created, nbytes, meta FROM datasets "
                                    "ORDER BY created, id").fetchall()

    def dataset_arrays(self, dataset_id: str) -> dict[str, np.ndarray] | None:
        """The data set's arrays, read-only (views of the mapped file)."""
        with self._lock:
            row = self._db.execute("SELECT meta, nbytes, data FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        if row is None:
            return None
        meta, nbytes, data = row
        if not data and nbytes:
            with open(self.datasets_dir / dataset_id, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return unpack_arrays(json.loads(meta), data)

    def delete_dataset(self, dataset_id: str) -> None:
        self._transaction([("DELETE FROM datasets WHERE id = ?", (dataset_id,))])
        (self.datasets_dir / dataset_id).unlink(missing_ok=True)

    def _drop_orphan_dataset_files(self) -> None:
        """Files a crash left without their row (written, not committed) and
        half-written temporaries."""
        folder = self.datasets_dir
        if not folder.is_dir():
            return
        known = {r[0] for r in self._db.execute("SELECT id FROM datasets")}
        for f in folder.iterdir():
            if f.name not in known:
                f.unlink(missing_ok=True)
