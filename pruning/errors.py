"""Errors raised by ccied.pruning: one base, mapped from third-party errors at the boundary."""


class PruningError(Exception):
    """Base of every error ccied.pruning raises."""


class ModelError(PruningError):
    """A model cannot be built, found or split as asked."""


class MediaError(PruningError):
    """A file or frame cannot be read as an image or video."""


class CodecError(PruningError):
    """A tensor cannot be encoded, or a payload is not a valid encoded tensor."""
