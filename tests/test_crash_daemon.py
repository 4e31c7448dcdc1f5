"""SIGKILL a real peer while cache entries pour in; every entry it held comes back.

The peer runs with ``--cache-dir``. A trusted neighbour (this test, with a key
the peer trusts) streams batches of distinct cache entries to its peer socket,
the fastest way to make a daemon insert. While that runs, the test polls the
peer's ``status``: an entry counts there only once it is in the log and synced,
so the highest count seen is what the peer acknowledged. At a random moment the
peer is SIGKILLed and restarted on the same folder: it must come back with at
least that many entries, with nothing moved aside as corrupt.

``CCIED_CRASH_ITERATIONS`` sets the number of kills (a few in CI; 50 or more
for the long run).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zmq
from ccied.bench.cluster import PeerProcess, free_tcp_port
from ccied.cache import feature_dim
from ccied.peer.client import Client
from ccied.peer.keys import Keypair
from ccied.peer.wire import CacheShare, encode
from peers import dealer, peer_keys, peer_process

pytestmark = pytest.mark.slow

ITERATIONS = int(os.environ.get("CCIED_DAEMON_CRASH_ITERATIONS", "3"))
BATCH = 32


def feeder(
    address: str,
    keys: tuple[Keypair, str],
    bundle: str,
    dim: int,
    stop: threading.Event,
    seed: int,
) -> None:
    """Send batches of random unit features (each far from the others) until stopped."""
    rng = np.random.default_rng(seed)
    sock = dealer(keys)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.connect(address)
    try:
        while not stop.is_set():
            features = rng.standard_normal((BATCH, dim)).astype(np.float32)
            features /= np.linalg.norm(features, axis=1, keepdims=True)
            message = CacheShare(
                request_id=uuid.uuid4().hex,
                bundle_id=bundle,
                origins=["feeder"] * BATCH,
                labels=[int(x) for x in rng.integers(0, 1000, BATCH)],
                confidences=[0.9] * BATCH,
                features=features,
            )
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(encode(message), flags=zmq.NOBLOCK)
            while sock.poll(0):
                sock.recv_multipart()
            time.sleep(0.01)
    finally:
        sock.close(linger=0)


def entries(peer: PeerProcess) -> int:
    with Client(peer.socket_path, timeout_s=5.0) as client:
        count: int = client.status()["cache"]["entries"]
        return count


def test_sigkill_during_cache_inserts_loses_no_acknowledged_entry(workdir: Path) -> None:
    rng = random.Random(11)
    cache_dir = workdir / "cache"
    address = f"tcp://127.0.0.1:{free_tcp_port()}"

    # Room for every entry of a long run: eviction is not loss.
    cache_args = ["--cache-dir", str(cache_dir), "--no-share-cache", "--cache-capacity", "200000"]

    def make() -> PeerProcess:
        return peer_process(
            workdir, "crash1", "edge", *cache_args, listen=address, shared_keys=True
        )

    # A neighbour the peer trusts (same key folder); never started, only its keys.
    neighbour = peer_process(workdir, "feeder", "edge", listen="none", shared_keys=True)
    acknowledged = 0
    kills = 0
    for iteration in range(ITERATIONS):
        peer = make()
        peer.start()
        try:
            status_start = peer.wait_ready()
            held = entries(peer)
            assert held >= acknowledged, (
                f"kill {iteration}: {held} entries after restart, {acknowledged} acknowledged"
            )
            acknowledged = held
            bundle = status_start["bundle_id"]
            dim = feature_dim(status_start["cache_split"]["shape"][0])
            keys = peer_keys(neighbour, peer)
            stop = threading.Event()
            thread = threading.Thread(
                target=feeder, args=(address, keys, bundle, dim, stop, iteration), daemon=True
            )
            thread.start()
            deadline = time.monotonic() + rng.uniform(0.5, 2.5)
            while time.monotonic() < deadline:
                acknowledged = max(acknowledged, entries(peer))
                time.sleep(0.02)
            peer.kill()  # SIGKILL, mid-stream
            kills += 1
            stop.set()
            thread.join(5)
        finally:
            peer.stop()
    peer = make()
    peer.start()
    try:
        peer.wait_ready()
        final = entries(peer)
    finally:
        peer.stop()
    assert kills == ITERATIONS and acknowledged > 0
    assert final >= acknowledged
    assert not list(cache_dir.rglob("*.corrupt-*")), "a cache file was moved aside as corrupt"
    log = (workdir / "crash1.log").read_text()
    assert "is unusable" not in log
    print(f"{kills} kills, {acknowledged} entries acknowledged, {final} after the last restart")
