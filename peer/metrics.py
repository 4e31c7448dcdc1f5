"""Prometheus metrics for ``ccied peer --metrics-port``.

Counters are not kept twice: at each scrape :class:`StatusCollector` turns one
snapshot of the daemon's status (the dict ``ccied status --json`` prints) into
metric families. The snapshot is taken on the daemon's event loop, where every
counter it reads is written, so the HTTP thread never reads state another
thread is changing (:func:`on_loop`). Only the latency histogram is observed as
requests are answered; prometheus_client's metrics are thread-safe.

Each daemon has its own :class:`~prometheus_client.CollectorRegistry`, never
the process-wide default one: several daemons (tests, benchmarks) can share a
process, and nothing else registered there leaks into a peer's page.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from ccied.discovery.logutil import WarnOnce
from ccied.peer.errors import PeerError
from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Where an answer was computed (ccied.peer.wire.Source), always exported, 0 or not.
SOURCES = ("cache", "local", "peer", "cloud")
# Submit to answer on this peer: a thumbnail cache hit takes about a millisecond,
# a miss on an emulated slow device seconds.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# How long a scrape waits for the daemon's loop before it serves the last snapshot.
SNAPSHOT_TIMEOUT_S = 2.0

Snapshot = Mapping[str, Any]


def _get(data: Snapshot, *path: str) -> Any:
    """``data[a][b]...``, or None where a level is missing."""
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class StatusCollector:
    """A prometheus_client collector that reads a daemon status snapshot at scrape time.

    ``snapshot`` returns the status dict; when it fails (the loop too busy to
    answer in time, or stopping), the last good snapshot is served instead, so
    a scrape never shows counters going backwards or vanishing.
    """

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot
        self._last: Snapshot = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Registering must not take a snapshot: the registry may be built on the loop.
        return []

    def _read(self) -> Snapshot:
        try:
            status = self._snapshot()
        except Exception as exc:  # a slow or stopping loop, or a bug: never a failed scrape
            warn_once(
                f"metrics-snapshot:{type(exc).__name__}",
                "metrics: serving the last status snapshot (%s: %s)",
                type(exc).__name__,
                exc,
            )
            with self._lock:
                return self._last
        with self._lock:
            self._last = status
        return status

    def collect(self) -> Iterator[Metric]:
        status = self._read()
        yield from _request_metrics(_get(status, "requests") or {})
        cache = _get(status, "cache") or {}
        if cache.get("enabled"):
            yield from _cache_metrics(cache)
        yield from _cluster_metrics(_get(status, "cluster") or {}, _get(status, "neighbours"))


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=_number(value))


def _request_metrics(requests: Snapshot) -> Iterator[Metric]:
    """Frames answered by source, and the requests refused or failed."""
    by_source = requests.get("by_source") or {}
    answers = CounterMetricFamily(
        "ccied_requests", "Frames answered, by where the answer was computed", labels=["source"]
    )
    for source in (*SOURCES, *sorted(set(by_source) - set(SOURCES))):
        answers.add_metric([source], _number(by_source.get(source, 0)))
    yield answers
    yield _counter(
        "ccied_request_errors",
        "Requests answered with an error (bad frame or tensor, internal error)",
        requests.get("errors"),
    )
    yield _counter(
        "ccied_busy", "Requests refused at once: max_pending in progress", requests.get("busy")
    )
    yield _counter(
        "ccied_failovers",
        "Targets that failed a miss, so the next was tried",
        requests.get("failovers"),
    )
    yield _counter(
        "ccied_protocol_errors", "Malformed messages received", requests.get("protocol_errors")
    )
    yield _counter(
        "ccied_handshakes_refused",
        "CURVE handshakes refused: the peer's key is not trusted here",
        requests.get("refused_handshakes"),
    )
    yield _counter(
        "ccied_served_for_peers",
        "Tails this peer ran for other peers' tensors",
        requests.get("served_for_peers"),
    )


def _cache_metrics(cache: Snapshot) -> Iterator[Metric]:
    """Hits by key depth, misses by reason, entries and the audit (a peer with a cache)."""
    hits = CounterMetricFamily(
        "ccied_cache_hits", "Frames the cache answered, by key depth", labels=["depth"]
    )
    by_depth = cache.get("hits_by_depth") or {}
    depths = [d.get("name") for d in cache.get("depths") or [] if isinstance(d, Mapping)]
    for depth in dict.fromkeys([*depths, *by_depth]):
        if isinstance(depth, str):
            hits.add_metric([depth], _number(by_depth.get(depth, 0)))
    yield hits
    misses = CounterMetricFamily(
        "ccied_cache_misses", "Frames the cache did not answer, by why", labels=["reason"]
    )
    for reason, count in sorted((cache.get("miss_reasons") or {}).items()):
        misses.add_metric([str(reason)], _number(count))
    yield misses
    yield _counter(
        "ccied_cache_skipped",
        "Frames whose deeper cache key the planner judged not worth its head time",
        cache.get("cache_skipped"),
    )
    yield GaugeMetricFamily(
        "ccied_cache_entries",
        "Entries in the cache, every key depth together",
        value=_number(cache.get("entries")),
    )
    audit = cache.get("audit") or {}
    yield _counter(
        "ccied_cache_audit_checked",
        "Cache hits re-checked by the full model",
        audit.get("checked"),
    )
    yield _counter(
        "ccied_cache_audit_wrong",
        "Audited cache hits the full model answered differently",
        audit.get("wrong"),
    )


def _cluster_metrics(cluster: Snapshot, neighbours: Any) -> Iterator[Metric]:
    """Bytes sent to other peers, live neighbours, and cache entries shared each way."""
    yield _counter(
        "ccied_bytes_sent",
        "Bytes of requests sent to other peers (tensors, heartbeats, cache entries)",
        cluster.get("bytes_sent"),
    )
    yield GaugeMetricFamily(
        "ccied_neighbours",
        "Live neighbour peers",
        value=len(neighbours) if isinstance(neighbours, list) else 0,
    )
    shared = CounterMetricFamily(
        "ccied_shared_entries",
        "Cache entries shared with neighbours (out) and taken from them (in)",
        labels=["direction"],
    )
    shared.add_metric(["in"], _number(cluster.get("shared_in")))
    shared.add_metric(["out"], _number(cluster.get("shared_out")))
    yield shared


def on_loop(
    loop: asyncio.AbstractEventLoop,
    read: Callable[[], Snapshot],
    timeout_s: float = SNAPSHOT_TIMEOUT_S,
) -> Callable[[], Snapshot]:
    """``read`` made callable from any thread: it runs on ``loop``, the caller waits."""

    async def call() -> Snapshot:
        return read()

    def snapshot() -> Snapshot:
        future = asyncio.run_coroutine_threadsafe(call(), loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    return snapshot


class PeerMetrics:
    """One daemon's registry, latency histogram and (once :meth:`serve`\\ d) HTTP server."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "ccied_request_latency_seconds",
            "Submit to answer on this peer, by where the answer was computed",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for source in SOURCES:
            self.latency.labels(source=source)
        self.registry.register(StatusCollector(snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def observe(self, source: str, seconds: float) -> None:
        """One frame answered (any thread)."""
        self.latency.labels(source=source).observe(seconds)

    def render(self) -> bytes:
        """The metrics page, in the Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> str:
        """Serve the page over HTTP from a daemon thread; returns its URL (port 0: a free one)."""
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PeerError(f"cannot serve metrics on {host}:{port}: {reason}") from exc
        bound = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}/metrics"
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
