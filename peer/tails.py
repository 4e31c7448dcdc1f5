"""Tails for other peers: checked at once, batched per variant, run on the model thread.

The daemon hands each neighbour's tensor to :class:`TailService`. A payload
whose shape, dtype or variant is wrong is refused before it queues; the rest
wait for a batch of their variant (``ccied.peer.batching``) and run together
(:meth:`ccied.peer.worker.ModelWorker.tail_batch`).

Batching by role: a cloud waits up to ``DEFAULT_BATCH_WINDOW_MS`` for company,
since it serves a fleet whose requests arrive together. An edge waits for
nobody (window 0): the requests that queued while its model was busy still run
as one batch, but a neighbour's lone tensor never waits for others that rarely
come. ``--max-batch 1`` turns batching off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ccied.peer.batching import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH,
    BatchConfig,
    Batcher,
    DeadlineExpiredError,
)
from ccied.peer.worker import BadTensorError, ModelWorker, Prediction

__all__ = ["DeadlineExpiredError", "TailService", "batch_config_for"]

Payload = tuple[np.ndarray, str]  # (tensor, encoding)


def batch_config_for(
    role: str, window_ms: float | None = None, max_batch: int | None = None
) -> BatchConfig:
    """The batching a peer of ``role`` uses when the options leave it open (ValueError
    for a negative window or a max batch under 1)."""
    if window_ms is None:
        window_ms = DEFAULT_BATCH_WINDOW_MS if role == "cloud" else 0.0
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

    async def aclose(self) -> None:
        await self._batcher.aclose()
