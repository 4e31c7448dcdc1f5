"""Cache keys, cheapest first: a thumbnail of the input pixels, then model-stage features.

A key *depth* (a :class:`KeyDepth`) names where the key is taken: ``thumb16``
(before any model stage) or a split point of the model (``blocks.4``). Each
depth has its own index and its own calibrated rule; a frame is looked up at
the cheapest depth first and goes deeper only when that lookup is
inconclusive (see :func:`ccied.cache.policy.inconclusive`).

Why a thumbnail: measured offline on the bundled clips and on pans over real
photos with a shifted, 6% brighter second pass (DESIGN.md, 2026-11-30), with
only decisive entries allowed to answer, every key depth from a 16x16
thumbnail to ``blocks.15`` reached the same second-pass hit rate (0.42-0.45,
the share of decisive frames) at 0.99-1.00 agreement. A deep key buys little
and costs most of the model; the thumbnail costs microseconds.

The thumbnail is the region of the frame the model sees, box-averaged to
16x16 RGB (768 values; :func:`ccied.pruning.media.thumbnail`), minus its
global mean, L2-normalised: removing the mean and the scale
makes it blind to a uniform brightness change, while the colours keep their
relative values (a per-channel mean would erase a red object on grey).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ccied.cache.errors import BadFeatureError

THUMBNAIL_SIDE = 16
THUMBNAIL_KEY = f"thumb{THUMBNAIL_SIDE}"
# A thumbnail whose pixels vary less than this (on 0..1 values, RMS) is a flat
# frame (black, a lens cap, a test card): no key, a miss, never an error.
MIN_THUMBNAIL_CONTRAST = 1e-3


@dataclass(frozen=True)
class KeyDepth:
    """One depth of the cache key: its name, feature dimension and where it is taken.

    ``stage_index`` is -1 for the thumbnail (no model stage needed), else the
    index of the model stage whose output is pooled into the key.
    """

    name: str
    dim: int
    stage_index: int

    @property
    def needs_model(self) -> bool:
        return self.stage_index >= 0


def thumbnail_dim(side: int = THUMBNAIL_SIDE) -> int:
    return side * side * 3


def thumbnail_feature(crop: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """(S, S, 3) uint8 crop or thumbnail -> L2-normalised float32 vector of ``side**2 * 3``.

    A ``side`` x ``side`` thumbnail is used as it is; a larger crop is
    block-averaged first (a reshape and a mean when ``side`` divides S).
    Raises BadFeatureError for a flat frame or a crop of the wrong shape.
    """
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] != crop.shape[1]:
        raise BadFeatureError(f"expected an (S, S, 3) crop, got shape {crop.shape}")
    size = crop.shape[0]
    if size < side:
        raise BadFeatureError(f"crop of {size} pixels is smaller than the {side}-pixel thumbnail")
    pixels = crop.astype(np.float32) / 255.0
    if size % side:
        edges = np.linspace(0, size, side + 1).round().astype(int)
        pixels = np.add.reduceat(np.add.reduceat(pixels, edges[:-1], axis=0), edges[:-1], axis=1)
        counts = np.diff(edges)
        thumb = pixels / (counts[:, None, None] * counts[None, :, None])
    else:
        block = size // side
        thumb = pixels.reshape(side, block, side, block, 3).mean(axis=(1, 3))
    centred = thumb.reshape(-1) - thumb.mean()
    norm = float(np.linalg.norm(centred))
    if not np.isfinite(norm) or norm / np.sqrt(centred.size) < MIN_THUMBNAIL_CONTRAST:
        raise BadFeatureError("flat frame: no thumbnail key")
    key: np.ndarray = (centred / norm).astype(np.float32)
    return key
