"""`ccied prepare` end to end: a bundle folder from real frames, served by real peers.

The bundle's operating point is a reduced transfer layer recovered by distillation
(``--recover``, a few steps: the test checks the plumbing, ``ccied bench transfer``
the figures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ccied.bench.cluster import PeerProcess, free_tcp_port, running
from ccied.peer.client import Client
from ccied.peer.wire import ErrorCode, ErrorReply, InferRequest, encode
from ccied.pruning.bundle import load_bundle, write_bundle
from ccied.pruning.recover import RecoveryConfig, distillation_set, recover
from peers import exchange, peer_keys

pytestmark = pytest.mark.slow

RECOVERED = "blocks.14-k0.50-b8-distilled"


@pytest.fixture(scope="module")
def prepared(workdir: Path) -> Path:
    out = workdir / "bundle"
    done = subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", "prepare", "--split", "blocks.14",
         "--keep-ratio", "0.5", "--bits", "8", "--every", "20", "--no-progress",
         "--recover", "--recover-steps", "4", "--augmentations", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert RECOVERED in done.stdout and "decisive" in done.stdout
    return out


def test_prepare_writes_a_verified_bundle_with_measured_variants(prepared: Path) -> None:
    bundle = load_bundle(prepared)
    assert bundle.default_variant == RECOVERED
    reduced = bundle.variant(RECOVERED)
    assert reduced.agreement is not None and 0.0 <= reduced.agreement <= 1.0
    assert reduced.agreement_decisive is not None and 0.0 <= reduced.agreement_decisive <= 1.0
    assert bundle.projections[RECOVERED].kept == 96  # half of 192 channels
    assert bundle.projections[RECOVERED].method == "distilled"
    # The figures of the report are those in the manifest, on both kinds of frames.
    rows = {row["name"]: row for row in bundle.figures["variants"]}
    assert rows[RECOVERED]["agreement_decisive"] == round(reduced.agreement_decisive, 4)
    assert rows[RECOVERED]["agreement_all"] == round(reduced.agreement, 4)
    assert reduced.bytes_per_frame is not None
    raw = bundle.variant("blocks.11-raw")
    assert raw.agreement == 1.0 and raw.bytes_per_frame == 192 * 7 * 7 * 4
    # One calibrated (or default) rule per key depth: the thumbnail, then the split.
    assert set(bundle.cache_rules) == {"thumb16", "blocks.4"}
    assert all("answer_floor" in rule for rule in bundle.cache_rules.values())


def test_peers_serving_the_bundle_send_what_it_promises(
    prepared: Path, workdir: Path, bikes_frames: list[np.ndarray]
) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    common = ["--model", str(prepared), "--no-cache"]
    cloud = PeerProcess("pcloud", "cloud", address, workdir / "pcloud.sock", extra_args=common)
    edge = PeerProcess(
        "pcam",
        "edge",
        "none",
        workdir / "pcam.sock",
        extra_args=[*common, "--cloud", address, "--variant", RECOVERED,
                    "--slowdown", "8"],
    )  # fmt: skip
    cloud.start()
    edge.start()
    try:
        cloud.wait_ready()
        status = edge.wait_ready()
        assert status["bundle"] == str(prepared)
        edge.wait_connected()
        promised = load_bundle(prepared).variant(RECOVERED).bytes_per_frame
        assert promised is not None
        with Client(edge.socket_path) as client:
            results = [client.submit(p, f"f{i}") for i, p in enumerate(bikes_frames[:3])]
        for result in results:
            assert result.source == "cloud" and result.variant == RECOVERED
            # The codec payload the bundle measured, give or take frame content,
            # plus the message header.
            assert 0.5 * promised < result.bytes_sent < 1.5 * promised + 400
    finally:
        edge.stop()
        cloud.stop()


def test_a_peer_with_another_bundle_is_never_used(
    prepared: Path, workdir: Path, cat_pixels: np.ndarray
) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    cloud = PeerProcess("ocloud", "cloud", address, workdir / "ocloud.sock")  # built-in bundle
    edge = PeerProcess(
        "ocam",
        "edge",
        "none",
        workdir / "ocam.sock",
        extra_args=["--model", str(prepared), "--cloud", address, "--slowdown", "8"],
    )
    # running() waits until the cloud is a live neighbour: alive, but with another bundle.
    with running([cloud, edge]), Client(edge.socket_path) as client:
        result = client.submit(cat_pixels, "cat")
        assert result.source == "local" and result.bytes_sent == 0


def test_peers_on_different_recovered_layers_refuse_each_others_tensors(
    prepared: Path, workdir: Path, cat_pixels: np.ndarray, bikes_frames: list[np.ndarray]
) -> None:
    # The same bundle but for the recovered layer: trained again with another seed.
    bundle = load_bundle(prepared)
    train = distillation_set(bundle.model, "blocks.14", bikes_frames[:4], augmentations=0)
    config = RecoveryConfig(split="blocks.14", channels=96, bits=8, steps=2, seed=1)
    other = recover(bundle.model, train, config, progress=False).projection
    other_folder = workdir / "other-bundle"
    other_id = write_bundle(
        other_folder,
        bundle.model,
        bundle.variants,
        bundle.default_variant,
        {**bundle.projections, RECOVERED: other},
        bundle.cache_split,
        bundle.cache_rules,
        bundle.figures,
    )
    assert other_id != bundle.bundle_id
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    cloud = PeerProcess(
        "rcloud", "cloud", address, workdir / "rcloud.sock", extra_args=["--model", str(prepared)]
    )
    edge = PeerProcess(
        "rcam",
        "edge",
        "none",
        workdir / "rcam.sock",
        extra_args=["--model", str(other_folder), "--cloud", address, "--variant", RECOVERED,
                    "--slowdown", "8", "--no-cache"],
    )  # fmt: skip
    with running([cloud, edge]), Client(edge.socket_path) as client:
        # The edge never sends its tensors to a cloud on the other layer...
        result = client.submit(cat_pixels, "cat")
        assert result.source == "local" and result.bytes_sent == 0
        # ...and the cloud refuses a tensor that says it comes from the other layer.
        tensor = np.zeros((1, 192, 7, 7), np.float32)
        request = InferRequest(
            request_id="other-layer",
            bundle_id=other_id,
            origin="rcam",
            variant="blocks.11-raw",
            encoding="raw",
            deadline_ms=1000,
            tensor=tensor,
        )
        reply = exchange(cloud.listen, encode(request), keys=peer_keys(edge, cloud))
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUNDLE_MISMATCH
        assert reply.request_id == "other-layer"
