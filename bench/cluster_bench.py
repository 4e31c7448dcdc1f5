"""``ccied bench cluster``: ccied against every baseline, same frames, same run.

A real cluster on this machine: one cloud peer and the workload's camera peers
as separate ``ccied peer`` processes, ZeroMQ over loopback. Slower devices and
links are *emulated* and said so in the output: each camera's compute is
stretched by the device slowdown (``--slowdown``) and each message it sends
waits bytes / bandwidth plus the RTT (``--link-mbps``, ``--link-rtt-ms``),
because kernel netem is not available here. The cloud runs at this machine's
speed.

Workloads (``--workloads``; :func:`ccied.bench.workloads.cluster_workloads`):
``static`` (a fixed camera), ``moving`` (a street camera), ``overlap`` (two or
three cameras on one scene seeing near frames, never the same ones),
``revisit`` (a camera passing the same places again). Every strategy sees the
same frames in the same order.

Strategies (the peer flags that make them):

* ``edge_only``: the whole model on the camera (no cloud, no cache);
* ``cloud_only_jpeg``: the input crop as JPEG q90, always sent to the cloud;
* ``cloud_only_lossless``: the input crop as a lossless WebP, always sent;
* ``split``: the float32 tensor at blocks.11 (Neurosurgeon-style: the tail goes
  wherever it is expected sooner, this device or the cloud);
* ``split_quant``: the codec variants, planned per frame (JALAD-style), no cache;
* ``ccied_local_cache``: ccied (every variant, the images included) with a cache
  on each camera, not shared;
* ``ccied_shared_cache``: ccied with the cache shared across the cluster.

Each answer is compared with the full float32 model on that frame, as two
numbers (DESIGN.md): ``fidelity_decisive`` on frames where that model's top-1
probability is >= 0.5, ``fidelity_all`` on every frame. A strategy is
*faithful* at decisive >= 0.99 and all >= 0.95. For every miss the *floor* is
the work that cannot be avoided: head on the device (encode included) + bytes /
bandwidth + RTT + the tail at the target (decode included); ``overhead_ms`` is
the median of (latency - floor) over the misses, what the framework itself costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port, runtime_folder
from ccied.bench.workloads import (
    WORKLOADS,
    CameraStream,
    cluster_workloads,
    percentile,
    reference_answers,
)
from ccied.peer import argtypes
from ccied.peer.client import Client, FrameResult
from ccied.peer.errors import PeerError
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

log = logging.getLogger(__name__)

STRATEGIES: dict[str, list[str]] = {
    "edge_only": ["--no-cache"],
    "cloud_only_jpeg": ["--no-cache", "--variant", "jpeg-q90", "--always-offload"],
    "cloud_only_lossless": ["--no-cache", "--variant", "lossless", "--always-offload"],
    "split": ["--no-cache", "--variant", "blocks.11-raw"],
    "split_quant": ["--no-cache", "--variants", "blocks.11-b6,blocks.7-b8,blocks.14-b4"],
    "ccied_local_cache": ["--no-share-cache"],
    "ccied_shared_cache": ["--share-cache"],
}
BASELINES = tuple(s for s in STRATEGIES if not s.startswith("ccied"))
DEFAULT_BANDWIDTHS = (1.0, 5.0, 10.0, 50.0, 100.0)
QUICK_BANDWIDTHS = (1.0, 10.0, 100.0)
DEFAULT_SLOWDOWNS = (1.0, 4.0, 10.0)  # this machine, phone-class, Pi-class
QUICK_SLOWDOWNS = (10.0,)
QUICK_WORKLOADS = ("static", "overlap")
DEFAULT_RTT_MS = 20.0
DEFAULT_EVERY = 4
# DESIGN.md: faithful at decisive >= 0.99 and all >= 0.95.
FAITHFUL_DECISIVE = 0.99
FAITHFUL_ALL = 0.95
DECISIVE = 0.5


def reference_labels(streams: Sequence[Any]) -> dict[str, int]:
    """The full float32 model's answer on every frame (the fidelity reference)."""
    return {name: label for name, (label, _) in reference_answers(streams).items()}


def run_strategy(
    strategy: str,
    streams: Sequence[CameraStream],
    cloud_address: str,
    folder: Path,
    bandwidth_mbps: float,
    slowdown: float,
    rtt_ms: float,
    model: str | None = None,
) -> tuple[dict[str, list[FrameResult]], list[str]]:
    """Start the cameras for one strategy, stream concurrently, stop them.

    Returns the results per camera and, for a camera whose peer failed mid-run,
    an error naming it (its unanswered frames are counted lost; the run goes on).
    """
    addresses = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in streams]
    cameras = []
    for i, stream in enumerate(streams):
        args = [
            *STRATEGIES[strategy],
            "--slowdown", str(slowdown),
            "--link-mbps", str(bandwidth_mbps),
            "--link-rtt-ms", str(rtt_ms),
            "--max-pending", "64",
            *(("--model", model) if model else ()),
        ]  # fmt: skip
        if strategy != "edge_only":
            args += ["--cloud", cloud_address]
        if strategy.startswith("ccied"):
            args += [a for j, other in enumerate(addresses) if j != i for a in ("--peer", other)]
        cameras.append(
            PeerProcess(
                name=f"{stream.camera}-{strategy}",
                role="edge",
                listen=addresses[i],
                socket_path=folder / f"{stream.camera}-{strategy}.sock",
                extra_args=args,
                log_path=folder / f"{stream.camera}-{strategy}.log",
            )
        )
    results: dict[str, list[FrameResult]] = {s.camera: [] for s in streams}
    errors: list[str] = []
    try:
        for camera in cameras:
            camera.start()
        for camera in cameras:
            camera.wait_ready()
        for camera in cameras:
            camera.wait_connected()
            if strategy.startswith("ccied"):
                camera.wait_neighbours(count=len(cameras))

        def stream_through(camera: PeerProcess, stream: CameraStream) -> None:
            try:
                with Client(camera.socket_path, timeout_s=60) as client:
                    for name, pixels in stream.frames:
                        results[stream.camera].append(client.submit(pixels, name))
            except Exception as exc:  # reported in the output, with its camera; the run goes on
                lost = len(stream.frames) - len(results[stream.camera])
                errors.append(f"{camera.name}: {exc} ({lost} frames lost)")

        threads = [
            threading.Thread(target=stream_through, args=(camera, stream))
            for camera, stream in zip(cameras, streams, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for camera in cameras:
            camera.stop()
    return results, errors


def floor_ms(result: FrameResult, bandwidth_mbps: float, rtt_ms: float) -> float:
    """The work a miss cannot avoid: head (encode included) + bytes / bandwidth + RTT +
    the tail where it ran (decode included)."""
    network = 0.0
    if result.source in ("peer", "cloud"):
        network = result.bytes_sent * 8 / (bandwidth_mbps * 1e3) + rtt_ms
    return result.head_ms + network + result.tail_ms


def summarise(
    results: dict[str, list[FrameResult]],
    reference: dict[str, tuple[int, float]],
    bandwidth_mbps: float,
    rtt_ms: float,
    errors: Sequence[str] = (),
    expected_frames: int | None = None,
) -> dict[str, Any]:
    """One strategy in one setting: latency, hits, both fidelities, bytes, overhead."""
    every = [r for rows in results.values() for r in rows]
    latencies = [r.latency_ms for r in every] or [0.0]
    decisive = [r for r in every if reference[r.frame][1] >= DECISIVE]

    def agreement(rows: Sequence[FrameResult]) -> float | None:
        return (
            round(sum(r.label == reference[r.frame][0] for r in rows) / len(rows), 4)
            if rows
            else None
        )

    misses = [r for r in every if r.source != "cache"]
    overheads = [r.latency_ms - floor_ms(r, bandwidth_mbps, rtt_ms) for r in misses]
    hits = [r for r in every if r.source == "cache"]
    return {
        "mean_ms": round(statistics.fmean(latencies), 2),
        "median_ms": round(statistics.median(latencies), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "hit_rate": round(len(hits) / max(1, len(every)), 4),
        "hit_agreement": agreement(hits),
        "fidelity_decisive": agreement(decisive),
        "fidelity_all": agreement(every),
        "decisive_frames": len(decisive),
        "bytes_per_frame": round(statistics.fmean(r.bytes_sent for r in every), 1)
        if every
        else 0.0,
        "overhead_ms": round(statistics.median(overheads), 2) if overheads else None,
        "frames": len(every),
        "lost_frames": (expected_frames - len(every)) if expected_frames is not None else 0,
        "errors": list(errors),
        "hit_rate_per_peer": {
            camera: round(sum(r.source == "cache" for r in rows) / max(1, len(rows)), 4)
            for camera, rows in results.items()
        },
        "hits_over_time": {
            camera: [r.source == "cache" for r in rows] for camera, rows in results.items()
        },
        "sources": {
            s: sum(r.source == s for r in every) for s in ("cache", "local", "peer", "cloud")
        },
        "variants": sorted({r.variant for r in every if r.variant}),
    }


def faithful(row: dict[str, Any]) -> bool:
    """DESIGN.md: agreement >= 0.99 on decisive frames and >= 0.95 on all."""
    decisive, every = row.get("fidelity_decisive"), row.get("fidelity_all")
    if every is None or every < FAITHFUL_ALL:
        return False
    return decisive is None or decisive >= FAITHFUL_DECISIVE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="static and overlap, 10x devices only (minutes)"
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS,
        help=f"camera workloads (default: all; quick: {' '.join(QUICK_WORKLOADS)})",
    )
    parser.add_argument(
        "--bandwidths", type=argtypes.positive_float, nargs="+", help="Mbit/s to sweep"
    )
    parser.add_argument(
        "--slowdowns", type=argtypes.slowdown, nargs="+", help="device slowdowns to sweep (>= 1)"
    )
    parser.add_argument("--rtt-ms", type=float, default=DEFAULT_RTT_MS)
    parser.add_argument(
        "--cameras", type=argtypes.positive_int, help="cameras on the overlap scene (2 or 3)"
    )
    parser.add_argument(
        "--frames", type=argtypes.positive_int, help="frames per camera (default 24; quick 16)"
    )
    parser.add_argument(
        "--every",
        type=argtypes.positive_int,
        default=DEFAULT_EVERY,
        help="use every N-th video frame",
    )
    parser.add_argument(
        "--strategies", nargs="+", choices=sorted(STRATEGIES), help="default: all seven"
    )
    parser.add_argument(
        "--model", help="a bundle folder (`ccied prepare`) for every peer; default: built-in"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, default=Path("cluster_latency.png"))
    parser.add_argument("--markdown", type=Path, help="write the tables here as Markdown")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        metavar="REPORT",
        help="run nothing: merge these reports (a sweep run in parts) into the tables, "
        "JSON and plot",
    )


def merge_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """Several runs' JSON as one report (a sweep run in parts); later settings win."""
    merged: dict[str, Any] = {}
    settings: dict[tuple[str, float, float], dict[str, Any]] = {}
    seconds = 0.0
    for path in paths:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            for setting in report["settings"]:
                key = (setting["workload"], setting["bandwidth_mbps"], setting["device_slowdown"])
                settings[key] = setting
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PeerError(f"{path}: not a report of `ccied bench cluster` ({exc})") from exc
        seconds += float(report.get("seconds", 0.0))
        merged.update({k: v for k, v in report.items() if k != "settings"})
    order = {w: i for i, w in enumerate(WORKLOADS)}
    merged["settings"] = [
        settings[key] for key in sorted(settings, key=lambda k: (order.get(k[0], 99), k[2], k[1]))
    ]
    merged["seconds"] = round(seconds, 1)
    merged["merged_from"] = [str(p) for p in paths]
    return merged


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    tables = markdown_tables(report)
    print(tables)
    print(f"({report['seconds']} s)")
    if args.markdown:
        args.markdown.write_text(tables + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.plot:
        plot(report, args.plot)
        print(f"plot: {args.plot}")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        write_outputs(merge_reports(args.from_json), args)
        return 0
    started = time.perf_counter()
    quick = bool(args.quick)
    bandwidths = args.bandwidths or (QUICK_BANDWIDTHS if quick else DEFAULT_BANDWIDTHS)
    slowdowns = args.slowdowns or (QUICK_SLOWDOWNS if quick else DEFAULT_SLOWDOWNS)
    strategies = args.strategies or list(STRATEGIES)
    names = args.workloads or (QUICK_WORKLOADS if quick else WORKLOADS)
    per_camera = args.frames or (16 if quick else 24)
    workloads = cluster_workloads(names, args.cameras or 3, args.every, per_camera)
    # One thread: on a busy 2-core machine torch's default runs the reference far slower.
    torch.set_num_threads(1)
    reference = reference_answers([s for streams in workloads.values() for s in streams])
    settings = []
    with tempfile.TemporaryDirectory(prefix="ccied-bench-", dir="/tmp") as tmp:
        folder = runtime_folder(Path(tmp))
        cloud_address = f"tcp://127.0.0.1:{free_tcp_port()}"
        # One cloud for the whole run, without a cache: it must not carry what one
        # strategy learned into the next.
        cloud = PeerProcess(
            "cloud",
            "cloud",
            cloud_address,
            folder / "cloud.sock",
            extra_args=["--no-cache", *(("--model", args.model) if args.model else ())],
            log_path=Path(tmp) / "cloud.log",
        )
        cloud.start()
        try:
            cloud.wait_ready()
            steps = [
                (w, d, b, s)
                for w in workloads
                for d in slowdowns
                for b in bandwidths
                for s in strategies
            ]
            by_setting: dict[tuple[str, float, float], dict[str, Any]] = {}
            for workload, slowdown, bandwidth, strategy in tqdm(
                steps, desc="cluster", disable=args.no_progress
            ):
                streams = workloads[workload]
                results, errors = run_strategy(
                    strategy,
                    streams,
                    cloud_address,
                    folder,
                    bandwidth,
                    slowdown,
                    args.rtt_ms,
                    args.model,
                )
                expected = sum(len(s.frames) for s in streams)
                by_setting.setdefault((workload, bandwidth, slowdown), {})[strategy] = summarise(
                    results, reference, bandwidth, args.rtt_ms, errors, expected
                )
        finally:
            cloud.stop()
    for (workload, bandwidth, slowdown), rows in by_setting.items():
        settings.append(
            {
                "workload": workload,
                "bandwidth_mbps": bandwidth,
                "device_slowdown": slowdown,
                "rtt_ms": args.rtt_ms,
                "strategies": rows,
            }
        )
    report = {
        "faithful": {"decisive": FAITHFUL_DECISIVE, "all": FAITHFUL_ALL},
        "settings": settings,
        "emulated": {
            "devices": "compute stretched by device_slowdown (cameras only; the cloud runs at "
            "this machine's speed)",
            "links": "sender waits bytes / bandwidth + RTT per message (no kernel netem here)",
        },
        "cameras": {w: [s.camera for s in streams] for w, streams in workloads.items()},
        "frames_per_camera": {
            w: [len(s.frames) for s in streams] for w, streams in workloads.items()
        },
        "every": args.every,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads",
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(report, args)
    return 0


def ratios(rows: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """(fastest baseline's mean ms, fastest faithful baseline's mean ms) in one setting."""
    baselines = {s: r for s, r in rows.items() if s in BASELINES and r["frames"]}
    fastest = min((r["mean_ms"] for r in baselines.values()), default=None)
    fastest_faithful = min((r["mean_ms"] for r in baselines.values() if faithful(r)), default=None)
    return fastest, fastest_faithful


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(report: dict[str, Any]) -> str:
    """A table per workload: every setting and strategy, both fidelities, the overhead
    above the floor, and each latency against the fastest baseline and the fastest
    faithful one."""
    out = []
    for workload in dict.fromkeys(s.get("workload", "-") for s in report["settings"]):
        out += [
            f"### {workload}",
            "",
            "| Mbit/s | slowdown | strategy | mean ms | p95 ms | hit rate | fidelity decisive "
            "| fidelity all | faithful | bytes/frame | overhead ms | x fastest baseline "
            "| x fastest faithful baseline |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for setting in report["settings"]:
            if setting.get("workload", "-") != workload:
                continue
            rows = setting["strategies"]
            fastest, fastest_faithful = ratios(rows)
            for name, row in rows.items():
                lost = f" ({row['lost_frames']} lost)" if row.get("lost_frames") else ""
                out.append(
                    f"| {setting['bandwidth_mbps']:g} | {setting['device_slowdown']:g} | "
                    f"{name}{lost} | {row['mean_ms']:.0f} | {row['p95_ms']:.0f} | "
                    f"{row['hit_rate']:.2f} | {_cell(row.get('fidelity_decisive'))} | "
                    f"{_cell(row.get('fidelity_all'))} | {'yes' if faithful(row) else 'no'} | "
                    f"{row['bytes_per_frame']:.0f} | {_cell(row.get('overhead_ms'), 1)} | "
                    f"{_cell(row['mean_ms'] / fastest if fastest else None, 2)} | "
                    f"{_cell(row['mean_ms'] / fastest_faithful if fastest_faithful else None, 2)} |"
                )
        out.append("")
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean latency against bandwidth per strategy: a panel per workload and device class;
    faithful strategies solid, the others dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(s.get("workload", "-") for s in report["settings"]))
    slowdowns = sorted({s["device_slowdown"] for s in report["settings"]})
    figure, axes = plt.subplots(
        len(workloads),
        len(slowdowns),
        figsize=(5.5 * len(slowdowns), 4.2 * len(workloads)),
        squeeze=False,
    )
    colours = {name: f"C{i}" for i, name in enumerate(STRATEGIES)}
    for row_axes, workload in zip(axes, workloads, strict=True):
        for axis, slowdown in zip(row_axes, slowdowns, strict=True):
            rows = [
                s
                for s in report["settings"]
                if s.get("workload", "-") == workload and s["device_slowdown"] == slowdown
            ]
            rows.sort(key=lambda s: s["bandwidth_mbps"])
            if not rows:
                axis.set_visible(False)
                continue
            for name in rows[0]["strategies"]:
                points = [(s["bandwidth_mbps"], s["strategies"][name]) for s in rows]
                is_faithful = all(faithful(r) for _, r in points)
                axis.plot(
                    [b for b, _ in points],
                    [r["mean_ms"] for _, r in points],
                    marker="o" if is_faithful else "x",
                    linestyle="-" if is_faithful else "--",
                    color=colours.get(name),
                    label=name + ("" if is_faithful else " (not faithful)"),
                )
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(f"emulated uplink, Mbit/s (RTT {rows[0]['rtt_ms']:g} ms)")
            axis.set_ylabel("mean latency, ms")
            axis.set_title(f"{workload}: devices {slowdown:g}x slower than this machine")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
