"""WriteAheadLog: the server's mutation log, as append-only segment files
shared by every model, with a length and a CRC-32C per record, written by
one thread that makes each group of appends durable with one fdatasync.

Why segment files and not a table in the SQLite store: a SQLite commit of
a 400 KB blob costs page copies, a WAL frame per page and the store's
single writer lock, all on the critical path of a step; appending the same
bytes to a file and calling fdatasync is the floor the hardware allows
(about 0.5 ms for 406 KB). Why one log for all models and not one per
model: concurrent steps of different models then share one fdatasync
(group commit), where per-model files would need one each.

On disk: ``<dir>/<segment number, 16 digits>.wal``; each segment starts
with ``SEGMENT_MAGIC`` and its number (u64), then records::

    length u32 LE | crc32c u32 LE (of the length bytes, then the payload) | payload

A position (``lsn``) is ``segment << 40 | byte offset``: it orders records
across segments. Positions are assigned at append time, in append order,
and the writer writes in that order, so a durable record implies that every
earlier record is durable too.

What a payload means is up to the caller (see ``mutations.py``); this
module also holds the array packing that payloads and snapshots share:
a JSON list of ``[name, dtype, shape]`` and the arrays' raw bytes,
little-endian, C order, concatenated.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import crc32c
import numpy as np

log = logging.getLogger("gradserve.wal")

SEGMENT_MAGIC = b"GSWAL\x00\x01\x00"  # format 1
SEGMENT_HEADER = struct.Struct("<8sQ")
FRAME = struct.Struct("<II")  # length, crc
OFFSET_BITS = 40
MAX_RECORD_BYTES = 1 << 31
SEGMENT_NAME = re.compile(r"^(\d{16})\.wal$")
IOV_MAX = 512  # os.writev's vector limit is 1024 on Linux; stay well under it


def lsn(segment: int, offset: int) -> int:
    return (segment << OFFSET_BITS) | offset


def segment_of(position: int) -> int:
    return position >> OFFSET_BITS


# -- arrays <-> bytes ------------------------------------------------------------
def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[list, list[memoryview]]:
    """(layout, buffers): layout is JSON-able ``[[name, dtype, shape], ...]``;
    buffers are the arrays' bytes (little-endian, C order), zero-copy when
    the array already is."""
    layout, buffers = [], []
    for name, array in arrays.items():
        a = np.asarray(array)
        shape = list(a.shape)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        layout.append([name, a.dtype.str, shape])
        buffers.append(memoryview(a.reshape(-1)).cast("B") if a.size else memoryview(b""))
    return layout, buffers


def unpack_arrays(layout: list, data, offset: int = 0) -> dict[str, np.ndarray]:
    """The arrays ``pack_arrays`` described, as read-only views into ``data``
    starting at ``offset``; raises ValueError when ``data`` is too short."""
    arrays = {}
    for name, dtype, shape in layout:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        end = offset + count * dt.itemsize
        if end > len(data):
            raise ValueError(f"array {name!r} runs past the end of its record")
        arrays[name] = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
        offset = end
    return arrays


def fsync_dir(folder) -> None:
    """Makes a file's creation or rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum(parts) -> int:
    value = 0
    for part in parts:
        value = crc32c.crc32c(part, value)
    return value


# -- appending -------------------------------------------------------------------------
class LogFailed(RuntimeError):
    """A write or fdatasync of the log failed: nothing appended since is
    durable, and the log accepts no more appends (the server must restart)."""


@dataclass
class Commit:
    """One appended record: ``position`` where it starts, ``end`` where the
    next begins. ``wait()`` returns once it is durable (or raises LogFailed)."""
    log: "WriteAheadLog | None"
    position: int
    end: int

    def wait(self) -> None:
        if self.log is not None:
            self.log.wait_durable(self.end)


DURABLE = Commit(None, 0, 0)  # what appends return when nothing is logged


@dataclass
class LogStats:
    """Counters for metrics: bytes and records appended, fdatasync calls and
    their total and worst seconds, segments removed."""
    bytes: int = 0
    records: int = 0
    fsyncs: int = 0
    fsync_seconds: float = 0.0
    fsync_seconds_max: float = 0.0
    segments_removed: int = 0

    def as_dict(self) -> dict:
        return {f"log_{k}": v for k, v in self.__dict__.items()}


@dataclass
class _Pending:
    segment: int
    parts: list = field(default_factory=list)


class WriteAheadLog:
    """Appends records to ``directory`` (one writer thread, group commit).

    ``append(parts)`` frames the record, assigns its position and queues it;
    it returns at once with a ``Commit`` to wait on. Callers append under
    their model's lock (so a model's records are in mutation order) and wait
    outside it. ``fsync=False`` skips fdatasync (tests of the framing only).
    """

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 64 << 20, fsync: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.stats = LogStats()
        existing = segment_numbers(self.directory)
        # a new segment per start: a torn tail of the last run stays where it is
        self._segment = (existing[-1] + 1) if existing else 1
        self._offset = SEGMENT_HEADER.size
        self._queue: list[_Pending] = [_Pending(self._segment, [SEGMENT_HEADER.pack(SEGMENT_MAGIC, self._segment)])]
        self._append_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._queued_end = lsn(self._segment, self._offset)
        self._durable_end = 0
        self._failed: BaseException | None = None
        self._closing = False
        self._fd: int | None = None
        self._fd_segment = 0
        self._writer = threading.Thread(target=self._write_loop, name="wal-writer", daemon=True)
        self._writer.start()

    # -- callers -----------------------------------------------------------
    def next_position(self) -> int:
        """Where the next record will start: every record appended later is at or after it."""
        with self._append_lock:
            return lsn(self._segment, self._offset)

    def append(self, parts: list) -> Commit:
        """Queues one record (its payload given as bytes-like parts)."""
        length = sum(len(p) for p in parts)
        if length >= MAX_RECORD_BYTES:
            raise ValueError(f"a log record is limited to {MAX_RECORD_BYTES} bytes, this one has {length}")
        length_bytes = struct.pack("<I", length)
        crc = crc32c.crc32c(length_bytes)
        for p in parts:
            crc = crc32c.crc32c(p, crc)
        frame = [FRAME.pack(length, crc), *parts]
        size = FRAME.size + length
        with self._append_lock:
            if self._failed is not None:
                raise LogFailed(f"the mutation log failed earlier: {self._failed!r}")
            if self._offset + size > self.segment_bytes and self._offset > SEGMENT_HEADER.size:
                self._segment += 1
                self._offset = SEGMENT_HEADER.size
                header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, self._segment)
                with self._cond:
                    self._queue.append(_Pending(self._segment, [header]))
            start = lsn(self._segment, self._offset)
            self._offset += size
            end = lsn(self._segment, self._offset)
            with self._cond:
                tail = self._queue[-1] if self._queue else None
                if tail is None or tail.segment != self._segment:
                    tail = _Pending(self._segment)
                    self._queue.append(tail)
                tail.parts.extend(frame)
                self._queued_end = end
                self.stats.bytes += size
                self.stats.records += 1
                self._cond.notify_all()
        return Commit(self, start, end)

    def wait_durable(self, end: int) -> None:
        with self._cond:
            while self._durable_end < end and self._failed is None:
                self._cond.wait()
            if self._durable_end < end:
                raise LogFailed(f"the mutation log failed before this record was durable: {self._failed!r}")

    def close(self) -> None:
        """Writes what is queued, makes it durable and stops the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the writer thread -----------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                batch, self._queue = self._queue, []
                end = self._queued_end
            try:
                for pending in batch:
                    self._write(pending)
                if self.fsync:
                    t0 = time.perf_counter()
                    os.fdatasync(self._fd)
                    seconds = time.perf_counter() - t0
                    self.stats.fsyncs += 1
                    self.stats.fsync_seconds += seconds
                    self.stats.fsync_seconds_max = max(self.stats.fsync_seconds_max, seconds)
            except BaseException as exc:  # noqa: BLE001 — every waiter must hear of it
                log.exception("event=log_write_failed directory=%s", self.directory)
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                with self._append_lock:
                    self._failed = exc
                return
            with self._cond:
                self._durable_end = end
                self._cond.notify_all()

    def _write(self, pending: _Pending) -> None:
        if self._fd is None or self._fd_segment != pending.segment:
            if self._fd is not None:
                if self.fsync:
                    os.fdatasync(self._fd)
                os.close(self._fd)
            path = self.directory / segment_name(pending.segment)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._fd_segment = pending.segment
            if self.fsync:  # the new file's name must survive a crash too
                fsync_dir(self.directory)
        parts = pending.parts
        for i in range(0, len(parts), IOV_MAX):
            chunk = parts[i:i + IOV_MAX]
            want = sum(len(p) for p in chunk)
            written = os.writev(self._fd, chunk)
            if written != want:  # short write (rare): write the rest plainly
                rest = b"".join(bytes(p) for p in chunk)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]

    # -- housekeeping ------------------------------------------------------------------
    def remove_segments_before(self, position: int) -> int:
        """Deletes every segment that holds only records before ``position``
        (never the one being written); returns how many were removed."""
        with self._append_lock:
            current = self._segment
        removed = remove_segments_before(self.directory, min(position, lsn(current, 0)))
        self.stats.segments_removed += removed
        return removed


def remove_segments_before(directory: str | os.PathLike, position: int) -> int:
    """Deletes the segments of ``directory`` numbered below ``position``'s."""
    removed = 0
    for number in segment_numbers(directory):
        if number >= segment_of(position):
            break
        try:
            (Path(directory) / segment_name(number)).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def segment_name(number: int) -> str:
    return f"{number:016d}.wal"


def segment_numbers(directory: str | os.PathLike) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(SEGMENT_NAME.match, os.listdir(directory)) if m)


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Damage:
    """A stretch of a segment that could not be read as records."""
    segment: int
    offset: int
    nbytes: int
    reason: str

    def __str__(self) -> str:
        return f"segment={segment_name(self.segment)} offset={self.offset} bytes={self.nbytes} reason={self.reason}"


def scan(directory: str | os.PathLike, start: int = 0,
         damage: list[Damage] | None = None) -> Iterator[tuple[int, bytes]]:
    """Yields ``(position, payload)`` for every intact record at or after
    ``start``, in log order. A record whose CRC fails is skipped (its
    length is trusted while it stays inside the segment: a corrupt length
    shows as a run of failing records); a length that runs past the end of
    the segment (a torn tail, or a corrupt length) ends that segment. Each
    skipped stretch is added to ``damage``, adjacent ones merged."""
    damage = damage if damage is not None else []

    def damaged(segment: int, offset: int, nbytes: int, reason: str) -> None:
        last = damage[-1] if damage else None
        if last is not None and last.segment == segment and last.offset + last.nbytes == offset:
            last.nbytes += nbytes
            if reason not in last.reason:
                last.reason += f", then {reason}"
        else:
            damage.append(Damage(segment, offset, nbytes, reason))

    for number in segment_numbers(directory):
        if number < segment_of(start):
            continue
        path = Path(directory) / segment_name(number)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < SEGMENT_HEADER.size:
            if data:
                damage.append(Damage(number, 0, len(data), "torn segment header"))
            continue
        magic, stored_number = SEGMENT_HEADER.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC or stored_number != number:
            damage.append(Damage(number, 0, len(data), "bad segment header"))
            continue
        offset = SEGMENT_HEADER.size
        view = memoryview(data)
        while offset < len(data):
            if offset + FRAME.size > len(data):
                damaged(number, offset, len(data) - offset, "torn record header")
                break
            length, crc = FRAME.unpack_from(data, offset)
            end = offset + FRAME.size + length
            if end > len(data):
                damaged(number, offset, len(data) - offset,
                        f"record of {length} bytes runs past the end (torn tail or corrupt length)")
                break
            payload = view[offset + FRAME.size:end]
            if crc32c.crc32c(payload, crc32c.crc32c(data[offset:offset + 4])) != crc:
                damaged(number, offset, end - offset, "CRC mismatch")
            elif lsn(number, offset) >= start:
                yield lsn(number, offset), payload
            offset = end
