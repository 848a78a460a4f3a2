"""Anti-amplification bookkeeping for the DHT port (the rule QUIC uses).

A UDP source address is only a claim. Until an address has proved that it receives our
datagrams, by answering one of our requests (each carries a random 20-byte message id
it could only have read off the wire), we send it at most ``factor`` times the bytes we
received from it. Such an address is *validated*. The requester side keeps the mirror
view: addresses that sent us a request have most likely validated us (they answer our
replies and ping us back), so requests to any other address are padded to let the
reply fit the responder's budget.

An address that answered our ping with empty bytes runs in DHT client mode (it is not
publicly reachable): it is validated, and marked a *client* until a given time, during
which it is neither added to the routing table nor pinged back again.

``DialBackLimit`` bounds the reachability dial-backs (RPC ``reach``) a node sends: a
token bucket per asker (an IPv4 address, an IPv6 /64), one per asker network (/24,
/48), one over all askers, and a reserve only askers in our routing table may draw on.

Every table is a bounded LRU. Forgetting an unvalidated address drops its received and
sent counts together, so over any run the bytes sent to an address stay within
``factor`` times the bytes received from it. Pure: no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["AntiAmplification", "DialBackLimit"]

Address = tuple[str, int]
_V = TypeVar("_V")


class _Lru(Generic[_V]):
    """A dict that forgets its least recently used entry past ``size`` entries."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[Address, _V] = OrderedDict()
        self.size = size

    def get(self, key: Address) -> _V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Address, value: _V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: Address) -> None:
        self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class AntiAmplification:
    """Per-address byte budgets, validated addresses, and who has validated us."""

    def __init__(
        self,
        *,
        factor: int = 3,
        max_budgets: int = 4096,
        max_validated: int = 16384,
        max_heard: int = 16384,
        max_clients: int = 4096,
    ) -> None:
        self.factor = factor
        self._budgets: _Lru[list[int]] = _Lru(max_budgets)  # [received, sent]
        self._validated: _Lru[bytes] = _Lru(max_validated)  # id it answered with, or b""
        self._heard: _Lru[bool] = _Lru(max_heard)
        self._clients: _Lru[float] = _Lru(max_clients)  # client until this time

    # ---- responder side -------------------------------------------------------------

    def is_validated(self, addr: Address) -> bool:
        """True once ``addr`` answered one of our requests (until forgotten)."""
        return addr in self._validated

    def answered_as(self, addr: Address) -> bytes | None:
        """The node id ``addr`` answered a ping with, if it did."""
        node_id = self._validated.get(addr)
        return node_id or None

    def validate(self, addr: Address, node_id: bytes | None = None) -> None:
        """``addr`` answered a request (a ping: with ``node_id``)."""
        held = self._validated.get(addr)
        self._validated.put(addr, node_id if node_id is not None else held or b"")
        self._budgets.pop(addr)
        if node_id:
            self._clients.pop(addr)  # it answers pings with its id again: a server

    def mark_client(self, addr: Address, until: float) -> None:
        """``addr`` answered a ping with empty bytes: a client (validated) until ``until``."""
        self.validate(addr)
        self._validated.put(addr, b"")
        self._clients.put(addr, until)

    def is_client(self, addr: Address, now: float) -> bool:
        """True if ``addr`` was marked a client and the mark has not run out at ``now``."""
        until = self._clients.get(addr)
        if until is None:
            return False
        if until <= now:
            self._clients.pop(addr)
            return False
        return True

    def received(self, addr: Address, size: int) -> None:
        """Count ``size`` bytes that arrived from ``addr``."""
        if addr in self._validated:
            return
        budget = self._budgets.get(addr)
        if budget is None:
            self._budgets.put(addr, [size, 0])
        else:
            budget[0] += size

    def allowance(self, addr: Address) -> int | None:
        """Bytes we may still send to ``addr`` (None: no limit, it is validated)."""
        if addr in self._validated:
            return None
        budget = self._budgets.get(addr)
        if budget is None:
            return 0
        return max(0, self.factor * budget[0] - budget[1])

    def spend(self, addr: Address, size: int) -> bool:
        """Charge ``size`` bytes to ``addr`` if its allowance covers them; True if it did."""
        if addr in self._validated:
            return True
        budget = self._budgets.get(addr)
        if budget is None or self.factor * budget[0] - budget[1] < size:
            return False
        budget[1] += size
        return True

    # ---- requester side -------------------------------------------------------------

    def heard_request(self, addr: Address) -> None:
        """``addr`` sent us a request that we answered."""
        self._heard.put(addr, True)

    def has_heard(self, addr: Address) -> bool:
        """True if ``addr`` sent us a request lately (it has most likely validated us)."""
        return self._heard.get(addr) is not None


def _groups(ip: str) -> tuple[str, str]:
    """``(asker, network)`` keys of ``ip``: the IPv4 address and its /24, or the IPv6
    /64 (one host's usual allocation) and /48. An IPv4-mapped IPv6 address is IPv4."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip, ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version == 4:
        return str(addr), str(ipaddress.ip_network(f"{addr}/24", strict=False))
    return (
        str(ipaddress.ip_network(f"{addr}/64", strict=False)),
        str(ipaddress.ip_network(f"{addr}/48", strict=False)),
    )


class DialBackLimit:
    """Token buckets for reachability dial-backs.

    Each asker (an IPv4 address; an IPv6 /64, since one host gets 2^64 addresses) may
    have ``per_ip`` dial-backs at once and earns one back every ``per_ip_every``
    seconds; each network (/24, /48) ``per_net`` at once and one back every
    ``per_net_every`` seconds; all askers together ``total`` at once and one back every
    ``total_every`` seconds. When the total bucket is empty, an asker in our routing
    table (``known``) draws on a reserve of ``reserved``, one back every
    ``reserved_every`` seconds: a flood from many addresses cannot keep our contacts
    from being dialled back. At most ``max_ips`` askers and networks each are
    remembered (least recently used forgotten: a forgotten one starts full again, so
    the total bucket is what bounds an asker with many networks).
    """

    def __init__(
        self,
        *,
        per_ip: int = 3,
        per_ip_every: float = 20.0,
        per_net: int = 16,
        per_net_every: float = 1.0,
        total: int = 32,
        total_every: float = 0.1,
        reserved: int = 16,
        reserved_every: float = 0.2,
        max_ips: int = 4096,
    ) -> None:
        self.per_ip, self.per_ip_every = per_ip, per_ip_every
        self.per_net, self.per_net_every = per_net, per_net_every
        self.total, self.total_every = total, total_every
        self.reserved, self.reserved_every = reserved, reserved_every
        # asker or network -> (tokens, at)
        self._ips: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._nets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_ips = max_ips
        self._all: tuple[float, float] | None = None
        self._reserve: tuple[float, float] | None = None

    @staticmethod
    def _refill(held: tuple[float, float] | None, cap: int, every: float, now: float) -> float:
        if held is None:
            return float(cap)
        tokens, at = held
        return min(float(cap), tokens + max(0.0, now - at) / every)

    def _keep(
        self, table: OrderedDict[str, tuple[float, float]], key: str, held: tuple[float, float]
    ) -> None:
        table[key] = held
        table.move_to_end(key)
        while len(table) > self._max_ips:
            table.popitem(last=False)

    def allow(self, ip: str, now: float, *, known: bool = False) -> bool:
        """Take one dial-back for ``ip`` at ``now`` if its buckets have a token;
        ``known``: the asker is in our routing table (it may use the reserve)."""
        asker, net = _groups(ip)
        mine = self._refill(self._ips.get(asker), self.per_ip, self.per_ip_every, now)
        ours = self._refill(self._nets.get(net), self.per_net, self.per_net_every, now)
        everyone = self._refill(self._all, self.total, self.total_every, now)
        spare = self._refill(self._reserve, self.reserved, self.reserved_every, now)
        ok = mine >= 1 and ours >= 1 and (everyone >= 1 or (known and spare >= 1))
        if ok:
            mine, ours = mine - 1, ours - 1
            if everyone >= 1:
                everyone -= 1
            else:
                spare -= 1
        self._keep(self._ips, asker, (mine, now))
        self._keep(self._nets, net, (ours, now))
        self._all = (everyone, now)
        self._reserve = (spare, now)
        return ok
