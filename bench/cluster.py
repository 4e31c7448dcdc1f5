"""Peers as real separate processes on this machine, started and stopped cleanly.

Used by ``ccied demo``, the benchmarks and the end-to-end tests: each peer is a
``ccied peer`` process with its own sockets; stopping sends SIGTERM, waits, and
kills what does not exit, so no orphan outlives the caller (even on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ccied.peer.client import Client
from ccied.peer.errors import PeerUnavailableError
from ccied.peer.keys import KeyStore, split_keyed_address

DEFAULT_READY_TIMEOUT_S = 120.0
DEFAULT_STOP_TIMEOUT_S = 10.0
# A neighbour heard from within this many seconds (heartbeats every 0.5 s).
HEALTHY_SEEN_S = 1.0


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class LocalKeys:
    """Keys for a cluster on one machine: each peer its own identity, all trusting
    each other (what an operator does by hand with ``ccied keys trust``).

    Peers get ``ROOT/NAME`` as their state folder; a peer added later is
    trusted by the ones already running, as peers re-read their allow-list.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def state_dir(self, name: str) -> Path:
        store = KeyStore(self.root / name)
        if not store.exists():
            keypair = store.generate(name)
            for folder in sorted(self.root.iterdir()):
                other = KeyStore(folder)
                if folder.name != name and other.exists():
                    other.trust(keypair.public, name)
                    store.trust(other.load().public, folder.name)
        return store.state_dir


def local_keys(folder: Path) -> LocalKeys:
    """The shared key set of every peer whose socket lives in ``folder``."""
    return LocalKeys(folder / "ccied-keys")


@dataclass
class PeerProcess:
    """One ``ccied peer`` subprocess and where to reach it."""

    name: str
    role: str
    listen: str
    socket_path: Path
    extra_args: Sequence[str] = ()
    log_path: Path | None = None
    threads: int | None = 1
    # mDNS under this service type (None: --no-discovery), on this interface.
    mdns_service_type: str | None = None
    interface: str = "127.0.0.1"
    # Run the peer through this command, e.g. ["ip", "netns", "exec", "h1"].
    prefix: Sequence[str] = ()
    # Keys and allow-list (None: its own key, trusted by every peer whose
    # socket is in the same folder; see local_keys). Ignored when insecure.
    state_dir: Path | None = None
    insecure: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:
        cmd = [
            *self.prefix,
            sys.executable, "-m", "ccied.peer.cli", "peer",
            "--role", self.role,
            "--name", self.name,
            "--listen", self.listen,
            "--socket", str(self.socket_path),
        ]  # fmt: skip
        if self.mdns_service_type:
            cmd += ["--interface", self.interface, "--mdns-service-type", self.mdns_service_type]
        else:
            cmd.append("--no-discovery")
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--state-dir", str(self.keys().state_dir)]
        return [*cmd, *self.extra_args]

    def keys(self) -> KeyStore:
        """This peer's key store (made, and trusted by its local cluster, on first use)."""
        return KeyStore(self.state_dir or local_keys(self.socket_path.parent).state_dir(self.name))

    def start(self) -> None:
        stderr: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
            stderr = self._log
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> dict[str, Any]:
        """Block until the peer answers status; fail early if the process died."""
        deadline = time.monotonic() + timeout_s
        with Client(self.socket_path, timeout_s=1.0) as client:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise PeerUnavailableError(
                        f"peer {self.name} exited with {self.process.returncode} before it was "
                        f"ready (log: {self.log_path or 'not kept'})"
                    )
                if self.socket_path.exists():
                    with contextlib.suppress(PeerUnavailableError):
                        return client.status(timeout_s=1.0)
                if time.monotonic() > deadline:
                    raise PeerUnavailableError(f"peer {self.name} not ready in {timeout_s} s")
                time.sleep(0.1)

    def static_targets(self) -> list[str]:
        """The --cloud and --peer addresses this peer was started with."""
        args = list(self.extra_args)
        return [
            split_keyed_address(args[i + 1])[0]
            for i, a in enumerate(args[:-1])
            if a in ("--cloud", "--peer")
        ]

    def neighbours(self) -> list[dict[str, Any]]:
        with Client(self.socket_path, timeout_s=5.0) as client:
            found: list[dict[str, Any]] = client.status()["neighbours"]
            return found

    def wait_neighbours(
        self, addresses: Sequence[str] | None = None, count: int = 0, timeout_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Block until the given addresses (default: its static targets) are live
        neighbours, and at least ``count`` neighbours are live."""
        expected = set(self.static_targets() if addresses is None else addresses)
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.neighbours()
            # A neighbour that just died stays "live" until its silence evicts
            # it; only one that answered its last heartbeat recently, with no
            # failure since, is one routing will use.
            healthy = {
                n["address"]
                for n in live
                if n["consecutive_failures"] == 0 and n["last_seen_s"] <= HEALTHY_SEEN_S
            }
            if expected <= healthy and len(live) >= count:
                return live
            if time.monotonic() > deadline:
                raise PeerUnavailableError(
                    f"peer {self.name}: neighbours {sorted(expected)} (or {count}) not live "
                    f"in {timeout_s} s; live: {[n['name'] for n in live]}"
                )
            time.sleep(0.05)

    def wait_connected(self, timeout_s: float = 30.0) -> None:
        """Block until every static target of this peer is a healthy live neighbour."""
        self.wait_neighbours(timeout_s=timeout_s)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(peers: Sequence[PeerProcess]) -> Iterator[Sequence[PeerProcess]]:
    """Start peers, wait until each is ready, and always stop them all."""
    try:
        for peer in peers:
            peer.start()
        for peer in peers:
            peer.wait_ready()
        for peer in peers:
            peer.wait_connected()
        yield peers
    finally:
        for peer in reversed(peers):
            peer.stop()


def runtime_folder(base: Path) -> Path:
    """A private (0700) folder for local sockets under ``base``."""
    folder = base / "sockets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder
