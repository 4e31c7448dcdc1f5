"""Crash-safe persistence of the cache: a snapshot plus an append-only log.

Folder layout (one folder per model bundle, so entries never mix)::

    snapshot.ccache   magic, header length, msgpack header, msgpack body
    log.ccache        records: u32 length, u32 crc32, msgpack {"op", "seq", ...}

Every change is appended to the log and fsynced before it is acknowledged, so
a peer killed with SIGKILL at any moment restarts with every acknowledged
entry; a record torn by the kill (only ever the last one, and shorter than its
length says) is cut off on the next start. A snapshot is written to a
temporary file, fsynced, renamed over the old one, and the folder fsynced, so
a crash leaves either the old or the new snapshot, never a torn one.

A damaged record anywhere else in the log (a flipped byte, garbage, a whole
last record whose crc fails) costs only itself: replay resyncs on the next
whole record whose crc matches (every record's map starts with the key
"op"), the original log is copied aside as ``log.ccache.corrupt-<time>``
(fsynced, folder fsynced) before anything changes it, then the log is
rewritten with the good records only (temporary file, fsync, rename, folder
fsync); a warning says how many records were skipped and where the copy is.

Log records carry a sequence number and the snapshot the last one it
contains, so replaying a log that a crash left behind after a snapshot is
harmless. A snapshot that is corrupt or belongs to another bundle is moved
aside with a warning and the cache starts empty. Nothing here is pickled:
msgpack with size limits, and raw float32 features.

A folder that cannot be written (read-only, not ours, a full disk) never makes
``load()`` raise: the store reads what it can, changes nothing on disk (no
cut, no move aside) and says why in ``unwritable``; appends that fail for the
same reasons set it too. :class:`ccied.cache.SemanticCache` then carries on in
memory only.
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
# Every record is a msgpack map whose first key is "op" (see CacheStore._append):
# after a damaged record, replay looks for this mark to find the next one.
_RECORD_MARK = b"\xa2op"
_MARK_OFFSET = _RECORD_HEAD.size + 1  # the header, then the map's type byte
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
    discarded_bytes: int  # torn tail and damaged records, skipped
    damaged_records: int = 0  # whole records skipped before the end of the log
    log_copy: Path | None = None  # where the damaged log was copied, if it was


@dataclass(frozen=True)
class _Record:
    seq: int
    op: str
    entry_id: int
    entry: StoredEntry | None  # for "add"
    end: int  # offset just after the record in the log


@dataclass
class _Replay:
    """What replaying the log found (see CacheStore._replay_log)."""

    applied: int = 0
    discarded: int = 0
    damaged: int = 0
    copy: Path | None = None
    seq: int = 0
    next_id: int = 1


def _is_torn(data: bytes, offset: int) -> bool:
    """Whether the bytes from ``offset`` on are one record cut short, as a crash leaves it."""
    if offset + _RECORD_HEAD.size > len(data):
        return True
    length = int(_RECORD_HEAD.unpack_from(data, offset)[0])
    return length <= MAX_RECORD_BYTES and offset + _RECORD_HEAD.size + length > len(data)


# Errors that mean the folder cannot take writes: the cache goes memory-only.
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _unwritable_reason(exc: OSError) -> str:
    """Why a write failed, as said to the operator ("" for other errors)."""
    if exc.errno in _READ_ONLY_ERRNOS:
        return f"the folder is read-only ({exc.strerror})"
    if exc.errno in _FULL_ERRNOS:
        return f"the disk is full ({exc.strerror})"
    return ""


def _aside_path(path: Path) -> Path:
    """A free name ``<name>.corrupt-<unix time>[-n]`` next to ``path``."""
    base = f"{path.name}.corrupt-{int(time.time())}"
    target = path.with_name(base)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{base}-{n}")
    return target


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
        # Why nothing can be written here ("" while it can): set by load() and
        # by failed writes; the cache is then kept in memory only.
        self.unwritable = ""
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            self.unwritable = _unwritable_reason(exc)
            if not self.unwritable:
                raise CachePersistenceError(f"cannot create cache folder {folder}: {exc}") from exc

    # -- loading ----------------------------------------------------------------

    def load(self) -> LoadedState:
        """Read the snapshot and replay the log.

        Never raises, neither for bad file contents nor for a folder that cannot
        be written or read (then ``unwritable`` says why, and nothing on disk
        was changed).
        """
        if not self.unwritable:
            self.unwritable = self._probe_writable()
        entries: dict[int, StoredEntry] = {}
        next_id = 1
        seq = 0
        snapshot = self.folder / SNAPSHOT_NAME
        try:
            replay = True
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
                    replay = False
            result = self._replay_log(entries, seq, next_id) if replay else None
        except OSError as exc:  # a file we may not read (or a folder where one should be)
            log.warning("cache folder %s cannot be read (%s); starting empty", self.folder, exc)
            self.unwritable = self.unwritable or f"its files cannot be read ({exc.strerror})"
            entries, next_id, seq, result = {}, 1, 0, None
        self._seq = result.seq if result else seq
        return LoadedState(
            entries=sorted(entries.values(), key=lambda e: e.entry_id),
            next_id=result.next_id if result else next_id,
            seq=self._seq,
            recovered_from_log=result.applied if result else 0,
            discarded_bytes=result.discarded if result else 0,
            damaged_records=result.damaged if result else 0,
            log_copy=result.copy if result else None,
        )

    def _probe_writable(self) -> str:
        """Why the folder or its log cannot be written ("" when they can)."""
        # access() sees read-only mounts and permissions as the kernel applies
        # them to this process (root writes through a chmod, not through EROFS).
        for path in (self.folder, self.folder / LOG_NAME):
            if path.exists() and not os.access(path, os.W_OK):
                what = "the folder" if path == self.folder else path.name
                return f"{what} is read-only"
        return ""

    def _move_aside(self, path: Path, reason: Exception) -> None:
        if not path.exists():
            return
        if self.unwritable:
            log.warning(
                "cache file %s is unusable (%s); left in place (%s)", path, reason, self.unwritable
            )
            return
        target = _aside_path(path)
        try:
            path.rename(target)
        except OSError as exc:
            # Never delete what cannot be moved: leave it, and write nothing here.
            self.unwritable = _unwritable_reason(exc) or f"cannot move {path.name} aside ({exc})"
            log.warning(
                "cache file %s is unusable (%s); left in place (%s)", path, reason, self.unwritable
            )
            return
        log.warning("cache file %s is unusable (%s); moved to %s", path, reason, target)

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

    def _replay_log(self, entries: dict[int, StoredEntry], seq: int, next_id: int) -> _Replay:
        path = self.folder / LOG_NAME
        if not path.exists():
            return _Replay(seq=seq, next_id=next_id)
        data = path.read_bytes()
        offset = 0
        applied = 0
        good: list[tuple[int, int]] = []  # spans of whole, valid records
        gaps: list[tuple[int, int, str]] = []  # damaged spans: start, end, why
        while offset < len(data):
            record = self._read_record(data, offset)
            if isinstance(record, str):
                # Skip to the next whole record whose crc matches (or the end).
                resume = self._next_record(data, offset)
                gaps.append((offset, resume, record))
                offset = resume
                continue
            if record.seq > seq:
                self._apply(entries, record)
                applied += 1
                seq = record.seq
                next_id = max(next_id, record.entry_id + 1)
            good.append((offset, record.end))
            offset = record.end
        torn = 0
        if gaps and gaps[-1][1] == len(data) and _is_torn(data, gaps[-1][0]):
            # The last record, shorter than its length says: a write cut by a
            # crash, never acknowledged. Only this may be cut off without a copy.
            torn = len(data) - gaps.pop()[0]
        result = _Replay(applied=applied, discarded=torn, seq=seq, next_id=next_id)
        if gaps:
            self._skip_damage(path, data, good, gaps, result)
        elif torn:
            self._cut_torn_tail(path, len(data) - torn, torn)
        return result

    def _read_record(self, data: bytes, offset: int) -> _Record | str:
        """The whole, valid record at ``offset``, or why there is none."""
        if offset + _RECORD_HEAD.size > len(data):
            return "a header cut short"
        length, crc = _RECORD_HEAD.unpack_from(data, offset)
        start = offset + _RECORD_HEAD.size
        if length > MAX_RECORD_BYTES or start + length > len(data):
            return f"a record of {length} bytes where {len(data) - start} remain"
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            return "crc mismatch"
        try:
            return self._parse(_unpack(payload, 16), start + length)
        # OverflowError: int() of an infinite float in a record whose crc matches.
        except (ValueError, KeyError, TypeError, OverflowError, msgpack.UnpackException) as exc:
            return f"unreadable record ({exc})"

    def _parse(self, record: Any, end: int) -> _Record:
        seq, op = int(record["seq"]), record["op"]
        entry_id = int(record.get("id", 0))
        if not (0 <= seq < _MAX_COUNTER and 0 <= entry_id < _MAX_COUNTER):
            raise ValueError("record seq or id out of range")
        entry = None
        if op == "add":
            feature = np.frombuffer(record["feature"], dtype="<f4")
            if feature.size != self.dim:
                raise ValueError(f"feature of {feature.size} values, expected {self.dim}")
            entry = StoredEntry(
                entry_id=entry_id,
                label=int(record["label"]),
                confidence=float(record["confidence"]),
                origin=str(record["origin"]),
                created_s=float(record["created"]),
                feature=feature.copy(),
            )
        elif op not in ("forget", "clear"):
            raise ValueError(f"unknown op {op!r}")
        return _Record(seq, op, entry_id, entry, end)

    def _next_record(self, data: bytes, offset: int) -> int:
        """Where the first whole, valid record after ``offset`` starts (the end if none)."""
        search = offset + 1 + _MARK_OFFSET
        while (found := data.find(_RECORD_MARK, search)) >= 0:
            if isinstance(self._read_record(data, found - _MARK_OFFSET), _Record):
                return found - _MARK_OFFSET
            search = found + 1
        return len(data)

    def _apply(self, entries: dict[int, StoredEntry], record: _Record) -> None:
        if record.entry is not None:
            entries[record.entry_id] = record.entry
        elif record.op == "forget":
            entries.pop(record.entry_id, None)
        else:
            entries.clear()

    def _cut_torn_tail(self, path: Path, size: int, torn: int) -> None:
        if self.unwritable:
            log.warning(
                "cache log %s: %d bytes of a torn last record ignored, left in place (%s)",
                path,
                torn,
                self.unwritable,
            )
            return
        # So new records follow the last good one.
        log.warning("cache log %s: discarded %d bytes after the last good record", path, torn)
        try:
            with path.open("r+b") as handle:
                handle.truncate(size)
                os.fsync(handle.fileno())
        except OSError as exc:
            self.unwritable = _unwritable_reason(exc) or f"cannot cut the log ({exc})"

    def _skip_damage(
        self,
        path: Path,
        data: bytes,
        good: list[tuple[int, int]],
        gaps: list[tuple[int, int, str]],
        result: _Replay,
    ) -> None:
        """Damaged records before the end: keep the original, then keep only good records."""
        # Every record's map starts with the mark: count them to say how many were lost.
        result.damaged = sum(max(1, data.count(_RECORD_MARK, start, end)) for start, end, _ in gaps)
        skipped = sum(end - start for start, end, _ in gaps)
        result.discarded += skipped
        first, _, why = gaps[0]
        after = sum(1 for start, _ in good if start > first)
        if self.unwritable:
            kept = f"the log is left as it is ({self.unwritable})"
        else:
            result.copy = self._keep_copy(path, data)
            kept = (
                f"the original log is kept as {result.copy}"
                if result.copy is not None
                else "no copy could be made, so the log is left as it is"
            )
        log.warning(
            "cache log %s: skipped %d damaged record(s) (%d bytes, the first at byte %d: %s); "
            "the %d good record(s) after it are kept; %s",
            path,
            result.damaged,
            skipped,
            first,
            why,
            after,
            kept,
        )
        if result.copy is not None:
            self._rewrite_log(path, b"".join(data[start:end] for start, end in good))

    def _keep_copy(self, path: Path, data: bytes) -> Path | None:
        """Copy the log aside (fsynced, name included) before anything changes it."""
        target = _aside_path(path)
        try:
            with target.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_folder(self.folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
            self.unwritable = _unwritable_reason(exc)
            log.warning("cache log %s: cannot copy it aside (%s)", path, exc)
            return None
        return target

    def _rewrite_log(self, path: Path, records: bytes) -> None:
        """Replace the log by ``records``: temporary file, fsync, rename, folder fsync."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(records)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
            _fsync_folder(self.folder)
        except OSError as exc:
            # The damaged log stays; the next load skips the same records again.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.unwritable = _unwritable_reason(exc)
            log.warning("cache log %s: not rewritten (%s)", path, exc)

    # -- writing ----------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        self._seq += 1
        record["seq"] = self._seq
        payload = msgpack.packb(record, use_bin_type=True)
        assert isinstance(payload, bytes)
        blob = _RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload
        # A failed record's seq is not reused: if it stays in the log after all
        # (its cut failed too), the next record must not look like a replay of it.
        path = self.folder / LOG_NAME
        if self._log is None:
            try:
                created = not path.exists()
                self._log = path.open("ab")
                self._good_size = self._log.tell()
                if created and self.fsync:
                    # A new file's name is durable only once its folder is fsynced.
                    _fsync_folder(self.folder)
            except OSError as exc:
                # Nothing of this record was written: nothing to cut (and
                # _good_size may not describe this file yet).
                self._close_log_after_error()
                raise self._append_failed(exc) from exc
        try:
            self._log.write(blob)
            self._log.flush()
            if self.fsync:
                os.fsync(self._log.fileno())
            self._good_size += len(blob)
        except OSError as exc:
            self._close_log_after_error()
            # Cut a partly written record off (load() would skip it anyway).
            with contextlib.suppress(OSError):  # if even that fails, load() cuts it
                os.truncate(path, self._good_size)
            raise self._append_failed(exc) from exc

    def _append_failed(self, exc: OSError) -> CachePersistenceError:
        self.unwritable = self.unwritable or _unwritable_reason(exc)
        return CachePersistenceError(f"cannot append to the cache log: {exc}")

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
            with contextlib.suppress(OSError):  # EROFS even for a missing file
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
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("cache log not reset (%s); it is replayed harmlessly on start", exc)

    def close(self) -> None:
        self._close_log_after_error()
