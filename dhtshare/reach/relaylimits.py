"""What a relay admits: reservations and circuits, with the time passed in (sans-I/O).

Rules (``RelayLimits`` holds the numbers):

- A key holds at most one reservation; reserving again renews it (and moves it to the new
  source). A new one is refused ``LIMIT`` once ``max_reservations`` are held, or
  ``max_reservations_per_source`` from the same source (an IPv4 address or IPv6 /64, as the
  caller names it). A reservation lapses ``reservation_ttl`` seconds after its last renewal.
- A circuit needs a live reservation of its target (else ``NO_RESERVATION``), fewer than
  ``max_circuits_per_reservation`` circuits on it and fewer than ``max_circuits`` in all
  (else ``LIMIT``). Circuits waiting for the target's Accept count.
- A circuit is cut once it has carried ``circuit_bytes`` bytes (both directions together)
  or lasted ``circuit_seconds`` seconds; the target has ``accept_timeout`` seconds to accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dhtshare.wire.relay import RefuseCode

__all__ = ["RelayBook", "RelayLimits", "Reservation"]


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """A relay's limits (defaults: docs/connectivity.md)."""

    max_reservations: int = 64
    max_reservations_per_source: int = 4
    reservation_ttl: float = 600.0
    max_circuits_per_reservation: int = 8
    max_circuits: int = 64
    circuit_bytes: int = 1 << 30
    circuit_seconds: float = 1800.0
    accept_timeout: float = 10.0


@dataclass(slots=True)
class Reservation:
    key: bytes
    source: str
    expires: float
    circuits: int = 0


@dataclass
class RelayBook:
    """The reservations and circuit counts of one relay."""

    limits: RelayLimits = field(default_factory=RelayLimits)
    reservations: dict[bytes, Reservation] = field(default_factory=dict)
    circuits: int = 0

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

    def open_circuit(self, target_key: bytes, now: float) -> RefuseCode | None:
        """Count a new circuit to ``target_key`` (``None``), or say why not."""
        self._purge(now)
        held = self.reservations.get(target_key)
        if held is None:
            return RefuseCode.NO_RESERVATION
        if held.circuits >= self.limits.max_circuits_per_reservation:
            return RefuseCode.LIMIT
        if self.circuits >= self.limits.max_circuits:
            return RefuseCode.LIMIT
        held.circuits += 1
        self.circuits += 1
        return None

    def close_circuit(self, target_key: bytes) -> None:
        """A circuit counted by ``open_circuit`` ended (or never got going)."""
        self.circuits = max(0, self.circuits - 1)
        held = self.reservations.get(target_key)
        if held is not None:
            held.circuits = max(0, held.circuits - 1)

    def circuit_over(self, carried: int, started: float, now: float) -> bool:
        """Whether a circuit that carried ``carried`` bytes since ``started`` must be cut."""
        limits = self.limits
        return carried >= limits.circuit_bytes or now - started >= limits.circuit_seconds
