"""Which shared cache entries enter this peer's cache, and what it offers in return.

Every answer is shared so the cluster learns from it; a forged entry would make
every peer answer wrongly with confidence. This module owns that policy and its
count of entries taken (``shared_in``): the :class:`~ccied.peer.cluster.Cluster`
hands it what neighbours push or answer to a sync (through the one-method
:class:`~ccied.peer.cluster_sharing.EntrySink` protocol) and sends what it
queues. Entries are taken only

* from an allowed sender: on a secure peer every sender already passed the
  allow-list; ``--accept-shared-from cloud`` narrows it to the key the
  ``--cloud`` address proved (so one compromised edge cannot answer for the
  others), ``none`` takes nothing; and never from a key the audit refused;
* of our bundle, at a key depth we have, with a sane feature, label and confidence;
* from an origin the audit has not refused.

They keep their origin and are not shared on (no loops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ccied.cache import BadFeatureError
from ccied.discovery.logutil import WarnOnce
from ccied.peer.cluster_sharing import SharedEntry, share_message
from ccied.peer.counters import Counters
from ccied.peer.defaults import SHARED_FROM
from ccied.peer.peer_cache import NewEntry, PeerCache
from ccied.peer.wire import (
    MAX_SHARED_ENTRIES,
    CacheShare,
    CacheSync,
    ErrorCode,
    ErrorReply,
    Message,
    StatusReply,
)

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)


class Sharing:
    """The cache-sharing policy of one peer (event loop only)."""

    def __init__(
        self,
        cache: PeerCache,
        bundle_id: str,
        class_count: int,
        counters: Counters,
        accept_from: str = "trusted",
    ) -> None:
        if accept_from not in SHARED_FROM:
            raise ValueError(f"accept_from must be one of {', '.join(SHARED_FROM)}")
        self._cache = cache
        self._bundle_id = bundle_id
        self._class_count = class_count
        self._counters = counters
        self._accept_from = accept_from
        self._cloud_key: Callable[[], str | None] = lambda: None
        self._outbox: Callable[[SharedEntry], None] = lambda entry: None
        # Which proved key delivered each origin's entries, and the keys whose
        # entries the audit refused.
        self._origin_keys: dict[str, str] = {}
        self._refused_keys: set[str] = set()
        self.shared_in = 0  # entries taken, pushed or synced: counted here only

    def connect(
        self, outbox: Callable[[SharedEntry], None], cloud_key: Callable[[], str | None]
    ) -> None:
        """Entries this peer makes go to ``outbox`` (the cluster's share queue);
        ``cloud_key`` says which key the --cloud address proved (None: not yet)."""
        self._outbox = outbox
        self._cloud_key = cloud_key
        self._cache.on_new_entry(self._offer)

    def _offer(self, entry: NewEntry) -> None:
        self._outbox(
            SharedEntry(entry.feature, entry.label, entry.confidence, entry.origin, entry.depth)
        )

    def allowed(self, sender_key: str) -> bool:
        """Whether entries from the peer that proved ``sender_key`` may enter our cache."""
        if self._accept_from == "none" or (sender_key and sender_key in self._refused_keys):
            return False
        if self._accept_from == "cloud":
            return bool(sender_key) and sender_key == self._cloud_key()
        return True

    def refuse_origin(self, origin: str) -> None:
        """The audit caught ``origin`` answering wrongly: refuse the key that delivered it."""
        key = self._origin_keys.get(origin)
        if key:
            self._refused_keys.add(key)

    def accept(self, share: CacheShare, sender: str, sender_key: str = "") -> int:
        """Queue the sane entries of ``share`` for our cache; returns how many."""
        if not self.allowed(sender_key):
            self._counters.refused_shared += len(share.labels)
            warn_once(
                f"share-refused:{sender_key}",
                "refused shared cache entries from %s (accepting from: %s)",
                sender or sender_key or "a neighbour",
                self._accept_from,
            )
            return 0
        cache = self._cache
        if share.bundle_id != self._bundle_id:
            warn_once(f"share-bundle:{sender}", "ignored cache entries of another bundle")
            return 0
        try:
            depth = cache.depth_for(share.depth, int(share.features.shape[1]))
        except BadFeatureError as exc:
            warn_once(f"share-depth:{sender}", "ignored shared cache entries: %s", exc)
            return 0
        entries = []
        for feature, label, confidence, origin in zip(
            share.features, share.labels, share.confidences, share.origins, strict=True
        ):
            if cache.audit.refuses(origin):
                self._counters.refused_shared += 1
                continue
            try:
                vector = cache.check_shared(depth, feature)
            except BadFeatureError as exc:
                warn_once(f"share-feature:{sender}", "ignored a shared entry: %s", exc)
                continue
            if 0 <= label < self._class_count and 0.0 <= confidence <= 1.0:
                entries.append((vector, label, confidence, origin))
                if sender_key:
                    self._origin_keys[origin] = sender_key
        cache.insert_shared(depth, entries)
        self.shared_in += len(entries)
        return len(entries)

    async def answer_sync(self, request: CacheSync) -> Message:
        """A neighbour that just came up asks for our hottest entries at one key depth."""
        cache = self._cache
        if request.bundle_id != self._bundle_id:
            return ErrorReply(
                request_id=request.request_id,
                code=ErrorCode.BUNDLE_MISMATCH,
                message="another bundle",
            )
        depth = request.depth or cache.depths[0].name
        if depth not in {d.name for d in cache.depths}:
            return ErrorReply(
                request_id=request.request_id,
                code=ErrorCode.UNSUPPORTED,
                message=f"no key depth {depth!r} here",
            )
        rows = await cache.hot_entries(depth, min(request.max_entries, MAX_SHARED_ENTRIES))
        if not rows:
            return StatusReply(request_id=request.request_id, status={"entries": 0})
        message = share_message(
            [SharedEntry(e.feature, e.label, e.confidence, e.origin, depth) for e in rows],
            self._bundle_id,
            depth,
        )
        return CacheShare(**{**message.__dict__, "request_id": request.request_id})


__all__ = ["Sharing"]
