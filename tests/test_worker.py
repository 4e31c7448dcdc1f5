"""The model worker on the real EfficientNet-Lite0: where the head stops and why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from ccied.peer.worker import ModelWorker
from ccied.pruning.bundle import builtin_bundle


@pytest.fixture(scope="module")
def worker() -> Iterator[ModelWorker]:
    worker = ModelWorker(builtin_bundle())
    yield worker
    worker.close()


def test_a_head_past_the_cache_split_stops_there_and_completes_only_on_a_miss(
    worker: ModelWorker, cat_pixels: np.ndarray
) -> None:
    """A hit must not pay for stages it does not need: blocks.14's head stops at
    the cache split (blocks.4), and completing it gives the same bytes as a
    head that never stopped."""

    async def scenario() -> None:
        stopped = await worker.head(cat_pixels, "blocks.14-b4", with_cache=True)
        assert stopped.payload is None and stopped.cache_tensor is not None
        assert stopped.reach_index == worker.cache_point.index
        completed = await worker.complete(stopped)
        straight = await worker.head(cat_pixels, "blocks.14-b4", with_cache=False)
        assert completed.payload is not None and straight.payload is not None
        assert completed.reach_index == straight.reach_index > stopped.reach_index
        assert completed.payload.tobytes() == straight.payload.tobytes()
        assert completed.head_ms >= stopped.head_ms
        # A split before the cache key (the input, as a JPEG): the payload is
        # made on the way to the key.
        early = await worker.head(cat_pixels, "jpeg-q90", with_cache=True)
        assert early.payload is not None and early.cache_tensor is not None
        assert await worker.complete(early) is early
        # Without the key wanted, a head that passes the cache split keeps its
        # tensor anyway: the frame is then cached at that depth for free.
        passing = await worker.head(cat_pixels, "blocks.11-b6", with_cache=False)
        assert passing.payload is not None and passing.cache_tensor is not None

    asyncio.run(scenario())
