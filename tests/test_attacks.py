"""The attacks and misuses that once got through, re-run against a running cluster.

A trusted pair (a cloud and a camera, CurveZMQ, each its own state folder) runs
for the whole module. Each test attacks or misuses it the way it was done when
the defects were found, checks the attack is refused with a clear one-line
error, and then checks the camera still gets its frames answered by the cloud:
nothing an attacker does stops the service for trusted clients.

Attacks with a real-peer test of their own elsewhere: a flipped byte in the
cache log (tests/test_cache_recovery.py), a read-only cache folder
(tests/test_cache_readonly_daemon.py), decompression bombs, 5000x5000 and
16-bit images (tests/test_submit_images.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from ccied.bench.cluster import PeerProcess
from ccied.peer.client import Client
from ccied.peer.wire import StatusReply, StatusRequest, encode
from ccied.pruning import load_model
from ccied.pruning.bundle import BUILTIN_VARIANTS, write_bundle
from peers import peer_keys, peer_process, raw_request

pytestmark = pytest.mark.slow

CCIED = [sys.executable, "-m", "ccied.peer.cli"]
FLOOD_HANDSHAKES = 300


@pytest.fixture(scope="module")
def pair(workdir: Path) -> Iterator[tuple[PeerProcess, PeerProcess]]:
    cloud = peer_process(workdir, "cloud", "cloud")
    cam = peer_process(
        workdir, "cam", "edge", "--cloud", cloud.listen, "--no-cache", "--slowdown", "4"
    )
    for p in (cloud, cam):
        p.keys().generate(p.name)
    cloud.keys().trust(cam.keys().load().public, cam.name)
    cam.keys().trust(cloud.keys().load().public, cloud.name)
    cloud.start()
    cam.start()
    try:
        cloud.wait_ready()
        cam.wait_ready()
        cam.wait_connected(timeout_s=30)
        yield cloud, cam
    finally:
        cam.stop()
        cloud.stop()


def still_serving(cam: PeerProcess, pixels: np.ndarray) -> None:
    """The trusted camera's frame is answered by the cloud, as before the attack."""
    with Client(cam.socket_path, timeout_s=30) as client:
        assert client.submit(pixels, "after-attack").source == "cloud"


def one_line_refusal(args: list[str], expected: str, cwd: Path) -> None:
    done = subprocess.run([*CCIED, *args], capture_output=True, text=True, timeout=90, cwd=cwd)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # Log lines (timestamped) may come first; the refusal itself is one line.
    lines = [line for line in done.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1 and expected in lines[0], done.stderr


def test_a_config_file_cannot_turn_authentication_off_by_a_string(
    pair: tuple[PeerProcess, PeerProcess], workdir: Path, cat_pixels: np.ndarray
) -> None:
    _, cam = pair
    config = workdir / "attack.toml"
    config.write_text('insecure = "false"\nlisten = "tcp://127.0.0.1:0"\n')
    one_line_refusal(
        ["peer", "--config", str(config), "--socket", str(workdir / "x1.sock")],
        "insecure (--insecure) must be true or false",
        workdir,
    )
    config.write_text("listen = 5\n")  # once hung the peer
    one_line_refusal(
        ["peer", "--config", str(config)], "listen (--listen) must be a string", workdir
    )
    still_serving(cam, cat_pixels)


def test_a_malformed_key_is_refused_and_a_bad_trusted_file_does_not_stop_authentication(
    pair: tuple[PeerProcess, PeerProcess], cat_pixels: np.ndarray
) -> None:
    cloud, cam = pair
    bad = "#" * 40  # in the Z85 alphabet, but decodes above 2**32 - 1
    one_line_refusal(
        ["keys", "--state-dir", str(cloud.state_dir), "trust", bad], "not valid Z85", Path("/")
    )
    one_line_refusal(
        ["peer", f"--cloud={bad}@{cloud.listen}", "--socket", "none"], "not valid Z85", Path("/")
    )
    bad_file = cloud.keys().trusted_dir / "planted.key"
    bad_file.write_text(f'curve\n    public-key = "{bad}"\n')
    try:
        still_serving(cam, cat_pixels)  # the ZAP handler lives on
    finally:
        bad_file.unlink()
    still_serving(cam, cat_pixels)


def test_names_ports_and_addresses_are_checked_before_anything_starts(
    pair: tuple[PeerProcess, PeerProcess], workdir: Path, cat_pixels: np.ndarray
) -> None:
    _, cam = pair
    sock = ["--socket", str(workdir / "x2.sock")]
    one_line_refusal(["peer", "--name", "../../evil"], "peer name '../../evil'", workdir)
    one_line_refusal(["peer", "--name", "cam\nforged"], "peer name", workdir)
    one_line_refusal(["peer", *sock, "--listen", "tcp://127.0.0.1:70000"], "port", workdir)
    one_line_refusal(["peer", *sock, "--cloud", "127.0.0.1:5601"], "tcp://HOST:PORT", workdir)
    still_serving(cam, cat_pixels)


def test_a_socket_folder_someone_else_owns_is_refused(
    pair: tuple[PeerProcess, PeerProcess], workdir: Path, cat_pixels: np.ndarray
) -> None:
    _, cam = pair
    folder = workdir / "taken"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)  # made first by someone else, for everyone
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        expected = "belongs to uid 65534"
    else:
        expected = "must be 0700"
    args = ["peer", "--insecure", "--no-discovery", "--listen", "none"]
    one_line_refusal([*args, "--socket", str(folder / "p.sock")], expected, workdir)
    assert not (folder / "p.sock").exists()
    still_serving(cam, cat_pixels)


def test_a_handshake_flood_costs_a_few_log_lines_and_is_counted(
    pair: tuple[PeerProcess, PeerProcess], cat_pixels: np.ndarray
) -> None:
    cloud, cam = pair
    server_key = cloud.keys().load().public
    context = zmq.Context()
    sockets = []
    try:
        for _ in range(FLOOD_HANDSHAKES):  # each a fresh, untrusted key
            public, secret = zmq.curve_keypair()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_key.encode()
            sock.connect(cloud.listen)
            sock.send_multipart(encode(StatusRequest(request_id="flood")))
            sockets.append(sock)
        deadline = time.monotonic() + 30
        refused = 0
        while time.monotonic() < deadline:
            reply = raw_request(cloud.listen, StatusRequest(request_id="s"), peer_keys(cam, cloud))
            assert isinstance(reply, StatusReply)
            refused = reply.status["requests"]["refused_handshakes"]
            if refused >= FLOOD_HANDSHAKES:
                break
            time.sleep(0.5)
        assert refused >= FLOOD_HANDSHAKES
        assert all(not s.poll(0) for s in sockets)  # none of them got an answer
    finally:
        for s in sockets:
            s.close(linger=0)
        context.term()
    log_lines = [
        line
        for line in cloud.log_path.read_text().splitlines()  # type: ignore[union-attr]
        if "refused a peer with untrusted key" in line and "WARNING" in line
    ]
    assert len(log_lines) <= 6, len(log_lines)  # was one line per handshake
    assert reply.status["suppressed_warnings"]["zap-denied"] >= FLOOD_HANDSHAKES - 6
    still_serving(cam, cat_pixels)


def test_a_cloud_with_another_bundle_is_named_in_the_log_and_in_status(
    workdir: Path, cat_pixels: np.ndarray
) -> None:
    bundle = workdir / "other-bundle"
    model = load_model()
    write_bundle(bundle, model, BUILTIN_VARIANTS[:2], BUILTIN_VARIANTS[0].name, {})
    other = peer_process(workdir, "cloud-other", "cloud", "--model", str(bundle), "--insecure")
    cam = peer_process(workdir, "cam-other", "edge", "--cloud", other.listen, "--insecure")
    other.start()
    cam.start()
    try:
        other.wait_ready()
        cam.wait_ready()
        deadline = time.monotonic() + 20
        warnings: list[str] = []
        while not warnings and time.monotonic() < deadline:
            with Client(cam.socket_path) as client:
                warnings = client.status()["warnings"]
            time.sleep(0.5)
        assert warnings and "runs bundle" in warnings[0] and "cloud-other" in warnings[0]
        with Client(cam.socket_path) as client:
            assert client.submit(cat_pixels, "x").source == "local"
        log_text = cam.log_path.read_text()  # type: ignore[union-attr]
        assert log_text.count("runs bundle") == 1, log_text
    finally:
        cam.stop()
        other.stop()
