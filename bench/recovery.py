"""Recovered transfer layers: bytes on the wire against decisive and overall agreement.

For each split x channels x bits it trains a layer by distillation
(:mod:`ccied.pruning.recover`) on the first 60% of each bundled clip and six
scikit-image photos (strongly augmented copies), then measures on held-out frames
(the last 40% of each clip, and a stream of five other photos no training frame
comes from): the median codec payload, its ratio to the float32 tensor and to a
JPEG q90 of the 224x224 frame, and top-1 agreement with the unpruned float32
model on decisive frames (its top-1 probability >= 0.5) and on all frames.
Beside each recovered layer: the same PCA layer untrained, and the codec on every
channel (no reduction).

``--stream BUNDLE`` instead sends a held-out stream through real peers serving a
bundle (``ccied prepare --recover``): a cloud and an edge that always offloads its
recovered variant, over CURVE on loopback; the frames are the held-out photos
and the last 40% of each clip, none of which recovery trained on. It reports the
median bytes that crossed per miss and agreement with the unpruned model run here.

Run: ``ccied bench recovery [--quick] [--json PATH]`` or
``ccied bench recovery --stream BUNDLE [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.bench.transfer import _jpeg_bytes, recovery_point
from ccied.peer.argtypes import non_negative_int, positive_int
from ccied.pruning import load_model
from ccied.pruning.bundle import Bundle, Variant, load_bundle
from ccied.pruning.codec import CodecConfig
from ccied.pruning.errors import ModelError
from ccied.pruning.models import StagedModel
from ccied.pruning.recover import (
    METHOD,
    Measurement,
    RecoveryConfig,
    distillation_set,
    measure,
    recover,
    recovery_frames,
    write_recovered_bundle,
)
from ccied.pruning.transfer import TransferProjection, fit_projection_from_activations

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("blocks.11", "blocks.14")
DEFAULT_CHANNELS = (64, 96)
DEFAULT_BITS = (2,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the recovery benchmark."""
    parser.add_argument("--quick", action="store_true", help="one split, fewer steps")
    parser.add_argument("--splits", nargs="+", default=None)
    parser.add_argument("--channels", nargs="+", type=positive_int, default=None)
    parser.add_argument("--bits", nargs="+", type=int, default=None, choices=(8, 6, 4, 2))
    parser.add_argument(
        "--points",
        nargs="+",
        type=recovery_point,
        default=None,
        metavar="KxBITS",
        help="channels x bits pairs instead of --channels x --bits (e.g. 96x2)",
    )
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--augmentations", type=non_negative_int, default=4)
    parser.add_argument("--every", type=positive_int, default=1, help="use every N-th clip frame")
    parser.add_argument(
        "--train-every",
        type=positive_int,
        default=2,
        help="of those, train on every N-th (default 2)",
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="write a bundle with the recovered variants"
    )
    parser.add_argument(
        "--stream",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="send the held-out stream through a cloud and an edge serving this bundle",
    )
    parser.add_argument("--json", type=Path, default=None)


def _row(kind: str, split: str, k: int, bits: int, m: Any, jpeg: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "split": split,
        "channels": k,
        "bits": bits,
        **{key: value for key, value in asdict(m).items() if key != "float32_bytes"},
        "ratio_float32": m.ratio_float32,
        "ratio_jpeg": m.bytes_per_frame / jpeg,
    }


def run(args: argparse.Namespace) -> int:
    """Train and measure every variant (or ``--stream``); print a table, write JSON."""
    if args.stream is not None:
        return _run_stream(args)
    started = time.perf_counter()
    splits = args.splits or (("blocks.11",) if args.quick else DEFAULT_SPLITS)
    channel_list = args.channels or ((96,) if args.quick else DEFAULT_CHANNELS)
    bits_list = args.bits or DEFAULT_BITS
    steps = args.steps or (200 if args.quick else RecoveryConfig().steps)
    model = load_model()
    frames = recovery_frames(every=args.every, train_every=args.train_every)
    size = model.spec.input_size
    jpeg = {
        "clips": float(np.median([_jpeg_bytes(p, size) for p in frames.held_out])),
        "photos": float(np.median([_jpeg_bytes(p, size) for p in frames.held_out_photos])),
    }
    log.info(
        "%d training frames (x%d augmented), %d held-out clip frames, %d held-out photo views",
        len(frames.train),
        args.augmentations + 1,
        len(frames.held_out),
        len(frames.held_out_photos),
    )
    points = [(k, bits) for k in channel_list for bits in bits_list]
    if args.points:
        points = list(args.points)
    rows: list[dict[str, Any]] = []
    recovered: list[tuple[TransferProjection, int, Measurement]] = []
    timings: dict[str, float] = {}
    for split in splits:
        t0 = time.perf_counter()
        train = distillation_set(model, split, frames.train, augmentations=args.augmentations)
        held = {
            "clips": distillation_set(model, split, frames.held_out, augmentations=0),
            "photos": distillation_set(model, split, frames.held_out_photos, augmentations=0),
        }
        timings[f"{split} activations_s"] = time.perf_counter() - t0
        for bits in sorted({b for _, b in points}):
            for name, data in held.items():
                m = measure(model, None, data, CodecConfig(bits=bits))
                rows.append(
                    _row(f"full/{name}", split, data.activations.shape[1], bits, m, jpeg[name])
                )
        for k, bits in points:
            pca = fit_projection_from_activations(
                split, train.activations, k / train.activations.shape[1], "pca"
            )
            config = RecoveryConfig(split=split, channels=k, bits=bits, steps=steps)
            t0 = time.perf_counter()
            result = recover(model, train, config)
            timings[f"{split} k={k} {bits}b train_s"] = time.perf_counter() - t0
            for name, data in held.items():
                m = measure(model, pca, data, config.codec)
                rows.append(_row(f"pca/{name}", split, k, bits, m, jpeg[name]))
                m = measure(model, result.projection, data, config.codec)
                rows.append(_row(f"recovered/{name}", split, k, bits, m, jpeg[name]))
                if name == "clips":
                    recovered.append((result.projection, bits, m))
            log.info("loss %.4f -> %.4f", result.losses[0], np.mean(result.losses[-20:]))
    result_json = {
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "frames": {
            "train": len(frames.train),
            "augmentations": args.augmentations,
            "held_out_clips": len(frames.held_out),
            "held_out_photos": len(frames.held_out_photos),
        },
        "steps": steps,
        "jpeg_q90_bytes": jpeg,
        "timings_s": timings,
        "total_s": time.perf_counter() - started,
        "variants": rows,
    }
    if args.bundle:
        result_json["bundle_id"] = write_recovered_bundle(args.bundle, model, recovered)
    _print_table(result_json)
    if args.json:
        args.json.write_text(json.dumps(result_json, indent=2))
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"JPEG q90 of the 224x224 frame (median): {result['jpeg_q90_bytes']}")
    print(
        f"{'kind':>17} {'split':>10} {'k':>4} {'bits':>4} {'bytes':>7} {'xfp32':>6}"
        f" {'/jpeg':>6} {'decisive':>8} {'all':>6} {'n_dec/n':>9}"
    )
    for v in result["variants"]:
        print(
            f"{v['kind']:>17} {v['split']:>10} {v['channels']:>4} {v['bits']:>4}"
            f" {v['bytes_per_frame']:>7.0f} {v['ratio_float32']:>6.1f} {v['ratio_jpeg']:>6.2f}"
            f" {v['agreement_decisive']:>8.3f} {v['agreement_all']:>6.3f}"
            f" {v['decisive_frames']:>4}/{v['frames']:<4}"
        )
    print("timings:", json.dumps({k: round(v, 1) for k, v in result["timings_s"].items()}))
    print(f"total: {result['total_s']:.0f} s")
    if "bundle_id" in result:
        print("bundle:", result["bundle_id"])


def _run_stream(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.stream)
    variant = _recovered_variant(bundle)
    frames = recovery_frames(every=args.every)
    pixels = frames.held_out_photos + frames.held_out
    result = stream(args.stream, bundle.model, variant.name, pixels)
    size = bundle.model.spec.input_size
    jpeg = float(np.median([_jpeg_bytes(p, size) for p in pixels]))
    float32_bytes = bundle.model.split_point(variant.split).float32_bytes
    median = result["bytes_sent_median"]
    result |= {
        "bundle": str(args.stream),
        "bundle_id": bundle.bundle_id,
        "float32_bytes": float32_bytes,
        "jpeg_q90_bytes": jpeg,
        "ratio_float32": float32_bytes / median if median else None,
        "ratio_jpeg": median / jpeg if median else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["answered_by_cloud"] == result["frames"] else 1


def _recovered_variant(bundle: Bundle) -> Variant:
    """The bundle's recovered variant (ModelError, one line, if it has none or was
    prepared on other frames than the bundled clips, whose held-out part streams)."""
    names = [n for n, p in bundle.projections.items() if p.method == METHOD]
    if not names:
        raise ModelError(
            f"{bundle.path}: no recovered variant; make one with `ccied prepare --recover`"
        )
    source = (bundle.figures.get("frames") or {}).get("source")
    if bundle.model.origin is not None or source != "bundled clips":
        raise ModelError(
            f"{bundle.path}: --stream sends the bundled clips' held-out frames, for a bundle "
            f"of the registered model prepared on them (this one: {bundle.model.spec.name}, "
            f"frames from {source})"
        )
    return bundle.variant(names[0])


def stream(
    bundle: Path, model: StagedModel, variant: str, frames: list[np.ndarray]
) -> dict[str, Any]:
    """Frames through an edge that sends ``variant`` to a cloud, both serving ``bundle``:
    bytes per miss and top-1 agreement with the unpruned model here (decisive and all)."""
    import tempfile

    from ccied.bench.cluster import PeerProcess, free_tcp_port, running
    from ccied.peer.client import Client
    from ccied.pruning.defaults import DECISIVE_PROBABILITY
    from ccied.pruning.media import preprocess

    with torch.inference_mode():
        reference = [
            torch.softmax(model.full()(preprocess(p, model.spec)), 1)[0].max(0) for p in frames
        ]
    with tempfile.TemporaryDirectory(prefix="ccied-recovery-") as folder:
        work = Path(folder)
        work.chmod(0o700)
        address = f"tcp://127.0.0.1:{free_tcp_port()}"
        common = ["--model", str(bundle), "--no-cache"]
        cloud = PeerProcess("rcloud", "cloud", address, work / "c.sock", extra_args=common)
        edge = PeerProcess(
            "rcam",
            "edge",
            "none",
            work / "e.sock",
            extra_args=[*common, "--cloud", address, "--variant", variant, "--always-offload"],
        )
        with running([cloud, edge]), Client(edge.socket_path) as client:
            results = [client.submit(p, f"held-{i}") for i, p in enumerate(frames)]
    pairs = zip(results, reference, strict=True)
    agree = np.array([r.label == int(ref.indices) for r, ref in pairs])
    decisive = np.array([float(ref.values) >= DECISIVE_PROBABILITY for ref in reference])
    sent = [r.bytes_sent for r in results if r.source == "cloud"]
    return {
        "variant": variant,
        "frames": len(frames),
        "decisive_frames": int(decisive.sum()),
        "answered_by_cloud": len(sent),
        "bytes_sent_median": float(np.median(sent)) if sent else 0.0,
        "agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
        "agreement_all": float(agree.mean()),
        "latency_ms_median": float(np.median([r.latency_ms for r in results])),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(2)
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
