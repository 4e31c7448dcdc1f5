"""The optional ``device`` field of the mDNS TXT record: sent when known, read when
present, and a peer that does not send it (an older one) still parses."""

from __future__ import annotations

import pytest
from ccied.discovery import Advertisement, NeighbourTable
from ccied.discovery.mdns import MalformedAnnouncementError, parse_txt, txt_record
from ccied.discovery.neighbours import Announcement

OLD_PEER_TXT = {
    b"name": b"cam1",
    b"role": b"edge",
    b"bundle": b"abc",
    b"wire": b"1",
    b"port": b"5601",
}


def test_the_device_travels_in_the_txt_record() -> None:
    ad = Advertisement(name="cloud1", role="cloud", bundle_id="abc", wire_version=1, port=5601,
                       device="cuda:0")  # fmt: skip
    record = txt_record(ad)
    assert record["device"] == "cuda:0"
    wire_txt = {k.encode(): v.encode() for k, v in record.items()}
    assert parse_txt(wire_txt, ["127.0.0.1"], 5601).device == "cuda:0"
    # Not said: not sent, so the record stays as it was for peers that do not know it.
    plain = Advertisement(name="cam1", role="edge", bundle_id="abc", wire_version=1, port=5601)
    assert "device" not in txt_record(plain)


def test_a_peer_that_does_not_send_a_device_still_parses() -> None:
    assert parse_txt(OLD_PEER_TXT, ["127.0.0.1"], 5601).device == ""


@pytest.mark.parametrize("device", [b"cuda 0", b"x" * 33, b"gpu\n"])
def test_a_malformed_device_is_refused(device: bytes) -> None:
    with pytest.raises(MalformedAnnouncementError, match="device"):
        parse_txt({**OLD_PEER_TXT, b"device": device}, ["127.0.0.1"], 5601)


def test_status_shows_the_device_and_a_heartbeat_does_not_erase_it() -> None:
    table = NeighbourTable("cam1", clock=lambda: 0.0)

    def said(device: str = "") -> Announcement:
        return Announcement("cloud1", "cloud", "tcp://127.0.0.1:5601", "abc", 1, device=device)

    assert table.observe_announcement(said("cuda:0"))  # mDNS
    assert table.observe_announcement(said())  # a heartbeat's suggestion names no device
    table.record_heartbeat("cloud1", rtt_ms=1.0)
    [row] = table.snapshot()
    assert row["device"] == "cuda:0"
