"""Transfer-layer reduction on the real model and real frames; Fashion-MNIST pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ccied.pruning import StagedModel, find_clip, iter_frames, preprocess
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.errors import ModelError
from ccied.pruning.transfer import (
    TransferConfig,
    TransferProjection,
    fit_projection_from_activations,
    reduced_split,
    transfer_activations,
)

SPLIT = "blocks.14"


@pytest.fixture(scope="module")
def carphone() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every 6th frame of the real carphone clip: the first 12 to fit, the last 8 held out."""
    frames = [f.pixels for f in iter_frames(find_clip("carphone_pristine.mp4"), every=6)]
    return frames[:12], frames[12:]


@pytest.fixture(scope="module")
def activations(
    model: StagedModel, carphone: tuple[list[np.ndarray], list[np.ndarray]]
) -> torch.Tensor:
    return transfer_activations(model, SPLIT, carphone[0], augmentations=0)


def _agreement(
    model: StagedModel,
    head: torch.nn.Module,
    tail: torch.nn.Module,
    frames: list[np.ndarray],
    codec: TensorCodec | None = None,
) -> tuple[float, float]:
    """Top-1 agreement with the full float32 model, and the median payload bytes."""
    x = torch.cat([preprocess(p, model.spec) for p in frames])
    sizes = []
    with torch.inference_mode():
        reference = model.full()(x).argmax(1)
        z = head(x)
        if codec is not None:
            payloads = [codec.encode(row[None]) for row in z.numpy()]
            sizes = [len(p) for p in payloads]
            z = torch.from_numpy(np.concatenate([codec.decode(p) for p in payloads]))
        answer = tail(z).argmax(1)
    return float((answer == reference).float().mean()), float(np.median(sizes or [0]))


def test_full_rank_projection_is_exact(model: StagedModel, activations: torch.Tensor) -> None:
    projection = fit_projection_from_activations(SPLIT, activations, keep_ratio=1.0)
    assert projection.kept == projection.channels == 192
    assert projection.explained_variance == pytest.approx(1.0, abs=1e-6)
    head, tail = reduced_split(model, projection)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(tail(head(x)), model.full()(x), atol=1e-3)


def test_held_out_frames_agree_through_the_codec(
    model: StagedModel,
    activations: torch.Tensor,
    carphone: tuple[list[np.ndarray], list[np.ndarray]],
) -> None:
    projection = fit_projection_from_activations(SPLIT, activations, keep_ratio=1.0)
    head, tail = reduced_split(model, projection)
    agreement, size = _agreement(model, head, tail, carphone[1], TensorCodec(CodecConfig(bits=8)))
    assert agreement >= 0.85
    fp32 = model.split_point(SPLIT).float32_bytes
    assert size < fp32 / 3


def test_fewer_channels_fewer_bytes(
    model: StagedModel,
    activations: torch.Tensor,
    carphone: tuple[list[np.ndarray], list[np.ndarray]],
) -> None:
    codec = TensorCodec(CodecConfig(bits=8))
    sizes = {}
    for keep in (1.0, 0.5, 0.25):
        projection = fit_projection_from_activations(SPLIT, activations, keep_ratio=keep)
        assert projection.kept == round(keep * 192)
        head, tail = reduced_split(model, projection)
        _, sizes[keep] = _agreement(model, head, tail, carphone[1], codec)
    assert sizes[1.0] > sizes[0.5] * 1.6 > sizes[0.25] * 1.6 * 1.6


def test_pca_keeps_more_variance_than_channel_selection(activations: torch.Tensor) -> None:
    pca = fit_projection_from_activations(SPLIT, activations, 0.25, "pca")
    channels = fit_projection_from_activations(SPLIT, activations, 0.25, "channels")
    assert channels.encoder.sum(1).tolist() == [1.0] * 48  # a selection of original channels
    assert pca.explained_variance > channels.explained_variance > 0.0


def test_projection_state_round_trip_and_checks(activations: torch.Tensor) -> None:
    projection = fit_projection_from_activations(SPLIT, activations, keep_ratio=0.5)
    again = TransferProjection.from_state(SPLIT, "pca", projection.state())
    assert np.array_equal(again.encoder, projection.encoder)
    assert again.kept == 96
    broken = projection.state() | {"decoder": projection.decoder[:, :10]}
    with pytest.raises(ModelError):
        TransferProjection.from_state(SPLIT, "pca", broken)
    with pytest.raises(ModelError):
        TransferProjection.from_state(SPLIT, "pca", {"mean": projection.mean})
    with pytest.raises(ModelError):
        TransferConfig(keep_ratio=0.0)


def test_projection_for_another_split_is_refused(
    model: StagedModel, activations: torch.Tensor
) -> None:
    projection = fit_projection_from_activations("blocks.7", activations, keep_ratio=1.0)
    with pytest.raises(ModelError):
        reduced_split(model, projection)


def test_fashion_pruning_keeps_channels_consistent() -> None:
    from ccied.pruning.fashion import FashionCNN, prune_transfer_channels

    torch.manual_seed(0)
    net = FashionCNN().eval()
    images = torch.randn(64, 1, 28, 28)
    pruned = prune_transfer_channels(net, 8, images)
    with torch.inference_mode():
        z = pruned.head(images)
        assert z.shape == (64, 8, 7, 7)
        assert pruned.tail(z).shape == (64, 10)
    with pytest.raises(ModelError):
        prune_transfer_channels(net, 0, images)
