"""ValidatingStorage: pure, with literal times."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import (
    START,
    FakeClock,
    bodies_of_every_kind,
    inner_bodies,
    peer_record,
    sealed_record,
)

from dhtshare.dht.storage import DEFAULT_REPLY_BUDGET, ValidatingStorage
from dhtshare.identity import Identity
from dhtshare.records import (
    INNER_KINDS,
    MAX_RECORD_SIZE,
    MAX_TTL,
    JoinRequest,
    Kind,
    SignedRecord,
    key_for,
    sign_record,
)

NOW = START


@pytest.fixture
def store() -> ValidatingStorage:
    return ValidatingStorage(clock=FakeClock(), max_per_key=4, max_bytes=64 * 1024, hold_for=100)


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


def forge(rec: SignedRecord) -> bytes:
    raw = bytearray(rec.encode())
    raw[-1] ^= 0x01
    return bytes(raw)


def test_accepts_every_kind_but_the_inner_ones(store: ValidatingStorage, alice: Identity) -> None:
    for body in bodies_of_every_kind(alice, NOW):
        rec = sign_record(alice, body, seq=1, now=NOW, ttl=600)
        assert store.add(rec.dht_key, rec.encode(), NOW) is None, rec.kind
        assert store.records(rec.dht_key, NOW + 1) == [rec]
    sealed = sealed_record(alice, NOW)
    assert sealed.kind == Kind.SEALED
    assert store.add(sealed.dht_key, sealed.encode(), NOW) is None
    assert store.records(sealed.dht_key, NOW + 1) == [sealed]
    for body in inner_bodies(alice, NOW):  # a private group's secrets never go in the clear
        rec = sign_record(alice, body, seq=1, now=NOW, ttl=600)
        assert rec.kind in INNER_KINDS
        assert store.add(rec.dht_key, rec.encode(), NOW) == "inner_kind", rec.kind
        assert store.records(rec.dht_key, NOW + 1) == []
    assert store.stats["store.accepted"] == len(Kind) - len(INNER_KINDS)
    assert store.stats["refuse.inner_kind"] == len(INNER_KINDS)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda r: (r.dht_key, forge(r)), "bad_signature"),
        (lambda r: (bytes(20), r.encode()), "wrong_key"),
        (lambda r: (r.dht_key, r.encode()[:-3]), "malformed"),
        (lambda r: (r.dht_key, b"x" * (MAX_RECORD_SIZE + 1)), "oversize"),
        (lambda r: (r.dht_key, "text"), "malformed"),
    ],
)
def test_refuses_bad_values(store: ValidatingStorage, alice: Identity, make, reason) -> None:  # type: ignore[no-untyped-def]
    key, raw = make(peer_record(alice, NOW))
    assert store.add(key, raw, NOW) == reason
    assert store.count() == 0
    assert store.stats[f"refuse.{reason}"] == 1


def test_refuses_expired_and_too_far_ahead(store: ValidatingStorage, alice: Identity) -> None:
    old = peer_record(alice, NOW - 700, ttl=600)
    assert store.add(old.dht_key, old.encode(), NOW) == "expired"
    future = peer_record(alice, NOW + 3600, ttl=60)
    assert store.add(future.dht_key, future.encode(), NOW) == "too_far_ahead"
    long = dataclasses.replace(peer_record(alice, NOW), expires=int(NOW + MAX_TTL * 2))
    assert store.add(long.dht_key, long.encode(), NOW) in {"bad_signature", "too_far_ahead"}
    assert store.count() == 0


def test_higher_seq_replaces_and_stale_is_refused(
    store: ValidatingStorage, alice: Identity
) -> None:
    v1, v2 = peer_record(alice, NOW, seq=1), peer_record(alice, NOW, seq=2)
    assert store.add(v1.dht_key, v1.encode(), NOW) is None
    assert store.add(v2.dht_key, v2.encode(), NOW) is None
    assert store.add(v1.dht_key, v1.encode(), NOW) == "stale"
    assert store.records(v1.dht_key, NOW) == [v2]
    assert store.total_bytes == len(v2.encode())


def test_same_record_again_refreshes_hold(store: ValidatingStorage, alice: Identity) -> None:
    rec = peer_record(alice, NOW, ttl=600)
    store.add(rec.dht_key, rec.encode(), NOW)
    store.add(rec.dht_key, rec.encode(), NOW + 90)
    assert store.records(rec.dht_key, NOW + 150) == [rec]
    assert store.records(rec.dht_key, NOW + 191) == []
    assert store.stats["store.refreshed"] == 1


def test_many_signers_merge_under_one_key(store: ValidatingStorage) -> None:
    gid = bytes(32)
    recs = [
        sign_record(Identity.generate(), JoinRequest(gid, f"m{i}"), seq=1, now=NOW + i, ttl=600)
        for i in range(3)
    ]
    for rec in recs:
        assert store.add(rec.dht_key, rec.encode(), NOW + 3) is None
    assert store.records(recs[0].dht_key, NOW + 3) == recs[::-1]


def test_key_cap_evicts_soonest_expiring(store: ValidatingStorage) -> None:
    gid = bytes(32)
    recs = [
        sign_record(Identity.generate(), JoinRequest(gid, "m"), seq=1, now=NOW, ttl=10 + i)
        for i in range(6)
    ]
    key = key_for(Kind.JOIN_REQUEST, gid)
    for rec in recs[1:]:
        assert store.add(key, rec.encode(), NOW) is None
    assert store.count(key) == 4
    assert store.add(key, recs[0].encode(), NOW) == "key_full"  # would go soonest itself
    assert set(store.records(key, NOW)) == set(recs[2:])
    assert store.stats["evict.key_full"] == 1


def test_node_byte_cap_refuses_without_evicting(alice: Identity) -> None:
    first = peer_record(alice, NOW)
    store = ValidatingStorage(max_bytes=len(first.encode()) + 10)
    assert store.add(first.dht_key, first.encode(), NOW) is None
    other = peer_record(Identity.generate(), NOW)
    assert store.add(other.dht_key, other.encode(), NOW) == "node_full"
    assert store.records(first.dht_key, NOW) == [first]
    assert store.total_bytes == len(first.encode())


def test_expiry_removes_records(store: ValidatingStorage, alice: Identity) -> None:
    rec = peer_record(alice, NOW, ttl=50)
    store.add(rec.dht_key, rec.encode(), NOW)
    assert store.expire(NOW + 49) == 0
    assert store.expire(NOW + 50) == 1
    assert store.count() == 0
    assert store.total_bytes == 0


def test_foreign_records_held_for_hold_for_own_until_expiry(
    store: ValidatingStorage, alice: Identity
) -> None:
    mine, theirs = peer_record(alice, NOW), peer_record(Identity.generate(), NOW)
    store.add(mine.dht_key, mine.encode(), NOW, own=True)
    store.add(theirs.dht_key, theirs.encode(), NOW)
    assert store.records(theirs.dht_key, NOW + 101) == []
    assert store.records(mine.dht_key, NOW + 101) == [mine]


def test_iter_older_than_yields_only_own_live_records(alice: Identity) -> None:
    clock = FakeClock()
    store = ValidatingStorage(clock=clock)
    mine, theirs = peer_record(alice, NOW, ttl=600), peer_record(Identity.generate(), NOW)
    store.add(mine.dht_key, mine.encode(), NOW, own=True)
    store.add(theirs.dht_key, theirs.encode(), NOW)
    clock.advance(500)
    assert store.iter_older_than(400) == [(mine.dht_key, mine.encode())]
    clock.advance(200)
    assert store.iter_older_than(400) == []


def test_kademlia_interface(alice: Identity) -> None:
    clock = FakeClock()
    store = ValidatingStorage(clock=clock)
    rec = peer_record(alice, NOW)
    store[rec.dht_key] = rec.encode()
    store[rec.dht_key] = b"garbage"
    assert store[rec.dht_key] == [rec.encode()]
    assert store.get(bytes(20)) is None
    assert list(store) == [(rec.dht_key, rec.encode())]
    with pytest.raises(KeyError):
        store[bytes(20)]


def test_reply_records_fit_the_budget() -> None:
    store = ValidatingStorage(max_per_key=64)
    gid = bytes(32)
    for i in range(40):
        body = JoinRequest(gid, "n" * 60, "m" * 280)
        rec = sign_record(Identity.generate(), body, seq=1, now=NOW + i, ttl=600)
        store.add(rec.dht_key, rec.encode(), NOW + 40)
    key = key_for(Kind.JOIN_REQUEST, gid)
    chosen = store.reply_records(key, DEFAULT_REPLY_BUDGET, NOW + 40)
    assert 0 < len(chosen) < 40
    assert sum(len(r) + 3 for r in chosen) <= DEFAULT_REPLY_BUDGET
    newest = store.records(key, NOW + 40)[: len(chosen)]
    assert chosen == [r.encode() for r in newest]
