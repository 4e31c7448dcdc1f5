"""Decoding and preprocessing of real images and video, and refusal of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ccied.pruning import MediaError, StagedModel, bundled_clips, iter_frames, preprocess
from ccied.pruning.media import check_frame


def test_bundled_clips_are_found_and_decode() -> None:
    clips = bundled_clips()
    assert [c.name for c in clips] == ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]
    frames = list(iter_frames(clips[1], every=40))
    assert [f.name for f in frames] == [f"carphone_pristine.mp4#{i}" for i in (0, 40, 80)]
    assert all(f.pixels.dtype == np.uint8 and f.pixels.shape[2] == 3 for f in frames)


def test_limit_stops_a_video_early() -> None:
    assert len(list(iter_frames(bundled_clips()[0], every=1, limit=3))) == 3


def test_image_file_is_one_frame(cat_png: Path, cat_pixels: np.ndarray) -> None:
    (frame,) = iter_frames(cat_png)
    assert frame.name == "cat.png"
    np.testing.assert_array_equal(frame.pixels, cat_pixels)


def test_a_file_that_is_not_an_image_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image, nor a video\n" * 10)
    with pytest.raises(MediaError, match="not a readable image or video"):
        list(iter_frames(bogus))
    with pytest.raises(MediaError, match="no such file"):
        list(iter_frames(tmp_path / "missing.jpg"))


def test_preprocess_gives_a_normalised_square_input(
    model: StagedModel, cat_pixels: np.ndarray
) -> None:
    x = preprocess(cat_pixels, model.spec)
    assert tuple(x.shape) == (1, 3, 224, 224)
    assert float(x.min()) >= -1.01 and float(x.max()) <= 1.01


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), "dtype must be uint8"),
        (np.zeros((32, 32), np.uint8), "shape must be"),
        (np.zeros((32, 32, 4), np.uint8), "shape must be"),
        (np.zeros((4, 32, 3), np.uint8), "outside"),
        (np.zeros((5000, 32, 3), np.uint8), "outside"),
    ],
)
def test_bad_frames_are_refused(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        check_frame(pixels)
