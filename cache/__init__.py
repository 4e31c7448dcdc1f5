"""ccied.cache: the semantic cache of transfer-layer features (FAISS).

A leaf package: it never imports ccied.peer nor zmq.
"""

from ccied.cache.errors import BadFeatureError, CacheError, CachePersistenceError
from ccied.cache.feature import MAX_FEATURE_DIM, feature_dim, feature_from_tensor
from ccied.cache.policy import Calibration, Decision, HitRule, calibrate, decide
from ccied.cache.semantic import CacheConfig, Eviction, LookupResult, SemanticCache
from ccied.cache.store import CacheStore

__all__ = [
    "MAX_FEATURE_DIM",
    "BadFeatureError",
    "CacheConfig",
    "CacheError",
    "CachePersistenceError",
    "CacheStore",
    "Calibration",
    "Decision",
    "Eviction",
    "HitRule",
    "LookupResult",
    "SemanticCache",
    "calibrate",
    "decide",
    "feature_dim",
    "feature_from_tensor",
]
