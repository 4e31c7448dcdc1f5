"""Two hosts on real interfaces: network namespaces joined by a bridge (root only).

The test makes the namespaces and removes them; traffic stays inside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ccied.bench.cluster import PeerProcess
from ccied.peer.client import Client

pytestmark = pytest.mark.slow

SUBNET = "10.77.{}.{}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root; this runner is not root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = uuid.uuid4().hex[:6]
    switch, h1, h2 = f"ccsw{tag}", f"cch1{tag}", f"cch2{tag}"
    net = int(tag[:2], 16) % 200 + 20  # a /24 of our own, away from .1
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", switch)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for index, host in ((1, h1), (2, h2)):
            _ip("netns", "add", host)
            made.append(host)
            _ip("-n", switch, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0",
                "netns", host)  # fmt: skip
            _ip("-n", switch, "link", "set", f"p{index}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{index}", "up")
            _ip("-n", host, "addr", "add", SUBNET.format(net, index) + "/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "link", "set", "lo", "up")
        yield h1, h2, SUBNET.format(net, 1), SUBNET.format(net, 2)
    finally:
        for namespace in reversed(made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def test_discovery_and_forwarding_across_real_interfaces(
    two_hosts: tuple[str, str, str, str], cat_pixels: np.ndarray
) -> None:
    h1, h2, ip1, ip2 = two_hosts
    folder = Path(tempfile.mkdtemp(prefix="ccied-", dir="/tmp"))
    service = f"_cct{uuid.uuid4().hex[:8]}._tcp.local."
    cloud = PeerProcess(
        "netcloud",
        "cloud",
        f"tcp://{ip1}:5601",
        folder / "netcloud.sock",
        log_path=folder / "netcloud.log",
        mdns_service_type=service,
        interface=ip1,
        prefix=["ip", "netns", "exec", h1],
    )
    # No --cloud: the edge in the other namespace finds the cloud over mDNS.
    edge = PeerProcess(
        "netcam",
        "edge",
        f"tcp://{ip2}:5602",
        folder / "netcam.sock",
        extra_args=["--slowdown", "4", "--no-cache"],
        log_path=folder / "netcam.log",
        mdns_service_type=service,
        interface=ip2,
        prefix=["ip", "netns", "exec", h2],
    )
    try:
        cloud.start()
        edge.start()
        cloud.wait_ready()
        edge.wait_ready()
        (neighbour,) = edge.wait_neighbours([f"tcp://{ip1}:5601"], timeout_s=15)
        assert neighbour["name"] == "netcloud" and neighbour["role"] == "cloud"
        with Client(edge.socket_path) as client:  # Unix sockets cross namespaces
            result = client.submit(cat_pixels, "cat")
        assert result.source == "cloud" and result.served_by == "netcloud"
        # A compressed payload crossed the bridge (on a link this fast the planner
        # sends the input itself, losslessly: 74 KB for this photo, not 150 KB raw).
        assert 1_000 < result.bytes_sent < 100_000
    finally:
        edge.stop()
        cloud.stop()
        shutil.rmtree(folder, ignore_errors=True)
