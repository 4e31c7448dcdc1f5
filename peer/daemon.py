"""The peer daemon: one asyncio loop wiring sockets, the model worker and routing.

Sockets:

* a **local socket** (ZeroMQ ROUTER over a Unix socket, mode 0600) where the
  device's applications submit frames and ask for status;
* a **peer socket** (ZeroMQ ROUTER over TCP) where other peers send
  intermediate tensors for this peer's tail;
* one DEALER per configured target (cloud, peers) for this peer's misses.

An edge peer runs the head, forwards the tensor to its targets in order, and
answers with its own tail when none answers within the deadline: every
submitted frame gets exactly one answer. A cloud peer runs the tail for any
peer with the same bundle id. The model runs on the worker thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
import zmq.asyncio
import zmq.auth.asyncio
from ccied.cache import (
    DEFAULT_AUDIT_RATE,
    DEFAULT_CAPACITY,
    THUMBNAIL_KEY,
    Audit,
    BadFeatureError,
    CacheError,
    KeyDepth,
    LookupResult,
    MissReason,
    feature_dim,
    feature_from_tensor,
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
from ccied.discovery.logutil import WarnOnce, suppressed_warnings
from ccied.peer.batching import DEFAULT_MAX_BATCH
from ccied.peer.cluster import Cluster, ClusterConfig, LocalLoad, SharedEntry, share_message
from ccied.peer.defaults import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_PENDING,
    DEFAULT_METRICS_HOST,
    DEFAULT_REMOTE_TIMEOUT_S,
    SHARED_FROM,
    Role,
)
from ccied.peer.device import DEFAULT_DEVICE, device_name, resolve_device
from ccied.peer.errors import PeerError, ProtocolError
from ccied.peer.keys import (
    Keypair,
    KeyStore,
    check_curve_support,
    default_state_dir,
    split_keyed_address,
)
from ccied.peer.peer_cache import NewEntry, PeerCache, rule_for
from ccied.peer.routing import Candidate, TargetKind, plan
from ccied.peer.tails import DeadlineExpiredError, TailService, batch_config_for
from ccied.peer.transport import EmulatedLink
from ccied.peer.wire import (
    MAX_SHARED_ENTRIES,
    MAX_TENSOR_BYTES,
    WIRE_VERSION,
    CacheCommand,
    CacheOp,
    CacheShare,
    CacheSync,
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    MsgpackCodec,
    Ping,
    Source,
    StatusReply,
    StatusRequest,
    Submit,
    WireCodec,
)
from ccied.peer.worker import BadTensorError, HeadResult, ModelWorker, Prepared
from ccied.pruning import DEFAULT_FIDELITY_FLOOR, DEFAULT_MODEL, MediaError, ModelError
from ccied.pruning.bundle import open_bundle
from ccied.pruning.planner import Link, Need, cache_plan, rank_variants

if TYPE_CHECKING:
    from ccied.peer.metrics import PeerMetrics

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Unix socket paths are limited to 107 bytes by the kernel (sun_path).
MAX_SOCKET_PATH_BYTES = 107
ZAP_DOMAIN = "ccied"
# The deeper-key-or-not decision (PeerDaemon._plan_frame): an optimistic start so
# a new cache gets to learn, a slow average, and a lookup at least every N
# inconclusive frames. The thumbnail key is always looked up: it costs a crop
# and a 768-value mean (about 0.1 ms here), less than any stage.
INITIAL_HIT_RATE = 0.5
HIT_RATE_ALPHA = 0.2
CACHE_PROBE_EVERY = 8
# Audits under way at once: more waiting would only delay the frames behind them.
MAX_PENDING_AUDITS = 2
# An idle peer times its model again this often (the figure its heartbeats
# carry), once the model thread has been idle this long.
REMEASURE_INTERVAL_S = 10.0
REMEASURE_IDLE_S = 2.0


@dataclass(frozen=True)
class PeerConfig:
    """Everything a daemon needs; only the CLI reads argv and config files."""

    name: str
    role: Role = Role.EDGE
    listen: str | None = DEFAULT_LISTEN
    socket_path: Path | None = None
    # A registered model name (its built-in variants) or a `ccied prepare` folder.
    model: str = DEFAULT_MODEL
    # Pin one variant of the bundle (None: the planner chooses per frame)...
    variant: str | None = None
    # ...or let it choose among these only (empty: all of the bundle's).
    variants: tuple[str, ...] = ()
    # Baselines only: send every miss to a neighbour even when finishing here is faster.
    always_offload: bool = False
    fidelity_floor: float = DEFAULT_FIDELITY_FLOOR
    cloud: str | None = None
    peers: tuple[str, ...] = ()
    remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S
    max_pending: int = DEFAULT_MAX_PENDING
    torch_threads: int | None = None
    cache_enabled: bool = True
    # Entries persist under cache_dir/<bundle id>/ (None: in memory only).
    cache_dir: Path | None = None
    cache_capacity: int = DEFAULT_CAPACITY
    # Hit-rule fields to override, by key depth ("*": every depth); over the
    # bundle's calibrated rules, else the defaults.
    cache_rule_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    # Share of cache hits re-checked by the full model off the critical path.
    audit_rate: float = DEFAULT_AUDIT_RATE
    share_cache: bool = True
    discovery: bool = True
    # mDNS on this interface only (None: the interfaces the listen address implies).
    interface: str | None = None
    # Emulated slower device and uplink (benchmarks); 1.0 / None mean real.
    slowdown: float = 1.0
    link_bandwidth_mbps: float | None = None
    link_rtt_ms: float = 0.0
    # Keys and the allow-list live here (None: ccied.peer.keys.default_state_dir()).
    state_dir: Path | None = None
    # Plain ZeroMQ without CURVE: any host that reaches the peer socket is served.
    insecure: bool = False
    # Whose shared cache entries to take: "trusted" peers, the "cloud" only, or "none".
    accept_shared_from: str = "trusted"
    # Serve Prometheus metrics over HTTP on this port (None: off; 0: a free one).
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    # Where the model runs: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N.
    device: str = DEFAULT_DEVICE
    # Tails for other peers run in batches of up to max_batch (1: no batching),
    # waiting up to batch_window_ms to fill (None: 2 ms for a cloud, 0 for an edge).
    batch_window_ms: float | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    # Only tests change these.
    mdns_service_type: str | None = None


@dataclass
class Counters:
    submitted: int = 0
    answered: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: {str(s): 0 for s in Source})
    failovers: int = 0
    errors: int = 0
    busy: int = 0
    protocol_errors: int = 0
    served_for_peers: int = 0
    refused_bundle: int = 0
    refused_shared: int = 0
    cache_skipped: int = 0
    probes: int = 0  # copies of misses sent to neighbours only to time them
    refused_handshakes: int = 0  # CURVE clients whose key is not trusted (ZAP)


class PeerDaemon:
    """A ccied peer. Build it, then ``await run()``; ``request_stop()`` ends it."""

    def __init__(self, config: PeerConfig, codec: WireCodec | None = None) -> None:
        if config.max_pending < 1:
            raise PeerError("max_pending must be at least 1")
        if config.remote_timeout_s <= 0:
            raise PeerError("remote_timeout_s must be positive")
        if not 0.0 <= config.audit_rate <= 1.0:
            raise PeerError(f"audit_rate must be in [0, 1], got {config.audit_rate}")
        if config.accept_shared_from not in SHARED_FROM:
            raise PeerError(f"accept_shared_from must be one of {', '.join(SHARED_FROM)}")
        if config.metrics_port is not None and not 0 <= config.metrics_port <= 65535:
            raise PeerError(f"metrics_port must be in 1-65535, got {config.metrics_port}")
        if config.accept_shared_from == "cloud" and (config.insecure or not config.cloud):
            raise PeerError(
                "taking shared entries from the cloud only needs --cloud and keys "
                "(without --insecure): the cloud is known by the key it proves"
            )
        if config.socket_path is not None:
            # Before the model loads (seconds): a folder we must refuse fails fast.
            _prepare_socket_path(config.socket_path)
        device = resolve_device(config.device)  # before keys and the model: fail fast
        self.config = config
        self._static = [split_keyed_address(a) for a in self._static_targets(config)]
        self.keys: KeyStore | None = None
        self.identity: Keypair | None = None
        if not config.insecure:
            check_curve_support()
            self.keys = KeyStore(config.state_dir or default_state_dir())
            self.identity, created = self.keys.load_or_generate(config.name)
            if created:
                log.info(
                    "created this peer's key in %s; public key %s (other peers: "
                    "`ccied keys trust %s`)",
                    self.keys.state_dir,
                    self.identity.public,
                    self.keys.public_file,
                )
        else:
            log.warning(
                "--insecure: no authentication or encryption; any host that reaches "
                "this peer's socket can use it, read its tensors and poison its cache"
            )
        self.codec = codec or MsgpackCodec()
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        # Loading and timing the model takes 2.5-28 s here: say so, or start-up looks hung.
        log.info("peer %s: loading model %s...", config.name, config.model)
        try:
            self.bundle = open_bundle(config.model)
            for name in (*config.variants, *((config.variant,) if config.variant else ())):
                self.bundle.variant(name)  # ModelError lists the valid ones
        except ModelError as exc:
            raise PeerError(str(exc)) from exc
        try:
            self.worker = ModelWorker(self.bundle, slowdown=config.slowdown, device=device)
            self.tails = TailService(
                self.worker,
                batch_config_for(str(config.role), config.batch_window_ms, config.max_batch),
            )
            self.link = EmulatedLink(config.link_bandwidth_mbps, config.link_rtt_ms)
        except ValueError as exc:
            raise PeerError(str(exc)) from exc
        self.bundle_id = self.bundle.bundle_id
        self.variant_counts: dict[str, int] = dict.fromkeys(self.worker.variants, 0)
        self.cache = self._open_cache() if config.cache_enabled else None
        self.counters = Counters()
        self._started = time.monotonic()
        self._pending = 0  # requests of any kind in progress (bounded by max_pending)
        self._computing = 0  # frames and tensors among them: what queues for the model
        self._hit_rate = INITIAL_HIT_RATE  # EWMA of recent lookups (see _plan_frame)
        self._since_lookup = 0
        # Which proved key delivered each origin's shared entries, and the keys
        # whose entries the audit refused (by origin, then by key).
        self._origin_keys: dict[str, str] = {}
        self._refused_keys: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._context: zmq.asyncio.Context | None = None
        self._local: zmq.asyncio.Socket | None = None
        self._peer: zmq.asyncio.Socket | None = None
        self._socket_path: Path | None = None
        self._socket_inode: tuple[int, int] = (0, 0)  # (device, inode) of the file we made
        self.listen_address = ""  # the bound address, port resolved
        self.table = NeighbourTable(config.name)
        self.cluster: Cluster | None = None
        self.discovery: MdnsDiscovery | None = None
        self.metrics: PeerMetrics | None = None  # with --metrics-port, while running

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
        authenticator = None
        try:
            if self.keys is not None:
                # The ZAP handler must run before the peer socket binds.
                authenticator = zmq.auth.asyncio.AsyncioAuthenticator(self._context, log=log)
                authenticator.start()
                authenticator.configure_curve_callback(
                    ZAP_DOMAIN, _AllowList(self.keys, self.counters)
                )
            self._bind()
            self._serve_metrics()
            self.cluster = Cluster(
                ClusterConfig(
                    name=self.config.name,
                    role=str(self.config.role),
                    bundle_id=self.bundle_id,
                    listen_address=self.listen_address,
                    static_addresses=self._static_addresses(),
                    static_keys=tuple((a, k) for a, k in self._static if k is not None),
                    share_cache=self.config.share_cache and self.cache is not None,
                    cache_depths=tuple(d.name for d in self.cache.depths) if self.cache else (),
                ),
                self._context,
                self.codec,
                self.table,
                self.link,
                self._local_load,
                self._accept_shared,
                self.keys,
                self.identity,
            )
            if self.cache is not None:
                self.cache.on_new_entry(self._share_entry)
            self.discovery = self._make_discovery()
            log.info(
                "peer %s (%s) ready: bundle %s, variant %s, listen %s, socket %s, "
                "static peers %s, discovery %s",
                self.config.name,
                self.config.role,
                self.bundle_id,
                self.config.variant or "planned per frame",
                self.listen_address or "-",
                self._socket_path or "-",
                list(self._static_addresses()) or "-",
                "mDNS" if self.discovery else "off",
            )
            async with asyncio.TaskGroup() as group:
                if self._local is not None:
                    group.create_task(self._serve(self._local, local=True))
                if self._peer is not None:
                    group.create_task(self._serve(self._peer, local=False))
                group.create_task(self.cluster.run())
                group.create_task(self._remeasure_when_idle())
                if self.discovery is not None:
                    group.create_task(self._run_discovery(self.discovery))
                await self._stop.wait()
                raise _Stopping
        except* _Stopping:
            pass
        finally:
            if authenticator is not None:
                authenticator.stop()
            await self.aclose()

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
                    role=str(self.config.role),
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
            if self._computing == 0 and idle_s >= REMEASURE_IDLE_S:
                await self.worker.remeasure()

    def _local_load(self) -> LocalLoad:
        return LocalLoad(
            load=self._computing / self.config.max_pending,
            queue_length=self._computing,
            full_ms=self.worker.full_ms(),
        )

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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cluster is not None:
            await self.cluster.aclose()
        for sock in (self._local, self._peer):
            if sock is not None:
                sock.close(linger=0)
        self._local = self._peer = None
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
            if self._socket_path is not None:
                _unlink_own_socket(self._socket_path, self._socket_inode)
                self._socket_path = None
        log.info("peer %s stopped", self.config.name)

    def _bind(self) -> None:
        assert self._context is not None
        if self.config.listen:
            self._peer = self._router(self.config.listen, self.identity)
            endpoint = self._peer.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(endpoint, bytes)
            self.listen_address = endpoint.decode()
        if self.config.socket_path is not None:
            path = self.config.socket_path
            _prepare_socket_path(path)
            # umask makes the socket file 0600 from the moment it exists.
            old_umask = os.umask(0o177)
            try:
                self._local = self._router(f"ipc://{path}")
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = path.lstat()
            self._socket_path, self._socket_inode = path, (st.st_dev, st.st_ino)

    def _router(self, address: str, identity: Keypair | None = None) -> zmq.asyncio.Socket:
        """A ROUTER bound to ``address``; with ``identity``, a CURVE server whose
        clients must prove a key on the allow-list (ZAP)."""
        assert self._context is not None
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.curve_server = True
            sock.curve_secretkey = identity.secret.encode("ascii")
            sock.curve_publickey = identity.public.encode("ascii")
            sock.zap_domain = ZAP_DOMAIN.encode()
        # libzmq drops a peer that sends a frame larger than any valid message.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_TENSOR_BYTES + 1024)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise PeerError(f"cannot listen on {address}: {exc}") from exc
        return sock

    # -- serving ----------------------------------------------------------------

    async def _serve(self, sock: zmq.asyncio.Socket, *, local: bool) -> None:
        secure = not local and self.identity is not None
        while True:
            parts = await sock.recv_multipart(copy=False)
            if len(parts) < 2:
                continue  # ROUTER always prepends the identity; nothing to answer
            # The key the sender's handshake proved (ZAP's User-Id): who sent this.
            sender_key = _user_id(parts[1]) if secure else ""
            frames = [part.bytes for part in parts]
            identity, body = frames[0], frames[1:]
            if self._pending >= self.config.max_pending:
                self.counters.busy += 1
                await self._reply_error(sock, identity, body, ErrorCode.BUSY, "queue full")
                continue
            self._pending += 1
            task = asyncio.create_task(
                self._handle(sock, identity, body, local=local, sender_key=sender_key)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Let the new task start before the next message: with many queued,
            # cheap requests (an error reply, a status) finish and free their
            # slot instead of the loop filling the queue and answering BUSY.
            await asyncio.sleep(0)

    async def _reply_error(
        self,
        sock: zmq.asyncio.Socket,
        identity: bytes,
        body: list[bytes],
        code: ErrorCode,
        text: str,
    ) -> None:
        request_id = _request_id_hint(self.codec, body)
        await self._send(sock, identity, ErrorReply(request_id=request_id, code=code, message=text))

    async def _send(self, sock: zmq.asyncio.Socket, identity: bytes, message: Message) -> None:
        try:
            await sock.send_multipart([identity, *self.codec.encode(message)], flags=zmq.NOBLOCK)
        except zmq.Again:
            # The requester is gone or not reading: its reply has nowhere to go.
            warn_once(
                "reply-dropped", "reply %s dropped: requester not reading", message.request_id
            )
        except zmq.ZMQError as exc:
            warn_once("reply-failed", "reply %s failed: %s", message.request_id, exc)

    async def _handle(
        self,
        sock: zmq.asyncio.Socket,
        identity: bytes,
        body: list[bytes],
        *,
        local: bool,
        sender_key: str = "",
    ) -> None:
        try:
            reply = await self._answer(body, local=local, sender_key=sender_key)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("internal error while answering a request")
            self.counters.errors += 1
            reply = ErrorReply(
                request_id=_request_id_hint(self.codec, body),
                code=ErrorCode.INTERNAL,
                message=f"internal error: {exc}",
            )
        finally:
            self._pending -= 1
        await self._send(sock, identity, reply)

    async def _answer(self, body: list[bytes], *, local: bool, sender_key: str = "") -> Message:
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
                self._computing += 1
                started = time.perf_counter()
                try:
                    reply = await self._answer_frame(message)
                finally:
                    self._computing -= 1
                if self.metrics is not None and isinstance(reply, InferResult):
                    self.metrics.observe(str(reply.source), time.perf_counter() - started)
                return reply
            case CacheCommand() if local:
                return await self._answer_cache_command(message)
            case InferRequest() if not local:
                self._computing += 1
                try:
                    return await self._answer_tensor(message)
                finally:
                    self._computing -= 1
            case Ping() if not local and self.cluster is not None:
                return self.cluster.pong_for(message, sender_key)
            case CacheShare() if not local:
                accepted = self._accept_shared(message, "", sender_key)
                return StatusReply(
                    request_id=message.request_id,
                    bundle_id=self.bundle_id,
                    status={"accepted": accepted},
                )
            case CacheSync() if not local:
                return await self._answer_sync(message)
        return ErrorReply(
            request_id=message.request_id,
            code=ErrorCode.UNSUPPORTED,
            message=f"{message.TYPE} is not served on the {'local' if local else 'peer'} socket",
        )

    async def _answer_frame(self, request: Submit) -> Message:
        """An application's frame: the cheapest cache key first, the head, deeper keys, a tail.

        1. prepare the frame (crop, input tensor, thumbnail key) and look the
           thumbnail up: a hit answers before any model stage runs;
        2. plan the variant and whether the deeper key pays (only when the
           thumbnail lookup was inconclusive); run the head, stopping at the
           cache split for that lookup;
        3. on a miss, finish the head and resolve it at the best target; cache
           the answer at every depth whose key the frame has.
        """
        self.counters.submitted += 1
        cache = self.cache
        try:
            prepared, lookup = await self.worker.call(
                functools.partial(self._prepare_and_look_up, request.pixels)
            )
        except MediaError as exc:
            self.counters.errors += 1
            return ErrorReply(
                request_id=request.request_id, code=ErrorCode.BAD_FRAME, message=str(exc)
            )
        features: dict[str, np.ndarray] = {}
        reason = ""
        inconclusive = False
        if cache is not None:
            if prepared.thumbnail is None:
                reason = MissReason.NO_KEY
            else:
                features[THUMBNAIL_KEY] = prepared.thumbnail
            if lookup is not None:
                if lookup.hit:
                    return self._cache_answer(request, prepared, lookup, THUMBNAIL_KEY, features)
                reason, inconclusive = lookup.reason, lookup.inconclusive
        variant, use_deep = self._plan_frame(request.need, inconclusive)
        self.variant_counts[variant] += 1
        head = await self.worker.head(prepared, variant, with_cache=use_deep)
        deep = self.worker.cache_point.name
        if cache is not None and head.cache_tensor is not None:
            try:
                deep_feature = feature_from_tensor(head.cache_tensor)
            except BadFeatureError as exc:  # NaN or a flat tensor: no key at this depth
                warn_once("feature", "frame %s has no %s key: %s", request.frame_name, deep, exc)
            else:
                features[deep] = deep_feature
                if use_deep:
                    deep_lookup = await self.worker.call(
                        functools.partial(cache.lookup, deep, deep_feature)
                    )
                    self._hit_rate = (1 - HIT_RATE_ALPHA) * self._hit_rate + HIT_RATE_ALPHA * (
                        1.0 if deep_lookup.hit else 0.0
                    )
                    if deep_lookup.hit:
                        return self._cache_answer(
                            request, prepared, deep_lookup, deep, features, head.head_ms
                        )
                    reason = deep_lookup.reason
        if cache is not None and inconclusive and not use_deep:
            reason = MissReason.SKIPPED
        head = await self.worker.complete(head)
        result = await self._resolve_miss(request.request_id, request.frame_name, head)
        result = dataclasses.replace(
            result, head_ms=result.head_ms + prepared.prepare_ms, cache_reason=str(reason)
        )
        if cache is not None:
            cache.tiers.note_frame(None, str(reason))
            if features:
                cache.insert_later(features, result.label, result.confidence)
        return result

    def _prepare_and_look_up(self, pixels: np.ndarray) -> tuple[Prepared, LookupResult | None]:
        """On the model thread: prepare the frame and look its thumbnail up (no stage runs)."""
        prepared = self.worker.prepare_now(pixels)
        if self.cache is None or prepared.thumbnail is None:
            return prepared, None
        return prepared, self.cache.lookup(THUMBNAIL_KEY, prepared.thumbnail)

    def _cache_answer(
        self,
        request: Submit,
        prepared: Prepared,
        lookup: LookupResult,
        depth: str,
        features: dict[str, np.ndarray],
        head_ms: float = 0.0,
    ) -> InferResult:
        """Answer a frame from the cache; maybe audit the answer off the critical path.

        A hit at a deeper key also files the frame's thumbnail key with that
        answer, so the next such frame is answered before any stage runs: in
        `ccied bench cache` at 4x, without this, the second pass over the pans
        was answered 52 times at blocks.4 (139 ms median) and 29 times at the
        thumbnail (4 ms), because frames a deep key had answered never reached
        the thumbnail's index."""
        cache = self.cache
        assert cache is not None
        cache.tiers.note_frame(depth)
        self._count_answer(Source.CACHE)
        if depth != THUMBNAIL_KEY and THUMBNAIL_KEY in features:
            cache.promote(
                THUMBNAIL_KEY,
                features[THUMBNAIL_KEY],
                lookup.label,
                lookup.confidence,
                lookup.origin,
            )
        # should_check() first: a skipped audit (too many under way) still uses its turn.
        if cache.audit.should_check() and cache.audit.pending < MAX_PENDING_AUDITS:
            self._spawn(self._audit(prepared, lookup, depth, features))
        return InferResult(
            request_id=request.request_id,
            label=lookup.label,
            class_name=self.worker.model.spec.class_names[lookup.label],
            confidence=lookup.confidence,
            source=Source.CACHE,
            served_by=self.config.name,
            frame_name=request.frame_name,
            head_ms=prepared.prepare_ms + head_ms,
            cache_entry=cache.public_id(depth, lookup.entry_id),
            cache_distance=lookup.distance,
            cache_depth=depth,
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _audit(
        self,
        prepared: Prepared,
        lookup: LookupResult,
        depth: str,
        features: dict[str, np.ndarray],
    ) -> None:
        """Re-check a hit with the full model; the answer already given stays as it was.

        With a live neighbour, the frame's head goes there in the most faithful
        variant (a tail's worth of work elsewhere, a head's here); alone, the
        full model runs here on a low-priority thread, so frames never queue
        behind an audit on the model thread.
        """
        cache = self.cache
        assert cache is not None
        cache.audit.pending += 1
        head: HeadResult | None = None
        try:
            if self.cluster is not None and self.cluster.candidates():
                variant = self._choose_variant(Need.ACCURACY)
                head = await self.worker.complete(
                    await self.worker.head(prepared, variant, with_cache=False)
                )
                truth = await self._resolve_miss("", "", head, count=False)
                label, confidence = truth.label, truth.confidence
            else:
                full = await self.worker.audit(prepared.pixels)
                label, confidence = full.label, full.confidence
        except Exception:  # an audit must never cost the daemon; the hit stands
            log.exception("cache audit failed")
            return
        finally:
            cache.audit.pending -= 1
        wrong = label != lookup.label
        verdict = cache.audit.record(lookup.origin, wrong, confidence)
        if wrong:
            await cache.apply_verdict(
                verdict, depth, lookup.entry_id, lookup.origin, lookup.label, label
            )
            if verdict.refuse_origin:
                self._refuse_origin(lookup.origin)
            # The full model's answer replaces the wrong one.
            if head is not None and head.cache_tensor is not None:
                with contextlib.suppress(BadFeatureError):
                    features = {
                        **features,
                        self.worker.cache_point.name: feature_from_tensor(head.cache_tensor),
                    }
            cache.insert_later(features, label, confidence)

    def _share_entry(self, entry: NewEntry) -> None:
        """An entry this peer made goes to the neighbours (called on the loop)."""
        if self.cluster is not None:
            self.cluster.share(
                SharedEntry(entry.feature, entry.label, entry.confidence, entry.origin, entry.depth)
            )

    def _refuse_origin(self, origin: str) -> None:
        """Stop taking entries from ``origin`` and from the key that delivered them."""
        key = self._origin_keys.get(origin)
        if key:
            self._refused_keys.add(key)

    async def _answer_cache_command(self, command: CacheCommand) -> Message:
        cache = self.cache
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
            return ErrorReply(
                request_id=command.request_id, code=ErrorCode.INTERNAL, message=str(exc)
            )
        return StatusReply(request_id=command.request_id, bundle_id=self.bundle_id, status=status)

    def _shared_from_allowed(self, sender_key: str) -> bool:
        """Whether entries from the peer that proved ``sender_key`` may enter our cache.

        On a secure peer every sender already passed the allow-list; "cloud"
        narrows it to the key the ``--cloud`` address proved, so one
        compromised edge cannot answer for the whole cluster.
        """
        policy = self.config.accept_shared_from
        if policy == "none" or (sender_key and sender_key in self._refused_keys):
            return False
        if policy == "cloud":
            cloud = split_keyed_address(self.config.cloud or "")[0]
            key = self.cluster.key_of(cloud) if self.cluster is not None else None
            return bool(sender_key) and sender_key == key
        return True

    def _accept_shared(self, share: CacheShare, sender: str, sender_key: str = "") -> int:
        """Queue entries a neighbour shared for our cache; returns how many were sane.

        Only entries from an allowed sender (see :meth:`_shared_from_allowed`),
        of our bundle, with a valid feature, label and confidence are taken;
        they keep their origin and are not shared on (no loops).
        """
        if not self._shared_from_allowed(sender_key):
            self.counters.refused_shared += len(share.labels)
            warn_once(
                f"share-refused:{sender_key}",
                "refused shared cache entries from %s (accepting from: %s)",
                sender or sender_key or "a neighbour",
                self.config.accept_shared_from,
            )
            return 0
        cache = self.cache
        if cache is None or share.bundle_id != self.bundle_id:
            if cache is not None:
                warn_once(f"share-bundle:{sender}", "ignored cache entries of another bundle")
            return 0
        try:
            depth = cache.depth_for(share.depth, int(share.features.shape[1]))
        except BadFeatureError as exc:
            warn_once(f"share-depth:{sender}", "ignored shared cache entries: %s", exc)
            return 0
        classes = len(self.worker.model.spec.class_names)
        entries = []
        for feature, label, confidence, origin in zip(
            share.features, share.labels, share.confidences, share.origins, strict=True
        ):
            if cache.audit.refuses(origin):
                # The audit caught this origin's entries answering wrongly.
                self.counters.refused_shared += 1
                continue
            try:
                vector = cache.check_shared(depth, feature)
            except BadFeatureError as exc:
                warn_once(f"share-feature:{sender}", "ignored a shared entry: %s", exc)
                continue
            if 0 <= label < classes and 0.0 <= confidence <= 1.0:
                entries.append((vector, label, confidence, origin))
                if sender_key:
                    self._origin_keys[origin] = sender_key
        cache.insert_shared(depth, entries)
        if self.cluster is not None:
            self.cluster.shared_in += len(entries)
        return len(entries)

    async def _answer_sync(self, request: CacheSync) -> Message:
        """A neighbour that just came up asks for our hottest entries at one key depth."""
        cache = self.cache
        if cache is None or request.bundle_id != self.bundle_id:
            return ErrorReply(
                request_id=request.request_id,
                code=ErrorCode.UNSUPPORTED if cache is None else ErrorCode.BUNDLE_MISMATCH,
                message="no cache here" if cache is None else "another bundle",
            )
        depth = request.depth or cache.depths[0].name
        if depth not in {d.name for d in cache.depths}:
            return ErrorReply(
                request_id=request.request_id,
                code=ErrorCode.UNSUPPORTED,
                message=f"no key depth {depth!r} here",
            )
        count = min(request.max_entries, MAX_SHARED_ENTRIES)
        rows = await cache.hot_entries(depth, count)
        if not rows:
            return StatusReply(request_id=request.request_id, status={"entries": 0})
        message = share_message(
            [SharedEntry(e.feature, e.label, e.confidence, e.origin, depth) for e in rows],
            self.bundle_id,
            depth,
        )
        return CacheShare(**{**message.__dict__, "request_id": request.request_id})

    def _plan_frame(self, need: str, inconclusive: bool) -> tuple[str, bool]:
        """(variant, look the deeper key up?) for a frame the thumbnail did not answer.

        The deeper key is looked up when the head passes it anyway on the way
        to the variant's split (one lookup, about 0.1 ms, against the rest of
        the head, the network and the tail), and otherwise only when the
        thumbnail lookup was inconclusive (a close entry but no hit) and
        computing the key pays for itself at the recent hit rate of deeper
        lookups (:meth:`_choose`). Every CACHE_PROBE_EVERY-th such frame looks
        up anyway, so that hit rate stays measured while the key is skipped.
        (On bigbuckbunny.mp4, every 4th frame, blocks.4 answered 0.52 of the
        frames and the thumbnail 0.33: looking deeper only when inconclusive
        left most of that on the table.)
        """
        variant, pays = self._choose(need)
        if self.cache is None:
            return variant, False
        on_the_way = self.worker.head_ms(variant) >= self._key_ms()
        if on_the_way:
            return variant, True
        if not inconclusive:
            return variant, False
        if not pays:
            self._since_lookup += 1
            if self._since_lookup >= CACHE_PROBE_EVERY:
                pays = True
            else:
                self.counters.cache_skipped += 1
        if pays:
            self._since_lookup = 0
        return variant, pays

    def _choose_variant(self, need: str) -> str:
        return self._choose(need)[0]

    def _choose(self, need: str) -> tuple[str, bool]:
        """(variant, does the deeper cache key pay?) for the live targets, no side effects.

        For each live target and each allowed variant the planner estimates the
        time to an answer from this device's head time, the payload over the
        measured link and the target's tail behind its queue, and whether
        computing the deeper key pays for itself at the recent hit rate
        (:func:`ccied.pruning.planner.cache_plan`). A pinned variant keeps its
        variant; the cache choice is still made.
        """
        worker = self.worker
        if self.config.variant is not None:
            names = [self.config.variant]
        else:
            names = list(self.config.variants or worker.variants)
        default = self.config.variant or self.bundle.default_variant
        if default not in names:
            default = names[0]
        allowed = [self.bundle.variant(name) for name in names]
        head_ms = {name: worker.head_ms(name) for name in names}
        key_ms = self._key_ms()
        payload = {name: worker.payload_bytes(name) for name in names}

        def judged(name: str, miss_ms: float) -> tuple[float, bool]:
            if self.cache is None:
                return head_ms[name] + miss_ms, False
            return cache_plan(head_ms[name], key_ms, miss_ms, self._hit_rate)

        best: tuple[tuple[float, float], str, bool] | None = None
        candidates = self.cluster.candidates() if self.cluster is not None else []
        for candidate in candidates:
            remote_full = candidate.tail_ms or worker.full_ms()
            tails = {
                name: remote_full * worker.tail_share(name) * (candidate.queue_length + 1)
                for name in names
            }
            ranked = rank_variants(
                allowed,
                head_ms,
                tails,
                payload,
                Link(candidate.rtt_ms, candidate.bandwidth_mbps),
                Need(need),
                self.config.fidelity_floor,
            )
            for rank, choice in enumerate(ranked):
                name = choice.variant.name
                expected, use_cache = judged(name, choice.expected_ms - head_ms[name])
                # The ranking's order stands for the fidelity floor and an
                # accuracy-first need; the time decides among equals.
                below = (choice.variant.agreement or 0.0) < self.config.fidelity_floor
                order = (float(rank) if need == Need.ACCURACY else float(below), expected)
                if best is None or order < best[0]:
                    best = (order, name, use_cache)
        if best is None:  # nobody to send to: the frame finishes here
            _, use_cache = judged(default, worker.local_rest_ms(default, with_cache=False))
            return default, use_cache
        _, variant, use_cache = best
        return variant, use_cache

    def _key_ms(self) -> float:
        """This device's time from frame to the cache key."""
        return sum(self.worker.stage_ms[: self.worker.cache_point.index + 1])

    async def _resolve_miss(
        self, request_id: str, frame_name: str, head: HeadResult, count: bool = True
    ) -> InferResult:
        """A cache miss: the tail at the first target that answers, else our own.

        ``count=False`` for the audit's re-checks: not an application's answer."""
        bytes_sent = bytes_received = 0
        assert self.cluster is not None
        local = Candidate(
            name=self.config.name,
            kind=TargetKind.LOCAL,
            address="",
            tail_ms=self.worker.rest_ms_from(head.reach_index),
            queue_length=max(0, self._computing - 1),
        )
        share = self.worker.tail_share(head.variant)
        payload = head.payload
        assert payload is not None, "complete() the head before resolving a miss"
        remotes = [
            dataclasses.replace(c, tail_ms=c.tail_ms * share) for c in self.cluster.candidates()
        ]
        if self.config.always_offload and remotes:
            route = [*sorted(remotes, key=lambda c: c.expected_ms(payload.nbytes)), local]
        else:
            route = plan([local, *remotes], int(payload.nbytes))
        for target in route[:-1]:
            exchange = await self.cluster.request(
                target, self._infer_request(head), self.config.remote_timeout_s
            )
            bytes_sent += exchange.bytes_sent
            bytes_received += exchange.bytes_received
            reply = exchange.reply
            if isinstance(reply, InferResult):
                self._observe_tail(target.name, head.variant, reply.tail_ms)
                if count:
                    self._probe_others(target.name, head)
                if count:
                    self._count_answer(reply.source)
                return InferResult(
                    request_id=request_id,
                    label=reply.label,
                    class_name=reply.class_name,
                    confidence=reply.confidence,
                    source=reply.source,
                    served_by=reply.served_by,
                    frame_name=frame_name,
                    head_ms=head.head_ms,
                    tail_ms=reply.tail_ms,
                    bytes_sent=bytes_sent,
                    bytes_received=bytes_received,
                    variant=head.variant,
                )
            reason = exchange.error or (
                f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else "bad reply"
            )
            self.counters.failovers += int(count)
            warn_once(
                f"failover:{target.address}:{reason.split(':', 1)[0]}",
                "target %s failed (%s); trying the next",
                target.address,
                reason,
            )
        prediction = await self.worker.finish(head)
        if count:
            self._count_answer(Source.LOCAL)
        return InferResult(
            request_id=request_id,
            label=prediction.label,
            class_name=prediction.class_name,
            confidence=prediction.confidence,
            source=Source.LOCAL,
            served_by=self.config.name,
            frame_name=frame_name,
            head_ms=head.head_ms,
            tail_ms=prediction.tail_ms,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            variant=head.variant,
        )

    def _infer_request(self, head: HeadResult) -> InferRequest:
        """The message that asks a neighbour for the tail of this head's payload."""
        assert head.payload is not None, "complete() the head before sending it"
        return InferRequest(
            request_id=uuid.uuid4().hex,
            bundle_id=self.bundle_id,
            origin=self.config.name,
            variant=head.variant,
            encoding=head.encoding,
            deadline_ms=self.config.remote_timeout_s * 1e3,
            tensor=head.payload,
        )

    def _observe_tail(self, name: str, variant: str, tail_ms: float) -> None:
        """A neighbour's reply says how long its tail took: its whole model, scaled."""
        if self.cluster is None:
            return
        share = self.worker.tail_share(variant)
        if share > 0.05:
            self.cluster.estimates.observed(name, tail_ms / share, time.monotonic())

    def _probe_others(self, answered_by: str, head: HeadResult) -> None:
        """Send a copy of this miss to neighbours not tried for a while, in the background
        (the answer is only timed), so one bad early estimate cannot shut one out."""
        assert self.cluster is not None
        now = time.monotonic()
        for candidate in self.cluster.candidates():
            if candidate.name == answered_by or candidate.queue_length > 0:
                continue
            if not self.cluster.estimates.due_for_probe(candidate.name, now):
                continue
            self.cluster.estimates.sent(candidate.name, now)
            self._spawn(self._probe(candidate, head))

    async def _probe(self, candidate: Candidate, head: HeadResult) -> None:
        assert self.cluster is not None and head.payload is not None
        exchange = await self.cluster.request(
            candidate, self._infer_request(head), self.config.remote_timeout_s
        )
        if isinstance(exchange.reply, InferResult):
            self._observe_tail(candidate.name, head.variant, exchange.reply.tail_ms)
        self.counters.probes += 1

    async def _answer_tensor(self, request: InferRequest) -> Message:
        """Another peer's tensor: run the tail if we share its bundle."""
        if request.bundle_id != self.bundle_id:
            self.counters.refused_bundle += 1
            warn_once(
                f"bundle:{request.origin}",
                "refused tensor from %s: bundle %s, ours is %s",
                request.origin,
                request.bundle_id,
                self.bundle_id,
            )
            return ErrorReply(
                request_id=request.request_id,
                bundle_id=self.bundle_id,
                code=ErrorCode.BUNDLE_MISMATCH,
                message=f"bundle {request.bundle_id!r} differs from this peer's {self.bundle_id!r}",
            )
        started = time.perf_counter()
        try:
            # Batched with other tensors of its variant (peer/tails.py).
            prediction = await self.tails.run(
                request.variant, request.tensor, request.encoding, request.deadline_ms
            )
        except BadTensorError as exc:
            self.counters.errors += 1
            return ErrorReply(
                request_id=request.request_id, code=ErrorCode.BAD_TENSOR, message=str(exc)
            )
        except DeadlineExpiredError as exc:  # its sender has moved on: not run late
            self.counters.busy += 1
            return ErrorReply(request_id=request.request_id, code=ErrorCode.BUSY, message=str(exc))
        self.counters.served_for_peers += 1
        return InferResult(
            request_id=request.request_id,
            bundle_id=self.bundle_id,
            label=prediction.label,
            class_name=prediction.class_name,
            confidence=prediction.confidence,
            source=Source.CLOUD if self.config.role is Role.CLOUD else Source.PEER,
            served_by=self.config.name,
            tail_ms=prediction.tail_ms,
            served_ms=(time.perf_counter() - started) * 1e3,
        )

    def _count_answer(self, source: Source) -> None:
        self.counters.answered += 1
        self.counters.by_source[str(source)] += 1

    # -- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Identity, bundle, targets and counters, as ``ccied status --json`` prints."""
        c = self.counters
        point = self.worker.cache_point
        return {
            "name": self.config.name,
            "role": str(self.config.role),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "wire_version": WIRE_VERSION,
            "bundle_id": self.bundle_id,
            "model": self.bundle.model.spec.name,
            "bundle": str(self.bundle.path) if self.bundle.path else "built-in",
            "cache_split": {
                "name": point.name,
                "shape": list(point.output_shape),
                "float32_bytes": point.float32_bytes,
                "compute_fraction": round(point.compute_fraction, 4),
            },
            "variants": [
                {
                    "name": name,
                    "split": runtime.variant.split,
                    "keep_ratio": runtime.variant.keep_ratio,
                    "bits": runtime.variant.bits,
                    "agreement": runtime.variant.agreement,
                    "payload_bytes": round(runtime.payload_bytes()),
                    "head_ms": round(self.worker.head_ms(name), 3),
                    "chosen": self.variant_counts[name],
                }
                for name, runtime in self.worker.variants.items()
            ],
            "pinned_variant": self.config.variant,
            "device": str(self.worker.device),
            "device_name": device_name(str(self.worker.device)),
            "batching": self.tails.status(),
            "listen": self.listen_address or None,
            "socket": str(self._socket_path) if self._socket_path else None,
            "neighbours": self._neighbours(),
            "cluster": self.cluster.describe() if self.cluster is not None else {},
            "discovery": "mdns" if self.discovery is not None else "off",
            "emulated_slowdown": self.worker.slowdown,
            "metrics": self.metrics.url if self.metrics is not None else None,
            "cache": (
                {"enabled": True, "cache_skipped": c.cache_skipped, **self.cache.stats()}
                if self.cache is not None
                else {"enabled": False}
            ),
            "requests": {
                "submitted": c.submitted,
                "answered": c.answered,
                "by_source": dict(c.by_source),
                "failovers": c.failovers,
                "errors": c.errors,
                "busy": c.busy,
                "protocol_errors": c.protocol_errors,
                "served_for_peers": c.served_for_peers,
                "refused_bundle": c.refused_bundle,
                "refused_shared": c.refused_shared,
                "cache_skipped": c.cache_skipped,
                "probes": c.probes,
                "refused_handshakes": c.refused_handshakes,
                "pending": self._pending,
            },
            "security": self._security_status(),
            # Problems an operator should see first (plain `ccied status` shows them on top).
            "warnings": self.cluster.problems() if self.cluster is not None else [],
            # WARNING lines held back by the log's rate limit, by kind (discovery/logutil.py).
            "suppressed_warnings": suppressed_warnings(),
        }

    def _neighbours(self) -> list[dict[str, Any]]:
        """The table's live neighbours, each with the tail estimate routing uses and whence."""
        rows = self.table.snapshot()
        if self.cluster is not None:
            estimates = self.cluster.estimates.describe(time.monotonic())
            for row in rows:
                row["tail_estimate"] = estimates.get(str(row.get("name")), {"source": "unknown"})
        return rows

    def _security_status(self) -> dict[str, Any]:
        if self.keys is None or self.identity is None:
            return {"mode": "insecure", "accept_shared_from": self.config.accept_shared_from}
        return {
            "mode": "curve",
            "public_key": self.identity.public,
            "state_dir": str(self.keys.state_dir),
            "trusted_keys": len(self.keys.trusted()),
            # Peers started with this state folder share its key and so trust each
            # other with no file in trusted/ ("trusted 0" looked like nobody).
            "own_key_trusted": True,
            "accept_shared_from": self.config.accept_shared_from,
        }


class _Stopping(Exception):
    """Raised inside the task group to cancel its tasks on a stop request."""


class _AllowList:
    """ZAP credentials provider: a client key passes if the key store trusts it."""

    def __init__(self, keys: KeyStore, counters: Counters | None = None) -> None:
        self._keys = keys
        self._counters = counters

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode("ascii", "replace")
        try:
            allowed = self._keys.is_trusted(text)
        except Exception as exc:  # an exception here ends pyzmq's ZAP task,
            # and with it every handshake until a restart: refuse this one instead.
            warn_once(
                f"allow-list:{type(exc).__name__}",
                "refused a handshake: the allow-list could not be read (%r)",
                exc,
            )
            allowed = False
        if not allowed and self._counters is not None:
            self._counters.refused_handshakes += 1
        if not allowed:
            warn_once(
                f"zap-denied:{text}",
                "refused a peer with untrusted key %s (`ccied keys trust %s` if it is yours)",
                text,
                text,
            )
        return allowed


def _user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of a received frame (the sender's Z85 key), or ''."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return ""
    return value if isinstance(value, str) else ""


def _request_id_hint(codec: WireCodec, body: list[bytes]) -> str:
    """The request id of a message, when it can be read at all ('' otherwise)."""
    try:
        return codec.decode(body).request_id
    except ProtocolError as exc:
        return exc.request_id


def _prepare_socket_path(path: Path) -> None:
    """Make the socket's folder (0700) if missing, check it is ours, clear a stale socket.

    A folder another user made first (``/tmp/ccied-UID`` is guessable) or one
    others may write to lets them replace the socket and answer our
    applications' frames, so either is refused rather than warned about.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise PeerError(f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise PeerError(f"socket folder {folder} is not a folder (a link?); refusing it")
    if st.st_uid != os.geteuid():
        raise PeerError(
            f"socket folder {folder} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}); someone else could replace the socket: remove the "
            "folder or pass --socket in a folder of your own"
        )
    if st.st_mode & 0o077:
        raise PeerError(
            f"socket folder {folder} is mode {stat.S_IMODE(st.st_mode):o}; it must be 0700 "
            f"(chmod 700 {folder}) so that nobody else can replace the socket"
        )
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise PeerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left behind by a peer that died: safe to reuse
        return
    finally:
        probe.close()
    raise PeerError(f"another peer is already serving on {path}")


def _unlink_own_socket(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket file this peer created, and not one another peer made since."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != inode:
        log.warning("not removing %s: it is no longer the socket this peer created", path)
        return
    path.unlink(missing_ok=True)
