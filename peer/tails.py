"""Tails for other peers: checked at once, batched per variant, run on the model thread.

The daemon hands each neighbour's tensor to :class:`TailService`. A payload
whose shape, dtype or variant is wrong is refused before it queues; the rest
wait for a batch of their variant (``ccied.peer.batching``) and run together
(:meth:`ccied.peer.worker.ModelWorker.tail_batch`).

Every peer batches what queued while its model was busy (up to ``--max-batch``;
1 turns batching off). Only a cloud on a GPU also waits up to
``DEFAULT_BATCH_WINDOW_MS`` for company: there a tail takes well under a
millisecond, so tensors rarely queue behind one another and a short wait is what
forms batches (not measured yet: no GPU where ccied is built). On a CPU a tail
takes 5-10 ms and the fleet's tensors queue behind it anyway, so the window is
pure cost. Measured here (2 cores, 2026-11-30): ``ccied bench cloud --quick
--window-ms 0`` gave 1.1x the unbatched frames/s at concurrency 1, 1.62x at 16
and 2.2x at 64, against 0.64-0.84x, 1.47-2.03x and 1.66x with a 2 ms window; and
in ``ccied bench cluster --quick`` the 2 ms window added 3-5 ms to every miss
sent to the cloud.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ccied.discovery.logutil import WarnOnce
from ccied.peer.batching import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH,
    BatchConfig,
    Batcher,
    DeadlineExpiredError,
)
from ccied.peer.counters import Counters
from ccied.peer.replies import Replies
from ccied.peer.wire import ErrorCode, ErrorReply, InferRequest, Message, Source
from ccied.peer.worker import BadTensorError, ModelWorker, Prediction

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

__all__ = ["DeadlineExpiredError", "TailService", "batch_config_for", "default_window_ms"]

Payload = tuple[np.ndarray, str]  # (tensor, encoding)


def default_window_ms(role: str, device: str = "cpu") -> float:
    """How long a tensor waits for company by default: a cloud on a GPU waits
    DEFAULT_BATCH_WINDOW_MS, every other peer 0 (see the module docstring)."""
    return DEFAULT_BATCH_WINDOW_MS if role == "cloud" and device.startswith("cuda") else 0.0


def batch_config_for(
    role: str, window_ms: float | None = None, max_batch: int | None = None, device: str = "cpu"
) -> BatchConfig:
    """The batching a peer of ``role`` on ``device`` uses when the options leave it open
    (ValueError for a negative window or a max batch under 1)."""
    if window_ms is None:
        window_ms = default_window_ms(role, device)
    return BatchConfig(
        window_ms=window_ms, max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch
    )


class TailService:
    """Runs neighbours' tensors through the worker in batches (event loop only)."""

    def __init__(
        self,
        worker: ModelWorker,
        config: BatchConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self.config = config
        self._batcher: Batcher[Payload, Prediction] = Batcher(self._run_batch, config, clock)
        self._clock = clock

    async def _run_batch(
        self, variant: str, payloads: list[Payload]
    ) -> list[Prediction | BadTensorError]:
        return await self.worker.tail_batch(variant, payloads)

    async def run(
        self, variant: str, tensor: np.ndarray, encoding: str, deadline_ms: float = 0.0
    ) -> Prediction:
        """The tail's answer for one payload.

        ``deadline_ms`` is the sender's budget from now (0 or less: none). Raises
        BadTensorError for a payload this bundle's tail cannot take, and
        DeadlineExpiredError when the budget runs out before its batch starts.
        """
        self.worker.check_tensor(variant, tensor, encoding)  # refused before it queues
        deadline = self._clock() + deadline_ms / 1e3 if deadline_ms > 0 else None
        return await self._batcher.submit(variant, (tensor, encoding), deadline)

    def queue_length(self) -> int:
        """Tensors waiting for a batch or in the batch under way."""
        return self._batcher.queue_length()

    def status(self) -> dict[str, Any]:
        """Settings and what ran, for ``ccied status`` (batch sizes as a histogram)."""
        return {
            "enabled": self.config.batching,
            "window_ms": self.config.window_ms,
            "max_batch": self.config.max_batch,
            "queued": self.queue_length(),
            **self._batcher.stats.describe(),
        }

    async def answer(
        self,
        request: InferRequest,
        bundle_id: str,
        serves_as: Source,
        counters: Counters,
        reply: Replies,
    ) -> Message:
        """A neighbour's tensor: its tail's answer if we share its bundle, else why not."""
        if request.bundle_id != bundle_id:
            counters.refused_bundle += 1
            warn_once(
                f"bundle:{request.origin}",
                "refused tensor from %s: bundle %s, ours is %s",
                request.origin,
                request.bundle_id,
                bundle_id,
            )
            return ErrorReply(
                request_id=request.request_id,
                bundle_id=bundle_id,
                code=ErrorCode.BUNDLE_MISMATCH,
                message=f"bundle {request.bundle_id!r} differs from this peer's {bundle_id!r}",
            )
        started = time.perf_counter()
        counters.computing += 1
        try:
            prediction = await self.run(
                request.variant, request.tensor, request.encoding, request.deadline_ms
            )
        except BadTensorError as exc:
            counters.errors += 1
            return ErrorReply(
                request_id=request.request_id, code=ErrorCode.BAD_TENSOR, message=str(exc)
            )
        except DeadlineExpiredError as exc:  # its sender has moved on: not run late
            counters.busy += 1
            return ErrorReply(request_id=request.request_id, code=ErrorCode.BUSY, message=str(exc))
        finally:
            counters.computing -= 1
        counters.served_for_peers += 1
        return reply(
            request.request_id,
            prediction.label,
            prediction.confidence,
            serves_as,
            bundle_id=bundle_id,
            tail_ms=prediction.tail_ms,
            served_ms=(time.perf_counter() - started) * 1e3,
        )

    async def aclose(self) -> None:
        await self._batcher.aclose()
