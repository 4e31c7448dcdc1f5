"""Routing policy as pure logic: who should finish a frame that missed the cache."""

from __future__ import annotations

import pytest
from ccied.peer.routing import (
    DEFAULT_BANDWIDTH_MBPS,
    PROBE_INTERVAL_S,
    REPLY_FRESH_S,
    Candidate,
    TailEstimates,
    TargetKind,
    plan,
)

LOCAL = Candidate("me", TargetKind.LOCAL, "", tail_ms=40.0, queue_length=0)
TENSOR_BYTES = 37_632


def remote(name: str, **fields: object) -> Candidate:
    values: dict[str, object] = {
        "kind": TargetKind.PEER,
        "address": f"tcp://{name}:1",
        "tail_ms": 10.0,
        "queue_length": 0,
        "rtt_ms": 2.0,
        "bandwidth_mbps": 100.0,
    }
    values.update(fields)
    return Candidate(name, **values)  # type: ignore[arg-type]


def test_the_fastest_target_goes_first_and_the_local_tail_last() -> None:
    idle = remote("idle")
    busy = remote("busy", queue_length=5)
    cloud = remote("cloud", kind=TargetKind.CLOUD, tail_ms=5.0, rtt_ms=20.0)
    route = plan([LOCAL, busy, cloud, idle], TENSOR_BYTES)
    assert [c.name for c in route] == ["idle", "cloud", "me"]  # busy: 60 ms > local 40 ms


def test_a_slow_link_keeps_the_tail_at_home() -> None:
    cloud = remote("cloud", kind=TargetKind.CLOUD, tail_ms=5.0, rtt_ms=20.0, bandwidth_mbps=1.0)
    # 37.6 KB at 1 Mbit/s is 301 ms on the wire alone.
    assert plan([LOCAL, cloud], TENSOR_BYTES) == [LOCAL]
    fast = remote("cloud", kind=TargetKind.CLOUD, tail_ms=5.0, rtt_ms=20.0, bandwidth_mbps=100.0)
    assert plan([LOCAL, fast], TENSOR_BYTES) == [fast, LOCAL]


def test_unknown_figures_fall_back_to_defaults() -> None:
    unknown = remote("new", tail_ms=0.0, bandwidth_mbps=None, rtt_ms=1.0)
    expected = 1.0 + TENSOR_BYTES * 8 / (DEFAULT_BANDWIDTH_MBPS * 1e3) + 50.0
    assert unknown.expected_ms(TENSOR_BYTES) == pytest.approx(expected)


def test_the_local_queue_counts() -> None:
    swamped = Candidate("me", TargetKind.LOCAL, "", tail_ms=40.0, queue_length=3)
    peer = remote("peer", tail_ms=30.0)
    assert plan([swamped, peer], TENSOR_BYTES)[0] is peer


def test_plan_needs_its_local_tail() -> None:
    with pytest.raises(ValueError, match="exactly one local"):
        plan([remote("a")], TENSOR_BYTES)


def test_a_neighbours_estimate_follows_its_replies_not_its_start_up_figure() -> None:
    estimates = TailEstimates()
    # The cloud timed itself under start-up contention.
    estimates.reported("cloud1", 459.0)
    assert estimates.full_ms("cloud1", now=0.0) == (459.0, "heartbeat")
    # Its replies say otherwise: from the third on, their median replaces the
    # figure, and one slow reply does not move it.
    estimates.observed("cloud1", 12.0, now=1.0)
    estimates.observed("cloud1", 14.0, now=1.5)
    assert estimates.full_ms("cloud1", now=1.5) == (459.0, "heartbeat")
    estimates.observed("cloud1", 13.0, now=1.8)
    assert estimates.full_ms("cloud1", now=1.8) == (13.0, "replies")
    estimates.observed("cloud1", 300.0, now=2.0)  # one slow reply
    full, source = estimates.full_ms("cloud1", now=2.0)
    assert source == "replies" and 13.0 <= full <= 14.0
    # Replies go stale; the heartbeat figure (by then re-measured) is used again.
    estimates.reported("cloud1", 14.0)
    assert estimates.full_ms("cloud1", now=2.0 + REPLY_FRESH_S + 1) == (14.0, "heartbeat")
    assert estimates.describe(now=3.0)["cloud1"]["source"] == "replies"


def test_a_neighbour_not_sent_anything_for_a_while_is_due_for_a_probe() -> None:
    estimates = TailEstimates()
    assert not estimates.due_for_probe("peer2", now=0.0)  # never heard of
    estimates.reported("peer2", 50.0, now=90.0)  # first heard of: not at once
    assert not estimates.due_for_probe("peer2", now=91.0)
    assert estimates.due_for_probe("peer2", now=90.0 + PROBE_INTERVAL_S)
    estimates.sent("peer2", now=100.0)
    assert not estimates.due_for_probe("peer2", now=100.0 + PROBE_INTERVAL_S / 2)
    assert estimates.due_for_probe("peer2", now=100.0 + PROBE_INTERVAL_S)
    # A reply of no time says nothing.
    estimates.observed("peer2", 0.0, now=101.0)
    assert estimates.full_ms("peer2", now=101.0)[1] == "heartbeat"
