"""`ccied bench transfer`: bytes on the wire versus agreement, per split, keep ratio and codec.

For each split x keep ratio x bits x quantizer it reports the codec payload per
frame, its ratio to the float32 tensor at that split and to a JPEG (quality 90)
of the 224x224 input frame, top-1 agreement with the unpruned float32 model on
held-out frames (per clip and together) and head/tail/encode/decode times
(medians). The projections are fitted on the first 60% of each bundled clip
(with augmentation) and evaluated on the last 40%: disjoint, and later in time,
so near-duplicate neighbouring frames do not leak.

Recovered layers (``method: recovered``): at blocks.11, for each K x BITS point,
K channels trained by distillation from the unpruned model's logits
(:mod:`ccied.pruning.recover`) on the same fit frames with strongly augmented
copies, measured on the same held-out frames through the real codec, beside the
untrained PCA layer at the same K and BITS. The 96 x 2 layer is the recovered
point, checked against the issue's targets (>= 24x fewer bytes than float32, <=
half the JPEG, agreement >= 0.99 on decisive frames and >= 0.95 on all).

Also trains a small CNN on Fashion-MNIST and reports test accuracy before and
after pruning its transfer layer (with the codec in the loop), fine-tuned on
labels and recovered by distillation without them (skipped, with a note, when the
data set is not installed).

Run: ``python -m ccied.bench.transfer [--quick] [--json PATH] [--plot PATH]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.peer.argtypes import fraction, positive_int
from ccied.pruning import bundled_clips, iter_frames, load_model, preprocess
from ccied.pruning.codec import SUPPORTED_BITS, CodecConfig, TensorCodec
from ccied.pruning.defaults import DECISIVE_PROBABILITY
from ccied.pruning.errors import MediaError
from ccied.pruning.media import CENTER_CROP_FRACTION
from ccied.pruning.models import StagedModel
from ccied.pruning.recover import (
    DEFAULT_AUGMENTATIONS,
    DistillationSet,
    RecoveryConfig,
    distillation_set,
    measure,
    recover,
)
from ccied.pruning.transfer import (
    TransferProjection,
    augment,
    fit_projection_from_activations,
    reduced_split,
)
from PIL import Image
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

log = logging.getLogger(__name__)

# The operating point: the default variant of the built-in bundle (blocks.11 at
# 6 bits, every channel kept: the only setting measured at agreement >= 0.98 on
# every run; see ccied.pruning.bundle).
DEFAULT_SPLIT = "blocks.11"
DEFAULT_KEEP_RATIO = 1.0
DEFAULT_BITS = 6
DEFAULT_QUANTIZER = "minmax"
DEFAULT_SPLITS = ("blocks.5", "blocks.7", "blocks.11", "blocks.14")
DEFAULT_KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_BITS_LIST = (8, 6, 4, 2)
FIT_FRACTION = 0.6
AUGMENTATIONS = 1
# Quantizers: per-channel min-max, and one shared step with clipping at 4 sigma.
QUANTIZERS: dict[str, dict[str, Any]] = {
    "minmax": {"clip_sigma": 0.0, "shared_scale": False},
    "shared": {"clip_sigma": 4.0, "shared_scale": True},
}
# Recovered layers: blocks.11, where `python -m ccied.bench.recovery` measured 96
# channels at 2 bits (1,440 B, 26x fewer than float32) keeping every decisive answer
# and 64 x 2 one miss of 41 (README, "Recovered transfer layer"); 96 x 4 shows what
# two more bits buy at the same channels.
RECOVERY_SPLIT = "blocks.11"
RECOVERY_POINTS = ((64, 2), (96, 2), (96, 4))
QUICK_RECOVERY_POINTS = ((96, 2),)
RECOVERED_POINT = (96, 2)  # the one checked against the targets
# 300 steps (recover's default) took 199-222 s per point on the 2-core box; 150 keep
# --quick under about 8 minutes there.
QUICK_RECOVERY_STEPS = 150
# The targets for the recovered point: (comparison, threshold).
TARGETS: dict[str, tuple[str, float]] = {
    "ratio_fp32": (">=", 24.0),
    "ratio_jpeg": ("<=", 0.5),
    "agreement_decisive": (">=", 0.99),
    "agreement_all": (">=", 0.95),
}


def recovery_point(text: str) -> tuple[int, int]:
    """``KxBITS`` (e.g. ``96x2``): K channels cross at BITS bits."""
    channels, separator, bits = text.lower().partition("x")
    try:
        k, b = int(channels), int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxBITS such as 96x2, got {text!r}") from None
    if not separator:
        raise argparse.ArgumentTypeError(f"expected KxBITS such as 96x2, got {text!r}")
    if k < 1:
        raise argparse.ArgumentTypeError(f"channels must be >= 1, got {k} in {text!r}")
    if b not in SUPPORTED_BITS:
        allowed = ", ".join(str(x) for x in SUPPORTED_BITS)
        raise argparse.ArgumentTypeError(f"bits must be one of {allowed}, got {b} in {text!r}")
    return k, b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ccied bench transfer`."""
    parser.add_argument("--quick", action="store_true", help="fewer frames and variants (<8 min)")
    parser.add_argument(
        "--every", type=positive_int, default=None, help="use every N-th clip frame"
    )
    parser.add_argument("--splits", nargs="+", default=None, help="split points to measure")
    parser.add_argument("--keep-ratios", nargs="+", type=fraction, default=None)
    parser.add_argument("--bits", nargs="+", type=int, default=None, choices=(8, 6, 4, 2))
    parser.add_argument("--no-fashion", action="store_true", help="skip the Fashion-MNIST run")
    parser.add_argument(
        "--no-recovery", action="store_true", help="skip the recovered (distilled) layers"
    )
    parser.add_argument(
        "--recovery-points",
        nargs="+",
        type=recovery_point,
        default=None,
        metavar="KxBITS",
        help=f"recovered layers at {RECOVERY_SPLIT} (default 64x2 96x2 96x4; --quick 96x2)",
    )
    parser.add_argument(
        "--recovery-steps",
        type=positive_int,
        default=None,
        help=f"training steps per recovered layer (default {RecoveryConfig().steps}; "
        f"--quick {QUICK_RECOVERY_STEPS})",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of bytes vs agreement")


def _jpeg_bytes(pixels: np.ndarray, size: int) -> int:
    """JPEG quality 90 of the frame resized and centre-cropped as the model sees it."""
    image = Image.fromarray(pixels)
    short = round(size / CENTER_CROP_FRACTION)
    scale = short / min(image.size)
    image = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    buffer = io.BytesIO()
    image.crop((left, top, left + size, top + size)).save(buffer, format="JPEG", quality=90)
    return len(buffer.getvalue())


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class _Settings:
    quick: bool
    every: int
    splits: tuple[str, ...]
    keep_ratios: tuple[float, ...]
    bits: tuple[int, ...]
    recovery_points: tuple[tuple[int, int], ...]  # empty: no recovery
    recovery_steps: int


@dataclass(frozen=True)
class _Data:
    """The frames, which of them fit, head outputs per split and the unpruned answers."""

    names: list[str]
    pixels: list[np.ndarray]
    clip_of: np.ndarray  # clip index per frame
    fit: np.ndarray  # bool per frame; the rest is held out
    inputs: torch.Tensor
    jpeg_median: float
    fit_acts: dict[str, torch.Tensor]
    eval_acts: dict[str, torch.Tensor]
    logits: torch.Tensor  # unpruned float32 model on the held-out frames
    reference: np.ndarray  # its top-1
    decisive: np.ndarray  # its top-1 probability >= DECISIVE_PROBABILITY

    @property
    def held_clip(self) -> np.ndarray:
        return np.asarray(self.clip_of[~self.fit])


def _settings(args: argparse.Namespace) -> _Settings:
    quick = bool(args.quick)
    points: tuple[tuple[int, int], ...] = ()
    if not getattr(args, "no_recovery", False):
        points = tuple(
            args.recovery_points or (QUICK_RECOVERY_POINTS if quick else RECOVERY_POINTS)
        )
    return _Settings(
        quick=quick,
        every=args.every or (3 if quick else 1),
        splits=tuple(args.splits or (("blocks.11", "blocks.14") if quick else DEFAULT_SPLITS)),
        keep_ratios=tuple(args.keep_ratios or ((1.0, 0.5) if quick else DEFAULT_KEEP_RATIOS)),
        bits=tuple(args.bits or ((6, 4) if quick else DEFAULT_BITS_LIST)),
        recovery_points=points,
        recovery_steps=args.recovery_steps
        or (QUICK_RECOVERY_STEPS if quick else RecoveryConfig().steps),
    )


def _load_data(model: StagedModel, settings: _Settings) -> _Data:
    """Decode the clips, split fit / held out per clip, run the model once over them."""
    names = [clip.stem for clip in bundled_clips()]
    frames: list[tuple[str, np.ndarray]] = []
    for clip, name in zip(bundled_clips(), names, strict=True):
        frames += [(name, f.pixels) for f in iter_frames(clip, every=settings.every)]
    clip_of = np.array([names.index(name) for name, _ in frames])
    fit = np.zeros(len(frames), dtype=bool)
    for index in range(len(names)):
        members = np.flatnonzero(clip_of == index)
        fit[members[: int(FIT_FRACTION * len(members))]] = True
    log.info("%d frames: %d to fit, %d held out", len(frames), fit.sum(), (~fit).sum())
    size = model.spec.input_size
    jpeg = [_jpeg_bytes(frames[i][1], size) for i in np.flatnonzero(~fit)]
    inputs = torch.cat([preprocess(pixels, model.spec) for _, pixels in frames])
    splits = set(settings.splits) | ({RECOVERY_SPLIT} if settings.recovery_points else set())
    fit_acts, eval_acts, logits = _activations(model, inputs, fit, splits)
    top = torch.softmax(logits, 1).max(1)
    return _Data(
        names=names,
        pixels=[pixels for _, pixels in frames],
        clip_of=clip_of,
        fit=fit,
        inputs=inputs,
        jpeg_median=float(np.median(jpeg)),
        fit_acts=fit_acts,
        eval_acts=eval_acts,
        logits=logits,
        reference=top.indices.numpy(),
        # Decisive frames: the unpruned model's top-1 probability is at least 0.5.
        decisive=top.values.numpy() >= DECISIVE_PROBABILITY,
    )


def _activations(
    model: StagedModel, inputs: torch.Tensor, fit: np.ndarray, splits: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Head outputs at each split: fit frames (plus augmented copies) and held-out
    frames; and the unpruned model's logits on the held-out frames."""
    indices = {model.split_point(s).index: s for s in splits}
    fit_acts: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
    eval_acts: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
    logits: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(0)
    batches = [(False, 0), *[(True, c) for c in range(AUGMENTATIONS + 1)]]
    progress = tqdm(total=len(batches), desc="transfer", unit="step", file=sys.stderr)
    with torch.inference_mode():
        for is_fit, copy in batches:
            chosen = inputs[torch.from_numpy(fit if is_fit else ~fit)]
            for start in range(0, len(chosen), 32):
                x = chosen[start : start + 32]
                if copy:
                    x = augment(x, generator)
                for index, stage in enumerate(model.stages):
                    x = stage(x)
                    if index in indices:
                        (fit_acts if is_fit else eval_acts)[indices[index]].append(x)
                if not is_fit:
                    logits.append(x)
            progress.update()
    progress.close()
    return (
        {s: torch.cat(a) for s, a in fit_acts.items()},
        {s: torch.cat(a) for s, a in eval_acts.items()},
        torch.cat(logits),
    )


def _variant_rows(
    model: StagedModel,
    data: _Data,
    projection: TransferProjection,
    keep: float,
    bits_list: tuple[int, ...],
    quantizers: dict[str, dict[str, Any]],
    quick: bool,
) -> list[dict[str, Any]]:
    """One fitted projection through the real codec at each bits x quantizer."""
    head, tail = reduced_split(model, projection)
    point = model.split_point(projection.split)
    with torch.inference_mode():
        z = head[-1](data.eval_acts[projection.split]).numpy()
        sample = data.inputs[:1]
        head_ms = _median_ms(lambda: head(sample), 3 if quick else 7)
        z1 = head(sample)
        tail_ms = _median_ms(lambda: tail(z1), 3 if quick else 7)
    rows = []
    for bits in bits_list:
        for quantizer, options in quantizers.items():
            codec = TensorCodec(CodecConfig(bits=bits, **options))
            payloads = [codec.encode(row[None]) for row in z]
            decoded = torch.from_numpy(np.concatenate([codec.decode(p) for p in payloads]))
            with torch.inference_mode():
                agree = (tail(decoded).argmax(1).numpy() == data.reference).astype(float)
            size = float(np.median([len(p) for p in payloads]))
            decisive = data.decisive
            rows.append(
                {
                    "split": projection.split,
                    "keep_ratio": keep,
                    "method": projection.method,
                    "channels": projection.kept,
                    "bits": bits,
                    "quantizer": quantizer,
                    "bytes_per_frame": size,
                    "fp32_bytes": point.float32_bytes,
                    "ratio_fp32": point.float32_bytes / size,
                    "ratio_jpeg": size / data.jpeg_median,
                    "agreement": float(agree.mean()),
                    "agreement_all": float(agree.mean()),
                    "agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
                    "decisive_frames": int(decisive.sum()),
                    "agreement_per_clip": {
                        name: float(agree[data.held_clip == i].mean())
                        for i, name in enumerate(data.names)
                    },
                    "explained_variance": projection.explained_variance,
                    "head_ms": head_ms,
                    "tail_ms": tail_ms,
                    "encode_ms": _median_ms(lambda c=codec: c.encode(z[:1]), 50),
                    "decode_ms": _median_ms(lambda c=codec, p=payloads[0]: c.decode(p), 50),
                }
            )
    return rows


def _table_rows(model: StagedModel, data: _Data, settings: _Settings) -> list[dict[str, Any]]:
    """Every split x keep ratio x method (PCA, and channel selection in the full run)."""
    plan = [(s, k, "pca") for s in settings.splits for k in settings.keep_ratios]
    if not settings.quick:
        plan += [("blocks.11", k, "channels") for k in settings.keep_ratios if k < 1.0]
    rows: list[dict[str, Any]] = []
    for split, keep, method in tqdm(plan, desc="variants", file=sys.stderr):
        projection = fit_projection_from_activations(split, data.fit_acts[split], keep, method)
        rows += _variant_rows(
            model, data, projection, keep, settings.bits, QUANTIZERS, settings.quick
        )
    return rows


def _held_out_set(data: _Data, split: str, mask: np.ndarray | None = None) -> DistillationSet:
    """The held-out frames (or those of ``mask``) as recover.measure takes them."""
    activations, logits = data.eval_acts[split], data.logits
    if mask is not None:
        chosen = torch.from_numpy(mask)
        activations, logits = activations[chosen], logits[chosen]
    return DistillationSet(split, activations, logits)


def _recovered_row(
    model: StagedModel, data: _Data, projection: TransferProjection, bits: int
) -> dict[str, Any]:
    """A recovered layer on the held-out frames, through the real codec (recover.measure)."""
    codec = CodecConfig(bits=bits)
    m = measure(model, projection, _held_out_set(data, projection.split), codec)
    per_clip = {
        name: measure(
            model, projection, _held_out_set(data, projection.split, data.held_clip == i), codec
        ).agreement_all
        for i, name in enumerate(data.names)
    }
    return {
        "split": projection.split,
        "keep_ratio": projection.kept / projection.channels,
        "method": "recovered",
        "channels": projection.kept,
        "bits": bits,
        "quantizer": DEFAULT_QUANTIZER,
        "bytes_per_frame": m.bytes_per_frame,
        "fp32_bytes": m.float32_bytes,
        "ratio_fp32": m.ratio_float32,
        "ratio_jpeg": m.bytes_per_frame / data.jpeg_median,
        "agreement": m.agreement_all,
        "agreement_all": m.agreement_all,
        "agreement_decisive": m.agreement_decisive,
        "decisive_frames": m.decisive_frames,
        "frames": m.frames,
        "agreement_per_clip": per_clip,
        "kl_divergence": m.kl_divergence,
        "explained_variance": projection.explained_variance,
    }


def _recovery_rows(
    model: StagedModel, data: _Data, settings: _Settings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train each recovered layer on the fit frames' distillation set; measure it."""
    started = time.perf_counter()
    fit_frames = [data.pixels[i] for i in np.flatnonzero(data.fit)]
    train = distillation_set(model, RECOVERY_SPLIT, fit_frames, augmentations=DEFAULT_AUGMENTATIONS)
    info: dict[str, Any] = {
        "split": RECOVERY_SPLIT,
        "train_frames": len(fit_frames),
        "augmentations": DEFAULT_AUGMENTATIONS,
        "steps": settings.recovery_steps,
        "activations_s": time.perf_counter() - started,
    }
    rows = []
    for k, bits in settings.recovery_points:
        config = RecoveryConfig(
            split=RECOVERY_SPLIT, channels=k, bits=bits, steps=settings.recovery_steps
        )
        started = time.perf_counter()
        result = recover(model, train, config)
        train_s = time.perf_counter() - started
        # The PCA the training starts from (fit on the same augmented frames; the
        # table's PCA rows fit on lighter augmentation): what the training itself adds.
        start = fit_projection_from_activations(
            RECOVERY_SPLIT, train.activations, k / train.activations.shape[1], "pca"
        )
        untrained = measure(model, start, _held_out_set(data, RECOVERY_SPLIT), config.codec)
        rows.append(
            _recovered_row(model, data, result.projection, bits)
            | {
                "train_s": train_s,
                "steps": config.steps,
                "loss_first": result.losses[0],
                "loss_last": float(np.mean(result.losses[-20:])),
                "start_agreement_all": untrained.agreement_all,
                "start_agreement_decisive": untrained.agreement_decisive,
            }
        )
    return rows, info


def _matching_pca_rows(
    model: StagedModel, data: _Data, settings: _Settings, variants: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The untrained PCA layer at each recovery point the table does not already hold."""
    have = {
        (v["split"], v["channels"], v["bits"])
        for v in variants
        if v["method"] == "pca" and v["quantizer"] == DEFAULT_QUANTIZER
    }
    acts = data.fit_acts[RECOVERY_SPLIT]
    rows = []
    for k, bits in settings.recovery_points:
        if (RECOVERY_SPLIT, k, bits) in have:
            continue
        keep = k / acts.shape[1]
        projection = fit_projection_from_activations(RECOVERY_SPLIT, acts, keep, "pca")
        minmax = {DEFAULT_QUANTIZER: QUANTIZERS[DEFAULT_QUANTIZER]}
        rows += _variant_rows(model, data, projection, keep, (bits,), minmax, settings.quick)
        have.add((RECOVERY_SPLIT, k, bits))
    return rows


def _targets(point: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of the issue's targets with the recovered point's value, met or not."""
    out = {}
    for key, (comparison, threshold) in TARGETS.items():
        value = float(point[key])
        met = value >= threshold if comparison == ">=" else value <= threshold
        out[key] = {"target": f"{comparison} {threshold:g}", "value": value, "met": met}
    return out


def _operating_point(variants: list[dict[str, Any]], jpeg: float) -> dict[str, Any] | None:
    wanted = (DEFAULT_SPLIT, DEFAULT_KEEP_RATIO, DEFAULT_BITS, DEFAULT_QUANTIZER, "pca")
    for v in variants:
        if (v["split"], v["keep_ratio"], v["bits"], v["quantizer"], v["method"]) == wanted:
            keys = ("split", "keep_ratio", "bits", "quantizer", "bytes_per_frame", "fp32_bytes")
            return {key: v[key] for key in keys} | {
                "jpeg_q90_bytes": jpeg,
                "agreement": v["agreement"],
                "agreement_all": v["agreement_all"],
                "agreement_decisive": v["agreement_decisive"],
                "agreement_per_clip": v["agreement_per_clip"],
            }
    return None


def _recovered_point(variants: list[dict[str, Any]], jpeg: float) -> dict[str, Any] | None:
    k, bits = RECOVERED_POINT
    for v in variants:
        if (v["method"], v["split"], v["channels"], v["bits"]) == (
            "recovered",
            RECOVERY_SPLIT,
            k,
            bits,
        ):
            keys = (
                "split",
                "channels",
                "keep_ratio",
                "bits",
                "bytes_per_frame",
                "fp32_bytes",
                "ratio_fp32",
                "ratio_jpeg",
                "agreement_decisive",
                "agreement_all",
                "decisive_frames",
                "frames",
                "train_s",
            )
            return {key: v[key] for key in keys} | {"jpeg_q90_bytes": jpeg}
    return None


def _fashion(quick: bool) -> dict[str, Any] | None:
    """The Fashion-MNIST experiment; None, with a one-line note on stderr, without the data."""
    from ccied.pruning.fashion import FashionConfig, fashion_experiment, load_fashion_mnist

    try:
        data = load_fashion_mnist()
    except MediaError as exc:
        print(f"bench transfer: Fashion-MNIST skipped: {exc}", file=sys.stderr)
        return None
    config = (
        FashionConfig(epochs=1, finetune_epochs=1, train_limit=12_000) if quick else FashionConfig()
    )
    result = asdict(fashion_experiment(data, config))
    result["config"] = asdict(config)
    return result


def run(args: argparse.Namespace) -> int:
    """Measure every variant, print a table, write JSON and a plot; 0 on success, 2 on a
    recovery point the split cannot hold."""
    started = time.perf_counter()
    torch.manual_seed(0)
    settings = _settings(args)
    model = load_model()
    channels = model.split_point(RECOVERY_SPLIT).output_shape[0]
    too_many = [f"{k}x{b}" for k, b in settings.recovery_points if k > channels]
    if too_many:
        print(
            f"bench transfer: --recovery-points {' '.join(too_many)}: {RECOVERY_SPLIT} has "
            f"{channels} channels",
            file=sys.stderr,
        )
        return 2
    data = _load_data(model, settings)
    variants = _table_rows(model, data, settings)
    result: dict[str, Any] = {
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "frames": {
            "fit": int(data.fit.sum()),
            "held_out": int((~data.fit).sum()),
            "every": settings.every,
        },
        "jpeg_q90_bytes": data.jpeg_median,
        "operating_point": _operating_point(variants, data.jpeg_median),
        "recovered_point": None,
        "targets": None,
        "variants": variants,
    }
    if settings.recovery_points:
        variants += _matching_pca_rows(model, data, settings, variants)
        recovered, result["recovery"] = _recovery_rows(model, data, settings)
        variants += recovered
        result["recovered_point"] = _recovered_point(variants, data.jpeg_median)
        if result["recovered_point"] is not None:
            result["targets"] = _targets(result["recovered_point"])
    if not args.no_fashion:
        fashion = _fashion(settings.quick)
        if fashion is not None:
            result["fashion_mnist"] = fashion
    result["total_s"] = time.perf_counter() - started
    _print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        _plot(result, args.plot)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"JPEG q90 of the 224x224 frame: {result['jpeg_q90_bytes']:.0f} B (median)")
    print(
        f"{'split':>10} {'keep':>5} {'meth':>9} {'k':>4} {'bits':>4} {'quant':>6} {'bytes':>7}"
        f" {'xfp32':>6} {'/jpeg':>6} {'all':>6} {'decis':>6}  per clip   head/tail/enc/dec ms"
        "  (recovered: training time, from the starting PCA's all/decisive)"
    )
    for v in result["variants"]:
        clips = " ".join(f"{a:.3f}" for a in v["agreement_per_clip"].values())
        if "head_ms" in v:
            times = (
                f"{v['head_ms']:.1f}/{v['tail_ms']:.1f}/{v['encode_ms']:.3f}/{v['decode_ms']:.3f}"
            )
        else:
            times = (
                f"trained {v['train_s']:.0f} s from {v['start_agreement_all']:.3f}"
                f"/{v['start_agreement_decisive']:.3f}"
                if "train_s" in v
                else "-"
            )
        print(
            f"{v['split']:>10} {v['keep_ratio']:>5.2f} {v['method']:>9} {v['channels']:>4}"
            f" {v['bits']:>4} {v['quantizer']:>6} {v['bytes_per_frame']:>7.0f}"
            f" {v['ratio_fp32']:>6.1f} {v['ratio_jpeg']:>6.2f} {v['agreement_all']:>6.3f}"
            f" {v['agreement_decisive']:>6.3f}  {clips}  {times}"
        )
    if result.get("operating_point"):
        print("operating point:", json.dumps(result["operating_point"]))
    if result.get("recovered_point"):
        print("recovered point:", json.dumps(result["recovered_point"]))
    for key, target in (result.get("targets") or {}).items():
        verdict = "met" if target["met"] else "MISSED"
        print(f"target {key} {target['target']}: {target['value']:.3f} {verdict}")
    if "fashion_mnist" in result:
        fashion = result["fashion_mnist"]
        print("fashion-mnist:", json.dumps(fashion))
        verdict = "met" if fashion["target_met"] else "MISSED"
        print(
            f"target fashion-mnist recovered <= {fashion['target_points_below']:g} points below"
            f" the unpruned CNN: {fashion['points_below']:.2f} {verdict}"
        )
    if "total_s" in result:
        print(f"total: {result['total_s']:.0f} s")


def _plot(result: dict[str, Any], path: Path) -> None:
    """Bytes per frame (log) against decisive and all-frame agreement, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    figure, panels = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True)
    colours = {split: f"C{i}" for i, split in enumerate(sorted({v["split"] for v in variants}))}
    markers = {"pca": "o", "channels": "s", "recovered": "*"}
    for axes, key, floor in (
        (panels[0], "agreement_decisive", 0.99),
        (panels[1], "agreement_all", 0.95),
    ):
        for (split, method), colour in _groups(variants, colours):
            chosen = [v for v in variants if (v["split"], v["method"]) == (split, method)]
            recovered = method == "recovered"
            axes.scatter(
                [v["bytes_per_frame"] for v in chosen],
                [v[key] for v in chosen],
                color="gold" if recovered else colour,
                marker=markers.get(method, "^"),
                s=160 if recovered else 22,
                edgecolors="black" if recovered else "none",
                label=f"{split} {method}",
                # Under the small markers: a PCA row at the same bytes stays visible.
                zorder=2 if recovered else 3,
            )
        lowest = min([floor, *(v[key] for v in variants)])
        axes.set_ylim(max(0.0, lowest - 0.03), 1.01)
        _bytes_axis(axes)
        _references(axes, result, key, floor)
        decisive = key == "agreement_decisive"
        axes.set_ylabel(
            "top-1 agreement, decisive frames" if decisive else "top-1 agreement, all frames"
        )
        axes.set_title(
            "decisive frames (unpruned top-1 probability >= 0.5)"
            if decisive
            else "all held-out frames"
        )
        axes.grid(True, which="both", alpha=0.25)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=9)
    figure.suptitle(
        "ccied bench transfer: bytes per frame vs agreement with the unpruned float32 model "
        f"({result['frames']['held_out']} held-out frames; stars: recovered by distillation)"
    )
    rows = -(-len(labels) // 6)
    figure.tight_layout(rect=(0.0, 0.04 + 0.035 * rows, 1.0, 1.0))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _groups(
    variants: list[dict[str, Any]], colours: dict[str, Any]
) -> list[tuple[tuple[str, str], Any]]:
    """(split, method) pairs in a stable order, each with its split's colour."""
    pairs = sorted(
        {(v["split"], v["method"]) for v in variants}, key=lambda p: (p[1] == "recovered", p)
    )
    return [(pair, colours[pair[0]]) for pair in pairs]


def _references(axes: Any, result: dict[str, Any], key: str, floor: float) -> None:
    """The target floor, JPEG q90, float32 at blocks.11, operating and recovered points."""
    axes.axhline(floor, color="grey", linestyle=":", linewidth=1)
    axes.annotate(
        f"target {floor}",
        (0.01, floor),
        xycoords=("axes fraction", "data"),
        xytext=(0, 3),
        textcoords="offset points",
        fontsize=8,
        color="grey",
    )
    jpeg = result["jpeg_q90_bytes"]
    _vertical(axes, jpeg, f"JPEG q90 {jpeg:,.0f} B", "tab:red", "--")
    fp32 = next((v["fp32_bytes"] for v in result["variants"] if v["split"] == DEFAULT_SPLIT), None)
    if fp32 is not None:
        _vertical(axes, fp32, f"float32 {DEFAULT_SPLIT} {fp32:,} B", "black", "-.")
    _annotate_points(axes, result, key)


def _vertical(axes: Any, x: float, label: str, color: str, style: str) -> None:
    """A vertical reference line at ``x`` bytes, labelled along it."""
    axes.axvline(x, color=color, linestyle=style, linewidth=1)
    axes.annotate(
        label,
        (x, 0.02),
        xycoords=("data", "axes fraction"),
        rotation=90,
        fontsize=8,
        color=color,
        xytext=(-10, 0),
        textcoords="offset points",
    )


def _annotate_points(axes: Any, result: dict[str, Any], key: str) -> None:
    """The operating and recovered points, labelled at fixed places in the panel (the
    two may share a height), in the half away from their point."""
    low, high = axes.get_ylim()
    for name, point, left in (
        ("operating point", result.get("operating_point"), 0.5),
        ("recovered point", result.get("recovered_point"), 0.03),
    ):
        if point:
            above = (point[key] - low) / (high - low) < 0.5
            channels = point.get("channels", "all")
            label = (
                f"{name}\n{channels} ch, {point['bits']} bits\n"
                f"{point['bytes_per_frame']:,.0f} B, {point[key]:.3f}"
            )
            axes.annotate(
                label,
                (point["bytes_per_frame"], point[key]),
                xytext=(left, 0.7 if above else 0.2),
                textcoords="axes fraction",
                fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.7, "linewidth": 0.5},
                arrowprops={"arrowstyle": "->", "linewidth": 0.8},
            )


def _bytes_axis(axes: Any) -> None:
    """Log scale with plain ticks (500, 1k, 2k, 5k, ...) and no crowded minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axes.set_xscale("log")
    ticks = [m * 10**e for e in range(2, 6) for m in (1, 2, 5)]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x >= 1000 else f"{x:g}")
    )
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("bytes per frame on the wire (codec payload, log scale)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(2)
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
