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
    the cache split (blocks.11), and completing it gives the same bytes as a
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
        # An earlier split: the payload comes on the way to the cache key.
        early = await worker.head(cat_pixels, "blocks.7-b8", with_cache=True)
        assert early.payload is not None and early.cache_tensor is not None
        assert await worker.complete(early) is early

    asyncio.run(scenario())
