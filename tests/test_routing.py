"""A neighbour's model time as routing sees it: from heartbeats, then from its replies."""

from __future__ import annotations

from ccied.peer.routing import PROBE_INTERVAL_S, REPLY_FRESH_S, TailEstimates

# How a route is priced and ordered: tests/test_policy.py.


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
