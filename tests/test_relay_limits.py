"""A relay's admission rules (reach/relaylimits.py), with literal times."""

from __future__ import annotations

from dhtshare.reach.relaylimits import RelayBook, RelayLimits
from dhtshare.wire.relay import RefuseCode

LIMITS = RelayLimits(
    max_reservations=5,
    max_reservations_per_source=2,
    reservation_ttl=100.0,
    max_circuits_per_reservation=2,
    max_circuits=3,
    circuit_bytes=1000,
    circuit_seconds=60.0,
)


def key(n: int) -> bytes:
    return bytes([n]) * 32


def test_per_source_and_total_reservations() -> None:
    book = RelayBook(LIMITS)
    assert book.reserve(key(1), "10.0.0.1", 0.0) == 100.0
    assert book.reserve(key(2), "10.0.0.1", 0.0) == 100.0
    assert book.reserve(key(3), "10.0.0.1", 0.0) is RefuseCode.LIMIT  # third from one source
    assert book.reserve(key(1), "10.0.0.1", 50.0) == 150.0  # a renewal is no new one
    for n, ip in ((3, "10.0.0.2"), (4, "10.0.0.3"), (5, "10.0.0.4")):
        assert book.reserve(key(n), ip, 1.0) == 101.0
    assert book.reserve(key(6), "10.0.0.5", 2.0) is RefuseCode.LIMIT  # 5 held in all
    assert book.reserve(key(5), "10.0.0.4", 2.0) == 102.0  # renewing still works when full


def test_reservations_lapse_and_are_released() -> None:
    book = RelayBook(LIMITS)
    book.reserve(key(1), "10.0.0.1", 0.0)
    book.reserve(key(2), "10.0.0.1", 0.0)
    assert book.live(key(1), 99.9)
    assert not book.live(key(1), 100.0)
    assert book.reserve(key(3), "10.0.0.1", 100.0) == 200.0  # the two lapsed at 100
    book.release(key(3), "10.0.0.9")  # another source cannot end it
    assert book.live(key(3), 150.0)
    book.release(key(3), "10.0.0.1")
    assert not book.live(key(3), 150.0)


def test_moving_source_counts_against_the_new_one() -> None:
    book = RelayBook(LIMITS)
    book.reserve(key(1), "10.0.0.1", 0.0)
    book.reserve(key(2), "10.0.0.1", 0.0)
    book.reserve(key(3), "10.0.0.2", 0.0)
    assert book.reserve(key(3), "10.0.0.1", 1.0) is RefuseCode.LIMIT
    assert book.reserve(key(1), "10.0.0.2", 1.0) == 101.0  # moved: 10.0.0.2 holds 2 now


def test_circuits() -> None:
    book = RelayBook(LIMITS)
    assert book.open_circuit(key(1), 0.0) is RefuseCode.NO_RESERVATION
    book.reserve(key(1), "10.0.0.1", 0.0)
    book.reserve(key(2), "10.0.0.2", 0.0)
    assert book.open_circuit(key(1), 1.0) is None
    assert book.open_circuit(key(1), 1.0) is None
    assert book.open_circuit(key(1), 1.0) is RefuseCode.LIMIT  # two per reservation
    assert book.open_circuit(key(2), 1.0) is None
    assert book.circuits == 3
    book.reserve(key(3), "10.0.0.3", 1.0)
    assert book.open_circuit(key(3), 1.0) is RefuseCode.LIMIT  # three in all
    book.close_circuit(key(1))
    assert book.open_circuit(key(3), 2.0) is None
    assert book.open_circuit(key(2), 100.0) is RefuseCode.NO_RESERVATION  # lapsed


def test_circuit_over_limits() -> None:
    book = RelayBook(LIMITS)
    assert not book.circuit_over(999, 10.0, 69.9)
    assert book.circuit_over(1000, 10.0, 11.0)
    assert book.circuit_over(0, 10.0, 70.0)
