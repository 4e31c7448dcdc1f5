"""The cluster benchmark's report: fidelity as two numbers, ratios, the floor, bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ccied.bench.cluster_bench import (
    faithful,
    floor_ms,
    markdown_tables,
    merge_reports,
    summarise,
)
from ccied.peer.client import FrameResult
from ccied.peer.errors import PeerError


def _row(mean_ms: float, decisive: float, every: float) -> dict[str, Any]:
    return {
        "mean_ms": mean_ms,
        "p95_ms": mean_ms * 1.5,
        "hit_rate": 0.0,
        "fidelity_decisive": decisive,
        "fidelity_all": every,
        "bytes_per_frame": 1000.0,
        "overhead_ms": 2.0,
        "frames": 10,
    }


def test_ratios_against_the_fastest_and_the_fastest_faithful_baseline() -> None:
    report = {
        "settings": [
            {
                "workload": "static",
                "bandwidth_mbps": 10.0,
                "device_slowdown": 10.0,
                "strategies": {
                    "edge_only": _row(500, 1.0, 1.0),
                    # Fastest, but changes decisive answers: not faithful.
                    "cloud_only_jpeg": _row(100, 0.95, 0.80),
                    # Faithful: decisive answers kept, all frames >= 0.95.
                    "cloud_only_lossless": _row(400, 1.0, 0.97),
                    "ccied_shared_cache": _row(200, 1.0, 0.99),
                },
            }
        ]
    }
    table = markdown_tables(report)
    assert table.startswith("### static")
    ccied = next(line for line in table.splitlines() if "ccied_shared_cache" in line)
    cells = [cell.strip() for cell in ccied.strip("|").split("|")]
    assert cells[-2:] == ["2.00", "0.50"]
    jpeg = next(line for line in table.splitlines() if "cloud_only_jpeg" in line)
    assert "| no |" in jpeg


@pytest.mark.parametrize(
    ("decisive", "every", "expected"),
    [(1.0, 0.95, True), (0.99, 1.0, True), (0.98, 1.0, False), (1.0, 0.94, False)],
)
def test_faithful_needs_both_floors(decisive: float, every: float, expected: bool) -> None:
    assert faithful({"fidelity_decisive": decisive, "fidelity_all": every}) is expected


def result(frame: str, label: int, source: str, latency_ms: float, **kw: Any) -> FrameResult:
    values: dict[str, Any] = {
        "frame": frame,
        "label": label,
        "class_name": "x",
        "confidence": 0.9,
        "source": source,
        "served_by": "cloud",
        "latency_ms": latency_ms,
        "bytes_sent": 0,
        "bytes_received": 0,
        "head_ms": 0.0,
        "tail_ms": 0.0,
        "cache_entry": -1,
        "cache_distance": -1.0,
        "variant": "v",
    }
    return FrameResult(**{**values, **kw})


def test_the_floor_and_the_overhead_above_it() -> None:
    # 10,000 B at 10 Mbit/s = 8 ms, + 20 ms RTT, + head 30 + tail 12 = 70 ms.
    sent = result("a", 1, "cloud", 73.0, bytes_sent=10_000, head_ms=30.0, tail_ms=12.0)
    assert floor_ms(sent, 10.0, 20.0) == pytest.approx(70.0)
    local = result("b", 2, "local", 50.0, head_ms=20.0, tail_ms=25.0)
    assert floor_ms(local, 10.0, 20.0) == pytest.approx(45.0)
    hit = result("c", 3, "cache", 4.0)
    reference = {"a": (1, 0.9), "b": (9, 0.2), "c": (3, 0.7)}
    row = summarise({"cam1": [sent, local, hit]}, reference, 10.0, 20.0, expected_frames=4)
    assert row["overhead_ms"] == pytest.approx(4.0)  # median of 3 and 5; hits excluded
    # b disagrees, but the model was guessing on it: decisive agreement stays 1.
    assert row["fidelity_decisive"] == 1.0 and row["fidelity_all"] == pytest.approx(0.6667)
    assert row["hit_rate"] == pytest.approx(0.3333) and row["hit_agreement"] == 1.0
    assert row["lost_frames"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workloads", "parking"], "invalid choice"),
        (["--bandwidths", "0"], "must be above 0"),
        (["--slowdowns", "0.5"], "at least 1"),
        (["--frames", "0"], "at least 1"),
    ],
)
def test_bad_options_are_a_one_line_error(tmp_path: Path, argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", "bench", "cluster", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_sweep_run_in_parts_merges_into_one_report(tmp_path: Path) -> None:
    def report(workload: str, bandwidth: float, mean_ms: float) -> dict[str, Any]:
        setting = {
            "workload": workload,
            "bandwidth_mbps": bandwidth,
            "device_slowdown": 10.0,
            "rtt_ms": 20.0,
            "strategies": {"edge_only": _row(mean_ms, 1.0, 1.0)},
        }
        return {"settings": [setting], "seconds": 10.0, "date": "2026-11-30"}

    parts = []
    for i, (workload, bandwidth, mean_ms) in enumerate(
        [("overlap", 10.0, 300.0), ("static", 100.0, 200.0), ("static", 10.0, 250.0)]
    ):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps(report(workload, bandwidth, mean_ms)))
        parts.append(path)
    # The same setting again: the later run wins.
    again = tmp_path / "again.json"
    again.write_text(json.dumps(report("static", 10.0, 240.0)))
    merged = merge_reports([*parts, again])
    keys = [(s["workload"], s["bandwidth_mbps"]) for s in merged["settings"]]
    assert keys == [("static", 10.0), ("static", 100.0), ("overlap", 10.0)]
    assert merged["settings"][0]["strategies"]["edge_only"]["mean_ms"] == 240.0
    assert merged["seconds"] == 40.0 and len(merged["merged_from"]) == 4
    with pytest.raises(PeerError, match="not a report"):
        merge_reports([tmp_path / "missing.json"])
