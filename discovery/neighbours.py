"""The neighbour table: who is out there, who is alive, how fast the link is.

Pure logic, no I/O and no asyncio: every method takes the time from an
injectable clock (or an explicit ``now``), so tests drive it with a fake clock.

Discovery (mDNS, or addresses given on the command line) only *suggests* a
neighbour. A suggested neighbour becomes usable when its first heartbeat
answer arrives, and leaves when it has been silent for ``liveness_timeout_s``.
The peer daemon sends the heartbeats (over ZeroMQ) and reports each answer
with :meth:`NeighbourTable.record_heartbeat`.

Hysteresis, so that a slow-but-alive neighbour does not flap in and out:

* eviction needs a whole liveness timeout of silence (several missed
  heartbeats), not one late answer;
* failed requests (:meth:`NeighbourTable.record_failure`) only take a
  neighbour out of :meth:`NeighbourTable.usable` until its next heartbeat;
  they never evict it;
* a neighbour evicted for silence comes back only after
  ``readmit_heartbeats`` heartbeats, each within a liveness timeout of the
  previous one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ccied.discovery.errors import DiscoveryError
from ccied.discovery.logutil import WarnOnce

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Heartbeats go out every ~0.5 s: 2 s of silence is four missed answers, and a
# SIGKILLed peer leaves within 2 s plus one expire() tick (< 3 s).
DEFAULT_LIVENESS_TIMEOUT_S = 2.0
DEFAULT_READMIT_HEARTBEATS = 2
DEFAULT_MAX_CONSECUTIVE_FAILURES = 3
# A suggested or evicted neighbour still gets heartbeats (it may come back)
# until it has been silent this long; then it is forgotten until announced again.
DEFAULT_FORGET_AFTER_S = 60.0
DEFAULT_RTT_ALPHA = 0.3
DEFAULT_BANDWIDTH_ALPHA = 0.3
# Smaller transfers measure latency, not bandwidth.
DEFAULT_MIN_TRANSFER_BYTES = 4096
# Bounds memory when someone on the link announces thousands of fake peers.
DEFAULT_MAX_NEIGHBOURS = 256

ROLES = frozenset({"edge", "cloud"})


@dataclass(frozen=True)
class NeighbourTableConfig:
    """Liveness and estimation settings; the defaults fit heartbeats every ~0.5 s."""

    liveness_timeout_s: float = DEFAULT_LIVENESS_TIMEOUT_S
    readmit_heartbeats: int = DEFAULT_READMIT_HEARTBEATS
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    forget_after_s: float = DEFAULT_FORGET_AFTER_S
    rtt_alpha: float = DEFAULT_RTT_ALPHA
    bandwidth_alpha: float = DEFAULT_BANDWIDTH_ALPHA
    min_transfer_bytes: int = DEFAULT_MIN_TRANSFER_BYTES
    max_neighbours: int = DEFAULT_MAX_NEIGHBOURS

    def __post_init__(self) -> None:
        if not self.liveness_timeout_s > 0:
            raise DiscoveryError("liveness_timeout_s must be positive")
        if self.forget_after_s < self.liveness_timeout_s:
            raise DiscoveryError("forget_after_s must be at least liveness_timeout_s")
        if self.readmit_heartbeats < 1 or self.max_consecutive_failures < 1:
            raise DiscoveryError("readmit_heartbeats and max_consecutive_failures must be >= 1")
        if not (0 < self.rtt_alpha <= 1 and 0 < self.bandwidth_alpha <= 1):
            raise DiscoveryError("EWMA weights must be in (0, 1]")
        if self.max_neighbours < 1:
            raise DiscoveryError("max_neighbours must be at least 1")


@dataclass(frozen=True)
class Announcement:
    """What a peer says about itself (mDNS TXT record, or a heartbeat reply).

    ``address`` is where its peer socket listens, ``tcp://IP:PORT``.
    """

    name: str
    role: str
    address: str
    bundle_id: str
    wire_version: int
    public_key: str = ""
    device: str = ""  # where its model runs, when its mDNS record says ("cpu", "cuda:0")


@dataclass(frozen=True)
class Neighbour:
    """A live neighbour as routing sees it: identity plus measured link and load.

    ``rtt_ms`` is a moving average of heartbeat round trips; ``bandwidth_mbps``
    a moving average of measured transfers (None until one was measured);
    ``load`` and ``queue_length`` are what its last heartbeat said;
    ``last_seen`` is the table clock's time (monotonic) of that heartbeat.
    """

    name: str
    role: str
    address: str
    bundle_id: str
    wire_version: int
    public_key: str
    rtt_ms: float
    bandwidth_mbps: float | None
    load: float
    queue_length: int
    last_seen: float
    consecutive_failures: int = 0
    device: str = ""


class _State(Enum):
    SUGGESTED = "suggested"  # announced, no heartbeat answer yet
    ALIVE = "alive"
    DOWN = "down"  # evicted for silence; still probed until forgotten


class _Entry:
    """Mutable bookkeeping for one neighbour (never leaves this module)."""

    __slots__ = (
        "announcement",
        "bandwidth_mbps",
        "failures",
        "last_heard",
        "last_seen",
        "load",
        "queue_length",
        "rtt_ms",
        "since",
        "state",
        "streak",
    )

    def __init__(self, announcement: Announcement, now: float) -> None:
        self.announcement = announcement
        self.state = _State.SUGGESTED
        self.since = now  # when it was suggested or last changed state
        self.last_seen: float | None = None  # last heartbeat answer
        self.last_heard = now  # last sign of life of any kind (announcement or heartbeat)
        self.rtt_ms = 0.0
        self.bandwidth_mbps: float | None = None
        self.load = 0.0
        self.queue_length = 0
        self.failures = 0
        self.streak = 0  # heartbeats in a row while DOWN, for readmission

    @property
    def address(self) -> str:
        return self.announcement.address

    def neighbour(self) -> Neighbour:
        a = self.announcement
        return Neighbour(
            name=a.name,
            role=a.role,
            address=a.address,
            bundle_id=a.bundle_id,
            wire_version=a.wire_version,
            public_key=a.public_key,
            rtt_ms=self.rtt_ms,
            bandwidth_mbps=self.bandwidth_mbps,
            load=self.load,
            queue_length=self.queue_length,
            last_seen=self.last_seen if self.last_seen is not None else self.since,
            consecutive_failures=self.failures,
            device=a.device,
        )


class NeighbourTable:
    """Neighbours by name: suggestions from discovery, liveness from heartbeats.

    Single-threaded: call it from the daemon's event loop only.
    """

    def __init__(
        self,
        own_name: str,
        config: NeighbourTableConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.own_name = own_name
        self.config = config or NeighbourTableConfig()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    # -- what discovery tells us ------------------------------------------------

    def observe_announcement(self, announcement: Announcement, now: float | None = None) -> bool:
        """Suggest a neighbour (mDNS saw it, or the command line named it).

        Returns False when the announcement was ignored: it claims this peer's
        own name, it claims the name of another *live* neighbour at a different
        address (two peers with one name: the first one keeps it), or the table
        is full. A new address for a neighbour that is not alive replaces the
        old one (the peer restarted elsewhere). Never makes a neighbour usable
        by itself: only a heartbeat does.
        """
        t = self._now(now)
        name = announcement.name
        if name == self.own_name:
            warn_once(
                f"own-name:{announcement.address}",
                "another peer at %s announces this peer's name %r; ignoring it",
                announcement.address,
                name,
            )
            return False
        entry = self._entries.get(name)
        if entry is None:
            if len(self._entries) >= self.config.max_neighbours:
                warn_once(
                    "table-full",
                    "neighbour table full (%d); ignoring %s at %s",
                    self.config.max_neighbours,
                    name,
                    announcement.address,
                )
                return False
            self._entries[name] = _Entry(announcement, t)
            log.debug("neighbour %s suggested at %s", name, announcement.address)
            return True
        if entry.announcement.address != announcement.address and entry.state is _State.ALIVE:
            warn_once(
                f"name-conflict:{name}:{announcement.address}",
                "two peers are named %r: %s (alive, kept) and %s (ignored)",
                name,
                entry.announcement.address,
                announcement.address,
            )
            return False
        if entry.announcement.address != announcement.address:
            log.debug(
                "neighbour %s moved from %s to %s",
                name,
                entry.announcement.address,
                announcement.address,
            )
            self._entries[name] = _Entry(announcement, t)
            return True
        if not announcement.device and entry.announcement.device:
            # A heartbeat's suggestion does not carry the device mDNS told us.
            announcement = dataclasses.replace(announcement, device=entry.announcement.device)
        entry.announcement = announcement  # bundle or key may change on a restart
        entry.last_heard = max(entry.last_heard, t)
        return True

    def observe_goodbye(self, name: str, address: str | None = None) -> bool:
        """Remove a neighbour at once: it said goodbye (mDNS TTL 0) or shut down.

        With ``address``, only a neighbour at that address is removed, so the
        goodbye of a second peer using the same name cannot remove the first.
        """
        entry = self._entries.get(name)
        if entry is None or (address is not None and entry.announcement.address != address):
            return False
        del self._entries[name]
        if entry.state is _State.ALIVE:
            log.info("neighbour %s at %s left (goodbye)", name, entry.announcement.address)
        else:
            log.debug("neighbour %s at %s withdrawn", name, entry.announcement.address)
        return True

    # -- what heartbeats and requests tell us -----------------------------------

    def record_heartbeat(
        self,
        name: str,
        rtt_ms: float,
        load: float = 0.0,
        queue_length: int = 0,
        now: float | None = None,
    ) -> bool:
        """A heartbeat answer arrived from ``name``: it is alive.

        ``rtt_ms`` is the measured round trip; ``load`` and ``queue_length`` are
        what the neighbour reported. Returns True when the neighbour is alive
        after this answer (False for an unknown name: announce it first, or
        for an evicted one still earning readmission). Nonsense metrics (NaN,
        negative) still count as a sign of life but are not recorded.
        """
        t = self._now(now)
        entry = self._entries.get(name)
        if entry is None:
            log.debug("heartbeat from unknown neighbour %s ignored", name)
            return False
        if _finite_non_negative(rtt_ms):
            entry.rtt_ms = (
                rtt_ms
                if entry.last_seen is None
                else _ewma(entry.rtt_ms, rtt_ms, self.config.rtt_alpha)
            )
        else:
            warn_once(f"bad-rtt:{name}", "heartbeat from %s: bad rtt_ms %r", name, rtt_ms)
        if _finite_non_negative(load) and isinstance(queue_length, int) and queue_length >= 0:
            entry.load = float(load)
            entry.queue_length = queue_length
        else:
            warn_once(
                f"bad-load:{name}",
                "heartbeat from %s: bad load %r or queue_length %r",
                name,
                load,
                queue_length,
            )
        previous = entry.last_seen
        entry.last_seen = t
        entry.last_heard = t
        entry.failures = 0
        if entry.state is _State.SUGGESTED:
            self._set_state(entry, _State.ALIVE, t)
            log.info("neighbour %s (%s) up at %s", name, entry.announcement.role, entry.address)
        elif entry.state is _State.DOWN:
            in_time = previous is not None and t - previous <= self.config.liveness_timeout_s
            entry.streak = entry.streak + 1 if in_time else 1
            if entry.streak >= self.config.readmit_heartbeats:
                self._set_state(entry, _State.ALIVE, t)
                log.info("neighbour %s at %s is back", name, entry.address)
        return entry.state is _State.ALIVE

    def record_failure(self, name: str) -> None:
        """A heartbeat or request to ``name`` failed (not connected, no answer in time).

        After ``max_consecutive_failures`` in a row the neighbour is left out of
        :meth:`usable` until its next heartbeat answer; only silence evicts it.
        """
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.failures += 1
        if entry.failures == self.config.max_consecutive_failures and entry.state is _State.ALIVE:
            log.info("neighbour %s: %d failures in a row; avoiding it", name, entry.failures)

    def record_transfer(self, name: str, num_bytes: int, seconds: float) -> None:
        """A transfer of ``num_bytes`` to ``name`` took ``seconds``: update the bandwidth.

        ``seconds`` should be the transfer's share of the exchange (round trip
        minus the neighbour's compute time), or the estimate is too low.
        Transfers under ``min_transfer_bytes`` are ignored: they measure latency.
        """
        entry = self._entries.get(name)
        if entry is None or num_bytes < self.config.min_transfer_bytes:
            return
        if not (_finite_non_negative(seconds) and seconds > 0):
            return
        mbps = num_bytes * 8 / seconds / 1e6
        entry.bandwidth_mbps = (
            mbps
            if entry.bandwidth_mbps is None
            else _ewma(entry.bandwidth_mbps, mbps, self.config.bandwidth_alpha)
        )

    # -- time passing -----------------------------------------------------------

    def expire(self, now: float | None = None) -> list[str]:
        """Evict neighbours silent for longer than the liveness timeout.

        Call it on every heartbeat tick. Returns the names evicted now. An
        evicted or never-confirmed neighbour is forgotten entirely (no more
        heartbeats) after ``forget_after_s`` without any sign of life.
        """
        t = self._now(now)
        evicted: list[str] = []
        for name, entry in list(self._entries.items()):
            if entry.state is _State.ALIVE:
                assert entry.last_seen is not None
                silent_s = t - entry.last_seen
                if silent_s > self.config.liveness_timeout_s:
                    self._set_state(entry, _State.DOWN, t)
                    entry.streak = 0
                    evicted.append(name)
                    log.info(
                        "neighbour %s at %s lost: silent for %.1f s",
                        name,
                        entry.address,
                        silent_s,
                    )
            elif t - entry.last_heard > self.config.forget_after_s:
                del self._entries[name]
                log.debug("neighbour %s at %s forgotten", name, entry.announcement.address)
        return evicted

    # -- what routing and status see --------------------------------------------

    def usable(self, own_bundle_id: str, wire_version: int) -> list[Neighbour]:
        """Live neighbours that can run our tail: same bundle, same wire version.

        Excludes this peer itself and neighbours with too many recent failures.
        Sorted by name so that routing decisions are reproducible.
        """
        return [
            entry.neighbour()
            for name, entry in sorted(self._entries.items())
            if entry.state is _State.ALIVE
            and name != self.own_name
            and entry.announcement.bundle_id == own_bundle_id
            and entry.announcement.wire_version == wire_version
            and entry.failures < self.config.max_consecutive_failures
        ]

    def alive(self) -> list[Neighbour]:
        """Every live neighbour, whatever its bundle (for status and cache sharing)."""
        return [
            entry.neighbour()
            for _, entry in sorted(self._entries.items())
            if entry.state is _State.ALIVE
        ]

    def heartbeat_targets(self) -> list[Announcement]:
        """Every neighbour the daemon should send heartbeats to.

        Live ones, suggested ones (to confirm them) and evicted ones (so they
        can come back) until forgotten.
        """
        return [entry.announcement for _, entry in sorted(self._entries.items())]

    def get(self, name: str) -> Neighbour | None:
        """The live neighbour called ``name``, if any."""
        entry = self._entries.get(name)
        return entry.neighbour() if entry is not None and entry.state is _State.ALIVE else None

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """Live neighbours as plain dicts for ``ccied status`` (JSON-ready)."""
        t = self._now(now)
        rows: list[dict[str, Any]] = []
        for n in self.alive():
            rows.append(
                {
                    "name": n.name,
                    "role": n.role,
                    "address": n.address,
                    "bundle_id": n.bundle_id,
                    "wire_version": n.wire_version,
                    "device": n.device or None,
                    "rtt_ms": round(n.rtt_ms, 3),
                    "bandwidth_mbps": (
                        None if n.bandwidth_mbps is None else round(n.bandwidth_mbps, 3)
                    ),
                    "load": n.load,
                    "queue_length": n.queue_length,
                    "consecutive_failures": n.consecutive_failures,
                    "last_seen_s": round(max(0.0, t - n.last_seen), 3),
                }
            )
        return rows

    def __len__(self) -> int:
        """The number of live neighbours."""
        return sum(1 for entry in self._entries.values() if entry.state is _State.ALIVE)

    def _set_state(self, entry: _Entry, state: _State, now: float) -> None:
        entry.state = state
        entry.since = now


def _ewma(previous: float, sample: float, alpha: float) -> float:
    return alpha * sample + (1 - alpha) * previous


def _finite_non_negative(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
