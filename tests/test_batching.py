"""Dynamic batching of tails against a fake model: windows, max batch, per-variant
queues, deadlines and a failing member (peer/batching.py)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest
from ccied.peer.batching import (
    BatchConfig,
    Batcher,
    BatchQueues,
    DeadlineExpiredError,
)
from ccied.peer.tails import batch_config_for

WINDOW_MS = 2.0


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Every async test under a timeout."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout=10)

    return asyncio.run(bounded())


# -- the decisions, at explicit times ------------------------------------------------


def test_a_lone_item_waits_exactly_the_window_and_no_longer() -> None:
    queues: BatchQueues[str] = BatchQueues(BatchConfig(window_ms=WINDOW_MS, max_batch=32))
    queues.add("v", "a", now=10.0)
    assert queues.wake_at() == pytest.approx(10.002)
    assert queues.take(now=10.0019) == []
    [pending] = queues.take(now=10.002)
    assert pending.item == "a" and len(queues) == 0 and queues.wake_at() is None


def test_a_full_queue_runs_at_once_and_a_batch_never_exceeds_max_batch() -> None:
    queues: BatchQueues[int] = BatchQueues(BatchConfig(window_ms=WINDOW_MS, max_batch=4))
    for i in range(6):
        queues.add("v", i, now=0.0)
    assert queues.wake_at() == 0.0  # full: ready now, not at the window's end
    assert [p.item for p in queues.take(now=0.0)] == [0, 1, 2, 3]  # oldest first
    assert queues.take(now=0.0) == []  # two left: they wait for the window
    assert [p.item for p in queues.take(now=0.002)] == [4, 5]


def test_variants_queue_apart_and_the_oldest_ready_queue_goes_first() -> None:
    queues: BatchQueues[str] = BatchQueues(BatchConfig(window_ms=WINDOW_MS, max_batch=8))
    queues.add("b", "b0", now=0.0)
    queues.add("a", "a0", now=0.001)
    queues.add("b", "b1", now=0.0015)
    queues.add("a", "a1", now=0.0016)
    first = queues.take(now=0.01)
    second = queues.take(now=0.01)
    assert [p.item for p in first] == ["b0", "b1"]
    assert [p.item for p in second] == ["a0", "a1"]
    assert queues.take(now=0.01) == []


def test_an_item_past_its_deadline_is_removed_and_never_batched() -> None:
    queues: BatchQueues[str] = BatchQueues(BatchConfig(window_ms=WINDOW_MS, max_batch=8))
    queues.add("v", "late", now=0.0, deadline=0.001)
    queues.add("v", "fine", now=0.0)
    assert queues.wake_at() == 0.001  # the deadline comes before the window
    assert [p.item for p in queues.expire(now=0.001)] == ["late"]
    assert [p.item for p in queues.take(now=0.002)] == ["fine"]


def test_a_removed_item_is_not_run() -> None:
    queues: BatchQueues[str] = BatchQueues(BatchConfig(window_ms=0.0, max_batch=8))
    gone = queues.add("v", "gone", now=0.0)
    queues.add("v", "kept", now=0.0)
    assert queues.remove(gone) and not queues.remove(gone)
    assert [p.item for p in queues.take(now=0.0)] == ["kept"]


def test_impossible_settings_are_refused() -> None:
    for window, size in ((WINDOW_MS, 0), (-1.0, 4), (math.nan, 4), (math.inf, 4)):
        with pytest.raises(ValueError, match="batch"):
            BatchConfig(window_ms=window, max_batch=size)
    assert batch_config_for("cloud", device="cuda:0").window_ms == WINDOW_MS
    assert batch_config_for("cloud").window_ms == 0.0  # on a CPU tensors queue anyway
    assert batch_config_for("cloud").batching  # but still run together
    assert batch_config_for("edge", device="cuda").window_ms == 0.0  # an edge waits for nobody
    assert not batch_config_for("cloud", max_batch=1).batching


# -- the batcher on a loop, with a fake model ---------------------------------------------


class FakeModel:
    """Records each batch; answers item * 10; "bad" fails alone, "poison" breaks a batch."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[tuple[str, list[Any]]] = []
        self.gate = gate

    async def __call__(self, key: str, items: list[Any]) -> Sequence[Any]:
        self.batches.append((key, list(items)))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # a model thread answers later, never at once
        if "poison" in items and len(items) > 1:
            raise RuntimeError("this batch cannot be stacked")
        return [ValueError(f"bad item {i}") if i in ("bad", "poison") else i * 10 for i in items]


def test_requests_that_arrive_together_run_as_one_batch_in_order() -> None:
    model = FakeModel()

    async def scenario() -> list[int]:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(window_ms=50, max_batch=32))
        return await asyncio.gather(*(batcher.submit("v", i) for i in range(5)))

    assert run(scenario()) == [0, 10, 20, 30, 40]
    assert model.batches == [("v", [0, 1, 2, 3, 4])]


def test_batches_are_cut_at_max_batch_and_kept_per_variant() -> None:
    model = FakeModel()

    async def scenario() -> Batcher[int, int]:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(window_ms=5, max_batch=3))
        calls = [batcher.submit("a", i) for i in range(7)] + [batcher.submit("b", 100)]
        await asyncio.gather(*calls)
        return batcher

    batcher = run(scenario())
    assert sorted(len(items) for _, items in model.batches) == [1, 1, 3, 3]
    assert all(len({key}) == 1 for key, _ in model.batches)
    assert ("b", [100]) in model.batches
    assert batcher.stats.describe()["batch_sizes"] == {"1": 2, "3": 2}
    assert batcher.queue_length() == 0


def test_a_lone_request_is_answered_after_the_window() -> None:
    model = FakeModel()

    async def scenario() -> int:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(window_ms=WINDOW_MS))
        return await batcher.submit("v", 4)

    assert run(scenario()) == 40
    assert model.batches == [("v", [4])]


def test_a_malformed_member_fails_alone() -> None:
    model = FakeModel()

    async def scenario() -> list[Any]:
        batcher: Batcher[Any, Any] = Batcher(model, BatchConfig(window_ms=50))
        calls = (batcher.submit("v", item) for item in (1, "bad", 2))
        return await asyncio.gather(*calls, return_exceptions=True)

    first, bad, second = run(scenario())
    assert (first, second) == (10, 20)
    assert isinstance(bad, ValueError)
    assert len(model.batches) == 1


def test_a_member_that_breaks_the_whole_batch_fails_alone() -> None:
    model = FakeModel()

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        batcher: Batcher[Any, Any] = Batcher(model, BatchConfig(window_ms=50))
        calls = (batcher.submit("v", item) for item in (1, "poison", 2))
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results, batcher.stats.describe()

    (first, poison, second), stats = run(scenario())
    assert (first, second) == (10, 20)
    assert isinstance(poison, ValueError)
    # Once together (it raised), then each alone.
    assert [items for _, items in model.batches] == [[1, "poison", 2], [1], ["poison"], [2]]
    assert stats["batch_failures"] == 1 and stats["failed"] == 1


def test_a_request_whose_deadline_passes_in_the_queue_is_refused_not_run_late() -> None:
    gate = asyncio.Event()
    model = FakeModel(gate)

    async def scenario() -> tuple[int, dict[str, Any]]:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(window_ms=0, max_batch=8))
        slow = asyncio.create_task(batcher.submit("v", 1))
        await asyncio.sleep(0.001)  # the model is now busy with item 1
        with pytest.raises(DeadlineExpiredError):
            # Refused at its deadline while the model is still busy, not when it frees up.
            await batcher.submit("v", 2, deadline=asyncio.get_running_loop().time() + 0.01)
        assert not gate.is_set() and not slow.done()
        gate.set()
        return await slow, batcher.stats.describe()

    answer, stats = run(scenario())
    assert answer == 10
    assert model.batches == [("v", [1])]  # item 2 never reached the model
    assert stats["expired"] == 1


def test_a_deadline_already_past_is_refused_at_once() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(), clock=lambda: 100.0)
        with pytest.raises(DeadlineExpiredError):
            await batcher.submit("v", 1, deadline=99.0)

    run(scenario())
    assert model.batches == []


def test_a_request_cancelled_while_queued_is_never_run() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(model, BatchConfig(window_ms=50))
        gone = asyncio.create_task(batcher.submit("v", 1))
        kept = asyncio.create_task(batcher.submit("v", 2))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == 20
        await batcher.aclose()

    run(scenario())
    assert model.batches == [("v", [2])]
