"""Which address a node tells peers to connect to when it listens on every interface.

A node listens on ``0.0.0.0`` (or ``::``) by default, so it is reachable on a LAN and on a
public host alike; but a provider record must name one address peers can connect to. The
address worth naming is the one this machine sends from toward the network it joins: the
local address the kernel picks for a route to the bootstrap node (or, later, to a DHT
contact). ``local_address_toward`` asks the kernel with a connected UDP socket's
``getsockname()``; connecting a UDP socket sends no packet. ``choose_advertised`` is the
rule, with that probe injected so it can be tested with literal answers.

Reaching a node behind NAT needs more than this (the address found is the private one);
``--advertise HOST`` names the public address by hand.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from dhtshare.dht.dialback import family_of

__all__ = ["WILDCARDS", "choose_advertised", "is_wildcard", "local_address_toward"]

WILDCARDS = frozenset({"", "0.0.0.0", "::"})
"""Hosts that mean "every interface": never an address a peer can connect to."""


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in WILDCARDS


def _family(host: str) -> socket.AddressFamily | None:
    try:
        return family_of(host)
    except ValueError:
        return None


def local_address_toward(host: str, port: int) -> str | None:
    """The local address this machine sends from toward ``host:port`` (an IP address), or
    ``None`` when there is no route (or ``host`` is not an IP address). No packet is sent."""
    family = _family(host)
    if family is None:
        return None
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port or 9))
            local = str(sock.getsockname()[0])
    except OSError:
        return None
    return None if is_wildcard(local) else local


def choose_advertised(
    host: str,
    advertise: str | None,
    targets: Iterable[tuple[str, int]],
    local_toward: Callable[[str, int], str | None],
) -> str:
    """The host to publish in provider records.

    ``--advertise`` wins; a specific ``--host`` is itself reachable; for a wildcard host,
    the local address toward the first of ``targets`` (bootstrap nodes, then DHT contacts)
    that has a route and listens in the same family as ``host``; with none, loopback (the
    node knows nobody yet, so no peer could look the record up anyway).
    """
    if advertise:
        return advertise
    if not is_wildcard(host):
        return host
    six = host.strip("[]") == "::"
    for target, port in targets:
        local = local_toward(target, port)
        if local is None:
            continue
        if six or _family(local) == socket.AF_INET:
            return local
    return "::1" if six else "127.0.0.1"
