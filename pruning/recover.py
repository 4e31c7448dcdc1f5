"""A pruned transfer layer recovered by distillation: few channels cross, the answers stay.

API::

    frames = recovery_frames()                                   # train / held-out, kept apart
    train = distillation_set(model, "blocks.11", frames.train, augmentations=4)
    result = recover(model, train, RecoveryConfig(split="blocks.11", channels=96, bits=2))
    held = distillation_set(model, "blocks.11", frames.held_out, augmentations=0)
    m = measure(model, result.projection, held, CodecConfig(bits=2))
    m.bytes_per_frame, m.agreement_decisive, m.agreement_all

The reduction is the linear one of :mod:`ccied.pruning.transfer` (``z = E (y - mean)``
crosses, ``y' = D z + mean`` rebuilds the C channels), so a recovered layer is a
:class:`~ccied.pruning.transfer.TransferProjection` (method ``"distilled"``) that a
bundle stores and a peer runs exactly as a PCA one: two 1x1 convolutions around the
codec. Only E, D and the mean are trained (``2 k C + C`` numbers; 37,056 for k = 96
at blocks.11); the head and the tail stay the unpruned model's. Training starts from
PCA (the best linear reconstruction) and then follows what the tail needs instead of
what the variance says: the loss is the KL divergence between the unpruned model's
logits and those of the reduced model at a temperature, plus a small reconstruction
term that keeps y' near y. The codec is in the loop: z is quantized per frame and
channel exactly as :class:`~ccied.pruning.codec.TensorCodec` does (min-max affine,
optional clipping), with a straight-through gradient, so the layer learns to live
with the bits it will get.

Training needs no labels: unlabelled frames, each with several strongly augmented
copies (crop, flip, colour, blur, noise). Head activations and the unpruned model's
logits are computed once; a step then runs only the tail (the last ~30% of the model
at blocks.11) forward and backward, which keeps recovery to minutes on two cores.
The earlier attempt recorded in :mod:`ccied.pruning.transfer` fine-tuned a tail
convolution and overfit the calibration frames; this trains only the reduction, on
more varied frames, and :func:`measure` reports on frames that no training frame
comes from. Measured (README): training adds 0.03-0.09 of all-frame agreement over
PCA at 64-96 channels and 2 bits and keeps the decisive answers (one of 41 frames
either way); agreement on all frames stays far below the unreduced tensor's.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ccied.pruning.bundle import (
    BUILTIN_VARIANTS,
    DEFAULT_VARIANT,
    RECOVERED_METHOD,
    Variant,
    variant_name,
    write_bundle,
)
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.defaults import (
    DECISIVE_PROBABILITY,
    DEFAULT_SPLIT,
    RECOVER_AUGMENTATIONS,
    RECOVER_BITS,
    RECOVER_LEARNING_RATE,
    RECOVER_STEPS,
)
from ccied.pruning.errors import ModelError
from ccied.pruning.media import bundled_clips, iter_frames
from ccied.pruning.models import ModelSpec, StagedModel
from ccied.pruning.transfer import (
    TransferProjection,
    augment,
    fit_projection_from_activations,
    transfer_activations,
)
from torch import nn
from torch.nn import functional

log = logging.getLogger(__name__)

METHOD = RECOVERED_METHOD
# The defaults of `ccied prepare --recover` (pruning/defaults.py, where its --help
# reads them): half of blocks.11's 192 channels at 2 bits.
DEFAULT_CHANNELS = 96
DEFAULT_BITS = RECOVER_BITS
DEFAULT_STEPS = RECOVER_STEPS
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = RECOVER_LEARNING_RATE
DEFAULT_TEMPERATURE = 2.0
# Weight of the reconstruction MSE (relative to the activations' variance) beside the KL.
DEFAULT_RECONSTRUCTION_WEIGHT = 0.05
DEFAULT_AUGMENTATIONS = RECOVER_AUGMENTATIONS
DEFAULT_SEED = 0
# Share of each clip (its first frames) used for training; the rest is held out.
TRAIN_FRACTION = 0.6
# scikit-image photos: these train, the others are held out (a stream none trains on).
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "retina", "camera")
HELD_OUT_PHOTOS = ("chelsea", "hubble_deep_field", "stereo_motorcycle", "horse", "coins")
# The time of this many steps gives the estimate shown before the rest run.
ESTIMATE_AFTER_STEPS = 3
# Loss above this many times its first value (or than DIVERGENCE_FLOOR, when the
# first was smaller), or not finite: training diverged. The floor: an 8-bit layer
# starts near 0.001, and one batch's noise then read 0.03 as a divergence (a KL of
# 0.03 at T = 2 flips almost no answer).
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_FLOOR = 0.1


@dataclass(frozen=True)
class RecoveryConfig:
    """Where to cut, how many channels cross, at how many bits, and how long to train."""

    split: str = DEFAULT_SPLIT
    channels: int = DEFAULT_CHANNELS
    bits: int = DEFAULT_BITS
    clip_sigma: float = 0.0
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LEARNING_RATE
    temperature: float = DEFAULT_TEMPERATURE
    reconstruction_weight: float = DEFAULT_RECONSTRUCTION_WEIGHT
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ModelError(f"channels must be at least 1, got {self.channels}")
        CodecConfig(bits=self.bits, clip_sigma=self.clip_sigma)  # CodecError if out of range
        if self.steps < 0 or self.batch_size < 1:
            raise ModelError(f"steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not (self.learning_rate > 0 and self.temperature > 0):
            raise ModelError("learning_rate and temperature must be positive")

    @property
    def codec(self) -> CodecConfig:
        """The codec the layer is trained for (and measured with)."""
        return CodecConfig(bits=self.bits, clip_sigma=self.clip_sigma)


@dataclass(frozen=True)
class RecoveryFrames:
    """RGB uint8 frames to train on and frames held out, from different times or photos."""

    train: list[np.ndarray]
    held_out: list[np.ndarray]
    held_out_photos: list[np.ndarray]


@dataclass(frozen=True)
class DistillationSet:
    """Head outputs at a split and the unpruned model's logits for the same inputs."""

    split: str
    activations: torch.Tensor  # (N, C, H, W)
    logits: torch.Tensor  # (N, classes)


@dataclass(frozen=True)
class RecoveryResult:
    """The recovered layer and the loss every step (the progress bar's figures)."""

    projection: TransferProjection
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Measurement:
    """A layer with its codec on held-out frames, against the unpruned float32 model."""

    frames: int
    decisive_frames: int
    bytes_per_frame: float  # median codec payload
    float32_bytes: int
    agreement_decisive: float  # top-1 agreement where the unpruned top-1 prob >= 0.5
    agreement_all: float
    kl_divergence: float  # mean KL(unpruned || reduced) of the answers, temperature 1

    @property
    def ratio_float32(self) -> float:
        """How many times fewer bytes than the float32 tensor at the split."""
        return self.float32_bytes / self.bytes_per_frame


def _photo(name: str) -> list[np.ndarray]:
    """A scikit-image photo as RGB uint8 (a stereo pair gives two, greyscale is repeated)."""
    import skimage.data

    loaded = getattr(skimage.data, name)()
    images = list(loaded[:2]) if isinstance(loaded, tuple) else [loaded]
    out = []
    for image in images:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(array[:, :, :3].astype(np.uint8)))
    return out


def _photo_views(pixels: np.ndarray, count: int) -> list[np.ndarray]:
    """Whole photo plus ``count - 1`` square crops along its long side (a camera's pan)."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    views = [pixels]
    for index in range(count - 1):
        fraction = (index + 0.5) / max(1, count - 1)
        top = round((height - side) * fraction)
        left = round((width - side) * fraction)
        views.append(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
    return views


def training_photos(views: int = 4) -> list[np.ndarray]:
    """The scikit-image photos recovery trains on (never those held out), in ``views`` views."""
    return [v for name in TRAIN_PHOTOS for p in _photo(name) for v in _photo_views(p, views)]


def recovery_frames(every: int = 1, photo_views: int = 4, train_every: int = 1) -> RecoveryFrames:
    """The bundled clips (first 60% train, last 40% held out) and scikit-image photos.

    Neighbouring video frames are near duplicates, so the clips are split in time, not
    at random; the held-out photos are a stream none of the training frames come from.
    ``train_every``: keep every N-th training frame of a clip (its augmented copies
    differ more than neighbouring frames do).
    """
    train: list[np.ndarray] = []
    held_out: list[np.ndarray] = []
    for clip in bundled_clips():
        frames = [f.pixels for f in iter_frames(clip, every=every)]
        cut = int(TRAIN_FRACTION * len(frames))
        train += frames[:cut:train_every]
        held_out += frames[cut:]
    train += training_photos(photo_views)
    photos = [v for n in HELD_OUT_PHOTOS for p in _photo(n) for v in _photo_views(p, photo_views)]
    return RecoveryFrames(train, held_out, photos)


def strong_augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`~ccied.pruning.transfer.augment` (crop, flip, contrast) plus colour, blur, noise."""
    out = augment(inputs, generator)
    n = out.shape[0]
    # Colour: a gain per RGB channel (white balance).
    out = out * torch.empty(n, 3, 1, 1).uniform_(0.85, 1.15, generator=generator)
    if bool(torch.rand(1, generator=generator) < 0.3):
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3).contiguous()
        out = functional.conv2d(
            functional.pad(out, (1, 1, 1, 1), mode="replicate"), kernel2d, groups=3
        )
    sigma = float(torch.empty(1).uniform_(0.0, 0.08, generator=generator))
    out = out + sigma * torch.randn(out.shape, generator=generator)
    return out.clamp(-1.0, 1.0)


def augmenter_for(spec: ModelSpec) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """:func:`strong_augment` for a model's normalisation: its inputs are mapped to [-1, 1]
    pixels and back, so clamping and noise mean the same for any mean and std."""
    mean = torch.tensor(spec.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32)[None, :, None, None]

    def augmenter(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pixels = (inputs * std + mean) * 2.0 - 1.0
        return ((strong_augment(pixels, generator) + 1.0) / 2.0 - mean) / std

    return augmenter


def distillation_set(
    model: StagedModel,
    split: str,
    frames: Sequence[np.ndarray],
    augmentations: int = DEFAULT_AUGMENTATIONS,
    seed: int = DEFAULT_SEED,
    batch_size: int = 32,
) -> DistillationSet:
    """Head outputs and unpruned logits of the frames and ``augmentations`` copies of each."""
    if not frames:
        raise ModelError("distillation needs at least one frame")
    activations = transfer_activations(
        model, split, frames, augmentations, seed, batch_size, augmenter=augmenter_for(model.spec)
    )
    _, tail = model.split(split)
    with torch.inference_mode():
        logits = [
            tail(activations[start : start + batch_size])
            for start in range(0, len(activations), batch_size)
        ]
    return DistillationSet(split, activations, torch.cat(logits))


def codec_quantize(z: torch.Tensor, codec: CodecConfig) -> torch.Tensor:
    """The codec's per-frame, per-channel min-max quantization with a straight-through gradient.

    Forward: the values :class:`~ccied.pruning.codec.TensorCodec` decodes (up to its
    float16 scales); backward: the identity, so E and D learn through the rounding.
    """
    levels = (1 << codec.bits) - 1
    with torch.no_grad():
        flat = z.flatten(2)
        low = flat.amin(2, keepdim=True)
        high = flat.amax(2, keepdim=True)
        if codec.clip_sigma > 0:
            mean = flat.mean(2, keepdim=True)
            spread = codec.clip_sigma * flat.std(2, keepdim=True)
            low, high = torch.maximum(low, mean - spread), torch.minimum(high, mean + spread)
        step = torch.where(high > low, (high - low) / levels, torch.ones_like(high))
        codes = torch.clamp(torch.round((flat - low) / step), 0, levels)
        quantized = (codes * step + low).reshape(z.shape)
    return z + (quantized - z).detach()


class Bottleneck(nn.Module):
    """``y' = D q(E (y - mean)) + mean`` with q the codec's quantization (if ``bits``)."""

    def __init__(self, projection: TransferProjection) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.from_numpy(projection.mean.copy()))
        self.encoder = nn.Parameter(torch.from_numpy(projection.encoder.copy()))
        self.decoder = nn.Parameter(torch.from_numpy(projection.decoder.copy()))

    def forward(self, y: torch.Tensor, codec: CodecConfig | None = None) -> torch.Tensor:
        centred = y - self.mean[None, :, None, None]
        z = torch.einsum("kc,nchw->nkhw", self.encoder, centred)
        if codec is not None:
            z = codec_quantize(z, codec)
        return torch.einsum("ck,nkhw->nchw", self.decoder, z) + self.mean[None, :, None, None]

    def projection(self, split: str, explained_variance: float) -> TransferProjection:
        """The trained layer as a projection a bundle stores and a peer runs."""
        return TransferProjection(
            split=split,
            method=METHOD,
            mean=self.mean.detach().numpy().astype(np.float32).copy(),
            encoder=np.ascontiguousarray(self.encoder.detach().numpy(), dtype=np.float32),
            decoder=np.ascontiguousarray(self.decoder.detach().numpy(), dtype=np.float32),
            explained_variance=explained_variance,
        )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, scaled by T^2 (Hinton et al.)."""
    return functional.kl_div(
        functional.log_softmax(student / temperature, 1),
        functional.log_softmax(teacher / temperature, 1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)


def recover(
    model: StagedModel,
    train: DistillationSet,
    config: RecoveryConfig | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Fit PCA at ``config.channels``, then train E, D and the mean by distillation.

    ModelError when the loss diverges (not finite, or over DIVERGENCE_FACTOR times
    its first value or DIVERGENCE_FLOOR), naming the settings to change.
    """
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

    config = config or RecoveryConfig(split=train.split)
    if config.split != train.split:
        raise ModelError(f"distillation set is for {train.split}, config for {config.split}")
    channels = train.activations.shape[1]
    if config.channels > channels:
        raise ModelError(f"channels {config.channels} exceeds the {channels} at {config.split}")
    torch.manual_seed(config.seed)
    pca = fit_projection_from_activations(
        config.split, train.activations, config.channels / channels, "pca"
    )
    bottleneck = Bottleneck(pca)
    _, tail = model.split(config.split)
    for parameter in tail.parameters():
        parameter.requires_grad_(False)
    tail.eval()
    variance = float(train.activations.var()) or 1.0
    optimiser = torch.optim.Adam(bottleneck.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    count = train.activations.shape[0]
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(
        range(config.steps),
        desc=f"recover {config.split} k={config.channels} {config.bits}b",
        file=sys.stderr,
        disable=not progress,
    )
    for _ in bar:
        index = torch.randint(0, count, (min(config.batch_size, count),), generator=generator)
        y, teacher = train.activations[index], train.logits[index]
        rebuilt = bottleneck(y, config.codec)
        loss = distillation_loss(tail(rebuilt), teacher, config.temperature)
        if config.reconstruction_weight:
            mse = functional.mse_loss(rebuilt, y) / variance
            loss = loss + config.reconstruction_weight * mse
        value = float(loss.detach())
        if not math.isfinite(value) or (
            losses and value > DIVERGENCE_FACTOR * max(losses[0], DIVERGENCE_FLOOR)
        ):
            raise ModelError(
                f"recovery diverged at step {len(losses)} (loss {value:.3g}): lower the "
                f"learning rate (--learning-rate, now {config.learning_rate}) or raise "
                f"--bits (now {config.bits})"
            )
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if progress and len(losses) == ESTIMATE_AFTER_STEPS < config.steps:
            seconds = (time.perf_counter() - started) / len(losses) * config.steps
            about = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
            bar.write(
                f"recovery: {config.steps} steps, about {about} on this machine", file=sys.stderr
            )
    bar.close()
    projection = bottleneck.projection(config.split, _explained(bottleneck, train.activations))
    return RecoveryResult(projection, losses)


def _explained(bottleneck: Bottleneck, activations: torch.Tensor) -> float:
    """Share of the activations' variance the (unquantized) layer rebuilds."""
    with torch.no_grad():
        sample = activations[:256]
        residual = float(((bottleneck(sample) - sample) ** 2).sum())
        total = float(((sample - sample.mean((0, 2, 3), keepdim=True)) ** 2).sum()) or 1.0
    return 1.0 - residual / total


def measure(
    model: StagedModel,
    projection: TransferProjection | None,
    held_out: DistillationSet,
    codec_config: CodecConfig,
) -> Measurement:
    """Bytes per frame through the real codec and agreement with the unpruned model.

    ``projection=None`` measures the codec on the full tensor (every channel kept).
    """
    _, tail = model.split(held_out.split)
    codec = TensorCodec(codec_config)
    point = model.split_point(held_out.split)
    sizes: list[int] = []
    answers: list[torch.Tensor] = []
    with torch.inference_mode():
        if projection is None:
            z = held_out.activations
        else:
            bottleneck = Bottleneck(projection)
            centred = held_out.activations - bottleneck.mean[None, :, None, None]
            z = torch.einsum("kc,nchw->nkhw", bottleneck.encoder, centred)
        decoded = []
        for row in z.numpy():
            payload = codec.encode(row[None])
            sizes.append(len(payload))
            decoded.append(codec.decode(payload))
        z_hat = torch.from_numpy(np.concatenate(decoded))
        if projection is not None:
            z_hat = (
                torch.einsum("ck,nkhw->nchw", bottleneck.decoder, z_hat)
                + bottleneck.mean[None, :, None, None]
            )
        for start in range(0, len(z_hat), 64):
            answers.append(tail(z_hat[start : start + 64]))
    student_logits = torch.cat(answers)
    student = student_logits.argmax(1)
    probabilities = functional.softmax(held_out.logits, 1)
    confidence, reference = probabilities.max(1)
    agree = (student == reference).float()
    decisive = confidence >= DECISIVE_PROBABILITY
    return Measurement(
        frames=len(agree),
        decisive_frames=int(decisive.sum()),
        bytes_per_frame=float(np.median(sizes)),
        float32_bytes=point.float32_bytes,
        agreement_decisive=float(agree[decisive].mean()) if bool(decisive.any()) else 1.0,
        agreement_all=float(agree.mean()),
        kl_divergence=float(distillation_loss(student_logits, held_out.logits, 1.0)),
    )


def recovered_variant(projection: TransferProjection, bits: int, held_out: Measurement) -> Variant:
    """The bundle variant of a recovered layer, with its held-out figures: agreement
    on all frames and on the decisive ones (None when none was decisive: the
    planner then holds it to the all-frame figure on both floors)."""
    keep_ratio = projection.kept / projection.channels
    return Variant(
        variant_name(projection.split, keep_ratio, bits, recovered=True),
        projection.split,
        keep_ratio=keep_ratio,
        bits=bits,
        agreement=held_out.agreement_all,
        bytes_per_frame=held_out.bytes_per_frame,
        agreement_decisive=held_out.agreement_decisive if held_out.decisive_frames else None,
    )


def write_recovered_bundle(
    folder: Path,
    model: StagedModel,
    recovered: Sequence[tuple[TransferProjection, int, Measurement]],
) -> str:
    """A bundle of the built-in variants plus recovered layers (projection, bits, figures).

    Each layer is stored as ``projection-<variant>.npz`` and covered by the bundle id
    like a PCA one, so peers with different recovered layers never mix; ``ccied peer
    --model FOLDER`` serves it. Returns the bundle id.
    """
    variants = list(BUILTIN_VARIANTS)
    projections: dict[str, TransferProjection] = {}
    figures: dict[str, dict[str, float | int]] = {}
    for projection, bits, measurement in recovered:
        variant = recovered_variant(projection, bits, measurement)
        variants.append(variant)
        projections[variant.name] = projection
        figures[variant.name] = asdict(measurement)
    return write_bundle(
        folder,
        model,
        tuple(variants),
        DEFAULT_VARIANT,
        projections,
        figures={"recovered": figures},
    )
