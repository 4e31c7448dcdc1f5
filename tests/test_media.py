"""Decoding and preprocessing of real images and video, and refusal of bad input."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from ccied.pruning import MediaError, StagedModel, bundled_clips, iter_frames, preprocess
from ccied.pruning.media import ImageTooLargeError, check_frame, image_to_rgb, load_image
from PIL import Image


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


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit colour, nor lie about a size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [100_000, 10_000])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(
    tmp_path: Path, side: int
) -> None:
    # 100000 x 100000 is past Pillow's error; 10000 x 10000 only past its
    # warning, after which it would decode 300 MB of pixels.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(side, side, 8, 2))
    assert bomb.stat().st_size < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed behind the user's back
        with pytest.raises(ImageTooLargeError) as caught:
            list(iter_frames(bomb))
    assert str(caught.value) == (
        f"{bomb}: image of {side * side} pixels is larger than {Image.MAX_IMAGE_PIXELS} "
        "pixels (refused as a possible decompression bomb)"
    )


def test_sixteen_bit_png_keeps_its_picture(tmp_path: Path, cat_pixels: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(cat_pixels).convert("L"))
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(grey16)  # 16-bit grey PNG
    with Image.open(grey16) as image:
        assert image.mode == "I;16"
    np.testing.assert_array_equal(load_image(grey16), np.repeat(grey[:, :, None], 3, axis=2))

    height, width = cat_pixels.shape[:2]
    wide = cat_pixels.astype(">u2") * 257
    rgb16 = tmp_path / "rgb16.png"
    rgb16.write_bytes(_png(width, height, 16, 2, b"".join(b"\0" + row.tobytes() for row in wide)))
    np.testing.assert_array_equal(load_image(rgb16), cat_pixels)


def test_pgm_of_sixteen_bits_is_scaled_not_clamped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=">u2")
    pgm = tmp_path / "deep.pgm"
    pgm.write_bytes(b"P5 4 1 65535\n" + values.tobytes())
    with Image.open(pgm) as image:
        assert image.mode == "I"
    assert load_image(pgm)[0, :, 0].tolist() == [0, 1, 128, 255]


def _one_row(mode: str, values: list[int]) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (_one_row("I;16", [0, 257, 65535, 1000]), [0, 1, 255, 4]),
        (Image.frombytes("I;16B", (3, 1), np.array([0, 514, 65535], ">u2").tobytes()), [0, 2, 255]),
        (
            Image.frombytes("F", (3, 1), np.array([0.0, 0.5, 1.0], np.float32).tobytes()),
            [0, 128, 255],
        ),
        # Floats or integers outside the usual range: stretched from min to max.
        (
            Image.frombytes("F", (3, 1), np.array([-1.0, 0.0, 3.0], np.float32).tobytes()),
            [0, 64, 255],
        ),
        (_one_row("I", [-100, 0, 100]), [0, 128, 255]),
    ],
)
def test_wide_grey_modes_are_scaled_to_eight_bits(image: Image.Image, expected: list[int]) -> None:
    rgb = image_to_rgb(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(expected), 3)
    assert rgb[0, :, 0].tolist() == expected
    assert (rgb == rgb[:, :, :1]).all()


def test_transparency_palette_and_cmyk_become_rgb() -> None:
    rgba = Image.frombytes("RGBA", (3, 1), bytes([0, 0, 0, 0, 10, 20, 30, 255, 0, 0, 0, 128]))
    assert image_to_rgb(rgba)[0].tolist() == [[255, 255, 255], [10, 20, 30], [127, 127, 127]]
    la = Image.frombytes("LA", (2, 1), bytes([0, 0, 50, 255]))
    assert image_to_rgb(la)[0].tolist() == [[255, 255, 255], [50, 50, 50]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 0])
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    assert image_to_rgb(palette)[0].tolist() == [[255, 255, 255], [200, 100, 0]]
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0]))
    assert image_to_rgb(cmyk)[0].tolist() == [[255, 255, 255], [255, 0, 0]]


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


def test_a_photo_stored_sideways_is_read_upright(tmp_path: Path) -> None:
    # A phone's portrait photo: pixels stored landscape, EXIF orientation 6 (rotate
    # 90 degrees clockwise to view). The model must see what the user sees.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # red down the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    upright = load_image(path)
    assert upright.shape == (60, 40, 3)
    # The stored left edge is now the top.
    assert upright[:5, :, 0].mean() > 200 and upright[-5:, :, 0].mean() < 50
