"""The node's reachability service: test, decide, switch DHT client mode, repeat.

Each round asks up to ``Reachability.peers`` DHT contacts (distinct IPs, chosen at
random; with too few to decide, it first looks up its own id to meet more) ``reach``
with a fresh nonce each, collects the dial-backs (UDP from the DHT
protocol, TCP from ``PeerServer.dialback_sink``) and ends as soon as
``ReachRound.verdict`` gives one: at once when a dial-back confirms the node public, at
the dial-back deadline otherwise. A peer that answers that it will not dial back
(our address is not validated there yet: its ping-back is on the way) is asked once
more after a few round trips. On ``PRIVATE`` the DHT switches to client mode, on
``PUBLIC`` back to server mode; ``UNKNOWN`` changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from dhtshare.dht.server import DhtNode
from dhtshare.reach.autonat import Reachability, ReachRound, ReachState, Verdict
from dhtshare.wire.dialback import NONCE_SIZE

__all__ = ["ReachabilityService"]

log = logging.getLogger(__name__)

Address = tuple[str, int]
Listener = Callable[[ReachState], None]


class _Sinked(Protocol):
    dialback_sink: Callable[[bytes, Address], None] | None


class ReachabilityService:
    """Runs the reachability test for ``dht`` and holds the result (``state``).

    ``extra_peers`` (e.g. the bootstrap addresses) are candidates besides the routing
    table. ``own`` gives our own listening addresses (default: the DHT's, when bound to
    a specific host): a peer that saw us at one of them needs no second network to agree
    (``ReachRound.observed``). ``attach`` connects the dial-back sinks; ``run`` tests
    forever.
    """

    def __init__(
        self,
        dht: DhtNode,
        *,
        policy: Reachability | None = None,
        extra_peers: Callable[[], Iterable[Address]] = tuple,
        own: Callable[[], Iterable[Address]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.dht = dht
        self.policy = policy or Reachability()
        self.extra_peers = extra_peers
        self.own = own or self._bound
        self.clock = clock
        self.rng = rng or random.Random()
        self._round: ReachRound | None = None
        self._news = asyncio.Event()
        self._wake = asyncio.Event()
        self._listeners: list[Listener] = []
        self.tcp_attached = False

    def _bound(self) -> tuple[Address, ...]:
        host, port = self.dht.address
        return () if host in ("", "0.0.0.0", "::") else ((host, port),)

    # ---- state ---------------------------------------------------------------------

    @property
    def state(self) -> ReachState:
        """The current verdict and observed address."""
        return self.policy.state

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(state)`` after every round (the verdict may be unchanged)."""
        self._listeners.append(listener)

    # ---- dial-back intake ------------------------------------------------------------

    def attach(self, server: _Sinked | None) -> None:
        """Take UDP dial-backs from the DHT and TCP ones from ``server`` (a PeerServer)."""
        self.dht.set_dialback_sink(self.on_udp)
        if server is not None:
            server.dialback_sink = self.on_tcp
            self.tcp_attached = True

    def on_udp(self, nonce: bytes, source: Address) -> None:
        """A ``dialback`` datagram arrived from ``source``."""
        self._arrived(nonce, False, source)

    def on_tcp(self, nonce: bytes, source: Address) -> None:
        """A TCP connection's first frame was ``DIALBACK(nonce)``."""
        self._arrived(nonce, True, source)

    def _arrived(self, nonce: bytes, tcp: bool, source: Address) -> None:
        current = self._round
        if current is not None and current.arrived(bytes(nonce), tcp, source):
            self._news.set()

    # ---- rounds ----------------------------------------------------------------------

    def candidates(self) -> list[Address]:
        """Up to ``policy.peers`` peers to ask, one per IP, chosen at random."""
        by_ip: dict[str, list[Address]] = {}
        table = [(str(n.ip), int(n.port)) for n in self.dht.contacts()]
        for address in [*table, *self.extra_peers()]:
            by_ip.setdefault(address[0], [])
            if address not in by_ip[address[0]]:
                by_ip[address[0]].append(address)
        own = self.dht.address
        choices = [self.rng.choice([a for a in v if a != own] or v) for v in by_ip.values()]
        choices = [a for a in choices if a != own]
        self.rng.shuffle(choices)
        return choices[: self.policy.peers]

    async def test_once(self) -> ReachState:
        """One round: ask, wait for the dial-backs or the deadline, record the verdict."""
        peers = self.candidates()
        if len(peers) < self.policy.min_private and self.dht.contact_count():
            await self.dht.find_more()  # too few to ask: meet more nodes first
            peers = self.candidates()
        current = self.policy.begin(self.clock(), self.own())
        before = self.state
        for peer in peers:
            current.ask(peer, os.urandom(NONCE_SIZE))
        self._round = current
        asks = [asyncio.ensure_future(self._ask(current, peer)) for peer in peers]
        try:
            verdict = await self._decide(current)
        finally:
            self._round = None
            for task in asks:
                task.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        state = self.policy.finish(current, verdict, self.clock())
        if (state.verdict, state.observed) != (before.verdict, before.observed):
            log.info(
                "reachability %s (public address %s; %d of %d peers asked answered)",
                state.verdict.value,
                state.public_address or "not agreed",
                sum(1 for p in peers if current.answered_by(p)),
                len(peers),
            )
        self._apply(state)
        return state

    async def _ask(self, current: ReachRound, peer: Address) -> None:
        nonce = current.nonce_of(peer)
        try:
            for attempt in range(2):
                sent = self.clock()
                reply = None if nonce is None else await self.dht.reach(peer, nonce)
                if reply is None:
                    break
                rtt = self.clock() - sent
                if reply.dialing or attempt:
                    observed = (reply.host, reply.port)
                    current.answered(peer, observed, reply.dialing, rtt, self.clock())
                    break
                # not validated there yet: its ping-back to us is under way
                await asyncio.sleep(min(max(3 * rtt, 0.05), 1.0))
        finally:
            current.failed(peer)  # no-op if it answered
            self._news.set()

    async def _decide(self, current: ReachRound) -> Verdict:
        while True:
            self._news.clear()
            verdict = current.verdict(self.clock())
            if verdict is not None:
                return verdict
            deadline = current.deadline if current.settled else None
            wait = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._news.wait()

    def _apply(self, state: ReachState) -> None:
        if state.verdict is Verdict.PRIVATE and not self.dht.client_mode:
            log.info("not reachable from outside: DHT client mode")
            self.dht.set_client_mode(True)
        elif state.verdict is Verdict.PUBLIC and self.dht.client_mode:
            log.info("reachable from outside: DHT server mode")
            self.dht.set_client_mode(False)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("reachability listener failed")

    def retest(self) -> None:
        """Start the next round now (e.g. the network changed)."""
        self.policy.retest_now()
        self._wake.set()

    async def run(self) -> None:
        """Test now and whenever ``policy`` says, until cancelled."""
        while True:
            try:
                await self.test_once()
            except Exception:
                log.exception("reachability test failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.policy.due(self.clock())):
                    await self._wake.wait()
