"""What a relay admits: reservations and circuits, with the time passed in (sans-I/O);
and what a reservation holder admits from a relay (``IncomingGate``).

Rules (``RelayLimits`` holds the numbers):

- A relay key (``wire.relay.RelayKey``, never a member's identity key) holds at most one
  reservation; reserving again renews it (and moves it to the new source). A new one is
  refused ``LIMIT`` once ``max_reservations`` are held, ``max_reservations_per_source``
  from the same source (an IPv4 address or IPv6 /64, as the caller names it:
  ``transfer.aio.serve.handshake_source``), or ``max_reservations_per_network`` from its
  network (``source_network``: the IPv4 /24, the IPv6 /48). A reservation lapses
  ``reservation_ttl`` seconds after its last renewal.
- A circuit needs a live reservation of its target (else ``NO_RESERVATION``), fewer than
  ``max_circuits_per_reservation`` circuits on it, fewer than ``max_circuits_per_holder``
  on all the reservations of its holder's source, fewer than ``max_circuits_per_source``
  from the downloader's source and fewer than ``max_circuits`` in all (else ``LIMIT``).
  Circuits waiting for the target's Accept count.
- A circuit is cut once it has carried ``circuit_bytes`` bytes (both directions together),
  lasted ``circuit_seconds`` seconds, carried nothing either way for ``circuit_idle``
  seconds, or ``half_close_seconds`` after one end ended its side (``circuit_deadline``);
  the target has ``accept_timeout`` seconds to accept.

``KeeperLimits`` and ``IncomingGate`` are the holder's side: how many circuits one relay's
``Incoming`` may have open at once, how fast it may announce them, and when the holder
gives up on a relay that keeps sending more.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from dhtshare.wire.relay import RefuseCode

__all__ = [
    "CircuitSlot",
    "IncomingGate",
    "KeeperLimits",
    "RelayBook",
    "RelayLimits",
    "Reservation",
    "Verdict",
    "renew_after",
    "source_network",
]


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """A relay's limits (defaults: docs/connectivity.md)."""

    max_reservations: int = 64
    max_reservations_per_source: int = 4
    max_reservations_per_network: int = 8
    reservation_ttl: float = 600.0
    max_circuits_per_reservation: int = 8
    max_circuits_per_holder: int = 16
    max_circuits_per_source: int = 8
    max_circuits: int = 64
    circuit_bytes: int = 1 << 30
    circuit_seconds: float = 1800.0
    circuit_idle: float = 60.0  # 3 x the peer protocol's keepalive (transfer/swarm.py)
    half_close_seconds: float = 10.0
    accept_timeout: float = 10.0


def source_network(source: str) -> str:
    """The network a reservation quota counts by: the /24 of an IPv4 address, the /48 of an
    IPv6 address or network (as ``handshake_source`` names them); anything else as is."""
    try:
        net = ipaddress.ip_network(source, strict=False)
    except ValueError:
        return source
    prefix = 24 if net.version == 4 else 48
    return str(net.supernet(new_prefix=prefix)) if net.prefixlen > prefix else str(net)


@dataclass(slots=True)
class Reservation:
    key: bytes
    source: str
    expires: float
    circuits: int = 0

    @property
    def network(self) -> str:
        return source_network(self.source)


@dataclass(frozen=True, slots=True)
class CircuitSlot:
    """A circuit ``RelayBook.open_circuit`` counted: give it back with ``close_circuit``."""

    target_key: bytes
    source: str  # the downloader's
    holder: str  # the source of the target's reservation


@dataclass
class RelayBook:
    """The reservations and circuit counts of one relay."""

    limits: RelayLimits = field(default_factory=RelayLimits)
    reservations: dict[bytes, Reservation] = field(default_factory=dict)
    circuits: int = 0
    by_source: dict[str, int] = field(default_factory=dict)  # open circuits per downloader
    by_holder: dict[str, int] = field(default_factory=dict)  # per reservation source

    def _purge(self, now: float) -> None:
        for key in [k for k, r in self.reservations.items() if r.expires <= now]:
            del self.reservations[key]

    def reserve(self, key: bytes, source: str, now: float) -> RefuseCode | float:
        """Grant or renew ``key``'s reservation: its expiry time, or why not."""
        self._purge(now)
        limits = self.limits
        held = self.reservations.get(key)
        if held is None or held.source != source:
            from_source = sum(1 for r in self.reservations.values() if r.source == source)
            if from_source >= limits.max_reservations_per_source:
                return RefuseCode.LIMIT
            network = source_network(source)
            from_network = sum(1 for r in self.reservations.values() if r.network == network)
            if held is not None and held.network == network:
                from_network -= 1  # moving within the network takes no more of its quota
            if from_network >= limits.max_reservations_per_network:
                return RefuseCode.LIMIT
            if held is None and len(self.reservations) >= limits.max_reservations:
                return RefuseCode.LIMIT
        expires = now + limits.reservation_ttl
        if held is None:
            self.reservations[key] = Reservation(key, source, expires)
        else:
            held.source, held.expires = source, expires
        return expires

    def release(self, key: bytes, source: str) -> None:
        """The reservation connection of ``key`` from ``source`` ended."""
        held = self.reservations.get(key)
        if held is not None and held.source == source:
            del self.reservations[key]

    def live(self, key: bytes, now: float) -> bool:
        held = self.reservations.get(key)
        return held is not None and held.expires > now

    def open_circuit(self, target_key: bytes, source: str, now: float) -> RefuseCode | CircuitSlot:
        """Count a new circuit from ``source`` (the downloader's, named as for
        reservations) to ``target_key``: its slot, or why not."""
        self._purge(now)
        limits = self.limits
        held = self.reservations.get(target_key)
        if held is None:
            return RefuseCode.NO_RESERVATION
        if (
            held.circuits >= limits.max_circuits_per_reservation
            or self.by_holder.get(held.source, 0) >= limits.max_circuits_per_holder
            or self.by_source.get(source, 0) >= limits.max_circuits_per_source
            or self.circuits >= limits.max_circuits
        ):
            return RefuseCode.LIMIT
        held.circuits += 1
        self.circuits += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.by_holder[held.source] = self.by_holder.get(held.source, 0) + 1
        return CircuitSlot(target_key, source, held.source)

    def close_circuit(self, slot: CircuitSlot) -> None:
        """A circuit counted by ``open_circuit`` ended (or never got going)."""
        self.circuits = max(0, self.circuits - 1)
        for counts, name in ((self.by_source, slot.source), (self.by_holder, slot.holder)):
            left = counts.get(name, 0) - 1
            if left > 0:
                counts[name] = left
            else:
                counts.pop(name, None)
        held = self.reservations.get(slot.target_key)
        if held is not None:
            held.circuits = max(0, held.circuits - 1)

    def circuit_over(self, carried: int, started: float, now: float) -> bool:
        """Whether a circuit that carried ``carried`` bytes since ``started`` must be cut."""
        limits = self.limits
        return carried >= limits.circuit_bytes or now - started >= limits.circuit_seconds

    def circuit_deadline(
        self, started: float, last_active: float, half_closed: float | None
    ) -> tuple[float, str]:
        """When a circuit must be cut for time, and why (``limit``, ``idle`` or
        ``half_closed``): it started at ``started``, last carried a byte at
        ``last_active``, and one end ended its side at ``half_closed`` (``None``: not yet)."""
        limits = self.limits
        ends = [(started + limits.circuit_seconds, "limit")]
        ends.append((last_active + limits.circuit_idle, "idle"))
        if half_closed is not None:
            ends.append((half_closed + limits.half_close_seconds, "half_closed"))
        return min(ends)


# ---- the reservation holder's side ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeeperLimits:
    """What a reservation holder (``RelayKeeper``) takes from one relay."""

    circuits_per_relay: int = 8  # open at once, Incoming until the circuit is handed over
    incoming_burst: int = 8
    incoming_rate: float = 1.0  # Incoming per second, on average
    max_strikes: int = 32  # ignored Incoming (fading at ``incoming_rate``) before dropping
    drop_seconds: float = 600.0  # a dropped relay is not tried again for this long
    min_renew: float = 60.0  # renew no more often than this (or half the ttl, if longer)


def renew_after(ttl: float, limits: KeeperLimits) -> float:
    """Seconds from a ``Reserved(ttl)`` to the renewal: half the ttl, at least
    ``min_renew`` (a relay naming a tiny ttl would otherwise have us sign Reserves
    as fast as it likes)."""
    return max(limits.min_renew, ttl / 2)


class Verdict(enum.Enum):
    """What to do with one ``Incoming``."""

    OPEN = "open"  # open the circuit (and call ``IncomingGate.done`` when it is handed over)
    IGNORE = "ignore"  # past a limit: ignore it
    DROP = "drop"  # past a limit again and again: give the relay up


class IncomingGate:
    """One relay's ``Incoming`` as its holder admits them: at most ``circuits_per_relay``
    open at once, a token bucket (``incoming_burst`` at once, ``incoming_rate`` per second)
    and, for each one ignored, a strike; the strikes fade at ``incoming_rate`` per second
    and reaching ``max_strikes`` drops the relay."""

    def __init__(self, limits: KeeperLimits, now: float) -> None:
        self.limits = limits
        self.active = 0
        self.ignored = 0
        self._tokens = float(limits.incoming_burst)
        self._strikes = 0.0
        self._last = now

    def admit(self, now: float) -> Verdict:
        limits = self.limits
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(limits.incoming_burst, self._tokens + elapsed * limits.incoming_rate)
        self._strikes = max(0.0, self._strikes - elapsed * limits.incoming_rate)
        if self.active >= limits.circuits_per_relay or self._tokens < 1:
            self.ignored += 1
            self._strikes += 1
            return Verdict.DROP if self._strikes >= limits.max_strikes else Verdict.IGNORE
        self._tokens -= 1
        self.active += 1
        return Verdict.OPEN

    def done(self) -> None:
        """A circuit admitted by ``admit`` was handed over (or failed)."""
        self.active = max(0, self.active - 1)
