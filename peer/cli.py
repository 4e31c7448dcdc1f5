"""The ``ccied`` command line: the only place that reads argv, config files and env."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: `ccied submit`, `ccied status`, `ccied keys` and every
# --help run without torch, FAISS or zeroconf (tests/test_light_cli.py). The daemon
# is imported by `ccied peer` only, each benchmark by its own command.
from ccied.cache.audit import DEFAULT_AUDIT_RATE
from ccied.cache.policy import (
    DEFAULT_ANSWER_FLOOR,
    DEFAULT_CAPACITY,
    DEFAULT_K,
    DEFAULT_MIN_INSERT_CONFIDENCE,
    DEFAULT_THRESHOLD_L2,
    DEFAULT_VOTE_MARGIN,
    THUMBNAIL_THRESHOLD_L2,
)
from ccied.peer.argtypes import positive_int, unit_interval
from ccied.peer.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH
from ccied.peer.client import Client, FrameResult
from ccied.peer.defaults import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_PENDING,
    DEFAULT_METRICS_HOST,
    DEFAULT_REMOTE_TIMEOUT_S,
    LOG_LEVELS,
    SHARED_FROM,
    Role,
)
from ccied.peer.errors import PeerError, ProtocolError, RequestFailedError
from ccied.peer.keys import KEY_CHARS, KeyStore, check_key, default_state_dir, read_certificate
from ccied.peer.status_view import render as render_status
from ccied.pruning.defaults import DEFAULT_CACHE_SPLIT, DEFAULT_FIDELITY_FLOOR, DEFAULT_MODEL
from ccied.pruning.errors import PruningError

if TYPE_CHECKING:
    from ccied.peer.config import load_config, peer_config
    from ccied.peer.daemon import PeerDaemon

log = logging.getLogger("ccied")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_peer_parser(sub: Any) -> None:
    p = sub.add_parser(
        "peer",
        help="run a peer daemon in the foreground",
        description=(
            "Run a ccied peer until SIGINT/SIGTERM. An edge peer runs the model head on "
            "frames its applications submit, answers from its semantic cache when it can, "
            "and otherwise sends the compressed intermediate tensor to whichever live "
            "neighbour or cloud will answer soonest (found over mDNS, or given with "
            "--peer/--cloud), failing over and finishing the frame itself last. A cloud "
            "peer runs tails for the others."
        ),
    )
    p.add_argument("--role", choices=[r.value for r in Role], help="edge (default) or cloud")
    p.add_argument(
        "--name", help="peer name (default: the host name, host-2... when taken on this machine)"
    )
    p.add_argument(
        "--listen",
        help=f"tcp://HOST:PORT for other peers (default {DEFAULT_LISTEN}); 'none' to not listen",
    )
    p.add_argument(
        "--socket",
        type=Path,
        help="Unix socket for local applications (default: $XDG_RUNTIME_DIR/ccied/NAME.sock "
        "or /tmp/ccied-UID/NAME.sock); 'none' for no local socket",
    )
    p.add_argument(
        "--model",
        help=f"a model name (built-in variants) or a folder made by `ccied prepare` "
        f"(default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--variant",
        help="always send this variant of the bundle (default: the planner picks per frame "
        "from the measured bandwidth and compute); see `ccied status`",
    )
    p.add_argument(
        "--variants",
        metavar="A,B,...",
        help="let the planner choose among these variants only (default: all of the bundle's)",
    )
    p.add_argument(
        "--fidelity-floor",
        type=float,
        help=f"least measured agreement a variant needs for latency-first frames "
        f"(default {DEFAULT_FIDELITY_FLOOR})",
    )
    p.add_argument(
        "--cloud",
        help="tcp://HOST:PORT of the cloud peer (edge role); KEY@tcp://... pins its key",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="ADDRESS",
        help="tcp://HOST:PORT (or KEY@tcp://...) of a neighbour peer, tried before the cloud; "
        "repeatable",
    )
    p.add_argument(
        "--no-discovery",
        action="store_true",
        default=None,
        help="no mDNS: use only the --cloud/--peer addresses (networks without multicast)",
    )
    p.add_argument(
        "--interface",
        metavar="IP",
        help="run mDNS on this interface only (default: those the listen address implies)",
    )
    p.add_argument(
        "--remote-timeout-s",
        type=float,
        help=f"deadline for a target's answer before failing over "
        f"(default {DEFAULT_REMOTE_TIMEOUT_S})",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        help=f"requests in progress before answering BUSY (default {DEFAULT_MAX_PENDING})",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--device",
        help="where the model runs: auto (default: CUDA when torch sees a GPU, else the CPU), "
        "cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        help=f"how long a neighbour's tensor may wait for others of its variant to run with "
        f"(default {DEFAULT_BATCH_WINDOW_MS:g} for a cloud, 0 for an edge)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help=f"most neighbours' tensors run as one batch (default {DEFAULT_MAX_BATCH}; "
        "1: no batching)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="HOST",
        help=f"where to serve metrics (default {DEFAULT_METRICS_HOST}; 0.0.0.0: every interface)",
    )
    c = p.add_argument_group("semantic cache")
    c.add_argument(
        "--cache-dir",
        type=Path,
        help="keep the cache here across restarts (crash-safe); default: in memory only",
    )
    c.add_argument("--no-cache", action="store_true", default=None, help="turn the cache off")
    c.add_argument(
        "--cache-capacity", type=int, help=f"entries before eviction (default {DEFAULT_CAPACITY})"
    )
    c.add_argument(
        "--cache-threshold",
        type=float,
        help=f"L2 distance under which a sure entry may answer at the model-stage key "
        f"(default: the bundle's calibration, else {DEFAULT_THRESHOLD_L2}); an entry of "
        "confidence c reaches threshold x (c - floor) / (1 - floor)",
    )
    c.add_argument(
        "--cache-thumb-threshold",
        type=float,
        help=f"the same at the input-thumbnail key (default: calibrated, else "
        f"{THUMBNAIL_THRESHOLD_L2})",
    )
    c.add_argument(
        "--cache-answer-floor",
        type=unit_interval,
        help=f"least confidence the full model had on an entry's own frame for the entry to "
        f"answer (default {DEFAULT_ANSWER_FLOOR}: only decisive answers are reused)",
    )
    c.add_argument(
        "--audit-rate",
        type=unit_interval,
        help=f"share of cache hits re-checked by the full model off the critical path "
        f"(default {DEFAULT_AUDIT_RATE}: 1 in {round(1 / DEFAULT_AUDIT_RATE)}; 0: no audit)",
    )
    c.add_argument(
        "--cache-margin",
        type=int,
        help=f"votes the answer must lead by among the {DEFAULT_K} nearest "
        f"(default {DEFAULT_VOTE_MARGIN})",
    )
    c.add_argument(
        "--share-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send learned entries to neighbours and take theirs (default: on)",
    )
    c.add_argument(
        "--cache-min-confidence",
        type=float,
        help=f"cache only answers at least this confident "
        f"(default {DEFAULT_MIN_INSERT_CONFIDENCE})",
    )
    e = p.add_argument_group("emulation (benchmarks; reported in status)")
    e.add_argument(
        "--slowdown",
        type=float,
        help="emulate a device this many times slower (each forward pass is stretched)",
    )
    e.add_argument("--link-mbps", type=float, help="emulate an uplink of this bandwidth")
    e.add_argument(
        "--always-offload",
        action="store_true",
        default=None,
        help="send every miss to a neighbour even when finishing here is faster "
        "(for baselines such as cloud-only)",
    )
    e.add_argument("--link-rtt-ms", type=float, help="emulate this round-trip time per message")
    p.add_argument("--config", type=Path, help="TOML file with any of these options as keys")
    # Tests keep their mDNS apart from other peers on the machine.
    p.add_argument("--mdns-service-type", help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO (default), WARNING, ERROR",
    )
    k = p.add_argument_group(
        "security",
        "Peers talk CurveZMQ: encrypted, and only with peers whose public key is trusted "
        "(`ccied keys trust`). The key is made on first start.",
    )
    k.add_argument(
        "--state-dir",
        type=Path,
        help=f"keys and trusted peers (default {default_state_dir()})",
    )
    k.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain ZeroMQ, no keys: anyone who reaches the peer socket is served and can "
        "poison the cache; only for a network you fully trust",
    )
    k.add_argument(
        "--accept-shared-from",
        choices=list(SHARED_FROM),
        help="whose shared cache entries to take: any trusted peer (default), only the "
        "--cloud peer, or none",
    )
    p.set_defaults(func=_run_peer)


def _run_peer(args: argparse.Namespace) -> int:
    """`ccied peer`: the one command that loads the daemon (torch, FAISS, zeroconf: seconds)."""
    global PeerDaemon, load_config, peer_config  # the names cmd_peer uses
    from ccied.peer.config import load_config, peer_config
    from ccied.peer.daemon import PeerDaemon

    return cmd_peer(args)


def cmd_peer(args: argparse.Namespace) -> int:
    file = load_config(args.config)
    _setup_logging(args.log_level or file.get("log_level", "INFO"))
    config = peer_config(args)
    if config.role is Role.CLOUD and (config.cloud or config.peers):
        log.warning("a cloud peer answers with its own tail; --cloud/--peer are ignored")
    daemon = PeerDaemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, daemon.request_stop)
        await daemon.run()

    asyncio.run(main())
    return 0


def _print_result(result: FrameResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict()), flush=True)
        return
    print(
        f"{result.frame:<28} {result.class_name[:28]:<28} {result.confidence:5.2f}  "
        f"{result.source:<5} {result.served_by:<10} {result.latency_ms:8.1f} ms "
        f"{result.bytes_sent:>8} B",
        flush=True,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from ccied.pruning.media import iter_frames  # Pillow and PyAV only: no torch

    _setup_logging(args.log_level)
    failures = 0
    with Client(args.socket, timeout_s=args.timeout_s) as client:
        client.status(timeout_s=min(args.timeout_s, 5.0))  # fail fast when no peer runs
        for path in args.files:
            try:
                for frame in iter_frames(path, every=args.every, limit=args.limit):
                    try:
                        result = client.submit(frame.pixels, frame.name, need=args.need)
                    except (RequestFailedError, ProtocolError) as exc:
                        # This frame only (the peer refused it, or the wire
                        # cannot carry it): go on with the next.
                        failures += 1
                        _print_error(frame.name, str(exc), args.json)
                        continue
                    _print_result(result, args.json)
            except PruningError as exc:
                failures += 1
                _print_error(str(path), str(exc), args.json)
    return 1 if failures else 0


def _print_error(frame: str, error: str, as_json: bool) -> None:
    error = error.removeprefix(f"{frame}: ")  # file errors name their file already
    if as_json:
        print(json.dumps({"frame": frame, "error": error}), flush=True)
    else:
        print(f"ccied submit: {frame}: {error}", file=sys.stderr, flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    with Client(args.socket, timeout_s=args.timeout_s) as client:
        status = client.status()
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    with Client(args.socket, timeout_s=args.timeout_s) as client:
        if args.action == "clear":
            outcome = client.clear_cache()
            message = f"cleared {outcome['cleared']} entries"
        else:
            outcome = client.forget_cache_entry(args.entry)
            message = (
                f"forgot entry {args.entry}"
                if outcome["forgotten"]
                else f"no entry {args.entry} (already gone?)"
            )
    print(json.dumps(outcome) if args.json else message)
    return 0 if args.action == "clear" or outcome["forgotten"] else 1


# `ccied bench NAME`: (name, module in ccied.bench, one-line summary). Each module
# has add_arguments(parser) and run(args) -> exit code.
BENCHMARKS = (
    ("cache", "cache", "semantic cache: hit rate, fidelity, false hits, lookup latency"),
    ("transfer", "transfer", "transfer layer: bytes on the wire vs agreement per variant"),
    ("cluster", "cluster_bench", "ccied against edge-only, cloud-only, split, split+quant"),
    ("fuzz", "fuzz", "fuzz every decoder (wire, codec, bundle, cache files)"),
    ("chaos", "chaos", "SIGKILL peers and the cloud mid-stream: lost, answered twice, added p99"),
    ("cloud", "cloud", "a cloud serving many edges' tensors: frames/s and latency, batched or not"),
)


class _BenchParser(argparse.ArgumentParser):
    """One benchmark's parser: its module, and so its options, load only when it is named.

    ``ccied bench --help`` lists the benchmarks from BENCHMARKS without importing
    any (they import torch); ``ccied bench NAME ...``, its --help included, parses
    with this parser, which imports ``ccied.bench.MODULE`` first.
    """

    def __init__(self, *args: Any, module: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module

    def load(self) -> None:
        """Import the benchmark's module and add its options (once)."""
        if not self._module:
            return
        module = importlib.import_module(f"ccied.bench.{self._module}")
        self._module = ""
        if module.__doc__:
            self.description = module.__doc__.split("\n\n")[0]
        module.add_arguments(self)
        self.set_defaults(func=module.run)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self.load()
        return super().parse_known_args(*args, **kwargs)


def cmd_prepare(args: argparse.Namespace) -> int:
    import numpy as np
    from ccied.cache import BadFeatureError, feature_from_tensor, thumbnail_feature
    from ccied.cache.policy import calibrate_or_default, evaluate
    from ccied.pruning.prepare import PrepareConfig, prepare_bundle, print_report

    _setup_logging(args.log_level)

    Frames = tuple[np.ndarray, np.ndarray, np.ndarray]  # features, labels, confidences

    def key_of(depth: str, small: np.ndarray, tensor: np.ndarray) -> np.ndarray | None:
        try:
            if depth.startswith("thumb"):
                return thumbnail_feature(small)
            return feature_from_tensor(tensor)
        except BadFeatureError:  # a flat frame has no key: left out of calibration
            return None

    def calibrate_cache(depth: str, fit: Frames, held_out: Frames) -> dict[str, Any]:
        rule, verdict, result = calibrate_or_default(depth, fit, held_out, args.cache_fidelity)
        held = evaluate(*held_out, rule)
        return {
            "rule": {
                "threshold_l2": rule.threshold_l2,
                "vote_margin": rule.vote_margin,
                "answer_floor": rule.answer_floor,
            },
            "verdict": verdict,
            "target_fidelity": args.cache_fidelity,
            "calibration": {
                "threshold_l2": result.chosen.threshold_l2,
                "answer_floor": result.chosen.answer_floor,
                "hits": result.chosen.hits,
                "hit_rate": round(result.chosen.hit_rate, 4),
                "fidelity": round(result.chosen.fidelity, 4),
            },
            "held_out": {
                "hit_rate": round(held.hit_rate, 4),
                "fidelity": round(held.fidelity, 4),
                "hits": held.hits,
            },
        }

    config = PrepareConfig(
        model=args.model,
        split=args.split,
        keep_ratio=args.keep_ratio,
        bits=None if args.bits == 32 else args.bits,
        every=args.every,
        cache_split=args.cache_split,
    )
    report = prepare_bundle(
        config, args.out, calibrate_cache, key_of, progress=not args.no_progress
    )
    print_report(report)
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from ccied.pruning import load_model

    model = load_model(args.model)
    points = model.split_points()
    if args.json:
        print(json.dumps([p.__dict__ for p in points], indent=2))
        return 0
    print(f"{'split':<10} {'output shape':<16} {'float32 B':>10} {'compute':>8}  stage end")
    for p in points:
        shape = "x".join(map(str, p.output_shape))
        print(
            f"{p.name:<10} {shape:<16} {p.float32_bytes:>10} {p.compute_fraction:>8.1%}  "
            f"{'yes' if p.stage_end else ''}"
        )
    return 0


def _add_keys_parser(sub: Any) -> None:
    k = sub.add_parser(
        "keys",
        help="this peer's CURVE key and the peers it trusts",
        description=(
            "Peers only talk to peers whose public key they trust, both ways. On each "
            "device: `ccied keys show` prints its key; on every other device that should "
            "use it: `ccied keys trust KEY_OR_FILE --name NAME`."
        ),
    )
    state_help = f"the peer's state folder (default {default_state_dir()})"
    k.add_argument("--state-dir", type=Path, help=state_help)
    # Also after the action (`ccied keys list --state-dir DIR`); SUPPRESS keeps the
    # value given before it when it is not repeated.
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help=state_help)
    actions = k.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    g = actions.add_parser("generate", parents=[state], help="create this peer's keypair")
    g.add_argument("--name", default=os.uname().nodename, help="name written in the key file")
    g.add_argument("--force", action="store_true", help="replace an existing key")
    actions.add_parser("show", parents=[state], help="print this peer's public key and its file")
    t = actions.add_parser(
        "trust", parents=[state], help="trust a peer's public key (Z85 text or its .key file)"
    )
    t.add_argument("key", metavar="KEY_OR_FILE")
    t.add_argument("--name", help="what to call it (default: the name in its file)")
    u = actions.add_parser("untrust", parents=[state], help="stop trusting a key (by key or name)")
    u.add_argument("key", metavar="KEY_OR_NAME")
    actions.add_parser(
        "list", parents=[state], help="the keys this peer trusts: its own, then trusted/"
    )
    k.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    store = KeyStore(args.state_dir or default_state_dir())
    action = args.keys_action
    if action == "generate":
        keypair = store.generate(args.name, force=args.force)
        print(f"public key {keypair.public}\nwritten to {store.public_file}")
    elif action == "show":
        print(f"{store.load().public}\n{store.public_file}")
    elif action == "trust":
        text = args.key
        path = Path(text).expanduser()
        if len(text) == KEY_CHARS and not path.exists():
            written = store.trust(check_key(text), args.name)
            print(f"trusted {text} as {written.stem} ({written})")
        else:
            key, written = store.trust_file(path, args.name)
            print(f"trusted {key} as {written.stem} ({written})")
    elif action == "untrust":
        removed = store.untrust(args.key)
        if not removed:
            print(f"ccied keys: no trusted key or name {args.key!r}", file=sys.stderr)
            return 1
        for path in removed:
            print(f"removed {path}")
    else:  # list
        _list_keys(store)
    return 0


def _list_keys(store: KeyStore) -> None:
    # Peers started with one state folder share its key and trust each other
    # through it, with nothing in trusted/: an empty list there hid that.
    own = next((f for f in (store.public_file, store.secret_file) if f.exists()), None)
    trusted = sorted(store.trusted().items())
    if own is None and not trusted:
        print(f"no key and no trusted keys in {store.state_dir} (a peer makes its own on start)")
        return
    if own is not None:
        cert = read_certificate(own)
        print(
            f"{cert.name or own.stem:<24} {cert.public}  "
            "own key: every peer using this state folder has it and trusts it"
        )
    for name, key in trusted:
        print(f"{name:<24} {key}")


def cmd_demo(args: argparse.Namespace) -> int:
    from ccied.bench.demo import DEFAULT_PLOT, run_demo

    _setup_logging(args.log_level)
    plot_path: Path | None = args.plot
    if args.no_plot:
        plot_path = None
    elif plot_path is None and not args.json:
        # --json keeps stdout to one object per frame: a plot then only when asked for.
        plot_path = DEFAULT_PLOT
    return run_demo(every=args.every, limit=args.limit, json_out=args.json, plot_path=plot_path)


class _VersionAction(argparse.Action):
    """``ccied --version``: the installed package's version, read only when asked.

    (importlib.metadata costs 30 ms to import: every other command would pay it.)
    """

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import version

        parser.exit(message=f"ccied {version('ccied')}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccied",
        description="Collaborative DNN inference with a semantic cache on edge-device clusters.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_peer_parser(sub)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        help="the local peer's Unix socket (default: the only peer in the runtime folder)",
    )
    common.add_argument("--timeout-s", type=float, default=30.0, help="per request (default 30)")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)

    s = sub.add_parser(
        "submit",
        parents=[common],
        help="send image or video frames to the local peer",
        description=(
            "Send frames to the local peer and print one line per frame. With --json each "
            "line is an object with frame, label, class_name, confidence, source "
            "(cache|local|peer|cloud), served_by, latency_ms, bytes_sent (and more). A file "
            "that cannot be read prints an error for it; the exit code is 1 if any frame "
            "failed, 2 if the peer is unreachable."
        ),
    )
    s.add_argument("files", nargs="+", type=Path, metavar="IMAGE_OR_VIDEO")
    s.add_argument("--every", type=int, default=1, help="send every N-th video frame (default 1)")
    s.add_argument("--limit", type=int, default=None, help="at most this many frames per video")
    s.add_argument(
        "--need",
        choices=["latency", "accuracy"],
        default="latency",
        help="latency: the fastest variant above the fidelity floor (default); "
        "accuracy: the most faithful variant",
    )
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser(
        "status",
        parents=[common],
        help="show the local peer's identity, bundle, neighbours, cache and counters",
        description="Ask the local peer for its status (--json for the full object).",
    )
    st.set_defaults(func=cmd_status)

    ca = sub.add_parser(
        "cache",
        parents=[common],
        help="clear the local peer's cache, or forget one wrong entry",
        description=(
            "Manage the local peer's semantic cache. `ccied cache clear` drops every entry; "
            "`ccied cache forget ID` drops the entry that gave a wrong answer (the "
            "cache_entry field of a result with source cache). Counters: `ccied status`."
        ),
    )
    ca.add_argument("action", choices=["clear", "forget"])
    ca.add_argument("entry", nargs="?", type=int, help="entry id (for forget)")
    ca.set_defaults(func=cmd_cache)

    sp = sub.add_parser(
        "splits",
        help="list a model's candidate split points",
        description="List where a model can be cut: output shape, float32 bytes, compute share.",
    )
    sp.add_argument("--model", default=DEFAULT_MODEL)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_splits)

    pr = sub.add_parser(
        "prepare",
        help="build a model bundle: variants, measured bytes and agreement, cache rule",
        description=(
            "Build a bundle folder for `ccied peer --model DIR`: the operating point given "
            "(split, keep ratio, bits) plus built-in alternatives, each measured on held-out "
            "frames of the bundled clips (bytes per frame, agreement with the unpruned model), "
            "and the cache's hit rule calibrated on the other frames."
        ),
    )
    pr.add_argument("--model", default=DEFAULT_MODEL)
    pr.add_argument("--split", default="blocks.11", help="split of the operating point")
    pr.add_argument("--keep-ratio", type=float, default=1.0, help="share of channels kept (PCA)")
    pr.add_argument(
        "--bits", type=int, choices=[2, 4, 6, 8, 32], default=6, help="codec bits (32: raw)"
    )
    pr.add_argument("--every", type=int, default=3, help="use every N-th clip frame")
    pr.add_argument(
        "--cache-split",
        default=DEFAULT_CACHE_SPLIT,
        help=f"the split whose tensor keys the cache when the input thumbnail is inconclusive "
        f"(default {DEFAULT_CACHE_SPLIT}; an earlier one is cheaper on slow devices)",
    )
    pr.add_argument("--cache-fidelity", type=float, default=0.99, help="cache target")
    pr.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    pr.set_defaults(func=cmd_prepare)

    b = sub.add_parser(
        "bench",
        help="run a benchmark (JSON and PNG out)",
        description="Benchmarks on real frames; each prints a table and can write JSON and plots.",
    )
    benches = b.add_subparsers(
        dest="bench", required=True, metavar="BENCHMARK", parser_class=_BenchParser
    )
    for name, module_name, summary in BENCHMARKS:
        benches.add_parser(name, help=summary, description=summary, module=module_name)

    _add_keys_parser(sub)

    d = sub.add_parser(
        "demo",
        help="run a cloud and four cameras on loopback and stream real video and photos through",
        description=(
            "Start a cloud peer and four camera peers (emulated 4x slower) on 127.0.0.1 as "
            "separate processes and stream real frames through them, the cameras at once: "
            "cam1 is a fixed camera (carphone), cam2 and cam3 watch one scene (bigbuckbunny) "
            "half a sampling step apart, so each answers from the cache the other shared; "
            "cam4 pans across photos and passes the same places again, shifted and brighter. "
            "Each camera sends its next frame when the last is answered. Shows a live status "
            "line, then a table per camera (hit rate, agreement of hits, fidelity on decisive "
            "and on all frames), why frames missed, the audit, a plot, and stops every peer."
        ),
    )
    d.add_argument(
        "--every", type=positive_int, default=4, help="use every N-th video frame (default 4)"
    )
    d.add_argument(
        "--limit", type=int, default=None, help="about this many frames per clip per camera"
    )
    d.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per frame and nothing else (no plot unless --plot)",
    )
    plot_options = d.add_mutually_exclusive_group()
    plot_options.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the latency and hit-rate plot here (default ccied-demo.png)",
    )
    plot_options.add_argument("--no-plot", action="store_true", help="write no plot")
    d.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cache" and args.action == "forget" and args.entry is None:
        parser.error("ccied cache forget needs an entry id")
    try:
        code: int = args.func(args)
    except (PeerError, PruningError) as exc:
        print(f"ccied {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
