"""Anti-amplification bookkeeping for the DHT port (the rule QUIC uses).

A UDP source address is only a claim. Until an address has proved that it receives our
datagrams, by answering one of our requests (each carries a random 20-byte message id
it could only have read off the wire), we send it at most ``factor`` times the bytes we
received from it. Such an address is *validated*. The requester side keeps the mirror
view: addresses that sent us a request have most likely validated us (they answer our
replies and ping us back), so requests to any other address are padded to let the
reply fit the responder's budget.

Every table is a bounded LRU. Forgetting an unvalidated address drops its received and
sent counts together, so over any run the bytes sent to an address stay within
``factor`` times the bytes received from it. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["AntiAmplification"]

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
    ) -> None:
        self.factor = factor
        self._budgets: _Lru[list[int]] = _Lru(max_budgets)  # [received, sent]
        self._validated: _Lru[bytes] = _Lru(max_validated)  # id it answered with, or b""
        self._heard: _Lru[bool] = _Lru(max_heard)

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
