"""A real cloud peer (a ``ccied peer --role cloud`` process, CURVE on loopback) batches
the tensors that many edges send at once, and answers each as it would alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ccied.bench.cluster import PeerProcess, free_tcp_port, local_keys
from ccied.peer.client import Client
from ccied.peer.keys import KeyStore
from ccied.peer.wire import ErrorCode, ErrorReply, InferRequest, InferResult, decode, encode
from ccied.peer.worker import ModelWorker
from ccied.pruning.bundle import builtin_bundle
from peers import dealer

pytestmark = pytest.mark.slow

BURST = 24  # tensors sent at once: more than one batch's worth of waiting


@pytest.fixture(scope="module")
def cloud(workdir: Path) -> Iterator[PeerProcess]:
    peer = PeerProcess(
        name="bcloud",
        role="cloud",  # batching by default: nothing about it on the command line
        listen=f"tcp://127.0.0.1:{free_tcp_port()}",
        socket_path=workdir / "bcloud.sock",
        log_path=workdir / "bcloud.log",
        extra_args=["--no-cache", "--max-pending", "256"],
    )
    try:
        peer.start()
        peer.wait_ready()
        yield peer
    finally:
        peer.stop()


def test_a_cloud_answers_a_burst_of_tensors_in_batches_with_the_unbatched_labels(
    cloud: PeerProcess, bikes_frames: list[np.ndarray], cat_pixels: np.ndarray
) -> None:
    worker = ModelWorker(builtin_bundle())
    frames = [cat_pixels, *bikes_frames]
    requests: list[tuple[str, np.ndarray, str]] = []
    expected: dict[str, int] = {}

    async def heads_and_reference() -> None:
        for i in range(BURST):
            # Mostly the default variant, some JPEGs: two variants, two queues.
            variant = "jpeg-q90" if i % 6 == 5 else "blocks.11-b6"
            head = await worker.head(frames[i % len(frames)], variant, with_cache=False)
            assert head.payload is not None
            request_id = f"t{i}"
            requests.append((request_id, head.payload, variant))
            # The unbatched answer: this frame's tail alone, batch size 1.
            alone = await worker.tail(variant, head.payload, head.encoding)
            expected[request_id] = alone.label

    try:
        asyncio.run(heads_and_reference())
    finally:
        worker.close()
    with Client(cloud.socket_path) as client:
        status = client.status()
    batching = status["batching"]
    # A cloud on a CPU batches what queues while its model is busy, with no window.
    assert batching["enabled"] and batching["window_ms"] == 0.0 and batching["max_batch"] == 32
    assert status["device"] == "cpu" or status["device"].startswith("cuda")
    bundle = status["bundle_id"]

    state = KeyStore(local_keys(cloud.socket_path.parent).state_dir("bclient"))
    sock = dealer((state.load(), cloud.keys().load().public))
    garbage = np.frombuffer(uuid.uuid4().bytes * 4, np.uint8)
    try:
        sock.connect(cloud.listen)
        for request_id, payload, variant in [*requests[:12], ("bad", garbage, "x"), *requests[12:]]:
            sock.send_multipart(
                encode(
                    InferRequest(
                        request_id=request_id,
                        bundle_id=bundle,
                        origin="bclient",
                        variant="blocks.11-b6" if request_id == "bad" else variant,
                        encoding="jpeg" if variant == "jpeg-q90" else "codec",
                        deadline_ms=30_000,
                        tensor=payload,
                    )
                )
            )
        replies = {}
        while len(replies) < BURST + 1 and sock.poll(60_000):
            reply = decode(sock.recv_multipart())
            replies[reply.request_id] = reply
    finally:
        sock.close(linger=0)

    assert len(replies) == BURST + 1, "every tensor gets exactly one answer"
    bad = replies.pop("bad")
    assert isinstance(bad, ErrorReply) and bad.code is ErrorCode.BAD_TENSOR
    for request_id, reply in replies.items():
        assert isinstance(reply, InferResult), reply
        assert reply.label == expected[request_id], request_id
        assert reply.served_ms >= reply.tail_ms > 0
    with Client(cloud.socket_path) as client:
        after = client.status()["batching"]
    sizes = {int(size): count for size, count in after["batch_sizes"].items()}
    # The undecodable payload passed the cheap checks, joined a batch and failed alone in it.
    assert sum(size * count for size, count in sizes.items()) == BURST + 1
    assert after["failed"] == 1
    assert max(sizes) > 1, f"the burst ran one by one: {sizes}"
