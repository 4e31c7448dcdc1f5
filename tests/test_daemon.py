"""Real daemons on loopback: edge -> cloud split inference, fallback, bad input, shutdown.

Every peer here is a separate ``ccied peer`` process with real ZeroMQ sockets.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port
from ccied.peer.client import Client
from ccied.peer.errors import RequestFailedError
from ccied.peer.wire import (
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    StatusRequest,
    Submit,
    decode,
    encode,
)
from ccied.pruning import StagedModel, preprocess
from peers import dealer, exchange, local_address, peer_keys, peer_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[tuple[PeerProcess, PeerProcess]]:
    cloud = peer_process(workdir, "cloud1", "cloud", shared_keys=True)
    # Routing tests: without the cache every frame crosses the network, and
    # an edge emulated 4x slower than the cloud (a phone) offloads its tail.
    # The raw float32 variant: answers equal the full model's, bit for bit.
    routing = ["--no-cache", "--slowdown", "4", "--variant", "blocks.11-raw"]
    edge = peer_process(
        workdir, "cam1", "edge", "--cloud", cloud.listen, *routing, shared_keys=True
    )
    try:
        cloud.start()
        edge.start()
        cloud.wait_ready()
        edge.wait_ready()
        yield cloud, edge
    finally:
        edge.stop()
        cloud.stop()


def full_model_label(model: StagedModel, pixels: np.ndarray) -> int:
    with torch.inference_mode():
        return int(model.full()(preprocess(pixels, model.spec)).argmax())


def test_a_real_frame_goes_edge_to_cloud_and_back_with_the_full_model_label(
    cluster: tuple[PeerProcess, PeerProcess],
    model: StagedModel,
    cat_pixels: np.ndarray,
    bikes_frames: list[np.ndarray],
) -> None:
    _, edge = cluster
    edge.wait_connected()
    with Client(edge.socket_path) as client:
        for name, pixels in [("cat.png", cat_pixels), ("bikes#0", bikes_frames[0])]:
            result = client.submit(pixels, name)
            assert result.frame == name
            assert result.source == "cloud" and result.served_by == "cloud1"
            assert result.label == full_model_label(model, pixels)
            assert result.class_name == model.spec.class_names[result.label]
            # The 192x7x7 float32 tensor crossed the network, plus a small header.
            assert 192 * 7 * 7 * 4 < result.bytes_sent < 192 * 7 * 7 * 4 + 1024
            assert 0 < result.confidence <= 1 and result.latency_ms > 0
        status = client.status()
    assert status["requests"]["by_source"]["cloud"] >= 2
    assert status["cluster"]["sent_to"]["cloud1"] >= 2
    (neighbour,) = status["neighbours"]
    assert neighbour["name"] == "cloud1" and neighbour["role"] == "cloud"
    assert neighbour["rtt_ms"] > 0 and neighbour["last_seen_s"] < 2


def test_garbage_on_both_sockets_does_not_stop_either_peer(
    cluster: tuple[PeerProcess, PeerProcess], cat_pixels: np.ndarray
) -> None:
    cloud, edge = cluster
    rng = np.random.default_rng(7)
    targets = [(cloud.listen, peer_keys(edge, cloud)), (local_address(edge), None)]
    for target, keys in targets:
        for size in (0, 1, 17, 4096):
            reply = exchange(target, [rng.bytes(size)], keys=keys)
            assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.PROTOCOL
        # Valid header, lying about the tensor size.
        frames = encode(Submit(request_id="x1", frame_name="f", pixels=cat_pixels))
        reply = exchange(target, [frames[0], frames[1][:-1]], keys=keys)
        assert isinstance(reply, ErrorReply) and reply.request_id == "x1"
    # Bytes that are not even ZMTP, straight on the TCP port.
    host, port = cloud.listen.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + rng.bytes(10_000))
    with Client(edge.socket_path) as client:
        assert client.submit(cat_pixels, "after-garbage").source == "cloud"
        assert client.status()["requests"]["protocol_errors"] >= 5


def test_wrong_frames_get_clear_errors_and_the_peer_keeps_serving(
    cluster: tuple[PeerProcess, PeerProcess], cat_pixels: np.ndarray
) -> None:
    _, edge = cluster
    with Client(edge.socket_path) as client:
        for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32)):
            with pytest.raises(RequestFailedError, match="bad_frame") as caught:
                client.submit(bad, "bad")
            assert caught.value.code == "bad_frame"
        assert client.submit(cat_pixels, "good").label >= 0


def test_the_cloud_refuses_another_bundle_and_tensors_of_the_wrong_shape(
    cluster: tuple[PeerProcess, PeerProcess],
) -> None:
    cloud, edge = cluster
    with Client(edge.socket_path) as client:
        bundle = client.status()["bundle_id"]

    def infer(bundle_id: str, tensor: np.ndarray) -> Message:
        request = InferRequest(
            request_id=uuid.uuid4().hex,
            bundle_id=bundle_id,
            origin="intruder",
            variant="blocks.11-raw",
            encoding="raw",
            deadline_ms=1000,
            tensor=tensor,
        )
        return exchange(cloud.listen, encode(request), keys=peer_keys(edge, cloud))

    good = np.zeros((1, 192, 7, 7), np.float32)
    reply = infer("0123456789abcdef", good)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUNDLE_MISMATCH
    for bad in (
        np.zeros((1, 40, 28, 28), np.float32),
        np.zeros((1, 192, 7, 7), np.float16),
        np.full((1, 192, 7, 7), np.nan, np.float32),
    ):
        reply = infer(bundle, bad)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_TENSOR, reply
    assert isinstance(infer(bundle, good), InferResult)
    # Tensors are for the peer socket, frames for the local socket only.
    reply = exchange(local_address(edge), encode(
        InferRequest(request_id="r", bundle_id=bundle, origin="x", variant="blocks.11-raw",
                     encoding="raw", deadline_ms=1, tensor=good)
    ))  # fmt: skip
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNSUPPORTED


def test_status_is_served_on_the_peer_socket(cluster: tuple[PeerProcess, PeerProcess]) -> None:
    cloud, edge = cluster
    reply = exchange(
        cloud.listen, encode(StatusRequest(request_id="s1")), keys=peer_keys(edge, cloud)
    )
    assert reply.request_id == "s1" and reply.bundle_id


def test_a_full_queue_answers_busy_at_once(workdir: Path, cat_pixels: np.ndarray) -> None:
    edge = PeerProcess(
        name="busy1",
        role="edge",
        listen="none",
        socket_path=workdir / "busy1.sock",
        extra_args=["--max-pending", "1"],
        log_path=workdir / "busy1.log",
    )
    edge.start()
    try:
        edge.wait_ready()
        sock = dealer()
        sock.connect(local_address(edge))
        for i in range(8):
            sock.send_multipart(
                encode(Submit(request_id=f"q{i}", frame_name="f", pixels=cat_pixels))
            )
        replies = []
        while len(replies) < 8 and sock.poll(20_000):
            replies.append(decode(sock.recv_multipart()))
        sock.close(linger=0)
        assert len(replies) == 8, "every request gets exactly one answer"
        busy = [r for r in replies if isinstance(r, ErrorReply) and r.code is ErrorCode.BUSY]
        answered = [r for r in replies if isinstance(r, InferResult)]
        assert busy and answered and len(busy) + len(answered) == 8
        assert sorted(r.request_id for r in replies) == [f"q{i}" for i in range(8)]
    finally:
        edge.stop()


def test_the_edge_answers_by_itself_when_the_cloud_is_down(
    workdir: Path, model: StagedModel, cat_pixels: np.ndarray
) -> None:
    dead_cloud = f"tcp://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    edge = PeerProcess(
        name="alone1",
        role="edge",
        listen="none",
        socket_path=workdir / "alone1.sock",
        extra_args=["--cloud", dead_cloud, "--remote-timeout-s", "1"],
        log_path=workdir / "alone1.log",
    )
    edge.start()
    try:
        edge.wait_ready()
        with Client(edge.socket_path) as client:
            start = time.monotonic()
            result = client.submit(cat_pixels, "cat")
            # Not connected: the edge does not wait out the deadline.
            assert time.monotonic() - start < 1.0
            assert result.source == "local" and result.served_by == "alone1"
            assert result.label == full_model_label(model, cat_pixels)
            assert result.bytes_sent == 0
            status = client.status()
            # A target that never answered a heartbeat is not even tried.
            assert status["neighbours"] == [] and status["requests"]["failovers"] == 0
    finally:
        assert edge.stop() == 0


def test_the_edge_fails_over_when_the_cloud_dies_and_returns_when_it_is_back(
    workdir: Path, cat_pixels: np.ndarray
) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    cloud = PeerProcess("cloud2", "cloud", address, workdir / "cloud2.sock")
    edge = PeerProcess(
        "cam2",
        "edge",
        "none",
        workdir / "cam2.sock",
        extra_args=["--cloud", address, "--remote-timeout-s", "1", "--no-cache", "--slowdown", "4"],
    )
    cloud.start()
    edge.start()
    try:
        cloud.wait_ready()
        edge.wait_ready()
        edge.wait_connected()
        with Client(edge.socket_path) as client:
            assert client.submit(cat_pixels, "a").source == "cloud"
            cloud.kill()
            assert client.submit(cat_pixels, "b").source == "local"
            cloud = PeerProcess("cloud2", "cloud", address, workdir / "cloud2.sock")
            cloud.start()
            cloud.wait_ready()
            edge.wait_connected()
            assert client.submit(cat_pixels, "c").source == "cloud"
    finally:
        edge.stop()
        cloud.stop()


def test_sigterm_stops_cleanly_and_removes_the_socket(workdir: Path) -> None:
    edge = PeerProcess("term1", "edge", "none", workdir / "term1.sock")
    edge.start()
    status = edge.wait_ready()
    assert status["name"] == "term1"
    assert (edge.socket_path.stat().st_mode & 0o777) == 0o600
    assert edge.stop() == 0
    assert not edge.socket_path.exists()


def test_unknown_variants_and_undecodable_payloads_are_refused(
    cluster: tuple[PeerProcess, PeerProcess],
) -> None:
    cloud, edge = cluster
    with Client(edge.socket_path) as client:
        bundle = client.status()["bundle_id"]

    def infer(variant: str, encoding: str, tensor: np.ndarray) -> Message:
        request = InferRequest(
            request_id=uuid.uuid4().hex,
            bundle_id=bundle,
            origin="fuzzer",
            variant=variant,
            encoding=encoding,
            deadline_ms=1000,
            tensor=tensor,
        )
        return exchange(cloud.listen, encode(request), keys=peer_keys(edge, cloud))

    garbage = np.frombuffer(b"CCTC" + bytes(60), dtype=np.uint8)
    for variant, encoding, tensor in [
        ("blocks.99-b4", "codec", garbage),
        ("blocks.14-b4", "raw", np.zeros((1, 192, 7, 7), np.float32)),
        ("blocks.14-b4", "codec", garbage),
        ("blocks.14-b4", "codec", np.zeros((3, 4), np.uint8)),
    ]:
        reply = infer(variant, encoding, tensor)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_TENSOR, reply


def test_the_planner_picks_the_variant_by_bandwidth_and_sends_what_it_promises(
    workdir: Path, model: StagedModel, bikes_frames: list[np.ndarray]
) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    cloud = PeerProcess("cloud5", "cloud", address, workdir / "cloud5.sock")
    cloud.start()
    edges = {
        mbps: PeerProcess(
            f"cam5-{mbps}",
            "edge",
            "none",
            workdir / f"cam5-{mbps}.sock",
            extra_args=["--cloud", address, "--no-cache", "--slowdown", "4", "--link-mbps", mbps],
        )
        for mbps in ("0.2", "1000")
    }
    try:
        cloud.wait_ready()
        chosen = {}
        for mbps, edge in edges.items():
            edge.start()
            edge.wait_ready()
            edge.wait_connected()
            with Client(edge.socket_path) as client:
                results = [client.submit(p, f"f{i}") for i, p in enumerate(bikes_frames[:3])]
                variants = {v["name"]: v for v in client.status()["variants"]}
            chosen[mbps] = {r.variant for r in results}
            for result, pixels in zip(results, bikes_frames[:3], strict=True):
                variant = variants[result.variant]
                if result.source == "cloud":
                    # The payload the bundle promises (a median: a lossless image
                    # varies more with the scene), plus a small header.
                    spread = 2.0 if result.variant == "lossless" else 1.5
                    assert result.bytes_sent < variant["payload_bytes"] * spread + 400
                    assert (
                        result.label == full_model_label(model, pixels)
                        or variant["agreement"] < 1.0
                    )
            edge.stop()
        # A slow uplink favours the smaller payload at the later split (above the
        # fidelity floor); a fast one an earlier split or the input itself,
        # losslessly, moving work off the slow edge (the two are close there, and
        # the cloud's measured tail time decides from frame to frame).
        assert chosen["0.2"] == {"blocks.11-b6"}
        assert chosen["1000"] and chosen["1000"] <= {"lossless", "blocks.7-b8"}
    finally:
        for edge in edges.values():
            edge.stop()
        cloud.stop()
