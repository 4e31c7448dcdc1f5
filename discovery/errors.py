"""Errors raised by ccied.discovery: one base, zeroconf errors mapped at the boundary."""

from __future__ import annotations


class DiscoveryError(Exception):
    """Base of every error ccied.discovery raises."""


class MalformedAnnouncementError(DiscoveryError):
    """An mDNS announcement whose TXT record or address cannot be trusted as a peer.

    Raised by the parser only; the browser catches it, logs it and ignores the
    announcement, because anyone on the link can multicast garbage.
    """
