"""The cache key: a compact, L2-normalised feature of the transfer-layer tensor.

Measured on the 502 frames of the three bundled clips at the default split
(``blocks.11``, 192 x 7 x 7): each frame looked up among the earlier frames of
its clip, neighbours' labels compared with the full model's label. At equal
hit rate, global average pooling concatenated with global max pooling (384-d)
gave the best fidelity (0.93 at a 20% hit rate, against 0.92 for average
pooling alone, 0.87 for signed-sqrt pooling and 0.95 for a 2x2 grid, which is
768-d and over our 512-d budget; mean-centred features were far worse, 0.74).
Max pooling keeps the strongest local evidence of an object that average
pooling dilutes. The reduction costs microseconds next to the head's
milliseconds and works for any (1, C, H, W) tensor, pruned or not.
"""

from __future__ import annotations

import numpy as np
from ccied.cache.errors import BadFeatureError

MAX_FEATURE_DIM = 512


def feature_dim(channels: int) -> int:
    """Dimension of the feature of a tensor with ``channels`` channels (at most 512)."""
    return min(2 * channels, MAX_FEATURE_DIM)


def _fold(values: np.ndarray, size: int) -> np.ndarray:
    """Average consecutive channels down to ``size`` values (wide tensors only)."""
    if len(values) <= size:
        return values
    return np.array([chunk.mean() for chunk in np.array_split(values, size)], dtype=np.float32)


def feature_from_tensor(tensor: np.ndarray) -> np.ndarray:
    """(1, C, H, W) float tensor -> L2-normalised float32 vector (avg ++ max pooling).

    Tensors wider than 256 channels have their pooled values averaged over
    groups of channels so the feature stays within 512 dimensions.
    """
    if tensor.ndim != 4 or tensor.shape[0] != 1:
        raise BadFeatureError(f"expected a (1, C, H, W) tensor, got shape {tensor.shape}")
    flat = tensor[0].reshape(tensor.shape[1], -1).astype(np.float32, copy=False)
    half = MAX_FEATURE_DIM // 2
    vector = np.concatenate([_fold(flat.mean(axis=1), half), _fold(flat.max(axis=1), half)])
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise BadFeatureError("tensor gives a zero or non-finite feature")
    return (vector / norm).astype(np.float32)
