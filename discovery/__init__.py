"""ccied.discovery: find neighbour peers with mDNS and track which are alive.

Two parts, wired together by the peer daemon:

* :class:`MdnsDiscovery` (``mdns.py``) advertises this peer as a
  ``_ccied._tcp.local.`` service and browses for the others with
  python-zeroconf's asyncio API. It only *suggests* neighbours.
* :class:`NeighbourTable` (``neighbours.py``) is pure logic: suggestions from
  discovery, liveness from the heartbeats the daemon sends, link estimates
  (RTT, bandwidth) and the neighbours routing may use.

A leaf package: it never imports ``ccied.peer`` and does not need ZeroMQ.
"""

from __future__ import annotations

from ccied.discovery.errors import DiscoveryError, MalformedAnnouncementError
from ccied.discovery.mdns import (
    SERVICE_TYPE,
    Advertisement,
    AnnouncementListener,
    MdnsConfig,
    MdnsDiscovery,
    advertised_addresses,
    instance_name,
    parse_txt,
    txt_record,
)
from ccied.discovery.neighbours import (
    DEFAULT_LIVENESS_TIMEOUT_S,
    ROLES,
    Announcement,
    Neighbour,
    NeighbourTable,
    NeighbourTableConfig,
)

__all__ = [
    "DEFAULT_LIVENESS_TIMEOUT_S",
    "ROLES",
    "SERVICE_TYPE",
    "Advertisement",
    "Announcement",
    "AnnouncementListener",
    "DiscoveryError",
    "MalformedAnnouncementError",
    "MdnsConfig",
    "MdnsDiscovery",
    "Neighbour",
    "NeighbourTable",
    "NeighbourTableConfig",
    "advertised_addresses",
    "instance_name",
    "parse_txt",
    "txt_record",
]
