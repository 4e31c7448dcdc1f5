"""ccied.discovery: neighbour table logic (fake clock), TXT parsing, real mDNS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from ccied.discovery import (
    DEFAULT_LIVENESS_TIMEOUT_S,
    Advertisement,
    Announcement,
    DiscoveryError,
    MalformedAnnouncementError,
    MdnsConfig,
    MdnsDiscovery,
    NeighbourTable,
    NeighbourTableConfig,
    advertised_addresses,
    instance_name,
    parse_txt,
    txt_record,
)
from zeroconf import InterfaceChoice
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

T = TypeVar("T")
BUNDLE = "0123456789abcdef"
WIRE = 1
LOOPBACK = ("127.0.0.1",)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _announcement(name: str, port: int = 5600, **changes: Any) -> Announcement:
    fields: dict[str, Any] = {
        "name": name,
        "role": "edge",
        "address": f"tcp://127.0.0.1:{port}",
        "bundle_id": BUNDLE,
        "wire_version": WIRE,
    }
    fields.update(changes)
    return Announcement(**fields)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> NeighbourTable:
    return NeighbourTable("me", clock=clock)


def _names(neighbours: list[Any]) -> list[str]:
    return [n.name for n in neighbours]


# -- neighbour table ------------------------------------------------------------


def test_a_suggested_peer_is_usable_only_after_its_first_heartbeat(
    table: NeighbourTable,
) -> None:
    assert table.observe_announcement(_announcement("cam2"))
    assert table.usable(BUNDLE, WIRE) == []
    assert _names(table.heartbeat_targets()) == ["cam2"]
    assert table.snapshot() == []
    assert table.record_heartbeat("cam2", rtt_ms=0.4, load=0.5, queue_length=2)
    [peer] = table.usable(BUNDLE, WIRE)
    assert (peer.name, peer.address, peer.rtt_ms, peer.load, peer.queue_length) == (
        "cam2",
        "tcp://127.0.0.1:5600",
        0.4,
        0.5,
        2,
    )


def test_a_killed_peer_leaves_within_three_seconds(table: NeighbourTable, clock: FakeClock) -> None:
    """Heartbeats every 0.5 s and expire() on the same tick, as the daemon does."""
    table.observe_announcement(_announcement("cam2"))
    killed_at = 10.0 + clock.now
    left_at = None
    while left_at is None:
        clock.now += 0.5
        if clock.now < killed_at:
            table.record_heartbeat("cam2", rtt_ms=1.0)
        if "cam2" in table.expire():
            left_at = clock.now
        assert clock.now < killed_at + 10, "never evicted"
    assert left_at - killed_at <= 3.0
    assert table.usable(BUNDLE, WIRE) == [] and table.snapshot() == []
    assert len(table) == 0


def test_a_slow_peer_whose_heartbeats_come_late_is_never_evicted(
    table: NeighbourTable, clock: FakeClock
) -> None:
    rng = random.Random(5)
    table.observe_announcement(_announcement("slow"))
    table.record_heartbeat("slow", rtt_ms=900.0)
    next_heartbeat = clock.now + rng.uniform(0.3, 1.9)
    end = clock.now + 300.0
    while clock.now < end:
        clock.now = round(clock.now + 0.1, 6)
        if clock.now >= next_heartbeat:
            table.record_heartbeat("slow", rtt_ms=rng.uniform(500, 1800))
            # Late answers, but always within the liveness timeout of the last one.
            next_heartbeat = clock.now + rng.uniform(0.3, 1.9)
        assert table.expire() == []
        assert _names(table.usable(BUNDLE, WIRE)) == ["slow"]


def test_an_evicted_peer_needs_two_heartbeats_to_come_back(
    table: NeighbourTable, clock: FakeClock
) -> None:
    table.observe_announcement(_announcement("cam2"))
    table.record_heartbeat("cam2", rtt_ms=1.0)
    clock.now += DEFAULT_LIVENESS_TIMEOUT_S + 0.1
    assert table.expire() == ["cam2"]
    assert _names(table.heartbeat_targets()) == ["cam2"]  # still probed
    clock.now += 5
    assert not table.record_heartbeat("cam2", rtt_ms=1.0)
    assert table.usable(BUNDLE, WIRE) == []
    clock.now += 0.5
    assert table.record_heartbeat("cam2", rtt_ms=1.0)
    assert _names(table.usable(BUNDLE, WIRE)) == ["cam2"]


def test_failures_avoid_a_peer_until_its_next_heartbeat_without_evicting_it(
    table: NeighbourTable,
) -> None:
    table.observe_announcement(_announcement("cam2"))
    table.record_heartbeat("cam2", rtt_ms=1.0)
    for _ in range(3):
        table.record_failure("cam2")
    assert table.usable(BUNDLE, WIRE) == []
    assert [row["consecutive_failures"] for row in table.snapshot()] == [3]
    table.record_heartbeat("cam2", rtt_ms=1.0)
    assert _names(table.usable(BUNDLE, WIRE)) == ["cam2"]


def test_usable_keeps_only_the_same_bundle_and_wire_version_and_never_self(
    table: NeighbourTable,
) -> None:
    table.observe_announcement(_announcement("same", 1))
    table.observe_announcement(_announcement("other-bundle", 2, bundle_id="ffffffffffffffff"))
    table.observe_announcement(_announcement("other-wire", 3, wire_version=WIRE + 1))
    table.observe_announcement(_announcement("cloud", 4, role="cloud"))
    assert not table.observe_announcement(_announcement("me", 5))
    for name in ("same", "other-bundle", "other-wire", "cloud", "me"):
        table.record_heartbeat(name, rtt_ms=1.0)
    assert _names(table.usable(BUNDLE, WIRE)) == ["cloud", "same"]
    assert _names(table.alive()) == ["cloud", "other-bundle", "other-wire", "same"]


def test_a_goodbye_removes_at_once_but_only_at_the_announced_address(
    table: NeighbourTable,
) -> None:
    table.observe_announcement(_announcement("cam2", 5602))
    table.record_heartbeat("cam2", rtt_ms=1.0)
    assert not table.observe_goodbye("cam2", "tcp://127.0.0.1:9999")
    assert _names(table.usable(BUNDLE, WIRE)) == ["cam2"]
    assert table.observe_goodbye("cam2", "tcp://127.0.0.1:5602")
    assert table.usable(BUNDLE, WIRE) == [] and table.heartbeat_targets() == []


def test_two_peers_with_one_name_keep_the_live_one(table: NeighbourTable) -> None:
    table.observe_announcement(_announcement("cam", 5601))
    table.record_heartbeat("cam", rtt_ms=1.0)
    assert not table.observe_announcement(_announcement("cam", 5602))
    assert [n.address for n in table.usable(BUNDLE, WIRE)] == ["tcp://127.0.0.1:5601"]
    # A peer that is not confirmed yet may move (it restarted on another port).
    table.observe_announcement(_announcement("cam3", 5603))
    assert table.observe_announcement(_announcement("cam3", 5604))
    assert [a.address for a in table.heartbeat_targets() if a.name == "cam3"] == [
        "tcp://127.0.0.1:5604"
    ]


def test_never_confirmed_peers_are_forgotten(table: NeighbourTable, clock: FakeClock) -> None:
    table.observe_announcement(_announcement("ghost"))
    clock.now += table.config.forget_after_s + 1
    assert table.expire() == []
    assert table.heartbeat_targets() == []
    assert not table.record_heartbeat("ghost", rtt_ms=1.0)


def test_bandwidth_is_a_moving_average_of_real_transfers(table: NeighbourTable) -> None:
    table.observe_announcement(_announcement("cam2"))
    table.record_heartbeat("cam2", rtt_ms=1.0)
    table.record_transfer("cam2", 100, 0.001)  # too small to say anything about bandwidth
    assert table.usable(BUNDLE, WIRE)[0].bandwidth_mbps is None
    table.record_transfer("cam2", 1_000_000, 0.1)  # 80 Mbit/s
    assert table.usable(BUNDLE, WIRE)[0].bandwidth_mbps == pytest.approx(80.0)
    table.record_transfer("cam2", 1_000_000, 1.0)  # 8 Mbit/s
    assert table.usable(BUNDLE, WIRE)[0].bandwidth_mbps == pytest.approx(0.3 * 8 + 0.7 * 80)
    table.record_transfer("cam2", 1_000_000, 0.0)  # ignored, no division by zero
    table.record_transfer("nobody", 1_000_000, 1.0)


def test_snapshot_says_how_long_ago_each_peer_was_seen(
    table: NeighbourTable, clock: FakeClock
) -> None:
    table.observe_announcement(_announcement("cam2"))
    table.record_heartbeat("cam2", rtt_ms=2.5, load=0.25, queue_length=1)
    clock.now += 1.25
    [row] = table.snapshot()
    assert {"name", "role", "address", "rtt_ms", "bandwidth_mbps", "load", "last_seen_s"} <= set(
        row
    )
    assert row["last_seen_s"] == 1.25 and row["rtt_ms"] == 2.5 and row["load"] == 0.25


def test_nonsense_heartbeat_metrics_count_as_life_but_are_not_recorded(
    table: NeighbourTable,
) -> None:
    table.observe_announcement(_announcement("odd"))
    assert table.record_heartbeat("odd", rtt_ms=float("nan"), load=-1.0, queue_length=-5)
    [peer] = table.usable(BUNDLE, WIRE)
    assert (peer.rtt_ms, peer.load, peer.queue_length) == (0.0, 0.0, 0)


def test_the_table_is_bounded(clock: FakeClock) -> None:
    table = NeighbourTable("me", NeighbourTableConfig(max_neighbours=3), clock=clock)
    accepted = [table.observe_announcement(_announcement(f"p{i}", 6000 + i)) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7


def test_bad_table_config_is_refused() -> None:
    with pytest.raises(DiscoveryError):
        NeighbourTableConfig(liveness_timeout_s=0)
    with pytest.raises(DiscoveryError):
        NeighbourTableConfig(forget_after_s=1.0, liveness_timeout_s=2.0)


# -- TXT records and names ------------------------------------------------------


def _advertisement(name: str = "cam1", port: int = 5601, **changes: Any) -> Advertisement:
    fields: dict[str, Any] = {
        "name": name,
        "role": "edge",
        "bundle_id": BUNDLE,
        "wire_version": WIRE,
        "port": port,
        "addresses": LOOPBACK,
    }
    fields.update(changes)
    return Advertisement(**fields)


def test_txt_record_round_trips() -> None:
    ad = _advertisement(public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7")
    wire_txt = {k.encode(): v.encode() for k, v in txt_record(ad).items()}
    assert set(txt_record(ad)) == {"name", "role", "bundle", "wire", "port", "key"}
    assert parse_txt(wire_txt, ["127.0.0.1"], 5601) == Announcement(
        name="cam1",
        role="edge",
        address="tcp://127.0.0.1:5601",
        bundle_id=BUNDLE,
        wire_version=WIRE,
        public_key=ad.public_key,
    )


GOOD_TXT = {b"name": b"cam1", b"role": b"edge", b"bundle": b"abc", b"wire": b"1", b"port": b"5601"}


@pytest.mark.parametrize(
    "changes",
    [
        {b"name": None},
        {b"name": b""},
        {b"name": b"x" * 65},
        {b"name": b"../etc/passwd"},
        {b"name": b"cam\x00"},
        {b"name": b"\xff\xfe"},
        {b"role": b"king"},
        {b"role": None},
        {b"bundle": b"a b"},
        {b"bundle": b"b" * 129},
        {b"wire": b"-1"},
        {b"wire": b"99999999999999999999"},
        {b"wire": b"1.5"},
        {b"port": b"70000"},
        {b"port": b"0"},
        {b"port": b"5602"},  # differs from the SRV port
        {b"key": b"has space"},
        {b"key": b"k" * 251},
        {b"NAME": b"cam2"},  # keys are case-insensitive: a second name
        {b"junk": b"j" * 2100},
    ],
    ids=repr,
)
def test_malformed_txt_records_are_refused(changes: dict[bytes, bytes | None]) -> None:
    txt = {**GOOD_TXT, **changes}
    with pytest.raises(MalformedAnnouncementError):
        parse_txt(txt, ["127.0.0.1"], 5601)


def test_txt_parsing_tolerates_unknown_keys_and_picks_a_usable_address() -> None:
    txt = {**GOOD_TXT, b"future": b"x", b"flag": None}
    parsed = parse_txt(txt, ["fe80::1", "224.0.0.1", "10.0.0.7", "2001:db8::1"], 5601)
    assert parsed.address == "tcp://10.0.0.7:5601"
    assert parse_txt(txt, ["2001:db8::1"], None).address == "tcp://[2001:db8::1]:5601"
    with pytest.raises(MalformedAnnouncementError):
        parse_txt(txt, ["fe80::1", "0.0.0.0", "nonsense"], 5601)


def test_advertisements_that_others_would_reject_are_refused_here() -> None:
    with pytest.raises(DiscoveryError):
        _advertisement(name="my camera")
    with pytest.raises(DiscoveryError):
        _advertisement(role="fog")
    with pytest.raises(DiscoveryError):
        _advertisement(addresses=("localhost",))
    with pytest.raises(DiscoveryError):
        MdnsConfig(interfaces=("eth0",))


def test_instance_names_are_dns_safe_stable_and_unique_per_address_and_port() -> None:
    a = instance_name(_advertisement(name="Cam_1.lab", port=5601), host="h")
    assert a == instance_name(_advertisement(name="Cam_1.lab", port=5601), host="h")
    assert a.startswith("Cam-1-lab-") and len(a) <= 56
    assert all(c.isalnum() or c == "-" for c in a)
    others = {
        instance_name(_advertisement(name="Cam_1.lab", port=5602), host="h"),
        instance_name(_advertisement(name="Cam_1.lab", addresses=("10.0.0.2",)), host="h"),
        instance_name(_advertisement(name="Cam_1.lab"), host="other"),
    }
    assert a not in others and len(others) == 3
    assert len(instance_name(_advertisement(name="x" * 64), host="h")) <= 56


def test_a_loopback_peer_is_announced_on_loopback_only() -> None:
    """Other hosts that learnt 127.0.0.1 would connect to themselves."""
    loopback = MdnsDiscovery(NeighbourTable("a"), _advertisement())
    assert loopback._interfaces() == ["127.0.0.1"]
    lan = MdnsDiscovery(NeighbourTable("a"), _advertisement(addresses=("10.0.0.2",)))
    assert lan._interfaces() is InterfaceChoice.All
    chosen = MdnsDiscovery(
        NeighbourTable("a"), _advertisement(), MdnsConfig(interfaces=("10.0.0.2",))
    )
    assert chosen._interfaces() == ["10.0.0.2"]


def test_advertised_addresses() -> None:
    assert advertised_addresses("10.1.2.3") == ("10.1.2.3",)
    assert advertised_addresses("0.0.0.0", ["127.0.0.1"]) == ("127.0.0.1",)
    assert all(a != "0.0.0.0" for a in advertised_addresses("*"))
    with pytest.raises(DiscoveryError):
        advertised_addresses("my-host.local")


# -- real mDNS on 127.0.0.1 -----------------------------------------------------


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """zeroconf's probe and goodbye timings, shortened (as its own test suite does)."""
    import zeroconf._core

    monkeypatch.setattr(zeroconf._core, "_CHECK_TIME", 50)
    monkeypatch.setattr(zeroconf._core, "_PROBE_RANDOM_DELAY_INTERVAL", (5, 10))
    monkeypatch.setattr(zeroconf._core, "_UNREGISTER_TIME", 20)


@pytest.fixture
def service_type() -> str:
    """A service type of this test's own, so real peers on this machine stay out of it."""
    return f"_cct{uuid.uuid4().hex[:8]}._tcp.local."


def _run(coro: Awaitable[T], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


async def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _targets(table: NeighbourTable) -> set[str]:
    return {a.name for a in table.heartbeat_targets()}


@pytest.mark.usefixtures("quick_timing")
@pytest.mark.timeout(30)
def test_three_peers_find_each_other_on_loopback_and_a_goodbye_removes_one(
    service_type: str,
) -> None:
    config = MdnsConfig(interfaces=LOOPBACK, service_type=service_type)
    names = ["cam1", "cam2", "cam3"]

    async def scenario() -> None:
        tables = {name: NeighbourTable(name) for name in names}
        peers = {
            name: MdnsDiscovery(tables[name], _advertisement(name, 5601 + i), config)
            for i, name in enumerate(names)
        }
        runs = [asyncio.create_task(peer.run()) for peer in peers.values()]
        try:
            found_s = await _wait_until(
                lambda: all(_targets(tables[n]) == set(names) - {n} for n in names),
                10.0,
                "three peers see each other",
            )
            logging.getLogger(__name__).info("three peers found each other in %.2f s", found_s)
            seen = {a.address for a in tables["cam1"].heartbeat_targets()}
            assert seen == {"tcp://127.0.0.1:5602", "tcp://127.0.0.1:5603"}
            assert tables["cam1"].record_heartbeat("cam3", rtt_ms=0.2)
            assert _names(tables["cam1"].usable(BUNDLE, WIRE)) == ["cam3"]
            await peers["cam3"].aclose()
            await _wait_until(
                lambda: all("cam3" not in _targets(tables[n]) for n in ("cam1", "cam2")),
                5.0,
                "cam3's goodbye reaches the others",
            )
            assert tables["cam1"].usable(BUNDLE, WIRE) == []
            await asyncio.wait_for(runs[2], 1.0)  # aclose() ends run()
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
        assert all(task.done() for task in runs)

    _run(scenario())


@pytest.mark.usefixtures("quick_timing")
@pytest.mark.timeout(30)
def test_hostile_announcements_are_ignored_with_one_warning(
    service_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    hostile_txts: list[dict[bytes, bytes | None]] = [
        {b"name": b"\xff\xfe\xfd", b"role": b"edge"},
        {**GOOD_TXT, b"role": b"king"},
        {**GOOD_TXT, b"name": b"a" * 200, b"port": b"1"},
        {b"garbage": None},
    ]

    async def scenario() -> None:
        table = NeighbourTable("browser")
        browser = MdnsDiscovery(
            table, None, MdnsConfig(interfaces=LOOPBACK, service_type=service_type)
        )
        await browser.async_start()
        attacker = AsyncZeroconf(interfaces=list(LOOPBACK))
        try:
            infos = [
                AsyncServiceInfo(
                    service_type,
                    f"evil{i}.{service_type}",
                    port=5601,
                    properties=txt,
                    parsed_addresses=["127.0.0.1"],
                    server=f"evil{i}.local.",
                )
                for i, txt in enumerate(hostile_txts)
            ]
            for info in infos:
                await attacker.async_register_service(info)
            good = MdnsDiscovery(
                NeighbourTable("good"),
                _advertisement("good", 5609),
                MdnsConfig(interfaces=LOOPBACK, service_type=service_type),
            )
            await good.async_start()
            await _wait_until(lambda: _targets(table) == {"good"}, 10.0, "the good peer")
            await _wait_until(
                lambda: sum("malformed" in r.message for r in caplog.records) >= len(infos),
                5.0,
                "every hostile announcement is seen",
            )
            # The same garbage again only logs at DEBUG.
            for info in infos:
                info.port = 5602
                await attacker.async_update_service(info)
            await asyncio.sleep(0.5)
            await good.aclose()
        finally:
            await attacker.async_close()
            await browser.aclose()
        assert _targets(table) == set()

    with caplog.at_level(logging.DEBUG, logger="ccied.discovery"):
        _run(scenario())
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.message
    ]
    assert len(warnings) == len(hostile_txts), [r.message for r in warnings]
    repeats = [r for r in caplog.records if r.levelno == logging.DEBUG and "malformed" in r.message]
    assert repeats, "the updated garbage was not seen again"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.usefixtures("quick_timing")
@pytest.mark.timeout(30)
def test_two_peers_with_one_name_both_get_announced(service_type: str) -> None:
    config = MdnsConfig(interfaces=LOOPBACK, service_type=service_type)

    async def scenario() -> None:
        table = NeighbourTable("watcher")
        watcher = MdnsDiscovery(table, None, config)
        await watcher.async_start()
        # Same name, address and port: the same instance name; zeroconf renames one.
        first = MdnsDiscovery(NeighbourTable("cam"), _advertisement("cam", 5601), config)
        second = MdnsDiscovery(NeighbourTable("cam"), _advertisement("cam", 5601), config)
        try:
            await first.async_start()
            await second.async_start()
            assert first.instance != second.instance
            await _wait_until(lambda: len(watcher.announcements()) == 2, 10.0, "both instances")
            assert _targets(table) == {"cam"}
        finally:
            for d in (first, second, watcher):
                await d.aclose()

    _run(scenario())


@pytest.mark.timeout(30)
def test_an_interface_that_is_not_ours_is_a_discovery_error() -> None:
    async def scenario() -> None:
        discovery = MdnsDiscovery(
            NeighbourTable("x"), _advertisement(), MdnsConfig(interfaces=("192.0.2.77",))
        )
        with pytest.raises(DiscoveryError):
            await discovery.async_start()
        await discovery.aclose()

    _run(scenario())


_KILLED_PEER = """
import asyncio, sys
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

async def main():
    aiozc = AsyncZeroconf(interfaces=["127.0.0.1"])
    service_type = sys.argv[1]
    info = AsyncServiceInfo(
        service_type, "doomed." + service_type, port=5607, parsed_addresses=["127.0.0.1"],
        server="doomed.local.", host_ttl=1, other_ttl=1,
        properties={"name": "doomed", "role": "edge", "bundle": "b", "wire": "1", "port": "5607"},
    )
    await aiozc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.usefixtures("quick_timing")
@pytest.mark.timeout(30)
def test_refresh_resuggests_a_forgotten_peer_and_drops_a_killed_one(service_type: str) -> None:
    config = MdnsConfig(
        interfaces=LOOPBACK,
        service_type=service_type,
        refresh_interval_s=0.2,
        resolve_timeout_s=0.3,
    )
    table = NeighbourTable(
        "watcher", NeighbourTableConfig(liveness_timeout_s=0.1, forget_after_s=0.1)
    )

    async def scenario() -> None:
        watcher = MdnsDiscovery(table, None, config)
        peer = MdnsDiscovery(NeighbourTable("alive"), _advertisement("alive", 5606), config)
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILLED_PEER, service_type, stdout=asyncio.subprocess.PIPE
        )
        runs = [asyncio.create_task(watcher.run()), asyncio.create_task(peer.run())]
        try:
            assert doomed.stdout is not None
            assert await doomed.stdout.readline() == b"registered\n"
            await _wait_until(
                lambda: {a.name for a in watcher.announcements()} == {"alive", "doomed"},
                10.0,
                "both peers announced",
            )
            doomed.kill()  # SIGKILL: no goodbye
            await doomed.wait()
            # Never confirmed by a heartbeat, both are forgotten by the table
            # (judged a second ahead, so a refresh that lands meanwhile on a
            # loaded machine cannot keep them)...
            table.expire(now=time.monotonic() + 1.0)
            assert _targets(table) == set()
            # ...and the live one comes back with the next refresh.
            await _wait_until(lambda: "alive" in _targets(table), 5.0, "alive re-suggested")
            # The killed one's records expire (TTL 1 s) and it stops being suggested.
            await _wait_until(
                lambda: {a.name for a in watcher.announcements()} == {"alive"},
                5.0,
                "the killed peer dropped",
            )
        finally:
            if doomed.returncode is None:
                doomed.kill()
                await doomed.wait()
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    _run(scenario())
