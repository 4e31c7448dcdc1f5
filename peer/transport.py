"""Outgoing requests to another peer over a ZeroMQ DEALER socket.

The daemon's routing sees only :class:`Exchange` results, never sockets: a
target that is down, slow or answers garbage comes back as an Exchange with an
``error``, and the caller fails over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from ccied.discovery.logutil import WarnOnce
from ccied.peer.errors import ProtocolError
from ccied.peer.keys import Keypair
from ccied.peer.wire import MAX_TENSOR_BYTES, Message, WireCodec, message_bytes
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Messages waiting for a slow target beyond this are dropped by ZeroMQ
# rather than queued without bound.
SEND_QUEUE_MESSAGES = 64


_HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake refused: this peer's key is not trusted there",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "handshake failed: wrong server key, or one side runs --insecure"
    ),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "handshake failed: wrong server key, or one side runs --insecure"
    ),
}


class EmulatedLink:
    """An uplink slower than loopback, emulated in the sender (said so in status).

    Kernel netem is not available on our test machines, so a peer can be told
    its uplink has ``bandwidth_mbps`` and ``rtt_ms``: before each message goes
    out it waits the upload time (one message at a time, as on a real link)
    and the round trip.
    """

    def __init__(self, bandwidth_mbps: float | None = None, rtt_ms: float = 0.0) -> None:
        if (bandwidth_mbps is not None and bandwidth_mbps <= 0) or rtt_ms < 0:
            raise ValueError("emulated bandwidth must be positive and rtt non-negative")
        self.bandwidth_mbps = bandwidth_mbps
        self.rtt_ms = rtt_ms
        self._uplink = asyncio.Lock()
        # Bytes of every request sent to other peers over this uplink (on the loop).
        self.bytes_sent = 0

    @property
    def active(self) -> bool:
        return self.bandwidth_mbps is not None or self.rtt_ms > 0

    async def delay(self, num_bytes: int) -> None:
        if self.bandwidth_mbps is not None:
            async with self._uplink:
                await asyncio.sleep(num_bytes * 8 / (self.bandwidth_mbps * 1e6))
        if self.rtt_ms > 0:
            await asyncio.sleep(self.rtt_ms / 1e3)

    def describe(self) -> dict[str, object]:
        return {
            "emulated": self.active,
            "bandwidth_mbps": self.bandwidth_mbps,
            "rtt_ms": self.rtt_ms,
        }


@dataclass(frozen=True)
class Exchange:
    """The outcome of one request to one target."""

    reply: Message | None
    error: str | None
    bytes_sent: int
    bytes_received: int
    elapsed_ms: float


@dataclass
class TargetStats:
    sent: int = 0
    answered: int = 0
    failures: int = 0
    last_error: str = ""
    last_rtt_ms: float = 0.0
    counts_by_error: dict[str, int] = field(default_factory=dict)


class RemoteTarget:
    """Another peer (edge or cloud) at a ZeroMQ address, reached through one DEALER socket."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        address: str,
        codec: WireCodec,
        link: EmulatedLink | None = None,
        identity: Keypair | None = None,
        server_key: str | None = None,
        quiet: bool = False,
    ) -> None:
        """``identity`` and ``server_key`` switch on CURVE: this peer proves its
        key, and the connection completes only with the peer that holds the
        secret of ``server_key`` (None for both: plain, ``--insecure``)."""
        self.address = address
        self.server_key = server_key
        self.created = time.monotonic()
        self.link = link
        self.stats = TargetStats()
        self._codec = codec
        self._pending: dict[str, asyncio.Future[tuple[Message, int]]] = {}
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Queue only on completed connections: with no live target a send fails
        # at once (EAGAIN) and the frame is answered elsewhere without waiting.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDHWM, SEND_QUEUE_MESSAGES)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_TENSOR_BYTES + 1024)
        # A link trying a key on the chance it is the right one retries slowly.
        self._socket.setsockopt(zmq.RECONNECT_IVL, 1000 if quiet else 100)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if identity is not None:
            if server_key is None:
                raise ValueError("a CURVE link needs the server's public key")
            self._socket.curve_secretkey = identity.secret.encode("ascii")
            self._socket.curve_publickey = identity.public.encode("ascii")
            self._socket.curve_serverkey = server_key.encode("ascii")
        self.connected = False
        # Why the last handshake failed ("" if none did since the last success):
        # the one clue a user gets when keys do not match.
        self.handshake_error = ""
        # A link that tries a key on the chance that it is the one there
        # (while a static address's key is unknown) fails quietly.
        self.quiet = quiet
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        try:
            self._socket.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(f"cannot connect to {address!r}: {exc}") from exc

    @property
    def given_up(self) -> bool:
        """libzmq does not reconnect after a refused or broken handshake (it
        ends the session on a protocol error): such a link must be replaced
        to try again, say after the other side trusted our key."""
        return bool(self.handshake_error) and not self.connected

    async def run(self) -> None:
        """Read replies and connection events until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_connection())
            group.create_task(self._read_replies())

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            kind = event["event"]
            was = self.connected
            self.connected = kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if self.connected:
                self.handshake_error = ""
            elif kind in _HANDSHAKE_FAILURES:
                self.handshake_error = _HANDSHAKE_FAILURES[kind]
                if self.quiet:
                    log.debug("%s with key %s: %s", self.address, self.server_key, kind)
                    continue
                warn_once(
                    f"handshake:{self.address}:{self.server_key}",
                    "%s: %s",
                    self.address,
                    self.handshake_error,
                )
            if was != self.connected:
                log.info("%s %s", self.address, "connected" if self.connected else "disconnected")

    async def _read_replies(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                message = self._codec.decode(frames)
            except ProtocolError as exc:
                # A target that answers garbage is broken, not a reason to stop.
                warn_once(
                    f"garbage:{self.address}", "undecodable reply from %s: %s", self.address, exc
                )
                continue
            waiter = self._pending.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((message, message_bytes(frames)))

    async def request(self, message: Message, timeout_s: float) -> Exchange:
        """Send one request and wait for its reply, at most ``timeout_s``."""
        start = time.perf_counter()
        frames = self._codec.encode(message)
        waiter: asyncio.Future[tuple[Message, int]] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = waiter
        sent = 0
        try:
            if self.link is not None and self.link.active:
                await self.link.delay(message_bytes(frames))
            try:
                await self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                return self._failed("not connected", start, sent)
            sent = message_bytes(frames)
            self.stats.sent += 1
            if self.link is not None:
                self.link.bytes_sent += sent
            try:
                reply, received = await asyncio.wait_for(waiter, timeout_s)
            except TimeoutError:
                return self._failed(f"no answer within {timeout_s * 1e3:.0f} ms", start, sent)
        finally:
            self._pending.pop(message.request_id, None)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self.stats.answered += 1
        self.stats.last_rtt_ms = elapsed_ms
        return Exchange(reply, None, sent, received, elapsed_ms)

    def _failed(self, error: str, start: float, sent: int) -> Exchange:
        self.stats.failures += 1
        self.stats.last_error = error
        key = error.split(" ", 1)[0]
        self.stats.counts_by_error[key] = self.stats.counts_by_error.get(key, 0) + 1
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return Exchange(None, error, sent, 0, elapsed_ms)

    def describe(self) -> dict[str, object]:
        """Status of this target for ``ccied status``."""
        return {
            "address": self.address,
            "connected": self.connected,
            "secure": self.server_key is not None,
            "handshake_error": self.handshake_error,
            "sent": self.stats.sent,
            "answered": self.stats.answered,
            "failures": self.stats.failures,
            "last_error": self.stats.last_error,
            "last_rtt_ms": round(self.stats.last_rtt_ms, 3),
        }

    def close(self) -> None:
        for waiter in self._pending.values():
            waiter.cancel()
        self._pending.clear()
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
