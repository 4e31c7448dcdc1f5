"""Hostile and unusual image files through ``ccied.Client`` and ``ccied submit``.

A picture too big for the wire is made to fit by the client, with the answer of
the full frame; a decompression bomb, a 16-bit PNG and a file that is no image
at all are each one file's business, never the run's.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from ccied.bench.cluster import PeerProcess
from ccied.peer.client import DOWNSCALED_SHORT_SIDE, MAX_SENT_SIDE, Client, fit_frame
from ccied.peer.errors import PeerUnavailableError
from ccied.peer.wire import MAX_TENSOR_BYTES, Message, MsgpackCodec, Submit
from ccied.pruning import StagedModel, media, preprocess
from PIL import Image

CCIED = [sys.executable, "-m", "ccied.peer.cli"]


def _coffee(width: int, height: int) -> np.ndarray:
    """scikit-image's espresso photo (the model is sure of it: 0.95), resized."""
    image = Image.fromarray(skimage.data.coffee())
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def test_the_client_limit_is_the_peers() -> None:
    assert MAX_SENT_SIDE == media.MAX_FRAME_SIDE
    assert MAX_SENT_SIDE * MAX_SENT_SIDE * 3 <= MAX_TENSOR_BYTES


@pytest.mark.parametrize("shape", [(1080, 1920, 3), (64, 4096, 3), (4096, 4096, 3)])
def test_a_frame_the_peer_accepts_goes_as_it_is(shape: tuple[int, int, int]) -> None:
    pixels = np.zeros(shape, np.uint8)
    assert fit_frame(pixels) is pixels


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((5000, 5000), np.uint8), np.zeros((5000, 5000, 3), np.float32)],
    ids=["grey", "float"],
)
def test_what_is_not_an_rgb_uint8_frame_is_left_for_the_peer_to_refuse(
    pixels: np.ndarray,
) -> None:
    assert fit_frame(pixels) is pixels


def test_an_oversized_frame_is_resized_to_fit_the_wire() -> None:
    pixels = _coffee(5000, 5000)
    fitted = fit_frame(pixels)
    assert fitted.dtype == np.uint8 and fitted.shape == (1080, 1080, 3)
    assert fitted.shape[0] == DOWNSCALED_SHORT_SIDE
    # Resized, not cropped: the same picture at a fifth of the size.
    small = np.asarray(Image.fromarray(pixels).resize((1080, 1080), Image.Resampling.BOX))
    assert np.abs(fitted.astype(int) - small).mean() < 1.0
    MsgpackCodec().encode(Submit(request_id="r", frame_name="big", pixels=fitted, need="latency"))


def test_a_long_side_past_the_limit_keeps_its_middle() -> None:
    rng = np.random.default_rng(0)
    panorama = rng.integers(0, 256, (300, 9001, 3), dtype=np.uint8)
    left = (9001 - MAX_SENT_SIDE) // 2
    np.testing.assert_array_equal(fit_frame(panorama), panorama[:, left : left + MAX_SENT_SIDE])
    tall = np.zeros((8000, 1100, 3), np.uint8)
    assert fit_frame(tall).shape == (MAX_SENT_SIDE, DOWNSCALED_SHORT_SIDE, 3)


def test_the_answer_for_a_fitted_frame_is_that_of_the_full_frame(
    model: StagedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "MAX_FRAME_SIDE", 10_000)  # let the full frame through
    full = model.full().eval()

    def answer(pixels: np.ndarray) -> tuple[int, float]:
        with torch.no_grad():
            probabilities = torch.softmax(full(preprocess(pixels, model.spec)), dim=-1)[0]
        return int(probabilities.argmax()), float(probabilities.max())

    for pixels in (_coffee(6000, 4000), _coffee(4000, 6000)):
        fitted = fit_frame(pixels)
        assert max(fitted.shape) <= MAX_SENT_SIDE
        (label, confidence), (fitted_label, fitted_confidence) = answer(pixels), answer(fitted)
        assert confidence >= 0.5  # a decisive frame: its answer must not change
        assert fitted_label == label and abs(fitted_confidence - confidence) < 0.03


def test_client_submit_sends_the_fitted_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Message] = []

    def exchange(request: Message, timeout_s: float | None = None) -> Message:
        sent.append(request)
        raise PeerUnavailableError("no peer in this test")

    with Client(tmp_path / "none.sock") as client:
        monkeypatch.setattr(client, "_exchange", exchange)
        with pytest.raises(PeerUnavailableError):
            client.submit(np.zeros((5000, 5000, 3), np.uint8), "big")
    (request,) = sent
    assert isinstance(request, Submit) and request.pixels.shape == (1080, 1080, 3)


def test_fitting_a_frame_keeps_the_client_light() -> None:
    code = (
        "import sys, numpy as np, ccied; from ccied.peer.client import fit_frame; "
        "assert fit_frame(np.zeros((5000, 5000, 3), np.uint8)).shape == (1080, 1080, 3); "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'torch', 'faiss', 'zeroconf', 'av'})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def _bomb_png(side: int) -> bytes:
    """65 bytes of PNG whose header claims side x side RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_submit_answers_the_good_files_and_names_the_bad_ones(
    lone_peer: PeerProcess, cat_png: Path, cat_pixels: np.ndarray, tmp_path: Path
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(100_000))
    huge = tmp_path / "huge.jpg"
    Image.fromarray(_coffee(5000, 5000)).save(huge, quality=95)  # 75 MB as RGB: over the wire
    grey = np.asarray(Image.fromarray(cat_pixels).convert("L"))
    grey16, grey8 = tmp_path / "grey16.png", tmp_path / "grey8.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(grey16)
    Image.fromarray(grey).save(grey8)
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is not an image, nor a video\n" * 10)
    files = [bomb, huge, grey16, grey8, junk, cat_png]
    done = subprocess.run(
        [*CCIED, "submit", "--socket", str(lone_peer.socket_path), "--json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr  # two files failed, the run went on
    lines = {line["frame"]: line for line in map(json.loads, done.stdout.splitlines())}
    assert list(lines) == [str(bomb), "huge.jpg", "grey16.png", "grey8.png", str(junk), "cat.png"]
    assert lines[str(bomb)]["error"].startswith("image of 10000000000 pixels is larger than ")
    assert "not a readable image or video" in lines[str(junk)]["error"]
    for name in ("huge.jpg", "grey16.png", "grey8.png", "cat.png"):
        assert "error" not in lines[name] and lines[name]["served_by"] == "solo", lines[name]
    assert lines["huge.jpg"]["class_name"] == "espresso"
    assert lines["grey16.png"]["label"] == lines["grey8.png"]["label"]  # not a white "nematode"

    # Without --json, each bad file is one line on stderr, its name said once.
    done = subprocess.run(
        [*CCIED, "submit", "--socket", str(lone_peer.socket_path), str(bomb), str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stdout == ""
    first, second = done.stderr.splitlines()
    assert first == (
        f"ccied submit: {bomb}: image of 10000000000 pixels is larger than "
        f"{Image.MAX_IMAGE_PIXELS} pixels (refused as a possible decompression bomb)"
    )
    assert second.startswith(f"ccied submit: {junk}: not a readable image or video (")
