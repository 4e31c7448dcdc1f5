"""The peer daemon: builds a peer from its parts, runs it, and answers what arrives.

A peer is these parts, each a module of its own, built here and handed in
through their constructors (this is the composition root):

* ``ModelWorker`` (peer/worker.py): the model, on one thread;
* ``PeerCache`` (peer/peer_cache.py): the semantic cache, per key depth;
* ``Sharing`` (peer/sharing.py): which shared entries enter the cache;
* ``Frames`` (peer/frames.py): a frame from pixels to its one answer, using
  the one-decision policy (peer/policy.py), and a neighbour's tensor to its tail;
* ``PeerServer`` (peer/server.py): the local and peer sockets, authentication,
  back-pressure;
* ``Cluster`` (peer/cluster.py): neighbour links, heartbeats, sending shared entries;
* ``MdnsDiscovery`` (discovery/): who is around.

Data flows one way: the server hands each message to :meth:`PeerDaemon._answer`,
which dispatches it to the part that answers it. Nothing calls back into the
daemon. An edge answers every submitted frame exactly once; a cloud runs tails
for any peer with its bundle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from ccied.cache import (
    THUMBNAIL_KEY,
    Audit,
    KeyDepth,
    feature_dim,
    thumbnail_dim,
)
from ccied.discovery import (
    Advertisement,
    DiscoveryError,
    MdnsConfig,
    MdnsDiscovery,
    NeighbourTable,
    advertised_addresses,
)
from ccied.discovery.logutil import WarnOnce
from ccied.peer.cluster import Cluster, ClusterConfig
from ccied.peer.config import PeerConfig, check_config
from ccied.peer.counters import Counters
from ccied.peer.defaults import (
    Role,
)
from ccied.peer.device import resolve_device
from ccied.peer.errors import PeerError, ProtocolError
from ccied.peer.frames import Frames, FrameSettings
from ccied.peer.keys import (
    Keypair,
    KeyStore,
    check_curve_support,
    default_state_dir,
    split_keyed_address,
)
from ccied.peer.peer_cache import PeerCache, answer_command, rule_for
from ccied.peer.policy import Floors
from ccied.peer.server import PeerServer, prepare_socket_path
from ccied.peer.sharing import Sharing
from ccied.peer.status import peer_status
from ccied.peer.tails import TailService, batch_config_for
from ccied.peer.transport import EmulatedLink
from ccied.peer.wire import (
    WIRE_VERSION,
    CacheCommand,
    CacheShare,
    CacheSync,
    ErrorCode,
    ErrorReply,
    InferRequest,
    Message,
    MsgpackCodec,
    Ping,
    Source,
    StatusReply,
    StatusRequest,
    Submit,
    WireCodec,
)
from ccied.peer.worker import ModelWorker
from ccied.pruning import ModelError
from ccied.pruning.bundle import Bundle, open_bundle

if TYPE_CHECKING:
    from ccied.peer.metrics import PeerMetrics

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# An idle peer times its model again this often (the figure its heartbeats
# carry), once the model thread has been idle this long.
REMEASURE_INTERVAL_S = 10.0
REMEASURE_IDLE_S = 2.0


class PeerDaemon:
    """A ccied peer. Build it, then ``await run()``; ``request_stop()`` ends it."""

    def __init__(self, config: PeerConfig, codec: WireCodec | None = None) -> None:
        check_config(config)
        if config.socket_path is not None:
            # Before the model loads (seconds): a folder we must refuse fails fast.
            prepare_socket_path(config.socket_path)
        device = resolve_device(config.device)  # before keys and the model: fail fast
        self.config = config
        self._static = [split_keyed_address(a) for a in self._static_targets(config)]
        self.keys, self.identity = _open_keys(config)
        self.codec = codec or MsgpackCodec()
        self.bundle, self.worker = _load_model(config, device)
        try:
            self.tails = TailService(
                self.worker,
                batch_config_for(
                    str(config.role),
                    config.batch_window_ms,
                    config.max_batch,
                    str(self.worker.device),
                ),
            )
            self.link = EmulatedLink(config.link_bandwidth_mbps, config.link_rtt_ms)
        except ValueError as exc:
            raise PeerError(str(exc)) from exc
        self.bundle_id = self.bundle.bundle_id
        self.counters = Counters()
        self.cache = self._open_cache() if config.cache_enabled else None
        self.sharing = (
            Sharing(
                self.cache,
                self.bundle_id,
                len(self.worker.model.spec.class_names),
                self.counters,
                config.accept_shared_from,
            )
            if self.cache is not None
            else None
        )
        self.frames = Frames(
            _frame_settings(config),
            self.bundle,
            self.worker,
            self.counters,
            self.cache,
            sharing=self.sharing,
        )
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self.table = NeighbourTable(config.name)
        self.server: PeerServer | None = None
        self.cluster: Cluster | None = None
        self.discovery: MdnsDiscovery | None = None
        self.metrics: PeerMetrics | None = None  # with --metrics-port, while running
        self._context: zmq.asyncio.Context | None = None

    @property
    def _serves_as(self) -> Source:
        """What this peer's tails are, to the peers that send it tensors."""
        return Source.CLOUD if self.config.role is Role.CLOUD else Source.PEER

    @property
    def listen_address(self) -> str:
        """The bound peer-socket address, port resolved ('' before run() or without one)."""
        return self.server.listen_address if self.server is not None else ""

    def _key_depths(self) -> list[KeyDepth]:
        point = self.worker.cache_point
        return [
            KeyDepth(THUMBNAIL_KEY, thumbnail_dim(), -1),
            KeyDepth(point.name, feature_dim(point.output_shape[0]), point.index),
        ]

    def _open_cache(self) -> PeerCache:
        depths = self._key_depths()
        overrides = self.config.cache_rule_overrides
        rules = {
            d.name: rule_for(
                d.name,
                self.bundle.cache_rules,
                {
                    **overrides.get("*", {}),
                    **overrides.get("model" if d.needs_model else "thumb", {}),
                    **overrides.get(d.name, {}),
                },
            )
            for d in depths
        }
        return PeerCache(
            depths,
            rules,
            self.bundle_id,
            self.config.name,
            self.config.cache_capacity,
            Audit(rate=self.config.audit_rate, own_name=self.config.name),
            self.config.cache_dir,
        )

    # -- life cycle -------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``request_stop()``; always releases sockets and the socket file."""
        self._stop = asyncio.Event()
        await self.worker.warm_up()
        self._context = zmq.asyncio.Context()
        try:
            self.server = PeerServer(
                self._context,
                self.codec,
                self._answer,
                self.counters,
                listen=self.config.listen,
                socket_path=self.config.socket_path,
                max_pending=self.config.max_pending,
                identity=self.identity,
                keys=self.keys,
            )
            self.server.start()
            self._serve_metrics()
            self.cluster = self._make_cluster(self._context)
            self.frames.cluster = self.cluster
            if self.sharing is not None:
                cloud = split_keyed_address(self.config.cloud)[0] if self.config.cloud else ""
                self.sharing.connect(
                    self.cluster.share, functools.partial(self.cluster.key_of, cloud)
                )
            self.discovery = self._make_discovery()
            log.info(
                "peer %s (%s) ready: bundle %s, variant %s, listen %s, socket %s, "
                "static peers %s, discovery %s",
                self.config.name,
                self.config.role,
                self.bundle_id,
                self.config.variant or "planned per frame",
                self.listen_address or "-",
                self.server.socket_path or "-",
                list(self._static_addresses()) or "-",
                "mDNS" if self.discovery else "off",
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(self.server.serve())
                group.create_task(self.cluster.run())
                group.create_task(self._remeasure_when_idle())
                if self.discovery is not None:
                    group.create_task(self._run_discovery(self.discovery))
                await self._stop.wait()
                raise _Stopping
        except* _Stopping:
            pass
        finally:
            await self.aclose()

    def _make_cluster(self, context: zmq.asyncio.Context) -> Cluster:
        return Cluster(
            ClusterConfig(
                name=self.config.name,
                role=self.config.role,
                bundle_id=self.bundle_id,
                listen_address=self.listen_address,
                static_addresses=self._static_addresses(),
                static_keys=tuple((a, k) for a, k in self._static if k is not None),
                share_cache=self.config.share_cache and self.cache is not None,
                cache_depths=tuple(d.name for d in self.cache.depths) if self.cache else (),
            ),
            context,
            self.codec,
            self.table,
            self.link,
            self.frames.local_load,
            self.sharing,
            self.keys,
            self.identity,
        )

    @staticmethod
    def _static_targets(config: PeerConfig) -> tuple[str, ...]:
        if config.role is Role.CLOUD:
            return ()
        return (*config.peers, *((config.cloud,) if config.cloud else ()))

    def _static_addresses(self) -> tuple[str, ...]:
        return tuple(address for address, _ in self._static)

    def _make_discovery(self) -> MdnsDiscovery | None:
        if not self.config.discovery:
            return None
        advertisement = None
        if self.listen_address:
            host, _, port = self.listen_address.removeprefix("tcp://").rpartition(":")
            interfaces = [self.config.interface] if self.config.interface else None
            try:
                advertisement = Advertisement(
                    name=self.config.name,
                    role=self.config.role,
                    bundle_id=self.bundle_id,
                    wire_version=WIRE_VERSION,
                    port=int(port),
                    addresses=advertised_addresses(host, interfaces),
                    public_key=self.identity.public if self.identity else "",
                    device=str(self.worker.device),
                )
            except (DiscoveryError, ValueError) as exc:
                raise PeerError(f"cannot advertise this peer over mDNS: {exc}") from exc
        mdns = MdnsConfig(interfaces=(self.config.interface,) if self.config.interface else None)
        if self.config.mdns_service_type:
            mdns = MdnsConfig(
                interfaces=mdns.interfaces, service_type=self.config.mdns_service_type
            )
        return MdnsDiscovery(self.table, advertisement, mdns)

    async def _run_discovery(self, discovery: MdnsDiscovery) -> None:
        try:
            await discovery.run()
        except DiscoveryError as exc:
            # Static peers still work; say why nobody is discovered.
            log.warning("mDNS discovery is off: %s (use --peer/--cloud)", exc)

    async def _remeasure_when_idle(self) -> None:
        while True:
            await asyncio.sleep(REMEASURE_INTERVAL_S)
            idle_s = time.monotonic() - self.worker.last_busy
            if self.counters.computing == 0 and idle_s >= REMEASURE_IDLE_S:
                await self.worker.remeasure()

    def _serve_metrics(self) -> None:
        """Serve Prometheus metrics (--metrics-port) from an HTTP thread of their own."""
        if self.config.metrics_port is None:
            return
        # Imported here: peers without --metrics-port never load prometheus_client.
        from ccied.peer.metrics import PeerMetrics, on_loop

        metrics = PeerMetrics(on_loop(asyncio.get_running_loop(), self.status))
        url = metrics.serve(self.config.metrics_host, self.config.metrics_port)
        self.metrics = metrics
        log.info("Prometheus metrics at %s", url)

    def request_stop(self) -> None:
        """Ask ``run()`` to return (safe from a signal handler on the loop)."""
        if not self._stop.is_set():
            # Shutdown takes 4-6 s here (threads drain, the cache snapshots): say so.
            log.info("peer %s stopping...", self.config.name)
        self._stop.set()

    async def aclose(self) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
            self.metrics = None
        if self.server is not None:
            await self.server.aclose()
        await self.frames.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()
        if self._context is not None:
            self._context.term()
            self._context = None
        try:
            # The model thread ends after the forward pass under way, if any; then
            # the cache writes queued so far land and the cache takes a snapshot.
            await asyncio.to_thread(self.worker.close)
            if self.cache is not None:
                await asyncio.to_thread(self.cache.close)
        finally:
            # Even when closing failed: a socket file left behind looks like a live peer.
            if self.server is not None:
                self.server.remove_socket_file()
        log.info("peer %s stopped", self.config.name)

    # -- dispatch ---------------------------------------------------------------

    async def _answer(self, body: list[bytes], local: bool, sender_key: str) -> Message:
        """One message from the server: to the part that answers it."""
        try:
            message = self.codec.decode(body)
        except ProtocolError as exc:
            self.counters.protocol_errors += 1
            where = "local socket" if local else "peer socket"
            warn_once(f"protocol:{local}", "malformed message on the %s: %s", where, exc)
            return ErrorReply(request_id=exc.request_id, code=ErrorCode.PROTOCOL, message=str(exc))
        match message:
            case StatusRequest():
                return StatusReply(
                    request_id=message.request_id, bundle_id=self.bundle_id, status=self.status()
                )
            case Submit() if local:
                started = time.perf_counter()
                reply = await self.frames.answer_frame(message)
                if self.metrics is not None and hasattr(reply, "source"):
                    self.metrics.observe(str(reply.source), time.perf_counter() - started)
                return reply
            case CacheCommand() if local:
                return await answer_command(self.cache, message, self.bundle_id)
            case InferRequest() if not local:
                return await self.tails.answer(
                    message, self.bundle_id, self._serves_as, self.counters, self.frames.reply
                )
            case Ping() if not local and self.cluster is not None:
                return self.cluster.pong_for(message, sender_key)
            case CacheShare() if not local:
                accepted = self.sharing.accept(message, "", sender_key) if self.sharing else 0
                return StatusReply(
                    request_id=message.request_id,
                    bundle_id=self.bundle_id,
                    status={"accepted": accepted},
                )
            case CacheSync() if not local:
                if self.sharing is None:
                    return ErrorReply(
                        request_id=message.request_id,
                        code=ErrorCode.UNSUPPORTED,
                        message="no cache here",
                    )
                return await self.sharing.answer_sync(message)
        return ErrorReply(
            request_id=message.request_id,
            code=ErrorCode.UNSUPPORTED,
            message=f"{message.TYPE} is not served on the {'local' if local else 'peer'} socket",
        )

    # -- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Identity, bundle, targets and counters, as ``ccied status --json`` prints."""
        return peer_status(self)


class _Stopping(Exception):
    """Raised inside the task group to cancel its tasks on a stop request."""


def _load_model(config: PeerConfig, device: Any) -> tuple[Bundle, ModelWorker]:
    """The bundle and the model worker on ``device`` (seconds: loaded and timed)."""
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    # Loading and timing the model takes 2.5-28 s here: say so, or start-up looks hung.
    log.info("peer %s: loading model %s...", config.name, config.model)
    try:
        bundle = open_bundle(config.model)
        for name in (*config.variants, *((config.variant,) if config.variant else ())):
            bundle.variant(name)  # ModelError lists the valid ones
        return bundle, ModelWorker(bundle, slowdown=config.slowdown, device=device)
    except ModelError as exc:
        raise PeerError(str(exc)) from exc
    except ValueError as exc:
        raise PeerError(str(exc)) from exc


def _frame_settings(config: PeerConfig) -> FrameSettings:
    return FrameSettings(
        name=config.name,
        serves_as=Source.CLOUD if config.role is Role.CLOUD else Source.PEER,
        variant=config.variant,
        variants=config.variants,
        floors=Floors(config.fidelity_floor, config.fidelity_floor_all),
        always_offload=config.always_offload,
        remote_timeout_s=config.remote_timeout_s,
        max_pending=config.max_pending,
    )


def _open_keys(config: PeerConfig) -> tuple[KeyStore | None, Keypair | None]:
    """This peer's key store and keypair (made on first start); (None, None) insecure."""
    if config.insecure:
        log.warning(
            "--insecure: no authentication or encryption; any host that reaches "
            "this peer's socket can use it, read its tensors and poison its cache"
        )
        return None, None
    check_curve_support()
    keys = KeyStore(config.state_dir or default_state_dir())
    identity, created = keys.load_or_generate(config.name)
    if created:
        log.info(
            "created this peer's key in %s; public key %s (other peers: `ccied keys trust %s`)",
            keys.state_dir,
            identity.public,
            keys.public_file,
        )
    return keys, identity
