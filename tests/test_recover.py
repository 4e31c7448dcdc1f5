"""A transfer layer recovered by distillation, on the real model and a real clip (tiny settings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.bench.recovery import _recovered_variant as stream_variant
from ccied.pruning import StagedModel, find_clip, iter_frames
from ccied.pruning.bundle import load_bundle, variant_name
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.errors import CodecError, ModelError
from ccied.pruning.recover import (
    METHOD,
    Bottleneck,
    DistillationSet,
    RecoveryConfig,
    codec_quantize,
    distillation_set,
    measure,
    recover,
    write_recovered_bundle,
)
from ccied.pruning.transfer import TransferProjection, reduced_split

# blocks.14: the shortest tail of the 192-channel splits, so a training step is cheap.
SPLIT = "blocks.14"


@pytest.fixture(scope="module")
def sets(model: StagedModel) -> tuple[DistillationSet, DistillationSet]:
    """Every 6th carphone frame: the first 12 (and 2 augmented copies each) train, 8 held out."""
    frames = [f.pixels for f in iter_frames(find_clip("carphone_pristine.mp4"), every=6)]
    train = distillation_set(model, SPLIT, frames[:12], augmentations=2)
    held = distillation_set(model, SPLIT, frames[12:], augmentations=0)
    return train, held


def test_distillation_reduces_loss_and_beats_pca_on_held_out(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet]
) -> None:
    train, held = sets
    config = RecoveryConfig(split=SPLIT, channels=8, bits=4, steps=40, batch_size=16)
    result = recover(model, train, config, progress=False)
    assert result.projection.method == METHOD
    assert result.projection.kept == 8
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    untrained = recover(model, train, RecoveryConfig(split=SPLIT, channels=8, steps=0), False)
    before = measure(model, untrained.projection, held, config.codec)
    after = measure(model, result.projection, held, config.codec)
    # Held-out frames: the unpruned model's answers are closer after training.
    assert after.kl_divergence < before.kl_divergence
    assert after.agreement_all >= before.agreement_all
    # 8 of 192 channels at 4 bits: far under the float32 tensor.
    assert after.bytes_per_frame < after.float32_bytes / 24
    assert after.ratio_float32 > 24


def test_recovered_layer_is_a_projection_a_bundle_stores(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet]
) -> None:
    train, held = sets
    config = RecoveryConfig(split=SPLIT, channels=8, steps=3, batch_size=8)
    projection = recover(model, train, config, progress=False).projection
    restored = TransferProjection.from_state(SPLIT, METHOD, projection.state())
    head, tail = reduced_split(model, restored)
    y = held.activations[:2]
    with torch.inference_mode():
        # head[-1] is the encoder convolution the peer appends to the model's head.
        through_convs = tail(head[-1](y))
        through_bottleneck = model.split(SPLIT)[1](Bottleneck(projection)(y))
    torch.testing.assert_close(through_convs, through_bottleneck, rtol=1e-4, atol=1e-4)


def test_full_codec_measurement_counts_decisive_frames(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet]
) -> None:
    _, held = sets
    m = measure(model, None, held, CodecConfig(bits=8))
    assert m.frames == 8
    assert 0 <= m.decisive_frames <= m.frames
    assert m.agreement_all == pytest.approx(1.0)
    assert m.kl_divergence < 1e-2


def test_divergence_names_the_setting(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet]
) -> None:
    train, _ = sets
    config = RecoveryConfig(split=SPLIT, channels=8, steps=20, batch_size=8, learning_rate=1e4)
    with pytest.raises(ModelError, match="--learning-rate"):
        recover(model, train, config, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"bits": 3}, CodecError), ({"channels": 0}, ModelError), ({"temperature": 0.0}, ModelError)],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        RecoveryConfig(**kwargs)  # type: ignore[arg-type]


def test_split_mismatch_is_refused(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet]
) -> None:
    train, _ = sets
    with pytest.raises(ModelError, match="distillation set"):
        recover(model, train, RecoveryConfig(split="blocks.11", steps=1), progress=False)


@pytest.mark.parametrize(("bits", "clip_sigma"), [(2, 0.0), (4, 0.0), (4, 3.0), (6, 0.0)])
def test_training_quantizer_matches_the_codec(bits: int, clip_sigma: float) -> None:
    generator = torch.Generator().manual_seed(bits)
    z = torch.randn(1, 16, 7, 7, generator=generator) * torch.linspace(0.1, 5.0, 16)[:, None, None]
    config = CodecConfig(bits=bits, clip_sigma=clip_sigma)
    decoded = TensorCodec(config).decode(TensorCodec(config).encode(z.numpy()))
    step = (z.amax((2, 3)) - z.amin((2, 3))).max() / ((1 << bits) - 1)
    diff = (codec_quantize(z, config) - torch.from_numpy(decoded)).abs()
    # Equal up to the codec's float16 scales and offsets, which move a rare value
    # across a rounding boundary: never more than one step, almost always far less.
    assert float(diff.max()) <= 1.01 * float(step)
    assert float((diff > 0.05 * step).float().mean()) < 0.02
    z.requires_grad_(True)
    codec_quantize(z, config).sum().backward()  # type: ignore[no-untyped-call]
    assert z.grad is not None and bool((z.grad == 1).all())  # straight through


def test_a_recovered_bundle_is_served_through_the_projection_path(
    model: StagedModel, sets: tuple[DistillationSet, DistillationSet], tmp_path: Path
) -> None:
    from ccied.peer.payloads import variant_runtime

    train, held = sets
    config = RecoveryConfig(split=SPLIT, channels=8, bits=4, steps=3, batch_size=8)
    projection = recover(model, train, config, progress=False).projection
    measured = measure(model, projection, held, config.codec)
    bundle_id = write_recovered_bundle(tmp_path, model, [(projection, 4, measured)])
    bundle = load_bundle(tmp_path)
    assert bundle.bundle_id == bundle_id
    name = variant_name(SPLIT, 8 / projection.channels, 4, recovered=True)
    assert name.endswith(f"-b4-{METHOD}")
    variant = bundle.variant(name)
    assert variant.agreement == measured.agreement_all
    # The planner reads both agreements from the manifest (none decisive: unmeasured).
    expected = measured.agreement_decisive if measured.decisive_frames else None
    assert variant.agreement_decisive == expected
    assert bundle.figures["recovered"][variant.name]["agreement_decisive"] == (
        measured.agreement_decisive
    )
    # `bench recovery --stream` sends the bundled clips' held-out frames: it refuses a
    # bundle not prepared on them, in one line.
    with pytest.raises(ModelError, match="--stream sends the bundled clips"):
        stream_variant(bundle)
    stored = bundle.projections[variant.name]
    assert stored.method == METHOD
    np.testing.assert_array_equal(stored.encoder, projection.encoder)
    # The peer's runtime: encoder conv, the codec, decoder conv, the model's tail.
    runtime = variant_runtime(bundle, variant, torch.device("cpu"))
    assert runtime.encode is not None and runtime.decode is not None
    assert runtime.codec is not None and runtime.wire_shape[1] == 8
    y = held.activations[:1]
    with torch.inference_mode():
        payload = runtime.codec.encode(runtime.encode(y).numpy())
        logits = model.split(SPLIT)[1](
            runtime.decode(torch.from_numpy(runtime.codec.decode(payload)))
        )
        trained = model.split(SPLIT)[1](Bottleneck(projection)(y, config.codec))
    assert len(payload) < 37_632 / 24  # the float32 tensor at blocks.14 is 37,632 bytes
    # What the peer computes is what recovery trained and measured.
    assert int(logits.argmax()) == int(trained.argmax())
    # Another recovered layer is another bundle: peers on the two never mix tensors.
    other = TransferProjection.from_state(
        SPLIT, METHOD, {**projection.state(), "decoder": projection.decoder * 1.01}
    )
    assert write_recovered_bundle(tmp_path / "b", model, [(other, 4, measured)]) != bundle_id
    (tmp_path / f"projection-{variant.name}.npz").write_bytes(
        (tmp_path / "b" / f"projection-{variant.name}.npz").read_bytes()
    )
    with pytest.raises(ModelError):
        load_bundle(tmp_path)


def test_training_and_held_out_frames_are_kept_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    import ccied.pruning.recover as recover_module

    # The photos held out are a stream no training frame comes from.
    assert not set(recover_module.TRAIN_PHOTOS) & set(recover_module.HELD_OUT_PHOTOS)
    clip = find_clip("carphone_pristine.mp4")
    monkeypatch.setattr(recover_module, "bundled_clips", lambda: [clip])
    monkeypatch.setattr(recover_module, "TRAIN_PHOTOS", ("coffee",))
    monkeypatch.setattr(recover_module, "HELD_OUT_PHOTOS", ("chelsea",))
    frames = recover_module.recovery_frames(every=6, photo_views=2, train_every=2)
    clip_frames = [f.pixels for f in iter_frames(clip, every=6)]
    cut = int(recover_module.TRAIN_FRACTION * len(clip_frames))
    # The clip splits in time: training frames come first, the held-out ones later.
    assert len(frames.held_out) == len(clip_frames) - cut
    assert np.array_equal(frames.held_out[0], clip_frames[cut])
    assert len(frames.train) == len(clip_frames[:cut:2]) + 2  # and two views of one photo
    assert len(frames.held_out_photos) == 2
    held = frames.held_out + frames.held_out_photos
    assert not any(t.shape == h.shape and np.array_equal(t, h) for t in frames.train for h in held)


def test_augmentation_keeps_any_normalisation_in_its_pixel_range() -> None:
    # A model from a file normalises with its own mean and std (Fashion-MNIST's
    # example: 0.286, 0.353): augmented inputs stay what some [0, 1] pixels give.
    from ccied.pruning.models import ModelSpec
    from ccied.pruning.recover import augmenter_for

    mean, std = (0.286,) * 3, (0.353,) * 3
    spec = ModelSpec("m", 28, mean, std, ("a", "b"), "0" * 64)
    pixels = torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    inputs = (pixels - 0.286) / 0.353
    out = augmenter_for(spec)(inputs, torch.Generator().manual_seed(1))
    assert out.shape == inputs.shape
    low, high = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    assert float(out.min()) >= low - 1e-5 and float(out.max()) <= high + 1e-5
    # Bright pixels survive: a clamp at the [-1, 1] of EfficientNet's normalisation
    # (the old augmentation) would have cut every value above 1.0 here.
    assert float(out.max()) > 1.5
