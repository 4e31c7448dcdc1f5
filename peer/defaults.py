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
    EDGE = "edge"
    CLOUD = "cloud"
