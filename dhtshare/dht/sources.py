"""Who a DHT value or contact comes from: its address, the prefix that address belongs to.

A node id costs nothing; an IP address costs something; a whole /24 (IPv4) or /48
(IPv6) costs more. So the storage quotas (``storage.py``) and the routing-table limits
(``routing.py``) count by address and by prefix, never by node id.

A non-global address (private, loopback, link-local, shared/CGNAT) is its own prefix:
everyone on one LAN shares a /24, and BEP 42 exempts these ranges for that reason. Such
an address is still limited as an address.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

__all__ = ["PREFIX_V4", "PREFIX_V6", "UNVALIDATED", "Ledger", "Source", "Usage", "source_of"]

#: Bits of an IPv4 address that name the network one party is assumed to control.
PREFIX_V4 = 24
#: The same for IPv6 (a typical site allocation).
PREFIX_V6 = 48
_CACHE = 4096
#: The one sender every address not yet validated counts as. A datagram's source address
#: is a claim until the address answers one of our requests, so a spoofer can spend this
#: shared quota but never a real address's.
UNVALIDATED = "unvalidated"


@dataclass(frozen=True, slots=True)
class Source:
    """An address in canonical text and the prefix it is counted under."""

    address: str
    prefix: str


@functools.lru_cache(maxsize=_CACHE)
def source_of(host: str) -> Source:
    """The ``Source`` for ``host``; a host that is not an IP address is its own prefix.

    An IPv4-mapped IPv6 address counts as the IPv4 address it maps.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Source(host, host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    address = str(ip)
    if not ip.is_global:
        return Source(address, address)
    bits = PREFIX_V4 if ip.version == 4 else PREFIX_V6
    return Source(address, str(ipaddress.ip_network(f"{address}/{bits}", strict=False)))


@dataclass(slots=True)
class Usage:
    """Bytes and records one address or prefix holds."""

    bytes: int = 0
    records: int = 0


class Ledger:
    """Usage per name (an address or a prefix); a name holding nothing is forgotten.

    So the ledger never has more entries than there are records charged to it.
    """

    __slots__ = ("_usage",)

    def __init__(self) -> None:
        self._usage: dict[str, Usage] = {}

    def __getitem__(self, name: str) -> Usage:
        return self._usage.get(name, Usage())

    def __len__(self) -> int:
        return len(self._usage)

    def charge(self, name: str, nbytes: int, records: int = 1) -> None:
        """Add ``nbytes`` and ``records`` to ``name`` (negative values refund)."""
        usage = self._usage.setdefault(name, Usage())
        usage.bytes += nbytes
        usage.records += records
        if usage.records <= 0:
            del self._usage[name]

    def total(self) -> Usage:
        """The sum over every name."""
        return Usage(
            sum(u.bytes for u in self._usage.values()),
            sum(u.records for u in self._usage.values()),
        )
