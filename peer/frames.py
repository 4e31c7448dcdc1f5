"""One frame from pixels to its one answer.

An application's frame (:meth:`Frames.answer_frame`):

1. prepare it (crop, input tensor, thumbnail key) and look the thumbnail up on
   the model thread: a hit answers before any model stage runs;
2. plan it (:func:`ccied.peer.policy.plan_frame`): the variant, whether the
   deeper cache key pays, the route; run the head, stopping at the key when
   it is looked up;
3. on a miss, finish the head and try the route's targets in order until one
   answers, else finish here (every frame gets exactly one answer); cache the
   answer at every depth whose key the frame has.

A hit is sometimes re-checked by the full model off the critical path (the
audit); a miss now and then sends a copy to an idle neighbour only to time it.
The model runs on the worker's thread only; this runs on the event loop. (A
neighbour's tensor goes to :class:`ccied.peer.tails.TailService` instead.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ccied.cache import (
    THUMBNAIL_KEY,
    BadFeatureError,
    LookupResult,
    MissReason,
    feature_from_tensor,
)
from ccied.discovery.logutil import WarnOnce
from ccied.peer.cluster import Cluster, LocalLoad
from ccied.peer.counters import Counters
from ccied.peer.peer_cache import PeerCache
from ccied.peer.policy import (
    INITIAL_HIT_RATE,
    CacheState,
    Device,
    Floors,
    Need,
    Plan,
    next_hit_rate,
    plan_frame,
    route,
)
from ccied.peer.replies import Replies
from ccied.peer.routing import Candidate
from ccied.peer.sharing import Sharing
from ccied.peer.wire import (
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    Source,
    Submit,
)
from ccied.peer.worker import HeadResult, ModelWorker, Prepared
from ccied.pruning import MediaError
from ccied.pruning.bundle import Bundle

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Audits under way at once: more waiting would only delay the frames behind them.
MAX_PENDING_AUDITS = 2


@dataclass(frozen=True)
class FrameSettings:
    """The parts of a peer's configuration that decide how its frames go."""

    name: str
    serves_as: Source  # what this peer's tails are, to others: PEER or CLOUD
    variant: str | None = None  # pinned
    variants: tuple[str, ...] = ()  # allowed (empty: all)
    floors: Floors = field(default_factory=Floors)  # --fidelity-floor(-all)
    always_offload: bool = False
    remote_timeout_s: float = 2.0
    max_pending: int = 32  # what "load" in a heartbeat is a share of


class Frames:
    """Frames and tensors through the worker, the cache and the cluster (event loop only)."""

    def __init__(
        self,
        settings: FrameSettings,
        bundle: Bundle,
        worker: ModelWorker,
        counters: Counters,
        cache: PeerCache | None = None,
        cluster: Cluster | None = None,
        sharing: Sharing | None = None,
    ) -> None:
        self.settings = settings
        self.reply = Replies(worker.model.spec.class_names, settings.name)
        self.bundle = bundle
        self.worker = worker
        self.counters = counters
        self.cache = cache
        self.cluster = cluster
        self.sharing = sharing
        self.variant_counts: dict[str, int] = dict.fromkeys(worker.variants, 0)
        self._hit_rate = INITIAL_HIT_RATE  # of deeper lookups, moving average
        self._since_lookup = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def local_load(self) -> LocalLoad:
        """What this peer's heartbeats tell its neighbours about it."""
        return LocalLoad(
            load=self.counters.computing / self.settings.max_pending,
            queue_length=self.counters.computing,
            full_ms=self.worker.full_ms(),
        )

    def _candidates(self) -> list[Candidate]:
        return self.cluster.candidates() if self.cluster is not None else []

    # -- the plan ---------------------------------------------------------------

    def device(self) -> Device:
        """This peer's own figures for the variants it may send, as the policy needs them."""
        worker, pinned = self.worker, self.settings.variant
        names = [pinned] if pinned else list(self.settings.variants or worker.variants)
        default = pinned or self.bundle.default_variant
        names.sort(key=lambda n: n != default)  # the default first
        return Device(
            variants=tuple(self.bundle.variant(n) for n in names),
            head_ms={n: worker.head_ms(n) for n in names},
            tail_share={n: worker.tail_share(n) for n in names},
            payload_bytes={n: worker.payload_bytes(n) for n in names},
            rest_ms={n: worker.local_rest_ms(n, with_cache=False) for n in names},
            full_ms=worker.full_ms(),
            key_ms=sum(worker.stage_ms[: worker.cache_point.index + 1]),
            queue_length=max(0, self.counters.computing - 1),
        )

    def plan(self, need: str, inconclusive: bool, *, count: bool = True) -> Plan:
        """The plan for a frame; with ``count``, the deeper key's skips are counted."""
        cache = CacheState(
            enabled=self.cache is not None,
            hit_rate=self._hit_rate,
            inconclusive=inconclusive,
            since_lookup=self._since_lookup,
        )
        plan = plan_frame(
            self.device(),
            self._candidates(),
            Need(need),
            cache,
            pinned=self.settings.variant,
            floors=self.settings.floors,
            always_offload=self.settings.always_offload,
        )
        if not count:
            return plan
        if plan.look_up_deeper:
            self._since_lookup = 0
        elif plan.skipped:
            self._since_lookup += 1
            self.counters.cache_skipped += 1
        return plan

    # -- an application's frame ---------------------------------------------------

    async def answer_frame(self, request: Submit) -> Message:
        self.counters.submitted += 1
        self.counters.computing += 1
        try:
            return await self._answer_frame(request)
        finally:
            self.counters.computing -= 1

    async def _answer_frame(self, request: Submit) -> Message:
        cache = self.cache
        try:
            prepared, lookup = await self.worker.call(
                functools.partial(self._prepare_and_look_up, request.pixels)
            )
        except MediaError as exc:
            self.counters.errors += 1
            return ErrorReply(
                request_id=request.request_id, code=ErrorCode.BAD_FRAME, message=str(exc)
            )
        features: dict[str, np.ndarray] = {}
        reason = ""
        inconclusive = False
        if cache is not None:
            if prepared.thumbnail is None:
                reason = MissReason.NO_KEY
            else:
                features[THUMBNAIL_KEY] = prepared.thumbnail
            if lookup is not None:
                if lookup.hit:
                    return self._cache_answer(request, prepared, lookup, THUMBNAIL_KEY, features)
                reason, inconclusive = lookup.reason, lookup.inconclusive
        plan = self.plan(request.need, inconclusive)
        self.variant_counts[plan.variant] += 1
        head = await self.worker.head(prepared, plan.variant, with_cache=plan.look_up_deeper)
        deep = self.worker.cache_point.name
        if cache is not None and head.cache_tensor is not None:
            try:
                deep_feature = feature_from_tensor(head.cache_tensor)
            except BadFeatureError as exc:  # NaN or a flat tensor: no key at this depth
                warn_once("feature", "frame %s has no %s key: %s", request.frame_name, deep, exc)
            else:
                features[deep] = deep_feature
                if plan.look_up_deeper:
                    deep_lookup = await self.worker.call(
                        functools.partial(cache.lookup, deep, deep_feature)
                    )
                    self._hit_rate = next_hit_rate(self._hit_rate, deep_lookup.hit)
                    if deep_lookup.hit:
                        return self._cache_answer(
                            request, prepared, deep_lookup, deep, features, head.head_ms
                        )
                    reason = deep_lookup.reason
        if cache is not None and inconclusive and not plan.look_up_deeper:
            reason = MissReason.SKIPPED
        head = await self.worker.complete(head)
        result = await self.resolve_miss(request.request_id, request.frame_name, head)
        result = dataclasses.replace(
            result, head_ms=result.head_ms + prepared.prepare_ms, cache_reason=str(reason)
        )
        if cache is not None:
            cache.tiers.note_frame(None, str(reason))
            if features:
                cache.insert_later(features, result.label, result.confidence)
        return result

    def _prepare_and_look_up(self, pixels: np.ndarray) -> tuple[Prepared, LookupResult | None]:
        """On the model thread: prepare the frame and look its thumbnail up (no stage runs)."""
        prepared = self.worker.prepare_now(pixels)
        if self.cache is None or prepared.thumbnail is None:
            return prepared, None
        return prepared, self.cache.lookup(THUMBNAIL_KEY, prepared.thumbnail)

    def _cache_answer(
        self,
        request: Submit,
        prepared: Prepared,
        lookup: LookupResult,
        depth: str,
        features: dict[str, np.ndarray],
        head_ms: float = 0.0,
    ) -> InferResult:
        """Answer a frame from the cache; maybe audit the answer off the critical path.

        A hit at a deeper key also files the frame's thumbnail key with that
        answer, so the next such frame is answered before any stage runs: in
        `ccied bench cache` at 4x, without this, the second pass over the pans
        was answered 52 times at blocks.4 (139 ms median) and 29 times at the
        thumbnail (4 ms), because frames a deep key had answered never reached
        the thumbnail's index."""
        cache = self.cache
        assert cache is not None
        cache.tiers.note_frame(depth)
        self.counters.answer(Source.CACHE)
        if depth != THUMBNAIL_KEY and THUMBNAIL_KEY in features:
            cache.promote(
                THUMBNAIL_KEY,
                features[THUMBNAIL_KEY],
                lookup.label,
                lookup.confidence,
                lookup.origin,
            )
        # should_check() first: a skipped audit (too many under way) still uses its turn.
        if cache.audit.should_check() and cache.audit.pending < MAX_PENDING_AUDITS:
            self._spawn(self._audit(prepared, lookup, depth, features))
        return self.reply(
            request.request_id,
            lookup.label,
            lookup.confidence,
            Source.CACHE,
            frame_name=request.frame_name,
            head_ms=prepared.prepare_ms + head_ms,
            cache_entry=cache.public_id(depth, lookup.entry_id),
            cache_distance=lookup.distance,
            cache_depth=depth,
        )

    async def _audit(
        self,
        prepared: Prepared,
        lookup: LookupResult,
        depth: str,
        features: dict[str, np.ndarray],
    ) -> None:
        """Re-check a hit with the full model; the answer already given stays as it was.

        With a live neighbour, the frame's head goes there in the most faithful
        variant (a tail's worth of work elsewhere, a head's here); alone, the
        full model runs here on a low-priority thread, so frames never queue
        behind an audit on the model thread.
        """
        cache = self.cache
        assert cache is not None
        cache.audit.pending += 1
        head: HeadResult | None = None
        try:
            if self._candidates():
                variant = self.plan(Need.ACCURACY, inconclusive=False, count=False).variant
                head = await self.worker.complete(
                    await self.worker.head(prepared, variant, with_cache=False)
                )
                truth = await self.resolve_miss("", "", head, count=False)
                label, confidence = truth.label, truth.confidence
            else:
                full = await self.worker.audit(prepared.pixels)
                label, confidence = full.label, full.confidence
        except Exception:  # an audit must never cost the daemon; the hit stands
            log.exception("cache audit failed")
            return
        finally:
            cache.audit.pending -= 1
        wrong = label != lookup.label
        verdict = cache.audit.record(lookup.origin, wrong, confidence)
        if wrong:
            await cache.apply_verdict(
                verdict, depth, lookup.entry_id, lookup.origin, lookup.label, label
            )
            if verdict.refuse_origin and self.sharing is not None:
                self.sharing.refuse_origin(lookup.origin)
            # The full model's answer replaces the wrong one.
            if head is not None and head.cache_tensor is not None:
                with contextlib.suppress(BadFeatureError):
                    features = {
                        **features,
                        self.worker.cache_point.name: feature_from_tensor(head.cache_tensor),
                    }
            cache.insert_later(features, label, confidence)

    # -- a miss -------------------------------------------------------------------

    async def resolve_miss(
        self, request_id: str, frame_name: str, head: HeadResult, count: bool = True
    ) -> InferResult:
        """The tail at the first target of the route that answers, else our own.

        The route is priced again now, for this variant, with the neighbours'
        figures as they are after the head ran. ``count=False`` for the
        audit's re-checks: not an application's answer."""
        assert head.payload is not None, "complete() the head before resolving a miss"
        sent = received = 0
        targets = route(
            self._candidates(),
            head.variant,
            self.device(),
            self.worker.rest_ms_from(head.reach_index),
            always_offload=self.settings.always_offload,
        )
        label, confidence, source, served_by = -1, 0.0, Source.LOCAL, ""
        tail_ms = 0.0
        for target in targets:
            assert self.cluster is not None
            exchange = await self.cluster.request(
                target, self._infer_request(head), self.settings.remote_timeout_s
            )
            sent, received = sent + exchange.bytes_sent, received + exchange.bytes_received
            answer = exchange.reply
            if isinstance(answer, InferResult):
                self._observe_tail(target.name, head.variant, answer.tail_ms)
                if count:
                    self._probe_others(target.name, head)
                label, confidence, source = answer.label, answer.confidence, answer.source
                served_by, tail_ms = answer.served_by, answer.tail_ms
                break
            self._failed_over(target, exchange.error, answer, count)
        else:
            prediction = await self.worker.finish(head)
            label, confidence, tail_ms = prediction.label, prediction.confidence, prediction.tail_ms
        if count:
            self.counters.answer(source)
        return self.reply(
            request_id,
            label,
            confidence,
            source,
            served_by,
            frame_name=frame_name,
            head_ms=head.head_ms,
            tail_ms=tail_ms,
            bytes_sent=sent,
            bytes_received=received,
            variant=head.variant,
        )

    def _failed_over(
        self, target: Candidate, error: str | None, answer: Message | None, count: bool
    ) -> None:
        reason = error or (
            f"{answer.code}: {answer.message}" if isinstance(answer, ErrorReply) else "bad reply"
        )
        self.counters.failovers += int(count)
        warn_once(
            f"failover:{target.address}:{reason.split(':', 1)[0]}",
            "target %s failed (%s); trying the next",
            target.address,
            reason,
        )

    def _infer_request(self, head: HeadResult) -> InferRequest:
        """The message that asks a neighbour for the tail of this head's payload."""
        assert head.payload is not None, "complete() the head before sending it"
        return InferRequest(
            request_id=uuid.uuid4().hex,
            bundle_id=self.bundle.bundle_id,
            origin=self.settings.name,
            variant=head.variant,
            encoding=head.encoding,
            deadline_ms=self.settings.remote_timeout_s * 1e3,
            tensor=head.payload,
        )

    def _observe_tail(self, name: str, variant: str, tail_ms: float) -> None:
        """A neighbour's reply says how long its tail took: its whole model, scaled."""
        share = self.worker.tail_share(variant)
        if self.cluster is not None and share > 0.05:
            self.cluster.estimates.observed(name, tail_ms / share, time.monotonic())

    def _probe_others(self, answered_by: str, head: HeadResult) -> None:
        """Send a copy of this miss to neighbours not tried for a while, in the background
        (the answer is only timed), so one bad early estimate cannot shut one out."""
        assert self.cluster is not None
        now = time.monotonic()
        for candidate in self.cluster.candidates():
            if candidate.name == answered_by or candidate.queue_length > 0:
                continue
            if not self.cluster.estimates.due_for_probe(candidate.name, now):
                continue
            self.cluster.estimates.sent(candidate.name, now)
            self._spawn(self._probe(candidate, head))

    async def _probe(self, candidate: Candidate, head: HeadResult) -> None:
        assert self.cluster is not None
        exchange = await self.cluster.request(
            candidate, self._infer_request(head), self.settings.remote_timeout_s
        )
        if isinstance(exchange.reply, InferResult):
            self._observe_tail(candidate.name, head.variant, exchange.reply.tail_ms)
        self.counters.probes += 1


__all__ = ["MAX_PENDING_AUDITS", "FrameSettings", "Frames"]
