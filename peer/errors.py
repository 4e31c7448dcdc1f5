"""Errors raised by ccied.peer: one base, third-party errors mapped at the boundary."""

from __future__ import annotations


class PeerError(Exception):
    """Base of every error ccied.peer raises."""


class ProtocolError(PeerError):
    """A message could not be decoded or does not follow the wire protocol.

    ``request_id`` is set when the header was readable enough to tell which
    request the bad message belongs to, so the reply can name it.
    """

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


class PeerUnavailableError(PeerError):
    """The local peer did not answer (not running, wrong socket path, or too slow)."""


class RequestFailedError(PeerError):
    """The peer answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
