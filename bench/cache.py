"""``ccied bench cache``: hit rate, fidelity and false hits of the semantic cache, and its latency.

Streams, in order, as a peer would see them:

- the bundled clips (features of the real EfficientNet-Lite0 at the default
  split; the "full model's answer" is the tail after that head, equal to the
  full model to 1e-4). Per clip, the hit rule is calibrated on the first half
  and evaluated on the second; "together" calibrates one rule on the first
  halves of all clips and evaluates on all second halves with one cache.
- Fashion-MNIST test images, each shown for a few frames with camera-like
  perturbations (shift, brightness, noise). EfficientNet's ImageNet classes do
  not map to Fashion-MNIST's, so accuracy against the labels needs a
  Fashion-MNIST classifier: a small CNN is trained here on the training set
  (seconds on a CPU) and cut after its convolutions (32 x 7 x 7).

For each stream the peer's loop is replayed: look up; on a hit serve the cache's
label; on a miss serve the model's and insert. hit_rate = hits / frames,
hit_fidelity = hits equal to the model's answer / hits, false_hit_rate = wrong
hits / frames. Lookup latency is measured on one thread on random features.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from ccied.cache import (
    CacheConfig,
    CacheStore,
    Eviction,
    HitRule,
    SemanticCache,
    calibrate,
    feature_from_tensor,
)
from ccied.cache.store import StoredEntry
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = 10
LATENCY_SIZES = (1_000, 10_000, 100_000)
LATENCY_DIM = 384  # the feature of blocks.11 (192 channels, avg ++ max)
CURVE_THRESHOLDS = tuple(round(0.01 * i, 3) for i in range(0, 21))


@dataclass
class Stream:
    """Frames in order: cache features, the model's answers, ground truth if any."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    confidences: np.ndarray
    truth: np.ndarray | None
    calibration_frames: int  # the first ones


@dataclass
class Outcome:
    frames: int = 0
    hits: int = 0
    true_hits: int = 0
    correct_served: int = 0  # against ground truth, all frames
    evictions: int = 0

    def figures(self, with_truth: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "frames": self.frames,
            "hits": self.hits,
            "hit_rate": round(self.hits / max(1, self.frames), 4),
            "hit_fidelity": round(self.true_hits / self.hits, 4) if self.hits else None,
            "false_hit_rate": round((self.hits - self.true_hits) / max(1, self.frames), 4),
        }
        if with_truth:
            out["accuracy"] = round(self.correct_served / max(1, self.frames), 4)
        return out


def replay(
    cache: SemanticCache, stream: Stream, frames: range, outcome: Outcome | None = None
) -> Outcome:
    """The peer's loop on these frames: lookup, serve, insert after a miss."""
    outcome = outcome or Outcome()
    for i in frames:
        feature = stream.features[i]
        result = cache.lookup(feature)
        served = result.label if result.hit else int(stream.labels[i])
        outcome.frames += 1
        if result.hit:
            outcome.hits += 1
            outcome.true_hits += int(result.label == stream.labels[i])
        else:
            cache.insert(feature, served, float(stream.confidences[i]), "bench", "bench")
        if stream.truth is not None:
            outcome.correct_served += int(served == stream.truth[i])
    outcome.evictions = cache.evictions
    return outcome


def new_cache(dim: int, rule: HitRule, capacity: int = 100_000, **kw: Any) -> SemanticCache:
    return SemanticCache(
        CacheConfig(dim=dim, bundle_id="bench", rule=rule, capacity=capacity, **kw)
    )


def evaluate(streams: list[Stream], rule: HitRule) -> tuple[Outcome, Outcome, SemanticCache]:
    """Seed one cache with the calibration frames, evaluate the rest; then a second pass."""
    cache = new_cache(streams[0].features.shape[1], rule)
    for stream in streams:
        replay(cache, stream, range(stream.calibration_frames))
    first = Outcome()
    for stream in streams:
        replay(cache, stream, range(stream.calibration_frames, len(stream.labels)), first)
    second = Outcome()
    for stream in streams:
        replay(cache, stream, range(len(stream.labels)), second)
    return first, second, cache


def calibrate_on(streams: list[Stream], target: float) -> Any:
    parts = [(s, range(s.calibration_frames)) for s in streams]
    features = np.concatenate([s.features[r] for s, r in parts])
    labels = np.concatenate([s.labels[r] for s, r in parts])
    confidences = np.concatenate([s.confidences[r] for s, r in parts])
    return calibrate(features, labels, confidences, target_fidelity=target)


def study(name: str, streams: list[Stream], target: float) -> dict[str, Any]:
    calibration = calibrate_on(streams, target)
    rule = calibration.rule
    first, second, _ = evaluate(streams, rule)
    with_truth = streams[0].truth is not None
    curve = []
    for threshold in CURVE_THRESHOLDS:
        point, _, _ = evaluate(streams, replace(rule, threshold_l2=threshold))
        curve.append({"threshold_l2": threshold, **point.figures(with_truth)})
    return {
        "name": name,
        "rule": asdict(rule),
        "calibration": {
            "frames": calibration.frames,
            "hit_rate": round(calibration.chosen.hit_rate, 4),
            "fidelity": round(calibration.chosen.fidelity, 4),
        },
        "evaluation": first.figures(with_truth),
        "second_pass": second.figures(with_truth),
        "curve": curve,
    }


def eviction_study(streams: list[Stream], rule: HitRule, capacity: int) -> dict[str, Any]:
    out: dict[str, Any] = {"capacity": capacity}
    for policy in (Eviction.LRU, Eviction.LFU):
        cache = new_cache(streams[0].features.shape[1], rule, capacity, eviction=policy)
        outcome = Outcome()
        for stream in streams:
            replay(cache, stream, range(len(stream.labels)), outcome)
        out[str(policy)] = outcome.figures(streams[0].truth is not None)
        out[str(policy)]["evictions"] = outcome.evictions
    return out


# -- the clips --------------------------------------------------------------------


def clip_streams(every: int, progress: bool) -> list[Stream]:
    import torch
    from ccied.pruning import DEFAULT_SPLIT, bundled_clips, iter_frames, load_model, preprocess

    model = load_model()
    head, tail = model.split(DEFAULT_SPLIT)
    streams = []
    for path in bundled_clips():
        frames = list(iter_frames(path, every=every))
        features, labels, confidences = [], [], []
        for frame in tqdm(frames, desc=f"model {path.name}", disable=not progress, leave=False):
            with torch.inference_mode():
                tensor = head(preprocess(frame.pixels, model.spec))
                probabilities = torch.softmax(tail(tensor), dim=1)[0]
            features.append(feature_from_tensor(tensor.numpy()))
            labels.append(int(probabilities.argmax()))
            confidences.append(float(probabilities.max()))
        streams.append(
            Stream(
                path.name,
                np.stack(features),
                np.array(labels),
                np.array(confidences),
                None,
                len(frames) // 2,
            )
        )
    return streams


# -- Fashion-MNIST ----------------------------------------------------------------


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
        features,
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


# -- report -----------------------------------------------------------------------


def plot(studies: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for entry in studies:
        curve = [p for p in entry["curve"] if p["hit_fidelity"] is not None]
        axes.plot(
            [p["hit_rate"] for p in curve],
            [p["hit_fidelity"] for p in curve],
            marker=".",
            label=entry["name"],
        )
        chosen = entry["evaluation"]
        if chosen["hit_fidelity"] is not None:
            axes.scatter([chosen["hit_rate"]], [chosen["hit_fidelity"]], marker="*", s=120)
    axes.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("hit rate (evaluation frames)")
    axes.set_ylabel("fidelity of hits")
    axes.set_title("Semantic cache: thresholds 0 to 0.2 (star: calibrated)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(report: dict[str, Any]) -> None:
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    head = f"{'stream':<22}{'thr':>6}{'frames':>7}{'hit':>7}{'fid':>7}{'false':>7}{'acc':>7}"
    print(head + f"{'2nd hit':>9}{'2nd fid':>9}")
    for entry in report["studies"]:
        e, s = entry["evaluation"], entry["second_pass"]
        print(
            f"{entry['name']:<22}{entry['rule']['threshold_l2']:>6.2f}{e['frames']:>7}"
            f"{cell(e['hit_rate']):>7}{cell(e['hit_fidelity']):>7}"
            f"{cell(e['false_hit_rate']):>7}{cell(e.get('accuracy')):>7}"
            f"{cell(s['hit_rate']):>9}{cell(s['hit_fidelity']):>9}"
        )
    for name, study_ in report["eviction"].items():
        print(
            f"eviction {name} (capacity {study_['capacity']}): "
            + "  ".join(
                f"{p}: hit {study_[p]['hit_rate']:.3f} fid {cell(study_[p]['hit_fidelity'])}"
                for p in ("lru", "lfu")
            )
        )
    for row in report["latency"]:
        print(
            f"lookup {row['entries']:>7} entries ({row['index']}, 1 thread): "
            f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer frames (under 2 minutes)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--plot", type=Path, default=Path("cache_curve.png"), help="hit rate vs fidelity PNG"
    )
    parser.add_argument("--target-fidelity", type=float, default=0.99)
    parser.add_argument("--every", type=int, help="use every N-th clip frame (default 1; quick 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table, writes the plot and (with --json) the figures."""
    logging.getLogger("ccied.cache").setLevel(logging.WARNING)
    progress = not args.no_progress
    quick = bool(args.quick)
    every = args.every or (2 if quick else 1)
    started = time.perf_counter()
    clips = clip_streams(every, progress)
    fashion = fashion_stream(
        images=200 if quick else 1000,
        views=4,
        train_images=8_000 if quick else 60_000,
        epochs=1 if quick else 2,
        progress=progress,
    )
    studies = [study(c.name, [c], args.target_fidelity) for c in clips]
    together = study("clips together", clips, args.target_fidelity)
    fashion_study = study("fashion-mnist", [fashion], args.target_fidelity)
    studies += [together, fashion_study]
    eviction = {
        "clips": eviction_study(clips, HitRule(**together["rule"]), capacity=32),
        "fashion-mnist": eviction_study([fashion], HitRule(**fashion_study["rule"]), 64),
    }
    latency = []
    with tempfile.TemporaryDirectory(prefix="ccied-bench-") as folder:
        for size in tqdm(LATENCY_SIZES, desc="lookup latency", disable=not progress):
            latency.append(lookup_latency(size, 1000 if quick else 5000, Path(folder)))
    main = together["evaluation"]
    report = {
        "hit_rate": main["hit_rate"],
        "hit_fidelity": main["hit_fidelity"],
        "false_hit_rate": main["false_hit_rate"],
        "second_pass_hit_rate": together["second_pass"]["hit_rate"],
        "lookup_p50_ms": {str(r["entries"]): r["p50_ms"] for r in latency},
        "lookup_p99_ms": {str(r["entries"]): r["p99_ms"] for r in latency},
        "fashion_mnist": fashion_study["evaluation"],
        "studies": studies,
        "eviction": eviction,
        "latency": latency,
        "quick": quick,
        "clip_every": every,
        "seconds": round(time.perf_counter() - started, 1),
    }
    plot(studies, args.plot)
    print_table(report)
    print(f"plot: {args.plot}   ({report['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ccied.bench.cache", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
