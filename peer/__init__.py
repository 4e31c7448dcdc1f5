"""ccied.peer: the daemon, local socket, wire protocol, routing, client and CLI.

The only package that wires the leaves (cache, pruning, discovery) together.
"""

from ccied.peer.client import Client, FrameResult
from ccied.peer.errors import PeerError, PeerUnavailableError, ProtocolError, RequestFailedError

__all__ = [
    "Client",
    "FrameResult",
    "PeerError",
    "PeerUnavailableError",
    "ProtocolError",
    "RequestFailedError",
]
