"""Transfer-layer reduction: fewer channels cross the network, the tail rebuilds the rest.

API::

    projection = fit_projection(model, frames, TransferConfig(split="blocks.11", keep_ratio=0.5))
    head, tail = reduced_split(model, projection)   # tail(head(x)) ~ model(x)
    state = projection.state()                        # dict of float32 arrays for a bundle
    projection = TransferProjection.from_state(state) # and back

The tensor that crosses at a split of a :class:`~ccied.pruning.models.StagedModel`
has C channels. The head gets a 1x1 convolution ``z = E (y - mean)`` with k < C
output channels (k = ``round(keep_ratio * C)``), the tail starts with the 1x1
convolution ``y' = D z + mean`` that rebuilds all C channels, so the rest of the
model (EfficientNet's next block adds a residual of all C input channels) runs
unchanged. Nothing needs labels: E, D and the mean are fitted on activations of
unlabelled real frames (with augmentation: crops, flips, contrast) by least squares.

Two ways to choose the k channels (``method``):

- ``"pca"``: E = D^T = the k principal directions of the activations (over frames
  and positions). For a given k this minimises the squared reconstruction error of
  any linear scheme, and it orders the output channels by variance, which the
  codec's shared-scale mode exploits (:mod:`ccied.pruning.codec`).
- ``"channels"``: structured pruning in the original basis: keep the k channels of
  highest activation variance (E selects them), D rebuilds the pruned channels
  from the kept ones by least squares (``D = Cov[:, S] Cov[S, S]^-1``).

Measured on the bundled clips (fit on the first 60% of each clip, agreement on the
last 40%): at equal k PCA keeps more of the variance than channel selection
(tests/test_transfer.py; agreement of channel selection is in the full
``python -m ccied.bench.transfer`` run), and any k < C loses far more agreement
than quantization does at the same bytes: the
192 channels of EfficientNet-Lite0 at 7x7 are not low-rank on real video (the top
32 principal directions hold about 70% of the variance, and agreement with the
full model falls to 0.3-0.5). The default therefore keeps every channel
(``DEFAULT_KEEP_RATIO = 1.0``): the PCA rotation then costs nothing in accuracy
and makes the channels decorrelated and variance-ordered, so an equal quantization
step across channels (codec ``shared_scale``) spends bits where the variance is.
A 1x1 convolution also tried here, fine-tuning the tail by distillation on the
calibration frames, overfit them (held-out agreement fell while the training loss
fell) and is not used; :mod:`ccied.pruning.recover` trains E, D and the mean
instead (the tail frozen), by distillation with the codec in the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ccied.pruning.defaults import DEFAULT_SPLIT
from ccied.pruning.errors import ModelError
from ccied.pruning.media import preprocess
from ccied.pruning.models import StagedModel
from torch import nn
from torch.nn import functional

log = logging.getLogger(__name__)

DEFAULT_KEEP_RATIO = 1.0
DEFAULT_METHOD = "pca"
METHODS = ("pca", "channels")
# Augmented copies of each calibration frame (0: the frames only).
DEFAULT_AUGMENTATIONS = 1
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class TransferConfig:
    """Where to cut, how many channels to keep, and how to fit the reduction."""

    split: str = DEFAULT_SPLIT
    keep_ratio: float = DEFAULT_KEEP_RATIO
    method: str = DEFAULT_METHOD
    augmentations: int = DEFAULT_AUGMENTATIONS
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ModelError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.method not in METHODS:
            raise ModelError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.augmentations <= 16:
            raise ModelError(f"augmentations must be in 0..16, got {self.augmentations}")


@dataclass(frozen=True, eq=False)
class TransferProjection:
    """The fitted reduction at one split.

    ``z = encoder @ (y - mean)`` crosses the network; ``y' = decoder @ z + mean``.
    """

    split: str
    method: str
    mean: np.ndarray  # (C,) float32
    encoder: np.ndarray  # (k, C) float32
    decoder: np.ndarray  # (C, k) float32
    explained_variance: float  # share of the calibration variance the k channels keep

    @property
    def channels(self) -> int:
        """C: channels of the unreduced tensor at the split."""
        return int(self.mean.shape[0])

    @property
    def kept(self) -> int:
        """k: channels that cross the network."""
        return int(self.encoder.shape[0])

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to store in a bundle (with :attr:`split` and :attr:`method` beside them)."""
        return {
            "mean": self.mean,
            "encoder": self.encoder,
            "decoder": self.decoder,
            "explained_variance": np.array([self.explained_variance], dtype=np.float32),
        }

    @classmethod
    def from_state(
        cls, split: str, method: str, state: dict[str, np.ndarray]
    ) -> TransferProjection:
        """Rebuild from :meth:`state`, checking shapes agree (ModelError if not)."""
        try:
            mean = np.asarray(state["mean"], dtype=np.float32)
            encoder = np.asarray(state["encoder"], dtype=np.float32)
            decoder = np.asarray(state["decoder"], dtype=np.float32)
            explained = float(np.asarray(state["explained_variance"]).reshape(-1)[0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelError(f"transfer projection state is incomplete: {exc!r}") from exc
        c = mean.shape[0] if mean.ndim == 1 else -1
        if (
            c < 1
            or encoder.ndim != 2
            or encoder.shape[1] != c
            or decoder.shape != (c, encoder.shape[0])
            or not 1 <= encoder.shape[0] <= c
        ):
            raise ModelError(
                f"transfer projection shapes disagree: mean {mean.shape}, "
                f"encoder {encoder.shape}, decoder {decoder.shape}"
            )
        if not all(np.isfinite(a).all() for a in (mean, encoder, decoder)):
            raise ModelError("transfer projection holds non-finite values")
        return cls(split, method, mean, encoder, decoder, explained)


def augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random crop (60-100% of the side, resized back), flip and contrast/brightness change.

    Works on normalised model inputs (N, 3, S, S), so calibration needs one decode per
    frame; the changes are those a camera's framing and exposure make.
    """
    size = inputs.shape[-1]
    scale = float(torch.empty(1).uniform_(0.6, 1.0, generator=generator))
    crop = max(8, round(size * scale))
    top = int(torch.randint(0, size - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, size - crop + 1, (1,), generator=generator))
    out = inputs[:, :, top : top + crop, left : left + crop]
    out = functional.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    if bool(torch.rand(1, generator=generator) < 0.5):
        out = out.flip(3)
    n = inputs.shape[0]
    gain = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator)
    shift = torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=generator)
    return (out * gain + shift).clamp(-1.0, 1.0)


def transfer_activations(
    model: StagedModel,
    split: str,
    frames: Sequence[np.ndarray],
    augmentations: int = DEFAULT_AUGMENTATIONS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    augmenter: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Head outputs (N, C, H, W) of RGB uint8 frames and ``augmentations`` copies of each
    (made by ``augmenter``, default :func:`augment`)."""
    if not frames:
        raise ModelError("calibration needs at least one frame")
    head, _ = model.split(split)
    inputs = torch.cat([preprocess(pixels, model.spec) for pixels in frames])
    generator = torch.Generator().manual_seed(seed)
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for copy in range(augmentations + 1):
            for start in range(0, len(inputs), batch_size):
                batch = inputs[start : start + batch_size]
                if copy:
                    batch = (augmenter or augment)(batch, generator)
                outputs.append(head(batch))
    return torch.cat(outputs)


def kept_channels(keep_ratio: float, channels: int) -> int:
    """How many of ``channels`` a reduction at ``keep_ratio`` keeps (at least one)."""
    return min(channels, max(1, round(keep_ratio * channels)))


def fit_projection_from_activations(
    split: str, activations: torch.Tensor, keep_ratio: float, method: str = DEFAULT_METHOD
) -> TransferProjection:
    """Fit E, D and the mean on head outputs (N, C, H, W); every position is a sample."""
    if activations.ndim != 4:
        raise ModelError(f"activations must be (N, C, H, W), got {tuple(activations.shape)}")
    if method not in METHODS:
        raise ModelError(f"method must be one of {METHODS}, got {method!r}")
    c = activations.shape[1]
    kept = kept_channels(keep_ratio, c)
    samples = activations.detach().permute(0, 2, 3, 1).reshape(-1, c).double()
    mean = samples.mean(0)
    centred = samples - mean
    cov = centred.T @ centred / max(1, samples.shape[0] - 1)
    total = float(torch.trace(cov)) or 1.0
    if method == "pca":
        eigenvalues, vectors = torch.linalg.eigh(cov)
        order = torch.argsort(eigenvalues, descending=True)[:kept]
        encoder = vectors[:, order].T
        decoder = encoder.T
        explained = float(eigenvalues[order].sum()) / total
    else:
        variances = torch.diagonal(cov)
        keep = torch.argsort(variances, descending=True)[:kept]
        encoder = torch.zeros(kept, c, dtype=torch.float64)
        encoder[torch.arange(kept), keep] = 1.0
        # Least squares: the pruned channels as a linear function of the kept ones.
        ridge = 1e-6 * float(variances.mean()) * torch.eye(kept, dtype=torch.float64)
        decoder = torch.linalg.solve(cov[keep][:, keep] + ridge, cov[keep]).T
        residual = cov - decoder @ cov[keep]
        explained = 1.0 - float(torch.trace(residual)) / total
    log.debug("fitted %s projection at %s: %d of %d channels", method, split, kept, c)
    return TransferProjection(
        split=split,
        method=method,
        mean=mean.float().numpy(),
        encoder=np.ascontiguousarray(encoder.float().numpy()),
        decoder=np.ascontiguousarray(decoder.float().numpy()),
        explained_variance=explained,
    )


def fit_projection(
    model: StagedModel, frames: Sequence[np.ndarray], config: TransferConfig | None = None
) -> TransferProjection:
    """Fit the reduction at ``config.split`` on unlabelled RGB uint8 calibration frames."""
    config = config or TransferConfig()
    activations = transfer_activations(
        model, config.split, frames, augmentations=config.augmentations, seed=config.seed
    )
    return fit_projection_from_activations(
        config.split, activations, config.keep_ratio, config.method
    )


def projection_convs(projection: TransferProjection) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The 1x1 convolutions (C -> k) appended to the head and (k -> C) prepended to the tail."""
    mean = torch.from_numpy(projection.mean)
    encoder_weight = torch.from_numpy(projection.encoder)
    encode = nn.Conv2d(projection.channels, projection.kept, kernel_size=1)
    decode = nn.Conv2d(projection.kept, projection.channels, kernel_size=1)
    assert encode.bias is not None and decode.bias is not None
    with torch.no_grad():
        encode.weight.copy_(encoder_weight[:, :, None, None])
        encode.bias.copy_(-(encoder_weight @ mean))
        decode.weight.copy_(torch.from_numpy(projection.decoder)[:, :, None, None])
        decode.bias.copy_(mean)
    return encode.eval(), decode.eval()


def reduced_split(
    model: StagedModel, projection: TransferProjection
) -> tuple[nn.Sequential, nn.Sequential]:
    """Head (input -> k channels) and tail (k channels -> logits) at the projection's split.

    Both share the model's parameters except the two new 1x1 convolutions.
    """
    point = model.split_point(projection.split)
    if point.output_shape[0] != projection.channels:
        raise ModelError(
            f"projection for {projection.channels} channels does not fit split "
            f"{point.name} with {point.output_shape[0]}"
        )
    head, tail = model.split(projection.split)
    encode, decode = projection_convs(projection)
    return nn.Sequential(*head, encode).eval(), nn.Sequential(decode, *tail).eval()
