"""``ccied prepare``: build a model bundle from real frames, and measure what it promises.

0. The model: a registered name, or the user's own (``FILE.py:FACTORY`` or a
   TorchScript file, with its labels and preprocessing; its split points found
   and checked by :mod:`ccied.pruning.staging`).
1. Frames: every ``every``-th frame of the bundled clips, or of the videos in
   the user's ``--frames`` folder, and every image there. The first
   ``fit_fraction`` of each video fits the reductions and calibrates the cache,
   the rest (later in time, so neighbouring near-duplicates do not leak) is held
   out to measure; of the images, three in five (in name order) fit and the
   others are held out.
2. Variants: the requested operating point (split, keep ratio, bits) plus
   alternatives, so the planner can switch as the bandwidth moves: the built-in
   ones for a registered model; for a model from a file, the same split at
   fewer bits and raw, an earlier split, and the input as JPEG and lossless
   WebP. Without a split, a model from a file is cut where its tensor is
   smallest (between 10% and 95% of its compute). A keep ratio under 1 fits a
   PCA reduction of the transfer layer (:mod:`ccied.pruning.transfer`); with
   ``recover``, the operating point's reduction is then trained by distillation
   from the unpruned model on the fit frames and strongly augmented copies of
   them, no labels (:mod:`ccied.pruning.recover`).
3. For each variant, on the held-out frames: codec bytes per frame and top-1
   agreement with the unpruned float32 model, through the real encode/decode,
   on every frame and on the decisive ones (its top-1 probability >= 0.5).
4. The cache's hit rule at each key depth (the input thumbnail, then the
   cache split), calibrated on the fit frames in stream order and checked on
   the held-out ones (:mod:`ccied.cache` is not imported here: pruning is a
   leaf; the caller passes the key and calibration functions).
5. The bundle folder, with the figures in its manifest: written to a temporary
   folder beside ``out``, loaded back as a peer would load it, then renamed, so
   a failure leaves no half-written bundle.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.pruning import recover as recover_module
from ccied.pruning.bundle import (
    BUILTIN_VARIANTS,
    MANIFEST_NAME,
    THUMBNAIL_KEY,
    THUMBNAIL_SIDE,
    Variant,
    load_bundle,
    variant_name,
    write_bundle,
)
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.custom import (
    DEFAULT_INPUT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    REGISTERED,
    Preprocessing,
    model_from_file,
    parse_model_spec,
)
from ccied.pruning.defaults import (
    DECISIVE_PROBABILITY,
    DEFAULT_CACHE_SPLIT,
    DEFAULT_MODEL,
    DEFAULT_SPLIT,
    RECOVER_MAX_AUGMENTATIONS,
)
from ccied.pruning.errors import MediaError, ModelError
from ccied.pruning.media import (
    ImageTooLargeError,
    bundled_clips,
    center_crop,
    check_frame,
    decode_image,
    encode_jpeg,
    encode_lossless,
    iter_frames,
    iter_video,
    load_image,
    normalize,
    thumbnail,
)
from ccied.pruning.models import StagedModel, load_model
from ccied.pruning.transfer import (
    TransferProjection,
    fit_projection_from_activations,
    kept_channels,
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


# The registered model's operating point when none is given (defaults.py).
DEFAULT_REGISTERED_BITS = 6
# A model from a file: 8 bits kept every answer at every EfficientNet split measured
# (DESIGN.md: 0.994-1.000 agreement), a safe start on a model nobody measured.
DEFAULT_CUSTOM_BITS = 8
# A model from a file is cut by default after its first 10% of compute (a cut
# right after the input sends it nearly as it is: a grey copy is as small as the
# tensor after two conv blocks) and before its last 5% (a cut after the global
# pooling sends the least but leaves the tail nothing to do).
MIN_DEFAULT_SPLIT_COMPUTE = 0.1
MAX_DEFAULT_SPLIT_COMPUTE = 0.95
# Its cache key is taken nearest this share of the compute (EfficientNet-Lite0's
# blocks.4, 29.5%, keyed as well as blocks.11 at 69%: defaults.py).
CACHE_KEY_COMPUTE = 0.3
# At most this many frames from a --frames folder (each keeps its tensors in memory).
DEFAULT_MAX_FRAMES = 2000
# Of the images in a --frames folder, the first 3 of every 5 (in name order) fit.
IMAGE_FIT_SLOTS = 3
AUTO = "auto"


@dataclass(frozen=True)
class PrepareConfig:
    model: str = DEFAULT_MODEL
    split: str | None = None  # None: the registered default, or the smallest tensor
    keep_ratio: float = 1.0
    bits: int | str | None = AUTO  # None: raw float32; AUTO: 6 registered, 8 from a file
    every: int = DEFAULT_EVERY
    fit_fraction: float = DEFAULT_FIT_FRACTION
    cache_split: str | None = None  # None: the registered default, or near 30% of compute
    # A model from a file: class names, crop side and normalisation (mean, std).
    labels: Path | None = None
    input_size: int | None = None
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    frames: Path | None = None  # the user's images and videos; None: the bundled clips
    max_frames: int = DEFAULT_MAX_FRAMES
    # Train the operating point's reduction by distillation (keep ratio < 1, 2-8 bits).
    recover: bool = False
    recover_steps: int = recover_module.DEFAULT_STEPS
    augmentations: int = recover_module.DEFAULT_AUGMENTATIONS
    learning_rate: float = recover_module.DEFAULT_LEARNING_RATE
    seed: int = recover_module.DEFAULT_SEED


@dataclass(frozen=True)
class PrepareReport:
    bundle_id: str
    folder: Path
    variants: list[dict[str, Any]]
    cache_rules: dict[str, dict[str, Any]]  # per key depth: rule, verdict, figures
    frames: dict[str, Any]
    model: str = DEFAULT_MODEL


def prepare_bundle(
    config: PrepareConfig,
    out: Path,
    calibrate_cache: Calibrator,
    key_of: KeyFunction,
    progress: bool = True,
) -> PrepareReport:
    """Build, measure and write a bundle; returns its id and figures.

    ModelError or MediaError (one line each) for a model, labels file or
    frames folder that will not do; nothing is left at ``out`` then.
    """
    check_recover(config)
    model = load_for_prepare(config)
    if model.origin is None:
        chosen, variants = registered_variants(config)
        cache_split = config.cache_split or DEFAULT_CACHE_SPLIT
    else:
        chosen, variants = custom_variants(model, config)
        cache_split = config.cache_split or default_cache_split(model, chosen)
    split_index = {v.split: model.split_point(v.split).index for v in variants if not v.is_image}
    cache_point = model.split_point(cache_split)
    if len(cache_point.output_shape) != 3:
        raise ModelError(
            f"cache split {cache_split} gives a flat tensor {cache_point.output_shape}; the "
            "cache keys a (channels, height, width) tensor"
        )
    cache_index = cache_point.index

    frames, fit_mask, source = calibration_frames(config)

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

    confidence_array = np.array(confidences)
    held = np.flatnonzero(~fit_mask)
    decisive = confidence_array[held] >= DECISIVE_PROBABILITY
    projections: dict[str, TransferProjection] = {}
    measured: list[Variant] = []
    rows = []
    for variant in tqdm(variants, desc="variants", disable=not progress):
        if variant.is_image:
            agrees, sizes = _measure_image(
                model, [frames[i] for i in held], label_array[held], variant.jpeg_quality
            )
            float32_bytes = 3 * model.spec.input_size**2 * 4
        else:
            index = split_index[variant.split]
            stacked = torch.cat(tensors[index])
            projection = None
            if variant.keep_ratio < 1.0:
                recovered = config.recover and variant.name == chosen.name
                projection = _reduction(
                    model, variant, stacked, frames, fit_mask, config, recovered, progress
                )
                projections[variant.name] = projection
            agrees, sizes = _measure_tensor(
                model, variant, stacked[torch.from_numpy(held)], label_array[held], projection
            )
            float32_bytes = model.split_point(variant.split).float32_bytes
        row, figures = _measured(variant, agrees, decisive, sizes, float32_bytes)
        measured.append(figures)
        rows.append(row)

    calibration: dict[str, dict[str, Any]] = {}
    for depth in (THUMBNAIL_KEY, cache_split):
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
    frames_info: dict[str, Any] = {
        "source": source,
        "fit": int(fit_mask.sum()),
        "held_out": len(held),
        "every": config.every,
    }

    def write(folder: Path) -> str:
        return write_bundle(
            folder,
            model,
            tuple(measured),
            chosen.name,
            projections,
            cache_split=cache_split,
            cache_rules={depth: figures["rule"] for depth, figures in calibration.items()},
            figures={"frames": frames_info, "variants": rows, "cache": calibration},
        )

    bundle_id = write_atomically(out, write)
    return PrepareReport(bundle_id, out, rows, calibration, frames_info, model.spec.name)


def load_for_prepare(config: PrepareConfig) -> StagedModel:
    """The registered model, or the user's model built from its file, split and checked."""
    source = parse_model_spec(config.model)
    if source.kind == REGISTERED:
        given = [
            option
            for option, value in (
                ("--labels", config.labels),
                ("--input-size", config.input_size),
                ("--normalize", config.normalize),
            )
            if value is not None
        ]
        if given:
            raise ModelError(
                f"{', '.join(given)}: for a model from a file; {config.model} brings its own"
            )
        return load_model(config.model)
    mean, std = config.normalize or (IMAGENET_MEAN, IMAGENET_STD)
    preprocessing = Preprocessing(config.input_size or DEFAULT_INPUT_SIZE, mean, std)
    return model_from_file(source, preprocessing, config.labels)


def open_model(
    spec: str,
    input_size: int | None = None,
    normalize: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
) -> StagedModel:
    """``ccied splits --model``: a bundle folder's model, a registered one, or one from a
    file (``FILE.py:FACTORY`` or TorchScript), split and checked."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if input_size is not None or normalize is not None:
            raise ModelError("--input-size and --normalize: a bundle folder brings its own")
        return load_bundle(folder).model
    return load_for_prepare(PrepareConfig(model=spec, input_size=input_size, normalize=normalize))


def registered_variants(config: PrepareConfig) -> tuple[Variant, list[Variant]]:
    """The operating point asked for (default blocks.11, 6 bits) and the built-in ones."""
    split = config.split or DEFAULT_SPLIT
    bits = DEFAULT_REGISTERED_BITS if config.bits == AUTO else config.bits
    assert not isinstance(bits, str)
    name = variant_name(split, config.keep_ratio, bits, config.recover)
    chosen = Variant(name, split, config.keep_ratio, bits)
    return chosen, [chosen, *(v for v in BUILTIN_VARIANTS if v.name != chosen.name)]


def custom_variants(model: StagedModel, config: PrepareConfig) -> tuple[Variant, list[Variant]]:
    """The operating point and alternatives for a model from a file.

    Without a split: the smallest (channels, height, width) tensor between
    10% and 95% of the compute, the earliest of equals. Alternatives: that split at 4
    bits and raw, the smallest tensor at most halfway there at 8 bits, and the
    input crop as a JPEG (q90) and a lossless WebP.
    """
    points = model.split_points()
    spatial = [p for p in points if len(p.output_shape) == 3]
    if config.split is None:
        pool = [
            p
            for p in spatial
            if MIN_DEFAULT_SPLIT_COMPUTE <= p.compute_fraction <= MAX_DEFAULT_SPLIT_COMPUTE
        ]
        pool = pool or spatial or points
        point = min(pool, key=lambda p: (p.float32_bytes, p.index))
    else:
        point = model.split_point(config.split)
    flat = len(point.output_shape) != 3
    bits = (None if flat else DEFAULT_CUSTOM_BITS) if config.bits == AUTO else config.bits
    assert not isinstance(bits, str)
    if flat and (bits is not None or config.keep_ratio < 1.0):
        raise ModelError(
            f"split {point.name} gives a flat tensor {point.output_shape}: the codec and "
            "--keep-ratio need (channels, height, width); use --bits 32 or another --split"
        )
    name = variant_name(point.name, config.keep_ratio, bits, config.recover)
    chosen = Variant(name, point.name, config.keep_ratio, bits)
    variants = [chosen]
    for more_bits in (None,) if flat else (4, None):
        name = variant_name(point.name, 1.0, more_bits)
        variants.append(Variant(name, point.name, 1.0, more_bits))
    earlier = [
        p
        for p in spatial
        if p.index < point.index and p.compute_fraction <= point.compute_fraction / 2
    ]
    if earlier:
        early = min(earlier, key=lambda p: (p.float32_bytes, p.index))
        variants.append(Variant(variant_name(early.name, 1.0, 8), early.name, 1.0, 8))
    variants += [
        replace(v, agreement=None, bytes_per_frame=None) for v in BUILTIN_VARIANTS if v.is_image
    ]
    unique = {v.name: v for v in reversed(variants)}  # the first of equal names wins
    return chosen, [unique[name] for name in dict.fromkeys(v.name for v in variants)]


def default_cache_split(model: StagedModel, chosen: Variant) -> str:
    """The (channels, height, width) split nearest 30% of the compute, on the way to the
    default variant's split when there is one there."""
    points = [p for p in model.split_points() if len(p.output_shape) == 3]
    if not points:
        raise ModelError("no split point gives a (channels, height, width) tensor to key the cache")
    if not chosen.is_image:
        limit = model.split_point(chosen.split).index
        points = [p for p in points if p.index <= limit] or points
    # Of equal shares, the later: the same compute, the tensor pooled or activated.
    return min(points, key=lambda p: (abs(p.compute_fraction - CACHE_KEY_COMPUTE), -p.index)).name


def calibration_frames(config: PrepareConfig) -> tuple[list[np.ndarray], np.ndarray, str]:
    """The frames, which of them fit (the rest are held out), and where they came from."""
    if config.frames is not None:
        pixels, mask = folder_frames(
            config.frames, config.every, config.fit_fraction, config.max_frames
        )
        return pixels, mask, str(config.frames)
    frames: list[np.ndarray] = []
    fit: list[bool] = []
    for clip in bundled_clips():
        clip_frames = [f.pixels for f in iter_frames(clip, every=config.every)]
        cut = int(len(clip_frames) * config.fit_fraction)
        frames += clip_frames
        fit += [i < cut for i in range(len(clip_frames))]
    return frames, np.array(fit), "bundled clips"


def folder_frames(
    folder: Path, every: int, fit_fraction: float, max_frames: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image and every ``every``-th frame of every video under ``folder`` (name order,
    hidden files left out), at most ``max_frames``, and which of them fit.

    MediaError when nothing there decodes or too few frames do to both fit and check.
    """
    if not folder.is_dir():
        raise MediaError(f"--frames {folder}: not a folder")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    images: list[np.ndarray] = []
    videos: list[list[np.ndarray]] = []
    skipped = 0
    for path in files:
        left = max_frames - len(images) - sum(len(v) for v in videos)
        if left <= 0:
            log.warning("--frames %s: used the first %d frames", folder, max_frames)
            break
        try:
            pixels = load_image(path)
            check_frame(pixels)
            images.append(pixels)
            continue
        except ImageTooLargeError:  # an image all the same: never handed to FFmpeg
            skipped += 1
            continue
        except MediaError:  # not a still image (or an odd size): maybe a video
            pass
        try:
            clip = []
            for frame in iter_video(path, every=every, limit=left):
                check_frame(frame.pixels)
                clip.append(frame.pixels)
        except MediaError:  # neither: skipped, and counted
            skipped += 1
            continue
        if clip:
            videos.append(clip)
        else:
            skipped += 1
    frames: list[np.ndarray] = []
    fit: list[bool] = []
    for clip in videos:
        cut = int(len(clip) * fit_fraction)
        frames += clip
        fit += [i < cut for i in range(len(clip))]
    frames += images
    fit += [i % 5 < IMAGE_FIT_SLOTS for i in range(len(images))]
    if not frames:
        raise MediaError(f"--frames {folder}: no decodable image or video among {len(files)} files")
    if skipped:
        log.warning(
            "--frames %s: %d files skipped (not a readable image or video)", folder, skipped
        )
    mask = np.array(fit)
    if mask.all() or not mask.any():
        raise MediaError(
            f"--frames {folder}: {len(frames)} frames decoded; too few to keep calibration and "
            "evaluation apart (give at least 2 images, or a longer video)"
        )
    return frames, mask


def write_atomically(out: Path, write: Callable[[Path], str]) -> str:
    """``write`` a bundle into a new folder beside ``out``, load it back as a peer would,
    then rename it to ``out`` (replacing a bundle there). Returns the bundle id.

    An existing ``out`` must be an empty folder or a bundle; on any failure the
    temporary folder is removed and ``out`` is as it was.
    """
    out = out.expanduser()
    if out.exists() and not (
        out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir()))
    ):
        raise ModelError(f"--out {out}: exists and is not a bundle folder")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temporary = parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        temporary.mkdir()
    except OSError as exc:
        raise ModelError(f"--out {out}: cannot write there ({exc})") from exc
    try:
        bundle_id = write(temporary)
        load_bundle(temporary)  # self-contained and verified, or an error here
        if out.exists():
            previous = parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            out.rename(previous)
            temporary.rename(out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            temporary.rename(out)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise ModelError(f"--out {out}: cannot write the bundle ({exc})") from exc
    except BaseException:  # any error, Ctrl-C included: leave nothing half-written
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return bundle_id


def check_recover(config: PrepareConfig) -> None:
    """ModelError (one line) for recovery settings that cannot work, before any model loads."""
    if not config.recover:
        return
    if config.keep_ratio >= 1.0:
        raise ModelError("--recover trains a reduced layer: give --keep-ratio below 1")
    if config.bits is None or config.bits == AUTO:
        raise ModelError("--recover trains for the codec: give --bits 2, 4, 6 or 8")
    if config.recover_steps < 1 or not 0 <= config.augmentations <= RECOVER_MAX_AUGMENTATIONS:
        raise ModelError(
            f"--recover-steps must be at least 1 and --augmentations from 0 to "
            f"{RECOVER_MAX_AUGMENTATIONS}, got {config.recover_steps} and {config.augmentations}"
        )
    if not config.learning_rate > 0:
        raise ModelError(f"--learning-rate must be above 0, got {config.learning_rate}")


def _reduction(
    model: StagedModel,
    variant: Variant,
    stacked: torch.Tensor,
    frames: list[np.ndarray],
    fit_mask: np.ndarray,
    config: PrepareConfig,
    recovered: bool,
    progress: bool = True,
) -> TransferProjection:
    """The variant's reduction, fitted by PCA on the fit frames' tensors or (``recovered``)
    trained from there by distillation on the fit frames and augmented copies of them;
    for the registered model on the bundled clips, the photos recovery trains on too."""
    if not recovered:
        return fit_projection_from_activations(
            variant.split, stacked[torch.from_numpy(fit_mask)], variant.keep_ratio
        )
    assert isinstance(variant.bits, int)
    pixels = [frames[i] for i in np.flatnonzero(fit_mask)]
    if config.frames is None and model.origin is None:
        pixels += recover_module.training_photos()
    train = recover_module.distillation_set(
        model, variant.split, pixels, config.augmentations, config.seed
    )
    settings = recover_module.RecoveryConfig(
        split=variant.split,
        channels=kept_channels(variant.keep_ratio, stacked.shape[1]),
        bits=variant.bits,
        steps=config.recover_steps,
        learning_rate=config.learning_rate,
        seed=config.seed,
    )
    log.info("recovering %s on %d frames x %d", variant.name, len(pixels), config.augmentations + 1)
    return recover_module.recover(model, train, settings, progress).projection


def _measure_tensor(
    model: StagedModel,
    variant: Variant,
    held: torch.Tensor,
    labels: np.ndarray,
    projection: TransferProjection | None,
) -> tuple[np.ndarray, list[int]]:
    """Per held-out tensor at the variant's split: does the answer through the reduction
    and the real codec agree with the unpruned model's, and how many bytes crossed."""
    encode = decode = None
    if projection is not None:
        encode, decode = projection_convs(projection)
    codec = None if variant.bits is None else TensorCodec(CodecConfig(bits=variant.bits))
    tail = model.stages[model.split_point(variant.split).index + 1 :]
    agrees, sizes = [], []
    with torch.inference_mode():
        for row, label in enumerate(labels):
            x = held[row : row + 1]
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
            agrees.append(int(tail(received).argmax()) == label)
    return np.array(agrees, dtype=bool), sizes


def _measure_image(
    model: StagedModel, frames: list[np.ndarray], labels: np.ndarray, quality: int | None
) -> tuple[np.ndarray, list[int]]:
    """Per frame: agreement and bytes when the input crop crosses as a JPEG of
    ``quality`` (None: as a lossless WebP)."""
    size = model.spec.input_size
    agrees, sizes = [], []
    with torch.inference_mode():
        for pixels, label in zip(frames, labels, strict=True):
            crop = center_crop(pixels, size)
            if quality is None:
                image, image_format = encode_lossless(crop), "WEBP"
            else:
                image, image_format = encode_jpeg(crop, quality), "JPEG"
            sizes.append(len(image))
            x = normalize(decode_image(image, size, image_format), model.spec)
            agrees.append(int(model.full()(x).argmax()) == label)
    return np.array(agrees, dtype=bool), sizes


def _measured(
    variant: Variant,
    agrees: np.ndarray,
    decisive: np.ndarray,
    sizes: list[int],
    float32_bytes: int,
) -> tuple[dict[str, Any], Variant]:
    """The report's row and the variant with its figures: agreement on all held-out
    frames and on the decisive ones (None when none was decisive)."""
    agreement = float(agrees.mean()) if len(agrees) else 0.0
    # No decisive frame held out: not measured (the planner then holds the variant
    # to its all-frame figure on both floors), never a perfect score.
    on_decisive = float(agrees[decisive].mean()) if bool(decisive.any()) else None
    bytes_median = float(np.median(sizes)) if sizes else 0.0
    row: dict[str, Any] = {
        "name": variant.name,
        "split": variant.split,
        "keep_ratio": variant.keep_ratio,
        "bits": variant.bits,
        "agreement": round(agreement, 4),
        "agreement_all": round(agreement, 4),
        "agreement_decisive": None if on_decisive is None else round(on_decisive, 4),
        "decisive_frames": int(decisive.sum()),
        "bytes_per_frame": bytes_median,
        "fp32_bytes": float32_bytes,
        "ratio_to_fp32": round(float32_bytes / max(bytes_median, 1.0), 2),
    }
    if variant.is_image:
        row |= {"jpeg_quality": variant.jpeg_quality, "lossless": variant.lossless}
    figures = replace(
        variant,
        agreement=agreement,
        agreement_decisive=on_decisive,
        bytes_per_frame=bytes_median,
    )
    return row, figures


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(report: PrepareReport, write: Callable[[str], Any] = print) -> None:
    write(f"bundle {report.bundle_id} of {report.model} written to {report.folder}")
    write(f"frames: {report.frames}")
    decisive = report.variants[0]["decisive_frames"] if report.variants else 0
    write(
        f"{'variant':<28} {'bytes':>8} {'x fp32':>7} {'agreement: decisive':>20} {'all':>6}"
        f"  ({decisive} of {report.frames['held_out']} held-out frames decisive)"
    )
    for row in report.variants:
        write(
            f"{row['name']:<28} {row['bytes_per_frame']:>8.0f} {row['ratio_to_fp32']:>7.1f} "
            f"{_fraction(row['agreement_decisive']):>20} {row['agreement']:>6.3f}"
        )
    for depth, figures in report.cache_rules.items():
        write(
            f"cache rule at {depth}: {figures['rule']} ({figures['verdict']}); "
            f"held-out frames: {figures['held_out']}"
        )
