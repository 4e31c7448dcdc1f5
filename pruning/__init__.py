"""ccied.pruning: models, head/tail split, preprocessing (and later pruning, codec, bundles).

A leaf package: it never imports ccied.peer nor zmq.
"""

from ccied.pruning.errors import CodecError, MediaError, ModelError, PruningError
from ccied.pruning.media import Frame, bundled_clips, find_clip, iter_frames, preprocess
from ccied.pruning.models import (
    DEFAULT_MODEL,
    DEFAULT_SPLIT,
    ModelSpec,
    SplitPoint,
    StagedModel,
    load_model,
)

__all__ = [
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
