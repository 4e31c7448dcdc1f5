"""What routing knows of each neighbour: its figures as a Candidate, and its model time.

Pure logic, no sockets: the cluster turns each live neighbour (RTT, bandwidth
estimate, queue, model time) into a :class:`Candidate`; the frame policy
(``ccied.peer.policy``) prices and orders them. :class:`TailEstimates` keeps
each neighbour's model time from its heartbeats and, better, its replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class TargetKind(StrEnum):
    LOCAL = "local"
    PEER = "peer"
    CLOUD = "cloud"


@dataclass(frozen=True)
class Candidate:
    """A live neighbour that could finish a frame, as the policy (peer/policy.py) prices it."""

    name: str
    kind: TargetKind
    address: str
    full_ms: float  # its whole model's time (0: unknown), scaled by a variant's tail share
    queue_length: int  # requests ahead of ours there
    rtt_ms: float = 0.0
    bandwidth_mbps: float | None = None  # None until measured


# A neighbour's tail time, as this peer sees it (TailEstimates):
# - from its replies: each answer's tail time, scaled to the whole model; the
#   median of the last REPLY_WINDOW replies replaces the neighbour's own figure
#   once there are REPLY_MIN_SAMPLES of them. A cloud that timed itself at 459 ms
#   under start-up contention was never used again while its heartbeats kept
#   saying so (issue 11); its replies say 10-15 ms. A median, not a moving
#   average, and not from the first reply: in a CI run on a loaded box one slow
#   reply made the cloud look slower than a 4x edge's own tail and sent frames
#   back to the edge.
# - replies older than this are stale; its heartbeat figure is used again.
REPLY_WINDOW = 8
REPLY_MIN_SAMPLES = 3
REPLY_FRESH_S = 30.0
# A neighbour not sent a frame for this long (or since it was first heard of)
# gets a copy of a miss's payload in the background when its queue is empty (the
# answer is not used): its estimate stays measured. Not at once: in `ccied bench
# cluster` probing every camera's neighbours at first sight put a full-model job
# (500 ms at 10x) on each slow camera as its own stream started, and doubled p95.
PROBE_INTERVAL_S = 10.0


@dataclass
class _Estimate:
    reported_ms: float = 0.0  # the neighbour's own figure, from its heartbeats
    replies: list[float] = field(default_factory=list)  # the last REPLY_WINDOW, in ms
    observed_at: float = -1e18
    sent_at: float = -1e18

    @property
    def samples(self) -> int:
        return len(self.replies)

    @property
    def observed_ms(self) -> float:
        ordered = sorted(self.replies)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2


class TailEstimates:
    """Per neighbour: the whole-model time to plan with, and when to probe it.

    Pure logic with an injectable clock (``now`` in seconds, any monotonic origin).
    """

    def __init__(self) -> None:
        self._by_name: dict[str, _Estimate] = {}

    def _get(self, name: str) -> _Estimate:
        return self._by_name.setdefault(name, _Estimate())

    def reported(self, name: str, full_ms: float, now: float | None = None) -> None:
        """The neighbour's heartbeat said its whole model takes ``full_ms``."""
        if name not in self._by_name and now is not None:
            self._by_name[name] = _Estimate(sent_at=now)  # first heard of: not due yet
        self._get(name).reported_ms = max(0.0, full_ms)

    def observed(self, name: str, full_ms: float, now: float) -> None:
        """One of its replies implies ``full_ms`` for the whole model."""
        if not full_ms > 0:
            return
        entry = self._get(name)
        if now - entry.observed_at > REPLY_FRESH_S:
            entry.replies.clear()  # stale: start over
        entry.replies = [*entry.replies, full_ms][-REPLY_WINDOW:]
        entry.observed_at = now

    def sent(self, name: str, now: float) -> None:
        self._get(name).sent_at = now

    def full_ms(self, name: str, now: float) -> tuple[float, str]:
        """(whole-model ms, "replies" | "heartbeat") to plan with; 0 when unknown."""
        entry = self._by_name.get(name)
        if entry is None:
            return 0.0, "unknown"
        if entry.samples >= REPLY_MIN_SAMPLES and now - entry.observed_at <= REPLY_FRESH_S:
            return entry.observed_ms, "replies"
        return entry.reported_ms, "heartbeat"

    def due_for_probe(self, name: str, now: float) -> bool:
        entry = self._by_name.get(name)
        return entry is not None and now - entry.sent_at >= PROBE_INTERVAL_S

    def describe(self, now: float) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, entry in self._by_name.items():
            full, source = self.full_ms(name, now)
            out[name] = {
                "full_ms": round(full, 2),
                "source": source,
                "samples": entry.samples if source == "replies" else 0,
                "heartbeat_full_ms": round(entry.reported_ms, 2),
            }
        return out
