"""Cache keys cheapest first, the audit's decisions, and the tiered cache (pure logic, real FAISS).

The thumbnail key is checked on real photos: what a camera sees again a few
pixels over and brighter must land close, another photo far.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from ccied.cache import (
    THUMBNAIL_KEY,
    Audit,
    BadFeatureError,
    CacheConfig,
    HitRule,
    KeyDepth,
    MissReason,
    SemanticCache,
    TieredCache,
    thumbnail_dim,
    thumbnail_feature,
    upper_bound,
)
from ccied.cache.keys import THUMBNAIL_SIDE
from ccied.cache.policy import (
    MIN_CALIBRATION_HITS,
    THUMBNAIL_THRESHOLD_L2,
    calibrate_or_default,
    default_rule,
)
from ccied.pruning.media import thumbnail


def key(pixels: np.ndarray) -> np.ndarray:
    return thumbnail_feature(thumbnail(pixels, 224, THUMBNAIL_SIDE))


def shifted(pixels: np.ndarray, dx: int, gain: float = 1.0) -> np.ndarray:
    moved = np.concatenate([pixels[:, dx:], pixels[:, -1:].repeat(dx, 1)], axis=1)
    return np.clip(moved.astype(np.float32) * gain, 0, 255).astype(np.uint8)


# -- the thumbnail key --------------------------------------------------------------


def test_the_same_place_seen_again_is_close_and_another_photo_far() -> None:
    cat, coffee = skimage.data.chelsea(), skimage.data.coffee()
    k = key(cat)
    assert k.shape == (thumbnail_dim(),) and k.dtype == np.float32
    assert np.linalg.norm(k) == pytest.approx(1.0, abs=1e-5)
    # 3 pixels over and 6% brighter: the revisit of the held-out stream.
    again = float(np.linalg.norm(key(shifted(cat, 3, 1.06)) - k))
    other = float(np.linalg.norm(key(coffee) - k))
    # (0.16 and 1.11 here: a sure entry reaches 0.6, one at 0.75 confidence 0.3.)
    assert again < 0.5 * THUMBNAIL_THRESHOLD_L2 < THUMBNAIL_THRESHOLD_L2 < other


def test_a_uniform_brightness_change_does_not_move_the_key() -> None:
    cat = skimage.data.chelsea()
    darker = (cat.astype(np.float32) * 0.8).astype(np.uint8)
    assert np.linalg.norm(key(darker) - key(cat)) < 0.02


@pytest.mark.parametrize("value", [0, 128, 255])
def test_a_flat_frame_has_no_key(value: int) -> None:
    with pytest.raises(BadFeatureError, match="flat"):
        key(np.full((120, 160, 3), value, np.uint8))


def test_a_crop_of_the_wrong_shape_has_no_key() -> None:
    with pytest.raises(BadFeatureError, match="crop"):
        thumbnail_feature(np.zeros((16, 12, 3), np.uint8))
    with pytest.raises(BadFeatureError, match="smaller"):
        thumbnail_feature(np.zeros((8, 8, 3), np.uint8))


def test_a_large_crop_is_block_averaged_to_the_key_of_its_thumbnail() -> None:
    crop = np.ascontiguousarray(skimage.data.astronaut()[::2, ::2][:224, :224])
    small = crop.reshape(16, 14, 16, 14, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    assert np.linalg.norm(thumbnail_feature(crop) - thumbnail_feature(small)) < 0.01


# -- the audit ----------------------------------------------------------------------


def test_one_hit_in_twenty_is_checked_starting_with_the_first() -> None:
    audit = Audit(rate=0.05)
    checked = [i for i in range(100) if audit.should_check()]
    assert checked == [0, 20, 40, 60, 80]
    assert not any(Audit(rate=0.0).should_check() for _ in range(50))
    assert all(Audit(rate=1.0).should_check() for _ in range(5))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_an_audit_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="audit rate"):
        Audit(rate=rate)


def test_a_wrong_hit_drops_its_entry_and_tightens_while_the_bound_is_high() -> None:
    audit = Audit(rate=0.05, own_name="cam1")
    for _ in range(30):
        assert not audit.record("cam1", wrong=False, full_confidence=0.9).wrong
    verdict = audit.record("cam1", wrong=True, full_confidence=0.9)
    assert verdict.drop_entry and verdict.tighten and not verdict.refuse_origin
    stats = audit.stats()
    assert stats["checked"] == 31 and stats["wrong"] == 1 and stats["tightened"] == 1
    assert stats["false_hit_rate"] == pytest.approx(1 / 31, abs=1e-4)
    assert stats["false_hit_upper_95"] == pytest.approx(upper_bound(1, 31), abs=1e-4)
    assert stats["fidelity_decisive"] == stats["fidelity_all"] == pytest.approx(30 / 31, abs=1e-4)


def test_an_origin_whose_entries_keep_being_wrong_is_refused_but_never_this_peer() -> None:
    audit = Audit(rate=1.0, own_name="cam1")
    assert not audit.record("liar", wrong=True, full_confidence=0.2).refuse_origin
    assert audit.record("liar", wrong=True, full_confidence=0.2).refuse_origin
    assert audit.refuses("liar") and audit.stats()["refused_origins"] == ["liar"]
    for _ in range(5):
        assert not audit.record("cam1", wrong=True, full_confidence=0.9).refuse_origin
    assert not audit.refuses("cam1")
    # Wrong answers on frames where the full model guessed count only in "all".
    stats = audit.stats()
    assert stats["decisive_checked"] == 5 and stats["fidelity_decisive"] == 0.0


def test_the_upper_bound_shrinks_with_clean_checks() -> None:
    assert upper_bound(0, 0) == 1.0
    assert upper_bound(0, 10) > upper_bound(0, 100) > upper_bound(0, 1000)
    assert upper_bound(0, 1000) < 0.01 < upper_bound(0, 300)


def test_a_tightened_rule_is_closer_and_surer() -> None:
    rule = HitRule(threshold_l2=0.5, answer_floor=0.5)
    tighter = rule.tightened()
    assert tighter.threshold_l2 < rule.threshold_l2
    assert rule.answer_floor < tighter.answer_floor <= 0.95


# -- calibration defaults -----------------------------------------------------------


def test_too_few_calibration_hits_keep_the_depths_default_rule() -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((30, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    frames = (features, np.arange(30), np.full(30, 0.9))
    rule, verdict, result = calibrate_or_default(THUMBNAIL_KEY, frames)
    assert result.chosen.hits < MIN_CALIBRATION_HITS
    assert verdict.startswith("too few hits") and rule == default_rule(THUMBNAIL_KEY)
    assert default_rule(THUMBNAIL_KEY).threshold_l2 == THUMBNAIL_THRESHOLD_L2
    assert default_rule("blocks.4").threshold_l2 < THUMBNAIL_THRESHOLD_L2


# -- the tiered cache ---------------------------------------------------------------


def tiered() -> TieredCache:
    depths = [KeyDepth(THUMBNAIL_KEY, 8, -1), KeyDepth("blocks.4", 4, 5)]
    rule = HitRule(threshold_l2=0.3, vote_margin=1)
    return TieredCache(
        [(d, SemanticCache(CacheConfig(dim=d.dim, bundle_id="b", rule=rule))) for d in depths]
    )


def unit(values: list[float]) -> np.ndarray:
    vector = np.array(values, np.float32)
    return vector / np.linalg.norm(vector)


def test_a_frame_is_cached_at_every_depth_it_has_a_key_for_and_counted_once() -> None:
    cache = tiered()
    ids = cache.insert(
        {THUMBNAIL_KEY: unit([1, 0, 0, 0, 0, 0, 0, 0]), "blocks.4": unit([0, 1, 0, 0])},
        label=3,
        confidence=0.9,
        origin="cam1",
        bundle_id="b",
    )
    assert set(ids) == {THUMBNAIL_KEY, "blocks.4"} and all(i is not None for i in ids.values())
    assert cache.cache("blocks.4").lookup(unit([0, 1, 0, 0])).hit
    cache.note_frame(THUMBNAIL_KEY)
    cache.note_frame(None, MissReason.NOT_DECISIVE)
    stats = cache.stats()
    assert (stats["frames"], stats["hits"], stats["misses"]) == (2, 1, 1)
    assert stats["hits_by_depth"] == {THUMBNAIL_KEY: 1, "blocks.4": 0}
    assert stats["miss_reasons"]["not_decisive"] == 1
    assert [d["name"] for d in stats["depths"]] == [THUMBNAIL_KEY, "blocks.4"]
    # An origin whose entries proved wrong is dropped at every depth.
    assert cache.forget_origin("cam1") == 2 and len(cache) == 0
    with pytest.raises(BadFeatureError, match="no key depth"):
        cache.cache("blocks.11")
