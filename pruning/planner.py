"""Which variant of the transfer layer to send: the least expected latency above a fidelity floor.

Pure logic. For each variant of the bundle (split point, kept channels, bits),
the expected time to an answer over one link is the head up to its split on
this device, the link's round trip, its bytes over the measured bandwidth, and
the tail after its split at the target:

    expected = head_ms + rtt_ms + bytes * 8 / bandwidth + target_tail_ms

A request says what it needs: ``latency`` (default) takes the fastest variant
whose measured agreement with the unpruned model reaches the floor;
``accuracy`` takes the most faithful one, the fastest among equals. The daemon
calls this per miss with its current estimates, so the choice follows the
bandwidth as it moves, and switching costs nothing: every variant is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from ccied.pruning.bundle import Variant
from ccied.pruning.defaults import DEFAULT_FIDELITY_FLOOR

DEFAULT_BANDWIDTH_MBPS = 50.0  # until a link has been measured


class Need(StrEnum):
    LATENCY = "latency"
    ACCURACY = "accuracy"


@dataclass(frozen=True)
class Link:
    rtt_ms: float
    bandwidth_mbps: float | None  # None: not measured yet


@dataclass(frozen=True)
class Choice:
    variant: Variant
    expected_ms: float
    payload_bytes: float


def expected_ms(
    variant: Variant, head_ms: float, target_tail_ms: float, link: Link, payload_bytes: float
) -> float:
    bandwidth = link.bandwidth_mbps or DEFAULT_BANDWIDTH_MBPS
    return head_ms + link.rtt_ms + payload_bytes * 8 / (bandwidth * 1e3) + target_tail_ms


def rank_variants(
    variants: Sequence[Variant],
    head_ms: Mapping[str, float],
    target_tail_ms: Mapping[str, float],
    payload_bytes: Mapping[str, float],
    link: Link,
    need: Need = Need.LATENCY,
    fidelity_floor: float = DEFAULT_FIDELITY_FLOOR,
) -> list[Choice]:
    """Variants best first for this link and need.

    Variants under the floor come after every variant that reaches it (when none
    does, the most faithful lead); an unmeasured agreement counts as 0.
    """
    if not variants:
        raise ValueError("no variants to choose from")
    choices = [
        Choice(
            v,
            expected_ms(v, head_ms[v.name], target_tail_ms[v.name], link, payload_bytes[v.name]),
            payload_bytes[v.name],
        )
        for v in variants
    ]

    def agreement(choice: Choice) -> float:
        return choice.variant.agreement if choice.variant.agreement is not None else 0.0

    if need is Need.ACCURACY:
        return sorted(choices, key=lambda c: (-agreement(c), c.expected_ms))
    return sorted(choices, key=lambda c: (agreement(c) < fidelity_floor, c.expected_ms))


def cache_plan(
    head_ms: float, key_ms: float, miss_ms: float, hit_rate: float
) -> tuple[float, bool]:
    """(expected ms, look the cache up?) for one variant.

    ``head_ms`` is this device's time to the variant's split, ``key_ms`` its
    time to the cache split, ``miss_ms`` the time from the payload to an answer
    elsewhere, ``hit_rate`` the share of lookups that hit. Without the cache a
    frame costs head + miss. With it the head stops at the cache split: a hit
    answers there, a miss runs the rest of the head (if the variant's split is
    later) and then goes out. On a slow device with an early split the key can
    cost more than the hits save, and then the frame skips it.
    """
    without = head_ms + miss_ms
    hit = min(1.0, max(0.0, hit_rate))
    with_cache = key_ms + (1.0 - hit) * (max(0.0, head_ms - key_ms) + miss_ms)
    return (with_cache, True) if with_cache <= without else (without, False)
