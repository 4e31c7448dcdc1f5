"""A real ``ccied peer --cache-dir DIR`` whose DIR cannot be written.

The folder holds a torn log (one depth) and a corrupt snapshot (the other),
as a crash and a bad disk leave them, and is then made read-only: chmod for a
user, a tmpfs remounted read-only for root (chmod does not stop root). The
peer must start, answer frames from what it could read plus memory, say once
that the cache is memory-only, and stop cleanly on SIGTERM with its socket
file gone and the folder untouched.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from ccied import Client
from ccied.bench.cluster import PeerProcess
from ccied.cache import THUMBNAIL_KEY
from ccied.cache.store import LOG_NAME, SNAPSHOT_NAME
from ccied.pruning import find_clip, iter_frames
from peers import peer_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Every 10th frame of the real carphone clip (12 frames)."""
    return [frame.pixels for frame in iter_frames(find_clip("carphone_pristine.mp4"), every=10)]


def peer_on(workdir: Path, cache_dir: Path, name: str) -> PeerProcess:
    return peer_process(workdir, name, "edge", "--cache-dir", str(cache_dir), listen="none")


@contextlib.contextmanager
def folder_made_read_only_later(folder: Path) -> Iterator[Callable[[], None]]:
    """An empty folder to fill now; the callable makes it read-only for this process."""
    folder.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"root, and no tmpfs to remount read-only here: {done.stderr.strip()}")
        try:
            yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        return

    def chmod_all(dirs: int, files: int) -> None:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(dirs if path.is_dir() else files)

    try:
        yield lambda: chmod_all(0o500, 0o400)
    finally:
        chmod_all(0o700, 0o600)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def wait_for_inserts(socket_path: Path, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(socket_path) as client:
        while client.status()["cache"]["inserts"] < count:
            assert time.monotonic() < deadline, "the peer's cache inserts did not land"
            time.sleep(0.05)


def test_a_read_only_cache_folder_serves_from_memory_and_stops_cleanly(
    workdir: Path, frames: list[np.ndarray]
) -> None:
    cache_dir = workdir / "rocache"
    with folder_made_read_only_later(cache_dir) as make_read_only:
        # A first run fills the folder and stops cleanly: a snapshot per depth.
        first = peer_on(workdir, cache_dir, "rofill")
        first.start()
        try:
            first.wait_ready()
            with Client(first.socket_path, timeout_s=60) as client:
                labels = [client.submit(pixels, f"a#{i}").label for i, pixels in enumerate(frames)]
            wait_for_inserts(first.socket_path, 1)
        finally:
            assert first.stop() == 0
        snapshots = sorted(cache_dir.glob(f"*/*/{SNAPSHOT_NAME}"))
        assert len(snapshots) == 2, snapshots
        thumb = next(s.parent for s in snapshots if s.parent.name == THUMBNAIL_KEY)
        deep = next(s.parent for s in snapshots if s.parent.name != THUMBNAIL_KEY)
        # The thumbnail depth: a torn last record; the deep one: a corrupt snapshot.
        with (thumb / LOG_NAME).open("ab") as handle:
            handle.write(struct.pack("<II", 300, 0) + b"torn")
        data = bytearray((deep / SNAPSHOT_NAME).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (deep / SNAPSHOT_NAME).write_bytes(bytes(data))
        make_read_only()
        before = tree_bytes(cache_dir)

        peer = peer_on(workdir, cache_dir, "roserve")
        peer.start()
        try:
            peer.wait_ready()  # exited with a traceback (cutting the torn log)
            with Client(peer.socket_path, timeout_s=60) as client:
                results = [client.submit(pixels, f"b#{i}") for i, pixels in enumerate(frames)]
                status = client.status()["cache"]
            assert [r.label for r in results] == labels
            # The thumbnail entries were read from the read-only folder and answer.
            assert any(r.source == "cache" for r in results)
            assert not status["persistent"]
        finally:
            code = peer.stop()
        log = (workdir / "roserve.log").read_text()
        assert code == 0, log  # the snapshot at shutdown raised (EROFS)
        assert not peer.socket_path.exists()
        assert "Traceback" not in log, log
        lines = [line for line in log.splitlines() if "memory-only" in line]
        assert len(lines) == 1 and "read-only" in lines[0], log
        assert tree_bytes(cache_dir) == before  # nothing cut, moved or written
