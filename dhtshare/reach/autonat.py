"""The reachability test's rules: observed-address votes, dial-back evidence, the verdict.

A node asks a few DHT peers ``reach`` with a fresh random nonce each. Every answer is a
vote for the address that peer saw us at, counted once per network (``network_of``: a
/24 or /48, loopback and LAN addresses included). The node's observed (public) address
is the one seen from the most networks, if no other address ties with it and at least
``MIN_NETWORKS`` networks saw it (or it is one of our own listening addresses, which no
peer can forge); otherwise there is none. So sybils in one network count once, and a
tie is never broken by who was asked first. A peer that says it is dialing back sends
the nonce twice, unsolicited: by UDP from a fresh port and by a new TCP connection. A
peer *confirms* only if its nonce arrived on both (a UDP nonce from the very address we
asked counts for nothing: it came back through our own NAT mapping). Nonces are unguessable, so a
third party cannot confirm for a peer, and a peer that lies about dialing (or sends
nothing) only fails to confirm.

Verdict of one round (``ReachRound.verdict``):

- ``PUBLIC``: every asked peer answered or failed, and a peer that reported the observed
  address confirmed (a confirmation counts only for the address its peer reported); or
  there is no observed address and some peer confirmed (reachable, address not agreed);
- ``PRIVATE``: the dial-back deadline passed, at least ``min_private`` peers answered
  that they were dialing (or one, if every dialing peer saw us at an address not our
  own: a NAT between), and none confirmed;
- ``UNKNOWN``: the deadline passed without either (too few peers, none dialing).

Peers on our own LAN (in our network, seeing us at one of our own addresses) are left
out once a peer outside answered: they can dial us across the LAN, which says nothing
about the outside (``ReachRound._counted``).

The deadline is the last answer's time plus ``dialback_wait(rtt)`` of the slowest
answering peer. ``Reachability`` keeps the node's verdict across rounds and says when
to test again; a ``PUBLIC`` node becomes ``PRIVATE`` only after ``leave_public``
consecutive private rounds whose dialing, non-confirming peers come from at least
``MIN_NETWORKS`` networks (two liars in one network, or an honest peer whose dial-back
budget an attacker spent, do not flip it). Pure: no I/O, no clock; every time is
passed in (seconds).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "ReachRound",
    "ReachState",
    "Reachability",
    "Verdict",
    "dialback_wait",
    "format_address",
    "network_of",
]

Address = tuple[str, int]

#: Bounds of the wait for dial-backs after a peer's answer (seconds).
MIN_WAIT = 1.0
MAX_WAIT = 5.0
#: Distinct networks that must agree on an observed address, or refute a public verdict.
MIN_NETWORKS = 2


class Verdict(StrEnum):
    """Whether other nodes can reach this one, unsolicited, at its observed address."""

    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


def dialback_wait(rtt: float) -> float:
    """Seconds to wait for a peer's dial-backs after its answer: ``4 * rtt``, bounded.

    A TCP dial-back lands about one round trip after the answer (the connect's
    handshake); four leave room for a busy peer.
    """
    return min(max(4 * rtt, MIN_WAIT), MAX_WAIT)


def network_of(host: str) -> str:
    """The network a peer at ``host`` is counted under: its /24 (IPv4, also when mapped
    into IPv6) or /48 (IPv6). Unlike the routing table's prefixes (``dht/sources.py``),
    loopback and private addresses are grouped too: sybils on one LAN count once."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def format_address(address: Address | None) -> str | None:
    """``"IP:port"`` (``"[IP]:port"`` for IPv6), or None."""
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class _Asked:
    peer: Address
    nonce: bytes
    observed: Address | None = None
    dialing: bool = False
    ended: bool = False  # answered, or gave up
    udp: bool = False
    tcp: bool = False

    @property
    def confirmed(self) -> bool:
        return self.udp and self.tcp


@dataclass(slots=True)
class ReachRound:
    """One test: the peers asked (each with its own nonce), their answers, the dial-backs."""

    started: float
    min_private: int = 2
    #: our own listening addresses: one of them needs only one network to be observed
    own: frozenset[Address] = frozenset()
    _asked: dict[bytes, _Asked] = field(default_factory=dict)  # nonce -> peer's entry
    _deadline: float | None = None

    def ask(self, peer: Address, nonce: bytes) -> None:
        """``peer`` is being asked with ``nonce`` (unique per peer and round)."""
        if nonce in self._asked:
            raise ValueError("a nonce is used for one peer only")
        self._asked[nonce] = _Asked(peer, nonce)

    def _entry(self, peer: Address) -> _Asked | None:
        return next((a for a in self._asked.values() if a.peer == peer), None)

    def answered(
        self, peer: Address, observed: Address, dialing: bool, rtt: float, now: float
    ) -> None:
        """``peer`` answered: it saw us at ``observed`` and says whether it dials back."""
        entry = self._entry(peer)
        if entry is None:
            return
        entry.observed, entry.dialing, entry.ended = observed, dialing, True
        due = now + dialback_wait(rtt)
        self._deadline = due if self._deadline is None else max(self._deadline, due)

    def failed(self, peer: Address) -> None:
        """``peer`` did not answer (the RPC timed out)."""
        entry = self._entry(peer)
        if entry is not None and entry.observed is None:
            entry.ended = True

    def arrived(self, nonce: bytes, tcp: bool, source: Address) -> bool:
        """A dial-back carrying ``nonce`` arrived (by TCP or UDP) from ``source``.

        True if it is new evidence. Unknown nonces count for nothing, and so does a
        UDP nonce from the asked peer's own address (not a fresh socket).
        """
        entry = self._asked.get(bytes(nonce))
        if entry is None:
            return False
        if tcp:
            new, entry.tcp = not entry.tcp, True
        else:
            if source == entry.peer:
                return False
            new, entry.udp = not entry.udp, True
        return new

    @property
    def peers(self) -> list[Address]:
        """The peers asked, in asking order."""
        return [a.peer for a in self._asked.values()]

    def answered_by(self, peer: Address) -> bool:
        """True if ``peer`` answered (with an observed address)."""
        entry = self._entry(peer)
        return entry is not None and entry.observed is not None

    def nonce_of(self, peer: Address) -> bytes | None:
        entry = self._entry(peer)
        return None if entry is None else entry.nonce

    def reported(self) -> set[Address]:
        """Every address some answering peer saw us at."""
        return {a.observed for a in self._asked.values() if a.observed is not None}

    def _counted(self) -> list[_Asked]:
        """The peers whose view counts. A LAN peer (in our own network, seeing us at one of
        our own addresses) says nothing about the outside: once a peer outside our network
        answered, LAN peers are left out (a LAN-mate would confirm a dial-back across the
        LAN, and keep a node behind a router from ever being found private)."""
        lan = {network_of(host) for host, _ in self.own}
        entries = list(self._asked.values())

        def on_lan(a: _Asked) -> bool:
            return a.observed in self.own and network_of(a.peer[0]) in lan

        outside = [a for a in entries if a.observed is not None and not on_lan(a)]
        return [a for a in entries if not on_lan(a)] if outside else entries

    def observed(self) -> Address | None:
        """The address seen from the most networks, or None: nobody answered, another
        address ties with it, or fewer than ``MIN_NETWORKS`` networks saw it (unless it
        is one of ``own``)."""
        networks: dict[Address, set[str]] = {}
        for a in self._counted():
            if a.observed is not None:
                networks.setdefault(a.observed, set()).add(network_of(a.peer[0]))
        if not networks:
            return None
        best = max(len(n) for n in networks.values())
        tied = [address for address, n in networks.items() if len(n) == best]
        if len(tied) > 1:
            return None
        address = tied[0]
        return address if best >= MIN_NETWORKS or address in self.own else None

    def refuting_networks(self) -> int:
        """Distinct networks of the peers that said they were dialing and did not confirm."""
        return len(
            {network_of(a.peer[0]) for a in self._counted() if a.dialing and not a.confirmed}
        )

    def varies(self) -> bool:
        """True if peers saw one IP at different ports: the NAT gives each destination
        its own port (symmetric NAT), so no peer can predict the port another sees."""
        seen: dict[str, set[int]] = {}
        for a in self._asked.values():
            if a.observed is not None:
                seen.setdefault(a.observed[0], set()).add(a.observed[1])
        return any(len(ports) > 1 for ports in seen.values())

    def confirmed(self) -> list[Address]:
        """The peers whose nonce came back on both UDP and TCP."""
        return [a.peer for a in self._asked.values() if a.confirmed]

    @property
    def settled(self) -> bool:
        """True once every asked peer answered or failed."""
        return all(a.ended for a in self._asked.values())

    @property
    def deadline(self) -> float | None:
        """When the wait for dial-backs ends (None until a peer answered)."""
        return self._deadline

    def verdict(self, now: float) -> Verdict | None:
        """The round's verdict at ``now``, or None while it must wait for more."""
        if not self.settled:
            return None
        address = self.observed()
        entries = self._counted()
        if any(a.confirmed and (address is None or a.observed == address) for a in entries):
            return Verdict.PUBLIC
        if self._deadline is not None and now < self._deadline:
            return None
        dialing = [a for a in entries if a.dialing]
        if dialing and not any(a.confirmed for a in dialing):
            # A peer that saw us at an address not ours saw a NAT between us: one such
            # peer is enough (a network of home nodes may have one public node)
            behind_nat = self.own and all(a.observed not in self.own for a in dialing)
            if behind_nat or len(dialing) >= self.min_private:
                return Verdict.PRIVATE
        return Verdict.UNKNOWN


@dataclass(frozen=True, slots=True)
class ReachState:
    """What the node knows of its reachability: the verdict and its observed address."""

    verdict: Verdict = Verdict.UNKNOWN
    observed: Address | None = None  # the address peers in most networks saw us at
    tested_at: float | None = None  # when the last round ended
    rounds: int = 0
    varies: bool = False  # the last round's peers saw us at different ports (symmetric NAT)

    @property
    def public_address(self) -> str | None:
        """``"IP:port"`` of the observed address, or None while peers do not agree on one."""
        return format_address(self.observed)


class Reachability:
    """The verdict across rounds, and when to test again.

    A round that reached no verdict (``UNKNOWN``) keeps the previous one; the node
    tests again after ``unknown_every`` seconds (for the first ``quick_rounds``
    inconclusive rounds, then ``slow_every``), and after ``settled_every`` once it
    knows. A round whose observed address differs from the last one's is followed at
    once by another, which tests the new address again (once: a NAT that maps every
    destination to another port changes it every round).

    An ``UNKNOWN`` round keeps the observed address; a decided round without one keeps
    it only if some peer still reported it. A ``PRIVATE`` round of a ``PUBLIC`` node
    counts as ``UNKNOWN`` unless its refuting peers come from ``MIN_NETWORKS`` networks,
    and the node becomes private after ``leave_public`` such rounds in a row.
    """

    def __init__(
        self,
        *,
        peers: int = 4,
        min_private: int = 2,
        unknown_every: float = 5.0,
        quick_rounds: int = 6,
        slow_every: float = 60.0,
        settled_every: float = 300.0,
        leave_public: int = 2,
    ) -> None:
        self.peers = peers
        self.min_private = min_private
        self.unknown_every = unknown_every
        self.quick_rounds = quick_rounds
        self.slow_every = slow_every
        self.settled_every = settled_every
        self.leave_public = leave_public
        self._refuted = 0  # consecutive private rounds against a public verdict
        self.state = ReachState()
        self._inconclusive = 0
        self._next: float | None = None  # None: test now
        self._retesting = False

    def begin(self, now: float, own: Iterable[Address] = ()) -> ReachRound:
        """A new round starting at ``now``; ``own``: our own listening addresses."""
        return ReachRound(now, self.min_private, frozenset(own))

    def finish(self, done: ReachRound, verdict: Verdict, now: float) -> ReachState:
        """Record ``done``'s ``verdict`` (from ``ReachRound.verdict``); the new state."""
        old = self.state
        confirm_soon = False
        if verdict is Verdict.PRIVATE and old.verdict is Verdict.PUBLIC:
            refuted = done.refuting_networks() >= MIN_NETWORKS
            self._refuted = self._refuted + 1 if refuted else 0
            if self._refuted < self.leave_public:
                verdict = Verdict.UNKNOWN  # not yet
                confirm_soon = refuted  # test again soon
        else:
            self._refuted = 0
        if verdict is Verdict.UNKNOWN:
            observed = old.observed
        else:
            kept = old.observed if old.observed in done.reported() else None
            observed = done.observed() or kept
        changed = old.observed is not None and observed != old.observed
        if verdict is Verdict.UNKNOWN:
            self._inconclusive += 1
            quick = self._inconclusive <= self.quick_rounds
            self._next = now + (self.unknown_every if quick else self.slow_every)
            verdict = old.verdict
        else:
            self._inconclusive = 0
            self._next = now + self.settled_every
        if confirm_soon:
            self._next = now + self.unknown_every
        self._retesting = changed and not self._retesting
        if self._retesting:
            self._next = now
        varies = done.varies() if done.reported() else old.varies
        self.state = ReachState(verdict, observed, now, old.rounds + 1, varies)
        return self.state

    def due(self, now: float) -> float:
        """Seconds until the next round should start (0: now)."""
        return 0.0 if self._next is None else max(0.0, self._next - now)

    def retest_now(self) -> None:
        """Test again as soon as possible (the network changed)."""
        self._next = None
