"""The ``ccied`` argument parser: every command's options and help, and nothing they do.

The commands themselves live in ``ccied.peer.cli``, which hands them in to
:func:`build_parser` by name; ``ccied peer``'s many options are in
``ccied.peer.cli_peer_options``. Only light modules here: every --help runs without
torch, FAISS or zeroconf (tests/test_light_cli.py); a benchmark's module, and so
its options, load only when that benchmark is named.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ccied.peer.argtypes import fraction, non_negative_int, positive_float, positive_int
from ccied.peer.cli_peer_options import add_peer_parser
from ccied.peer.keys import default_state_dir
from ccied.pruning.defaults import (
    DEFAULT_CACHE_SPLIT,
    DEFAULT_MODEL,
    RECOVER_AUGMENTATIONS,
    RECOVER_BITS,
    RECOVER_KEEP_RATIO,
    RECOVER_LEARNING_RATE,
    RECOVER_MAX_AUGMENTATIONS,
    RECOVER_STEPS,
)

Command = Callable[[argparse.Namespace], int]

# `ccied bench NAME`: (name, module in ccied.bench, one-line summary). Each module
# has add_arguments(parser) and run(args) -> exit code.
BENCHMARKS = (
    ("cache", "cache", "semantic cache: hit rate, fidelity, false hits, lookup latency"),
    ("transfer", "transfer", "transfer layer: bytes on the wire vs agreement per variant"),
    ("recovery", "recovery", "recovered transfer layers: bytes vs decisive and all agreement"),
    ("cluster", "cluster_bench", "ccied against edge-only, cloud-only, split, split+quant"),
    ("fuzz", "fuzz", "fuzz every decoder (wire, codec, bundle, cache files)"),
    ("chaos", "chaos", "SIGKILL peers and the cloud mid-stream: lost, answered twice, added p99"),
    ("cloud", "cloud", "a cloud serving many edges' tensors: frames/s and latency, batched or not"),
)


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The whole parser; ``commands[NAME]`` becomes ``args.func`` of ``ccied NAME``.

    (``ccied bench NAME`` runs the benchmark module's own ``run``.)
    """
    parser = argparse.ArgumentParser(
        prog="ccied",
        description="Collaborative DNN inference with a semantic cache on edge-device clusters.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_peer_parser(sub).set_defaults(func=commands["peer"])
    common = _local_peer_options()
    add_submit_parser(sub, common).set_defaults(func=commands["submit"])
    add_status_parser(sub, common).set_defaults(func=commands["status"])
    add_cache_parser(sub, common).set_defaults(func=commands["cache"])
    add_splits_parser(sub).set_defaults(func=commands["splits"])
    add_prepare_parser(sub).set_defaults(func=commands["prepare"])
    add_bench_parser(sub)
    add_keys_parser(sub).set_defaults(func=commands["keys"])
    add_demo_parser(sub).set_defaults(func=commands["demo"])
    return parser


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


# -- ccied submit, status, cache: ask the local peer -------------------------------


def _local_peer_options() -> argparse.ArgumentParser:
    """The options every command that talks to the local peer takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        help="the local peer's Unix socket (default: the only peer in the runtime folder)",
    )
    common.add_argument("--timeout-s", type=float, default=30.0, help="per request (default 30)")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    return common


def add_submit_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s: argparse.ArgumentParser = sub.add_parser(
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
    return s


def add_status_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    st: argparse.ArgumentParser = sub.add_parser(
        "status",
        parents=[common],
        help="show the local peer's identity, bundle, neighbours, cache and counters",
        description="Ask the local peer for its status (--json for the full object).",
    )
    return st


def add_cache_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ca: argparse.ArgumentParser = sub.add_parser(
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
    return ca


# -- ccied splits, prepare: the model --------------------------------------------


MODEL_HELP = (
    f"a registered model (default {DEFAULT_MODEL}), FILE.py:FACTORY (a function in a "
    "self-contained Python file that returns the nn.Module) or a TorchScript file"
)


def _model_input_options(p: argparse.ArgumentParser) -> None:
    """How frames become a model-from-a-file's input (a registered model has its own)."""
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=None,
        metavar="PIXELS",
        help="side of the square crop the model takes (default 224)",
    )
    p.add_argument(
        "--normalize",
        default=None,
        metavar="MEAN,STD",
        help="(pixel / 255 - mean) / std: MEAN,STD for every channel or three means and three "
        "stds (default ImageNet's 0.485,0.456,0.406,0.229,0.224,0.225)",
    )


def add_splits_parser(sub: Any) -> argparse.ArgumentParser:
    sp: argparse.ArgumentParser = sub.add_parser(
        "splits",
        help="list a model's candidate split points",
        description=(
            "List where a model can be cut: output shape, float32 bytes, compute share. A "
            "model from a file is traced (torch.fx) or cut between its top-level children "
            "(TorchScript), and tail(head(x)) == model(x) is checked at every split point."
        ),
    )
    sp.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP}, or a bundle folder")
    _model_input_options(sp)
    sp.add_argument("--json", action="store_true")
    return sp


def add_prepare_parser(sub: Any) -> argparse.ArgumentParser:
    pr: argparse.ArgumentParser = sub.add_parser(
        "prepare",
        help="build a model bundle: variants, measured bytes and agreement, cache rule",
        description=(
            "Build a bundle folder for `ccied peer --model DIR`: the operating point given "
            "(split, keep ratio, bits) plus alternatives, each measured on held-out frames "
            "(bytes per frame, agreement with the unpruned model), and the cache's hit rule "
            "calibrated on the other frames. The model is a registered one or your own "
            "(FILE.py:FACTORY or TorchScript, with --labels, --input-size, --normalize); the "
            "frames are the bundled clips or your own (--frames). The bundle carries "
            "everything a peer needs; it is written to a temporary folder and renamed."
        ),
    )
    pr.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    pr.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="FILE",
        help="class names, one per line, as many as the model's outputs (default: 0, 1, ...)",
    )
    _model_input_options(pr)
    pr.add_argument(
        "--frames",
        type=Path,
        default=None,
        metavar="DIR",
        help="your images and videos to fit, calibrate and measure on (default: the bundled "
        "clips); of each video the first 60%% fit and the rest is held out, of the images "
        "three in five fit",
    )
    pr.add_argument(
        "--split",
        default=None,
        help="split of the operating point (default blocks.11 for the registered model; for "
        "a model from a file the smallest tensor between 10%% and 95%% of its compute)",
    )
    pr.add_argument(
        "--keep-ratio",
        type=fraction,
        default=None,
        help="share of the transfer layer's channels that cross, in (0, 1] (default 1; "
        f"{RECOVER_KEEP_RATIO} with --recover)",
    )
    pr.add_argument(
        "--bits",
        type=int,
        choices=[2, 4, 6, 8, 32],
        default=None,
        help="codec bits, 32: raw (default 6 for the registered model, 8 from a file; "
        f"{RECOVER_BITS} with --recover)",
    )
    _recover_options(pr)
    pr.add_argument("--every", type=int, default=3, help="use every N-th video frame")
    pr.add_argument(
        "--cache-split",
        default=None,
        help=f"the split whose tensor keys the cache when the input thumbnail is inconclusive "
        f"(default {DEFAULT_CACHE_SPLIT} for the registered model, else the split nearest 30%% "
        "of the compute; an earlier one is cheaper on slow devices)",
    )
    pr.add_argument("--cache-fidelity", type=float, default=0.99, help="cache target")
    pr.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    return pr


def _recover_options(pr: argparse.ArgumentParser) -> None:
    pr.add_argument(
        "--recover",
        action="store_true",
        help="train the reduced transfer layer by distillation from the unpruned model on "
        "the fit frames and augmented copies (crop, flip, colour, blur, noise), no labels, "
        "instead of fitting PCA alone; a few minutes on 2 cores (the estimate is printed "
        "after the first steps)",
    )
    pr.add_argument(
        "--recover-steps",
        type=positive_int,
        metavar="N",
        help=f"with --recover: training steps of 64 tensors (default {RECOVER_STEPS}: about "
        "4 minutes on 2 cores)",
    )
    pr.add_argument(
        "--augmentations",
        type=non_negative_int,
        metavar="N",
        help=f"with --recover: augmented copies of each fit frame to train on (default "
        f"{RECOVER_AUGMENTATIONS}, at most {RECOVER_MAX_AUGMENTATIONS})",
    )
    pr.add_argument(
        "--learning-rate",
        type=positive_float,
        metavar="LR",
        help=f"with --recover: Adam's learning rate (default {RECOVER_LEARNING_RATE:g})",
    )
    pr.add_argument(
        "--seed", type=non_negative_int, metavar="N", help="with --recover: training seed"
    )


# -- ccied bench, keys, demo -------------------------------------------------------


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


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    b: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="run a benchmark (JSON and PNG out)",
        description="Benchmarks on real frames; each prints a table and can write JSON and plots.",
    )
    benches = b.add_subparsers(
        dest="bench", required=True, metavar="BENCHMARK", parser_class=_BenchParser
    )
    for name, module_name, summary in BENCHMARKS:
        benches.add_parser(name, help=summary, description=summary, module=module_name)
    return b


def add_keys_parser(sub: Any) -> argparse.ArgumentParser:
    k: argparse.ArgumentParser = sub.add_parser(
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
    return k


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    d: argparse.ArgumentParser = sub.add_parser(
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
    return d
