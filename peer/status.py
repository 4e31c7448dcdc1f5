"""What ``ccied status`` shows: a peer's identity, bundle, neighbours, cache and counters.

One function reads the running peer's parts and returns the JSON-ready
mapping that ``ccied status --json`` prints, ``peer/status_view.py`` renders
as a table and ``peer/metrics.py`` turns into Prometheus metrics. It only
reads; nothing here changes the peer.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ccied.discovery.logutil import suppressed_warnings
from ccied.peer.device import device_name
from ccied.peer.wire import WIRE_VERSION

if TYPE_CHECKING:
    from ccied.peer.daemon import PeerDaemon


def peer_status(peer: PeerDaemon) -> dict[str, Any]:
    """Identity, bundle, targets and counters, as ``ccied status --json`` prints."""
    c = peer.counters  # requests: every counter (by_source, failovers, busy, ...) as is
    point = peer.worker.cache_point
    socket_path = peer.server.socket_path if peer.server is not None else None
    return {
        "name": peer.config.name,
        "role": str(peer.config.role),
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - peer.started, 3),
        "wire_version": WIRE_VERSION,
        "bundle_id": peer.bundle_id,
        "model": peer.bundle.model.spec.name,
        "bundle": str(peer.bundle.path) if peer.bundle.path else "built-in",
        "cache_split": {
            "name": point.name,
            "shape": list(point.output_shape),
            "float32_bytes": point.float32_bytes,
            "compute_fraction": round(point.compute_fraction, 4),
        },
        "variants": _variants(peer),
        "pinned_variant": peer.config.variant,
        "device": str(peer.worker.device),
        "device_name": device_name(str(peer.worker.device)),
        "batching": peer.tails.status(),
        "listen": peer.listen_address or None,
        "socket": str(socket_path) if socket_path else None,
        "neighbours": _neighbours(peer),
        "cluster": {
            **(peer.cluster.describe() if peer.cluster is not None else {}),
            "shared_in": peer.sharing.shared_in if peer.sharing is not None else 0,
        },
        "discovery": "mdns" if peer.discovery is not None else "off",
        "emulated_slowdown": peer.worker.slowdown,
        "metrics": peer.metrics.url if peer.metrics is not None else None,
        "cache": (
            {"enabled": True, "cache_skipped": c.cache_skipped, **peer.cache.stats()}
            if peer.cache is not None
            else {"enabled": False}
        ),
        "requests": {**asdict(c), "pending": peer.server.pending if peer.server else 0},
        "security": _security_status(peer),
        # Problems an operator should see first (plain `ccied status` shows them on top).
        "warnings": peer.cluster.problems() if peer.cluster is not None else [],
        # WARNING lines held back by the log's rate limit, by kind (discovery/logutil.py).
        "suppressed_warnings": suppressed_warnings(),
    }


def _variants(peer: PeerDaemon) -> list[dict[str, Any]]:
    """Each variant of the bundle: what it sends, how faithful, its head here, times chosen."""
    return [
        {
            "name": name,
            "split": runtime.variant.split,
            "keep_ratio": runtime.variant.keep_ratio,
            "bits": runtime.variant.bits,
            "agreement": runtime.variant.agreement,
            "agreement_decisive": runtime.variant.agreement_decisive,
            "payload_bytes": round(runtime.payload_bytes()),
            "head_ms": round(peer.worker.head_ms(name), 3),
            "chosen": peer.frames.variant_counts[name],
        }
        for name, runtime in peer.worker.variants.items()
    ]


def _neighbours(peer: PeerDaemon) -> list[dict[str, Any]]:
    """The table's live neighbours, each with the tail estimate routing uses and whence."""
    rows = peer.table.snapshot()
    if peer.cluster is not None:
        estimates = peer.cluster.estimates.describe(time.monotonic())
        for row in rows:
            row["tail_estimate"] = estimates.get(str(row.get("name")), {"source": "unknown"})
    return rows


def _security_status(peer: PeerDaemon) -> dict[str, Any]:
    if peer.keys is None or peer.identity is None:
        return {"mode": "insecure", "accept_shared_from": peer.config.accept_shared_from}
    return {
        "mode": "curve",
        "public_key": peer.identity.public,
        "state_dir": str(peer.keys.state_dir),
        "trusted_keys": len(peer.keys.trusted()),
        # Peers started with this state folder share its key and so trust each
        # other with no file in trusted/ ("trusted 0" looked like nobody).
        "own_key_trusted": True,
        "accept_shared_from": peer.config.accept_shared_from,
    }


__all__ = ["peer_status"]
