"""Prometheus metrics (`ccied peer --metrics-port`): the collector, the server, a real peer."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ccied import Client
from ccied.bench.cluster import PeerProcess, free_tcp_port
from ccied.peer.cli import build_parser
from ccied.peer.config import peer_config
from ccied.peer.errors import PeerError
from ccied.peer.metrics import SOURCES, PeerMetrics, StatusCollector, on_loop
from peers import dealer, peer_process, random_keypair
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# A status snapshot shaped like PeerDaemon.status() (only what the metrics read).
FAKE_STATUS: dict[str, Any] = {
    "requests": {
        "by_source": {"cache": 5, "local": 3, "peer": 2, "cloud": 1},
        "errors": 4,
        "busy": 6,
        "failovers": 7,
        "protocol_errors": 8,
        "refused_handshakes": 9,
        "served_for_peers": 10,
    },
    "cache": {
        "enabled": True,
        "entries": 42,
        "cache_skipped": 11,
        "hits_by_depth": {"thumb16": 4},
        "miss_reasons": {"empty": 1, "not_decisive": 5},
        "depths": [{"name": "thumb16"}, {"name": "blocks.4"}],
        "audit": {"checked": 12, "wrong": 1},
    },
    "cluster": {"bytes_sent": 12345, "shared_in": 13, "shared_out": 14},
    "neighbours": [{"name": "a"}, {"name": "b"}],
}


Page = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Page:
    """Every sample of a metrics page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(page: Page, name: str, **labels: str) -> float:
    return page[(name, tuple(sorted(labels.items())))]


def scrape(url: str) -> Page:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return samples(response.read().decode())


def test_collector_turns_a_status_snapshot_into_prometheus_families() -> None:
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: FAKE_STATUS))
    page = samples(generate_latest(registry).decode())
    assert value(page, "ccied_requests_total", source="cache") == 5
    assert value(page, "ccied_requests_total", source="cloud") == 1
    for name, expected in [
        ("ccied_request_errors_total", 4),
        ("ccied_busy_total", 6),
        ("ccied_failovers_total", 7),
        ("ccied_protocol_errors_total", 8),
        ("ccied_handshakes_refused_total", 9),
        ("ccied_served_for_peers_total", 10),
        ("ccied_cache_skipped_total", 11),
        ("ccied_cache_entries", 42),
        ("ccied_cache_audit_checked_total", 12),
        ("ccied_cache_audit_wrong_total", 1),
        ("ccied_bytes_sent_total", 12345),
        ("ccied_neighbours", 2),
    ]:
        assert value(page, name) == expected, name
    # Every key depth is exported, a depth without hits as 0.
    assert value(page, "ccied_cache_hits_total", depth="thumb16") == 4
    assert value(page, "ccied_cache_hits_total", depth="blocks.4") == 0
    assert value(page, "ccied_cache_misses_total", reason="not_decisive") == 5
    assert value(page, "ccied_shared_entries_total", direction="in") == 13
    assert value(page, "ccied_shared_entries_total", direction="out") == 14


def test_collector_without_a_cache_and_with_a_failing_snapshot() -> None:
    calls = iter([{"cache": {"enabled": False}, "requests": {"by_source": {"local": 2}}}])

    def snapshot() -> dict[str, Any]:
        try:
            return next(calls)
        except StopIteration:
            raise TimeoutError("the loop did not answer") from None

    registry = CollectorRegistry()
    registry.register(StatusCollector(snapshot))
    first = samples(generate_latest(registry).decode())
    assert not any(name.startswith("ccied_cache_") for name, _ in first)
    assert value(first, "ccied_requests_total", source="local") == 2
    assert value(first, "ccied_requests_total", source="peer") == 0
    # A snapshot that fails serves the last good one, never a failed scrape.
    assert samples(generate_latest(registry).decode()) == first


def test_on_loop_reads_on_the_loop_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        read = on_loop(loop, lambda: {"thread": threading.get_ident()})
        assert read()["thread"] == thread.ident
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_metrics_server_serves_its_own_registry_and_refuses_a_taken_port() -> None:
    metrics = PeerMetrics(lambda: FAKE_STATUS)
    metrics.observe("cache", 0.0015)
    metrics.observe("local", 0.3)
    url = metrics.serve("127.0.0.1", 0)
    try:
        page = scrape(url)
        assert value(page, "ccied_request_latency_seconds_count", source="cache") == 1
        assert value(page, "ccied_request_latency_seconds_bucket", source="cache", le="0.002") == 1
        assert value(page, "ccied_request_latency_seconds_bucket", source="local", le="0.2") == 0
        assert value(page, "ccied_request_latency_seconds_count", source="peer") == 0
        assert value(page, "ccied_requests_total", source="cache") == 5
        # Nothing from the process-wide default registry (python_gc_*, process_*).
        assert not any(name.startswith(("python_", "process_")) for name, _ in page)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(PeerError, match=rf"cannot serve metrics on 127.0.0.1:{port}: "):
            PeerMetrics(lambda: FAKE_STATUS).serve("127.0.0.1", port)
    finally:
        metrics.close()


@pytest.mark.parametrize("port", ["0", "70000"])
def test_metrics_port_out_of_range_is_a_one_line_error(port: str) -> None:
    args = build_parser().parse_args(["peer", "--metrics-port", port])
    with pytest.raises(PeerError, match="metrics_port"):
        peer_config(args)


def test_metrics_options_reach_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(["peer", "--name", "m", "--metrics-port", "9464"])
    config = peer_config(args)
    assert (config.metrics_port, config.metrics_host) == (9464, "127.0.0.1")
    file = tmp_path / "peer.toml"
    file.write_text('metrics_port = 9500\nmetrics_host = "0.0.0.0"\n')
    config = peer_config(build_parser().parse_args(["peer", "--name", "m", "--config", str(file)]))
    assert (config.metrics_port, config.metrics_host) == (9500, "0.0.0.0")
    assert peer_config(build_parser().parse_args(["peer", "--name", "m"])).metrics_port is None


@pytest.fixture(scope="module")
def metrics_peer(workdir: Path) -> Iterator[tuple[PeerProcess, str]]:
    port = free_tcp_port()
    peer = peer_process(
        workdir, "metered", "edge", "--metrics-port", str(port), listen="tcp://127.0.0.1:*"
    )
    peer.start()
    try:
        peer.wait_ready()
        yield peer, f"http://127.0.0.1:{port}/metrics"
    finally:
        peer.stop()


@pytest.mark.slow
def test_a_real_peer_counts_the_frames_it_answers(
    metrics_peer: tuple[PeerProcess, str], cat_pixels: np.ndarray, bikes_frames: list[np.ndarray]
) -> None:
    peer, url = metrics_peer
    frames = [cat_pixels, bikes_frames[0], cat_pixels]
    with Client(peer.socket_path, timeout_s=60) as client:
        results = [client.submit(f, frame_name=f"f{i}") for i, f in enumerate(frames)]
        status = client.status()
    assert status["metrics"] == url
    page = scrape(url)
    for source in SOURCES:
        answered = sum(r.source == source for r in results)
        assert value(page, "ccied_requests_total", source=source) == answered, source
        assert value(page, "ccied_request_latency_seconds_count", source=source) == answered
    assert sum(value(page, "ccied_request_latency_seconds_count", source=s) for s in SOURCES) == 3
    # Latency on the peer is at most what the client measured end to end.
    total_s = sum(value(page, "ccied_request_latency_seconds_sum", source=s) for s in SOURCES)
    assert 0 < total_s <= sum(r.latency_ms for r in results) / 1e3
    assert value(page, "ccied_request_errors_total") == 0
    assert value(page, "ccied_busy_total") == 0
    cache = status["cache"]
    assert value(page, "ccied_cache_entries") == cache["entries"]
    hits = sum(v for (name, _), v in page.items() if name == "ccied_cache_hits_total")
    misses = sum(v for (name, _), v in page.items() if name == "ccied_cache_misses_total")
    assert hits == cache["hits"] == sum(r.source == "cache" for r in results)
    assert hits + misses == 3


@pytest.mark.slow
def test_a_real_peer_counts_refused_handshakes(metrics_peer: tuple[PeerProcess, str]) -> None:
    """A CURVE client whose key the peer does not trust is refused by ZAP, and counted."""
    peer, url = metrics_peer
    with Client(peer.socket_path) as client:
        status = client.status()
    before = value(scrape(url), "ccied_handshakes_refused_total")
    sock = dealer((random_keypair(), status["security"]["public_key"]))
    try:
        sock.connect(status["listen"])  # the handshake alone asks ZAP
        deadline = time.monotonic() + 10
        while value(scrape(url), "ccied_handshakes_refused_total") < before + 1:
            assert time.monotonic() < deadline, "the refused handshake was not counted"
            time.sleep(0.2)
    finally:
        sock.close(linger=0)


@pytest.mark.slow
def test_a_taken_metrics_port_is_a_one_line_error() -> None:
    folder = Path(tempfile.mkdtemp(prefix="ccied-", dir="/tmp"))
    folder.chmod(0o700)
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ccied.peer.cli", "peer", "--name", "clash",
             "--listen", "none", "--socket", str(folder / "clash.sock"), "--no-discovery",
             "--insecure", "--threads", "1", "--log-level", "ERROR",
             "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        taken.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"ccied peer: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "in use" in lines[-1]
