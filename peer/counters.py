"""The peer's request counters: one plain record, written on the event loop only.

The server, the frame pipeline and the sharing policy each count what they
see; ``ccied status`` and the Prometheus metrics read a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ccied.peer.wire import Source


@dataclass
class Counters:
    submitted: int = 0
    answered: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: {str(s): 0 for s in Source})
    failovers: int = 0
    errors: int = 0
    busy: int = 0
    protocol_errors: int = 0
    served_for_peers: int = 0
    refused_bundle: int = 0
    refused_shared: int = 0
    cache_skipped: int = 0
    probes: int = 0  # copies of misses sent to neighbours only to time them
    refused_handshakes: int = 0  # CURVE clients whose key is not trusted (ZAP)
    computing: int = 0  # frames and tensors in progress now: what queues for the model

    def answer(self, source: Source) -> None:
        """One application frame answered, from ``source``."""
        self.answered += 1
        self.by_source[str(source)] += 1


__all__ = ["Counters"]
