"""Crash-safe persistence of the cache: a snapshot plus an append-only log.

Folder layout (one folder per model bundle, so entries never mix)::

    snapshot.ccache   magic, header length, msgpack header, msgpack body
    log.ccache        records: u32 length, u32 crc32, msgpack {"op", "seq", ...}

Every change is appended to the log and fsynced before it is acknowledged, so
a peer killed with SIGKILL at any moment restarts with every acknowledged
entry; a record torn by the kill is cut off on the next start. A snapshot is
written to a temporary file, fsynced, renamed over the old one, and the folder
fsynced, so a crash leaves either the old or the new snapshot, never a torn
one. Log records carry a sequence number and the snapshot the last one it
contains, so replaying a log that a crash left behind after a snapshot is
harmless. A snapshot that is corrupt or belongs to another bundle is moved
aside with a warning and the cache starts empty. Nothing here is pickled:
msgpack with size limits, and raw float32 features.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
from ccied.cache.errors import CachePersistenceError

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.ccache"
LOG_NAME = "log.ccache"
MAGIC = b"CCIEDC1\n"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 16
_RECORD_HEAD = struct.Struct("<II")  # payload length, crc32 of payload
_SNAPSHOT_HEAD = struct.Struct("<I")  # header length
# Ids and sequence numbers stay below this so the next one still fits msgpack's int64.
_MAX_COUNTER = 1 << 62


@dataclass(frozen=True)
class StoredEntry:
    """One cache entry as it is persisted."""

    entry_id: int
    label: int
    confidence: float
    origin: str
    created_s: float  # unix time
    feature: np.ndarray


@dataclass(frozen=True)
class LoadedState:
    entries: list[StoredEntry]
    next_id: int
    seq: int
    recovered_from_log: int
    discarded_bytes: int


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unpack(data: bytes, max_array: int, max_bin: int = MAX_RECORD_BYTES) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=1 << 12,
        max_bin_len=max_bin,
        max_array_len=max_array,
        max_map_len=64,
        max_ext_len=0,
    )


class CacheStore:
    """Snapshot + log for one bundle's cache in ``folder``."""

    def __init__(self, folder: Path, bundle_id: str, dim: int, fsync: bool = True) -> None:
        self.folder = folder
        self.bundle_id = bundle_id
        self.dim = dim
        self.fsync = fsync
        self._log: BinaryIO | None = None
        self._good_size = 0  # bytes of whole records in the log
        self._seq = 0
        self._warned_full = False
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise CachePersistenceError(f"cannot create cache folder {folder}: {exc}") from exc

    # -- loading ----------------------------------------------------------------

    def load(self) -> LoadedState:
        """Read the snapshot and replay the log; never raises for bad file contents."""
        entries: dict[int, StoredEntry] = {}
        next_id = 1
        seq = 0
        snapshot = self.folder / SNAPSHOT_NAME
        if snapshot.exists():
            try:
                entries, next_id, seq = self._read_snapshot(snapshot)
            except (
                ValueError,
                KeyError,
                TypeError,
                IndexError,  # columns shorter than the header's count
                OverflowError,
                struct.error,
                msgpack.UnpackException,
            ) as exc:
                # Corrupt, truncated by hand, or another bundle's: keep it for
                # inspection, start empty, and never replay a log onto nothing.
                self._move_aside(snapshot, exc)
                self._move_aside(self.folder / LOG_NAME, exc)
                entries, next_id, seq = {}, 1, 0
        recovered, discarded, seq, next_id = self._replay_log(entries, seq, next_id)
        self._seq = seq
        return LoadedState(
            entries=sorted(entries.values(), key=lambda e: e.entry_id),
            next_id=next_id,
            seq=seq,
            recovered_from_log=recovered,
            discarded_bytes=discarded,
        )

    def _move_aside(self, path: Path, reason: Exception) -> None:
        if not path.exists():
            return
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.warning("cache file %s is unusable (%s); moved to %s", path, reason, target)
        with contextlib.suppress(OSError):  # best effort: if it cannot move, unlink
            path.rename(target)
            return
        path.unlink(missing_ok=True)

    def _read_snapshot(self, path: Path) -> tuple[dict[int, StoredEntry], int, int]:
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            raise ValueError("not a ccied cache snapshot")
        offset = len(MAGIC)
        (header_len,) = _SNAPSHOT_HEAD.unpack_from(data, offset)
        offset += _SNAPSHOT_HEAD.size
        if header_len > MAX_HEADER_BYTES:
            raise ValueError("snapshot header too large")
        header = _unpack(data[offset : offset + header_len], 16)
        offset += header_len
        if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported snapshot header {header!r:.80}")
        if header["bundle"] != self.bundle_id or header["dim"] != self.dim:
            raise ValueError(
                f"snapshot of bundle {header['bundle']!r} dim {header['dim']}, "
                f"expected {self.bundle_id!r} dim {self.dim}"
            )
        body = data[offset:]
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise ValueError("snapshot checksum mismatch")
        count = int(header["count"])
        # The checksum matched, so the body is ours: its own size bounds its
        # feature block (a fixed limit made large caches unreadable).
        columns = _unpack(body, max(16, count), max_bin=len(body))
        features = np.frombuffer(columns["features"], dtype="<f4")
        if features.size != count * self.dim:
            raise ValueError("snapshot feature block has the wrong size")
        features = features.reshape(count, self.dim)
        entries = {}
        for i in range(count):
            entry = StoredEntry(
                entry_id=int(columns["ids"][i]),
                label=int(columns["labels"][i]),
                confidence=float(columns["confidences"][i]),
                origin=str(columns["origins"][i]),
                created_s=float(columns["created"][i]),
                feature=features[i].copy(),
            )
            entries[entry.entry_id] = entry
        next_id, seq = int(header["next_id"]), int(header["seq"])
        if not (0 < next_id < _MAX_COUNTER and 0 <= seq < _MAX_COUNTER):
            # The header is not checksummed; msgpack cannot write the next id or seq.
            raise ValueError(f"snapshot next_id {next_id} or seq {seq} out of range")
        return entries, next_id, seq

    def _replay_log(
        self, entries: dict[int, StoredEntry], seq: int, next_id: int
    ) -> tuple[int, int, int, int]:
        path = self.folder / LOG_NAME
        if not path.exists():
            return 0, 0, seq, next_id
        data = path.read_bytes()
        offset = 0
        applied = 0
        while offset + _RECORD_HEAD.size <= len(data):
            length, crc = _RECORD_HEAD.unpack_from(data, offset)
            start = offset + _RECORD_HEAD.size
            payload = data[start : start + length]
            if length > MAX_RECORD_BYTES or len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                record = _unpack(payload, 16)
                record_seq = int(record["seq"])
                if not (
                    0 <= record_seq < _MAX_COUNTER and 0 <= int(record.get("id", 0)) < _MAX_COUNTER
                ):
                    raise ValueError("record seq or id out of range")
                if record_seq > seq:
                    self._apply(entries, record)
                    applied += 1
                    seq = record_seq
                    next_id = max(next_id, int(record.get("id", 0)) + 1)
            # OverflowError: int() of an infinite float in a record whose crc matches.
            except (ValueError, KeyError, TypeError, OverflowError, msgpack.UnpackException) as exc:
                log.warning("cache log %s: unreadable record at byte %d (%s)", path, offset, exc)
                break
            offset = start + length
        discarded = len(data) - offset
        if discarded:
            # A record torn by a crash mid-write (or garbage after it): cut it off
            # so new records follow the last good one.
            log.warning(
                "cache log %s: discarded %d bytes after the last good record", path, discarded
            )
            with path.open("r+b") as handle:
                handle.truncate(offset)
                os.fsync(handle.fileno())
        return applied, discarded, seq, next_id

    def _apply(self, entries: dict[int, StoredEntry], record: dict[str, Any]) -> None:
        op = record["op"]
        if op == "add":
            feature = np.frombuffer(record["feature"], dtype="<f4")
            if feature.size != self.dim:
                raise ValueError(f"feature of {feature.size} values, expected {self.dim}")
            entries[int(record["id"])] = StoredEntry(
                entry_id=int(record["id"]),
                label=int(record["label"]),
                confidence=float(record["confidence"]),
                origin=str(record["origin"]),
                created_s=float(record["created"]),
                feature=feature.copy(),
            )
        elif op == "forget":
            entries.pop(int(record["id"]), None)
        elif op == "clear":
            entries.clear()
        else:
            raise ValueError(f"unknown op {op!r}")

    # -- writing ----------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        self._seq += 1
        record["seq"] = self._seq
        payload = msgpack.packb(record, use_bin_type=True)
        assert isinstance(payload, bytes)
        blob = _RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload
        try:
            if self._log is None:
                path = self.folder / LOG_NAME
                created = not path.exists()
                self._log = path.open("ab")
                self._good_size = self._log.tell()
                if created and self.fsync:
                    # A new file's name is durable only once its folder is fsynced.
                    _fsync_folder(self.folder)
            self._log.write(blob)
            self._log.flush()
            if self.fsync:
                os.fsync(self._log.fileno())
            self._good_size += len(blob)
        except OSError as exc:
            self._seq -= 1
            self._close_log_after_error()
            # Cut a partly written record off, or the records after it would be
            # unreachable on replay.
            with contextlib.suppress(OSError):  # if even that fails, load() cuts it
                os.truncate(self.folder / LOG_NAME, self._good_size)
            raise CachePersistenceError(f"cannot append to the cache log: {exc}") from exc

    def _close_log_after_error(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):  # closing a file on a full disk may fail too
                self._log.close()
            self._log = None

    def append_add(self, entry: StoredEntry) -> None:
        """Persist one new entry; returns only once it is durable."""
        self._append(
            {
                "op": "add",
                "id": entry.entry_id,
                "label": entry.label,
                "confidence": entry.confidence,
                "origin": entry.origin,
                "created": entry.created_s,
                "feature": np.ascontiguousarray(entry.feature, dtype="<f4").tobytes(),
            }
        )

    def append_forget(self, entry_id: int) -> None:
        self._append({"op": "forget", "id": entry_id})

    def append_clear(self) -> None:
        self._append({"op": "clear"})

    def snapshot(self, entries: Iterable[StoredEntry], next_id: int) -> bool:
        """Write all entries as the new snapshot and empty the log.

        Returns False (and keeps the previous snapshot and the log, which still
        hold everything) when the disk is full or unwritable; logs that once.
        """
        rows = list(entries)
        features = np.zeros((len(rows), self.dim), dtype="<f4")
        for i, row in enumerate(rows):
            features[i] = row.feature
        body = msgpack.packb(
            {
                "ids": [r.entry_id for r in rows],
                "labels": [r.label for r in rows],
                "confidences": [r.confidence for r in rows],
                "origins": [r.origin for r in rows],
                "created": [r.created_s for r in rows],
                "features": features.tobytes(),
            },
            use_bin_type=True,
        )
        header = msgpack.packb(
            {
                "version": FORMAT_VERSION,
                "bundle": self.bundle_id,
                "dim": self.dim,
                "count": len(rows),
                "next_id": next_id,
                "seq": self._seq,
                "sha256": hashlib.sha256(body).hexdigest(),
            },
            use_bin_type=True,
        )
        assert isinstance(body, bytes) and isinstance(header, bytes)
        final = self.folder / SNAPSHOT_NAME
        tmp = final.with_name(final.name + ".tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(MAGIC + _SNAPSHOT_HEAD.pack(len(header)) + header + body)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(final)
            _fsync_folder(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            level = logging.DEBUG if self._warned_full else logging.WARNING
            self._warned_full = True
            reason = "disk full" if exc.errno == errno.ENOSPC else str(exc)
            log.log(level, "cache snapshot not written (%s); the previous one is kept", reason)
            return False
        self._reset_log()
        return True

    def _reset_log(self) -> None:
        """Start an empty log; the snapshot's seq makes a stale log harmless anyway."""
        self._close_log_after_error()
        path = self.folder / LOG_NAME
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(b"")
            tmp.replace(path)
            _fsync_folder(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cache log not reset (%s); it is replayed harmlessly on start", exc)

    def close(self) -> None:
        self._close_log_after_error()
