"""A frame's plan as pure logic: variant, deeper cache key, route, with one cost model."""

from __future__ import annotations

import dataclasses

import pytest
from ccied.peer.policy import (
    CACHE_PROBE_EVERY,
    DEFAULT_BANDWIDTH_MBPS,
    CacheState,
    Device,
    Floors,
    Need,
    cache_plan,
    local_ms,
    plan_frame,
    remote_ms,
    route,
)
from ccied.peer.routing import Candidate, TargetKind
from ccied.pruning.bundle import Variant

# Three variants of a 100 ms model on this device: an early split with a big
# payload, a late small one, and a sloppy one under the fidelity floor.
LATE = Variant("late", "blocks.11", bits=6, agreement=1.0)
EARLY = Variant("early", "blocks.4", bits=8, agreement=1.0)
SLOPPY = Variant("sloppy", "blocks.14", bits=2, agreement=0.6)
DEVICE = Device(
    variants=(LATE, EARLY, SLOPPY),
    head_ms={"late": 70.0, "early": 30.0, "sloppy": 90.0},
    tail_share={"late": 0.3, "early": 0.7, "sloppy": 0.1},
    payload_bytes={"late": 8_000.0, "early": 60_000.0, "sloppy": 1_000.0},
    rest_ms={"late": 30.0, "early": 70.0, "sloppy": 10.0},
    full_ms=100.0,
    key_ms=30.0,
)


def cloud(mbps: float | None = 100.0, **fields: object) -> Candidate:
    values: dict[str, object] = {
        "kind": TargetKind.CLOUD,
        "address": "tcp://cloud:1",
        "full_ms": 10.0,
        "queue_length": 0,
        "rtt_ms": 2.0,
        "bandwidth_mbps": mbps,
    }
    values.update(fields)
    return Candidate("cloud", **values)  # type: ignore[arg-type]


def test_one_cost_model_prices_remote_and_local() -> None:
    c = cloud(mbps=10.0, queue_length=1)
    # 8 kB at 10 Mbit/s = 6.4 ms, + 2 ms RTT, + 10 ms * 0.3 * (1 + 1) queued.
    assert remote_ms(c, "late", DEVICE) == pytest.approx(2.0 + 6.4 + 6.0)
    assert local_ms(dataclasses.replace(DEVICE, queue_length=2), "late") == 90.0
    # Unknown figures: the neighbour's model time is taken as ours, the link as the default.
    unknown = cloud(mbps=None, full_ms=0.0)
    expected = 2.0 + 8_000 * 8 / (DEFAULT_BANDWIDTH_MBPS * 1e3) + 100.0 * 0.3
    assert remote_ms(unknown, "late", DEVICE) == pytest.approx(expected)


def test_the_variant_follows_the_bandwidth_and_the_need() -> None:
    # A fast link favours the early split (less compute here, more bytes)...
    assert plan_frame(DEVICE, [cloud(1000.0)]).variant == "early"
    # ...a slow one the small payload; the sloppy one stays under the floor.
    assert plan_frame(DEVICE, [cloud(1.0)]).variant == "late"
    # Accuracy first takes the most faithful, the fastest among equals.
    assert plan_frame(DEVICE, [cloud(1.0)], Need.ACCURACY).variant == "late"
    # Pinned: only that variant.
    assert plan_frame(DEVICE, [cloud(1000.0)], pinned="sloppy").variant == "sloppy"


def test_two_floors_decisive_frames_and_all_frames() -> None:
    # A recovered layer: every decisive answer kept, the unsure ones flip (measured:
    # 96 channels at 2 bits, decisive 1.000, all 0.706), and the smallest payload.
    recovered = Variant("recovered", "blocks.11", 0.5, 2, agreement=0.71, agreement_decisive=1.0)
    device = dataclasses.replace(
        DEVICE,
        variants=(LATE, EARLY, recovered),
        head_ms={**DEVICE.head_ms, "recovered": 70.5},
        tail_share={**DEVICE.tail_share, "recovered": 0.3},
        payload_bytes={**DEVICE.payload_bytes, "recovered": 1_440.0},
        rest_ms={**DEVICE.rest_ms, "recovered": 30.0},
    )
    slow = [cloud(1.0)]
    # The default floors (0.98 decisive, 0.95 all): under the second, not chosen.
    assert plan_frame(device, slow).variant == "late"
    # --fidelity-floor-all 0.7: it reaches both floors and is the fastest on 1 Mbit/s.
    assert plan_frame(device, slow, floors=Floors(0.98, 0.7)).variant == "recovered"
    # --fidelity-floor 1.0 on decisive frames alone would not exclude it, 0.99 on all does.
    assert plan_frame(device, slow, floors=Floors(1.0, 0.99)).variant == "late"
    # Accuracy first: all frames first (1.0 before 0.71), even against a perfect
    # decisive figure measured on a handful of frames.
    assert plan_frame(device, slow, Need.ACCURACY).variant == "late"
    shaky = dataclasses.replace(LATE, agreement=0.99, agreement_decisive=0.917)
    device_shaky = dataclasses.replace(device, variants=(recovered, shaky))
    assert plan_frame(device_shaky, slow, Need.ACCURACY).variant == "late"
    # A bundle that measured no decisive figure is held to its all-frame one on both.
    unmeasured = dataclasses.replace(recovered, agreement_decisive=None, agreement=0.97)
    device = dataclasses.replace(device, variants=(LATE, EARLY, unmeasured))
    assert plan_frame(device, slow, floors=Floors(0.98, 0.5)).variant == "late"
    assert plan_frame(device, slow, floors=Floors(0.97, 0.5)).variant == "recovered"


def test_the_route_is_priced_for_the_chosen_variant_and_drops_slower_targets() -> None:
    near = cloud(1000.0)
    swamped = dataclasses.replace(near, name="swamped", queue_length=40)
    plan = plan_frame(DEVICE, [swamped, near])
    assert plan.variant == "early"
    # The swamped one (10 * 0.7 * 41 = 287 ms) is slower than finishing here (70 ms).
    assert [c.name for c in plan.route] == ["cloud"]
    # Baselines that always offload keep every target, best first.
    kept = route([swamped, near], "early", DEVICE, always_offload=True)
    assert [c.name for c in kept] == ["cloud", "swamped"]
    # A slow link keeps the tail here: 60 kB at 1 Mbit/s is 480 ms on the wire.
    assert route([cloud(1.0)], "early", DEVICE) == ()


def test_alone_the_frame_finishes_here_in_the_default_variant() -> None:
    plan = plan_frame(DEVICE, [])
    assert plan.variant == "late" and plan.route == ()
    assert plan.expected_ms == pytest.approx(100.0)


def test_the_deeper_key_is_looked_up_when_it_is_on_the_way_or_pays() -> None:
    on_the_way = plan_frame(DEVICE, [cloud(1.0)], cache=CacheState(hit_rate=0.0))
    assert on_the_way.variant == "late" and on_the_way.look_up_deeper  # head 70 >= key 30
    # A Pi-class device whose best variant's head ends before the key (30 ms):
    early_head = dataclasses.replace(DEVICE, key_ms=80.0)
    fast = [cloud(1000.0)]
    assert (
        plan_frame(early_head, fast, cache=CacheState(inconclusive=False)).look_up_deeper is False
    )
    never_hits = CacheState(hit_rate=0.0, inconclusive=True)
    skipped = plan_frame(early_head, fast, cache=never_hits)
    assert not skipped.look_up_deeper and skipped.skipped
    # ...but every CACHE_PROBE_EVERY-th inconclusive frame looks anyway.
    due = dataclasses.replace(never_hits, since_lookup=CACHE_PROBE_EVERY - 1)
    assert plan_frame(early_head, fast, cache=due).look_up_deeper
    # Frames that repeat, behind a slow link: the key pays (80 + 0.05 * 72 < 142 ms);
    # behind a fast one a miss is cheap and the key does not.
    repeating = CacheState(hit_rate=0.95, inconclusive=True)
    assert not plan_frame(early_head, fast, cache=repeating).look_up_deeper
    assert plan_frame(early_head, [cloud(1.0)], cache=repeating).look_up_deeper
    assert not plan_frame(DEVICE, fast).look_up_deeper  # no cache at all


def test_cache_plan_skips_the_key_only_when_it_costs_more_than_hits_save() -> None:
    expected, use = cache_plan(head_ms=150, key_ms=250, miss_ms=60, hit_rate=0.4)
    assert not use and expected == 210
    expected, use = cache_plan(head_ms=150, key_ms=250, miss_ms=400, hit_rate=0.9)
    assert use and expected == pytest.approx(250 + 0.1 * 400)
    for hit_rate in (0.0, 0.3, 1.0):
        expected, use = cache_plan(head_ms=300, key_ms=250, miss_ms=60, hit_rate=hit_rate)
        assert use and expected <= 300 + 60
    assert cache_plan(100, 50, 10, hit_rate=7.0) == (50, True)


def test_a_need_is_one_of_two_on_every_side() -> None:
    from ccied.peer.client import _need

    assert _need("accuracy") == "accuracy" and _need(Need.LATENCY) == "latency"
    with pytest.raises(ValueError, match="need must be one of latency, accuracy"):
        _need("fast")
