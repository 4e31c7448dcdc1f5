"""``ccied demo`` as a user runs it: three cameras answered, a table, a PNG plot."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ccied.bench import demo
from ccied.bench.workloads import CameraStream as Stream
from ccied.peer.cli import build_parser
from ccied.peer.client import FrameResult

CCIED = [sys.executable, "-m", "ccied.peer.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def frame_result(name: str, source: str, latency_ms: float) -> FrameResult:
    return FrameResult(
        frame=name,
        label=7,
        class_name="cock",
        confidence=0.9,
        source=source,
        served_by="cloud1" if source == "cloud" else "cam1",
        latency_ms=latency_ms,
        bytes_sent=0 if source == "cache" else 8000,
        bytes_received=0,
        head_ms=1.0,
        tail_ms=1.0,
        cache_entry=-1,
        cache_distance=-1.0,
        variant="blocks.11-b6",
    )


@pytest.mark.slow
def test_demo_streams_four_cameras_and_writes_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    done = subprocess.run(
        [*CCIED, "demo", "--every", "25", "--limit", "1", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "cameras emulated 4x slower" in out
    # --limit 1: one frame each for the fixed camera (cam1) and the two on one
    # scene (cam2, cam3), two for the camera passing its places again (cam4).
    assert "frames 5/5" in out
    rows = {m[1]: int(m[2]) for m in re.finditer(r"^(cam\d|all) +(\d+) ", out, re.MULTILINE)}
    assert rows == {"cam1": 1, "cam2": 1, "cam3": 1, "cam4": 2, "all": 5}
    assert "fid dec" in out and "why frames missed the cache" in out
    assert f"plot written to {plot}" in out
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "ccied-demo.png").exists()


def test_json_mode_prints_only_one_object_per_answer(capsys: pytest.CaptureFixture[str]) -> None:
    streams = [Stream("cam1", "static", [("a#0", np.zeros((2, 2, 3), np.uint8))])]
    tally = demo.Tally(streams, json_out=True)
    tally.add("cam1", frame_result("a#0", "cloud", 120.0), agrees=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["camera"] == "cam1" and record["frame"] == "a#0"
    assert record["agrees_with_full_model"] is True and record["answered_at_s"] >= 0


def test_live_view_and_table_show_hit_rate_per_camera(tmp_path: Path) -> None:
    streams = [
        Stream("cam1", "static", [(f"a#{i}", np.zeros((2, 2, 3), np.uint8)) for i in range(4)]),
        Stream("cam2", "overlap", [(f"a#{i}", np.zeros((2, 2, 3), np.uint8)) for i in range(2)]),
    ]
    tally = demo.Tally(streams, json_out=False)
    for i, source in enumerate(("cloud", "cache", "cache", "cache")):
        tally.add("cam1", frame_result(f"a#{i}", source, 100.0 + i), agrees=True)
    tally.add("cam2", frame_result("a#0", "cloud", 300.0), agrees=True)
    assert "frames 5/6" in tally.status_line()
    assert "hit rate 0.60 (cam1 0.75 cam2 0.00)" in tally.status_line()

    # Not a terminal: the final status line is written as a line of its own.
    out = io.StringIO()
    done = threading.Thread(target=lambda: None)
    done.start()
    done.join()
    demo.watch([done], tally, out)
    assert out.getvalue().endswith("\n") and "\r" not in out.getvalue()

    table = demo.summary_table(tally.answers, {f"a#{i}": 7 for i in range(4)})
    cam1 = next(line for line in table.splitlines() if line.startswith("cam1"))
    assert cam1.split()[:2] == ["cam1", "4"] and "0.75" in cam1
    assert "3 cache, 1 cloud1 (cloud)" in cam1
    plot = tmp_path / "p.png"
    demo.plot(tally.answers, plot)
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("argv", "plot"),
    [
        ([], demo.DEFAULT_PLOT),
        (["--no-plot"], None),
        (["--plot", "x.png"], Path("x.png")),
        (["--json"], None),
        (["--json", "--plot", "x.png"], Path("x.png")),
    ],
)
def test_plot_options(monkeypatch: pytest.MonkeyPatch, argv: list[str], plot: Path | None) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs) or 0)
    args: argparse.Namespace = build_parser().parse_args(["demo", *argv])
    assert args.func(args) == 0
    assert seen["plot_path"] == plot
