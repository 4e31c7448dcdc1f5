"""The ``ccied`` command line: the only place that reads argv, config files and env."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: `ccied submit`, `ccied status`, `ccied keys` and every
# --help run without torch, FAISS or zeroconf (tests/test_light_cli.py). The daemon
# is imported by `ccied peer` only, each benchmark by its own command.
from ccied.peer import cli_parser
from ccied.peer.client import Client, FrameResult
from ccied.peer.defaults import Role
from ccied.peer.errors import PeerError, ProtocolError, RequestFailedError
from ccied.peer.keys import KEY_CHARS, KeyStore, check_key, default_state_dir, read_certificate
from ccied.peer.status_view import render as render_status
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


def cmd_prepare(args: argparse.Namespace) -> int:
    import numpy as np
    from ccied.cache import BadFeatureError, feature_from_tensor, thumbnail_feature
    from ccied.cache.policy import calibrate_or_default, evaluate
    from ccied.pruning.custom import parse_normalize
    from ccied.pruning.defaults import RECOVER_BITS, RECOVER_KEEP_RATIO
    from ccied.pruning.prepare import AUTO, PrepareConfig, prepare_bundle, print_report

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

    recovery = {
        field: getattr(args, field)
        for field in ("recover_steps", "augmentations", "learning_rate", "seed")
        if getattr(args, field) is not None
    }
    if recovery and not args.recover:
        options = ", ".join("--" + field.replace("_", "-") for field in recovery)
        print(f"ccied prepare: {options}: only with --recover", file=sys.stderr)
        return 2
    keep = args.keep_ratio or (RECOVER_KEEP_RATIO if args.recover else 1.0)
    if args.bits is None:
        bits: int | str | None = RECOVER_BITS if args.recover else AUTO
    else:
        bits = None if args.bits == 32 else args.bits
    config = PrepareConfig(
        model=args.model,
        split=args.split,
        keep_ratio=keep,
        bits=bits,
        recover=args.recover,
        **recovery,
        every=args.every,
        cache_split=args.cache_split,
        labels=args.labels,
        input_size=args.input_size,
        normalize=None if args.normalize is None else parse_normalize(args.normalize),
        frames=args.frames,
    )
    report = prepare_bundle(
        config, args.out, calibrate_cache, key_of, progress=not args.no_progress
    )
    print_report(report)
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    from ccied.pruning.custom import parse_normalize
    from ccied.pruning.prepare import open_model

    normalize = None if args.normalize is None else parse_normalize(args.normalize)
    model = open_model(args.model, args.input_size, normalize)
    points = model.split_points()
    if args.json:
        print(json.dumps([p.__dict__ for p in points], indent=2))
        return 0
    width = max(10, *(len(p.name) for p in points))
    print(f"{'split':<{width}} {'output shape':<16} {'float32 B':>10} {'compute':>8}  stage end")
    for p in points:
        shape = "x".join(map(str, p.output_shape))
        print(
            f"{p.name:<{width}} {shape:<16} {p.float32_bytes:>10} {p.compute_fraction:>8.1%}  "
            f"{'yes' if p.stage_end else ''}"
        )
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The ``ccied`` parser (ccied.peer.cli_parser), each command's ``func`` one of these."""
    return cli_parser.build_parser(
        {
            "peer": _run_peer,
            "submit": cmd_submit,
            "status": cmd_status,
            "cache": cmd_cache,
            "splits": cmd_splits,
            "prepare": cmd_prepare,
            "keys": cmd_keys,
            "demo": cmd_demo,
        }
    )


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
