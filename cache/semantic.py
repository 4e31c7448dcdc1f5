"""``SemanticCache``: FAISS lookup of transfer-layer features answered before.

Each entry holds a feature (see :mod:`ccied.cache.feature`), the label and
confidence of the model that answered it, the peer it came from, its bundle
id, when it was made and how often it answered since. ``lookup`` applies the
hit rule of :mod:`ccied.cache.policy` to the k nearest entries.

The index is an exact flat L2 index while the cache is small; past
``ivf_min_entries`` an IVF index is trained on a background thread from a
copy of the vectors and swapped in, with the changes made meanwhile replayed,
so lookups never wait for training. Capacity is bounded: a full cache evicts a
batch of entries by LRU (default; ``bench cache`` compares it with LFU).

Thread safety: any number of concurrent lookups, writers exclusive (a
readers-writer lock); hit counters and recency have their own small lock.

Persistence is optional (a :class:`ccied.cache.CacheStore`). A store whose
folder cannot be written (read-only, see ``CacheStore.unwritable``) makes the
cache memory-only from the start: it serves what the folder held, keeps new
entries in memory, and writes nothing, not even at ``close()``. Given
``on_memory_only``, a write that fails later (a full disk) does the same
instead of refusing the entry; the callback is told why, once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import faiss
import numpy as np
from ccied.cache.errors import BadFeatureError, CachePersistenceError
from ccied.cache.policy import DEFAULT_CAPACITY, HitRule, decide
from ccied.cache.store import CacheStore, StoredEntry

log = logging.getLogger(__name__)

DEFAULT_IVF_MIN_ENTRIES = 20_000
DEFAULT_NPROBE = 8
DEFAULT_SNAPSHOT_EVERY = 2_000  # log records between snapshots
# Features are L2-normalised; one off by more than this was not made by us.
NORM_TOLERANCE = 1e-2


class Eviction(StrEnum):
    LRU = "lru"
    LFU = "lfu"


@dataclass(frozen=True)
class CacheConfig:
    dim: int
    bundle_id: str
    capacity: int = DEFAULT_CAPACITY
    rule: HitRule = field(default_factory=HitRule)
    eviction: Eviction = Eviction.LRU
    ivf_min_entries: int = DEFAULT_IVF_MIN_ENTRIES
    nprobe: int = DEFAULT_NPROBE
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    background_rebuild: bool = True


@dataclass
class Entry:
    entry_id: int
    label: int
    confidence: float
    origin: str
    bundle_id: str
    created_s: float
    feature: np.ndarray
    hits: int = 0


@dataclass(frozen=True)
class LookupResult:
    hit: bool
    label: int
    distance: float
    votes: dict[int, int]
    entry_id: int  # the entry that answered (to forget if it was wrong), else the nearest; -1
    confidence: float  # of that entry's original answer
    exact: bool
    reason: str = ""  # why it missed (ccied.cache.policy.MissReason), "" on a hit
    inconclusive: bool = False  # a miss with an entry inside the vote radius: look deeper
    origin: str = ""  # the peer that made the answering (or nearest) entry


class _ReadWriteLock:
    """Many readers or one writer; writers are not starved (new readers wait)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class SemanticCache:
    """Feature -> answer cache for one model bundle, optionally persistent."""

    def __init__(
        self,
        config: CacheConfig,
        store: CacheStore | None = None,
        on_memory_only: Callable[[str], None] | None = None,
    ) -> None:
        """``on_memory_only(reason)``: called once when the store cannot be written and
        the cache carries on in memory (without it, this logs a warning at the start,
        and a failed write raises CachePersistenceError)."""
        if config.dim < 1 or config.capacity < 1:
            raise ValueError(f"invalid cache config {config}")
        self.config = config
        # The rule in force: the configured one until an audit tightens it.
        self.rule = config.rule
        self._store = store
        self._on_memory_only = on_memory_only
        # Why nothing is persisted any more ("" while it is, or without a store).
        self.memory_only = ""
        self._lock = _ReadWriteLock()
        self._stats_lock = threading.Lock()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # order = recency (LRU)
        self._index: Any = self._new_flat_index()
        self._index_kind = "flat"
        self._rebuilding = False
        self._pending_changes: list[tuple[str, int]] | None = None
        # Bumped by clear(): an IVF index trained before it holds dropped entries.
        self._generation = 0
        self._next_id = 1
        self._records_since_snapshot = 0
        self.hits = self.misses = self.inserts = self.evictions = self.refused = 0
        if store is not None:
            self._restore(store)

    # -- index plumbing ---------------------------------------------------------

    def _new_flat_index(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatL2(self.config.dim))

    def _index_add(self, index: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def _restore(self, store: CacheStore) -> None:
        state = store.load()
        now_rows = state.entries[-self.config.capacity :]
        for row in now_rows:
            self._entries[row.entry_id] = Entry(
                row.entry_id,
                row.label,
                row.confidence,
                row.origin,
                self.config.bundle_id,
                row.created_s,
                row.feature,
            )
        self._next_id = state.next_id
        if self._entries:
            ids = np.fromiter(self._entries, dtype=np.int64)
            vectors = np.stack([e.feature for e in self._entries.values()])
            if len(ids) >= self.config.ivf_min_entries:
                self._index, self._index_kind = self._build_ivf(ids, vectors), "ivf"
            else:
                self._index_add(self._index, ids, vectors)
        log.info(
            "cache restored: %d entries (%d from the log, %d bytes of torn or damaged "
            "records skipped)",
            len(self._entries),
            state.recovered_from_log,
            state.discarded_bytes,
        )
        if store.unwritable:
            self._go_memory_only(store.unwritable)

    def _go_memory_only(self, reason: str) -> None:
        assert self._store is not None
        self.memory_only = reason
        if self._on_memory_only is not None:
            self._on_memory_only(reason)
        else:
            log.warning(
                "cache folder %s: %s; the cache is memory-only (nothing more is persisted)",
                self._store.folder,
                reason,
            )

    def _persisting(self) -> bool:
        return self._store is not None and not self.memory_only

    def _store_failed(self, exc: CachePersistenceError) -> None:
        """A write failed: raise, or (with ``on_memory_only``) carry on in memory."""
        if self._on_memory_only is None:
            raise exc
        self._go_memory_only((self._store.unwritable if self._store else "") or str(exc))

    def _build_ivf(self, ids: np.ndarray, vectors: np.ndarray) -> Any:
        # FAISS refuses to train more lists than vectors (a small ivf_min_entries).
        # 2 sqrt(n) lists, trained for 10 rounds on 32 points a list: 100k
        # entries train in seconds on 2 cores, and a query with nprobe 8 scans
        # about 1.3% of the entries (0.3-0.6 ms p99 at 100k, `bench cache`).
        nlist = min(len(ids), int(min(4096, max(16, 2 * math.sqrt(len(ids))))))
        quantizer = faiss.IndexFlatL2(self.config.dim)
        index = faiss.IndexIVFFlat(quantizer, self.config.dim, nlist)
        index.nprobe = self.config.nprobe
        index.cp.niter = 10
        sample = vectors if len(vectors) <= 32 * nlist else vectors[:: len(vectors) // (32 * nlist)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._index_add(index, ids, vectors)
        return index

    def _maybe_start_rebuild(self) -> None:
        """Called under the write lock: switch to IVF once the cache is large enough."""
        if self._index_kind != "flat" or self._rebuilding:
            return
        if len(self._entries) < self.config.ivf_min_entries:
            return
        ids = np.fromiter(self._entries, dtype=np.int64)
        vectors = np.stack([e.feature for e in self._entries.values()])
        self._rebuilding = True
        self._pending_changes = []
        generation = self._generation
        if self.config.background_rebuild:
            threading.Thread(
                target=self._rebuild,
                args=(ids, vectors, generation),
                name="ccied-cache-ivf",
                daemon=True,
            ).start()
        else:
            self._rebuild(ids, vectors, generation, locked=True)

    def _rebuild(
        self, ids: np.ndarray, vectors: np.ndarray, generation: int, locked: bool = False
    ) -> None:
        try:
            index = self._build_ivf(ids, vectors)
        except Exception:  # a failed rebuild must leave the working flat index alone
            log.exception("IVF rebuild failed; staying on the flat index")
            index = None

        def swap() -> None:
            if generation != self._generation:
                return  # clear() ran meanwhile: this index holds dropped entries
            changes = self._pending_changes or []
            self._pending_changes = None
            self._rebuilding = False
            if index is None:
                return
            # Replay what changed while training, then swap.
            for op, entry_id in changes:
                if op == "add" and entry_id in self._entries:
                    self._index_add(
                        index, np.array([entry_id]), self._entries[entry_id].feature[None]
                    )
                elif op == "remove":
                    index.remove_ids(np.array([entry_id], dtype=np.int64))
            self._index, self._index_kind = index, "ivf"
            log.info("cache index switched to IVF (%d entries)", len(self._entries))

        if locked:
            swap()
        else:
            with self._lock.write():
                swap()

    def _note_change(self, op: str, entry_id: int) -> None:
        if self._pending_changes is not None:
            self._pending_changes.append((op, entry_id))

    # -- validation -------------------------------------------------------------

    def check_feature(self, feature: np.ndarray) -> np.ndarray:
        """The feature as float32 if it fits: right dimension, finite, L2-normalised.

        Raises BadFeatureError otherwise (also for entries shared by other peers).
        """
        vector = np.asarray(feature)
        if vector.ndim != 1 or vector.shape[0] != self.config.dim:
            raise BadFeatureError(f"feature of shape {vector.shape}, expected ({self.config.dim},)")
        if vector.dtype.kind != "f":
            raise BadFeatureError(f"feature dtype {vector.dtype}, expected float")
        vector = vector.astype(np.float32)
        if not np.isfinite(vector).all():
            raise BadFeatureError("feature holds NaN or infinity")
        norm = float(np.linalg.norm(vector))
        if abs(norm - 1.0) > NORM_TOLERANCE:
            raise BadFeatureError(f"feature norm {norm:.4f}, expected 1 (L2-normalised)")
        return vector

    # -- the API ----------------------------------------------------------------

    def lookup(self, feature: np.ndarray) -> LookupResult:
        """The cache's answer for this feature, or a miss."""
        query = self.check_feature(feature)[None]
        rule = self.rule
        with self._lock.read():
            if not self._entries:
                distances_sq, ids = np.empty((1, 0)), np.empty((1, 0), dtype=np.int64)
            else:
                distances_sq, ids = self._index.search(query, min(rule.k, len(self._entries)))
            found = [
                (math.sqrt(max(0.0, float(d))), self._entries[int(i)])
                for d, i in zip(distances_sq[0], ids[0], strict=True)
                if int(i) in self._entries
            ]
            decision = decide(
                [d for d, _ in found],
                [e.label for _, e in found],
                rule,
                [e.confidence for _, e in found],
            )
            # Still under the read lock, so no writer iterates the entries while
            # the recency order changes; the stats lock orders the readers.
            with self._stats_lock:
                if decision.hit:
                    self.hits += 1
                    reach = max(rule.threshold_l2, rule.exact_l2)
                    for distance, entry in found:
                        if distance <= reach and entry.label == decision.label:
                            entry.hits += 1
                            self._entries.move_to_end(entry.entry_id)
                else:
                    self.misses += 1
        # On a hit, the entry that answered: the one to forget when the answer
        # was wrong (a closer entry under the answer floor did not answer).
        if decision.hit and decision.answerer >= 0:
            nearest: Entry | None = found[decision.answerer][1]
        else:
            nearest = found[0][1] if found else None
        return LookupResult(
            hit=decision.hit,
            label=decision.label,
            distance=decision.distance,
            votes=decision.votes,
            entry_id=nearest.entry_id if nearest else -1,
            confidence=nearest.confidence if nearest else 0.0,
            exact=decision.exact,
            reason=decision.reason,
            inconclusive=decision.inconclusive,
            origin=nearest.origin if nearest else "",
        )

    def insert(
        self, feature: np.ndarray, label: int, confidence: float, origin: str, bundle_id: str
    ) -> int | None:
        """Add an answered frame; returns its entry id once durable, None if not kept.

        Not kept: another bundle's entry (never mixed in), an answer less confident
        than the rule's ``min_insert_confidence``, or an exact repeat of an entry
        with the same label (the existing entry is refreshed instead).
        Raises BadFeatureError for a malformed feature and CachePersistenceError
        when the entry could not be made durable (it is then not kept either).
        """
        vector = self.check_feature(feature)
        if bundle_id != self.config.bundle_id:
            self.refused += 1
            return None
        if not (0.0 <= confidence <= 1.0) or label < 0:
            raise BadFeatureError(f"invalid label {label} or confidence {confidence}")
        if confidence < self.rule.min_insert_confidence:
            self.refused += 1
            return None
        with self._lock.write():
            if self._entries:
                distances_sq, ids = self._index.search(vector[None], 1)
                nearest = int(ids[0][0])
                if (
                    nearest in self._entries
                    and math.sqrt(max(0.0, float(distances_sq[0][0]))) <= self.rule.exact_l2
                    and self._entries[nearest].label == label
                ):
                    self._entries.move_to_end(nearest)
                    return nearest
            entry_id = self._next_id
            entry = Entry(entry_id, label, confidence, origin, bundle_id, time.time(), vector)
            if self._store is not None and self._persisting():
                try:
                    self._store.append_add(self._stored(entry))
                    self._records_since_snapshot += 1
                except CachePersistenceError as exc:
                    self._store_failed(exc)
            self._next_id += 1
            self._entries[entry_id] = entry
            self._index_add(self._index, np.array([entry_id]), vector[None])
            self._note_change("add", entry_id)
            self.inserts += 1
            if len(self._entries) > self.config.capacity:
                self._evict(max(1, self.config.capacity // 100))
            self._maybe_start_rebuild()
            self._maybe_snapshot()
        return entry_id

    def _victims(self, count: int) -> list[int]:
        if self.config.eviction is Eviction.LFU:
            ranked = sorted(self._entries.values(), key=lambda e: (e.hits, e.entry_id))
            return [e.entry_id for e in ranked[:count]]
        return list(self._entries)[:count]  # least recently used first

    def _evict(self, count: int) -> None:
        victims = self._victims(count)
        self._remove(victims, persist=False)
        self.evictions += len(victims)

    def _remove(self, entry_ids: list[int], persist: bool) -> int:
        present = [i for i in entry_ids if i in self._entries]
        if not present:
            return 0
        if persist and self._store is not None:
            for entry_id in present:
                if not self._persisting():
                    break
                try:
                    self._store.append_forget(entry_id)
                    self._records_since_snapshot += 1
                except CachePersistenceError as exc:
                    self._store_failed(exc)
        for entry_id in present:
            del self._entries[entry_id]
            self._note_change("remove", entry_id)
        self._index.remove_ids(np.array(present, dtype=np.int64))
        return len(present)

    def forget(self, entry_id: int) -> bool:
        """Drop one entry (a wrong answer a user or the audit spotted); True if it existed."""
        with self._lock.write():
            return self._remove([entry_id], persist=True) == 1

    def forget_origin(self, origin: str) -> int:
        """Drop every entry made by ``origin`` (a peer whose entries proved wrong)."""
        with self._lock.write():
            ids = [i for i, e in self._entries.items() if e.origin == origin]
            return self._remove(ids, persist=True)

    def set_rule(self, rule: HitRule) -> None:
        """Replace the rule in force (the audit tightens it after a wrong hit)."""
        with self._lock.write():
            self.rule = rule

    def clear(self) -> int:
        """Drop every entry; returns how many there were."""
        with self._lock.write():
            count = len(self._entries)
            if self._store is not None and self._persisting():
                try:
                    self._store.append_clear()
                except CachePersistenceError as exc:
                    self._store_failed(exc)
            self._entries.clear()
            self._index = self._new_flat_index()
            self._index_kind = "flat"
            self._pending_changes = None
            self._rebuilding = False
            self._generation += 1
            return count

    def hot_entries(self, count: int) -> list[Entry]:
        """The ``count`` entries that answered most often, most recent first on ties.

        What a neighbour that starts late receives, so it starts warm.
        """
        with self._lock.read():
            entries = list(self._entries.values())
        recency = {entry.entry_id: rank for rank, entry in enumerate(entries)}
        entries.sort(key=lambda e: (e.hits, recency[e.entry_id]), reverse=True)
        return entries[:count]

    def __len__(self) -> int:
        return len(self._entries)

    # -- persistence ------------------------------------------------------------

    def _stored(self, entry: Entry) -> StoredEntry:
        return StoredEntry(
            entry.entry_id,
            entry.label,
            entry.confidence,
            entry.origin,
            entry.created_s,
            entry.feature,
        )

    def _maybe_snapshot(self) -> None:
        if self._store is None or not self._persisting():
            return
        if self._records_since_snapshot < self.config.snapshot_every:
            return
        # Evictions are not logged (they would double the log); a snapshot
        # makes them durable. Until then a restart may bring evicted entries back.
        if self._store.snapshot((self._stored(e) for e in self._entries.values()), self._next_id):
            self._records_since_snapshot = 0

    def snapshot(self) -> bool:
        """Write a snapshot now (on clean shutdown); False if the disk refused it
        (or the cache is memory-only)."""
        if self._store is None:
            return False
        # Writers wait: an entry appended to the log between reading the rows
        # and resetting the log would be in neither file.
        with self._lock.write():
            if not self._persisting():
                return False
            rows = [self._stored(e) for e in self._entries.values()]
            ok = self._store.snapshot(rows, self._next_id)
            if ok:
                self._records_since_snapshot = 0
            return ok

    def close(self) -> None:
        if self._store is not None:
            try:
                self.snapshot()
            finally:
                self._store.close()

    # -- status -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        rule = self.rule
        return {
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else 0.0,
            "inserts": self.inserts,
            "evictions": self.evictions,
            "refused": self.refused,
            "capacity": self.config.capacity,
            "eviction": str(self.config.eviction),
            "index": self._index_kind,
            "persistent": self._persisting(),
            "rule": {
                "threshold_l2": rule.threshold_l2,
                "vote_margin": rule.vote_margin,
                "k": rule.k,
                "answer_floor": rule.answer_floor,
                "vote_radius_l2": rule.vote_radius_l2,
                "min_insert_confidence": rule.min_insert_confidence,
            },
        }


__all__ = [
    "CacheConfig",
    "CachePersistenceError",
    "Entry",
    "Eviction",
    "LookupResult",
    "SemanticCache",
]
