"""The peer's two listening sockets: bound, authenticated, served with back-pressure.

* the **local socket** (ZeroMQ ROUTER over a Unix socket, 0600 in a 0700 folder
  of the peer's user) where the device's applications submit frames;
* the **peer socket** (ZeroMQ ROUTER over TCP, CurveZMQ unless --insecure)
  where trusted peers send tensors, heartbeats and cache entries. A ZAP handler
  checks each client's key against the allow-list before any message is read.

Requests flow one way: each message goes to the handler on a task of its own,
at most ``max_pending`` at once (beyond that the sender gets BUSY at once), and
what the handler returns is the reply. The server knows nothing of frames,
models or caches; a handler that raises costs one request an INTERNAL error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth.asyncio
from ccied.discovery.logutil import WarnOnce
from ccied.peer.counters import Counters
from ccied.peer.errors import PeerError, ProtocolError
from ccied.peer.keys import Keypair, KeyStore
from ccied.peer.wire import MAX_TENSOR_BYTES, ErrorCode, ErrorReply, Message, WireCodec

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

# Unix socket paths are limited to 107 bytes by the kernel (sun_path).
MAX_SOCKET_PATH_BYTES = 107
ZAP_DOMAIN = "ccied"

# (message body, from the local socket?, the key the sender's handshake proved) -> reply
Handler = Callable[[list[bytes], bool, str], Awaitable[Message]]


class PeerServer:
    """Bind with :meth:`start`, run :meth:`serve` until cancelled, then :meth:`aclose`."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        codec: WireCodec,
        handler: Handler,
        counters: Counters,
        *,
        listen: str | None,
        socket_path: Path | None,
        max_pending: int,
        identity: Keypair | None = None,
        keys: KeyStore | None = None,
    ) -> None:
        self._context = context
        self._codec = codec
        self._handler = handler
        self._counters = counters
        self._listen = listen
        self._max_pending = max_pending
        self._identity = identity
        self._keys = keys
        self._wanted_socket = socket_path
        self._authenticator: zmq.auth.asyncio.AsyncioAuthenticator | None = None
        self._local: zmq.asyncio.Socket | None = None
        self._peer: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket_inode = (0, 0)  # (device, inode) of the socket file we made
        self.pending = 0  # requests of any kind in progress
        self.listen_address = ""  # the bound address, port resolved
        self.socket_path: Path | None = None  # once bound

    def start(self) -> None:
        """Start the ZAP handler (before anything binds), then bind both sockets."""
        if self._keys is not None and self._identity is not None:
            self._authenticator = zmq.auth.asyncio.AsyncioAuthenticator(self._context, log=log)
            self._authenticator.start()
            self._authenticator.configure_curve_callback(
                ZAP_DOMAIN, AllowList(self._keys, self._counters)
            )
        if self._listen:
            self._peer = self._router(self._listen, self._identity)
            endpoint = self._peer.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(endpoint, bytes)
            self.listen_address = endpoint.decode()
        if self._wanted_socket is not None:
            path = self._wanted_socket
            prepare_socket_path(path)
            # umask makes the socket file 0600 from the moment it exists.
            old_umask = os.umask(0o177)
            try:
                self._local = self._router(f"ipc://{path}")
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            st = path.lstat()
            self.socket_path, self._socket_inode = path, (st.st_dev, st.st_ino)

    async def serve(self) -> None:
        """Serve both sockets until cancelled."""
        async with asyncio.TaskGroup() as group:
            if self._local is not None:
                group.create_task(self._serve(self._local, local=True))
            if self._peer is not None:
                group.create_task(self._serve(self._peer, local=False))

    async def aclose(self) -> None:
        """Cancel the requests under way, close the sockets, remove our socket file."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self._local, self._peer):
            if sock is not None:
                sock.close(linger=0)
        self._local = self._peer = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self.remove_socket_file()

    def remove_socket_file(self) -> None:
        """Remove the socket file this server created (and not one made since by another)."""
        if self.socket_path is not None:
            unlink_own_socket(self.socket_path, self._socket_inode)
            self.socket_path = None

    def _router(self, address: str, identity: Keypair | None = None) -> zmq.asyncio.Socket:
        """A ROUTER bound to ``address``; with ``identity``, a CURVE server whose
        clients must prove a key on the allow-list (ZAP)."""
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

    async def _serve(self, sock: zmq.asyncio.Socket, *, local: bool) -> None:
        secure = not local and self._identity is not None
        while True:
            parts = await sock.recv_multipart(copy=False)
            if len(parts) < 2:
                continue  # ROUTER always prepends the identity; nothing to answer
            # The key the sender's handshake proved (ZAP's User-Id): who sent this.
            sender_key = _user_id(parts[1]) if secure else ""
            frames = [part.bytes for part in parts]
            identity, body = frames[0], frames[1:]
            if self.pending >= self._max_pending:
                self._counters.busy += 1
                reply = ErrorReply(
                    request_id=request_id_hint(self._codec, body),
                    code=ErrorCode.BUSY,
                    message="queue full",
                )
                await self._send(sock, identity, reply)
                continue
            self.pending += 1
            task = asyncio.create_task(self._handle(sock, identity, body, local, sender_key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Let the new task start before the next message: with many queued,
            # cheap requests (an error reply, a status) finish and free their
            # slot instead of the loop filling the queue and answering BUSY.
            await asyncio.sleep(0)

    async def _handle(
        self, sock: zmq.asyncio.Socket, identity: bytes, body: list[bytes], local: bool, key: str
    ) -> None:
        try:
            reply = await self._handler(body, local, key)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("internal error while answering a request")
            self._counters.errors += 1
            reply = ErrorReply(
                request_id=request_id_hint(self._codec, body),
                code=ErrorCode.INTERNAL,
                message=f"internal error: {exc}",
            )
        finally:
            self.pending -= 1
        await self._send(sock, identity, reply)

    async def _send(self, sock: zmq.asyncio.Socket, identity: bytes, message: Message) -> None:
        try:
            await sock.send_multipart([identity, *self._codec.encode(message)], flags=zmq.NOBLOCK)
        except zmq.Again:
            # The requester is gone or not reading: its reply has nowhere to go.
            warn_once(
                "reply-dropped", "reply %s dropped: requester not reading", message.request_id
            )
        except zmq.ZMQError as exc:
            warn_once("reply-failed", "reply %s failed: %s", message.request_id, exc)


class AllowList:
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


def request_id_hint(codec: WireCodec, body: list[bytes]) -> str:
    """The request id of a message, when it can be read at all ('' otherwise)."""
    try:
        return codec.decode(body).request_id
    except ProtocolError as exc:
        return exc.request_id


def prepare_socket_path(path: Path) -> None:
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


def unlink_own_socket(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket file this peer created, and not one another peer made since."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != inode:
        log.warning("not removing %s: it is no longer the socket this peer created", path)
        return
    path.unlink(missing_ok=True)


__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "ZAP_DOMAIN",
    "AllowList",
    "Handler",
    "PeerServer",
    "prepare_socket_path",
    "request_id_hint",
    "unlink_own_socket",
]
