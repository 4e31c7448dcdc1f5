"""The model worker: one thread owns the model; the event loop never runs torch.

Every forward pass (and the preprocessing before it) runs on a single
dedicated thread, so requests queue in arrival order and the asyncio loop stays
free to answer sockets, status and BUSY replies while the model is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from ccied.pruning import StagedModel, preprocess

log = logging.getLogger(__name__)

T = TypeVar("T")


class BadTensorError(ValueError):
    """An intermediate tensor that this peer's tail cannot take."""


@dataclass(frozen=True)
class Prediction:
    label: int
    class_name: str
    confidence: float  # softmax probability of the top-1 class
    tail_ms: float


class ModelWorker:
    """Runs head, tail and preprocessing of one split model on one thread."""

    def __init__(self, model: StagedModel, split: str, slowdown: float = 1.0) -> None:
        if slowdown < 1.0:
            raise ValueError(f"slowdown must be at least 1, got {slowdown}")
        # An emulated slower device: each forward pass takes `slowdown` times
        # as long (the thread sleeps for the difference, so it stays busy).
        self.slowdown = slowdown
        self.tail_ms_ewma = 0.0
        self.model = model
        self.point = model.split_point(split)
        self._head, self._tail = model.split(split)
        self.tensor_shape = (1, *self.point.output_shape)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccied-model")

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run other CPU work that belongs with the model (cache lookups) on its thread."""
        return await self._run(fn)

    async def warm_up(self) -> None:
        """One forward pass on zeros, so the first real frame is not the slow one."""
        size = self.model.spec.input_size

        def work() -> None:
            x = torch.zeros(1, 3, size, size)
            with torch.inference_mode():
                middle = self._head(x)
                self._tail(middle)  # the first pass is slow (allocations, kernels)
                start = time.perf_counter()
                self._tail(middle)
            # A first estimate of the tail time, so routing starts informed.
            self.tail_ms_ewma = self._emulate(start)

        await self._run(work)

    async def head(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Preprocess an RGB frame and run the head; returns the tensor and head ms.

        Raises ccied.pruning.MediaError for a frame that is not RGB uint8.
        """

        def work() -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            x = preprocess(pixels, self.model.spec)
            with torch.inference_mode():
                out = self._head(x)
            return out.numpy().astype(np.float32, copy=False), self._emulate(start)

        return await self._run(work)

    def _emulate(self, start: float) -> float:
        """Stretch the work since ``start`` by the slowdown; returns its ms."""
        elapsed = time.perf_counter() - start
        if self.slowdown > 1.0:
            time.sleep(elapsed * (self.slowdown - 1.0))
        return (time.perf_counter() - start) * 1e3

    def check_tensor(self, tensor: np.ndarray) -> None:
        """Raise BadTensorError unless the tensor fits this tail (shape, dtype, finite)."""
        if tuple(tensor.shape) != self.tensor_shape:
            raise BadTensorError(
                f"tensor shape {tuple(tensor.shape)}, expected {self.tensor_shape}"
            )
        if tensor.dtype != np.float32:
            raise BadTensorError(f"tensor dtype {tensor.dtype}, expected float32")
        if not np.isfinite(tensor).all():
            raise BadTensorError("tensor holds NaN or infinity")

    async def tail(self, tensor: np.ndarray) -> Prediction:
        """Run the tail on a checked intermediate tensor; returns the top-1 prediction."""
        self.check_tensor(tensor)

        def work() -> Prediction:
            start = time.perf_counter()
            # The wire gives a read-only buffer; torch wants a writable one.
            x = torch.from_numpy(np.array(tensor, dtype=np.float32, copy=True))
            with torch.inference_mode():
                probs = torch.softmax(self._tail(x), dim=1)[0]
            confidence, label = torch.max(probs, dim=0)
            index = int(label)
            tail_ms = self._emulate(start)
            self.tail_ms_ewma = (
                tail_ms if not self.tail_ms_ewma else (0.8 * self.tail_ms_ewma + 0.2 * tail_ms)
            )
            return Prediction(
                label=index,
                class_name=self.model.spec.class_names[index],
                confidence=float(confidence),
                tail_ms=tail_ms,
            )

        return await self._run(work)

    def close(self) -> None:
        """Finish the forward pass under way, drop queued ones, stop the thread."""
        self._executor.shutdown(wait=True, cancel_futures=True)
