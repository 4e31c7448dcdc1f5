"""Real peers for the end-to-end tests, their keys, and raw requests to their sockets.

Tests import these as ``from peers import ...`` (pytest puts ``tests/`` on the
path). ``PeerProcess``, ``free_tcp_port`` and ``running`` stay in
``ccied.bench.cluster``: the benchmarks and the demo start peers too.
"""

from __future__ import annotations

from pathlib import Path

import zmq
from ccied.bench.cluster import PeerProcess, free_tcp_port
from ccied.peer.keys import Keypair, KeyStore
from ccied.peer.wire import Message, decode, encode

__all__ = [
    "dealer",
    "exchange",
    "keys_of",
    "local_address",
    "peer_keys",
    "peer_process",
    "random_keypair",
    "raw_request",
    "trust_each_other",
]


def dealer(keys: tuple[Keypair, str] | None = None) -> zmq.Socket[bytes]:
    """A DEALER for raw requests; ``keys`` = (our keypair, the server's public key)
    makes it a CURVE client, as a peer socket requires."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_secretkey = keys[0].secret.encode()
        sock.curve_publickey = keys[0].public.encode()
        sock.curve_serverkey = keys[1].encode()
    return sock


def peer_process(
    folder: Path,
    name: str,
    role: str = "edge",
    *extra_args: str,
    listen: str | None = None,
    shared_keys: bool = False,
    state_dir: Path | None = None,
    mdns_service_type: str | None = None,
    insecure: bool = False,
) -> PeerProcess:
    """A peer (not started) with ``NAME.sock`` and ``NAME.log`` in ``folder``.

    ``listen``: its peer socket; by default a loopback TCP port that is free now,
    ``"none"`` for no peer socket. Its keys are its own, in ``folder/state/NAME``,
    trusting nobody until a test says so (``trust_each_other``); ``shared_keys``
    gives it the key set of every peer whose socket is in ``folder`` instead, all
    trusting each other (``PeerProcess``'s default).
    """
    if state_dir is None and not shared_keys:
        state_dir = folder / "state" / name
    return PeerProcess(
        name=name,
        role=role,
        listen=f"tcp://127.0.0.1:{free_tcp_port()}" if listen is None else listen,
        socket_path=folder / f"{name}.sock",
        extra_args=list(extra_args),
        log_path=folder / f"{name}.log",
        state_dir=state_dir,
        mdns_service_type=mdns_service_type,
        insecure=insecure,
    )


def local_address(peer: PeerProcess) -> str:
    """The ZeroMQ address of the peer's local (Unix) socket, where frames are submitted."""
    return f"ipc://{peer.socket_path}"


# -- keys ---------------------------------------------------------------------------


def keys_of(peer: PeerProcess) -> KeyStore:
    """The peer's key store, with a key made on first use (before it ever starts)."""
    store = peer.keys()
    if not store.exists():
        store.generate(peer.name)
    return store


def trust_each_other(*peers: PeerProcess) -> None:
    for a in peers:
        for b in peers:
            if a is not b:
                keys_of(a).trust(keys_of(b).load().public, b.name)


def peer_keys(client: PeerProcess, server: PeerProcess) -> tuple[Keypair, str]:
    """Speak to ``server``'s peer socket as ``client`` would: (its keypair, the server's key)."""
    return keys_of(client).load(), keys_of(server).load().public


def random_keypair() -> Keypair:
    """A fresh CURVE keypair that no peer trusts."""
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode(), secret.decode())


# -- raw requests over a fresh DEALER -----------------------------------------------


def _one_reply(
    address: str, frames: list[bytes], keys: tuple[Keypair, str] | None, timeout_ms: int
) -> Message | None:
    sock = dealer(keys)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return decode(sock.recv_multipart())
    finally:
        sock.close(linger=0)


def raw_request(
    address: str, message: Message, keys: tuple[Keypair, str] | None, timeout_ms: int = 3000
) -> Message | None:
    """One message; None when nothing comes back in time (as a refused client sees it).

    ``keys`` (our keypair, the server's public key) makes it a CURVE client, as a
    peer socket requires; the local socket takes None.
    """
    return _one_reply(address, encode(message), keys, timeout_ms)


def exchange(
    address: str,
    frames: list[bytes],
    timeout_ms: int = 10_000,
    keys: tuple[Keypair, str] | None = None,
) -> Message:
    """Raw frames (well-formed or not) that must be answered; the decoded reply."""
    reply = _one_reply(address, frames, keys, timeout_ms)
    assert reply is not None, f"no reply from {address}"
    return reply
