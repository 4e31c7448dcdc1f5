"""ccied: collaborative DNN inference with a semantic cache on clusters of edge devices.

This folder is the ``ccied`` package itself (pyproject maps it there because the
top-level folders are fixed). It re-exports the public API lazily, so that
importing a leaf such as ``ccied.cache`` does not drag in the peer and ZeroMQ.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ccied.peer.client import Client, FrameResult
    from ccied.peer.errors import PeerError, PeerUnavailableError, RequestFailedError

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "ccied.peer.client",
    "FrameResult": "ccied.peer.client",
    "PeerError": "ccied.peer.errors",
    "PeerUnavailableError": "ccied.peer.errors",
    "RequestFailedError": "ccied.peer.errors",
}

__all__ = ["Client", "FrameResult", "PeerError", "PeerUnavailableError", "RequestFailedError"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccied' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
