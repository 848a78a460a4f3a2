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
token bucket per asker IP and one over all askers.

Every table is a bounded LRU. Forgetting an unvalidated address drops its received and
sent counts together, so over any run the bytes sent to an address stay within
``factor`` times the bytes received from it. Pure: no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

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


class DialBackLimit:
    """Token buckets for reachability dial-backs: one per asker IP, one over all askers.

    Each IP may have ``per_ip`` dial-backs at once and earns one back every
    ``per_ip_every`` seconds; all askers together ``total`` at once and one back every
    ``total_every`` seconds. At most ``max_ips`` IPs are remembered (least recently
    used forgotten: a forgotten IP starts full again, so the total bucket is what
    bounds an asker with many addresses).
    """

    def __init__(
        self,
        *,
        per_ip: int = 3,
        per_ip_every: float = 20.0,
        total: int = 32,
        total_every: float = 0.1,
        max_ips: int = 4096,
    ) -> None:
        self.per_ip, self.per_ip_every = per_ip, per_ip_every
        self.total, self.total_every = total, total_every
        self._ips: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, at)
        self._max_ips = max_ips
        self._all: tuple[float, float] | None = None

    @staticmethod
    def _refill(held: tuple[float, float] | None, cap: int, every: float, now: float) -> float:
        if held is None:
            return float(cap)
        tokens, at = held
        return min(float(cap), tokens + max(0.0, now - at) / every)

    def allow(self, ip: str, now: float) -> bool:
        """Take one dial-back for ``ip`` at ``now`` if both buckets have a token."""
        mine = self._refill(self._ips.get(ip), self.per_ip, self.per_ip_every, now)
        everyone = self._refill(self._all, self.total, self.total_every, now)
        ok = mine >= 1 and everyone >= 1
        if ok:
            mine, everyone = mine - 1, everyone - 1
        self._ips[ip] = (mine, now)
        self._ips.move_to_end(ip)
        while len(self._ips) > self._max_ips:
            self._ips.popitem(last=False)
        self._all = (everyone, now)
        return ok
