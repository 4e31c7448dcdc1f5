"""Three real peers on loopback: mDNS discovery, liveness, failover, a shared cache.

Each peer is a separate ``ccied peer`` process; mDNS runs on 127.0.0.1 under a
service type of this test run's own, so other peers on the machine stay apart.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ccied.bench.cluster import PeerProcess, free_tcp_port, running
from ccied.peer.client import Client
from ccied.peer.wire import ErrorReply, InferResult, Submit, decode, encode
from peers import dealer, local_address, peer_process

pytestmark = pytest.mark.slow


def names(neighbours: list[dict[str, object]]) -> set[object]:
    return {n["name"] for n in neighbours}


def test_three_peers_find_each_other_and_a_killed_one_leaves_within_3_s(workdir: Path) -> None:
    service = f"_cct{uuid.uuid4().hex[:8]}._tcp.local."
    peers = [
        peer_process(workdir, "cloud7", "cloud", shared_keys=True, mdns_service_type=service),
        peer_process(workdir, "cam7", "edge", shared_keys=True, mdns_service_type=service),
        peer_process(workdir, "cam8", "edge", shared_keys=True, mdns_service_type=service),
    ]
    try:
        for peer in peers:
            peer.start()
        for peer in peers:
            peer.wait_ready()
        start = time.monotonic()  # discovery starts when a peer is ready
        for peer in peers:
            live = peer.wait_neighbours(count=2, timeout_s=10.0 - (time.monotonic() - start))
            assert names(live) == {p.name for p in peers} - {peer.name}
        found_s = time.monotonic() - start
        assert found_s < 10.0

        peers[2].kill()
        killed = time.monotonic()
        while any("cam8" in names(p.neighbours()) for p in peers[:2]):
            assert time.monotonic() - killed < 3.0, "a SIGKILLed peer stayed in the tables"
            time.sleep(0.05)
        # The survivors still see each other: no flapping from the death.
        assert names(peers[0].neighbours()) == {"cam7"}
        assert names(peers[1].neighbours()) == {"cloud7"}
    finally:
        for peer in peers:
            peer.stop()


def test_a_stream_survives_the_cloud_dying_midway_every_frame_answered_once(
    workdir: Path, bikes_frames: list[np.ndarray]
) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    cloud = PeerProcess("cloud9", "cloud", address, workdir / "cloud9.sock")
    edge = PeerProcess(
        "cam9",
        "edge",
        "none",
        workdir / "cam9.sock",
        extra_args=["--cloud", address, "--no-cache", "--slowdown", "4", "--remote-timeout-s", "1"],
    )
    # running() starts both, waits until ready and connected, and stops both.
    with running([cloud, edge]):
        sock = dealer()
        sock.connect(local_address(edge))
        frames = [bikes_frames[i % len(bikes_frames)] for i in range(16)]
        replies: Counter[str] = Counter()
        sources: list[str] = []
        for i, pixels in enumerate(frames):
            if i == 6:
                cloud.kill()
            # Two frames in flight at a time, as a camera streaming would have.
            sock.send_multipart(
                encode(Submit(request_id=f"f{i}", frame_name=str(i), pixels=pixels))
            )
            while sock.poll(0 if i % 2 == 0 and i < len(frames) - 1 else 30_000):
                reply = decode(sock.recv_multipart())
                assert not isinstance(reply, ErrorReply), reply
                assert isinstance(reply, InferResult)
                replies[reply.request_id] += 1
                sources.append(str(reply.source))
                if sum(replies.values()) == i + 1:
                    break
        while sum(replies.values()) < len(frames) and sock.poll(30_000):
            reply = decode(sock.recv_multipart())
            replies[reply.request_id] += 1
            sources.append(str(getattr(reply, "source", "error")))
        sock.close(linger=0)
        assert set(replies) == {f"f{i}" for i in range(len(frames))}, "a frame was lost"
        assert max(replies.values()) == 1, "a frame was answered twice"
        assert "cloud" in sources[:6] and sources[-1] == "local", sources


def test_an_entry_learned_at_one_peer_answers_at_another_and_a_late_peer_starts_warm(
    workdir: Path, bikes_frames: list[np.ndarray]
) -> None:
    service = f"_cct{uuid.uuid4().hex[:8]}._tcp.local."
    a = peer_process(workdir, "camA", "edge", shared_keys=True, mdns_service_type=service)
    b = peer_process(workdir, "camB", "edge", shared_keys=True, mdns_service_type=service)
    late = peer_process(workdir, "camC", "edge", shared_keys=True, mdns_service_type=service)
    try:
        for peer in (a, b):
            peer.start()
        for peer in (a, b):
            peer.wait_ready()
            peer.wait_neighbours(count=1, timeout_s=10)
        frame = bikes_frames[1]
        with Client(a.socket_path) as client:
            first = client.submit(frame, "seen-at-A")
        assert first.source != "cache"
        deadline = time.monotonic() + 10
        with Client(b.socket_path) as client:
            while client.status()["cache"]["entries"] < 1:
                assert time.monotonic() < deadline, "the entry never reached camB"
                time.sleep(0.1)
            again = client.submit(frame, "same-scene-at-B")
            assert again.source == "cache" and again.served_by == "camB"
            assert again.label == first.label
            assert client.status()["cluster"]["shared_in"] >= 1

        late.start()
        late.wait_ready()
        late.wait_neighbours(count=2, timeout_s=10)
        deadline = time.monotonic() + 10
        with Client(late.socket_path) as client:
            while client.status()["cache"]["entries"] < 1:
                assert time.monotonic() < deadline, "the late peer got no hot entries"
                time.sleep(0.1)
            assert client.submit(frame, "late").source == "cache"
    finally:
        for peer in (late, b, a):
            peer.stop()
