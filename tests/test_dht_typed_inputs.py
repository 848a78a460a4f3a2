"""Pure parts of the DHT boundary (issue #13, items 1 and 6): contact parsing and the
push filter, checked against the rule they implement."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.hostile import HOSTILE_HOSTS

from dhtshare.dht.closeness import PushFilter
from dhtshare.dht.contacts import parse_contact, parse_host


def _brute_wants(me: bytes, contacts: list[bytes], k: int, new: bytes, key: bytes) -> bool:
    """The rule as kademlia states it, over the k nearest contacts found by sorting."""
    target = int.from_bytes(key, "big")
    distances = sorted(int.from_bytes(c, "big") ^ target for c in contacts)
    if distances and int.from_bytes(me, "big") ^ target >= distances[0]:
        return False
    theirs = int.from_bytes(new, "big") ^ target
    return sum(1 for d in distances if d < theirs) < k


def _near(base: bytes) -> st.SearchStrategy[bytes]:
    """Ids sharing a random-length prefix with ``base`` (as a real table's contacts do)."""

    def build(shared: int, rest: bytes) -> bytes:
        keep = ((1 << 160) - 1) ^ ((1 << (160 - shared)) - 1)
        mixed = (int.from_bytes(base, "big") & keep) | (int.from_bytes(rest, "big") & ~keep)
        return (mixed & ((1 << 160) - 1)).to_bytes(20, "big")

    return st.builds(build, st.integers(0, 40), st.binary(min_size=20, max_size=20))


ME = bytes.fromhex("5a" * 20)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_near(ME), max_size=60, unique=True),
    st.sampled_from([1, 3, 20]),
    st.lists(st.tuples(_near(ME), _near(ME)), min_size=1, max_size=20),
)
def test_push_filter_matches_the_k_nearest_rule(
    contacts: list[bytes], k: int, probes: list[tuple[bytes, bytes]]
) -> None:
    contacts = [c for c in contacts if c != ME]
    wanted = PushFilter(ME, contacts, k)
    for new, key in probes:
        if new in contacts or new == ME:
            continue
        assert wanted.wants(new, key) == _brute_wants(ME, contacts, k, new, key)


@pytest.mark.parametrize("host", [*HOSTILE_HOSTS, "1.2.3", "::ffff:1.2.3.4x", 7, None])
def test_hosts_that_are_not_canonical_unicast_addresses_are_refused(host: object) -> None:
    if host == "::1":
        assert parse_host(host) == "::1"  # valid; refused later as the other family
        return
    assert parse_host(host) is None
    assert parse_contact([bytes(20), host, 4000]) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.1", "10.0.0.7", "2001:db8::1"])
def test_unicast_and_loopback_addresses_are_contacts(host: str) -> None:
    assert parse_contact([bytes(20), host, 4000]) == (bytes(20), host, 4000)
    assert parse_contact([bytes(20), host, 0]) is None
    assert parse_contact([bytes(19), host, 4000]) is None
    assert parse_contact([bytes(20), host, True]) is None
