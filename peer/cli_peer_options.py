"""The ``ccied peer`` options: identity, model, neighbours, compute, cache, emulation, security.

Each option's default is None here, so that ``ccied.peer.config`` can tell an
option given on the command line from one to take from the ``--config`` file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
from ccied.peer.argtypes import unit_interval
from ccied.peer.batching import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH
from ccied.peer.defaults import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_PENDING,
    DEFAULT_METRICS_HOST,
    DEFAULT_REMOTE_TIMEOUT_S,
    LOG_LEVELS,
    SHARED_FROM,
    Role,
)
from ccied.peer.keys import default_state_dir
from ccied.pruning.defaults import (
    DEFAULT_FIDELITY_FLOOR,
    DEFAULT_FIDELITY_FLOOR_ALL,
    DEFAULT_MODEL,
)


def add_peer_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
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
    _peer_identity_options(p)
    _peer_model_options(p)
    _peer_neighbour_options(p)
    _peer_compute_options(p)
    _peer_cache_options(p.add_argument_group("semantic cache"))
    _peer_emulation_options(p.add_argument_group("emulation (benchmarks; reported in status)"))
    p.add_argument("--config", type=Path, help="TOML file with any of these options as keys")
    # Tests keep their mDNS apart from other peers on the machine.
    p.add_argument("--mdns-service-type", help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO (default), WARNING, ERROR",
    )
    _peer_security_options(p)
    return p


def _peer_identity_options(p: argparse.ArgumentParser) -> None:
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


def _peer_model_options(p: argparse.ArgumentParser) -> None:
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
        type=unit_interval,
        help=f"least measured agreement on decisive frames (the unpruned model's top-1 "
        f"probability >= 0.5) a variant needs for latency-first frames "
        f"(default {DEFAULT_FIDELITY_FLOOR})",
    )
    p.add_argument(
        "--fidelity-floor-all",
        type=unit_interval,
        help=f"least measured agreement on all frames a variant needs for latency-first "
        f"frames (default {DEFAULT_FIDELITY_FLOOR_ALL})",
    )


def _peer_neighbour_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cloud",
        help="tcp://HOST:PORT of the cloud peer (edge role); KEY@tcp://... pins its key "
        "(--cloud=KEY@... when the key begins with '-')",
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


def _peer_compute_options(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs, and where its metrics are served."""
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
        f"(default {DEFAULT_BATCH_WINDOW_MS:g} for a cloud on a GPU, else 0: a CPU tail is "
        "long enough that tensors queue and batch anyway)",
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


def _peer_cache_options(c: argparse._ArgumentGroup) -> None:
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


def _peer_emulation_options(e: argparse._ArgumentGroup) -> None:
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


def _peer_security_options(p: argparse.ArgumentParser) -> None:
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
