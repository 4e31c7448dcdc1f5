"""A peer's settings: command-line options over a ``--config`` TOML file, checked.

Every value, whether it came from argv or the file, is checked here before the
daemon exists: a wrong type or range, a name outside the alphabet, an address
that is not ``tcp://HOST:PORT``, a malformed key. Each is one line naming the
option and exit 2, never a traceback later and never a silently different peer.
Two of the defects this closes: ``insecure = "false"`` in a file turned
authentication *off* (``bool("false")`` is True), and ``listen = 5`` hung the
peer; so booleans in the file are TOML booleans only and strings are strings.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccied.cache.audit import DEFAULT_AUDIT_RATE
from ccied.cache.keys import THUMBNAIL_KEY
from ccied.cache.policy import DEFAULT_CAPACITY
from ccied.peer.batching import DEFAULT_MAX_BATCH
from ccied.peer.defaults import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_PENDING,
    DEFAULT_METRICS_HOST,
    DEFAULT_REMOTE_TIMEOUT_S,
    LOG_LEVELS,
    SHARED_FROM,
    Role,
)
from ccied.peer.device import DEFAULT_DEVICE, check_device
from ccied.peer.errors import PeerError
from ccied.peer.keys import KeyFileError, split_keyed_address
from ccied.peer.paths import default_socket_path
from ccied.pruning.defaults import (
    DEFAULT_FIDELITY_FLOOR,
    DEFAULT_FIDELITY_FLOOR_ALL,
    DEFAULT_MODEL,
)


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
    fidelity_floor: float = DEFAULT_FIDELITY_FLOOR  # on decisive frames
    fidelity_floor_all: float = DEFAULT_FIDELITY_FLOOR_ALL  # on all frames
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


def check_config(config: PeerConfig) -> None:
    """What the command line checks too, for peers built in code (PeerError if wrong)."""
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


# The documented alphabet of peer names (README, `--name`): it becomes a file
# name (the socket), an mDNS instance name and a log field, so no '/', no
# newline, no leading '.' or '-'. 64 characters is mDNS's instance-name room.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Check:
    """What one setting may be: its kind and, for numbers, its range."""

    kind: str  # "bool" | "int" | "number" | "str" | "strs" (a string or a list of them)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    choices: tuple[str, ...] = ()

    def __call__(self, key: str, value: Any) -> Any:
        option = f"{key} (--{key.replace('_', '-')})"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise PeerError(f"{option} must be true or false, got {value!r}")
            return value
        if self.kind == "strs":
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise PeerError(f"{option} must be a string or a list of strings, got {value!r}")
            return values
        if self.kind == "str":
            if not isinstance(value, str | Path):
                raise PeerError(f"{option} must be a string, got {value!r}")
            if self.choices and str(value) not in self.choices:
                raise PeerError(f"{option} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        integer = self.kind == "int"
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            kind = "an integer" if integer else "a number"
            raise PeerError(f"{option} must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise PeerError(f"{option} must be finite, got {value!r}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            bound = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
            raise PeerError(f"{option} must be {bound}, got {value!r}")
        if self.high is not None and value > self.high:
            raise PeerError(f"{option} must be at most {self.high:g}, got {value!r}")
        return value


# Every key a --config file may set (the options' names with '_'), and its check.
# The same checks run on the command line's values.
CONFIG_CHECKS: dict[str, Check] = {
    "role": Check("str", choices=tuple(r.value for r in Role)),
    "name": Check("str"),
    "listen": Check("str"),
    "socket": Check("str"),
    "model": Check("str"),
    "variant": Check("str"),
    "variants": Check("str"),
    "always_offload": Check("bool"),
    "fidelity_floor": Check("number", 0, 1),
    "fidelity_floor_all": Check("number", 0, 1),
    "cloud": Check("str"),
    "peer": Check("strs"),
    "remote_timeout_s": Check("number", 0, low_open=True),
    "max_pending": Check("int", 1),
    "threads": Check("int", 1, 1024),
    "log_level": Check("str", choices=LOG_LEVELS),
    "cache_dir": Check("str"),
    "no_cache": Check("bool"),
    "cache_capacity": Check("int", 1),
    "cache_threshold": Check("number", 0),
    "cache_thumb_threshold": Check("number", 0),
    "cache_answer_floor": Check("number", 0, 1),
    "audit_rate": Check("number", 0, 1),
    "cache_margin": Check("int", 0),
    "cache_min_confidence": Check("number", 0, 1),
    "no_discovery": Check("bool"),
    "interface": Check("str"),
    "share_cache": Check("bool"),
    "slowdown": Check("number", 1),
    "link_mbps": Check("number", 0, low_open=True),
    "link_rtt_ms": Check("number", 0),
    "state_dir": Check("str"),
    "insecure": Check("bool"),
    "accept_shared_from": Check("str", choices=SHARED_FROM),
    "metrics_port": Check("int", 1, 65535),
    "metrics_host": Check("str"),
    "device": Check("str"),
    "batch_window_ms": Check("number", 0),
    "max_batch": Check("int", 1, 4096),
}
CONFIG_KEYS = frozenset(CONFIG_CHECKS)


def load_config(path: Path | None) -> dict[str, Any]:
    """The settings in a TOML file, each checked by type; {} without a file."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PeerError(f"cannot read config {path}: {exc}") from exc
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise PeerError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    out = {}
    for key, value in data.items():
        if key == "log_level" and isinstance(value, str):
            value = value.upper()
        try:
            out[key] = CONFIG_CHECKS[key](key, value)
        except PeerError as exc:
            raise PeerError(f"{path}: {exc}") from None
    return out


def check_name(name: str) -> str:
    """``name`` if it is in the peers' alphabet, else a one-line error."""
    if not NAME_RE.fullmatch(name):
        raise PeerError(
            f"peer name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_tcp_address(text: str, what: str, *, bind: bool = False) -> str:
    """``tcp://HOST:PORT`` with a port in 1-65535 (to bind: also ``*`` or 0, any free port).

    ZeroMQ itself takes ``:70000`` and listens on 70000 mod 65536, and a bare
    ``HOST:PORT`` only fails later, at every connection attempt.
    """
    if not text.startswith("tcp://"):
        raise PeerError(f"{what} {text!r}: expected tcp://HOST:PORT")
    host, sep, port = text[len("tcp://") :].rpartition(":")
    if not sep or not host:
        raise PeerError(f"{what} {text!r}: expected tcp://HOST:PORT")
    if bind and port == "*":
        port = "0"
    if not port.isdigit() or not (0 if bind else 1) <= int(port) <= 65535:
        raise PeerError(f"{what} {text!r}: the port must be a number from 1 to 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bind and bare == "*":
        return text
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if host.startswith("[") or not _HOST_RE.fullmatch(host):
            raise PeerError(f"{what} {text!r}: {host!r} is not a host name or IP") from None
    return text


def check_peer_address(text: str, what: str) -> str:
    """A neighbour's address, ``tcp://HOST:PORT`` or ``KEY@tcp://HOST:PORT``."""
    try:
        address, _key = split_keyed_address(text)
    except KeyFileError as exc:
        raise PeerError(f"{what}: {exc}") from None
    check_tcp_address(address, what)
    return text


def _none_or(value: Any) -> Any:
    return None if isinstance(value, str | Path) and str(value).lower() == "none" else value


def default_peer_name() -> str:
    """The host name, or host-2, host-3... when peers of that name already run here."""
    base = "".join(c if c.isalnum() or c in "._-" else "-" for c in os.uname().nodename)
    base = base.strip("-.")[:60] or "peer"
    for index in range(1, 100):
        name = base if index == 1 else f"{base}-{index}"
        if not default_socket_path(name).exists():
            return name
    return f"{base}-{os.getpid()}"


def peer_config(args: argparse.Namespace) -> PeerConfig:
    """Options from the command line override the config file, which overrides defaults."""
    file = load_config(args.config)

    def pick(option: str, default: Any = None) -> Any:
        value = getattr(args, option)
        if value is None:
            value = file.get(option, default)
        if value is not None and option in CONFIG_CHECKS:
            value = CONFIG_CHECKS[option](option, value)
        return value

    name = check_name(pick("name") or default_peer_name())
    socket_path = _socket_path(pick("socket"), name)
    listen, cloud, peers = _addresses(pick)
    cache_dir = pick("cache_dir")
    state_dir = pick("state_dir")
    return PeerConfig(
        name=name,
        role=Role(pick("role", Role.EDGE.value)),
        listen=listen,
        socket_path=socket_path,
        model=pick("model", DEFAULT_MODEL),
        variant=pick("variant"),
        variants=tuple(v for v in str(pick("variants") or "").split(",") if v),
        always_offload=pick("always_offload", False),
        fidelity_floor=float(pick("fidelity_floor", DEFAULT_FIDELITY_FLOOR)),
        fidelity_floor_all=float(pick("fidelity_floor_all", DEFAULT_FIDELITY_FLOOR_ALL)),
        cloud=cloud,
        peers=peers,
        remote_timeout_s=float(pick("remote_timeout_s", DEFAULT_REMOTE_TIMEOUT_S)),
        max_pending=pick("max_pending", DEFAULT_MAX_PENDING),
        torch_threads=pick("threads"),
        cache_enabled=not pick("no_cache", False),
        cache_dir=Path(cache_dir).expanduser().absolute() if cache_dir else None,
        cache_capacity=pick("cache_capacity", DEFAULT_CAPACITY),
        share_cache=pick("share_cache", True),
        discovery=not pick("no_discovery", False),
        interface=pick("interface"),
        slowdown=float(pick("slowdown", 1.0)),
        link_bandwidth_mbps=pick("link_mbps"),
        link_rtt_ms=float(pick("link_rtt_ms", 0.0)),
        mdns_service_type=args.mdns_service_type,
        state_dir=Path(state_dir).expanduser() if state_dir else None,
        insecure=pick("insecure", False),
        accept_shared_from=pick("accept_shared_from", "trusted"),
        cache_rule_overrides=_rule_overrides(pick),
        audit_rate=float(pick("audit_rate", DEFAULT_AUDIT_RATE)),
        metrics_port=pick("metrics_port"),
        metrics_host=pick("metrics_host", DEFAULT_METRICS_HOST),
        device=check_device(pick("device", DEFAULT_DEVICE)),
        batch_window_ms=pick("batch_window_ms"),
        max_batch=pick("max_batch", DEFAULT_MAX_BATCH),
    )


def _socket_path(option: Any, name: str) -> Path | None:
    """``--socket`` made absolute: unset, the peer's default path; 'none', no socket (None)."""
    socket_path = default_socket_path(name) if option is None else _none_or(Path(option))
    return None if socket_path is None else Path(socket_path).expanduser().absolute()


def _addresses(pick: Any) -> tuple[str | None, str | None, tuple[str, ...]]:
    """``--listen`` ('none': no listening socket), ``--cloud`` and ``--peer``, checked."""
    listen = _none_or(pick("listen", DEFAULT_LISTEN))
    if listen is not None:
        check_tcp_address(listen, "--listen", bind=True)
    cloud = pick("cloud")
    if cloud is not None:
        check_peer_address(cloud, "--cloud")
    peers = tuple(check_peer_address(p, "--peer") for p in pick("peer") or [])
    return listen, cloud, peers


def _rule_overrides(pick: Any) -> dict[str, dict[str, float]]:
    """Hit-rule overrides by key depth: "*" for every depth, "thumb" and "model" for one."""
    every = {
        "vote_margin": pick("cache_margin"),
        "min_insert_confidence": pick("cache_min_confidence"),
        "answer_floor": pick("cache_answer_floor"),
    }
    out = {"*": {k: v for k, v in every.items() if v is not None}}
    if pick("cache_threshold") is not None:
        out["model"] = {"threshold_l2": pick("cache_threshold")}
    if pick("cache_thumb_threshold") is not None:
        out[THUMBNAIL_KEY] = {"threshold_l2": pick("cache_thumb_threshold")}
    return out


__all__ = [
    "CONFIG_CHECKS",
    "CONFIG_KEYS",
    "NAME_RE",
    "PeerConfig",
    "check_config",
    "check_name",
    "check_peer_address",
    "check_tcp_address",
    "default_peer_name",
    "load_config",
    "peer_config",
]
