"""The peer's side of the semantic cache: key depths, writes off the loop, audit verdicts.

:class:`PeerCache` wires the leaf pieces of :mod:`ccied.cache` for one daemon:

* one :class:`ccied.cache.SemanticCache` per key depth of the bundle (the
  input thumbnail, then the cache split), each with its own rule and, with
  ``--cache-dir``, its own crash-safe store under ``DIR/<bundle id>/<depth>/``;
* a single writer thread for inserts, forgets and their fsyncs, so neither
  the event loop nor the model thread waits for the disk;
* the audit (:class:`ccied.cache.Audit`): what to do when a re-checked hit
  was wrong (drop the entry, tighten the depth's rule, refuse its origin).

A cache folder that cannot be written (read-only, or a disk that fills up)
never stops the peer: it serves what the folder held and keeps learning in
memory, with one warning that says so; nothing is written to it until a
restart.

Entry ids shown to users (``cache_entry`` of a result, ``ccied cache forget``)
name the depth too: ``entry_id * MAX_DEPTHS + depth index``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ccied.cache import (
    Audit,
    BadFeatureError,
    CacheConfig,
    CacheError,
    CacheStore,
    HitRule,
    KeyDepth,
    LookupResult,
    SemanticCache,
    TieredCache,
    Verdict,
)
from ccied.cache.policy import default_rule
from ccied.discovery.logutil import WarnOnce
from ccied.peer.errors import PeerError
from ccied.peer.wire import CacheCommand, CacheOp, ErrorCode, ErrorReply, Message, StatusReply

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

MAX_DEPTHS = 4  # public entry id = entry id * MAX_DEPTHS + depth index


@dataclasses.dataclass(frozen=True)
class NewEntry:
    """An entry this peer made, to share with its neighbours."""

    depth: str
    feature: np.ndarray
    label: int
    confidence: float
    origin: str


def rule_for(
    depth: str, calibrated: Mapping[str, Mapping[str, float]], overrides: Mapping[str, float]
) -> HitRule:
    """The depth's rule: its default, then the bundle's calibration, then the user's overrides."""
    rule = default_rule(depth)
    fields = {f.name for f in dataclasses.fields(HitRule)}
    values = {k: v for k, v in calibrated.get(depth, {}).items() if k in fields}
    values.update(overrides)
    try:
        return dataclasses.replace(rule, **values)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise PeerError(f"invalid cache rule for {depth}: {values}: {exc}") from exc


class PeerCache:
    """The tiered cache, its writer thread and its audit, for one daemon."""

    def __init__(
        self,
        depths: list[KeyDepth],
        rules: Mapping[str, HitRule],
        bundle_id: str,
        own_name: str,
        capacity: int,
        audit: Audit,
        cache_dir: Path | None = None,
    ) -> None:
        if len(depths) > MAX_DEPTHS:
            raise PeerError(f"at most {MAX_DEPTHS} key depths")
        self.bundle_id = bundle_id
        self.own_name = own_name
        self.audit = audit
        tiers = []
        warn_memory_only = WarnOnce(log)

        def memory_only(reason: str) -> None:  # any depth, at start or on a failed write
            warn_memory_only(
                "cache-memory-only",
                "cache folder %s: %s; the cache is memory-only (nothing is persisted until "
                "a restart with a writable folder)",
                cache_dir,
                reason,
            )

        for depth in depths:
            store = None
            if cache_dir is not None:
                try:
                    store = CacheStore(cache_dir / bundle_id / depth.name, bundle_id, depth.dim)
                except CacheError as exc:
                    raise PeerError(str(exc)) from exc
            config = CacheConfig(
                dim=depth.dim, bundle_id=bundle_id, capacity=capacity, rule=rules[depth.name]
            )
            tiers.append((depth, SemanticCache(config, store, memory_only)))
        self.tiers = TieredCache(tiers)
        self.depths = self.tiers.depths
        # Inserts, forgets and their fsyncs: one thread, off the loop and the model.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccied-cache")
        self._share: Callable[[NewEntry], None] | None = None

    def on_new_entry(self, share: Callable[[NewEntry], None]) -> None:
        """Call ``share`` (on the loop) with every entry this peer makes."""
        self._share = share

    # -- lookups and inserts ----------------------------------------------------

    def lookup(self, depth: str, feature: np.ndarray) -> LookupResult:
        """Look ``feature`` up at ``depth`` (BadFeatureError for a malformed one)."""
        return self.tiers.cache(depth).lookup(feature)

    def public_id(self, depth: str, entry_id: int) -> int:
        if entry_id < 0:
            return -1
        index = next(i for i, d in enumerate(self.depths) if d.name == depth)
        return entry_id * MAX_DEPTHS + index

    def _split_id(self, public_id: int) -> tuple[str, int] | None:
        index, entry_id = public_id % MAX_DEPTHS, public_id // MAX_DEPTHS
        if public_id < 0 or index >= len(self.depths):
            return None
        return self.depths[index].name, entry_id

    def insert_later(
        self, features: Mapping[str, np.ndarray], label: int, confidence: float
    ) -> None:
        """Queue an answered frame at every depth it has a key for; a failed write costs
        only that entry. New entries are shared from the loop."""
        loop = asyncio.get_running_loop()
        share = self._share

        def insert() -> None:
            for depth, feature in features.items():
                entry_id = self.tiers.cache(depth).insert(
                    feature, label, confidence, self.own_name, self.bundle_id
                )
                if entry_id is not None and share is not None:
                    entry = NewEntry(depth, feature, label, confidence, self.own_name)
                    loop.call_soon_threadsafe(share, entry)

        self._submit(insert, "cache-insert")

    def promote(
        self, depth: str, feature: np.ndarray, label: int, confidence: float, origin: str
    ) -> None:
        """File a frame a deeper key answered under its key at ``depth`` too (kept with
        the answering entry's origin, so the audit blames the right peer; not shared)."""
        cache = self.tiers.cache(depth)

        def insert() -> None:
            cache.insert(feature, label, confidence, origin, self.bundle_id)

        self._submit(insert, "cache-promote")

    def insert_shared(self, depth: str, entries: list[tuple[np.ndarray, int, float, str]]) -> None:
        """Queue a neighbour's checked entries (kept with their origin, never shared on)."""
        cache = self.tiers.cache(depth)

        def insert() -> None:
            for vector, label, confidence, origin in entries:
                cache.insert(vector, label, confidence, origin, self.bundle_id)

        self._submit(insert, "share-insert")

    def check_shared(self, depth: str, feature: np.ndarray) -> np.ndarray:
        return self.tiers.cache(depth).check_feature(feature)

    def depth_for(self, depth: str, dim: int) -> str:
        """The depth a share names, or (from a peer that does not name it) the one of that
        dimension; BadFeatureError when none fits."""
        for known in self.depths:
            if known.name == depth or (not depth and known.dim == dim):
                return known.name
        raise BadFeatureError(f"no key depth {depth!r} of dimension {dim}")

    def _submit(self, work: Callable[[], None], what: str) -> None:
        def done(future: Future[None]) -> None:
            error = future.exception() if not future.cancelled() else None
            if isinstance(error, CacheError):
                warn_once(what, "cache entry not kept: %s", error)
            elif error is not None:
                log.error("cache write failed", exc_info=error)

        with contextlib.suppress(RuntimeError):  # shutting down: the writer takes no new work
            self.writer.submit(work).add_done_callback(done)

    # -- commands ---------------------------------------------------------------

    async def forget(self, public_id: int) -> bool:
        where = self._split_id(public_id)
        if where is None:
            return False
        depth, entry_id = where
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.writer, self.tiers.forget, entry_id, depth)

    async def clear(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.writer, self.tiers.clear)

    async def hot_entries(self, depth: str, count: int) -> list[Any]:
        cache = self.tiers.cache(depth)
        return await asyncio.get_running_loop().run_in_executor(
            self.writer, cache.hot_entries, count
        )

    # -- the audit --------------------------------------------------------------

    async def apply_verdict(
        self, verdict: Verdict, depth: str, entry_id: int, origin: str, label: int, truth: int
    ) -> None:
        """Act on an audited hit that was wrong: drop, tighten, refuse; log each."""
        if not verdict.wrong:
            return
        loop = asyncio.get_running_loop()
        cache = self.tiers.cache(depth)
        await loop.run_in_executor(self.writer, cache.forget, entry_id)
        log.warning(
            "audit: cache entry %s at %s (from %s) answered %d, the full model says %d: "
            "entry dropped",
            entry_id,
            depth,
            origin,
            label,
            truth,
        )
        if verdict.tighten:
            rule = cache.rule.tightened()
            await loop.run_in_executor(self.writer, cache.set_rule, rule)
            log.warning(
                "audit: false-hit bound %.3f above the target %.3f: rule at %s tightened to "
                "threshold %.3f, answer floor %.2f",
                self.audit.upper_bound(),
                self.audit.target_false_hit_rate,
                depth,
                rule.threshold_l2,
                rule.answer_floor,
            )
        if verdict.refuse_origin:
            dropped = await loop.run_in_executor(self.writer, self.tiers.forget_origin, origin)
            log.warning(
                "audit: entries from %s keep being wrong: no longer accepted, %d dropped",
                origin,
                dropped,
            )

    # -- status and shutdown ----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {**self.tiers.stats(), "audit": self.audit.stats()}

    def close(self) -> None:
        """Let queued writes land, then snapshot every depth (on the caller's thread)."""
        self.writer.shutdown(wait=True)
        self.tiers.close()


async def answer_command(cache: PeerCache | None, command: CacheCommand, bundle_id: str) -> Message:
    """``ccied cache clear`` / ``ccied cache forget ID``: what was dropped, or why not."""
    if cache is None:
        return ErrorReply(
            request_id=command.request_id,
            code=ErrorCode.UNSUPPORTED,
            message="this peer runs without a cache (--no-cache)",
        )
    status: dict[str, Any]
    try:
        if command.op is CacheOp.CLEAR:
            status = {"op": "clear", "cleared": await cache.clear()}
        else:
            forgotten = await cache.forget(command.entry_id)
            status = {"op": "forget", "entry": command.entry_id, "forgotten": forgotten}
    except CacheError as exc:
        return ErrorReply(request_id=command.request_id, code=ErrorCode.INTERNAL, message=str(exc))
    return StatusReply(request_id=command.request_id, bundle_id=bundle_id, status=status)
