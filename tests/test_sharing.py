"""The cache-sharing policy in-process: what enters the cache, from whom, counted once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ccied.cache import Audit, KeyDepth
from ccied.cache.policy import default_rule
from ccied.peer.cluster import SharedEntry, share_message
from ccied.peer.counters import Counters
from ccied.peer.peer_cache import PeerCache
from ccied.peer.sharing import Sharing
from ccied.peer.wire import CacheShare, CacheSync, ErrorCode, ErrorReply

DIM = 16
CLASSES = 10


def entry(seed: int, label: int = 1, confidence: float = 0.9, origin: str = "cam2") -> SharedEntry:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return SharedEntry(vector / np.linalg.norm(vector), label, confidence, origin, "thumb16")


@pytest.fixture
def cache() -> PeerCache:
    depth = KeyDepth("thumb16", DIM, -1)
    peer_cache = PeerCache(
        [depth], {"thumb16": default_rule("thumb16")}, "b1", "cam1", 100, Audit(rate=0.0)
    )
    yield peer_cache
    peer_cache.close()


def test_sane_entries_are_taken_and_counted_once(cache: PeerCache) -> None:
    counters = Counters()
    sharing = Sharing(cache, "b1", CLASSES, counters)
    share = share_message(
        [entry(1), entry(2), entry(3, label=CLASSES), entry(4, confidence=1.5)], "b1", "thumb16"
    )
    assert sharing.accept(share, "cam2", "") == 2  # a label out of range, a confidence > 1
    assert sharing.shared_in == 2
    assert sharing.accept(share_message([entry(5)], "b1", "thumb16"), "cam3", "") == 1
    assert sharing.shared_in == 3  # pushes and syncs alike go through accept, once
    other = share_message([entry(6)], "other-bundle", "thumb16")
    assert sharing.accept(other, "cam4", "") == 0 and sharing.shared_in == 3


def test_who_may_share(cache: PeerCache) -> None:
    counters = Counters()
    share = share_message([entry(1), entry(2)], "b1", "thumb16")
    nobody = Sharing(cache, "b1", CLASSES, counters, accept_from="none")
    assert nobody.accept(share, "cam2", "KEY2") == 0 and counters.refused_shared == 2
    cloud_only = Sharing(cache, "b1", CLASSES, Counters(), "cloud")
    assert cloud_only.accept(share, "cloud1", "CLOUD") == 0  # its key not proved yet
    cloud_only.connect(lambda entry: None, lambda: "CLOUD")
    assert cloud_only.accept(share, "cam2", "KEY2") == 0
    assert cloud_only.accept(share, "cloud1", "CLOUD") == 2
    trusted = Sharing(cache, "b1", CLASSES, Counters())
    assert trusted.accept(share, "cam2", "KEY2") == 2
    trusted.refuse_origin("cam2")  # the audit caught cam2's entries answering wrongly
    assert trusted.accept(share, "cam2", "KEY2") == 0  # and the key that delivered them


def test_a_sync_answers_with_our_entries_for_our_bundle_and_depths(cache: PeerCache) -> None:
    sharing = Sharing(cache, "b1", CLASSES, Counters())

    async def sync(bundle_id: str, depth: str = "thumb16") -> object:
        request = CacheSync(request_id="s", bundle_id=bundle_id, max_entries=10, depth=depth)
        return await sharing.answer_sync(request)

    reply = asyncio.run(sync("zz"))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUNDLE_MISMATCH
    reply = asyncio.run(sync("b1", "blocks.9"))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.UNSUPPORTED
    assert sharing.accept(share_message([entry(1), entry(2)], "b1", "thumb16"), "cam2", "") == 2
    reply = asyncio.run(sync("b1"))  # the writer thread inserted them first, in order
    assert isinstance(reply, CacheShare) and sorted(reply.origins) == ["cam2", "cam2"]
