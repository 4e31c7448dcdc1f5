"""ccied.cache: the semantic cache, keyed cheapest first (thumbnail, then model stages).

A leaf package: it never imports ccied.peer nor zmq.
"""

from ccied.cache.audit import DEFAULT_AUDIT_RATE, Audit, Verdict
from ccied.cache.errors import BadFeatureError, CacheError, CachePersistenceError
from ccied.cache.feature import MAX_FEATURE_DIM, feature_dim, feature_from_tensor
from ccied.cache.keys import THUMBNAIL_KEY, KeyDepth, thumbnail_dim, thumbnail_feature
from ccied.cache.policy import (
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

__all__ = [
    "DEFAULT_AUDIT_RATE",
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
