"""Advertise this peer and browse for others with mDNS/DNS-SD (python-zeroconf).

Service type ``_ccied._tcp.local.``; one service instance per peer, named from
the peer name (DNS-safe, with a short suffix that makes it unique per host,
address and port). The TXT record carries ``name``, ``role``, ``bundle``,
``wire``, ``port`` and ``key``.

Everything here runs on the daemon's one asyncio loop (``AsyncZeroconf``);
functions that must only be called from the loop are named ``async_*``.
Announcements arrive from anyone on the link, so they are parsed defensively:
a malformed or hostile one is logged (WARNING once, then DEBUG) and ignored.
What survives is handed to an :class:`AnnouncementListener`, usually the
:class:`~ccied.discovery.neighbours.NeighbourTable`; discovery only suggests
neighbours, heartbeats decide liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import ifaddr
from ccied.discovery.errors import DiscoveryError, MalformedAnnouncementError
from ccied.discovery.logutil import WarnOnce
from ccied.discovery.neighbours import ROLES, Announcement
from zeroconf import Error as ZeroconfError
from zeroconf import InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)
warn_once = WarnOnce(log)

SERVICE_TYPE = "_ccied._tcp.local."
DEFAULT_RESOLVE_TIMEOUT_S = 3.0
# Services tracked at once (resolved or resolving); bounds memory under a flood.
DEFAULT_MAX_SERVICES = 256
# zeroconf reports a service once; re-resolving known ones now and then
# re-suggests a peer the table forgot (say, after a partition) and drops one
# whose records expired (killed without a goodbye).
DEFAULT_REFRESH_INTERVAL_S = 30.0

# TXT field bounds. A real announcement is far below them; anything beyond is
# not a ccied peer, or a hostile one.
MAX_TXT_BYTES = 2048
MAX_NAME_CHARS = 64
MAX_BUNDLE_CHARS = 128
# One TXT string is at most 255 bytes, "key=" included.
MAX_KEY_CHARS = 250
# A DNS label is at most 63 bytes; keep room for zeroconf's "-2" on a conflict.
MAX_INSTANCE_CHARS = 56

_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
_BUNDLE_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_BUNDLE_CHARS}}}")
# Printable ASCII without spaces: covers hex, base64 and Z85 (CurveZMQ) keys.
_KEY_RE = re.compile(rf"[!-~]{{0,{MAX_KEY_CHARS}}}")
_UINT16_RE = re.compile(r"[0-9]{1,5}")
# Where the peer's model runs ("cpu", "cuda:0"); optional: older peers do not send it.
_DEVICE_RE = re.compile(r"[A-Za-z0-9:._-]{0,32}")
_REQUIRED_KEYS = ("name", "role", "bundle", "wire", "port")
_KNOWN_KEYS = frozenset({*_REQUIRED_KEYS, "key", "device"})


@dataclass(frozen=True)
class MdnsConfig:
    """Where and how to run mDNS.

    ``interfaces``: IP addresses of the interfaces to use; None means all
    interfaces (the product default), except for a peer that advertises only
    loopback addresses: it stays on 127.0.0.1, because other hosts that
    learnt "127.0.0.1" would connect to themselves. Tests always pass
    ``("127.0.0.1",)``.
    ``service_type`` is only changed by tests, to keep them apart from real
    peers running on the same machine.
    """

    interfaces: tuple[str, ...] | None = None
    service_type: str = SERVICE_TYPE
    resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S
    max_services: int = DEFAULT_MAX_SERVICES
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S

    def __post_init__(self) -> None:
        if self.interfaces is not None:
            # Accept any sequence (a list from argv) but store a tuple: frozen means hashable.
            object.__setattr__(self, "interfaces", tuple(self.interfaces))
            for address in self.interfaces:
                _check_ip(address, "interface")
        if self.resolve_timeout_s <= 0 or self.max_services < 1 or self.refresh_interval_s <= 0:
            raise DiscoveryError(
                "resolve_timeout_s, max_services and refresh_interval_s must be positive"
            )


@dataclass(frozen=True)
class Advertisement:
    """What this peer announces: its identity and where its peer socket listens.

    ``addresses`` are the IPs other peers should connect to (see
    :func:`advertised_addresses`); ``port`` is the peer socket's TCP port.
    """

    name: str
    role: str
    bundle_id: str
    wire_version: int
    port: int
    addresses: tuple[str, ...] = field(default=("127.0.0.1",))
    public_key: str = ""
    device: str = ""  # where its model runs: "cpu", "cuda:0" ("": not said)

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.addresses:
            raise DiscoveryError("an advertisement needs at least one address")
        for address in self.addresses:
            _check_ip(address, "advertised address")
        # Refuse to announce what every other peer would reject as malformed.
        try:
            parse_txt(txt_record(self), self.addresses, self.port)
        except MalformedAnnouncementError as exc:
            raise DiscoveryError(f"cannot announce peer {self.name!r}: {exc}") from exc


class AnnouncementListener(Protocol):
    """Receives what mDNS learns; :class:`NeighbourTable` is one."""

    def observe_announcement(self, announcement: Announcement) -> object: ...

    def observe_goodbye(self, name: str, address: str | None = None) -> object: ...


# -- pure helpers (no I/O) ------------------------------------------------------


def txt_record(advertisement: Advertisement) -> dict[str, str]:
    """The TXT record announcing ``advertisement`` (keys as DESIGN.md lists them)."""
    record = {
        "name": advertisement.name,
        "role": advertisement.role,
        "bundle": advertisement.bundle_id,
        "wire": str(advertisement.wire_version),
        "port": str(advertisement.port),
        "key": advertisement.public_key,
    }
    if advertisement.device:  # added later: peers that do not know it ignore it
        record["device"] = advertisement.device
    return record


def parse_txt(
    properties: Mapping[bytes, bytes | None] | Mapping[str, str],
    addresses: Sequence[str],
    srv_port: int | None,
) -> Announcement:
    """Turn a received TXT record plus the service's addresses into an Announcement.

    Anyone on the link can multicast anything, so every field is checked
    (required keys, lengths, character sets, ranges, the TXT port against the
    SRV port) and the first problem raises :class:`MalformedAnnouncementError`.
    Unknown keys are allowed, so that a later version can add fields.
    """
    fields: dict[str, str] = {}
    total = 0
    for raw_key, raw_value in properties.items():
        key_bytes = raw_key.encode() if isinstance(raw_key, str) else raw_key
        value_bytes = raw_value.encode() if isinstance(raw_value, str) else raw_value or b""
        total += len(key_bytes) + len(value_bytes) + 2
        if total > MAX_TXT_BYTES:
            raise MalformedAnnouncementError(f"TXT record longer than {MAX_TXT_BYTES} bytes")
        try:
            key = key_bytes.decode("ascii").lower()
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:  # not text: nothing we can check further
            raise MalformedAnnouncementError(f"TXT entry is not text: {exc}") from exc
        if key in _KNOWN_KEYS:
            if key in fields:
                raise MalformedAnnouncementError(f"TXT key {key!r} appears twice")
            fields[key] = value
    missing = [k for k in _REQUIRED_KEYS if k not in fields]
    if missing:
        raise MalformedAnnouncementError(f"TXT record lacks {', '.join(missing)}")
    name = _match(_NAME_RE, fields["name"], "name")
    role = fields["role"]
    if role not in ROLES:
        raise MalformedAnnouncementError(f"role {_clip(role)!r} is not one of {sorted(ROLES)}")
    bundle_id = _match(_BUNDLE_RE, fields["bundle"], "bundle")
    wire_version = _uint16(fields["wire"], "wire")
    port = _uint16(fields["port"], "port")
    if port == 0 or (srv_port is not None and port != srv_port):
        raise MalformedAnnouncementError(f"TXT port {port} does not match SRV port {srv_port}")
    public_key = _match(_KEY_RE, fields.get("key", ""), "key")
    device = _match(_DEVICE_RE, fields.get("device", ""), "device")
    return Announcement(
        name=name,
        role=role,
        address=f"tcp://{_pick_address(addresses)}:{port}",
        bundle_id=bundle_id,
        wire_version=wire_version,
        public_key=public_key,
        device=device,
    )


def instance_name(advertisement: Advertisement, host: str | None = None) -> str:
    """A DNS-safe service instance name for this peer, unique per host, address, port.

    Two daemons cannot share an address and port, so peers with the same name
    (two hosts both called ``raspberrypi``) still get different instances,
    and a restarted peer gets its old instance back (others update it rather
    than keep a stale one). ``host`` defaults to this machine's host name.
    """
    safe = re.sub(r"[^A-Za-z0-9-]+", "-", advertisement.name).strip("-")[: MAX_INSTANCE_CHARS - 7]
    identity = "|".join(
        [host or socket.gethostname(), *sorted(advertisement.addresses), str(advertisement.port)]
    )
    suffix = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:6]
    return f"{safe or 'peer'}-{suffix}"


def advertised_addresses(
    listen_host: str, interfaces: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The IPs to announce for a peer socket bound to ``listen_host``.

    A specific IP is announced as is. A wildcard (``0.0.0.0``, ``*``) is
    announced as the given interfaces, or else every non-loopback IPv4
    address of this machine (loopback if there is none). A host name is
    refused: other peers need an address they can connect to without DNS.
    """
    if listen_host not in ("0.0.0.0", "*", ""):
        return (_check_ip(listen_host, "listen address"),)
    if interfaces:
        return tuple(_check_ip(a, "interface") for a in interfaces)
    found = sorted(
        {
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
        }
    )
    return tuple(found) or ("127.0.0.1",)


def _check_ip(address: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError as exc:  # a typo on the command line: say which option
        raise DiscoveryError(f"{what} {address!r} is not an IP address") from exc


def _match(pattern: re.Pattern[str], value: str, what: str) -> str:
    if pattern.fullmatch(value) is None:
        raise MalformedAnnouncementError(f"bad {what} {_clip(value)!r}")
    return value


def _uint16(value: str, what: str) -> int:
    if _UINT16_RE.fullmatch(value) is None or int(value) > 65535:
        raise MalformedAnnouncementError(f"bad {what} {_clip(value)!r}")
    return int(value)


def _clip(value: str, limit: int = 40) -> str:
    """Hostile values go into log lines: keep them short."""
    return value if len(value) <= limit else value[:limit] + "..."


def _pick_address(addresses: Sequence[str]) -> str:
    """The address to connect to: the first usable IPv4, else the first IPv6."""
    usable: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:  # zeroconf decoded it, but a bad one is only skipped
            continue
        # Link-local IPv6 needs a scope id that tcp:// addresses cannot carry.
        if ip.is_multicast or ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
            continue
        usable.append(ip)
    if not usable:
        raise MalformedAnnouncementError(f"no usable address in {list(addresses)[:4]}")
    usable.sort(key=lambda ip: ip.version)  # stable: keeps the announced order within v4
    best = usable[0]
    return str(best) if best.version == 4 else f"[{best}]"


# -- the component ----------------------------------------------------------------


class MdnsDiscovery:
    """Advertise one peer and browse for the others; a component of the daemon.

    ``await run()`` advertises and browses until cancelled (or ``aclose()``),
    then says goodbye. ``advertisement=None`` browses without advertising
    (a client, or a peer that does not listen).
    """

    def __init__(
        self,
        listener: AnnouncementListener,
        advertisement: Advertisement | None = None,
        config: MdnsConfig | None = None,
    ) -> None:
        self.config = config or MdnsConfig()
        self.advertisement = advertisement
        self._listener = listener
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._known: dict[str, Announcement] = {}  # service instance -> announcement
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._resolve_again: set[str] = set()  # changed while a resolve was under way
        self._stopped = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None

    @property
    def instance(self) -> str | None:
        """The full service instance name announced (after a conflict rename, the new one)."""
        return self._info.name if self._info is not None else None

    def announcements(self) -> list[Announcement]:
        """Every peer mDNS currently knows about (resolved, not yet withdrawn)."""
        return list(self._known.values())

    async def run(self) -> None:
        """Advertise and browse until cancelled or closed; always says goodbye.

        Every ``refresh_interval_s`` it resolves the known services again.
        """
        try:
            if self._aiozc is None:
                await self.async_start()
            while not self._stopped.is_set():
                with contextlib.suppress(TimeoutError):  # the refresh tick, not an error
                    await asyncio.wait_for(self._stopped.wait(), self.config.refresh_interval_s)
                if not self._stopped.is_set():
                    self.async_refresh()
        finally:
            await self.aclose()

    def async_refresh(self) -> None:
        """Resolve every known service again (``run()`` does it periodically).

        A service that still answers is handed to the listener again (a no-op
        for a neighbour it knows, a new suggestion for one it forgot); one
        that no longer answers is dropped from :meth:`announcements` quietly,
        without a goodbye: only heartbeats decide that a neighbour is gone.
        """
        for name in list(self._known):
            self._async_schedule_resolve(self.config.service_type, name, refresh=True)

    async def async_start(self) -> None:
        """Open the mDNS sockets, browse, and register this peer.

        Registration probes for a name conflict first (about 1.2 s with
        zeroconf's timings); a taken instance name is renamed (``-2``) and
        logged. Raises :class:`DiscoveryError` when the sockets cannot be
        opened (say, ``--interface`` is not an address of this machine).
        """
        if self._aiozc is not None or self._closing is not None:
            raise DiscoveryError("mDNS discovery was already started")
        interfaces = self._interfaces()
        try:
            self._aiozc = AsyncZeroconf(interfaces=interfaces)
        except (OSError, ZeroconfError) as exc:  # no such interface, port 5353 refused, ...
            raise DiscoveryError(f"cannot start mDNS on {self._where()}: {exc}") from exc
        try:
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf,
                self.config.service_type,
                handlers=[self._on_service_state_change],
            )
            if self.advertisement is not None:
                await self._async_register(self.advertisement)
        except (OSError, ZeroconfError) as exc:  # mapped here, at the package boundary
            await self.aclose()
            raise DiscoveryError(f"cannot advertise on mDNS ({self._where()}): {exc}") from exc
        except BaseException:  # cancelled while starting: still release the sockets
            await self.aclose()
            raise

    async def _async_register(self, advertisement: Advertisement) -> None:
        assert self._aiozc is not None
        service_type = self.config.service_type
        base = instance_name(advertisement)
        info = AsyncServiceInfo(
            service_type,
            f"{base}.{service_type}",
            port=advertisement.port,
            properties=txt_record(advertisement),
            parsed_addresses=list(advertisement.addresses),
            server=f"{base}.local.",
        )
        self._info = info
        # The awaitable it returns completes once the announcements are sent; we
        # need not wait for it, and zeroconf keeps it running.
        await self._aiozc.async_register_service(info, allow_name_change=True)
        if info.name != f"{base}.{service_type}":
            log.warning("mDNS name %s was taken; announced as %s", base, info.name)
        log.info(
            "announced %s on mDNS (%s): %s",
            advertisement.name,
            self._where(),
            txt_record(advertisement),
        )

    def _interfaces(self) -> InterfaceChoice | list[str]:
        if self.config.interfaces is not None:
            return list(self.config.interfaces)
        ad = self.advertisement
        if ad is not None and all(ipaddress.ip_address(a).is_loopback for a in ad.addresses):
            return ["127.0.0.1"]
        return InterfaceChoice.All

    def _where(self) -> str:
        interfaces = self._interfaces()
        return "all interfaces" if isinstance(interfaces, InterfaceChoice) else ",".join(interfaces)

    async def aclose(self) -> None:
        """Say goodbye (peers drop us at once), stop browsing, close the sockets.

        Safe to call twice and from ``run()``'s cancellation; never raises for
        network trouble, which is logged instead.
        """
        self._stopped.set()
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._async_close())
        # Shielded: a second cancellation of the caller must not cut the goodbye short.
        await asyncio.shield(self._closing)

    async def _async_close(self) -> None:
        for task in list(self._resolving.values()):
            task.cancel()
        if self._resolving:
            await asyncio.gather(*self._resolving.values(), return_exceptions=True)
        self._resolving.clear()
        self._resolve_again.clear()
        aiozc, self._aiozc = self._aiozc, None
        browser, self._browser = self._browser, None
        try:
            if browser is not None:
                await browser.async_cancel()
            if aiozc is not None:
                # Unregisters every service first: three goodbye packets (TTL 0).
                await aiozc.async_close()
        except (OSError, ZeroconfError) as exc:  # shutting down anyway: report, go on
            log.warning("mDNS did not close cleanly: %s", exc)
        self._known.clear()

    # -- browsing -----------------------------------------------------------------

    def _on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback, on the loop: resolve new or changed services, drop removed ones."""
        if self._info is not None and name == self._info.name:
            return  # our own announcement
        if state_change is ServiceStateChange.Removed:
            self._async_forget(name)
            return
        self._async_schedule_resolve(service_type, name, refresh=False)

    def _async_schedule_resolve(self, service_type: str, name: str, *, refresh: bool) -> None:
        if self._stopped.is_set():
            return
        if name in self._resolving:
            self._resolve_again.add(name)  # that resolve may have read the old records
            return
        if len(self._known) + len(self._resolving) >= self.config.max_services and (
            name not in self._known
        ):
            warn_once(
                "too-many-services",
                "more than %d %s services; ignoring %s",
                self.config.max_services,
                service_type,
                _clip(name, 80),
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._async_resolve(service_type, name, refresh=refresh)
        )
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._async_resolved(service_type, name, done))

    def _async_resolved(self, service_type: str, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if name in self._resolve_again and not task.cancelled():
            self._resolve_again.discard(name)
            self._async_schedule_resolve(service_type, name, refresh=False)

    async def _async_resolve(self, service_type: str, name: str, *, refresh: bool) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        try:
            info = AsyncServiceInfo(service_type, name)
            found = await info.async_request(
                aiozc.zeroconf, int(self.config.resolve_timeout_s * 1000)
            )
        except (OSError, ZeroconfError) as exc:  # a bad name or a send error: skip it
            warn_once(f"resolve:{name}", "cannot resolve %s: %s", _clip(name, 80), exc)
            return
        if not found:
            if refresh or name in self._known:
                # Gone quietly (killed, or its records expired): stop suggesting it.
                log.debug("mDNS: %s no longer answers", _clip(name, 80))
                self._known.pop(name, None)
            else:
                warn_once(f"resolve:{name}", "no complete answer for %s", _clip(name, 80))
            return
        try:
            announcement = parse_txt(info.properties, info.parsed_addresses(), info.port)
        except MalformedAnnouncementError as exc:
            warn_once(
                f"malformed:{name}", "ignoring malformed announcement %s: %s", _clip(name, 80), exc
            )
            return
        previous = self._known.get(name)
        self._known[name] = announcement
        if previous is not None and (
            previous.name != announcement.name or previous.address != announcement.address
        ):
            self._notify_goodbye(previous)
        log.debug("mDNS: %s is %s", name, announcement)
        try:
            self._listener.observe_announcement(announcement)
        except Exception:  # a bug in the listener must not stop discovery
            log.exception("announcement listener failed on %s", announcement)

    def _async_forget(self, name: str) -> None:
        self._resolve_again.discard(name)
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        previous = self._known.pop(name, None)
        if previous is not None:
            self._notify_goodbye(previous)

    def _notify_goodbye(self, announcement: Announcement) -> None:
        log.debug("mDNS: %s at %s withdrawn", announcement.name, announcement.address)
        try:
            self._listener.observe_goodbye(announcement.name, announcement.address)
        except Exception:  # a bug in the listener must not stop discovery
            log.exception("announcement listener failed on the goodbye of %s", announcement.name)
