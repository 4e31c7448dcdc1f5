"""Cache entries across the cluster: this peer's out at a bounded rate, a neighbour's in on arrival.

Entries this peer learns wait in a bounded outbox (the oldest dropped when it is
full) and go to every live neighbour with our bundle in batches, at most
``share_rate_per_s`` entries a second (a token bucket). A neighbour that comes
up is asked for its hottest entries at every key depth (CacheSync), so a late
peer starts warm. Which entries a peer *takes* is ``ccied.peer.sharing``'s
policy: this module hands them to an :class:`EntrySink`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from ccied.discovery import NeighbourTable
from ccied.peer.transport import Exchange
from ccied.peer.wire import MAX_SHARED_ENTRIES, WIRE_VERSION, CacheShare, CacheSync, Message

if TYPE_CHECKING:
    from ccied.peer.cluster import ClusterConfig

# The cluster's logger: these lines were the cluster's before this module split off.
log = logging.getLogger("ccied.peer.cluster")

DEFAULT_SHARE_INTERVAL_S = 0.2
DEFAULT_SHARE_RATE_PER_S = 500.0  # entries a second to all neighbours, at most
SHARE_OUTBOX_ENTRIES = 4096

# One request to a neighbour's address: (address, message, timeout_s) -> its exchange.
Send = Callable[[str, Message, float], Awaitable[Exchange]]


@dataclass(frozen=True)
class SharedEntry:
    feature: np.ndarray
    label: int
    confidence: float
    origin: str
    depth: str = ""  # the key depth of ``feature``


class EntrySink(Protocol):
    """Where cache entries that neighbours share with us go (ccied.peer.sharing.Sharing)."""

    def accept(self, share: CacheShare, sender: str, sender_key: str) -> int:
        """Take the sane entries of ``share``; returns how many were taken."""
        ...


class ClusterSharing:
    """The outbox, the rate-bounded send loop and the sync of one peer (event loop only)."""

    def __init__(
        self,
        config: ClusterConfig,
        table: NeighbourTable,
        send: Send,
        key_of: Callable[[str], str | None],
        sink: EntrySink | None,
    ) -> None:
        self.config = config
        self.table = table
        self._send = send
        self._key_of = key_of  # the key a neighbour's address proved ('' when insecure)
        self._sink = sink  # where shared entries that neighbours send us go (None: no cache)
        self.outbox: collections.deque[SharedEntry] = collections.deque(maxlen=SHARE_OUTBOX_ENTRIES)
        self.shared_out = 0  # entries delivered to neighbours (the sink counts those taken)

    def share(self, entry: SharedEntry) -> None:
        """Queue an entry this peer learned for its neighbours (oldest dropped if full)."""
        if self.config.share_cache:
            self.outbox.append(entry)

    async def run(self) -> None:
        """Send queued entries to live neighbours, at most share_rate_per_s a second."""
        tokens = 0.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.config.share_interval_s)
            now = time.monotonic()
            rate = self.config.share_rate_per_s
            tokens = min(rate, tokens + (now - last) * rate)
            last = now
            if not self.outbox or tokens < 1:
                continue
            neighbours = self.table.usable(self.config.bundle_id, WIRE_VERSION)
            if not neighbours:
                continue
            batch: list[SharedEntry] = []
            while self.outbox and len(batch) < min(MAX_SHARED_ENTRIES, int(tokens)):
                batch.append(self.outbox.popleft())
            tokens -= len(batch)
            await self._send_batch(batch, [n.address for n in neighbours])

    async def _send_batch(self, batch: list[SharedEntry], addresses: list[str]) -> None:
        # One message per key depth: a message carries one (N, dim) tensor.
        by_depth: dict[str, list[SharedEntry]] = {}
        for entry in batch:
            by_depth.setdefault(entry.depth, []).append(entry)
        for depth, entries in by_depth.items():
            message = share_message(entries, self.config.bundle_id, depth)
            results = await asyncio.gather(
                *(
                    self._send(address, message, self.config.heartbeat_timeout_s)
                    for address in addresses
                )
            )
            self.shared_out += len(entries) * sum(r.error is None for r in results)

    async def sync_from(self, name: str, address: str) -> None:
        """Ask a neighbour that just came up for its hottest entries, at every key depth."""
        for depth in self.config.cache_depths or ("",):
            request = CacheSync(
                request_id=uuid.uuid4().hex,
                bundle_id=self.config.bundle_id,
                max_entries=MAX_SHARED_ENTRIES,
                depth=depth,
            )
            exchange = await self._send(address, request, self.config.heartbeat_timeout_s * 5)
            if isinstance(exchange.reply, CacheShare) and self._sink is not None:
                # The sink counts what it takes (counting here too once doubled them).
                accepted = self._sink.accept(exchange.reply, name, self._key_of(address) or "")
                log.info("received %d cache entries (%s) from %s", accepted, depth or "-", name)


def share_message(entries: list[SharedEntry], bundle_id: str, depth: str = "") -> CacheShare:
    """A CacheShare message carrying ``entries`` of one key depth (at most MAX_SHARED_ENTRIES)."""
    return CacheShare(
        depth=depth,
        request_id=uuid.uuid4().hex,
        bundle_id=bundle_id,
        origins=[e.origin for e in entries],
        labels=[e.label for e in entries],
        confidences=[e.confidence for e in entries],
        features=np.stack([e.feature for e in entries]).astype(np.float32),
    )
