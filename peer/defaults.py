"""The peer's defaults and choices that the command line names in its help.

Plain values, no third-party imports: ``ccied --help``, ``ccied peer --help`` and
``ccied status`` print or check these without loading the daemon, which pulls in
torch, FAISS and zeroconf (seconds). Each is defined here once; the daemon and
its config import them from here.
"""

from __future__ import annotations

from enum import StrEnum

# Loopback and a port the OS picks: several peers can run on one machine and
# find each other over mDNS; give a LAN address to reach other hosts.
DEFAULT_LISTEN = "tcp://127.0.0.1:*"
DEFAULT_REMOTE_TIMEOUT_S = 2.0
DEFAULT_MAX_PENDING = 32
# Whose shared cache entries a peer takes (--accept-shared-from).
SHARED_FROM = ("trusted", "cloud", "none")
DEFAULT_METRICS_HOST = "127.0.0.1"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Role(StrEnum):
    """What a peer is: an edge runs heads for its own cameras, a cloud tails for others."""

    EDGE = "edge"
    CLOUD = "cloud"


class Need(StrEnum):
    """What a frame asks for (``Submit.need`` on the wire, ``--need``, ``Client.submit``):
    the fastest variant above the fidelity floor, or the most faithful one."""

    LATENCY = "latency"
    ACCURACY = "accuracy"
