"""One decision per frame, with one cost model: which variant, which cache keys, which route.

Pure logic: no sockets, no model, no clock. The daemon hands in what it knows
(:class:`Device`: this peer's own per-variant figures; the live neighbours as
:class:`~ccied.peer.routing.Candidate`; the cache's state) and gets a
:class:`Plan` back. Every option is priced by the same two formulas:

    remote(c, v) = rtt(c) + bytes(v) * 8 / bandwidth(c)
                   + full_ms(c) * tail_share(v) * (queue(c) + 1)
    local(v)     = rest_ms(v) * (own queue + 1)

with a neighbour's unknown model time taken as this device's own and an
unmeasured link as DEFAULT_BANDWIDTH_MBPS. The variant is the one whose best
target answers soonest (within the need and the fidelity floors); the route
orders the targets by the same cost for that variant and drops the ones slower
than finishing here, which is always the last resort. Before this module the
variant planner priced a remote tail as ``full * share * (queue + 1)`` while
routing priced it with a 50 ms default, so a variant picked for one target
could then be sent to another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ccied.peer.defaults import Need
from ccied.peer.routing import Candidate
from ccied.pruning.bundle import Variant
from ccied.pruning.defaults import DEFAULT_FIDELITY_FLOOR, DEFAULT_FIDELITY_FLOOR_ALL

# Until a link has been measured: a conservative LAN figure.
DEFAULT_BANDWIDTH_MBPS = 50.0
# The deeper-key-or-not decision: an optimistic start so a new cache gets to
# learn, and a lookup at least every CACHE_PROBE_EVERY inconclusive frames so
# the hit rate stays measured while the key is being skipped. (On
# bigbuckbunny.mp4, every 4th frame, blocks.4 answered 0.52 of the frames and
# the thumbnail 0.33: looking deeper only when it seemed to pay left most of
# that on the table.) The thumbnail key is always looked up: about 0.3 ms.
INITIAL_HIT_RATE = 0.5
HIT_RATE_ALPHA = 0.2
CACHE_PROBE_EVERY = 8


@dataclass(frozen=True)
class Device:
    """This peer's own figures (ms and bytes), for the variants it may send.

    ``variants`` are the allowed ones, the default first. ``rest_ms[v]`` is the
    time to finish the model here after ``v``'s head (no cache key).
    """

    variants: tuple[Variant, ...]
    head_ms: Mapping[str, float]
    tail_share: Mapping[str, float]
    payload_bytes: Mapping[str, float]
    rest_ms: Mapping[str, float]
    full_ms: float
    key_ms: float  # frame to the deeper cache key
    queue_length: int = 0  # frames ahead of this one on the model thread

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("a device needs at least one variant")


@dataclass(frozen=True)
class CacheState:
    """What the cache says before the deeper key: on or off, and how it has paid."""

    enabled: bool = True
    hit_rate: float = INITIAL_HIT_RATE  # deeper lookups that hit, moving average
    inconclusive: bool = False  # the thumbnail found close entries but no hit
    since_lookup: int = 0  # inconclusive frames since the deeper key was last looked up


@dataclass(frozen=True)
class Plan:
    variant: str
    look_up_deeper: bool  # compute the deeper cache key and look it up
    skipped: bool  # the deeper key was skipped as not paying (ccied status counts these)
    route: tuple[Candidate, ...]  # remote targets to try, best first; then this peer
    expected_ms: float


def transfer_ms(candidate: Candidate, payload_bytes: float) -> float:
    bandwidth = candidate.bandwidth_mbps or DEFAULT_BANDWIDTH_MBPS
    return candidate.rtt_ms + payload_bytes * 8 / (bandwidth * 1e3)


def remote_ms(candidate: Candidate, variant: str, device: Device) -> float:
    """From the head's end to an answer at ``candidate``: the wire, then its tail queued."""
    full = candidate.full_ms if candidate.full_ms > 0 else device.full_ms
    tail = full * device.tail_share[variant] * (candidate.queue_length + 1)
    return transfer_ms(candidate, device.payload_bytes[variant]) + tail


def local_ms(device: Device, variant: str, rest_ms: float | None = None) -> float:
    """From the head's end to an answer here, behind this peer's own queue."""
    rest = device.rest_ms[variant] if rest_ms is None else rest_ms
    return rest * (device.queue_length + 1)


def cache_plan(
    head_ms: float, key_ms: float, miss_ms: float, hit_rate: float
) -> tuple[float, bool]:
    """(expected ms, look the deeper key up?) for one variant.

    Without the key a frame costs head + miss. With it the head stops at the
    key: a hit answers there, a miss runs the rest of the head (when the
    variant's split is later) and goes on. On a slow device with an early
    split the key can cost more than its hits save, and is then skipped.
    """
    without = head_ms + miss_ms
    hit = min(1.0, max(0.0, hit_rate))
    with_key = key_ms + (1.0 - hit) * (max(0.0, head_ms - key_ms) + miss_ms)
    return (with_key, True) if with_key <= without else (without, False)


@dataclass(frozen=True)
class Floors:
    """The least measured agreement a variant needs for a latency-first frame.

    ``decisive``: on frames where the unpruned model's top-1 probability is >= 0.5
    (``--fidelity-floor``); ``all``: on every frame (``--fidelity-floor-all``), lower,
    since the model's unsure answers flip at any loss (a recovered 96-channel 2-bit
    layer kept 1.000 of the decisive answers and 0.71 of all: README).
    """

    decisive: float = DEFAULT_FIDELITY_FLOOR
    all: float = DEFAULT_FIDELITY_FLOOR_ALL


def _agreement(variant: Variant) -> float:
    """On all frames; an unmeasured agreement counts as 0."""
    return variant.agreement if variant.agreement is not None else 0.0


def _agreement_decisive(variant: Variant) -> float:
    """On decisive frames; a bundle that did not measure it gives the all-frame figure
    (a lower bound in every measurement so far)."""
    if variant.agreement_decisive is not None:
        return variant.agreement_decisive
    return _agreement(variant)


def below_floors(variant: Variant, floors: Floors) -> bool:
    """Does the variant miss either floor?"""
    return _agreement_decisive(variant) < floors.decisive or _agreement(variant) < floors.all


def _faithfulness(variant: Variant) -> tuple[float, float]:
    """The ``accuracy`` need's order, most faithful first: on all frames, then on the
    decisive ones (fewer frames, so one flip moves it far: 1 of 12 in prepare's run)."""
    return (-_agreement(variant), -_agreement_decisive(variant))


def rank(
    device: Device,
    candidate: Candidate | None,
    need: Need,
    floors: Floors = Floors(),
) -> list[tuple[Variant, float]]:
    """(variant, head + miss ms) best first, for one target (None: this peer).

    ``latency``: variants under either floor after every variant that reaches
    both, the fastest first; ``accuracy``: the most faithful first (on all
    frames, then on decisive ones), the fastest among equals. An unmeasured agreement counts as 0.
    """

    def miss(name: str) -> float:
        if candidate is None:
            return local_ms(device, name)
        return remote_ms(candidate, name, device)

    priced = [(v, device.head_ms[v.name] + miss(v.name)) for v in device.variants]
    if need is Need.ACCURACY:
        return sorted(priced, key=lambda p: (*_faithfulness(p[0]), p[1]))
    return sorted(priced, key=lambda p: (below_floors(p[0], floors), p[1]))


def route(
    candidates: Sequence[Candidate],
    variant: str,
    device: Device,
    rest_ms: float | None = None,
    *,
    always_offload: bool = False,
) -> tuple[Candidate, ...]:
    """Remote targets to try for ``variant``'s payload, best first.

    Targets slower than finishing here (``rest_ms``: what is left of the model
    after the head that ran) are left out: failing over to them only adds time.
    ``always_offload`` (baselines such as cloud-only) keeps every target.
    """
    ranked = sorted(candidates, key=lambda c: remote_ms(c, variant, device))
    if always_offload:
        return tuple(ranked)
    here = local_ms(device, variant, rest_ms)
    return tuple(c for c in ranked if remote_ms(c, variant, device) < here)


def plan_frame(
    device: Device,
    candidates: Sequence[Candidate],
    need: Need = Need.LATENCY,
    cache: CacheState | None = None,
    *,
    pinned: str | None = None,
    floors: Floors = Floors(),
    always_offload: bool = False,
) -> Plan:
    """The plan for a frame the thumbnail did not answer.

    Per target (each live neighbour, else this peer alone), the variants are
    ranked for the need; across targets the order is the ranking's class (the
    fidelity floors, or agreement for ``accuracy``), then the time, with the
    deeper key's expected saving folded in (:func:`cache_plan`). A ``pinned``
    variant is the only one considered. The deeper key is looked up when the
    head passes it anyway on the way to the variant's split, otherwise only
    when the thumbnail lookup was inconclusive and the key pays at the recent
    hit rate, or every CACHE_PROBE_EVERY-th such frame to keep that rate measured.
    """
    cache = cache or CacheState(enabled=False)
    if pinned is not None:
        device = _only(device, pinned)
    elif not candidates:
        device = _only(device, device.variants[0].name)  # finishing here: the default
    best: tuple[tuple[float, float], str, bool] | None = None
    targets: list[Candidate | None] = list(candidates) if candidates else [None]
    for target in targets:
        for position, (variant, total) in enumerate(rank(device, target, need, floors)):
            name = variant.name
            expected, pays = total, False
            if cache.enabled:
                head = device.head_ms[name]
                expected, pays = cache_plan(head, device.key_ms, total - head, cache.hit_rate)
            below = below_floors(variant, floors)
            order = (float(position) if need is Need.ACCURACY else float(below), expected)
            if best is None or order < best[0]:
                best = (order, name, pays)
    assert best is not None
    (_, expected), name, pays = best
    look, skipped = _deeper_key(device, name, cache, pays)
    targets_to_try = route(candidates, name, device, always_offload=always_offload)
    return Plan(name, look, skipped, targets_to_try, expected)


def _deeper_key(device: Device, variant: str, cache: CacheState, pays: bool) -> tuple[bool, bool]:
    """(look the deeper key up?, skipped as not paying?)."""
    if not cache.enabled:
        return False, False
    if device.head_ms[variant] >= device.key_ms:
        return True, False  # the head passes the key anyway: one lookup, ~0.1 ms
    if not cache.inconclusive:
        return False, False
    if pays or cache.since_lookup + 1 >= CACHE_PROBE_EVERY:
        return True, False
    return False, True


def _only(device: Device, name: str) -> Device:
    chosen = tuple(v for v in device.variants if v.name == name)
    if not chosen:
        raise ValueError(f"variant {name!r} is not one of this device's")
    return Device(
        chosen,
        device.head_ms,
        device.tail_share,
        device.payload_bytes,
        device.rest_ms,
        device.full_ms,
        device.key_ms,
        device.queue_length,
    )


def next_hit_rate(hit_rate: float, hit: bool) -> float:
    """The deeper key's moving hit rate after one more lookup."""
    return (1 - HIT_RATE_ALPHA) * hit_rate + HIT_RATE_ALPHA * (1.0 if hit else 0.0)


__all__ = [
    "CACHE_PROBE_EVERY",
    "DEFAULT_BANDWIDTH_MBPS",
    "INITIAL_HIT_RATE",
    "CacheState",
    "Device",
    "Need",
    "Plan",
    "cache_plan",
    "local_ms",
    "next_hit_rate",
    "plan_frame",
    "rank",
    "remote_ms",
    "route",
]
