"""Errors raised by ccied.cache: one base, third-party errors mapped at the boundary."""


class CacheError(Exception):
    """Base of every error ccied.cache raises."""


class BadFeatureError(CacheError):
    """A feature of the wrong dimension, dtype or with NaN/inf values."""


class CachePersistenceError(CacheError):
    """The cache could not write its state (full disk, permissions); the entry is not kept."""
