"""Routing policy: which target should finish a frame that missed the cache.

Pure logic, no sockets: the daemon turns what it knows (its own tail time and
queue, each live neighbour's RTT, bandwidth estimate, tail time and queue) into
:class:`Candidate` values, and :func:`plan` orders them by expected time to an
answer. The daemon tries them in that order until one answers; its own tail is
always the last resort, so every frame gets exactly one answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# Used until a link has been measured: a conservative LAN figure.
DEFAULT_BANDWIDTH_MBPS = 50.0
# Used until a peer has reported its tail time.
DEFAULT_TAIL_MS = 50.0


class TargetKind(StrEnum):
    LOCAL = "local"
    PEER = "peer"
    CLOUD = "cloud"


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: TargetKind
    address: str  # '' for the local tail
    tail_ms: float  # the target's recent tail compute time
    queue_length: int  # requests ahead of ours there
    rtt_ms: float = 0.0
    bandwidth_mbps: float | None = None  # None until measured

    def expected_ms(self, payload_bytes: int) -> float:
        """Time to an answer: round trip, upload, and the tail behind its queue."""
        tail = (self.tail_ms if self.tail_ms > 0 else DEFAULT_TAIL_MS) * (self.queue_length + 1)
        if self.kind is TargetKind.LOCAL:
            return tail
        bandwidth = self.bandwidth_mbps or DEFAULT_BANDWIDTH_MBPS
        return self.rtt_ms + payload_bytes * 8 / (bandwidth * 1e3) + tail


def plan(candidates: Sequence[Candidate], payload_bytes: int) -> list[Candidate]:
    """Candidates to try, best first, ending with the local tail.

    Remote targets slower than the local tail are left out: failing over to
    them would only add time. Ties keep the given order (stable sort).
    """
    local = [c for c in candidates if c.kind is TargetKind.LOCAL]
    if len(local) != 1:
        raise ValueError("plan needs exactly one local candidate")
    ranked = sorted(candidates, key=lambda c: c.expected_ms(payload_bytes))
    cut = ranked.index(local[0])
    return ranked[: cut + 1]
