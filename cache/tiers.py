"""``TieredCache``: one :class:`SemanticCache` per key depth, cheapest first.

A frame is looked up at the first depth (the thumbnail of its input pixels,
nearly free); only when that lookup is inconclusive (an entry inside the vote
radius but no hit) is it worth computing the next depth's key. An answered
frame is inserted at every depth whose key it has. Counters are per frame (a
frame is a hit when any depth answered it) and per depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ccied.cache.errors import BadFeatureError
from ccied.cache.keys import KeyDepth
from ccied.cache.policy import MissReason
from ccied.cache.semantic import SemanticCache


class TieredCache:
    """The caches of every key depth of one bundle, in the order they are consulted."""

    def __init__(self, tiers: Sequence[tuple[KeyDepth, SemanticCache]]) -> None:
        if not tiers:
            raise ValueError("a tiered cache needs at least one depth")
        names = [depth.name for depth, _ in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"key depths must be unique, got {names}")
        self.depths = [depth for depth, _ in tiers]
        self._caches = {depth.name: cache for depth, cache in tiers}
        self.frames = 0
        self.hits = 0
        self.hits_by_depth: dict[str, int] = dict.fromkeys(names, 0)
        self.miss_reasons: dict[str, int] = {str(r): 0 for r in MissReason}

    def cache(self, depth: str) -> SemanticCache:
        try:
            return self._caches[depth]
        except KeyError as exc:
            known = list(self._caches)
            raise BadFeatureError(f"no key depth {depth!r}; this cache has {known}") from exc

    def depth(self, name: str) -> KeyDepth:
        for depth in self.depths:
            if depth.name == name:
                return depth
        raise BadFeatureError(f"no key depth {name!r}; this cache has {list(self._caches)}")

    def note_frame(self, hit_depth: str | None, reason: str = "") -> None:
        """Count one frame: answered at ``hit_depth``, or missed for ``reason``."""
        self.frames += 1
        if hit_depth is not None:
            self.hits += 1
            self.hits_by_depth[hit_depth] = self.hits_by_depth.get(hit_depth, 0) + 1
        elif reason:
            self.miss_reasons[reason] = self.miss_reasons.get(reason, 0) + 1

    def insert(
        self,
        features: Mapping[str, np.ndarray],
        label: int,
        confidence: float,
        origin: str,
        bundle_id: str,
    ) -> dict[str, int | None]:
        """Insert one answered frame at every depth it has a key for; entry id per depth."""
        return {
            name: self.cache(name).insert(feature, label, confidence, origin, bundle_id)
            for name, feature in features.items()
        }

    def forget_origin(self, origin: str) -> int:
        return sum(cache.forget_origin(origin) for cache in self._caches.values())

    def clear(self) -> int:
        return sum(cache.clear() for cache in self._caches.values())

    def forget(self, entry_id: int, depth: str | None = None) -> bool:
        """Forget entry ``entry_id`` at ``depth`` (default: the first depth holding it)."""
        for name, cache in self._caches.items():
            if (depth is None or depth == name) and cache.forget(entry_id):
                return True
        return False

    def __len__(self) -> int:
        return max(len(cache) for cache in self._caches.values())

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()

    def stats(self) -> dict[str, Any]:
        """Per-frame counters, miss reasons, and each depth's own stats."""
        first = self._caches[self.depths[0].name]
        return {
            "entries": len(self),
            "frames": self.frames,
            "hits": self.hits,
            "misses": self.frames - self.hits,
            "hit_rate": round(self.hits / self.frames, 4) if self.frames else 0.0,
            "hits_by_depth": dict(self.hits_by_depth),
            "miss_reasons": dict(self.miss_reasons),
            "inserts": sum(c.inserts for c in self._caches.values()),
            "evictions": sum(c.evictions for c in self._caches.values()),
            "refused": sum(c.refused for c in self._caches.values()),
            "capacity": first.config.capacity,
            "persistent": any(c.stats()["persistent"] for c in self._caches.values()),
            "depths": [
                {
                    "name": depth.name,
                    "dim": depth.dim,
                    "needs_model": depth.needs_model,
                    **self._caches[depth.name].stats(),
                }
                for depth in self.depths
            ],
        }
