"""The cluster as one peer sees it: links, heartbeats, routing candidates, cache sharing.

* **Links.** One :class:`RemoteTarget` (a ZeroMQ DEALER) per neighbour address,
  made on first use: the ``--peer``/``--cloud`` addresses, and whatever mDNS
  suggests (:mod:`ccied.discovery`).
* **Liveness.** Discovery is only a hint. Every ``heartbeat_interval_s`` this
  peer pings every neighbour it knows; a Pong makes it alive (and carries its
  name, role, bundle, load, queue and tail time), silence past the table's
  liveness timeout evicts it (SIGKILLed peers leave within 3 s), and a slow
  answer that still arrives in time keeps it (no flapping).
* **Routing.** :meth:`Cluster.candidates` turns the live neighbours with our
  bundle into :class:`ccied.peer.routing.Candidate` values; the daemon plans.
* **Shared cache.** Entries this peer learns are batched and sent to live
  neighbours at a bounded rate; a neighbour that comes up is asked for the
  hot entries of this one's neighbours (CacheSync), so a late peer starts warm
  (:mod:`ccied.peer.cluster_sharing`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zmq.asyncio
from ccied.discovery import Announcement, DiscoveryError, NeighbourTable
from ccied.discovery.logutil import WarnOnce
from ccied.peer.cluster_sharing import (
    DEFAULT_SHARE_INTERVAL_S,
    DEFAULT_SHARE_RATE_PER_S,
    ClusterSharing,
    EntrySink,
    SharedEntry,
    share_message,
)
from ccied.peer.defaults import Role
from ccied.peer.keys import Keypair, KeyStore
from ccied.peer.routing import Candidate, TailEstimates, TargetKind
from ccied.peer.transport import EmulatedLink, Exchange, RemoteTarget
from ccied.peer.wire import WIRE_VERSION, Message, Ping, Pong, WireCodec

# Re-exported: the shared-entry types lived here first (ccied.peer.sharing, tests).
__all__ = [
    "Cluster",
    "ClusterConfig",
    "EntrySink",
    "LocalLoad",
    "SharedEntry",
    "share_message",
]

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_HEARTBEAT_TIMEOUT_S = 1.0
MIN_TRANSFER_SAMPLE_S = 0.005
HANDSHAKE_RETRY_S = 2.0


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    role: Role
    bundle_id: str
    listen_address: str  # where neighbours reach us ('' if we do not listen)
    static_addresses: tuple[str, ...] = ()  # --peer and --cloud
    # Server keys given with a static address (KEY@tcp://...), by address.
    static_keys: tuple[tuple[str, str], ...] = ()
    share_cache: bool = True
    # The cache's key depths, cheapest first (what a sync asks for).
    cache_depths: tuple[str, ...] = ()
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    share_interval_s: float = DEFAULT_SHARE_INTERVAL_S
    share_rate_per_s: float = DEFAULT_SHARE_RATE_PER_S


@dataclass(frozen=True)
class LocalLoad:
    """What this peer tells its neighbours about itself in each heartbeat."""

    load: float
    queue_length: int
    full_ms: float  # whole-model compute time on this peer (EWMA)


class Cluster:
    """Neighbour links, heartbeats and cache sharing for one peer (event loop only)."""

    def __init__(
        self,
        config: ClusterConfig,
        context: zmq.asyncio.Context,
        codec: WireCodec,
        table: NeighbourTable,
        link: EmulatedLink,
        local_load: Callable[[], LocalLoad],
        sink: EntrySink | None,
        keys: KeyStore | None = None,
        identity: Keypair | None = None,
    ) -> None:
        """``keys`` and ``identity`` make every link CURVE-authenticated
        (None: plain links, ``--insecure``)."""
        if (keys is None) != (identity is None):
            raise ValueError("a secure cluster needs both the key store and the identity")
        self.config = config
        self.keys = keys
        self.identity = identity
        self.table = table
        self.link = link
        self._context = context
        self._codec = codec
        self._local_load = local_load
        # One link per (address, server key): while a static address's key is
        # unknown, each trusted key is tried and the one that answers stays.
        self.links: dict[tuple[str, str | None], RemoteTarget] = {}
        self._verified: dict[str, str] = {}  # address -> the key a Pong proved
        self._claimed: dict[str, str] = dict(config.static_keys)  # address -> said key
        self._names: dict[str, str] = {}  # address -> neighbour name, from Pongs
        # Whole-model time per neighbour: its heartbeats, then its replies.
        self.estimates = TailEstimates()
        self._pinging: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sharing = ClusterSharing(config, table, self.send, self.key_of, sink)
        self.sent_to: collections.Counter[str] = collections.Counter()
        self._closed = False

    # -- life cycle -------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeats and cache sharing until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats())
            if self.config.share_cache:
                group.create_task(self.sharing.run())

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for target in self.links.values():
            target.close()
        self.links.clear()

    def _spawn(self, coroutine: collections.abc.Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def secure(self) -> bool:
        return self.identity is not None

    def _target(self, address: str, key: str | None, *, probe: bool = False) -> RemoteTarget:
        """The link to ``address`` with server ``key``, made on first use.

        A link whose handshake failed is replaced after HANDSHAKE_RETRY_S:
        libzmq gives such a session up, and the other side may trust us now.
        """
        target = self.links.get((address, key))
        stale = target is not None and target.given_up
        if stale and time.monotonic() - target.created > HANDSHAKE_RETRY_S:  # type: ignore[union-attr]
            self.links.pop((address, key)).close()
            target = None
        if target is None:
            target = RemoteTarget(
                self._context, address, self._codec, self.link, self.identity, key, quiet=probe
            )
            self.links[(address, key)] = target
            self._spawn(target.run())
        return target

    def _drop(self, address: str, keep: str | None) -> None:
        for found in [k for k in self.links if k[0] == address and k[1] != keep]:
            self.links.pop(found).close()

    def link_to(self, address: str) -> RemoteTarget | None:
        """The link routing uses for ``address`` (None: no proven key yet)."""
        if not self.secure:
            return self._target(address, None)
        key = self._verified.get(address)
        return None if key is None else self._target(address, key)

    def key_of(self, address: str) -> str | None:
        """The public key a neighbour at ``address`` proved (None: not yet, or insecure)."""
        return self._verified.get(address)

    async def send(self, address: str, message: Message, timeout_s: float) -> Exchange:
        """One request to ``address`` over its proven link."""
        target = self.link_to(address)
        if target is None:
            return Exchange(None, "no proven key for this address yet", 0, 0, 0.0)
        return await target.request(message, timeout_s)

    def _keys_to_try(self, address: str) -> list[str | None]:
        """Server keys to ping ``address`` with: the proven one, else the trusted
        claims (static KEY@, mDNS TXT, an authenticated Ping), else every trusted
        key. A claim alone proves nothing: only a completed handshake does."""
        if not self.secure:
            return [None]
        assert self.keys is not None and self.identity is not None
        proven = self._verified.get(address)
        target = self.links.get((address, proven)) if proven else None
        if proven and target is not None and not target.given_up:
            return [proven]
        if proven:  # the key there changed (or is refused): learn it again
            del self._verified[address]
        claims = {a.public_key for a in self.table.heartbeat_targets() if a.address == address}
        claims.discard("")
        if address in self._claimed:
            claims.add(self._claimed[address])
        if claims:
            trusted = sorted(k for k in claims if self.keys.is_trusted(k))
            if not trusted:
                warn_once(
                    f"untrusted:{address}:{sorted(claims)}",
                    "not using the peer at %s: its key %s is not trusted "
                    "(`ccied keys trust KEY` on this peer if it is yours)",
                    address,
                    ", ".join(sorted(claims)),
                )
            return list(trusted)
        keys = [
            self.identity.public,
            *sorted(set(self.keys.trusted().values()) - {self.identity.public}),
        ]
        for key in keys:
            self._target(address, key).quiet = True
        return list(keys)

    # -- liveness ---------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            addresses = set(self.config.static_addresses)
            addresses.update(a.address for a in self.table.heartbeat_targets())
            for address in addresses - self._pinging:
                self._pinging.add(address)
                self._spawn(self._ping(address))
            for name in self.table.expire():
                log.info("neighbour %s left (no heartbeat answer in time)", name)
            await asyncio.sleep(self.config.heartbeat_interval_s)

    def _ping_message(self) -> Ping:
        load = self._local_load()
        return Ping(
            request_id=uuid.uuid4().hex,
            bundle_id=self.config.bundle_id,
            name=self.config.name,
            role=self.config.role,
            address=self.config.listen_address,
            load=load.load,
            queue_length=load.queue_length,
            full_ms=load.full_ms,
        )

    def pong_for(self, ping: Ping, sender_key: str = "") -> Pong:
        """Answer a neighbour's heartbeat; learn of it if it says where it listens.

        ``sender_key`` is the key its handshake proved (secure peers): the
        key its own listening socket uses, so it is what we connect back with.
        """
        if ping.address and ping.name != self.config.name:
            if sender_key and ping.address not in self._verified:
                self._claimed[ping.address] = sender_key
            self._suggest(ping.name, ping.role, ping.address, ping.bundle_id, sender_key)
        mine = self._ping_message()
        return Pong(**{**mine.__dict__, "request_id": ping.request_id})

    def _suggest(
        self, name: str, role: str, address: str, bundle_id: str, public_key: str = ""
    ) -> bool:
        try:
            announcement = Announcement(
                name=name,
                role=role,
                address=address,
                bundle_id=bundle_id,
                wire_version=WIRE_VERSION,
                public_key=public_key,
            )
        except (DiscoveryError, ValueError) as exc:  # a malformed claim: ignore it
            warn_once(f"suggest:{address}", "ignoring peer %r at %s: %s", name, address, exc)
            return False
        return self.table.observe_announcement(announcement)

    async def _ping(self, address: str) -> None:
        try:
            keys = self._keys_to_try(address)
            if not keys:
                return
            was_alive = {n.name for n in self.table.alive()}
            answer = await self._first_pong(address, keys)
            if answer is None:
                name = self._names.get(address)
                if name is not None:
                    self.table.record_failure(name)
                return
            key, exchange = answer
            self._heard(address, key, exchange, was_alive)
        finally:
            self._pinging.discard(address)

    async def _first_pong(
        self, address: str, keys: list[str | None]
    ) -> tuple[str | None, Exchange] | None:
        """Ping ``address`` with each server key at once; the first key a Pong came back on."""
        probe = len(keys) > 1
        message = self._ping_message()
        exchanges = await asyncio.gather(
            *(
                self._target(address, key, probe=probe).request(
                    message, self.config.heartbeat_timeout_s
                )
                for key in keys
            )
        )
        answered = [
            (key, e) for key, e in zip(keys, exchanges, strict=True) if isinstance(e.reply, Pong)
        ]
        return answered[0] if answered else None

    def _heard(
        self, address: str, key: str | None, exchange: Exchange, was_alive: set[str]
    ) -> None:
        """A Pong from ``address`` over the link with server ``key``: the neighbour lives."""
        pong = exchange.reply
        assert isinstance(pong, Pong)
        if key is not None:
            self._prove(address, key)
        self._names[address] = pong.name
        self.estimates.reported(pong.name, pong.full_ms, time.monotonic())
        known = self.table.get(pong.name)
        if (
            known is None
            or known.address != address
            or known.bundle_id != pong.bundle_id
            or known.public_key != (key or "")
        ):
            self._suggest(pong.name, pong.role, address, pong.bundle_id, key or "")
        alive = self.table.record_heartbeat(
            pong.name, exchange.elapsed_ms, pong.load, pong.queue_length
        )
        if pong.bundle_id != self.config.bundle_id:
            self._warn_other_bundle(address, pong)
        if alive and pong.name not in was_alive:
            log.info("neighbour %s (%s) alive at %s", pong.name, pong.role, address)
            if self.config.share_cache and pong.bundle_id == self.config.bundle_id:
                self._spawn(self.sharing.sync_from(pong.name, address))

    def _prove(self, address: str, key: str) -> None:
        """A handshake with ``key`` completed at ``address``: route with it, drop the others."""
        if self._verified.get(address) != key:
            log.info("%s proved key %s", address, key)
        self._verified[address] = key
        self._target(address, key).quiet = False
        self._drop(address, keep=key)  # the other keys tried there are wrong

    def _warn_other_bundle(self, address: str, pong: Pong) -> None:
        # A peer that runs another model or bundle can take none of our
        # tensors; without this line an edge whose --cloud ran another
        # bundle answered every frame itself, silently.
        warn_once(
            f"other-bundle:{address}:{pong.bundle_id}",
            "%s (%s) at %s runs bundle %s, not ours (%s): it gets none of this "
            "peer's frames; start both with the same --model",
            pong.name,
            pong.role,
            address,
            pong.bundle_id,
            self.config.bundle_id,
        )

    # -- routing ----------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Live neighbours with our bundle and wire version, as routing candidates."""
        out = []
        now = time.monotonic()
        for neighbour in self.table.usable(self.config.bundle_id, WIRE_VERSION):
            kind = TargetKind.CLOUD if neighbour.role == Role.CLOUD else TargetKind.PEER
            out.append(
                Candidate(
                    name=neighbour.name,
                    kind=kind,
                    address=neighbour.address,
                    # The whole model's time there; the policy scales it to a tail.
                    full_ms=self.estimates.full_ms(neighbour.name, now)[0],
                    queue_length=neighbour.queue_length,
                    rtt_ms=neighbour.rtt_ms,
                    bandwidth_mbps=neighbour.bandwidth_mbps or self.link.bandwidth_mbps,
                )
            )
        return out

    async def request(self, candidate: Candidate, message: Message, timeout_s: float) -> Exchange:
        """Send to a neighbour; learn bandwidth from answers and count failures."""
        self.estimates.sent(candidate.name, time.monotonic())
        exchange = await self.send(candidate.address, message, timeout_s)
        self.sent_to[candidate.name] += 1
        if exchange.error is not None:
            self.table.record_failure(candidate.name)
        elif exchange.bytes_sent:
            tail_ms = getattr(exchange.reply, "tail_ms", 0.0)
            transfer_s = (exchange.elapsed_ms - tail_ms - candidate.rtt_ms) / 1e3
            # Below a few ms the residual is per-message overhead (decoding,
            # scheduling), not the link: such samples would make a fast link
            # look slow, so only clearly link-bound transfers count.
            if transfer_s >= MIN_TRANSFER_SAMPLE_S:
                self.table.record_transfer(candidate.name, exchange.bytes_sent, transfer_s)
        return exchange

    # -- shared cache -----------------------------------------------------------

    def share(self, entry: SharedEntry) -> None:
        """Queue an entry this peer learned for its neighbours (oldest dropped if full)."""
        self.sharing.share(entry)

    # -- status -----------------------------------------------------------------

    def problems(self) -> list[str]:
        """Live neighbours that cannot take our frames, and why: for ``ccied status``."""
        out = []
        for n in self.table.alive():
            if n.bundle_id != self.config.bundle_id:
                out.append(
                    f"{n.name} ({n.role}) at {n.address} runs bundle {n.bundle_id}, not ours "
                    f"({self.config.bundle_id}): it gets none of this peer's frames"
                )
            elif n.wire_version != WIRE_VERSION:
                out.append(
                    f"{n.name} ({n.role}) at {n.address} speaks wire version {n.wire_version}, "
                    f"not ours ({WIRE_VERSION}): upgrade one of them"
                )
        return out

    def describe(self) -> dict[str, object]:
        return {
            "links": [
                {**target.describe(), "name": self._names.get(address, "")}
                for (address, _), target in self.links.items()
            ],
            "sent_to": dict(self.sent_to),
            "tail_estimates": self.estimates.describe(time.monotonic()),
            "shared_out": self.sharing.shared_out,
            "bytes_sent": self.link.bytes_sent,
            "share_queue": len(self.sharing.outbox),
            "link_emulation": self.link.describe(),
        }

    async def aclose(self) -> None:
        self.close()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
