"""``ccied bench cloud``: one cloud peer serving many edges' tensors, batched or not.

A cloud runs as a ``ccied peer --role cloud`` process (ZeroMQ with CURVE over
loopback, no cache, no mDNS). N synthetic edges are asyncio clients in this
process, each with its own DEALER socket and a key the cloud trusts. Each sends
the encoded tensor of a real frame (the heads of the bundled clips' frames, in
the default variant, are computed once before the cloud starts), waits for the
answer and sends the next at once: N requests are always at the cloud.

Every setting (concurrency x batching) warms up, then measures for a fixed time:

* frames/s: answers received in the window, over the window;
* latency at the cloud, p50 and p99: each reply's ``served_ms``, from the
  decoded request to its answer at the cloud, the wait for a batch included
  (the socket's read and write, about 0.1 ms on loopback, are not in it); and
  at the client, from send to receipt in this process, for comparison;
* batch sizes: the cloud's own counts (``ccied status``: batching), before and
  after the window;
* whether each answer's label equals the frame's tail run alone (batch 1).

With batching is the cloud's default (``--max-batch 32``; a 2 ms window on a GPU only);
without is ``--max-batch 1``. The two clouds run side by side (the idle one
waits on its sockets) with torch's own thread count, as ``ccied peer`` does; each
round measures every concurrency without and then with batching, so a machine
that gets busier during the run weighs on both alike, and frames/s is the
median round's (latencies are pooled over the rounds). A cloud may hold
``--max-pending`` requests; the bench raises it above the largest concurrency
so that none is answered busy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from ccied.bench.cluster import PeerProcess, free_tcp_port, local_keys, running, runtime_folder
from ccied.bench.demo import percentile
from ccied.peer.argtypes import positive_float, positive_int
from ccied.peer.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH
from ccied.peer.client import Client
from ccied.peer.errors import PeerUnavailableError
from ccied.peer.keys import Keypair, KeyStore
from ccied.peer.tails import default_window_ms
from ccied.peer.wire import ErrorCode, ErrorReply, InferRequest, InferResult, decode, encode

CONCURRENCY = (1, 4, 16, 64)
DEFAULT_VARIANT = "blocks.11-b6"
DEFAULT_DURATION_S = 5.0
DEFAULT_WARMUP_S = 1.5
DEFAULT_ROUNDS = 3
DEFAULT_FRAMES = 96
QUICK_DURATION_S = 4.0
QUICK_WARMUP_S = 1.0
QUICK_ROUNDS = 1
QUICK_FRAMES = 32
# A real edge waits this long for a target (--remote-timeout-s) and says so.
DEADLINE_MS = 2000.0
REPLY_TIMEOUT_S = 30.0
# The target on this 2-core CPU, at concurrency 16.
TARGET_GAIN = 1.5
TARGET_P99_RATIO = 2.0
TARGET_CONCURRENCY = 16


@dataclass(frozen=True)
class Payload:
    tensor: np.ndarray
    encoding: str
    label: int  # the tail's answer for this frame alone (batch 1)


@dataclass
class Reply:
    sent: float
    received: float
    served_ms: float = 0.0
    ok: bool = False
    busy: bool = False
    agrees: bool = False


@dataclass
class Setting:
    concurrency: int
    batching: bool
    frames_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float = 0.0
    client_p50_ms: float = 0.0
    client_p99_ms: float = 0.0
    answers: int = 0
    busy: int = 0
    errors: int = 0
    lost: int = 0
    agreement: float = 1.0  # share of answers equal to the frame's tail alone
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "batching": self.batching,
            "frames_per_s": round(self.frames_per_s, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "mean_batch": round(self.mean_batch, 2),
            "client_p50_ms": round(self.client_p50_ms, 2),
            "client_p99_ms": round(self.client_p99_ms, 2),
            "answers": self.answers,
            "busy": self.busy,
            "errors": self.errors,
            "lost": self.lost,
            "agreement": round(self.agreement, 4),
            "batch_sizes": self.batch_sizes,
        }


@dataclass(frozen=True)
class CloudBenchConfig:
    concurrency: tuple[int, ...] = CONCURRENCY
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    frames: int = DEFAULT_FRAMES
    variant: str = DEFAULT_VARIANT
    window_ms: float | None = None  # None: the peer's default for its device
    max_batch: int = DEFAULT_MAX_BATCH
    threads: int | None = None  # the cloud's torch threads (None: torch's choice, as a peer)
    rounds: int = (
        DEFAULT_ROUNDS  # each setting measured this often, alternating with the other cloud
    )
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("every concurrency must be at least 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.frames < 1 or self.rounds < 1:
            raise ValueError(
                "--duration-s, --frames and --rounds must be positive, --warmup-s not negative"
            )
        if self.max_batch < 2:
            raise ValueError("--max-batch for the batched runs must be at least 2")
        if self.window_ms is not None and self.window_ms < 0:
            raise ValueError("--window-ms must be 0 or more")


def precompute(config: CloudBenchConfig) -> list[Payload]:
    """Heads of real frames from the bundled clips, and each frame's tail alone."""
    import torch
    from ccied.peer.worker import ModelWorker
    from ccied.pruning.bundle import builtin_bundle
    from ccied.pruning.media import bundled_clips, iter_frames

    clips = bundled_clips()
    per_clip = -(-config.frames // len(clips))
    pixels = []
    for clip in clips:
        # Spread over the clip: every 4th frame, up to its share.
        pixels += [f.pixels for f in iter_frames(clip, every=4, limit=per_clip)]
    pixels = pixels[: config.frames]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    worker = ModelWorker(builtin_bundle())
    encoding = worker.variants[config.variant].encoding

    async def heads() -> list[Payload]:
        out = []
        for frame in pixels:
            head = await worker.head(frame, config.variant, with_cache=False)
            assert head.payload is not None
            alone = await worker.tail(config.variant, head.payload, encoding)
            out.append(Payload(head.payload, encoding, alone.label))
        return out

    try:
        return asyncio.run(heads())
    finally:
        worker.close()


async def _edge(
    sock: zmq.asyncio.Socket,
    start: int,
    payloads: Sequence[Payload],
    bundle_id: str,
    variant: str,
    stop_at: float,
    replies: list[Reply],
    lost: list[int],
) -> None:
    """One synthetic edge: a request, its answer, the next request at once."""
    index = start
    while time.perf_counter() < stop_at:
        payload = payloads[index % len(payloads)]
        request_id = f"e{start}-{index}"
        index += 1
        message = InferRequest(
            request_id=request_id,
            bundle_id=bundle_id,
            origin="bench-edge",
            variant=variant,
            encoding=payload.encoding,
            deadline_ms=DEADLINE_MS,
            tensor=payload.tensor,
        )
        sent = time.perf_counter()
        await sock.send_multipart(encode(message))
        try:
            while True:  # a reply to an earlier, timed-out request may come first
                reply = decode(await asyncio.wait_for(sock.recv_multipart(), REPLY_TIMEOUT_S))
                if reply.request_id == request_id:
                    break
        except TimeoutError:
            lost.append(1)
            continue
        record = Reply(sent, time.perf_counter())
        if isinstance(reply, InferResult):
            record.ok, record.served_ms = True, reply.served_ms
            record.agrees = reply.label == payload.label
        elif isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUSY:
            record.busy = True
        replies.append(record)


def _sizes(status: dict[str, Any]) -> Counter[int]:
    return Counter({int(k): int(v) for k, v in status["batching"]["batch_sizes"].items()})


@dataclass
class Round:
    """What one measuring window of one setting saw."""

    replies: list[Reply]
    lost: int
    sizes: Counter[int]
    duration_s: float

    def answers(self) -> list[Reply]:
        return [r for r in self.replies if r.ok]


async def measure(
    address: str,
    keys: tuple[Keypair, str],
    bundle_id: str,
    payloads: Sequence[Payload],
    concurrency: int,
    config: CloudBenchConfig,
    status: Callable[[], dict[str, Any]],
) -> Round:
    """``concurrency`` edges at full speed against the cloud for one window."""
    context = zmq.asyncio.Context()
    sockets = []
    for _ in range(concurrency):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_secretkey = keys[0].secret.encode()
        sock.curve_publickey = keys[0].public.encode()
        sock.curve_serverkey = keys[1].encode()
        sock.connect(address)
        sockets.append(sock)
    window_start = time.perf_counter() + config.warmup_s
    window_end = window_start + config.duration_s
    replies: list[Reply] = []
    lost: list[int] = []
    snapshots: list[dict[str, Any]] = []

    async def snapshot_at(when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        snapshots.append(await asyncio.to_thread(status))

    try:
        await asyncio.gather(
            snapshot_at(window_start),
            snapshot_at(window_end),
            *(
                _edge(s, i, payloads, bundle_id, config.variant, window_end, replies, lost)
                for i, s in enumerate(sockets)
            ),
        )
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    inside = [r for r in replies if window_start <= r.received < window_end]
    return Round(inside, len(lost), _sizes(snapshots[1]) - _sizes(snapshots[0]), config.duration_s)


def summarize(concurrency: int, batching: bool, rounds: Sequence[Round]) -> Setting:
    """One setting over its rounds: the median round's frames/s, latencies pooled."""
    answers = [r for one in rounds for r in one.answers()]
    replies = [r for one in rounds for r in one.replies]
    sizes: Counter[int] = sum((one.sizes for one in rounds), Counter())
    batches = sum(sizes.values())
    served = [r.served_ms for r in answers]
    client = [(r.received - r.sent) * 1e3 for r in answers]
    return Setting(
        concurrency=concurrency,
        batching=batching,
        frames_per_s=statistics.median(len(one.answers()) / one.duration_s for one in rounds),
        p50_ms=percentile(served, 50),
        p99_ms=percentile(served, 99),
        mean_batch=sum(k * v for k, v in sizes.items()) / batches if batches else 0.0,
        client_p50_ms=percentile(client, 50),
        client_p99_ms=percentile(client, 99),
        answers=len(answers),
        busy=sum(r.busy for r in replies),
        errors=sum(not r.ok and not r.busy for r in replies),
        lost=sum(one.lost for one in rounds),
        agreement=sum(r.agrees for r in answers) / len(answers) if answers else 0.0,
        batch_sizes={str(k): sizes[k] for k in sorted(sizes)},
    )


def _cloud(folder: Path, logs: Path, batching: bool, config: CloudBenchConfig) -> PeerProcess:
    window = [] if config.window_ms is None else ["--batch-window-ms", f"{config.window_ms:g}"]
    batch_args = (
        [*window, "--max-batch", str(config.max_batch)] if batching else ["--max-batch", "1"]
    )
    name = "batched" if batching else "single"
    return PeerProcess(
        name=name,
        role="cloud",
        listen=f"tcp://127.0.0.1:{free_tcp_port()}",
        socket_path=folder / f"{name}.sock",
        log_path=logs / f"{name}.log",
        threads=config.threads,
        extra_args=[
            "--no-cache",
            "--device",
            config.device,
            # None is answered busy: the largest concurrency fits, twice.
            "--max-pending",
            str(max(64, 2 * max(config.concurrency))),
            *batch_args,
        ],
    )


def run_cloud_bench(config: CloudBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both clouds, every concurrency; the report as ``--json`` writes it.

    Both clouds run at once (the idle one waits on its sockets) and each round
    measures every concurrency without, then with batching, so a machine that
    gets busier during the run (a shared one does) weighs on both alike.
    """
    began = time.monotonic()
    log(f"computing the heads of {config.frames} frames ({config.variant})...")
    payloads = precompute(config)
    rounds: dict[tuple[int, bool], list[Round]] = {}
    with tempfile.TemporaryDirectory(prefix="ccied-cloud-", dir="/tmp") as tmp:
        folder = runtime_folder(Path(tmp))
        client_keys = KeyStore(local_keys(folder).state_dir("bench-edges")).load()
        clouds = {b: _cloud(folder, Path(tmp), b, config) for b in (False, True)}
        log("starting two cloud peers (batching off, on)...")
        with _explained(list(clouds.values())), running(list(clouds.values())):
            statuses = {}
            for batching, cloud in clouds.items():
                with Client(cloud.socket_path, 10.0) as client:
                    statuses[batching] = client.status()
            device = statuses[True]["device"]
            for index in range(config.rounds):
                for concurrency in config.concurrency:
                    for batching, cloud in clouds.items():
                        keys = (client_keys, cloud.keys().load().public)
                        with Client(cloud.socket_path, 10.0) as client:
                            one = asyncio.run(
                                measure(
                                    cloud.listen,
                                    keys,
                                    statuses[batching]["bundle_id"],
                                    payloads,
                                    concurrency,
                                    config,
                                    client.status,
                                )
                            )
                        rounds.setdefault((concurrency, batching), []).append(one)
                        answers = one.answers()
                        log(
                            f"  round {index + 1} concurrency {concurrency:>3} batching "
                            f"{'on ' if batching else 'off'}: "
                            f"{len(answers) / one.duration_s:7.1f} frames/s, p99 "
                            f"{percentile([r.served_ms for r in answers], 99):6.1f} ms"
                        )
    settings = [
        summarize(concurrency, batching, rounds[(concurrency, batching)])
        for batching in (False, True)
        for concurrency in config.concurrency
    ]
    return _report(config, device, settings, time.monotonic() - began)


@contextlib.contextmanager
def _explained(clouds: Sequence[PeerProcess]) -> Iterator[None]:
    """A cloud that dies at start-up: its log's last line in the error (the log goes away)."""
    try:
        yield
    except PeerUnavailableError as exc:
        lines = [
            line
            for cloud in clouds
            if cloud.log_path is not None and cloud.log_path.exists()
            for line in cloud.log_path.read_text(errors="replace").splitlines()
        ]
        raise PeerUnavailableError(f"{exc}: {lines[-1] if lines else 'no log'}") from None


def _report(
    config: CloudBenchConfig, device: str, settings: list[Setting], seconds: float
) -> dict[str, Any]:
    by_key = {(s.concurrency, s.batching): s for s in settings}
    comparison = []
    for concurrency in config.concurrency:
        single, batched = by_key[(concurrency, False)], by_key[(concurrency, True)]
        comparison.append(
            {
                "concurrency": concurrency,
                "frames_per_s_x": round(batched.frames_per_s / single.frames_per_s, 2)
                if single.frames_per_s
                else None,
                "p99_x": round(batched.p99_ms / single.p99_ms, 2) if single.p99_ms else None,
            }
        )
    target: dict[str, Any] = {"concurrency": TARGET_CONCURRENCY}
    at = next((c for c in comparison if c["concurrency"] == TARGET_CONCURRENCY), None)
    if at is not None and at["frames_per_s_x"] is not None and at["p99_x"] is not None:
        target.update(
            frames_per_s_x=at["frames_per_s_x"],
            p99_x=at["p99_x"],
            met=at["frames_per_s_x"] >= TARGET_GAIN and at["p99_x"] <= TARGET_P99_RATIO,
        )
    return {
        "device": device,
        "settings": [s.row() for s in settings],
        "comparison": comparison,
        "target": target,
        "variant": config.variant,
        "window_ms": (
            default_window_ms("cloud", device) if config.window_ms is None else config.window_ms
        ),
        "max_batch": config.max_batch,
        "cloud_threads": config.threads or f"torch's choice ({os.cpu_count()} cores)",
        "duration_s": config.duration_s,
        "rounds": config.rounds,
        "warmup_s": config.warmup_s,
        "frames": config.frames,
        "latency": "p50_ms/p99_ms at the cloud (reply's served_ms: decoded request to answer); "
        "client_*: send to receipt at the edge",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs",
        "seconds": round(seconds, 1),
    }


def text_report(report: dict[str, Any]) -> str:
    lines = [
        f"cloud on {report['device']}, variant {report['variant']}, torch threads "
        f"{report['cloud_threads']}; batching: window {report['window_ms']:g} ms, max batch "
        f"{report['max_batch']}; {report['rounds']} x {report['duration_s']:g} s per setting",
        "",
        "concurrency  batching  frames/s   p50 ms   p99 ms  mean batch  client p99 ms  busy  agree",
    ]
    for s in report["settings"]:
        lines.append(
            f"{s['concurrency']:>11}  {'on' if s['batching'] else 'off':>8}  "
            f"{s['frames_per_s']:8.1f}  {s['p50_ms']:7.1f}  {s['p99_ms']:7.1f}  "
            f"{s['mean_batch']:10.2f}  {s['client_p99_ms']:13.1f}  {s['busy']:4}  "
            f"{s['agreement']:.3f}"
        )
    lines.append("")
    for c in report["comparison"]:
        lines.append(
            f"concurrency {c['concurrency']:>3}: batching gives {c['frames_per_s_x']}x the "
            f"frames/s, p99 {c['p99_x']}x"
        )
    for s in report["settings"]:
        if s["batching"]:
            histogram = ", ".join(f"{k}: {v}" for k, v in s["batch_sizes"].items())
            lines.append(f"batch sizes at concurrency {s['concurrency']}: {histogram or '-'}")
    target = report["target"]
    if "met" in target:
        lines.append(
            f"target at concurrency {target['concurrency']} (>= {TARGET_GAIN}x frames/s, p99 "
            f"<= {TARGET_P99_RATIO}x): {'met' if target['met'] else 'missed'}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_FRAMES} frames, one round, {QUICK_WARMUP_S:g} s warm-up and "
        f"{QUICK_DURATION_S:g} s per setting (about a minute on 2 cores)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        nargs="+",
        default=list(CONCURRENCY),
        help="edges sending at once (default 1 4 16 64)",
    )
    parser.add_argument(
        "--duration-s",
        type=positive_float,
        help=f"measured per setting and round (default {DEFAULT_DURATION_S:g})",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        help=f"rounds over every setting, batching off and on in turn; frames/s is the median "
        f"round's (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})",
    )
    parser.add_argument(
        "--warmup-s", type=float, help=f"before each measure (default {DEFAULT_WARMUP_S:g})"
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        help=f"distinct frames the edges cycle through ({DEFAULT_FRAMES})",
    )
    parser.add_argument(
        "--variant", default=DEFAULT_VARIANT, help=f"the tensors' variant ({DEFAULT_VARIANT})"
    )
    parser.add_argument(
        "--window-ms",
        type=float,
        default=None,
        help="the batched cloud's --batch-window-ms (default: the peer's, "
        f"{DEFAULT_BATCH_WINDOW_MS:g} on a GPU, else 0)",
    )
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        help=f"the batched cloud's --max-batch (default {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="the cloud's torch threads (default: torch's choice, one per core, as `ccied peer`)",
    )
    parser.add_argument(
        "--device", default="auto", help="the cloud's --device (default auto: CUDA if seen)"
    )
    parser.add_argument("--json", type=Path, help="write the report here")


def run(args: argparse.Namespace) -> int:
    """``ccied bench cloud``."""
    try:
        config = CloudBenchConfig(
            concurrency=tuple(args.concurrency),
            duration_s=args.duration_s or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S),
            warmup_s=args.warmup_s
            if args.warmup_s is not None
            else (QUICK_WARMUP_S if args.quick else DEFAULT_WARMUP_S),
            frames=args.frames or (QUICK_FRAMES if args.quick else DEFAULT_FRAMES),
            rounds=args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS),
            variant=args.variant,
            window_ms=args.window_ms,
            max_batch=args.max_batch,
            threads=args.threads,
            device=args.device,
        )
    except ValueError as exc:  # an impossible setting: say which, without a traceback
        print(f"ccied bench cloud: {exc}", file=sys.stderr)
        return 2
    report = run_cloud_bench(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(text_report(report))
    print(f"({report['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    lost = sum(s["lost"] for s in report["settings"])
    return 1 if lost else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
