"""The cache's files when something went wrong: damaged log records, failed writes,
a read-only folder, a full disk.

Damage before the end of the log must not cost the records after it, and the
original is kept aside before anything is cut; a folder that cannot be written
leaves a cache that serves from memory, warns once and closes cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ccied.cache import CacheConfig, CachePersistenceError, CacheStore, HitRule, SemanticCache
from ccied.cache.store import LOG_NAME, SNAPSHOT_NAME

DIM = 32
BUNDLE = "bundle-r"
RULE = HitRule(threshold_l2=0.0)


def features(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def open_cache(
    folder: Path, on_memory_only: Callable[[str], None] | None = None, **overrides: Any
) -> SemanticCache:
    config = CacheConfig(dim=DIM, bundle_id=BUNDLE, **{"rule": RULE, **overrides})
    store = CacheStore(folder, BUNDLE, DIM)
    if on_memory_only is None:
        return SemanticCache(config, store)
    return SemanticCache(config, store, on_memory_only)


def fill(cache: SemanticCache, vectors: np.ndarray, first_label: int = 0) -> list[int]:
    ids = []
    for i, vector in enumerate(vectors):
        entry_id = cache.insert(vector, first_label + i, 0.9, "test", BUNDLE)
        assert entry_id is not None
        ids.append(entry_id)
    return ids


def record_offsets(log: bytes) -> list[int]:
    """Where each record of a log starts (u32 length, u32 crc, payload)."""
    offsets, offset = [], 0
    while offset < len(log):
        offsets.append(offset)
        offset += 8 + struct.unpack_from("<I", log, offset)[0]
    assert offset == len(log)
    return offsets


def assert_answers(
    cache: SemanticCache, vectors: np.ndarray, ids: list[int], labels: list[int]
) -> None:
    for vector, entry_id, label in zip(vectors, ids, labels, strict=True):
        result = cache.lookup(vector)
        assert result.exact and result.entry_id == entry_id and result.label == label


# -- damaged log records ----------------------------------------------------------


def flip_payload(log: bytearray, start: int) -> None:
    log[start + 40] ^= 0xFF  # inside the feature bytes


def flip_length(log: bytearray, start: int) -> None:
    log[start + 2] ^= 0x5A  # the record now claims megabytes


def flip_crc(log: bytearray, start: int) -> None:
    log[start + 5] ^= 0x01


@pytest.mark.parametrize("damage", [flip_payload, flip_length, flip_crc])
def test_one_damaged_record_mid_log_costs_only_that_record(
    tmp_path: Path, damage: Callable[[bytearray, int], None], caplog: pytest.LogCaptureFixture
) -> None:
    vectors = features(33, seed=1)
    ids = fill(open_cache(tmp_path), vectors)  # 33 acknowledged entries, all in the log
    log_file = tmp_path / LOG_NAME
    original = bytearray(log_file.read_bytes())
    offsets = record_offsets(bytes(original))
    damaged = bytearray(original)
    damage(damaged, offsets[16])  # the middle record
    log_file.write_bytes(bytes(damaged))

    with caplog.at_level(logging.WARNING, logger="ccied.cache"):
        cache = open_cache(tmp_path)
    keep = [i for i in range(33) if i != 16]
    assert len(cache) == 32  # was 16: everything after the damage was cut off
    assert_answers(cache, vectors[keep], [ids[i] for i in keep], keep)
    # The original was kept aside, byte for byte, and the warning says so.
    copies = list(tmp_path.glob(f"{LOG_NAME}.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == bytes(damaged)
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "skipped 1 damaged record" in warning and str(copies[0]) in warning
    assert "16 good record(s) after it are kept" in warning
    # The log now holds the good records only: the next start skips nothing, and
    # new records follow them.
    state = CacheStore(tmp_path, BUNDLE, DIM).load()
    assert state.discarded_bytes == 0 and len(state.entries) == 32
    later = fill(cache, features(1, seed=2), first_label=100)
    cache.close()
    again = open_cache(tmp_path)
    assert len(again) == 33 and again.lookup(features(1, seed=2)[0]).entry_id == later[0]
    assert len(list(tmp_path.glob(f"{LOG_NAME}.corrupt-*"))) == 1


def test_garbage_in_the_middle_of_the_log_is_skipped(tmp_path: Path) -> None:
    vectors = features(20, seed=3)
    ids = fill(open_cache(tmp_path), vectors)
    log_file = tmp_path / LOG_NAME
    data = log_file.read_bytes()
    cut = record_offsets(data)[10]
    log_file.write_bytes(data[:cut] + os.urandom(500) + data[cut:])
    cache = open_cache(tmp_path)
    assert len(cache) == 20
    assert_answers(cache, vectors, ids, list(range(20)))
    assert list(tmp_path.glob(f"{LOG_NAME}.corrupt-*"))


def test_a_damaged_last_whole_record_is_copied_aside_before_it_is_cut(tmp_path: Path) -> None:
    vectors = features(6, seed=4)
    fill(open_cache(tmp_path), vectors)
    log_file = tmp_path / LOG_NAME
    data = bytearray(log_file.read_bytes())
    flip_payload(data, record_offsets(bytes(data))[-1])  # whole, but not what was written
    log_file.write_bytes(bytes(data))
    assert len(open_cache(tmp_path)) == 5
    copies = list(tmp_path.glob(f"{LOG_NAME}.corrupt-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == bytes(data)


def test_a_torn_last_record_is_cut_without_a_copy(tmp_path: Path) -> None:
    vectors = features(6, seed=5)
    fill(open_cache(tmp_path), vectors)
    log_file = tmp_path / LOG_NAME
    os.truncate(log_file, log_file.stat().st_size - 30)  # a write cut by a crash
    state = CacheStore(tmp_path, BUNDLE, DIM).load()
    assert len(state.entries) == 5 and state.discarded_bytes > 0
    assert not list(tmp_path.glob("*.corrupt-*"))


# -- failed writes ----------------------------------------------------------------


def test_a_log_that_fails_to_open_is_not_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = features(5, seed=6)
    fill(open_cache(tmp_path), vectors)
    cache = open_cache(tmp_path)
    real_open = Path.open

    def no_files_left(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.name == LOG_NAME and "a" in mode:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_files_left)
    with pytest.raises(CachePersistenceError):
        cache.insert(features(1, seed=7)[0], 50, 0.9, "test", BUNDLE)
    monkeypatch.undo()
    assert len(open_cache(tmp_path)) == 5  # was 0: the log was cut to nothing


def test_an_entry_after_a_failed_write_that_stayed_in_the_log_is_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = open_cache(tmp_path)
    fill(cache, features(3, seed=8))
    real_fsync = os.fsync

    def fail(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    # The record is written but its fsync fails, and so does cutting it off.
    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(os, "truncate", fail)
    with pytest.raises(CachePersistenceError):
        cache.insert(features(1, seed=9)[0], 60, 0.9, "test", BUNDLE)
    monkeypatch.setattr(os, "fsync", real_fsync)
    acknowledged = cache.insert(features(1, seed=10)[0], 61, 0.9, "test", BUNDLE)
    monkeypatch.undo()
    reopened = open_cache(tmp_path)
    # Was missing: it reused the failed record's seq, so replay took it for a repeat.
    result = reopened.lookup(features(1, seed=10)[0])
    assert result.exact and result.entry_id == acknowledged and result.label == 61


# -- a folder that cannot be written ----------------------------------------------


def torn_log_and_corrupt_snapshot(folder: Path) -> tuple[np.ndarray, list[int]]:
    """Two depths' worth of damage: ``folder/a`` a snapshot plus a torn log, ``folder/b``
    a corrupt snapshot. Returns the features and ids kept in ``folder/a``."""
    vectors = features(8, seed=11)
    cache = open_cache(folder / "a")
    ids = fill(cache, vectors[:5])
    cache.close()  # a snapshot of 5
    ids += fill(open_cache(folder / "a"), vectors[5:], first_label=5)  # 3 in the log
    with (folder / "a" / LOG_NAME).open("ab") as handle:
        handle.write(struct.pack("<II", 200, 0) + b"torn")
    other = open_cache(folder / "b")
    fill(other, features(3, seed=12))
    other.close()
    data = bytearray((folder / "b" / SNAPSHOT_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "b" / SNAPSHOT_NAME).write_bytes(bytes(data))
    return vectors, ids


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def read_only_copy(folder: Path) -> Iterator[Path]:
    """``folder``'s files in a folder this process cannot write: chmod for a user,
    a tmpfs mounted read-only for root (chmod does not stop root)."""
    if os.geteuid() != 0:
        target = folder.with_name(folder.name + "-ro")
        shutil.copytree(folder, target)
        for path in [target, *target.rglob("*")]:
            path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield target
        finally:
            for path in [target, *target.rglob("*")]:
                path.chmod(0o700)
        return
    target = folder.with_name(folder.name + "-ro")
    target.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"root, and no read-only mount here: {done.stderr.strip()}")
    try:
        shutil.copytree(folder, target, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
        target.rmdir()


def test_a_read_only_folder_serves_from_memory_warns_once_and_closes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors, ids = torn_log_and_corrupt_snapshot(tmp_path / "cache")
    with read_only_copy(tmp_path / "cache") as folder:
        before = tree_bytes(folder)
        reasons: list[str] = []
        with caplog.at_level(logging.WARNING, logger="ccied.cache"):
            a = open_cache(folder / "a", reasons.append)  # raised OSError (EROFS, EACCES)
            b = open_cache(folder / "b", reasons.append)
        assert len(a) == 8 and len(b) == 0  # what could be read is served
        assert_answers(a, vectors, ids, list(range(8)))
        assert a.memory_only and b.memory_only and len(reasons) == 2
        assert all("read-only" in reason for reason in reasons)
        assert not a.stats()["persistent"]
        # New entries, forgets and a clear live in memory (they raised
        # CachePersistenceError and were not kept).
        new = fill(a, features(2, seed=13), first_label=20)
        assert len(a) == 10 and a.lookup(features(1, seed=13)[0]).entry_id == new[0]
        assert a.forget(ids[0]) and len(a) == 9
        fill(b, features(2, seed=14))
        assert b.clear() == 2
        a.close()  # raised OSError (EROFS) from the snapshot's clean-up
        b.close()
        assert len(reasons) == 2  # once each, not per write
        assert tree_bytes(folder) == before  # nothing cut, moved or written


def test_without_a_callback_a_read_only_folder_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torn_log_and_corrupt_snapshot(tmp_path / "cache")
    with read_only_copy(tmp_path / "cache") as folder:
        with caplog.at_level(logging.WARNING, logger="ccied.cache"):
            cache = open_cache(folder / "a")
            fill(cache, features(3, seed=15), first_label=30)
            cache.close()
    lines = [r.getMessage() for r in caplog.records if "memory-only" in r.getMessage()]
    assert len(lines) == 1 and "read-only" in lines[0]


def test_a_full_disk_at_append_keeps_serving_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = features(6, seed=16)
    cache_reasons: list[str] = []
    cache = open_cache(tmp_path, cache_reasons.append)
    ids = fill(cache, vectors[:3])
    real_fsync = os.fsync
    calls = {"fsync": 0}

    def full(fd: int) -> None:
        calls["fsync"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    ids += fill(cache, vectors[3:], first_label=3)  # raised CachePersistenceError
    assert len(cache) == 6 and cache.memory_only
    assert len(cache_reasons) == 1 and "disk is full" in cache_reasons[0]
    assert calls["fsync"] == 1  # memory-only: the disk is not tried again
    assert_answers(cache, vectors, ids, list(range(6)))
    cache.close()
    monkeypatch.setattr(os, "fsync", real_fsync)
    # What was durable before the disk filled is still there.
    assert len(open_cache(tmp_path)) == 3
