"""The semantic cache in a real edge peer: repeat frames, SIGKILL and restart, forget, clear.

A real ``ccied peer`` process (no listener, no cloud: misses run on its own
tail) with ``--cache-dir``; real frames of a bundled clip through ``ccied.Client``
and the ``ccied status`` / ``ccied cache`` commands as a user would run them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ccied import Client
from ccied.bench.cluster import PeerProcess
from ccied.peer.client import FrameResult
from ccied.pruning import find_clip, iter_frames
from peers import peer_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def carphone() -> list[np.ndarray]:
    """Every 5th frame of the real carphone clip (24 frames)."""
    return [frame.pixels for frame in iter_frames(find_clip("carphone_pristine.mp4"), every=5)]


def edge_peer(workdir: Path) -> PeerProcess:
    return peer_process(
        workdir, "cachecam", "edge", "--cache-dir", str(workdir / "cache"), listen="none"
    )


def submit_all(socket_path: Path, frames: list[np.ndarray], tag: str) -> list[FrameResult]:
    with Client(socket_path, timeout_s=30) as client:
        return [client.submit(pixels, f"{tag}#{i}") for i, pixels in enumerate(frames)]


def cli(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", *args, "--socket", str(socket_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cache_status(socket_path: Path) -> dict[str, Any]:
    done = cli(socket_path, "status", "--json")
    assert done.returncode == 0, done.stderr
    cache: dict[str, Any] = json.loads(done.stdout)["cache"]
    return cache


def wait_for_inserts(socket_path: Path, count: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """Inserts land on the peer's cache thread after the answer: wait for them."""
    deadline = time.monotonic() + timeout_s
    with Client(socket_path) as client:
        while True:
            cache: dict[str, Any] = client.status()["cache"]
            if cache["inserts"] >= count or time.monotonic() > deadline:
                return cache
            time.sleep(0.05)


def test_repeated_frames_are_answered_from_a_cache_that_survives_sigkill(
    workdir: Path, carphone: list[np.ndarray]
) -> None:
    peer = edge_peer(workdir)
    peer.start()
    try:
        peer.wait_ready()
        first = submit_all(peer.socket_path, carphone, "pass1")
        misses = [r for r in first if r.source != "cache"]
        assert all(r.source == "local" for r in misses)
        assert len(misses) > len(first) / 2  # a first pass mostly computes
        cache = wait_for_inserts(peer.socket_path, len(misses))
        assert cache["entries"] == len(misses)

        second = submit_all(peer.socket_path, carphone, "pass2")
        hits = [r for r in second if r.source == "cache"]
        assert len(hits) >= 0.8 * len(second)
        assert [r.label for r in second] == [r.label for r in first]
        assert all(r.cache_entry > 0 and r.served_by == "cachecam" for r in hits)
        assert all(r.bytes_sent == 0 for r in second)

        status = cache_status(peer.socket_path)
        assert {"entries", "hits", "misses", "hit_rate"} <= status.keys()
        assert status["hits"] == len(hits) + (len(first) - len(misses))
        assert status["misses"] == 2 * len(second) - status["hits"]
        assert status["hit_rate"] == pytest.approx(status["hits"] / (2 * len(second)), abs=1e-3)
        entries_before_kill = status["entries"]

        peer.kill()  # SIGKILL: no snapshot, only the log
        peer = edge_peer(workdir)
        peer.start()
        peer.wait_ready()
        assert cache_status(peer.socket_path)["entries"] == entries_before_kill

        third = submit_all(peer.socket_path, carphone, "pass3")
        hits = [r for r in third if r.source == "cache"]
        assert len(hits) >= 0.8 * len(third)
        assert [r.label for r in third] == [r.label for r in first]

        # Forget the entry that answered a frame: it is gone from its key depth, once.
        entry, depth = hits[0].cache_entry, hits[0].cache_depth

        def depth_entries() -> int:
            depths = cache_status(peer.socket_path)["depths"]
            return int(next(d["entries"] for d in depths if d["name"] == depth))

        before = depth_entries()
        done = cli(peer.socket_path, "cache", "forget", str(entry))
        assert done.returncode == 0 and f"forgot entry {entry}" in done.stdout, done.stderr
        assert depth_entries() == before - 1
        again = cli(peer.socket_path, "cache", "forget", str(entry))
        assert again.returncode == 1 and "no entry" in again.stdout
        with Client(peer.socket_path) as client:
            result = client.submit(carphone[third.index(hits[0])], "after-forget")
        assert result.source != "cache" or result.cache_entry != entry

        done = cli(peer.socket_path, "cache", "clear")
        assert done.returncode == 0 and "cleared" in done.stdout, done.stderr
        assert cache_status(peer.socket_path)["entries"] == 0
        fourth = submit_all(peer.socket_path, carphone, "pass4")
        assert fourth[0].source == "local"
        assert sum(r.source == "cache" for r in fourth) < len(fourth) / 2
        assert [r.label for r in fourth] == [r.label for r in first]
    finally:
        peer.stop()

    # The clear is durable too: a restart does not bring the old entries back.
    peer = edge_peer(workdir)
    peer.start()
    try:
        peer.wait_ready()
        entries = cache_status(peer.socket_path)["entries"]
        assert entries == sum(r.source != "cache" for r in fourth)
    finally:
        peer.stop()


def test_no_cache_turns_the_cache_off(workdir: Path, carphone: list[np.ndarray]) -> None:
    peer = peer_process(workdir, "nocache", "edge", "--no-cache", listen="none")
    peer.start()
    try:
        peer.wait_ready()
        frames = carphone[:4]
        results = submit_all(peer.socket_path, frames + frames, "nc")
        assert all(r.source == "local" for r in results)
        assert cache_status(peer.socket_path) == {"enabled": False}
        done = cli(peer.socket_path, "cache", "clear")
        assert done.returncode != 0
    finally:
        peer.stop()
