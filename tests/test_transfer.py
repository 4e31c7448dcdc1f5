"""Transfer-layer reduction on the real model and real frames; Fashion-MNIST pruning."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def _parse(*argv: str) -> argparse.Namespace:
    from ccied.bench.transfer import add_arguments

    parser = argparse.ArgumentParser(prog="ccied bench transfer")
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--recovery-points", "96x3"), "bits must be one of 2, 4, 6, 8, got 3"),
        (("--recovery-points", "0x2"), "channels must be >= 1, got 0"),
        (("--recovery-points", "96"), "expected KxBITS such as 96x2"),
        (("--recovery-points", "ax2"), "expected KxBITS such as 96x2"),
        (("--keep-ratios", "0.5", "1.5"), "--keep-ratios: must be in (0, 1], got 1.5"),
        (("--keep-ratios", "0"), "--keep-ratios: must be in (0, 1], got 0"),
        (("--recovery-steps", "0"), "--recovery-steps: must be at least 1, got 0"),
        (("--every", "x"), "--every: not an integer"),
        (("--recovery-points", "96x2", "1x9"), "--recovery-points: bits must be one of"),
    ],
)
def test_bench_transfer_rejects_malformed_options(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert message in errors[0]


def test_bench_transfer_recovery_settings() -> None:
    from ccied.bench.transfer import (
        QUICK_RECOVERY_STEPS,
        RECOVERY_POINTS,
        _settings,
    )

    assert _settings(_parse("--quick")).recovery_points == ((96, 2),)
    assert _settings(_parse("--quick")).recovery_steps == QUICK_RECOVERY_STEPS
    assert _settings(_parse()).recovery_points == RECOVERY_POINTS
    assert _settings(_parse("--no-recovery")).recovery_points == ()
    chosen = _settings(_parse("--recovery-points", "64X2", "32x8", "--recovery-steps", "7"))
    assert chosen.recovery_points == ((64, 2), (32, 8))
    assert chosen.recovery_steps == 7


def test_bench_transfer_refuses_more_channels_than_the_split_has(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ccied.bench.transfer import run

    assert run(_parse("--recovery-points", "200x2", "--no-fashion")) == 2
    assert "blocks.11 has 192 channels" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_bench_transfer_skips_fashion_without_the_data(
    broken: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ccied.bench import transfer
    from ccied.pruning import fashion

    if broken == "corrupt":
        for name in fashion._FILES.values():
            (tmp_path / name).write_bytes(b"not gzip")
    monkeypatch.setattr(fashion, "DEFAULT_FASHION_DIR", tmp_path)
    assert transfer._fashion(quick=True) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bench transfer: Fashion-MNIST skipped:")
    assert str(tmp_path) in lines[0]


def test_bench_transfer_table_and_plot_with_recovered_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recovered rows carry no timings; the targets print met or MISSED; the plot draws."""
    from ccied.bench.transfer import _plot, _print_table, _targets

    common = {
        "split": "blocks.11",
        "quantizer": "minmax",
        "fp32_bytes": 37632,
        "agreement_per_clip": {"bikes": 0.9},
        "decisive_frames": 10,
        "frames": 20,
    }
    operating = common | {
        "keep_ratio": 1.0,
        "method": "pca",
        "channels": 192,
        "bits": 6,
        "bytes_per_frame": 7850.0,
        "ratio_fp32": 4.8,
        "ratio_jpeg": 0.58,
        "agreement": 1.0,
        "agreement_all": 1.0,
        "agreement_decisive": 1.0,
        "head_ms": 5.0,
        "tail_ms": 2.0,
        "encode_ms": 0.2,
        "decode_ms": 0.1,
    }
    recovered = common | {
        "keep_ratio": 0.5,
        "method": "recovered",
        "channels": 96,
        "bits": 2,
        "bytes_per_frame": 1440.0,
        "ratio_fp32": 26.1,
        "ratio_jpeg": 0.11,
        "agreement": 0.7,
        "agreement_all": 0.7,
        "agreement_decisive": 1.0,
        "train_s": 120.0,
        "start_agreement_all": 0.65,
        "start_agreement_decisive": 0.9,
    }
    targets = _targets(recovered)
    assert {key: t["met"] for key, t in targets.items()} == {
        "ratio_fp32": True,
        "ratio_jpeg": True,
        "agreement_decisive": True,
        "agreement_all": False,
    }
    result = {
        "jpeg_q90_bytes": 13600.0,
        "frames": {"held_out": 20},
        "variants": [operating, recovered],
        "operating_point": operating,
        "recovered_point": recovered,
        "targets": targets,
        "total_s": 1.0,
    }
    _print_table(result)
    out = capsys.readouterr().out
    assert "trained 120 s from 0.650/0.900" in out
    assert "target agreement_all >= 0.95: 0.700 MISSED" in out
    assert "target ratio_fp32 >= 24: 26.100 met" in out
    _plot(result, tmp_path / "transfer.png")
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
