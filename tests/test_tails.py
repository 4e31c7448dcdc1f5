"""Batched tails on the real EfficientNet-Lite0: the same answers as one at a time,
a bad payload failing alone, and the --device option (peer/worker.py, peer/tails.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.peer.batching import BatchConfig
from ccied.peer.cli import main
from ccied.peer.device import check_device, resolve_device
from ccied.peer.errors import PeerError
from ccied.peer.tails import TailService
from ccied.peer.worker import BadTensorError, ModelWorker, Prediction
from ccied.pruning.bundle import builtin_bundle

VARIANT = "blocks.11-b6"  # the default: a codec payload


@pytest.fixture(scope="module")
def worker() -> Iterator[ModelWorker]:
    worker = ModelWorker(builtin_bundle())
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def frames(bikes_frames: list[np.ndarray], cat_pixels: np.ndarray) -> list[np.ndarray]:
    return [cat_pixels, *bikes_frames]


def _payloads(worker: ModelWorker, frames: list[np.ndarray], variant: str) -> list[np.ndarray]:
    async def heads() -> list[np.ndarray]:
        out = []
        for pixels in frames:
            head = await worker.head(pixels, variant, with_cache=False)
            assert head.payload is not None
            out.append(head.payload)
        return out

    return asyncio.run(heads())


@pytest.mark.parametrize("variant", [VARIANT, "blocks.11-raw", "jpeg-q90"])
def test_a_batch_answers_as_each_frame_alone(
    worker: ModelWorker, frames: list[np.ndarray], variant: str
) -> None:
    """BatchNorm in eval mode and no cross-frame state: batching changes no answer."""
    encoding = worker.variants[variant].encoding
    payloads = _payloads(worker, frames, variant)

    async def scenario() -> tuple[list[Prediction], list[Prediction | BadTensorError]]:
        alone = [await worker.tail(variant, p, encoding) for p in payloads]
        together = await worker.tail_batch(variant, [(p, encoding) for p in payloads])
        return alone, together

    alone, together = asyncio.run(scenario())
    assert len(together) == len(frames) >= 5
    for single, batched in zip(alone, together, strict=True):
        assert isinstance(batched, Prediction)
        assert batched.label == single.label
        assert batched.confidence == pytest.approx(single.confidence, abs=1e-4)


def test_an_undecodable_payload_fails_alone_in_its_batch(
    worker: ModelWorker, frames: list[np.ndarray]
) -> None:
    payloads = _payloads(worker, frames[:3], VARIANT)
    garbage = np.frombuffer(b"\x00" * 64, np.uint8)
    batch = [
        (payloads[0], "codec"),
        (garbage, "codec"),
        (payloads[1], "raw"),
        (payloads[2], "codec"),
    ]

    async def scenario() -> list[Prediction | BadTensorError]:
        return await worker.tail_batch(VARIANT, batch)

    first, bad, wrong_encoding, last = asyncio.run(scenario())
    assert isinstance(bad, BadTensorError) and "undecodable" in str(bad)
    assert isinstance(wrong_encoding, BadTensorError)
    assert isinstance(first, Prediction) and isinstance(last, Prediction)


def test_the_tail_service_batches_concurrent_tensors(
    worker: ModelWorker, frames: list[np.ndarray]
) -> None:
    payloads = _payloads(worker, frames, VARIANT)

    async def scenario() -> tuple[list[int], list[int], dict[str, object]]:
        alone = [(await worker.tail(VARIANT, p, "codec")).label for p in payloads]
        service = TailService(worker, BatchConfig(window_ms=200, max_batch=32))
        answers = await asyncio.gather(
            *(service.run(VARIANT, p, "codec", deadline_ms=10_000) for p in payloads)
        )
        return alone, [a.label for a in answers], service.status()

    alone, batched, status = asyncio.run(scenario())
    assert batched == alone
    assert status["batch_sizes"] == {str(len(payloads)): 1}
    assert status["enabled"] is True and status["queued"] == 0


def test_a_payload_of_the_wrong_shape_is_refused_before_it_queues(worker: ModelWorker) -> None:
    async def scenario() -> dict[str, object]:
        service = TailService(worker, BatchConfig(window_ms=200))
        with pytest.raises(BadTensorError, match="shape"):
            await service.run("blocks.11-raw", np.zeros((1, 4, 2, 2), np.float32), "raw")
        return service.status()

    assert asyncio.run(scenario())["batches"] == 0


def test_device_option() -> None:
    assert resolve_device("cpu") == "cpu"
    cuda = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda:0" if cuda else "cpu")
    for bad in ("gpu", "cuda:", "CPU", "cuda:0:1"):
        with pytest.raises(PeerError, match="auto, cpu, cuda"):
            check_device(bad)
    if not cuda:
        with pytest.raises(PeerError, match="sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--max-batch", "0"], "max_batch (--max-batch) must be at least 1, got 0"),
        (["--batch-window-ms", "-1"], "batch_window_ms (--batch-window-ms) must be at least 0"),
        (["--device", "tpu"], "device (--device) must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_impossible_batching_or_device_options_are_one_line_errors(
    option: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["peer", "--listen", "none", "--socket", "none", "--state-dir", str(tmp_path), *option]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["peer", "--listen", "none", "--socket", "none", "--state-dir", str(tmp_path)]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sees no CUDA device" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before any key was made


def test_plain_status_shows_the_device_the_batches_and_a_neighbours_device() -> None:
    from ccied.peer.status_view import render

    fixture = Path(__file__).parent / "data" / "status-edge.json"
    status = json.loads(fixture.read_text())
    status["device"], status["device_name"] = "cpu", "cpu"
    status["batching"] = {
        **{"enabled": True, "window_ms": 2.0, "max_batch": 32, "batches": 3},
        **{"mean_batch": 5.0, "expired": 1, "batch_sizes": {"1": 1, "7": 2}},
    }
    status["neighbours"][0]["device"] = "cuda:0"
    text = render(status)
    [line] = [line for line in text.splitlines() if line.startswith("device")]
    assert "cpu  batching: window 2 ms, max 32; 3 batches, mean 5.00, expired 1" in line
    assert "sizes 1: 1, 7: 2" in line
    assert f"{status['neighbours'][0]['role']} (cuda:0)" in text
    status["batching"] = {"enabled": False}
    assert "device   cpu  batching off" in render(status)
