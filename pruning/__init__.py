"""ccied.pruning: models, head/tail split, preprocessing, pruning, codec, bundles.

A leaf package: it never imports ccied.peer nor zmq. Names are loaded on first
use, so that reading frames (``ccied.pruning.media``) or a default
(``ccied.pruning.defaults``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccied.pruning.defaults import (
        DEFAULT_CACHE_SPLIT,
        DEFAULT_FIDELITY_FLOOR,
        DEFAULT_MODEL,
        DEFAULT_SPLIT,
    )
    from ccied.pruning.errors import CodecError, MediaError, ModelError, PruningError
    from ccied.pruning.media import Frame, bundled_clips, find_clip, iter_frames, preprocess
    from ccied.pruning.models import ModelSpec, SplitPoint, StagedModel, load_model

_EXPORTS = {
    "DEFAULT_CACHE_SPLIT": "defaults",
    "DEFAULT_FIDELITY_FLOOR": "defaults",
    "DEFAULT_MODEL": "defaults",
    "DEFAULT_SPLIT": "defaults",
    "CodecError": "errors",
    "MediaError": "errors",
    "ModelError": "errors",
    "PruningError": "errors",
    "Frame": "media",
    "bundled_clips": "media",
    "find_clip": "media",
    "iter_frames": "media",
    "preprocess": "media",
    "ModelSpec": "models",
    "SplitPoint": "models",
    "StagedModel": "models",
    "load_model": "models",
}

__all__ = [
    "DEFAULT_CACHE_SPLIT",
    "DEFAULT_FIDELITY_FLOOR",
    "DEFAULT_MODEL",
    "DEFAULT_SPLIT",
    "CodecError",
    "Frame",
    "MediaError",
    "ModelError",
    "ModelSpec",
    "PruningError",
    "SplitPoint",
    "StagedModel",
    "bundled_clips",
    "find_clip",
    "iter_frames",
    "load_model",
    "preprocess",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccied.pruning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ccied.pruning.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
