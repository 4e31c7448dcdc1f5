"""The model worker: one thread owns the model; the event loop never runs torch.

Every forward pass (and the preprocessing, encoding and decoding around it)
runs on a single dedicated thread, so requests queue in arrival order and the
asyncio loop stays free to answer sockets, status and BUSY replies.

The worker serves a :class:`ccied.pruning.bundle.Bundle`. A frame is first
*prepared* (the model's input crop, its normalised tensor and the cache's
thumbnail key: no model stage), so the cheapest cache lookup comes before any
stage runs. The head then runs the stages up to the chosen variant's split,
stopping at the cache split first when the deeper key is wanted, and keeps the
cache split's tensor whenever it passes it, so a miss can be sent in that
variant's format, finished here from where the head stopped, and cached at
every depth.

Every stage runs on one torch device (``--device``: the CPU or a CUDA GPU).
Tails that other peers send run in batches (:meth:`ModelWorker.tail_batch`,
fed by ``ccied.peer.batching``): each payload is decoded on its own, so a bad
one fails alone, the decoded tensors are copied once into one batch (pinned
host memory on CUDA, then one transfer), and the tail runs once. What a payload
is, in each encoding, and how it is checked and decoded: ``ccied.peer.payloads``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from ccied.cache import BadFeatureError, thumbnail_feature
from ccied.cache.keys import THUMBNAIL_SIDE
from ccied.peer.payloads import (
    CODEC,
    IMAGE_FORMATS,
    JPEG,
    MAX_JPEG_BYTES,
    RAW,
    WEBP,
    BadTensorError,
    VariantRuntime,
    check_payload,
    decode_payload,
    image_payload,
    stack,
    variant_runtime,
    wire_payload,
)
from ccied.pruning.bundle import Bundle
from ccied.pruning.media import center_crop, normalize, thumbnail

log = logging.getLogger(__name__)

T = TypeVar("T")

# Re-exported: the payload encodings and BadTensorError lived here first.
__all__ = [
    "CODEC",
    "IMAGE_FORMATS",
    "JPEG",
    "MAX_JPEG_BYTES",
    "RAW",
    "WEBP",
    "BadTensorError",
    "HeadResult",
    "ModelWorker",
    "Prediction",
    "Prepared",
]


@dataclass(frozen=True)
class Prediction:
    label: int
    class_name: str
    confidence: float  # softmax probability of the top-1 class
    tail_ms: float


@dataclass(frozen=True)
class Prepared:
    """A checked frame and its thumbnail key (the model's input is made only on a miss)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    thumbnail: np.ndarray | None  # the cache's first key; None for a flat frame
    prepare_ms: float


@dataclass(frozen=True)
class HeadResult:
    """What the head left: the cache key tensor, the wire payload, and where it stopped."""

    # (1, C, H, W) float32 at the cache split, when the head ran through it.
    cache_tensor: np.ndarray | None
    # What crosses the network for the variant; None while the head stopped at
    # the cache split (ModelWorker.complete runs the rest on a miss).
    payload: np.ndarray | None
    encoding: str  # RAW or CODEC
    variant: str
    reach: torch.Tensor  # the last tensor computed, to finish the frame here
    reach_index: int  # index of the last stage run
    head_ms: float


class ModelWorker:
    """Runs the bundle's stages, codecs and preprocessing on one thread."""

    def __init__(self, bundle: Bundle, slowdown: float = 1.0, device: str = "cpu") -> None:
        """``device``: ``cpu`` or ``cuda:N``, as ``ccied.peer.device.resolve_device`` gives it."""
        if slowdown < 1.0:
            raise ValueError(f"slowdown must be at least 1, got {slowdown}")
        self.device = torch.device(device)
        # Batches go host -> GPU through pinned memory (an asynchronous copy).
        self._pinned = self.device.type == "cuda"
        # An emulated slower device: each forward pass takes `slowdown` times
        # as long (the thread sleeps for the difference, so it stays busy).
        self.slowdown = slowdown
        self.bundle = bundle
        self.model = bundle.model
        self.stages = [stage.to(self.device) for stage in bundle.model.stages]
        self.cache_point = bundle.model.split_point(bundle.cache_split)
        self.variants: dict[str, VariantRuntime] = {
            variant.name: variant_runtime(bundle, variant, self.device)
            for variant in bundle.variants
        }
        # Per-stage compute time on this device (measured by warm_up).
        self.stage_ms = [1.0] * len(self.stages)
        # Crop, normalise and thumbnail one frame (measured by warm_up).
        self.prepare_ms = 1.0
        self.last_busy = time.monotonic()
        self.full_ms_ewma = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccied-model")
        # The cache audit's full-model passes: a second thread at the lowest CPU
        # priority, so an audit never queues ahead of a frame on the model thread.
        self._audit_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ccied-audit", initializer=_lowest_priority
        )

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        finally:
            self.last_busy = time.monotonic()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run other CPU work that belongs with the model (cache lookups) on its thread."""
        return await self._run(fn)

    def _emulate(self, start: float) -> float:
        """Stretch the work since ``start`` by the slowdown; returns its ms."""
        elapsed = time.perf_counter() - start
        if self.slowdown > 1.0:
            time.sleep(elapsed * (self.slowdown - 1.0))
        return (time.perf_counter() - start) * 1e3

    async def remeasure(self) -> None:
        """Time each stage again while idle, replacing the estimates neighbours plan with.

        What a peer measured under start-up contention (459 ms for a cloud whose
        tail takes 10-15 ms) would otherwise stand until it served a frame, and a
        peer nobody sends frames to never would. Only ever lowers the figures: an
        idle moment on a machine busy with other work measures high (seen in a CI
        run), and served frames raise the figure again when the peer is slower.
        """
        before, before_full = list(self.stage_ms), self.full_ms_ewma
        await self.warm_up()
        self.stage_ms = [min(a, b) for a, b in zip(before, self.stage_ms, strict=True)]
        if before_full:
            self.full_ms_ewma = min(before_full, self.full_ms_ewma)

    async def warm_up(self) -> None:
        """Run the model twice and time each stage, so routing starts informed."""
        size = self.model.spec.input_size

        def work() -> None:
            start = time.perf_counter()
            self._prepare(np.full((size, size, 3), 128, dtype=np.uint8))
            self.prepare_ms = (time.perf_counter() - start) * 1e3 * self.slowdown
            with torch.inference_mode():
                x = torch.zeros(1, 3, size, size, device=self.device)
                self.stages_forward(x, 0, len(self.stages) - 1)  # first pass: allocations
                self._synchronize()
                timings = []
                for stage in self.stages:
                    start = time.perf_counter()
                    x = stage(x)
                    self._synchronize()  # a CUDA stage has only been queued when it returns
                    timings.append((time.perf_counter() - start) * 1e3 * self.slowdown)
            self.stage_ms = timings
            self.full_ms_ewma = sum(timings)

        await self._run(work)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stages_forward(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for stage in self.stages[first : last + 1]:
            x = stage(x)
        return x

    # -- estimates for the planner --------------------------------------------

    def full_ms(self) -> float:
        return self.full_ms_ewma or sum(self.stage_ms)

    def head_ms(self, variant: str) -> float:
        """This device's time from frame to the variant's split (0 for a JPEG)."""
        return sum(self.stage_ms[: self.variants[variant].index + 1])

    def reach_ms(self, variant: str, with_cache: bool) -> float:
        """This device's head time for ``variant`` when the cache key is computed too."""
        reach = max(self.variants[variant].index, self.cache_point.index if with_cache else -1)
        return sum(self.stage_ms[: reach + 1])

    def tail_share(self, variant: str) -> float:
        """Share of the model's time after the variant's split (for a target's estimate)."""
        total = sum(self.stage_ms) or 1.0
        return 1.0 - self.head_ms(variant) / total

    def local_rest_ms(self, variant: str, with_cache: bool = True) -> float:
        """Time to finish here once the head for ``variant`` (and the cache key) is done."""
        reach = max(self.variants[variant].index, self.cache_point.index if with_cache else -1)
        return sum(self.stage_ms[reach + 1 :])

    def rest_ms_from(self, reach_index: int) -> float:
        """Time to finish here from after stage ``reach_index``."""
        return sum(self.stage_ms[reach_index + 1 :])

    def payload_bytes(self, variant: str) -> float:
        return self.variants[variant].payload_bytes()

    # -- the work -------------------------------------------------------------

    def _prepare(self, pixels: np.ndarray) -> Prepared:
        start = time.perf_counter()
        small = thumbnail(pixels, self.model.spec.input_size, THUMBNAIL_SIDE)
        try:
            key: np.ndarray | None = thumbnail_feature(small)
        except BadFeatureError:  # a flat frame (black, a lens cap): no key, a miss
            key = None
        return Prepared(pixels, key, self._emulate(start))

    async def prepare(self, pixels: np.ndarray) -> Prepared:
        """Check an RGB frame and make its thumbnail key (MediaError if it is not RGB uint8)."""
        return await self._run(lambda: self._prepare(pixels))

    def prepare_now(self, pixels: np.ndarray) -> Prepared:
        """:meth:`prepare` for code already on the model thread (``call``)."""
        return self._prepare(pixels)

    async def head(
        self, frame: np.ndarray | Prepared, variant: str, with_cache: bool = True
    ) -> HeadResult:
        """Run the stages ``variant`` (and, ``with_cache``, the cache key) needs on a frame.

        ``frame`` is an RGB frame or what :meth:`prepare` made of it. With the
        cache, the head stops at the cache split when the variant's split lies
        beyond it: a hit then never pays for the stages in between;
        :meth:`complete` runs them on a miss (``payload`` is None until then).
        Raises ccied.pruning.MediaError for a frame that is not RGB uint8.
        """
        runtime = self.variants[variant]

        def work() -> HeadResult:
            start = time.perf_counter()
            pixels = frame.pixels if isinstance(frame, Prepared) else frame
            crop = center_crop(pixels, self.model.spec.input_size)
            x = normalize(crop, self.model.spec).to(self.device)
            cache_index = self.cache_point.index
            # With the key wanted, stop at the cache split (a later split's
            # stages run in complete(), on a miss); an earlier split's payload
            # is made on the way. A JPEG variant needs no stage but the key's.
            last = cache_index if with_cache else runtime.index
            cache_tensor = at_variant = None
            with torch.inference_mode():
                for index, stage in enumerate(self.stages[: last + 1]):
                    x = stage(x)
                    if index == cache_index:
                        cache_tensor = x.cpu().numpy().astype(np.float32, copy=True)
                    if index == runtime.index:
                        at_variant = x if runtime.encode is None else runtime.encode(x)
            if runtime.variant.is_image:
                payload, encoding = image_payload(runtime, crop)
                return HeadResult(
                    cache_tensor, payload, encoding, variant, x, last, self._emulate(start)
                )
            if at_variant is None:  # stopped at the cache split: complete() on a miss
                return HeadResult(
                    cache_tensor, None, runtime.encoding, variant, x, last, self._emulate(start)
                )
            payload, encoding = wire_payload(runtime, at_variant)
            return HeadResult(
                cache_tensor, payload, encoding, variant, x, last, self._emulate(start)
            )

        return await self._run(work)

    async def complete(self, head: HeadResult) -> HeadResult:
        """Run the rest of a head that stopped at the cache split (a miss needs it)."""
        if head.payload is not None:
            return head
        runtime = self.variants[head.variant]

        def work() -> HeadResult:
            start = time.perf_counter()
            with torch.inference_mode():
                x = self.stages_forward(head.reach, head.reach_index + 1, runtime.index)
                at_variant = x if runtime.encode is None else runtime.encode(x)
            payload, encoding = wire_payload(runtime, at_variant)
            return HeadResult(
                head.cache_tensor,
                payload,
                encoding,
                head.variant,
                x,
                runtime.index,
                head.head_ms + self._emulate(start),
            )

        return await self._run(work)

    def _predict(self, logits: torch.Tensor, start: float, tail_share: float) -> Prediction:
        probs = torch.softmax(logits, dim=1)[0]
        confidence, label = torch.max(probs, dim=0)
        index = int(label)
        tail_ms = self._emulate(start)
        if tail_share > 0.05:
            full = tail_ms / tail_share
            self.full_ms_ewma = 0.8 * self.full_ms_ewma + 0.2 * full if self.full_ms_ewma else full
        return Prediction(
            label=index,
            class_name=self.model.spec.class_names[index],
            confidence=float(confidence),
            tail_ms=tail_ms,
        )

    async def finish(self, head: HeadResult) -> Prediction:
        """Finish a frame here, from where its head stopped (no codec loss)."""
        share = sum(self.stage_ms[head.reach_index + 1 :]) / (sum(self.stage_ms) or 1.0)

        def work() -> Prediction:
            start = time.perf_counter()
            with torch.inference_mode():
                logits = self.stages_forward(head.reach, head.reach_index + 1, len(self.stages) - 1)
            return self._predict(logits, start, share)

        return await self._run(work)

    def check_tensor(self, variant: str, tensor: np.ndarray, encoding: str) -> VariantRuntime:
        """Raise BadTensorError unless the payload fits this variant's tail."""
        return check_payload(self.variants, variant, tensor, encoding)

    async def tail(self, variant: str, tensor: np.ndarray, encoding: str) -> Prediction:
        """Run the variant's tail on a payload another peer sent (BadTensorError if unfit)."""
        self.check_tensor(variant, tensor, encoding)
        (result,) = await self.tail_batch(variant, [(tensor, encoding)])
        if isinstance(result, BadTensorError):
            raise result
        return result

    async def tail_batch(
        self, variant: str, payloads: Sequence[tuple[np.ndarray, str]]
    ) -> list[Prediction | BadTensorError]:
        """Run the variant's tail once on a batch of payloads (tensor, encoding).

        One result per payload, in order: a payload that does not fit or does
        not decode is a BadTensorError in its place and leaves the others be.
        Each prediction's ``tail_ms`` is its share of the batch (the batch's
        time over its size): what a frame costs this peer, so a neighbour's
        estimate from replies (tail time x queue) reflects the batching.
        """
        runtime = self.variants.get(variant)
        share = self.tail_share(variant) if runtime is not None else 1.0

        def work() -> list[Prediction | BadTensorError]:
            start = time.perf_counter()
            failures: list[BadTensorError | None] = []
            inputs: list[np.ndarray] = []
            for tensor, encoding in payloads:
                try:
                    checked = self.check_tensor(variant, tensor, encoding)
                    inputs.append(decode_payload(checked, tensor, self.model.spec))
                    failures.append(None)
                except BadTensorError as exc:
                    failures.append(exc)
            if runtime is None or not inputs:
                return [f for f in failures if f is not None]
            with torch.inference_mode():
                x = stack(inputs, self.device, self._pinned)
                if runtime.decode is not None:
                    x = runtime.decode(x)
                logits = self.stages_forward(x, runtime.index + 1, len(self.stages) - 1)
                confidences, labels = torch.max(torch.softmax(logits, dim=1), dim=1)
                answers = iter(zip(labels.cpu().tolist(), confidences.cpu().tolist(), strict=True))
            tail_ms = self._emulate(start) / len(inputs)
            if share > 0.05:
                full = tail_ms / share
                self.full_ms_ewma = (
                    0.8 * self.full_ms_ewma + 0.2 * full if self.full_ms_ewma else full
                )
            out: list[Prediction | BadTensorError] = []
            for failure in failures:
                if failure is not None:
                    out.append(failure)
                    continue
                label, confidence = next(answers)
                out.append(
                    Prediction(
                        label=int(label),
                        class_name=self.model.spec.class_names[int(label)],
                        confidence=float(confidence),
                        tail_ms=tail_ms,
                    )
                )
            return out

        return await self._run(work)

    async def audit(self, frame: np.ndarray) -> Prediction:
        """The full, unpruned float32 model on a frame, at low priority (the cache audit)."""
        size = self.model.spec.input_size

        def work() -> Prediction:
            start = time.perf_counter()
            x = normalize(center_crop(frame, size), self.model.spec).to(self.device)
            with torch.inference_mode():
                logits = self.stages_forward(x, 0, len(self.stages) - 1)
            probs = torch.softmax(logits, dim=1)[0]
            confidence, label = torch.max(probs, dim=0)
            return Prediction(
                int(label),
                self.model.spec.class_names[int(label)],
                float(confidence),
                self._emulate(start),
            )

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._audit_executor, work)

    def close(self) -> None:
        """Finish the forward pass under way, drop queued ones, stop the threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._audit_executor.shutdown(wait=True, cancel_futures=True)


def _lowest_priority() -> None:
    """Run this thread at nice 19 (Linux applies setpriority to one thread by its id)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        log.debug("could not lower the audit thread's priority")
