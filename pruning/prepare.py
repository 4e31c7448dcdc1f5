"""``ccied prepare``: build a model bundle from real frames, and measure what it promises.

1. Frames: every ``every``-th frame of the bundled clips; the first
   ``fit_fraction`` of each clip fits the reductions and calibrates the cache,
   the rest (later in time, so neighbouring near-duplicates do not leak) is held
   out to measure.
2. Variants: the requested operating point (split, keep ratio, bits) plus the
   built-in alternatives, so the planner can switch as the bandwidth moves. A
   keep ratio under 1 fits a PCA reduction of the transfer layer
   (:mod:`ccied.pruning.transfer`).
3. For each variant, on the held-out frames: codec bytes per frame and top-1
   agreement with the unpruned float32 model, through the real encode/decode.
4. The cache's hit rule at each key depth (the input thumbnail, then the
   cache split), calibrated on the fit frames in stream order and checked on
   the held-out ones (:mod:`ccied.cache` is not imported here: pruning is a
   leaf; the caller passes the key and calibration functions).
5. The bundle folder, with the figures in its manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.pruning.bundle import (
    BUILTIN_VARIANTS,
    THUMBNAIL_KEY,
    THUMBNAIL_SIDE,
    Variant,
    write_bundle,
)
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.defaults import DEFAULT_CACHE_SPLIT, DEFAULT_MODEL
from ccied.pruning.media import (
    bundled_clips,
    center_crop,
    decode_image,
    encode_jpeg,
    encode_lossless,
    iter_frames,
    normalize,
    thumbnail,
)
from ccied.pruning.models import StagedModel, load_model
from ccied.pruning.transfer import (
    TransferProjection,
    fit_projection_from_activations,
    projection_convs,
)
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

log = logging.getLogger(__name__)

DEFAULT_EVERY = 3
DEFAULT_FIT_FRACTION = 0.6

Frames = tuple[np.ndarray, np.ndarray, np.ndarray]  # features, labels, confidences
# (key depth, fit frames, held-out frames), in stream order -> {"rule": HitRule fields, ...}
Calibrator = Callable[[str, Frames, Frames], dict[str, Any]]
# The key of one depth: (depth, the frame's thumbnail (media.thumbnail), the tensor
# at the cache split) -> a feature vector, or None when the frame gives none.
KeyFunction = Callable[[str, np.ndarray, np.ndarray], np.ndarray | None]


@dataclass(frozen=True)
class PrepareConfig:
    model: str = DEFAULT_MODEL
    split: str = "blocks.14"
    keep_ratio: float = 1.0
    bits: int | None = 4
    every: int = DEFAULT_EVERY
    fit_fraction: float = DEFAULT_FIT_FRACTION
    cache_split: str = DEFAULT_CACHE_SPLIT


def variant_name(split: str, keep_ratio: float, bits: int | None) -> str:
    keep = "" if keep_ratio >= 1.0 else f"-k{keep_ratio:.2f}"
    return f"{split}{keep}-{'raw' if bits is None else f'b{bits}'}"


@dataclass(frozen=True)
class PrepareReport:
    bundle_id: str
    folder: Path
    variants: list[dict[str, Any]]
    cache_rules: dict[str, dict[str, Any]]  # per key depth: rule, verdict, figures
    frames: dict[str, int]


def prepare_bundle(
    config: PrepareConfig,
    out: Path,
    calibrate_cache: Calibrator,
    key_of: KeyFunction,
    progress: bool = True,
) -> PrepareReport:
    """Build, measure and write a bundle; returns its id and figures."""
    model = load_model(config.model)
    chosen = Variant(
        variant_name(config.split, config.keep_ratio, config.bits),
        config.split,
        config.keep_ratio,
        config.bits,
    )
    variants = [chosen, *(v for v in BUILTIN_VARIANTS if v.name != chosen.name)]
    split_index = {v.split: model.split_point(v.split).index for v in variants if not v.is_image}
    cache_index = model.split_point(config.cache_split).index

    frames: list[np.ndarray] = []
    fit: list[bool] = []
    for clip in bundled_clips():
        clip_frames = [f.pixels for f in iter_frames(clip, every=config.every)]
        cut = int(len(clip_frames) * config.fit_fraction)
        frames += clip_frames
        fit += [i < cut for i in range(len(clip_frames))]
    fit_mask = np.array(fit)

    wanted = {*split_index.values(), cache_index}
    tensors: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    labels, confidences = [], []
    thumbnails = []
    with torch.inference_mode():
        for pixels in tqdm(frames, desc="full model on frames", disable=not progress):
            thumbnails.append(thumbnail(pixels, model.spec.input_size, THUMBNAIL_SIDE))
            x = normalize(center_crop(pixels, model.spec.input_size), model.spec)
            for index, stage in enumerate(model.stages):
                x = stage(x)
                if index in wanted:
                    tensors[index].append(x)
            probs = torch.softmax(x, dim=1)[0]
            labels.append(int(probs.argmax()))
            confidences.append(float(probs.max()))
    label_array = np.array(labels)

    projections: dict[str, TransferProjection] = {}
    measured: list[Variant] = []
    rows = []
    held = np.flatnonzero(~fit_mask)
    for variant in tqdm(variants, desc="variants", disable=not progress):
        if variant.is_image:
            agreement, bytes_median = _measure_image(
                model, [frames[i] for i in held], label_array[held], variant.jpeg_quality
            )
            measured.append(replace(variant, agreement=agreement, bytes_per_frame=bytes_median))
            rows.append(
                {
                    "name": variant.name,
                    "split": variant.split,
                    "keep_ratio": 1.0,
                    "bits": None,
                    "jpeg_quality": variant.jpeg_quality,
                    "lossless": variant.lossless,
                    "agreement": round(agreement, 4),
                    "bytes_per_frame": bytes_median,
                    "fp32_bytes": 3 * model.spec.input_size**2 * 4,
                    "ratio_to_fp32": round(3 * model.spec.input_size**2 * 4 / bytes_median, 2),
                }
            )
            continue
        index = split_index[variant.split]
        stacked = torch.cat(tensors[index])
        encode = decode = None
        if variant.keep_ratio < 1.0:
            projection = fit_projection_from_activations(
                variant.split, stacked[torch.from_numpy(fit_mask)], variant.keep_ratio
            )
            projections[variant.name] = projection
            encode, decode = projection_convs(projection)
        codec = None if variant.bits is None else TensorCodec(CodecConfig(bits=variant.bits))
        agree, sizes = 0, []
        with torch.inference_mode():
            for i in held:
                x = stacked[i : i + 1]
                wire = x if encode is None else encode(x)
                if codec is None:
                    sizes.append(wire.numel() * 4)
                    received = wire
                else:
                    payload = codec.encode(wire.numpy())
                    sizes.append(len(payload))
                    received = torch.from_numpy(codec.decode(payload))
                if decode is not None:
                    received = decode(received)
                tail = model.stages[index + 1 :]
                y = tail(received)
                agree += int(int(y.argmax()) == label_array[i])
        agreement = agree / max(1, len(held))
        bytes_median = float(np.median(sizes))
        measured.append(replace(variant, agreement=agreement, bytes_per_frame=bytes_median))
        point = model.split_point(variant.split)
        rows.append(
            {
                "name": variant.name,
                "split": variant.split,
                "keep_ratio": variant.keep_ratio,
                "bits": variant.bits,
                "agreement": round(agreement, 4),
                "bytes_per_frame": bytes_median,
                "fp32_bytes": point.float32_bytes,
                "ratio_to_fp32": round(point.float32_bytes / bytes_median, 2),
            }
        )

    confidence_array = np.array(confidences)
    calibration: dict[str, dict[str, Any]] = {}
    for depth in (THUMBNAIL_KEY, config.cache_split):
        keys = [
            key_of(depth, small, tensor.numpy())
            for small, tensor in zip(thumbnails, tensors[cache_index], strict=True)
        ]
        usable = np.array([key is not None for key in keys])
        features = np.stack([k for k in keys if k is not None])
        fit_rows, held_rows = fit_mask[usable], ~fit_mask[usable]
        calibration[depth] = calibrate_cache(
            depth,
            (features[fit_rows], label_array[usable][fit_rows], confidence_array[usable][fit_rows]),
            (
                features[held_rows],
                label_array[usable][held_rows],
                confidence_array[usable][held_rows],
            ),
        )
    frames_info = {"fit": int(fit_mask.sum()), "held_out": len(held), "every": config.every}
    bundle_id = write_bundle(
        out,
        model,
        tuple(measured),
        chosen.name,
        projections,
        cache_split=config.cache_split,
        cache_rules={depth: figures["rule"] for depth, figures in calibration.items()},
        figures={"frames": frames_info, "variants": rows, "cache": calibration},
    )
    return PrepareReport(bundle_id, out, rows, calibration, frames_info)


def _measure_image(
    model: StagedModel, frames: list[np.ndarray], labels: np.ndarray, quality: int | None
) -> tuple[float, float]:
    """Agreement and median bytes when the input crop crosses as a JPEG of ``quality``
    (None: as a lossless WebP)."""
    size = model.spec.input_size
    agree, sizes = 0, []
    with torch.inference_mode():
        for pixels, label in zip(frames, labels, strict=True):
            crop = center_crop(pixels, size)
            if quality is None:
                image, image_format = encode_lossless(crop), "WEBP"
            else:
                image, image_format = encode_jpeg(crop, quality), "JPEG"
            sizes.append(len(image))
            x = normalize(decode_image(image, size, image_format), model.spec)
            agree += int(int(model.full()(x).argmax()) == label)
    return agree / max(1, len(frames)), float(np.median(sizes))


def print_report(report: PrepareReport, write: Callable[[str], Any] = print) -> None:
    write(f"bundle {report.bundle_id} written to {report.folder}")
    write(f"frames: {report.frames}")
    write(f"{'variant':<22} {'bytes':>8} {'x fp32':>7} {'agreement':>9}")
    for row in report.variants:
        write(
            f"{row['name']:<22} {row['bytes_per_frame']:>8.0f} {row['ratio_to_fp32']:>7.1f} "
            f"{row['agreement']:>9.3f}"
        )
    for depth, figures in report.cache_rules.items():
        write(
            f"cache rule at {depth}: {figures['rule']} ({figures['verdict']}); "
            f"held-out frames: {figures['held_out']}"
        )
