"""Plain ``ccied status``: a peer's status object as an aligned, compact text table.

Pure: :func:`render` takes the dict ``Client.status()`` returns (``ccied status
--json`` prints the same) and gives the text, so it is tested without a peer.
Each section starts with an 8-character label; sub-rows are indented under it.
Counters keyed by name (sources, miss reasons, depths) are shown as ``name count``
pairs, never as Python reprs, and every figure carries its unit. A key missing
from an older peer's status shows as ``?`` rather than failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LABEL_WIDTH = 8
INDENT = " " * (LABEL_WIDTH + 1)


def render(status: Mapping[str, Any]) -> str:
    """The text plain ``ccied status`` prints for this status object (no final newline)."""
    lines = [f"WARNING: {warning}" for warning in status.get("warnings") or []]
    lines += _identity(status)
    lines += _device(status)
    lines += _security(status.get("security") or {})
    lines += _variants(status.get("variants") or [], status.get("pinned_variant"))
    lines += _requests(status.get("requests") or {})
    cache = status.get("cache") or {}
    lines += _cache(cache) if cache.get("enabled") else [_row("cache", "off")]
    lines += _shared(status.get("cluster") or {}, status.get("requests") or {})
    lines += _neighbours(status.get("neighbours") or [])
    lines += _links(status.get("cluster") or {})
    suppressed = {k: v for k, v in (status.get("suppressed_warnings") or {}).items() if v}
    if suppressed:
        lines.append(
            _row("warnings", f"held back by the log's rate limit: {_counts(suppressed, ', ')}")
        )
    return "\n".join(lines)


def _row(label: str, text: str) -> str:
    return f"{label:<{LABEL_WIDTH}} {text}".rstrip()


def _get(mapping: Mapping[str, Any], key: str) -> Any:
    value = mapping.get(key)
    return "?" if value is None else value


def _counts(counts: Mapping[str, Any], sep: str = "  ") -> str:
    """{"not_decisive": 5, "empty": 1} -> "not decisive 5  empty 1"; "-" when empty."""
    if not counts:
        return "-"
    return sep.join(f"{name.replace('_', ' ')} {count}" for name, count in counts.items())


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "?"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _fraction(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows of cells -> lines with aligned columns (those in ``right`` right-aligned)."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        INDENT
        + "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _identity(status: Mapping[str, Any]) -> list[str]:
    facts = [f"{_get(status, 'name')} ({_get(status, 'role')})", f"pid {_get(status, 'pid')}"]
    if isinstance(status.get("uptime_s"), int | float):
        facts.append(f"up {status['uptime_s']:.0f} s")
    if status.get("discovery"):
        facts.append(f"discovery {status['discovery']}")
    slowdown = status.get("emulated_slowdown")
    if isinstance(slowdown, int | float) and slowdown != 1:
        facts.append(f"emulated {slowdown:g}x slower")
    if status.get("metrics"):
        facts.append(f"metrics {status['metrics']}")
    split = status.get("cache_split") or {}
    return [
        _row("peer", "  ".join(facts)),
        _row(
            "bundle",
            f"{_get(status, 'bundle_id')} ({_get(status, 'bundle')})  "
            f"model {_get(status, 'model')}  cache split {_get(split, 'name')}",
        ),
        _row("listen", f"{status.get('listen') or '-'}  socket {status.get('socket') or '-'}"),
    ]


def _device(status: Mapping[str, Any]) -> list[str]:
    """Where the model runs, and how neighbours' tensors were batched there."""
    if "device" not in status:
        return []
    device = str(status["device"])
    name = status.get("device_name")
    text = device if not name or name == device else f"{device} ({name})"
    batching = status.get("batching") or {}
    if not batching.get("enabled"):
        return [_row("device", f"{text}  batching off")]
    sizes = batching.get("batch_sizes") or {}
    return [
        _row(
            "device",
            f"{text}  batching: window {batching.get('window_ms', 0):g} ms, max "
            f"{_get(batching, 'max_batch')}; {_get(batching, 'batches')} batches, mean "
            f"{batching.get('mean_batch', 0):.2f}, expired {_get(batching, 'expired')}"
            + ("; sizes " + ", ".join(f"{k}: {v}" for k, v in sizes.items()) if sizes else ""),
        )
    ]


def _security(security: Mapping[str, Any]) -> list[str]:
    if security.get("mode") != "curve":
        return [_row("security", "INSECURE (--insecure): no authentication, no encryption")]
    count = security.get("trusted_keys", 0)
    trusted = f"trusted {count} key{'' if count == 1 else 's'}"
    if security.get("own_key_trusted"):
        trusted += (
            f" + this folder's own key (every peer using {_get(security, 'state_dir')} shares it)"
        )
    else:
        trusted += f"  state {_get(security, 'state_dir')}"
    return [
        _row("security", f"curve  key {_get(security, 'public_key')}"),
        INDENT + trusted,
        INDENT + f"shared cache entries taken from: {_get(security, 'accept_shared_from')}",
    ]


def _variants(variants: Sequence[Mapping[str, Any]], pinned: str | None) -> list[str]:
    if not variants:
        return []
    rows = [["name", "payload", "decisive", "all", "head", "chosen"]]
    for v in variants:
        name = str(_get(v, "name")) + (" (pinned)" if v.get("name") == pinned else "")
        rows.append(
            [
                name,
                f"{_get(v, 'payload_bytes')} B",
                _fraction(v.get("agreement_decisive")),
                _fraction(v.get("agreement")),
                _ms(v.get("head_ms")),
                f"{_get(v, 'chosen')}",
            ]
        )
    table = _table(rows, right=(1, 2, 3, 4, 5))
    return [_row("variants", table[0].removeprefix(INDENT)), *table[1:]]


def _requests(req: Mapping[str, Any]) -> list[str]:
    return [
        _row(
            "requests",
            f"submitted {_get(req, 'submitted')}  answered {_get(req, 'answered')}  "
            f"failovers {_get(req, 'failovers')}  errors {_get(req, 'errors')}  "
            f"busy {_get(req, 'busy')}  served for peers {_get(req, 'served_for_peers')}",
        ),
        INDENT + f"answered by  {_counts(req.get('by_source') or {})}",
    ]


def _cache(cache: Mapping[str, Any]) -> list[str]:
    where = "on disk" if cache.get("persistent") else "in memory"
    rate = (
        f"hit rate {_percent(cache.get('hit_rate'))} "
        f"({_get(cache, 'hits')} of {cache['frames']} frames)"
        if cache.get("frames")
        else "no frames looked up yet"
    )
    by_depth = cache.get("hits_by_depth") or {}
    reasons = {k: v for k, v in (cache.get("miss_reasons") or {}).items() if v}
    lines = [
        _row(
            "cache",
            f"{_get(cache, 'entries')} entries (capacity {_get(cache, 'capacity')}, {where})  "
            f"{rate}",
        ),
        *_table(
            [
                ["hits", f"{_get(cache, 'hits')}", f"by depth: {_counts(by_depth)}"],
                ["misses", f"{_get(cache, 'misses')}", f"by reason: {_counts(reasons)}"],
                [
                    "skipped",
                    f"{_get(cache, 'cache_skipped')}",
                    "deeper-key lookups left out (they would cost more than they save)",
                ],
            ],
            right=(1,),
        ),
    ]
    depths = cache.get("depths") or []
    if depths:
        rows = [["depth", "entries", "index", "threshold", "answer floor", "margin"]]
        for depth in depths:
            rule = depth.get("rule") or {}
            rows.append(
                [
                    str(_get(depth, "name")),
                    str(_get(depth, "entries")),
                    str(_get(depth, "index")),
                    f"L2 {_fraction(rule.get('threshold_l2'))}",
                    _fraction(rule.get("answer_floor"), 2),
                    str(_get(rule, "vote_margin")),
                ]
            )
        lines += _table(rows, right=(1, 3, 4, 5))
    return lines + _audit(cache)


def _audit(cache: Mapping[str, Any]) -> list[str]:
    """The audit's lines: hits re-checked by the full model, wrong ones, the bound."""
    audit = cache.get("audit")
    if not audit:
        return []
    target = audit.get("target_false_hit_rate")
    lines = [
        _row(
            "audit",
            f"checked {_get(audit, 'checked')} of {_get(cache, 'hits')} hits "
            f"(rate {_percent(audit.get('rate'))})  "
            f"wrong {_get(audit, 'wrong')}  false-hit rate "
            f"{_fraction(audit.get('false_hit_rate'))} (95% bound "
            f"{_fraction(audit.get('false_hit_upper_95'))}, target {_fraction(target)})",
        ),
        INDENT + f"fidelity decisive {_fraction(audit.get('fidelity_decisive'))}  "
        f"all {_fraction(audit.get('fidelity_all'))}  "
        f"rules tightened {_get(audit, 'tightened')}",
    ]
    if audit.get("refused_origins"):
        lines.append(INDENT + f"entries refused from: {', '.join(audit['refused_origins'])}")
    return lines


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "?"


def _shared(cluster: Mapping[str, Any], req: Mapping[str, Any]) -> list[str]:
    if not cluster:
        return []
    return [
        _row(
            "shared",
            f"out {_get(cluster, 'shared_out')} entries  in {_get(cluster, 'shared_in')} entries  "
            f"refused {_get(req, 'refused_shared')}  queued {_get(cluster, 'share_queue')}  "
            f"bytes sent to peers {_bytes(cluster.get('bytes_sent'))}",
        )
    ]


def _neighbours(neighbours: Sequence[Mapping[str, Any]]) -> list[str]:
    if not neighbours:
        return ["neighbours none yet"]
    rows = [["name", "role", "address", "rtt", "bandwidth", "load", "model time", "seen"]]
    for n in neighbours:
        bandwidth = n.get("bandwidth_mbps")
        seen = n.get("last_seen_s")
        rows.append(
            [
                str(_get(n, "name")),
                str(_get(n, "role")) + (f" ({n['device']})" if n.get("device") else ""),
                str(_get(n, "address")),
                _ms(n.get("rtt_ms")),
                f"{bandwidth:.0f} Mbit/s" if bandwidth else "?",
                _fraction(n.get("load"), 2),
                _tail(n.get("tail_estimate") or {}),
                f"{seen:.1f} s ago" if isinstance(seen, int | float) else "?",
            ]
        )
    return ["neighbours", *_table(rows, right=(3, 4, 5, 7))]


def _tail(estimate: Mapping[str, Any]) -> str:
    """Where the whole-model time we plan with for a neighbour came from."""
    full_ms = estimate.get("full_ms")
    source = estimate.get("source", "unknown")
    if not full_ms:
        return "? (not measured yet)"
    if source == "replies":
        return f"{full_ms:.1f} ms from {estimate.get('samples') or 'its'} replies"
    return f"{full_ms:.1f} ms from its {source}"


def _links(cluster: Mapping[str, Any]) -> list[str]:
    # Why a configured or discovered peer is not a neighbour, when keys are the reason.
    return [
        _row("link", f"{link.get('address')}: {link['handshake_error']}")
        for link in cluster.get("links") or []
        if link.get("handshake_error") and not link.get("connected")
    ]
