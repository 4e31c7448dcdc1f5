"""``ccied bench cache``: what the semantic cache answers, how faithfully, per key depth.

Every key depth, from a 16x16 thumbnail of the input pixels (no model) to deep
model stages, is measured on the same real frames in stream order, each frame
looked up among the earlier ones as a peer would:

- **clips**: the bundled clips (real EfficientNet-Lite0 answers). One rule per
  depth is calibrated on the first half of each clip and evaluated on the
  second halves (the cache seeded with the first halves).
- **pans, second pass** (held out: never used to calibrate): slow pans over
  real photos the model knows, then the same pans shifted by 3 pixels and 6%
  brighter; hits are counted on the second pass.
- **near camera**: a second camera on the same scenes whose frames are the
  first camera's shifted by 2 pixels, looked up in the first camera's entries.
- **tiered**: the thumbnail first, the model-stage key only when the thumbnail
  lookup is inconclusive, as the peer does; which depth answered, and the
  compute a frame spent on keys.
- **fashion-mnist** (when Debian's dataset-fashion-mnist is installed): test
  images shown a few times with camera-like perturbations, against ground
  truth, through a small CNN trained here.

Fidelity is two numbers (DESIGN.md): agreement of the served answers (hits
from the cache, misses from the model) with the full float32 model on
*decisive* frames (its top-1 probability >= 0.5) and on *all* frames. The
cache's own target is over its hits: ``hit_fidelity`` >= 0.99. The ceiling of
the hit rate with only decisive entries answering is the share of decisive
frames, reported beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ccied.cache import (
    THUMBNAIL_KEY,
    BadFeatureError,
    CacheConfig,
    CacheStore,
    Eviction,
    HitRule,
    SemanticCache,
    feature_from_tensor,
    thumbnail_feature,
)
from ccied.cache.audit import DECISIVE_CONFIDENCE
from ccied.cache.policy import Calibration, calibrate_or_default
from ccied.cache.store import StoredEntry
from ccied.peer.argtypes import fraction, positive_int
from ccied.pruning import Frame
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = 10
LATENCY_SIZES = (1_000, 10_000, 100_000)
LATENCY_DIM = 768  # the thumbnail key (16 x 16 x 3)
CURVE_THRESHOLDS = tuple(round(0.05 * i, 3) for i in range(0, 21))
# Stage ends of EfficientNet-Lite0 (`ccied splits`) and the thumbnail.
DEPTHS = (THUMBNAIL_KEY, "blocks.2", "blocks.4", "blocks.7", "blocks.11", "blocks.15")
QUICK_DEPTHS = (THUMBNAIL_KEY, "blocks.4", "blocks.11")
NEAR_SHIFT_PX = 2
DEEP_FOR_TIERED = "blocks.4"


@dataclass
class Stream:
    """Frames in order: a key per depth, the full model's answers, ground truth if any."""

    name: str
    keys: dict[str, np.ndarray]  # depth -> (frames, dim); a flat frame's row is NaN
    labels: np.ndarray
    confidences: np.ndarray
    truth: np.ndarray | None = None
    calibration_frames: int = 0  # the first ones

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Outcome:
    frames: int = 0
    decisive: int = 0
    hits: int = 0
    true_hits: int = 0
    wrong_decisive: int = 0  # wrong hits on decisive frames
    decisive_hits: int = 0
    correct_served: int = 0  # against ground truth
    no_key: int = 0
    by_depth: dict[str, int] = field(default_factory=dict)
    key_compute: float = 0.0  # sum over frames of the model share spent on keys

    def figures(self, with_truth: bool = False) -> dict[str, Any]:
        wrong = self.hits - self.true_hits
        decisive_share = self.decisive / max(1, self.frames)
        hit_rate = self.hits / max(1, self.frames)
        out: dict[str, Any] = {
            "frames": self.frames,
            "hits": self.hits,
            "hit_rate": round(hit_rate, 4),
            "decisive_share": round(decisive_share, 4),
            "hit_rate_over_decisive_share": (
                round(hit_rate / decisive_share, 3) if decisive_share else None
            ),
            "hit_fidelity": round(self.true_hits / self.hits, 4) if self.hits else None,
            "fidelity_decisive": (
                round(1 - self.wrong_decisive / self.decisive, 4) if self.decisive else None
            ),
            "fidelity_all": round(1 - wrong / max(1, self.frames), 4),
            "false_hit_rate": round(wrong / max(1, self.frames), 4),
        }
        if self.by_depth:
            out["hits_by_depth"] = dict(self.by_depth)
            out["key_compute_share"] = round(self.key_compute / max(1, self.frames), 4)
        if with_truth:
            out["accuracy"] = round(self.correct_served / max(1, self.frames), 4)
        return out

    def count(self, stream: Stream, i: int, hit: bool, label: int) -> int:
        """Count frame ``i``, served with ``label`` on a hit, else the model's answer."""
        served = label if hit else int(stream.labels[i])
        decisive = stream.confidences[i] >= DECISIVE_CONFIDENCE
        self.frames += 1
        self.decisive += int(decisive)
        if hit:
            self.hits += 1
            right = label == stream.labels[i]
            self.true_hits += int(right)
            self.decisive_hits += int(decisive)
            self.wrong_decisive += int(decisive and not right)
        if stream.truth is not None:
            self.correct_served += int(served == stream.truth[i])
        return served


def replay(
    cache: SemanticCache,
    stream: Stream,
    depth: str,
    frames: Sequence[int],
    outcome: Outcome | None = None,
    origin: str = "bench",
) -> Outcome:
    """The peer's loop at one depth: look up; serve a hit, else the model's answer and insert."""
    outcome = outcome or Outcome()
    keys = stream.keys[depth]
    for i in frames:
        feature = keys[i]
        if not np.isfinite(feature).all():  # a flat frame: no key, a miss
            outcome.no_key += 1
            outcome.count(stream, i, False, -1)
            continue
        result = cache.lookup(feature)
        outcome.count(stream, i, result.hit, result.label)
        if not result.hit:
            cache.insert(feature, int(stream.labels[i]), float(stream.confidences[i]), origin, "b")
    return outcome


def new_cache(dim: int, rule: HitRule, capacity: int = 100_000, **kw: Any) -> SemanticCache:
    return SemanticCache(CacheConfig(dim=dim, bundle_id="b", rule=rule, capacity=capacity, **kw))


def calibrate_on(
    streams: Sequence[Stream], depth: str, target: float
) -> tuple[HitRule, str, Calibration]:
    """As ``ccied prepare`` does: calibrate on the first halves, else keep the default rule."""
    parts = [(s, range(s.calibration_frames)) for s in streams]
    features = np.concatenate([s.keys[depth][r] for s, r in parts])
    labels = np.concatenate([s.labels[r] for s, r in parts])
    confidences = np.concatenate([s.confidences[r] for s, r in parts])
    usable = np.isfinite(features).all(axis=1)
    fit = (features[usable], labels[usable], confidences[usable])
    return calibrate_or_default(depth, fit, None, target)


def first_pass(streams: Sequence[Stream], depth: str, rule: HitRule) -> Outcome:
    """Seed one cache with the calibration frames of every stream, evaluate the rest."""
    cache = new_cache(streams[0].keys[depth].shape[1], rule)
    for stream in streams:
        replay(cache, stream, depth, range(stream.calibration_frames))
    outcome = Outcome()
    for stream in streams:
        replay(cache, stream, depth, range(stream.calibration_frames, len(stream)), outcome)
    return outcome


def second_pass(first: Stream, again: Stream, depth: str, rule: HitRule) -> Outcome:
    """Replay ``first`` into a fresh cache, then count ``again`` (its revisit or near view)."""
    cache = new_cache(first.keys[depth].shape[1], rule)
    replay(cache, first, depth, range(len(first)), origin="first")
    return replay(cache, again, depth, range(len(again)))


def tiered_pass(
    first: Stream, again: Stream, rules: dict[str, HitRule], deep: str, deep_share: float
) -> Outcome:
    """The peer's tiers: thumbnail first; the deep key only when that lookup is inconclusive."""
    thumb = new_cache(first.keys[THUMBNAIL_KEY].shape[1], rules[THUMBNAIL_KEY])
    deeper = new_cache(first.keys[deep].shape[1], rules[deep])

    def one(stream: Stream, i: int, outcome: Outcome | None) -> None:
        label, hit_depth = -1, ""
        key = stream.keys[THUMBNAIL_KEY][i]
        looked_deep = False
        if np.isfinite(key).all():
            result = thumb.lookup(key)
            if result.hit:
                label, hit_depth = result.label, THUMBNAIL_KEY
            elif result.inconclusive:
                looked_deep = True
                deep_result = deeper.lookup(stream.keys[deep][i])
                if deep_result.hit:
                    label, hit_depth = deep_result.label, deep
        if outcome is not None:
            outcome.count(stream, i, bool(hit_depth), label)
            if hit_depth:
                outcome.by_depth[hit_depth] = outcome.by_depth.get(hit_depth, 0) + 1
            # A miss runs the model anyway; only a deep *hit* or a deep lookup that
            # would not otherwise be on the path counts: charge every deep lookup.
            outcome.key_compute += deep_share if looked_deep else 0.0
        if not hit_depth:
            answer = int(stream.labels[i]), float(stream.confidences[i])
            if np.isfinite(key).all():
                thumb.insert(key, *answer, "bench", "b")
            deeper.insert(stream.keys[deep][i], *answer, "bench", "b")

    for i in range(len(first)):
        one(first, i, None)
    outcome = Outcome()
    for i in range(len(again)):
        one(again, i, outcome)
    return outcome


# -- frames -> keys -----------------------------------------------------------------


def model_stream(
    name: str, frames: Sequence[Frame], depths: Sequence[str], progress: bool
) -> Stream:
    """Keys at every depth and the full model's answer for each frame (real EfficientNet)."""
    import torch
    from ccied.cache.keys import THUMBNAIL_SIDE
    from ccied.pruning import load_model
    from ccied.pruning.media import center_crop, normalize, thumbnail

    model = _model(load_model)
    spec = model.spec
    index = {d: model.split_point(d).index for d in depths if d != THUMBNAIL_KEY}
    keys: dict[str, list[np.ndarray]] = {d: [] for d in depths}
    labels, confidences = [], []
    for frame in tqdm(frames, desc=f"model {name}", disable=not progress, leave=False):
        crop = center_crop(frame.pixels, spec.input_size)
        small = thumbnail(frame.pixels, spec.input_size, THUMBNAIL_SIDE)
        try:
            keys[THUMBNAIL_KEY].append(thumbnail_feature(small))
        except BadFeatureError:
            keys[THUMBNAIL_KEY].append(np.full(768, np.nan, dtype=np.float32))
        x = normalize(crop, spec)
        with torch.inference_mode():
            for i, stage in enumerate(model.stages):
                x = stage(x)
                for depth, at in index.items():
                    if at == i:
                        keys[depth].append(feature_from_tensor(x.numpy()))
            probabilities = torch.softmax(x, dim=1)[0]
        labels.append(int(probabilities.argmax()))
        confidences.append(float(probabilities.max()))
    return Stream(
        name,
        {d: np.stack(v) for d, v in keys.items()},
        np.array(labels),
        np.array(confidences),
        None,
        len(frames) // 2,
    )


_MODEL: list[Any] = []


def _model(load: Any) -> Any:
    if not _MODEL:
        _MODEL.append(load())
    return _MODEL[0]


def clip_streams(every: int, depths: Sequence[str], progress: bool) -> list[Stream]:
    from ccied.pruning import bundled_clips, iter_frames

    return [
        model_stream(path.name, list(iter_frames(path, every=every)), depths, progress)
        for path in bundled_clips()
    ]


def pan_streams(depths: Sequence[str], steps: int, progress: bool) -> tuple[Stream, Stream]:
    from ccied.bench.workloads import photo_pans
    from ccied.bench.workloads import second_pass as revisit

    first = model_stream("pans", photo_pans(steps=steps), depths, progress)
    again = model_stream("pans, second pass", photo_pans(revisit(), steps), depths, progress)
    return first, again


def near_streams(
    clips: Sequence[Stream], every: int, depths: Sequence[str], progress: bool
) -> tuple[Stream, Stream]:
    """Camera A: the clips' frames; camera B: the same frames shifted by 2 pixels."""
    from ccied.bench.workloads import near_view
    from ccied.pruning import bundled_clips, iter_frames

    frames = [f for path in bundled_clips() for f in iter_frames(path, every=every)]
    near = model_stream(
        "near camera", [near_view(f, NEAR_SHIFT_PX) for f in frames], depths, progress
    )
    first = Stream(
        "clips",
        {d: np.concatenate([c.keys[d] for c in clips]) for d in depths},
        np.concatenate([c.labels for c in clips]),
        np.concatenate([c.confidences for c in clips]),
    )
    return first, near


# -- Fashion-MNIST ----------------------------------------------------------------

FASHION_DEPTH = "conv"  # the small CNN cut after its convolutions (32 x 7 x 7)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def perturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A camera-like view: shift by up to 2 px, brightness +-15%, sensor noise."""
    dy, dx = rng.integers(-2, 3, size=2)
    shifted = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    scale = rng.uniform(0.85, 1.15)
    noisy = shifted * scale + rng.normal(0.0, 0.03, image.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def fashion_stream(
    images: int, views: int, train_images: int, epochs: int, progress: bool
) -> Stream:
    import torch
    from torch import nn

    torch.manual_seed(0)
    train_x = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:train_images] / 255.0
    train_y = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:train_images]
    head = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    tail = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, FASHION_CLASSES))
    model = nn.Sequential(head, tail)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.tensor(train_x, dtype=torch.float32)[:, None]
    y = torch.tensor(train_y, dtype=torch.long)
    steps = epochs * ((len(x) + 127) // 128)
    with tqdm(total=steps, desc="train fashion CNN", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 128):
                batch = order[start : start + 128]
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it untyped
                optimiser.step()
                bar.update()
    model.eval()
    test_x = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:images] / 255.0
    test_y = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")[:images]
    rng = np.random.default_rng(0)
    frames = np.stack([perturb(image, rng) for image in test_x for _ in range(views)])
    truth = np.repeat(test_y, views).astype(np.int64)
    with torch.inference_mode():
        tensors = head(torch.tensor(frames)[:, None])
        probabilities = torch.softmax(tail(tensors), dim=1)
    features = np.stack([feature_from_tensor(t[None].numpy()) for t in tensors])
    return Stream(
        "fashion-mnist",
        {FASHION_DEPTH: features},
        probabilities.argmax(1).numpy(),
        probabilities.max(1).values.numpy(),
        truth,
        len(frames) // 2,
    )


# -- latency ----------------------------------------------------------------------


def lookup_latency(size: int, queries: int, folder: Path) -> dict[str, Any]:
    """p50/p99 of lookup() on one thread at ``size`` random entries (loaded as on a restart)."""
    import faiss

    rng = np.random.default_rng(size)
    vectors = rng.standard_normal((size, LATENCY_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = CacheStore(folder / str(size), "latency", LATENCY_DIM, fsync=False)
    store.snapshot(
        (StoredEntry(i + 1, i % 1000, 0.9, "bench", 0.0, vectors[i]) for i in range(size)),
        size + 1,
    )
    start = time.perf_counter()
    cache = SemanticCache(CacheConfig(dim=LATENCY_DIM, bundle_id="latency", capacity=size), store)
    load_s = time.perf_counter() - start  # IVF training past 20k entries, all threads
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    picks = rng.integers(0, size, queries)
    noise = rng.standard_normal((queries, LATENCY_DIM)).astype(np.float32) * 0.002
    probes = vectors[picks] + noise
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    times = []
    for probe in probes:
        begin = time.perf_counter()
        cache.lookup(probe)
        times.append(time.perf_counter() - begin)
    faiss.omp_set_num_threads(threads)
    ms = np.array(times) * 1e3
    return {
        "entries": size,
        "index": cache.stats()["index"],
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "load_s": round(load_s, 2),
        "queries": queries,
    }


# -- a real peer: what a hit costs -------------------------------------------------

PEER_SLOWDOWN = 4.0  # phone-class, as in the target


def peer_study(slowdown: float, pan_steps: int) -> dict[str, Any]:
    """Submit to answer, through a real ``ccied peer`` (no neighbours) at ``slowdown``.

    Two peers in turn on the same frames: one with ``--no-cache`` (every frame
    the full local inference), then one with the cache (default audit rate)
    that sees the pans, then the shifted, brighter second pass. The ratio is
    the median hit against the median full local inference of the first peer.
    """
    from ccied.bench.cluster import PeerProcess
    from ccied.bench.workloads import photo_pans
    from ccied.bench.workloads import second_pass as revisit
    from ccied.peer.client import Client

    first = photo_pans(steps=pan_steps)
    again = photo_pans(revisit(), steps=pan_steps)
    out: dict[str, Any] = {"slowdown": slowdown, "frames": len(first) + len(again)}
    with tempfile.TemporaryDirectory(prefix="ccied-bench-", dir="/tmp") as folder:
        root = Path(folder)
        for name, extra in (("nocache", ["--no-cache"]), ("cached", [])):
            peer = PeerProcess(
                name=name,
                role="edge",
                listen="none",
                socket_path=root / f"{name}.sock",
                extra_args=["--slowdown", f"{slowdown:g}", *extra],
                log_path=root / f"{name}.log",
            )
            peer.start()
            try:
                peer.wait_ready()
                with Client(peer.socket_path, timeout_s=60) as client:
                    results = [client.submit(f.pixels, f.name) for f in [*first, *again]]
                    time.sleep(0.5)  # let the last audits land before reading status
                    status = client.status()
            finally:
                peer.stop()
            latencies = [r.latency_ms for r in results]
            if name == "nocache":
                out["full_local_median_ms"] = round(float(np.median(latencies)), 2)
                continue
            hits = [r.latency_ms for r in results if r.source == "cache"]
            second = results[len(first) :]
            out.update(
                {
                    "hits": len(hits),
                    "second_pass_hit_rate": round(
                        sum(r.source == "cache" for r in second) / len(second), 4
                    ),
                    "hit_median_ms": round(float(np.median(hits)), 2) if hits else None,
                    "hit_p95_ms": round(float(np.percentile(hits, 95)), 2) if hits else None,
                    # A thumbnail hit runs no stage; a deeper one ran the head to its key.
                    "hit_median_ms_by_depth": {
                        depth: round(float(np.median(at)), 2)
                        for depth in dict.fromkeys(r.cache_depth for r in results if r.cache_depth)
                        if (at := [r.latency_ms for r in results if r.cache_depth == depth])
                    },
                    "hits_by_depth": status["cache"]["hits_by_depth"],
                    "audit": {
                        k: status["cache"]["audit"][k]
                        for k in ("checked", "wrong", "false_hit_rate", "false_hit_upper_95")
                    },
                }
            )
    if out.get("hit_median_ms") is not None:
        full = out["full_local_median_ms"]
        out["hit_over_full_local"] = round(out["hit_median_ms"] / full, 3)
        out["hit_over_full_local_by_depth"] = {
            depth: round(ms / full, 3) for depth, ms in out["hit_median_ms_by_depth"].items()
        }
    return out


# -- studies ------------------------------------------------------------------------


def depth_study(
    depth: str,
    clips: Sequence[Stream],
    pans: tuple[Stream, Stream],
    near: tuple[Stream, Stream],
    target: float,
    compute_share: float,
) -> dict[str, Any]:
    """Calibrate one depth on the clips' first halves; evaluate it everywhere."""
    rule, verdict, calibration = calibrate_on(clips, depth, target)
    curve = []
    for threshold in CURVE_THRESHOLDS:
        point = first_pass(clips, depth, replace(rule, threshold_l2=threshold))
        curve.append({"threshold_l2": threshold, **point.figures()})
    return {
        "depth": depth,
        "compute_share": round(compute_share, 4),
        "rule": asdict(rule),
        "calibration": {
            "verdict": verdict,
            "frames": calibration.frames,
            "hits": calibration.chosen.hits,
            "hit_rate": round(calibration.chosen.hit_rate, 4),
            "hit_fidelity": round(calibration.chosen.fidelity, 4),
        },
        "clips": first_pass(clips, depth, rule).figures(),
        "pans_second_pass": second_pass(*pans, depth, rule).figures(),
        "near_camera": second_pass(*near, depth, rule).figures(),
        "curve": curve,
    }


def eviction_study(stream: Stream, depth: str, rule: HitRule, capacity: int) -> dict[str, Any]:
    out: dict[str, Any] = {"capacity": capacity}
    for policy in (Eviction.LRU, Eviction.LFU):
        cache = new_cache(stream.keys[depth].shape[1], rule, capacity, eviction=policy)
        outcome = replay(cache, stream, depth, range(len(stream)))
        out[str(policy)] = outcome.figures(stream.truth is not None)
        out[str(policy)]["evictions"] = cache.evictions
    return out


def fashion_study(progress: bool, quick: bool, target: float) -> dict[str, Any] | None:
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        return None
    stream = fashion_stream(
        images=200 if quick else 1000,
        views=4,
        train_images=8_000 if quick else 60_000,
        epochs=1 if quick else 2,
        progress=progress,
    )
    rule = calibrate_on([stream], FASHION_DEPTH, target)[0]
    cache = new_cache(stream.keys[FASHION_DEPTH].shape[1], rule)
    replay(cache, stream, FASHION_DEPTH, range(stream.calibration_frames))
    outcome = replay(cache, stream, FASHION_DEPTH, range(stream.calibration_frames, len(stream)))
    return {
        "rule": asdict(rule),
        "evaluation": outcome.figures(with_truth=True),
        "eviction": eviction_study(stream, FASHION_DEPTH, rule, 64),
    }


# -- report -------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for entry in report["depths"]:
        curve = [p for p in entry["curve"] if p["hit_fidelity"] is not None]
        left.plot(
            [p["hit_rate"] for p in curve],
            [p["hit_fidelity"] for p in curve],
            marker=".",
            label=entry["depth"],
        )
        chosen = entry["clips"]
        if chosen["hit_fidelity"] is not None:
            left.scatter([chosen["hit_rate"]], [chosen["hit_fidelity"]], marker="*", s=120)
    left.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
    left.set_xlabel("hit rate (clips, second halves)")
    left.set_ylabel("agreement of hits with the full model")
    left.set_title("Thresholds 0 to 1 per key depth (star: the rule in force)")
    left.legend(fontsize=8)
    names = [e["depth"] for e in report["depths"]]
    x = np.arange(len(names))
    for offset, (scenario, label) in enumerate(
        (("pans_second_pass", "pans, 2nd pass"), ("near_camera", "near camera"), ("clips", "clips"))
    ):
        rates = [e[scenario]["hit_rate"] for e in report["depths"]]
        right.bar(x + (offset - 1) * 0.27, rates, width=0.27, label=label)
    ceiling = report["depths"][0]["pans_second_pass"]["decisive_share"]
    right.axhline(ceiling, color="black", linestyle=":", linewidth=1, label="decisive share (pans)")
    right.set_xticks(x, names, fontsize=8)
    right.set_ylabel("hit rate")
    right.set_title("Hits per key depth (calibrated on the clips)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'depth':<10}{'compute':>8}{'thr':>6}{'floor':>6}{'marg':>5}{'rule':>6} | "
        f"{'scenario':<18}{'hit':>7}{'ceil':>7}{'hit fid':>8}{'fid dec':>8}{'fid all':>8}"
    )
    for entry in report["depths"]:
        rule = entry["rule"]
        lead = (
            f"{entry['depth']:<10}{entry['compute_share']:>8.3f}{rule['threshold_l2']:>6.2f}"
            f"{rule['answer_floor']:>6.2f}{rule['vote_margin']:>5}"
            f"{'cal' if entry['calibration']['verdict'] == 'calibrated' else 'def':>6}"
        )
        for scenario in ("clips", "pans_second_pass", "near_camera"):
            f = entry[scenario]
            print(
                f"{lead} | {scenario:<18}{_cell(f['hit_rate']):>7}{_cell(f['decisive_share']):>7}"
                f"{_cell(f['hit_fidelity']):>8}{_cell(f['fidelity_decisive']):>8}"
                f"{_cell(f['fidelity_all']):>8}"
            )
            lead = " " * len(lead)
    for scenario, figures in report["tiered"].items():
        print(
            f"tiered {scenario:<18} hit {figures['hit_rate']:.3f} (ceiling "
            f"{figures['decisive_share']:.3f}) by depth {figures['hits_by_depth']}, hit fid "
            f"{_cell(figures['hit_fidelity'])}, fid dec {_cell(figures['fidelity_decisive'])} "
            f"all {_cell(figures['fidelity_all'])}, key compute {figures['key_compute_share']:.3f}"
        )
    fashion = report.get("fashion_mnist")
    if fashion:
        e = fashion["evaluation"]
        print(
            f"fashion-mnist: hit {e['hit_rate']:.3f} hit fid {_cell(e['hit_fidelity'])} "
            f"accuracy {e['accuracy']:.3f}"
        )
    peer = report.get("peer")
    if peer:
        print(
            f"real peer at {peer['slowdown']:g}x: hit median {peer['hit_median_ms']} ms (p95 "
            f"{peer['hit_p95_ms']}; by depth {peer.get('hit_median_ms_by_depth')}), full local "
            f"inference median {peer['full_local_median_ms']} ms, ratio "
            f"{peer.get('hit_over_full_local')} "
            f"(by depth {peer.get('hit_over_full_local_by_depth')}); second-pass hit rate "
            f"{peer['second_pass_hit_rate']}, by depth {peer['hits_by_depth']}; audit "
            f"{peer['audit']}"
        )
    for row in report["latency"]:
        print(
            f"lookup {row['entries']:>7} entries ({row['index']}, 1 thread, {LATENCY_DIM}-d): "
            f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer frames and depths (minutes)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--plot", type=Path, default=Path("cache_curve.png"), help="PNG of hits per key depth"
    )
    parser.add_argument("--target-fidelity", type=fraction, default=0.99)
    parser.add_argument(
        "--every", type=positive_int, help="use every N-th clip frame (default 2; quick 3)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip the hit latency through a real peer"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table, writes the plot and (with --json) the figures."""
    logging.getLogger("ccied.cache").setLevel(logging.WARNING)
    progress = not args.no_progress
    quick = bool(args.quick)
    every = args.every or (3 if quick else 2)
    depths = QUICK_DEPTHS if quick else DEPTHS
    started = time.perf_counter()
    from ccied.pruning import load_model

    model = _model(load_model)
    shares = {
        d: (0.0 if d == THUMBNAIL_KEY else model.split_point(d).compute_fraction) for d in depths
    }
    clips = clip_streams(every, depths, progress)
    pans = pan_streams(depths, 16 if quick else 24, progress)
    near = near_streams(clips, every, depths, progress)
    studies = [
        depth_study(d, clips, pans, near, args.target_fidelity, shares[d])
        for d in tqdm(depths, desc="depths", disable=not progress, leave=False)
    ]
    rules = {s["depth"]: HitRule(**s["rule"]) for s in studies}
    deep = DEEP_FOR_TIERED
    tiered = {
        "pans_second_pass": tiered_pass(*pans, rules, deep, shares[deep]).figures(),
        "near_camera": tiered_pass(*near, rules, deep, shares[deep]).figures(),
    }
    peer = None if args.no_peer else peer_study(PEER_SLOWDOWN, 12 if quick else 24)
    latency = []
    with tempfile.TemporaryDirectory(prefix="ccied-bench-") as folder:
        for size in tqdm(LATENCY_SIZES, desc="lookup latency", disable=not progress):
            latency.append(lookup_latency(size, 1000 if quick else 5000, Path(folder)))
    thumb = studies[0]
    report = {
        "fidelity_floor": {"hits": args.target_fidelity, "decisive_confidence": 0.5},
        "headline": {
            "depth": THUMBNAIL_KEY,
            "pans_second_pass": thumb["pans_second_pass"],
            "near_camera": thumb["near_camera"],
            "clips": thumb["clips"],
        },
        "depths": studies,
        "tiered": tiered,
        "tiered_deep_depth": deep,
        "peer": peer,
        "fashion_mnist": fashion_study(progress, quick, args.target_fidelity),
        "eviction": eviction_study(
            near[0], THUMBNAIL_KEY, rules[THUMBNAIL_KEY], capacity=len(near[0]) // 4
        ),
        "latency": latency,
        "quick": quick,
        "clip_every": every,
        "seconds": round(time.perf_counter() - started, 1),
    }
    plot(report, args.plot)
    print_table(report)
    print(f"plot: {args.plot}   ({report['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ccied.bench.cache", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
