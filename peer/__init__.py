"""ccied.peer: the daemon, local socket, wire protocol, routing, client and CLI.

The only package that wires the leaves (cache, pruning, discovery) together.
Its names are loaded on first use: the ``ccied`` console script
(``ccied.peer.entry``) imports this package before it can catch a Ctrl-C, so
this package imports nothing itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccied.peer.client import Client, FrameResult
    from ccied.peer.errors import (
        PeerError,
        PeerUnavailableError,
        ProtocolError,
        RequestFailedError,
    )

_EXPORTS = {
    "Client": "ccied.peer.client",
    "FrameResult": "ccied.peer.client",
    "PeerError": "ccied.peer.errors",
    "PeerUnavailableError": "ccied.peer.errors",
    "ProtocolError": "ccied.peer.errors",
    "RequestFailedError": "ccied.peer.errors",
}

__all__ = [
    "Client",
    "FrameResult",
    "PeerError",
    "PeerUnavailableError",
    "ProtocolError",
    "RequestFailedError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccied.peer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
