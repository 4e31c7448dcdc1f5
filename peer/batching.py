"""Dynamic batching: requests for one variant that arrive together run as one batch.

Pure asyncio, no torch and no sockets: the function that runs a batch and the
clock are passed in, so the rules are tested with a fake model.

The rules (NVIDIA Triton's dynamic batcher, with one model thread behind it):

* items wait in one queue per key (a bundle variant: the tensors of two
  variants have different shapes, so only one variant's items can be stacked);
* a queue is *ready* when it holds ``max_batch`` items, or when its oldest item
  has waited ``window_ms``: a lone request never waits longer than the window
  for company (it may still wait for the batch that is running);
* one batch runs at a time. The model has one thread: a second batch handed
  over while the first runs would only wait behind it, while here it keeps
  growing. When a batch ends, the ready queue whose oldest item is oldest goes
  next, with up to ``max_batch`` items, oldest first;
* an item whose deadline passes while it waits fails at that moment with
  :class:`DeadlineExpiredError` and is never run (its sender has given up);
* ``run_batch`` returns one result or exception per item, so a member that
  cannot be decoded fails alone. If it raises as a whole, each item of a batch
  of several is run again alone: one poisoned member still fails only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")  # an item to run (the wire payload of one request)
ResultT = TypeVar("ResultT")  # its result

# A cloud waits this long for a batch to fill: about a fifth of a tail on this
# CPU (8.6 ms at batch 1, blocks.11-b6) and of the order of a GPU's whole batch.
DEFAULT_BATCH_WINDOW_MS = 2.0
# Past 32 a batch gains no more on this CPU (5.0 ms a frame at 16 and at 32
# for blocks.11-b6, 1 thread); a GPU gains up to 64 and more.
DEFAULT_MAX_BATCH = 32

RunBatch = Callable[[str, list[ItemT]], Awaitable[Sequence[ResultT | Exception]]]


class DeadlineExpiredError(Exception):
    """The request's deadline passed while it waited for a batch: it was not run."""


@dataclass(frozen=True)
class BatchConfig:
    """How long a batch may wait to fill, and how large it may grow."""

    window_ms: float = DEFAULT_BATCH_WINDOW_MS
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_ms) and self.window_ms >= 0):
            raise ValueError(f"the batch window must be 0 ms or more, got {self.window_ms}")
        if self.max_batch < 1:
            raise ValueError(f"the largest batch must be at least 1, got {self.max_batch}")

    @property
    def batching(self) -> bool:
        return self.max_batch > 1


@dataclass(eq=False)
class Pending(Generic[ItemT]):
    """One queued item; identity is the object (two equal payloads are two requests)."""

    key: str
    item: ItemT
    arrived: float
    deadline: float = math.inf


class BatchQueues(Generic[ItemT]):
    """The batcher's decisions as pure logic over explicit times (no loop, no clock)."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self._window_s = config.window_ms / 1e3
        self._queues: dict[str, deque[Pending[ItemT]]] = {}

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def lengths(self) -> dict[str, int]:
        return {key: len(queue) for key, queue in self._queues.items()}

    def add(self, key: str, item: ItemT, now: float, deadline: float = math.inf) -> Pending[ItemT]:
        pending = Pending(key, item, now, deadline)
        self._queues.setdefault(key, deque()).append(pending)
        return pending

    def remove(self, pending: Pending[ItemT]) -> bool:
        """Drop an item that is still waiting (its requester went away)."""
        queue = self._queues.get(pending.key)
        if queue is None or pending not in queue:
            return False
        queue.remove(pending)
        if not queue:
            del self._queues[pending.key]
        return True

    def expire(self, now: float) -> list[Pending[ItemT]]:
        """Remove and return the items whose deadline has passed."""
        gone: list[Pending[ItemT]] = []
        for key in list(self._queues):
            queue = self._queues[key]
            if any(p.deadline <= now for p in queue):
                gone.extend(p for p in queue if p.deadline <= now)
                kept = deque(p for p in queue if p.deadline > now)
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
        return gone

    def _ready(self, queue: deque[Pending[ItemT]], now: float) -> bool:
        return len(queue) >= self.config.max_batch or now >= queue[0].arrived + self._window_s

    def take(self, now: float) -> list[Pending[ItemT]]:
        """The next batch if a queue is ready (oldest first), else []."""
        ready = [q for q in self._queues.values() if self._ready(q, now)]
        if not ready:
            return []
        queue = min(ready, key=lambda q: q[0].arrived)
        size = min(len(queue), self.config.max_batch)
        batch = [queue.popleft() for _ in range(size)]
        if not queue:
            del self._queues[batch[0].key]
        return batch

    def wake_at(self) -> float | None:
        """When the next queue becomes ready or the next deadline passes (None: empty)."""
        times = []
        for queue in self._queues.values():
            full = len(queue) >= self.config.max_batch
            times.append(queue[0].arrived if full else queue[0].arrived + self._window_s)
            times.append(min(p.deadline for p in queue))
        return min(times) if times else None


@dataclass
class BatchStats:
    """What ran: batches by size, items, and items that expired or failed."""

    sizes: Counter[int] = field(default_factory=Counter)
    expired: int = 0
    failed: int = 0
    batch_failures: int = 0  # batches that raised as a whole (their items ran alone)

    def describe(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        items = sum(size * count for size, count in self.sizes.items())
        return {
            "batches": batches,
            "items": items,
            "mean_batch": round(items / batches, 3) if batches else 0.0,
            # JSON keys are strings; sorted so a reader sees the histogram in order.
            "batch_sizes": {str(size): self.sizes[size] for size in sorted(self.sizes)},
            "expired": self.expired,
            "failed": self.failed,
            "batch_failures": self.batch_failures,
        }


class Batcher(Generic[ItemT, ResultT]):
    """Queues items per key and runs them in batches through ``run_batch`` (loop only)."""

    def __init__(
        self,
        run_batch: RunBatch[ItemT, ResultT],
        config: BatchConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BatchConfig()
        self._run_batch = run_batch
        self._clock = clock
        self._queues: BatchQueues[ItemT] = BatchQueues(self.config)
        self._futures: dict[Pending[ItemT], asyncio.Future[ResultT]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = 0  # items in the batch under way
        self.stats = BatchStats()

    def queue_length(self) -> int:
        """Items waiting plus those in the batch under way."""
        return len(self._queues) + self._running

    async def submit(self, key: str, item: ItemT, deadline: float | None = None) -> ResultT:
        """Run ``item`` in a batch of ``key``; ``deadline`` is a time on the batcher's clock.

        Raises :class:`DeadlineExpiredError` when the deadline passes before its
        batch starts, or what ``run_batch`` returned or raised for the item.
        """
        now = self._clock()
        if deadline is not None and deadline <= now:
            self.stats.expired += 1
            raise DeadlineExpiredError("the deadline had passed on arrival")
        pending = self._queues.add(key, item, now, math.inf if deadline is None else deadline)
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._futures[pending] = future
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._dispatch(), name="ccied-batcher")
        try:
            if deadline is None:
                return await future
            try:
                # While a long batch runs the dispatcher cannot look: refuse at the deadline.
                return await asyncio.wait_for(asyncio.shield(future), deadline - now)
            except TimeoutError:
                if not self._queues.remove(pending):
                    return await future  # its batch is under way: the answer is coming
                self._futures.pop(pending, None)
                self.stats.expired += 1
                raise DeadlineExpiredError(
                    f"waited {(self._clock() - now) * 1e3:.0f} ms for a batch, past its deadline"
                ) from None
        except asyncio.CancelledError:
            # The requester went away (shutdown): never run its item.
            if self._queues.remove(pending):
                self._futures.pop(pending, None)
            raise

    async def aclose(self) -> None:
        """Stop dispatching; items still waiting are cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()

    async def _dispatch(self) -> None:
        # Ends when nothing waits; the next submit starts it again. No await
        # lies between the emptiness check and the return, so an item cannot
        # arrive unseen in between (one loop, one thread).
        while len(self._queues):
            now = self._clock()
            for pending in self._queues.expire(now):
                self.stats.expired += 1
                self._settle(
                    pending,
                    DeadlineExpiredError(
                        f"waited {(now - pending.arrived) * 1e3:.0f} ms for a batch, past its "
                        "deadline"
                    ),
                )
            batch = self._queues.take(now)
            if not batch:
                wake = self._queues.wake_at()
                if wake is None:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, wake - self._clock()))
                continue
            await self._run(batch)

    async def _run(self, batch: list[Pending[ItemT]]) -> None:
        key, items = batch[0].key, [p.item for p in batch]
        self._running = len(batch)
        try:
            results = await self._results(key, items)
        finally:
            self._running = 0
        self.stats.sizes[len(batch)] += 1
        for pending, result in zip(batch, results, strict=True):
            self._settle(pending, result)

    async def _results(self, key: str, items: list[ItemT]) -> list[ResultT | Exception]:
        try:
            results = list(await self._run_batch(key, items))
            if len(results) != len(items):
                raise RuntimeError(f"a batch of {len(items)} gave {len(results)} results")
            return results
        except Exception as exc:  # the batch as a whole failed: find the member that breaks it
            if len(items) == 1:
                return [exc]
            self.stats.batch_failures += 1
            log.warning(
                "a batch of %d %s items failed (%s); running them one by one", len(items), key, exc
            )
        alone: list[ResultT | Exception] = []
        for item in items:
            try:
                single = list(await self._run_batch(key, [item]))
            except Exception as exc:  # this member fails alone, the others still run
                alone.append(exc)
                continue
            alone.append(single[0] if len(single) == 1 else RuntimeError("no result"))
        return alone

    def _settle(self, pending: Pending[ItemT], result: ResultT | Exception) -> None:
        future = self._futures.pop(pending, None)
        if future is None or future.done():  # its requester went away meanwhile
            return
        if isinstance(result, Exception):
            self.stats.failed += 1
            future.set_exception(result)
        else:
            future.set_result(result)
