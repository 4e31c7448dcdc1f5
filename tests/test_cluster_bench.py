"""The cluster benchmark's report: ratios a reader compares strategies by."""

from __future__ import annotations

from typing import Any

from ccied.bench.cluster_bench import markdown_table


def _row(mean_ms: float, fidelity: float) -> dict[str, Any]:
    return {
        "mean_ms": mean_ms,
        "p95_ms": mean_ms * 1.5,
        "hit_rate": 0.0,
        "fidelity": fidelity,
        "bytes_per_frame": 1000.0,
    }


def test_ratios_against_the_fastest_and_the_fastest_faithful_baseline() -> None:
    report = {
        "settings": [
            {
                "bandwidth_mbps": 10.0,
                "device_slowdown": 10.0,
                "strategies": {
                    "edge_only": _row(500, 1.0),
                    "cloud_only": _row(100, 0.79),  # fastest, but changes answers
                    "split_quant": _row(400, 1.0),  # fastest that keeps them
                    "ccied_local_cache": _row(200, 1.0),
                },
            }
        ]
    }
    table = markdown_table(report)
    ccied = next(line for line in table.splitlines() if "ccied_local_cache" in line)
    cells = [cell.strip() for cell in ccied.strip("|").split("|")]
    assert cells[-2:] == ["2.00", "0.50"]
    assert "fidelity >= 0.99" in table.splitlines()[0]
