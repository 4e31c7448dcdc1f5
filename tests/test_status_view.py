"""Plain `ccied status`: the status object a real peer returned, as a readable table.

tests/data/status-edge.json is `ccied status --json` of an edge peer (cam1) that
sent misses to a cloud and a neighbour sharing its state folder, trimmed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from ccied.peer.status_view import render

FIXTURE = Path(__file__).parent / "data" / "status-edge.json"


@pytest.fixture
def status() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FIXTURE.read_text())
    return loaded


def _line(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_counters_are_names_and_numbers_never_python_reprs(status: dict[str, Any]) -> None:
    text = render(status)
    shown = text.replace(status["security"]["public_key"], "KEY")  # Z85 has brackets
    assert not set(shown) & set("{}[]") and "': " not in shown, text
    assert "answered by  cache 12  local 1  peer 7  cloud 29" in text
    assert "hits     12  by depth: thumb16 12  blocks.4 0" in text
    # Reasons with no frames are left out.
    assert "misses   37  by reason: empty 2  no neighbour 18  not decisive 1  skipped 16" in text
    assert "skipped  16  deeper-key lookups left out" in text
    assert _line(text, "shared ").startswith("shared   out 78 entries  in 0 entries  refused 0")
    assert "bytes sent to peers 1.9 MB" in text


def test_identity_bundle_and_variants_with_units(status: dict[str, Any]) -> None:
    text = render(status)
    lines = text.splitlines()
    assert lines[0] == "peer     cam1 (edge)  pid 4242  up 17 s  discovery off  emulated 4x slower"
    assert lines[1].startswith("bundle   dbe4e7087420006f (built-in)  model efficientnet_lite0")
    header = _line(text, "variants ")
    row = _line(text, "         blocks.14-b4")
    # Right-aligned columns end where their header ends.
    for column, value in (("payload", "5288 B"), ("head", "206.6 ms"), ("chosen", "0")):
        assert row.rindex(value) + len(value) == header.index(column) + len(column)
    # Agreement on decisive frames and on all: "-" where the bundle measured none.
    assert row.split()[3:5] == ["-", "0.971"], row


def test_a_variant_measured_on_decisive_frames_shows_both_agreements(
    status: dict[str, Any],
) -> None:
    variant = dict(status["variants"][0])
    variant |= {"name": "blocks.11-k0.50-b2-distilled", "agreement": 0.706}
    variant["agreement_decisive"] = 1.0
    status["variants"].append(variant)
    row = _line(render(status), "         blocks.11-k0.50-b2-distilled")
    assert row.split()[3:5] == ["1.000", "0.706"], row


def test_each_neighbour_shows_its_model_time_and_where_it_came_from(
    status: dict[str, Any],
) -> None:
    text = render(status)
    lines = text.splitlines()
    header = lines[lines.index("neighbours") + 1]
    cloud = _line(text, "         cloud1")
    assert cloud.index("tcp://127.0.0.1:47811") == header.index("address")
    assert "59 Mbit/s" in cloud and "60.3 ms from 8 replies" in cloud and "0.4 s ago" in cloud
    status["neighbours"][1]["tail_estimate"] = {"full_ms": 71.7, "source": "heartbeat"}
    assert "71.7 ms from its heartbeat" in render(status)
    del status["neighbours"][1]["tail_estimate"]  # an older peer: no estimate
    assert "? (not measured yet)" in render(status)
    status["neighbours"] = []
    assert "neighbours none yet" in render(status)


def test_security_says_the_folders_own_key_is_trusted(status: dict[str, Any]) -> None:
    text = render(status)
    assert "security curve  key @Ouug)S=vUaXq)40H*<[z^QF^>33#8sZ^8AweM7@" in text
    assert (
        "trusted 0 keys + this folder's own key (every peer using /tmp/x/state shares it)" in text
    )
    status["security"]["own_key_trusted"] = False
    status["security"]["trusted_keys"] = 1
    assert "trusted 1 key  state /tmp/x/state" in render(status)
    insecure = copy.deepcopy(status)
    insecure["security"] = {"mode": "insecure", "accept_shared_from": "trusted"}
    assert "security INSECURE (--insecure)" in render(insecure)


def test_warnings_come_first_and_held_back_warnings_are_counted(
    status: dict[str, Any],
) -> None:
    assert "WARNING" not in render(status) and "held back" not in render(status)
    status["warnings"] = ["cloud1 runs bundle 0123456789abcdef, this peer dbe4e7087420006f"]
    status["suppressed_warnings"] = {"zap-denied": 1998, "allow-list": 0}
    lines = render(status).splitlines()
    assert lines[0] == "WARNING: cloud1 runs bundle 0123456789abcdef, this peer dbe4e7087420006f"
    assert lines[-1] == "warnings held back by the log's rate limit: zap-denied 1998"


def test_a_down_link_says_why_and_a_peer_without_cache_says_off(
    status: dict[str, Any],
) -> None:
    status["cluster"]["links"][0].update(connected=False, handshake_error="handshake failed")
    status["cache"] = {"enabled": False}
    text = render(status)
    assert "link     tcp://127.0.0.1:47813: handshake failed" in text
    assert "cache    off" in text and "audit" not in text
