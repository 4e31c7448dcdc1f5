"""ccied.cache: the semantic cache, keyed cheapest first (thumbnail, then model stages).

A leaf package: it never imports ccied.peer nor zmq. Names are loaded on first
use, so that importing a light module (``ccied.cache.policy`` for a default)
does not load FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccied.cache.audit import DEFAULT_AUDIT_RATE, Audit, Verdict
    from ccied.cache.errors import BadFeatureError, CacheError, CachePersistenceError
    from ccied.cache.feature import MAX_FEATURE_DIM, feature_dim, feature_from_tensor
    from ccied.cache.keys import THUMBNAIL_KEY, KeyDepth, thumbnail_dim, thumbnail_feature
    from ccied.cache.policy import (
        DEFAULT_CAPACITY,
        Calibration,
        Decision,
        HitRule,
        MissReason,
        calibrate,
        decide,
        upper_bound,
    )
    from ccied.cache.semantic import CacheConfig, Eviction, LookupResult, SemanticCache
    from ccied.cache.store import CacheStore
    from ccied.cache.tiers import TieredCache

_EXPORTS = {
    "DEFAULT_AUDIT_RATE": "audit",
    "Audit": "audit",
    "Verdict": "audit",
    "BadFeatureError": "errors",
    "CacheError": "errors",
    "CachePersistenceError": "errors",
    "MAX_FEATURE_DIM": "feature",
    "feature_dim": "feature",
    "feature_from_tensor": "feature",
    "THUMBNAIL_KEY": "keys",
    "KeyDepth": "keys",
    "thumbnail_dim": "keys",
    "thumbnail_feature": "keys",
    "DEFAULT_CAPACITY": "policy",
    "Calibration": "policy",
    "Decision": "policy",
    "HitRule": "policy",
    "MissReason": "policy",
    "calibrate": "policy",
    "decide": "policy",
    "upper_bound": "policy",
    "CacheConfig": "semantic",
    "Eviction": "semantic",
    "LookupResult": "semantic",
    "SemanticCache": "semantic",
    "CacheStore": "store",
    "TieredCache": "tiers",
}

__all__ = [
    "DEFAULT_AUDIT_RATE",
    "DEFAULT_CAPACITY",
    "MAX_FEATURE_DIM",
    "THUMBNAIL_KEY",
    "Audit",
    "BadFeatureError",
    "CacheConfig",
    "CacheError",
    "CachePersistenceError",
    "CacheStore",
    "Calibration",
    "Decision",
    "Eviction",
    "HitRule",
    "KeyDepth",
    "LookupResult",
    "MissReason",
    "SemanticCache",
    "TieredCache",
    "Verdict",
    "calibrate",
    "decide",
    "feature_dim",
    "feature_from_tensor",
    "thumbnail_dim",
    "thumbnail_feature",
    "upper_bound",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccied.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ccied.cache.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
