"""A relay's admission rules (reach/relaylimits.py), with literal times."""

from __future__ import annotations

from dhtshare.reach.relaylimits import (
    CircuitSlot,
    IncomingGate,
    KeeperLimits,
    RelayBook,
    RelayLimits,
    Verdict,
    renew_after,
    source_network,
)
from dhtshare.transfer.swarm import KEEPALIVE_INTERVAL
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
    assert book.open_circuit(key(1), "10.1.0.1", 0.0) is RefuseCode.NO_RESERVATION
    book.reserve(key(1), "10.0.0.1", 0.0)
    book.reserve(key(2), "10.0.0.2", 0.0)
    first = book.open_circuit(key(1), "10.1.0.1", 1.0)
    assert first == CircuitSlot(key(1), "10.1.0.1", "10.0.0.1")
    assert isinstance(book.open_circuit(key(1), "10.1.0.2", 1.0), CircuitSlot)
    assert book.open_circuit(key(1), "10.1.0.3", 1.0) is RefuseCode.LIMIT  # two per reservation
    assert isinstance(book.open_circuit(key(2), "10.1.0.4", 1.0), CircuitSlot)
    assert book.circuits == 3
    book.reserve(key(3), "10.0.0.3", 1.0)
    assert book.open_circuit(key(3), "10.1.0.5", 1.0) is RefuseCode.LIMIT  # three in all
    assert isinstance(first, CircuitSlot)
    book.close_circuit(first)
    assert isinstance(book.open_circuit(key(3), "10.1.0.5", 2.0), CircuitSlot)
    assert book.open_circuit(key(2), "10.1.0.6", 100.0) is RefuseCode.NO_RESERVATION  # lapsed


def test_circuit_over_limits() -> None:
    book = RelayBook(LIMITS)
    assert not book.circuit_over(999, 10.0, 69.9)
    assert book.circuit_over(1000, 10.0, 11.0)
    assert book.circuit_over(0, 10.0, 70.0)


def test_reservations_per_network() -> None:
    book = RelayBook(RelayLimits(max_reservations_per_source=2, max_reservations_per_network=3))
    assert book.reserve(key(1), "10.0.0.1", 0.0) == 600.0
    assert book.reserve(key(2), "10.0.0.1", 0.0) == 600.0
    assert book.reserve(key(3), "10.0.0.2", 0.0) == 600.0
    assert book.reserve(key(4), "10.0.0.3", 0.0) is RefuseCode.LIMIT  # a 4th from 10.0.0/24
    assert book.reserve(key(4), "10.0.1.3", 0.0) == 600.0  # another /24
    assert book.reserve(key(3), "10.0.0.3", 1.0) == 601.0  # moving within the /24: no new one
    # IPv6 sources come as /64 networks; the quota counts their /48
    for n, net in ((5, "2001:db8:1:1::/64"), (6, "2001:db8:1:2::/64"), (7, "2001:db8:1:3::/64")):
        assert book.reserve(key(n), net, 0.0) == 600.0
    assert book.reserve(key(8), "2001:db8:1:4::/64", 0.0) is RefuseCode.LIMIT
    assert book.reserve(key(8), "2001:db8:2:4::/64", 0.0) == 600.0


def test_source_network() -> None:
    assert source_network("192.0.2.77") == "192.0.2.0/24"
    assert source_network("2001:db8:aa:bb::/64") == "2001:db8:aa::/48"
    assert source_network("not an address") == "not an address"


def test_circuits_per_downloader_source_and_per_holder() -> None:
    limits = RelayLimits(
        max_circuits_per_reservation=8,
        max_circuits_per_source=2,
        max_circuits_per_holder=3,
        max_circuits=64,
    )
    book = RelayBook(limits)
    for n in (1, 2):  # one holder, two keys
        book.reserve(key(n), "10.0.0.1", 0.0)
    book.reserve(key(3), "10.0.0.2", 0.0)
    d = "10.9.0.1"
    slots = [book.open_circuit(key(1), d, 1.0), book.open_circuit(key(3), d, 1.0)]
    assert all(isinstance(s, CircuitSlot) for s in slots)
    assert book.open_circuit(key(2), d, 1.0) is RefuseCode.LIMIT  # a third from one source
    assert isinstance(book.open_circuit(key(2), "10.9.0.2", 1.0), CircuitSlot)
    assert isinstance(book.open_circuit(key(2), "10.9.0.3", 1.0), CircuitSlot)
    # holder 10.0.0.1 has 3 circuits over its two keys now
    assert book.open_circuit(key(1), "10.9.0.4", 1.0) is RefuseCode.LIMIT
    assert isinstance(book.open_circuit(key(3), "10.9.0.4", 1.0), CircuitSlot)  # other holder
    first = slots[0]
    assert isinstance(first, CircuitSlot)
    book.close_circuit(first)  # frees the source's and the holder's count
    assert book.by_source[d] == 1
    assert isinstance(book.open_circuit(key(1), d, 1.0), CircuitSlot)


def test_circuit_deadline() -> None:
    book = RelayBook(
        RelayLimits(circuit_seconds=1800.0, circuit_idle=60.0, half_close_seconds=10.0)
    )
    assert book.circuit_deadline(0.0, 0.0, None) == (60.0, "idle")
    assert book.circuit_deadline(0.0, 1000.0, None) == (1060.0, "idle")
    assert book.circuit_deadline(0.0, 1790.0, None) == (1800.0, "limit")
    assert book.circuit_deadline(0.0, 500.0, 495.0) == (505.0, "half_closed")
    assert book.circuit_deadline(0.0, 500.0, 100.0) == (110.0, "half_closed")


def test_defaults_cut_idle_circuits_well_after_a_keepalive() -> None:
    limits = RelayLimits()
    assert limits.circuit_idle >= 2 * KEEPALIVE_INTERVAL
    assert limits.max_circuits_per_source < limits.max_circuits
    assert limits.max_circuits_per_holder < limits.max_circuits


def test_incoming_gate_rate_and_open_circuits() -> None:
    gate = IncomingGate(
        KeeperLimits(circuits_per_relay=3, incoming_burst=4, incoming_rate=1.0, max_strikes=5),
        now=0.0,
    )
    assert [gate.admit(0.0) for _ in range(3)] == [Verdict.OPEN] * 3
    assert gate.admit(0.0) is Verdict.IGNORE  # 3 open at once
    gate.done()
    assert gate.admit(0.0) is Verdict.OPEN  # the 4th token
    gate.done()
    assert gate.admit(0.0) is Verdict.IGNORE  # the bucket is empty
    assert gate.admit(0.5) is Verdict.IGNORE  # half a token
    assert gate.admit(1.5) is Verdict.OPEN  # one per second
    assert gate.ignored == 3


def test_incoming_gate_drops_a_relay_that_keeps_exceeding() -> None:
    gate = IncomingGate(KeeperLimits(incoming_burst=2, max_strikes=4), now=0.0)
    assert [gate.admit(0.0) for _ in range(2)] == [Verdict.OPEN] * 2
    gate.done()
    gate.done()
    assert [gate.admit(0.0) for _ in range(3)] == [Verdict.IGNORE] * 3
    # strikes fade at the rate: 3 s later they are gone, a fresh burst is allowed
    assert gate.admit(3.0) is Verdict.OPEN
    gate.done()
    assert [gate.admit(3.0) for _ in range(4)] == [Verdict.OPEN] + [Verdict.IGNORE] * 3
    assert gate.admit(3.0) is Verdict.DROP  # the 4th strike in a row


def test_renewal_is_never_faster_than_the_floor() -> None:
    limits = KeeperLimits()
    assert renew_after(600.0, limits) == 300.0
    assert renew_after(2.0, limits) == 60.0  # a relay naming a tiny ttl
    assert renew_after(0.0, limits) == 60.0
    assert renew_after(1.0, KeeperLimits(min_renew=0.0)) == 0.5
