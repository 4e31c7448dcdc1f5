"""ccied: collaborative DNN inference with a semantic cache on clusters of edge devices.

This folder is the ``ccied`` package itself (pyproject maps it there because the
top-level folders are fixed); it only re-exports the public API.
"""

from ccied.peer.client import Client, FrameResult
from ccied.peer.errors import PeerError, PeerUnavailableError, RequestFailedError

__version__ = "0.1.0"

__all__ = ["Client", "FrameResult", "PeerError", "PeerUnavailableError", "RequestFailedError"]
