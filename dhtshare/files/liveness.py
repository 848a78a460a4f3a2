"""Which provider addresses answer now: what ``files`` counts as online.

A provider record says where its signer serves a file, not that it still does: a node
that crashed (or lost its network) leaves its records until they expire, up to an hour.
So a listing pings every provider address once (the DHT and the peer server share one
port), all at once, each bounded by the DHT's own RPC timeout (at most 2 s), and counts
the ones that answered. Nothing is cached: a holder that just crashed is not counted, one
that just started is. A clean stop withdraws the records instead
(``FileService.withdraw_providers``), so a stopped holder is not even listed.

The addresses come from provider records of current members only (IP literals, never
multicast, broadcast or unspecified: ``records.check_peer_address``), and a listing sends
one ping datagram to each of at most ``MAX_PINGS`` of them: a member can make a reader
ping an address of its choice once per listing, no more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["MAX_PINGS", "Liveness"]

MAX_PINGS = 64  # addresses pinged for one listing; the rest count as not answering

Address = tuple[str, int]
Ping = Callable[[Address], Awaitable[bool]]


class Liveness:
    """Pings provider addresses; this node's own address always counts as answering."""

    def __init__(self, ping: Ping, own: Callable[[], Address]) -> None:
        self._ping, self._own = ping, own

    async def answered(self, addresses: Iterable[Address]) -> set[Address]:
        """The addresses among ``addresses`` that answer a ping now."""
        asked, own = set(addresses), self._own()
        due = sorted(asked - {own})[:MAX_PINGS]
        results = await asyncio.gather(*(self._ping(a) for a in due), return_exceptions=True)
        live = {a for a, ok in zip(due, results, strict=True) if ok is True}
        return live | ({own} & asked)
