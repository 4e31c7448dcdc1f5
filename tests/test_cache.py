"""The semantic cache: hit rule, FAISS lookups, eviction, IVF switch, persistence, crashes.

Real FAISS indexes, real files; features are synthetic but shaped like ours
(L2-normalised float32). No test asserts a timing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ccied.cache import (
    BadFeatureError,
    CacheConfig,
    CachePersistenceError,
    CacheStore,
    Eviction,
    HitRule,
    MissReason,
    SemanticCache,
    calibrate,
    decide,
)
from ccied.cache.store import LOG_NAME, SNAPSHOT_NAME, StoredEntry

DIM = 64
BUNDLE = "bundle-a"
RULE = HitRule(threshold_l2=0.3, vote_margin=2, k=5)


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(vectors).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def random_features(count: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((count, dim)))


def near(feature: np.ndarray, distance: float, seed: int) -> np.ndarray:
    """A unit vector about ``distance`` (L2) away from ``feature``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(feature.shape).astype(np.float32)
    noise -= noise.dot(feature) * feature  # orthogonal, so the distance is exact
    noise *= distance / np.linalg.norm(noise)
    return unit(feature + noise)[0]


def clusters(
    count: int, per_cluster: int, spread: float, seed: int = 0, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` tight clusters of ``per_cluster`` points; label = cluster number."""
    centres = random_features(count, seed, dim)
    rng = np.random.default_rng(seed + 1)
    points = centres.repeat(per_cluster, axis=0)
    points = unit(points + rng.standard_normal(points.shape) * spread / np.sqrt(dim))
    return points, np.arange(count).repeat(per_cluster)


def new_cache(store: CacheStore | None = None, dim: int = DIM, **overrides: Any) -> SemanticCache:
    config = CacheConfig(dim=dim, bundle_id=BUNDLE, **{"rule": RULE, **overrides})
    return SemanticCache(config, store)


def fill(cache: SemanticCache, features: np.ndarray, labels: np.ndarray) -> list[int]:
    ids = []
    for feature, label in zip(features, labels, strict=True):
        entry_id = cache.insert(feature, int(label), 0.9, "test", BUNDLE)
        assert entry_id is not None
        ids.append(entry_id)
    return ids


# -- the hit rule ---------------------------------------------------------------


def test_an_exact_repeat_hits_even_alone() -> None:
    decision = decide([0.0], [7], RULE)
    assert decision.hit and decision.exact and decision.label == 7


def test_one_close_entry_without_support_does_not_answer() -> None:
    decision = decide([0.05], [7], RULE)
    assert not decision.hit
    # Two agreeing neighbours do (margin 2), and the answer is theirs.
    decision = decide([0.05, 0.2], [7, 7], RULE)
    assert decision.hit and decision.label == 7 and not decision.exact


def test_a_closer_entry_that_disagrees_vetoes_the_hit() -> None:
    # Three entries say 8, but the closest says 3: the frame may be 3's, so no answer.
    decision = decide([0.02, 0.1, 0.12, 0.15], [3, 8, 8, 8], RULE)
    assert not decision.hit and decision.reason == MissReason.DISAGREE
    assert decision.inconclusive  # a deeper key may settle it
    # A split vote (margin under 2) answers nothing either.
    assert not decide([0.02, 0.1, 0.12, 0.15], [3, 3, 8, 8], RULE).hit


def test_only_a_decisive_entry_answers_and_an_unsure_one_can_veto() -> None:
    rule = HitRule(threshold_l2=0.3, vote_margin=1, answer_floor=0.5)
    # The only close entry was a guess (0.3): it never answers.
    decision = decide([0.01, 0.5], [4, 4], rule, [0.3, 0.9])
    assert not decision.hit and decision.reason == MissReason.NOT_DECISIVE
    # A sure entry answers; an unsure one closer with another label vetoes it.
    assert decide([0.02], [4], rule, [0.95]).hit
    vetoed = decide([0.01, 0.02], [7, 4], rule, [0.3, 0.95])
    assert not vetoed.hit and vetoed.reason == MissReason.DISAGREE


def test_an_entry_reaches_further_the_surer_it_was() -> None:
    rule = HitRule(threshold_l2=0.4, vote_margin=1, answer_floor=0.5)
    # Reach = 0.4 * (c - 0.5) / 0.5: 0.36 at 0.95, 0.04 at 0.55.
    assert rule.reach_l2(0.95) == pytest.approx(0.36)
    assert decide([0.2], [4], rule, [0.95]).hit
    barely = decide([0.2], [4], rule, [0.55])
    assert not barely.hit and barely.reason == MissReason.NOT_DECISIVE
    assert decide([0.03], [4], rule, [0.55]).hit


def test_an_exact_repeat_answers_whatever_its_confidence() -> None:
    rule = HitRule(threshold_l2=0.3, answer_floor=0.5)
    decision = decide([0.0], [9], rule, [0.1])
    assert decision.hit and decision.exact and decision.label == 9


def test_far_entries_do_not_outvote_the_only_close_one() -> None:
    decision = decide([0.05, 1.2, 1.2, 1.3, 1.3], [3, 8, 8, 8, 8], RULE)
    assert not (decision.hit and decision.label == 8)


def test_a_far_nearest_entry_misses_whatever_the_votes() -> None:
    decision = decide([0.5, 0.51, 0.52], [4, 4, 4], RULE)
    assert not decision.hit and decision.label == -1
    assert decision.reason == MissReason.FAR and not decision.inconclusive
    empty = decide([], [], RULE)
    assert not empty.hit and empty.reason == MissReason.EMPTY


# -- SemanticCache in memory ----------------------------------------------------


def test_insert_then_lookup_answers_from_the_neighbours() -> None:
    cache = new_cache()
    points, labels = clusters(count=4, per_cluster=4, spread=0.05)
    ids = fill(cache, points, labels)
    assert len(cache) == 16 and ids == sorted(set(ids))
    for cluster in range(4):
        query = near(points[cluster * 4], 0.04, seed=cluster)
        result = cache.lookup(query)
        assert result.hit and result.label == cluster, result
        assert result.entry_id in ids[cluster * 4 : cluster * 4 + 4]
    # A frame unlike anything cached misses.
    assert not cache.lookup(random_features(1, seed=99)[0]).hit
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (4, 1, 16)
    assert stats["hit_rate"] == pytest.approx(0.8)


def test_a_hit_names_the_entry_that_answered() -> None:
    # The nearest entry agrees but was unsure: the entry to forget after a
    # wrong answer is the sure one that answered, with its origin.
    cache = new_cache(rule=HitRule(threshold_l2=0.3, vote_margin=2, answer_floor=0.5))
    base = random_features(1, seed=3)[0]
    unsure = cache.insert(near(base, 0.01, 1), 9, 0.3, "cam0", BUNDLE)
    sure = [
        cache.insert(near(base, d, s), 9, 0.99, f"cam{s}", BUNDLE)
        for s, d in ((2, 0.04), (4, 0.15))
    ]
    result = cache.lookup(base)
    assert result.hit and result.label == 9
    assert result.entry_id == sure[0] and result.entry_id != unsure
    assert result.confidence == pytest.approx(0.99) and result.origin == "cam2"


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (np.ones(DIM + 1, np.float32) / np.sqrt(DIM + 1), "shape"),
        (np.ones((2, DIM), np.float32), "shape"),
        (np.full(DIM, np.nan, np.float32), "NaN"),
        (np.r_[np.inf, np.zeros(DIM - 1)].astype(np.float32), "NaN or infinity"),
        (np.ones(DIM, np.float32), "norm"),
        (np.arange(DIM), "dtype"),
    ],
)
def test_malformed_features_are_refused_with_a_clear_error(
    feature: np.ndarray, message: str
) -> None:
    cache = new_cache()
    with pytest.raises(BadFeatureError, match=message):
        cache.insert(feature, 1, 0.9, "test", BUNDLE)
    with pytest.raises(BadFeatureError, match=message):
        cache.lookup(feature)
    assert len(cache) == 0


def test_another_bundles_entries_are_never_mixed_in() -> None:
    cache = new_cache()
    points, _ = clusters(count=1, per_cluster=4, spread=0.05)
    for feature in points:
        assert cache.insert(feature, 1, 0.9, "peer-b", "bundle-b") is None
    assert len(cache) == 0 and cache.stats()["refused"] == 4
    assert not cache.lookup(points[0]).hit


def test_lru_keeps_a_recently_hit_entry_and_evicts_the_stalest() -> None:
    cache = new_cache(capacity=50, eviction=Eviction.LRU)
    features = random_features(60, seed=5)
    labels = np.arange(60)
    ids = fill(cache, features[:50], labels[:50])
    assert cache.lookup(features[0]).hit  # exact repeat: entry ids[0] is now fresh
    fill(cache, features[50:51], labels[50:51])
    assert len(cache) == 50 and cache.stats()["evictions"] == 1
    assert cache.lookup(features[0]).entry_id == ids[0]
    gone = cache.lookup(features[1])  # the stalest entry went
    assert not gone.hit and gone.entry_id != ids[1]
    fill(cache, features[51:], labels[51:])
    assert len(cache) == 50
    assert cache.lookup(features[0]).hit  # still there after 9 more evictions


def test_lfu_evicts_the_least_hit_entries() -> None:
    cache = new_cache(capacity=50, eviction=Eviction.LFU)
    features = random_features(60, seed=6)
    ids = fill(cache, features[:50], np.arange(50))
    for _ in range(3):
        assert cache.lookup(features[1]).hit
    fill(cache, features[50:55], np.arange(50, 55))
    assert len(cache) == 50 and cache.stats()["evictions"] == 5
    assert cache.lookup(features[1]).entry_id == ids[1]  # the often hit one stays
    assert cache.lookup(features[0]).entry_id != ids[0]  # never hit, oldest: gone


def test_forget_and_clear() -> None:
    cache = new_cache()
    points, labels = clusters(count=2, per_cluster=3, spread=0.05)
    ids = fill(cache, points, labels)
    assert cache.forget(ids[0]) and not cache.forget(ids[0]) and not cache.forget(12345)
    assert len(cache) == 5
    assert cache.lookup(points[0]).entry_id != ids[0]
    assert cache.clear() == 5 and len(cache) == 0
    assert not cache.lookup(points[3]).hit
    # Usable after a clear; ids are not reused.
    new_ids = fill(cache, points[:3], labels[:3])
    assert min(new_ids) > max(ids)
    assert cache.lookup(points[1]).hit


def wait_for_ivf(cache: SemanticCache, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cache.stats()["index"] != "ivf":
        assert time.monotonic() < deadline, "the cache never switched to IVF"
        time.sleep(0.01)


@pytest.mark.parametrize("background", [False, True])
def test_the_switch_to_ivf_keeps_answering(background: bool) -> None:
    cache = new_cache(ivf_min_entries=300, background_rebuild=background, capacity=10_000)
    points, labels = clusters(count=70, per_cluster=6, spread=0.05)
    ids = fill(cache, points[:300], labels[:300])
    if not background:
        assert cache.stats()["index"] == "ivf"  # trained in the inserting thread
    # Lookups and inserts go on while (or after) the index trains.
    more = fill(cache, points[300:], labels[300:])
    wait_for_ivf(cache)
    cache.forget(ids[0])
    assert len(cache) == 419
    for i in range(1, 420, 7):  # entries from before and after the switch
        result = cache.lookup(points[i])
        assert result.hit and result.exact and result.label == labels[i], i
        assert result.entry_id == (ids + more)[i]
    for cluster in range(0, 70, 9):
        result = cache.lookup(near(points[cluster * 6 + 1], 0.04, seed=cluster))
        assert result.hit and result.label == cluster
    assert cache.lookup(points[0]).entry_id != ids[0]  # forgotten, also in the IVF index


def test_a_clear_during_the_ivf_training_does_not_bring_back_a_stale_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    training = threading.Event()
    release = threading.Event()
    build_ivf = SemanticCache._build_ivf

    def slow_build(self: SemanticCache, ids: np.ndarray, vectors: np.ndarray) -> Any:
        training.set()
        assert release.wait(30)
        return build_ivf(self, ids, vectors)

    monkeypatch.setattr(SemanticCache, "_build_ivf", slow_build)
    cache = new_cache(ivf_min_entries=100, background_rebuild=True)
    points, labels = clusters(count=60, per_cluster=2, spread=0.05)
    fill(cache, points[:100], labels[:100])
    assert training.wait(30)
    cache.clear()
    fresh = fill(cache, points[100:], labels[100:])
    release.set()
    time.sleep(0.5)  # let the trainer finish; it must not swap its index in
    for i, entry_id in zip(range(100, 120), fresh, strict=True):
        result = cache.lookup(points[i])
        assert result.hit and result.entry_id == entry_id
    assert not cache.lookup(points[0]).hit


def test_concurrent_lookups_while_one_thread_inserts() -> None:
    cache = new_cache(capacity=5_000, ivf_min_entries=400)
    points, labels = clusters(count=200, per_cluster=4, spread=0.05)
    fill(cache, points[:200], labels[:200])
    errors: list[BaseException] = []
    lookups_per_reader = 300
    readers = 4

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(lookups_per_reader):
                i = int(rng.integers(0, 200))
                result = cache.lookup(points[i])
                assert result.hit and result.label == labels[i]
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    def write() -> None:
        try:
            fill(cache, points[200:], labels[200:])
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(s,)) for s in range(readers)]
    threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    wait_for_ivf(cache)
    stats = cache.stats()
    assert stats["hits"] == readers * lookups_per_reader and stats["misses"] == 0
    assert stats["entries"] == stats["inserts"] == 800


# -- persistence ----------------------------------------------------------------


def open_persistent(folder: Path, bundle: str = BUNDLE, **overrides: Any) -> SemanticCache:
    config = CacheConfig(dim=DIM, bundle_id=bundle, **{"rule": RULE, **overrides})
    return SemanticCache(config, CacheStore(folder, bundle, DIM))


def test_entries_survive_close_and_reopen(tmp_path: Path) -> None:
    points, labels = clusters(count=5, per_cluster=3, spread=0.05)
    cache = open_persistent(tmp_path, snapshot_every=4)  # some in the snapshot, some in the log
    ids = fill(cache, points, labels)
    cache.forget(ids[0])
    cache = open_persistent(tmp_path)  # without close(): as after a crash
    assert len(cache) == 14
    cache.close()
    cache = open_persistent(tmp_path)
    assert len(cache) == 14
    for i in range(1, 15):
        result = cache.lookup(points[i])
        assert result.exact and result.entry_id == ids[i] and result.label == labels[i]
    assert cache.lookup(points[0]).entry_id != ids[0]
    assert fill(cache, points[:1], labels[:1])[0] > max(ids)  # ids are never reused


def test_a_torn_last_log_record_loses_only_that_record(tmp_path: Path) -> None:
    features = random_features(10, seed=8)
    cache = open_persistent(tmp_path)
    ids = fill(cache, features, np.arange(10))
    log_file = tmp_path / LOG_NAME
    size = log_file.stat().st_size
    os.truncate(log_file, size - 100)  # the kill landed inside the last record
    cache = open_persistent(tmp_path)
    assert len(cache) == 9
    for i in range(9):
        assert cache.lookup(features[i]).entry_id == ids[i]
    assert log_file.stat().st_size < size - 100  # the torn tail was cut off
    # New records follow the last good one and are read back.
    later = fill(cache, features[9:], [9])
    cache = open_persistent(tmp_path)
    assert len(cache) == 10 and cache.lookup(features[9]).entry_id == later[0]


def test_garbage_after_the_log_is_cut_off(tmp_path: Path) -> None:
    features = random_features(5, seed=9)
    fill(open_persistent(tmp_path), features, np.arange(5))
    with (tmp_path / LOG_NAME).open("ab") as handle:
        handle.write(os.urandom(300))
    assert len(open_persistent(tmp_path)) == 5


def test_a_snapshot_larger_than_64_mib_reads_back(tmp_path: Path) -> None:
    # 34,000 entries of 512 floats: a capacity above the default, 70 MB of features.
    dim, count = 512, 34_000
    store = CacheStore(tmp_path, BUNDLE, dim, fsync=False)
    feature = random_features(1, seed=15, dim=dim)[0]
    rows = (StoredEntry(i + 1, i % 1000, 0.9, "t", 0.0, feature) for i in range(count))
    assert store.snapshot(rows, count + 1)
    state = CacheStore(tmp_path, BUNDLE, dim).load()
    assert len(state.entries) == count and state.next_id == count + 1
    assert not list(tmp_path.glob("*.corrupt-*"))


def corrupt_snapshot(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_snapshot(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def random_snapshot(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("damage", [corrupt_snapshot, truncate_snapshot, random_snapshot])
def test_a_corrupt_snapshot_is_moved_aside_and_the_cache_starts_empty(
    tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    features = random_features(6, seed=10)
    cache = open_persistent(tmp_path)
    fill(cache, features, np.arange(6))
    cache.close()
    damage(tmp_path / SNAPSHOT_NAME)
    with caplog.at_level(logging.WARNING, logger="ccied.cache"):
        cache = open_persistent(tmp_path)
    assert len(cache) == 0 and not cache.lookup(features[0]).hit
    assert list(tmp_path.glob(f"{SNAPSHOT_NAME}.corrupt-*"))
    assert not (tmp_path / SNAPSHOT_NAME).exists()
    assert "unusable" in caplog.text
    # And it works from there on, across restarts.
    fill(cache, features[:2], [0, 1])
    assert len(open_persistent(tmp_path)) == 2


def test_another_bundles_snapshot_is_moved_aside(tmp_path: Path) -> None:
    features = random_features(4, seed=11)
    cache = open_persistent(tmp_path, bundle="bundle-b")
    fill_b = [cache.insert(f, 1, 0.9, "b", "bundle-b") for f in features]
    assert all(i is not None for i in fill_b)
    cache.close()
    cache = open_persistent(tmp_path, bundle=BUNDLE)
    assert len(cache) == 0 and not cache.lookup(features[0]).hit
    assert list(tmp_path.glob(f"{SNAPSHOT_NAME}.corrupt-*"))


@contextlib.contextmanager
def tiny_tmpfs(size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill the disk needs root")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"ccied-full-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)  # a file left open
        folder.rmdir()


def test_a_full_disk_keeps_the_previous_snapshot_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dim = 512
    features = random_features(80, seed=12, dim=dim)
    with tiny_tmpfs("192k") as disk:
        config = CacheConfig(dim=dim, bundle_id=BUNDLE, rule=RULE)
        cache = SemanticCache(config, CacheStore(disk, BUNDLE, dim))
        for i in range(20):
            cache.insert(features[i], i, 0.9, "test", BUNDLE)
        assert cache.snapshot()  # about 41 KB
        previous = (disk / SNAPSHOT_NAME).read_bytes()
        # Each entry takes about 2 KB of log: fill until the log itself refuses one.
        kept = 20
        with caplog.at_level(logging.WARNING, logger="ccied.cache"):
            for i in range(20, 80):
                try:
                    cache.insert(features[i], i, 0.9, "test", BUNDLE)
                except CachePersistenceError:  # the log is full: that entry is not kept
                    break
                kept += 1
            assert kept > 30, "the disk filled too early for this test to mean anything"
            assert not cache.snapshot()
            assert not cache.snapshot()
        warnings = [r for r in caplog.records if "snapshot not written" in r.getMessage()]
        assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
        assert (disk / SNAPSHOT_NAME).read_bytes() == previous
        assert not list(disk.glob("*.tmp"))
        # Nothing acknowledged was lost: snapshot + log still hold every kept entry.
        reopened = SemanticCache(config, CacheStore(disk, BUNDLE, dim))
        assert len(reopened) == kept == len(cache)
        for i in range(kept):
            assert reopened.lookup(features[i]).label == i
        reopened.close()  # open files keep the tmpfs busy
        cache.close()


def test_a_full_disk_by_enospc_keeps_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = open_persistent(tmp_path)
    fill(cache, random_features(5, seed=13), np.arange(5))
    assert cache.snapshot()
    previous = (tmp_path / SNAPSHOT_NAME).read_bytes()
    fill(cache, random_features(2, seed=14), [5, 6])

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level(logging.WARNING, logger="ccied.cache"):
        assert not cache.snapshot() and not cache.snapshot()
    monkeypatch.undo()
    assert caplog.text.count("snapshot not written (disk full)") == 1
    assert (tmp_path / SNAPSHOT_NAME).read_bytes() == previous
    assert len(open_persistent(tmp_path)) == 7


# -- calibration ----------------------------------------------------------------


def stream_of_clusters(seed: int) -> tuple[np.ndarray, np.ndarray]:
    points, labels = clusters(count=30, per_cluster=8, spread=0.08, seed=seed)
    order = np.random.default_rng(seed).permutation(len(points))
    return points[order], labels[order]


def test_calibration_finds_a_threshold_when_labels_follow_the_features() -> None:
    features, labels = stream_of_clusters(seed=20)
    confidences = np.full(len(labels), 0.9)
    # Far clusters cannot vote (the vote radius), so the default k works.
    result = calibrate(features, labels, confidences, target_fidelity=0.99)
    assert result.rule.threshold_l2 > 0.05
    assert result.chosen.hit_rate > 0.3 and result.chosen.fidelity >= 0.99
    assert result.frames == len(features) and result.curve
    # The chosen rule, applied to fresh frames of the same clusters, answers right.
    cache = SemanticCache(CacheConfig(dim=DIM, bundle_id=BUNDLE, rule=result.rule))
    fill(cache, features, labels)
    hits = [cache.lookup(near(f, 0.03, s)) for s, f in enumerate(features[:40])]
    assert sum(h.hit for h in hits) > 20
    assert all(h.label == labels[i] for i, h in enumerate(hits) if h.hit)


def test_calibration_falls_back_to_exact_repeats_when_labels_are_noise() -> None:
    features, _ = stream_of_clusters(seed=21)
    noise = np.random.default_rng(21).integers(0, 1000, len(features))
    result = calibrate(features, noise, np.full(len(features), 0.9), target_fidelity=0.99)
    assert result.rule.threshold_l2 == 0.0 and result.chosen.hits == 0
    decision = decide([0.05, 0.06, 0.07], [1, 1, 1], result.rule)
    assert not decision.hit and decide([0.0], [1], result.rule).hit


# -- crash safety ---------------------------------------------------------------

CRASH_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    from ccied.cache import CacheConfig, CacheStore, HitRule, SemanticCache

    folder, dim, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    config = CacheConfig(
        dim=dim, bundle_id="crash", capacity=1_000_000, snapshot_every=37,
        rule=HitRule(threshold_l2=0.0),
    )
    cache = SemanticCache(config, CacheStore(folder, "crash", dim))
    print("ready", len(cache), flush=True)
    seed = start
    while True:
        rng = np.random.default_rng(seed)
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        entry_id = cache.insert(vector, seed % 1000, 0.9, "crash", "crash")
        print("added", entry_id, seed, flush=True)
        if seed % 11 == 0:
            print("forgetting", entry_id, flush=True)
            cache.forget(entry_id)
            print("forgot", entry_id, flush=True)
        seed += 1
    """
)


def crash_feature(seed: int, dim: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def run_crash_iterations(folder: Path, iterations: int, seed: int = 0) -> dict[str, Any]:
    """Kill a writing child with SIGKILL ``iterations`` times; check what survives.

    Returns figures for the report (entries acknowledged, kills, lost).
    """
    dim = 32
    timing = random.Random(seed)
    acked: dict[int, int] = {}  # entry id -> seed of its feature
    forgetting: set[int] = set()
    forgotten: set[int] = set()
    next_seed = 0
    entries_now = 0
    child_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for iteration in range(iterations):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(folder), str(dim), str(next_seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env,
        )
        assert child.stdout is not None
        try:
            first = child.stdout.readline().split()
            assert first and first[0] == b"ready", child.stderr.read() if child.stderr else ""
            # The restarted cache holds exactly what the last check found on disk.
            assert int(first[1]) == entries_now
            time.sleep(timing.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate()
        lines = [first, *(line.split() for line in out.splitlines())]
        for words in lines:
            # The last line may be cut by the kill: only whole lines are acknowledgements.
            if len(words) == 3 and words[0] == b"added":
                acked[int(words[1])] = int(words[2])
                next_seed = max(next_seed, int(words[2]) + 1)
            elif len(words) == 2 and words[0] == b"forgetting":
                forgetting.add(int(words[1]))
            elif len(words) == 2 and words[0] == b"forgot":
                forgotten.add(int(words[1]))
        next_seed += 1  # never reuse the seed of an insert that may have been in flight
        entries_now = check_crash_folder(
            folder, dim, acked, forgetting, forgotten, kills=iteration + 1, clean=iteration % 3 == 2
        )
    return {
        "kills": iterations,
        "acknowledged_inserts": len(acked),
        "acknowledged_forgets": len(forgotten),
        "entries_after": len(set(acked) - forgetting),
    }


def check_crash_folder(
    folder: Path,
    dim: int,
    acked: dict[int, int],
    forgetting: set[int],
    forgotten: set[int],
    kills: int,
    clean: bool,
) -> int:
    state = CacheStore(folder, "crash", dim).load()  # raises nothing, cuts torn records
    assert not list(folder.glob("*.corrupt-*")), "a file was torn"
    present = {entry.entry_id for entry in state.entries}
    must_have = set(acked) - forgetting
    assert must_have <= present, f"lost acknowledged entries {sorted(must_have - present)[:10]}"
    assert not (forgotten & present), "a forgotten entry came back"
    # Beyond the acknowledged ones, at most one insert in flight per kill.
    assert len(present - set(acked)) <= kills
    config = CacheConfig(dim=dim, bundle_id="crash", capacity=1_000_000)
    cache = SemanticCache(config, CacheStore(folder, "crash", dim))
    assert len(cache) == len(present)
    for entry_id in sorted(must_have)[-20:]:
        result = cache.lookup(crash_feature(acked[entry_id], dim))
        assert result.exact and result.entry_id == entry_id
        assert result.label == acked[entry_id] % 1000
    if clean:
        cache.close()  # a snapshot now and then, as a peer stopped normally would
    return len(present)


CRASH_ITERATIONS = int(os.environ.get("CCIED_CRASH_ITERATIONS", "5"))


def test_sigkill_at_random_moments_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    start = time.monotonic()
    figures = run_crash_iterations(tmp_path, CRASH_ITERATIONS, seed=1)
    print(f"crash run: {figures}, {time.monotonic() - start:.1f} s")  # shown with -s
    assert figures["acknowledged_inserts"] > CRASH_ITERATIONS
