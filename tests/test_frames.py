"""A frame's way to its one answer, in-process, with a fake model and a fake cluster.

The real-socket tests (test_daemon.py, test_cluster.py) cover the same paths
end to end in minutes; these cover the decisions in about a second: which
target is tried first, failover in order, the local tail as the last resort,
exactly one answer counted, a neighbour's tensor of another bundle refused (peer/tails.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
from ccied.peer.counters import Counters
from ccied.peer.frames import Frames, FrameSettings
from ccied.peer.routing import Candidate, TailEstimates, TargetKind
from ccied.peer.tails import TailService, batch_config_for
from ccied.peer.transport import Exchange
from ccied.peer.wire import (
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    Source,
    Submit,
)
from ccied.peer.worker import HeadResult, Prediction, Prepared
from ccied.pruning.bundle import Variant

T = TypeVar("T")
VARIANTS = {
    "late": Variant("late", "blocks.11", bits=6, agreement=1.0),
    "early": Variant("early", "blocks.4", bits=8, agreement=1.0),
}
CLASSES = [f"class{i}" for i in range(10)]


class FakeWorker:
    """The model worker's interface with fixed timings and a fixed answer (label 3)."""

    def __init__(self) -> None:
        self.variants = dict.fromkeys(VARIANTS)
        self.stage_ms = [10.0] * 10  # a 100 ms model
        self.cache_point = SimpleNamespace(name="blocks.4", index=4)
        self.model = SimpleNamespace(spec=SimpleNamespace(class_names=CLASSES))
        self.finished = 0

    def full_ms(self) -> float:
        return 100.0

    def head_ms(self, variant: str) -> float:
        return 70.0 if variant == "late" else 30.0

    def tail_share(self, variant: str) -> float:
        return 0.3 if variant == "late" else 0.7

    def payload_bytes(self, variant: str) -> float:
        return 8_000.0 if variant == "late" else 60_000.0

    def local_rest_ms(self, variant: str, with_cache: bool = True) -> float:
        return 100.0 - self.head_ms(variant)

    def rest_ms_from(self, reach_index: int) -> float:
        return sum(self.stage_ms[reach_index + 1 :])

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()

    def prepare_now(self, pixels: np.ndarray) -> Prepared:
        return Prepared(pixels, None, 0.5)

    async def head(self, prepared: Prepared, variant: str, with_cache: bool) -> HeadResult:
        return HeadResult(None, None, "codec", variant, None, 6, self.head_ms(variant))  # type: ignore[arg-type]

    async def complete(self, head: HeadResult) -> HeadResult:
        payload = np.zeros(int(self.payload_bytes(head.variant)), np.uint8)
        return HeadResult(None, payload, "codec", head.variant, None, 6, head.head_ms)  # type: ignore[arg-type]

    async def finish(self, head: HeadResult) -> Prediction:
        self.finished += 1
        return Prediction(3, CLASSES[3], 0.9, 30.0)


@dataclass
class FakeCluster:
    """Candidates and scripted replies: a name maps to an answer label, or None for silence."""

    targets: list[Candidate]
    answers: dict[str, int | None]
    estimates: TailEstimates = field(default_factory=TailEstimates)
    tried: list[str] = field(default_factory=list)

    def candidates(self) -> list[Candidate]:
        return list(self.targets)

    async def request(self, target: Candidate, message: Message, timeout_s: float) -> Exchange:
        self.tried.append(target.name)
        assert isinstance(message, InferRequest) and message.bundle_id == "b1"
        label = self.answers.get(target.name)
        if label is None:
            return Exchange(None, "timed out", 100, 0, timeout_s * 1e3)
        source = Source.CLOUD if target.kind is TargetKind.CLOUD else Source.PEER
        reply = InferResult(
            request_id=message.request_id,
            label=label,
            class_name=CLASSES[label],
            confidence=0.8,
            source=source,
            served_by=target.name,
            tail_ms=3.0,
        )
        return Exchange(reply, None, 100, 50, 10.0)


def candidate(name: str, kind: TargetKind = TargetKind.PEER, **fields: Any) -> Candidate:
    values: dict[str, Any] = {"full_ms": 10.0, "queue_length": 0, "rtt_ms": 2.0}
    values.update({"bandwidth_mbps": 100.0, **fields})
    return Candidate(name, kind, f"tcp://{name}:1", **values)


def frames_with(cluster: FakeCluster | None) -> tuple[Frames, FakeWorker, Counters]:
    worker, counters = FakeWorker(), Counters()
    bundle = SimpleNamespace(
        bundle_id="b1", default_variant="late", variant=lambda name: VARIANTS[name]
    )
    settings = FrameSettings(name="cam", serves_as=Source.PEER)
    frames = Frames(settings, bundle, worker, counters, cluster=cluster)  # type: ignore[arg-type]
    return frames, worker, counters


def submit(frames: Frames) -> Message:
    request = Submit(request_id="r1", frame_name="f", pixels=np.zeros((8, 8, 3), np.uint8))
    return asyncio.run(frames.answer_frame(request))


def test_a_miss_goes_to_the_fastest_target_and_is_answered_once() -> None:
    slow = candidate("slow", full_ms=60.0)
    cloud = candidate("cloud", TargetKind.CLOUD)
    cluster = FakeCluster([slow, cloud], {"slow": 1, "cloud": 2})
    frames, worker, counters = frames_with(cluster)
    answer = submit(frames)
    assert isinstance(answer, InferResult)
    assert (answer.served_by, answer.source, answer.label) == ("cloud", Source.CLOUD, 2)
    assert cluster.tried == ["cloud"] and worker.finished == 0
    assert counters.answered == 1 and counters.by_source["cloud"] == 1
    assert answer.variant in VARIANTS and frames.variant_counts[answer.variant] == 1


def test_a_silent_target_fails_over_to_the_next_then_to_the_local_tail() -> None:
    cluster = FakeCluster([candidate("a"), candidate("b", full_ms=12.0)], {"a": None, "b": 5})
    frames, worker, counters = frames_with(cluster)
    answer = submit(frames)
    assert isinstance(answer, InferResult) and answer.served_by == "b" and answer.label == 5
    assert cluster.tried == ["a", "b"] and counters.failovers == 1
    everyone_silent = FakeCluster([candidate("a"), candidate("b")], {})
    frames, worker, counters = frames_with(everyone_silent)
    answer = submit(frames)
    assert isinstance(answer, InferResult)
    assert (answer.source, answer.served_by, answer.label) == (Source.LOCAL, "cam", 3)
    assert worker.finished == 1 and counters.failovers == 2 and counters.answered == 1


def test_alone_a_frame_finishes_here_in_the_default_variant() -> None:
    frames, worker, counters = frames_with(None)
    answer = submit(frames)
    assert isinstance(answer, InferResult) and answer.source is Source.LOCAL
    assert answer.variant == "late" and worker.finished == 1
    assert counters.by_source["local"] == 1


def test_targets_slower_than_finishing_here_are_not_tried() -> None:
    swamped = candidate("swamped", queue_length=50)  # 10 * 0.3 * 51 = 153 ms > 30 ms here
    cluster = FakeCluster([swamped], {"swamped": 1})
    frames, worker, _ = frames_with(cluster)
    answer = submit(frames)
    assert isinstance(answer, InferResult) and answer.source is Source.LOCAL
    assert cluster.tried == [] and worker.finished == 1


def test_a_tensor_of_another_bundle_is_refused_and_counted() -> None:
    frames, _, counters = frames_with(None)
    request = InferRequest(
        request_id="t1",
        bundle_id="other",
        origin="cam9",
        variant="late",
        encoding="codec",
        deadline_ms=1000,
        tensor=np.zeros(10, np.uint8),
    )
    tails = TailService(frames.worker, batch_config_for("edge"))  # type: ignore[arg-type]
    reply = asyncio.run(tails.answer(request, "b1", Source.PEER, counters, frames.reply))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUNDLE_MISMATCH
    assert counters.refused_bundle == 1 and counters.served_for_peers == 0
