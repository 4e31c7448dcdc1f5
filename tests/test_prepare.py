"""`ccied prepare` end to end: a bundle folder from real frames, served by real peers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ccied.bench.cluster import PeerProcess, free_tcp_port, running
from ccied.peer.client import Client
from ccied.pruning.bundle import load_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(workdir: Path) -> Path:
    out = workdir / "bundle"
    done = subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", "prepare", "--split", "blocks.14",
         "--keep-ratio", "0.5", "--bits", "8", "--every", "20", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "blocks.14-k0.50-b8" in done.stdout and "agreement" in done.stdout
    return out


def test_prepare_writes_a_verified_bundle_with_measured_variants(prepared: Path) -> None:
    bundle = load_bundle(prepared)
    assert bundle.default_variant == "blocks.14-k0.50-b8"
    reduced = bundle.variant("blocks.14-k0.50-b8")
    assert reduced.agreement is not None and 0.0 <= reduced.agreement <= 1.0
    assert bundle.projections["blocks.14-k0.50-b8"].kept == 96  # half of 192 channels
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
        extra_args=[*common, "--cloud", address, "--variant", "blocks.14-k0.50-b8",
                    "--slowdown", "8"],
    )  # fmt: skip
    cloud.start()
    edge.start()
    try:
        cloud.wait_ready()
        status = edge.wait_ready()
        assert status["bundle"] == str(prepared)
        edge.wait_connected()
        promised = load_bundle(prepared).variant("blocks.14-k0.50-b8").bytes_per_frame
        assert promised is not None
        with Client(edge.socket_path) as client:
            results = [client.submit(p, f"f{i}") for i, p in enumerate(bikes_frames[:3])]
        for result in results:
            assert result.source == "cloud" and result.variant == "blocks.14-k0.50-b8"
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
