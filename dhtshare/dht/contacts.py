"""Contacts from the wire, turned into typed values where they are decoded.

A contact in a ``find_node`` or ``find_value`` reply is ``[id, host, port]``, written by
whoever answered. Before anything sends to it, it must be a 20-byte id, a host that is an
IP address written in its canonical form (``ipaddress``; no names, so nothing is ever
resolved, and no NUL or other junk that makes ``sendto`` raise), and a port in 1..65535.
Addresses nobody can be reached at as one peer are refused: unspecified (``0.0.0.0/8``,
``::``), broadcast, multicast, and scoped IPv6 (``fe80::1%eth0`` names our interface,
not theirs). Loopback stays valid. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import NamedTuple

__all__ = ["ID_LEN", "Contact", "parse_contact", "parse_host"]

ID_LEN = 20
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_MAX_HOST_LEN = 45  # the longest canonical IPv6 text (with an embedded IPv4 tail)


class Contact(NamedTuple):
    """A checked contact: what ``kademlia.node.Node(*contact)`` is built from."""

    id: bytes
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def version(self) -> int:
        """4 or 6: the address family."""
        return 6 if ":" in self.host else 4


def parse_host(value: object) -> str | None:
    """``value`` if it is a canonical, unicast IP address text, else None."""
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_HOST_LEN:
        return None
    return _checked(value)


@functools.lru_cache(maxsize=4096)
def _checked(value: str) -> str | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if str(ip) != value or ip.is_multicast or ip.is_unspecified:
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return None if ip in _THIS_NETWORK or ip == _BROADCAST else value
    return None if ip.scope_id else value


def parse_contact(value: object) -> Contact | None:
    """A ``Contact`` if ``value`` is ``[id20, host, port]`` with a usable address, else None."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        return None
    node_id, host, port = value
    if not isinstance(node_id, bytes) or len(node_id) != ID_LEN:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    checked = parse_host(host)
    return None if checked is None else Contact(node_id, checked, port)
