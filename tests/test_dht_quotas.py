"""Per-sender storage quotas (issue #13, item 9): one address cannot fill a node or a key.

The network tests run real nodes, each on its own loopback address; the attacker is a
real DHT node on one more address that sends ``store`` RPCs under many node ids.
The unit and property tests drive ``ValidatingStorage`` with literal times.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from conftest import START
from hypothesis import given, settings
from hypothesis import strategies as st

from dhtshare.dht import DhtNode, ValidatingStorage
from dhtshare.dht.protocol import packb
from dhtshare.dht.sources import UNVALIDATED
from dhtshare.dht.storage import DEFAULT_REPLY_BUDGET, Quotas
from dhtshare.groups.secrets import Invite, Space, seal
from dhtshare.groups.service import GroupService
from dhtshare.identity import Identity
from dhtshare.records import (
    CLOCK_SKEW,
    JoinRequest,
    Kind,
    SignedRecord,
    key_for,
    sign_record,
)
from dhtshare.sim import Network

pytestmark = pytest.mark.timeout(90)

NOW = START
ATTACKER_HOST = "127.66.0.1"
HONEST_HOST = "127.77.0.1"
STORING = 6
NODE_BYTES = 1024 * 1024  # storing nodes' cap in the flood test (a 16 MiB one needs 33,000 floods)
FLOOD = 2300
IN_FLIGHT = 32


def join_request(gid: bytes, now: float, *, ahead: float = 0, text: int = 280) -> SignedRecord:
    """A valid join request (about 500 bytes) signed by a fresh key."""
    body = JoinRequest(gid, "n" * 64, "m" * text)
    return sign_record(Identity.generate(), body, seq=1, now=now + ahead, ttl=3600)


def seal_request(space: Space, gid: bytes, owner: bytes, ahead: float) -> SignedRecord:
    """A throw-away key's join request sealed into ``space`` (and to ``owner``)."""
    now = time.time() + ahead
    inner = join_request(gid, now - ahead, ahead=ahead)
    return seal(space, inner, author=Identity.generate(), seq=1, now=now, to_owner=owner)


async def flood(
    attacker: DhtNode, targets: Sequence[DhtNode], records: Sequence[SignedRecord]
) -> int:
    """Store every record at every target from one ip:port under 64 node ids; how many kept."""
    proto = attacker.protocol
    assert proto is not None
    ids = [os.urandom(20) for _ in range(64)]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int, rec: SignedRecord, target: DhtNode) -> bool:
        async with gate:
            ok, kept = await proto.store(target.address, ids[i % 64], rec.dht_key, rec.encode())
        return bool(ok and kept is True)

    jobs = [one(i, r, t) for i, r in enumerate(records) for t in targets]
    return sum(await asyncio.gather(*jobs))


@pytest.fixture
async def attacker() -> AsyncIterator[DhtNode]:
    """A DHT node on its own address that stores nothing (so no put ever counts it)."""
    node = DhtNode(storage=ValidatingStorage(max_bytes=0))
    await node.listen(0, ATTACKER_HOST)
    try:
        yield node
    finally:
        await node.aclose()


async def start_storing(n: int, **storage_kw: int) -> Network:
    nodes = [DhtNode(storage=ValidatingStorage(**storage_kw)) for _ in range(n)]
    net = Network(nodes)
    await net.listen_all()
    await net.join_all()
    return net


# ---- the regression tests: real nodes on loopback ----------------------------------------


async def test_store_flood_from_one_address_leaves_room_for_an_honest_share(
    attacker: DhtNode,
) -> None:
    net = await start_storing(STORING, max_bytes=NODE_BYTES)
    honest = DhtNode()
    try:
        await honest.listen(0, HONEST_HOST)
        await honest.bootstrap([net.bootstrap_address])
        records = [join_request(os.urandom(32), time.time()) for _ in range(FLOOD)]
        assert sum(len(r.encode()) for r in records) > NODE_BYTES  # enough to fill a node
        async with asyncio.timeout(60):
            await flood(attacker, net.nodes, records)
        # what a user sees: sharing still works
        mine = join_request(os.urandom(32), time.time())
        assert await honest.put(mine) >= 1
        for node in net.nodes:
            assert node.storage.total_bytes <= NODE_BYTES // 4  # the flood took its shares only
            held, _prefix = node.storage.usage(ATTACKER_HOST)
            assert held.bytes <= node.storage.address_cap.bytes
            assert held.records <= node.storage.address_cap.records
            assert node.storage.stats["refuse.address_quota"] > 0
    finally:
        await honest.aclose()
        await net.stop_all()


async def test_join_request_flood_from_one_address_does_not_push_out_a_genuine_request(
    attacker: DhtNode,
) -> None:
    owner, alice = Identity.generate("owner"), Identity.generate("alice")
    async with Network.start(8) as net:
        so = GroupService(net.nodes[1], owner)
        sa = GroupService(net.nodes[2], alice)
        gid = await so.create("climbers")
        invite = Invite.parse(so.state.keys[gid].invite)
        await sa.request_join(invite.token, "let me in")
        key = invite.space.dht_key(key_for(Kind.JOIN_REQUEST, gid))  # the sealed inbox key
        # without the invite, a throw-away key cannot write under the inbox key at all
        outsider = seal_request(Space(os.urandom(32), "invite"), gid, owner.public, 0)
        for node in net.nodes:
            assert node.storage.add(key, outsider.encode(), time.time()) == "wrong_key"
        # an invite holder's 64 throw-away requests, sealed to the owner, dated as far ahead
        # as allowed, at every node
        junk = [seal_request(invite.space, gid, owner.public, CLOCK_SKEW - 60) for _ in range(64)]
        assert {r.dht_key for r in junk} == {key}
        async with asyncio.timeout(30):
            await flood(attacker, net.nodes, junk)
        assert any(n.storage.count(key) > 1 for n in net.nodes)  # the flood did land
        # what the owner sees: alice's request is there and can be accepted
        pending = await so.requests(gid)
        assert alice.public in {p.requester for p in pending}
        view = await so.accept(gid, alice.public)
        assert alice.public in {m.key for m in view.members}
        for node in net.nodes:
            assert node.storage.count(key) <= node.storage.max_per_key


async def test_a_store_from_an_address_not_validated_spends_only_the_shared_quota() -> None:
    """A datagram's source is a claim: until it answers us, it is charged to one shared pool."""
    storing, sender = DhtNode(), DhtNode()
    await storing.listen(0, "127.90.0.1")
    await sender.listen(0, "127.91.0.1")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw.bind(("127.92.0.1", 0))
        raw.setblocking(False)
        rec = join_request(os.urandom(32), time.time())
        body = packb(["store", [os.urandom(20), rec.dht_key, rec.encode()]])
        raw.sendto(b"\x00" + os.urandom(20) + body, storing.address)
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().sock_recv(raw, 9000)  # the store's reply
        assert storing.storage.count(rec.dht_key) == 1
        assert storing.storage.usage("127.92.0.1")[0].records == 0
        assert storing.storage.usage(UNVALIDATED)[0].records == 1
        proto = storing.protocol
        assert proto is not None
        answered, _ = await proto.ping(sender.address, storing.node.id)  # validates sender
        assert answered
        other = join_request(os.urandom(32), time.time())
        assert await sender.protocol.store(
            storing.address, sender.node.id, other.dht_key, other.encode()
        ) == (True, True)  # type: ignore[union-attr]
        assert storing.storage.usage("127.91.0.1")[0].records == 1
    finally:
        raw.close()
        await sender.aclose()
        await storing.aclose()


# ---- unit tests ----------------------------------------------------------------------------


def test_one_sender_may_fill_free_slots_but_is_held_to_its_quota_once_the_key_is_full() -> None:
    """A member sharing many files in one group fills the key's free room (no cap at half
    while nobody else needs it); once the key is full its prefix gets no more than its
    quota, and others still fit by taking its places."""
    store = ValidatingStorage(max_per_key=8)  # key_cap 4
    gid = bytes(32)
    key = key_for(Kind.JOIN_REQUEST, gid)
    for _ in range(8):
        r = join_request(gid, NOW)
        assert store.add(key, r.encode(), NOW, source="8.8.8.8") is None
    r = join_request(gid, NOW)
    assert store.add(key, r.encode(), NOW, source="8.8.8.9") == "key_quota"  # same /24, full
    assert store.add(key, r.encode(), NOW, source="9.9.9.9") is None  # takes 8.8.8.8's place
    assert store.count(key) == 8
    assert store.stats["refuse.key_quota"] == 1


def test_full_key_evicts_from_the_biggest_sender_not_the_newcomer() -> None:
    store = ValidatingStorage(max_per_key=8)
    gid = bytes(32)
    key = key_for(Kind.JOIN_REQUEST, gid)
    genuine = join_request(gid, NOW)
    assert store.add(key, genuine.encode(), NOW, source="1.1.1.1") is None
    flood = [join_request(gid, NOW + 1 + i) for i in range(3)]
    for r in flood:
        assert store.add(key, r.encode(), NOW + 10, source="8.8.8.8") is None
    others = [join_request(gid, NOW) for _ in range(4)]
    for i, r in enumerate(others):
        assert store.add(key, r.encode(), NOW + 10, source=f"{20 + i}.0.0.1") is None
    assert store.count(key) == 8
    late = join_request(gid, NOW)
    assert store.add(key, late.encode(), NOW + 20, source="30.0.0.1") is None
    held = set(store.records(key, NOW + 20))
    assert genuine in held and late in held
    assert len(held & set(flood)) == 2  # the biggest sender lost one
    assert store.stats["evict.key_full"] == 1


def test_own_records_are_never_evicted_and_never_charged() -> None:
    store = ValidatingStorage(max_per_key=4)
    gid = bytes(32)
    key = key_for(Kind.JOIN_REQUEST, gid)
    mine = join_request(gid, NOW)
    assert store.add(key, mine.encode(), NOW, own=True, source="8.8.8.8") is None
    assert store.usage("8.8.8.8")[0].records == 0
    for i in range(10):
        store.add(key, join_request(gid, NOW).encode(), NOW + 1, source=f"{40 + i}.0.0.1")
    assert mine in store.records(key, NOW + 2)


def test_replaying_someone_elses_record_does_not_move_its_charge() -> None:
    store = ValidatingStorage()
    rec = join_request(bytes(32), NOW)
    assert store.add(rec.dht_key, rec.encode(), NOW, source="1.1.1.1") is None
    assert store.add(rec.dht_key, rec.encode(), NOW + 5, source="8.8.8.8") is None  # refresh
    assert store.usage("1.1.1.1")[0].records == 1
    assert store.usage("8.8.8.8")[0].records == 0


def test_quota_refusal_comes_before_the_signature_check() -> None:
    store = ValidatingStorage(max_bytes=8 * 1024)  # address cap 512 bytes: one record
    first, second = (join_request(os.urandom(32), NOW, text=200) for _ in range(2))
    assert store.add(first.dht_key, first.encode(), NOW, source="8.8.8.8") is None
    forged = bytearray(second.encode())
    forged[-1] ^= 1
    assert store.add(second.dht_key, bytes(forged), NOW, source="8.8.8.8") == "address_quota"
    assert store.add(second.dht_key, bytes(forged), NOW, source="9.9.9.9") == "bad_signature"


def test_prefix_quota_spans_addresses_but_a_lan_address_is_its_own_prefix() -> None:
    store = ValidatingStorage(max_bytes=64 * 1024)  # address 4 KiB, prefix 8 KiB
    cap = store.prefix_cap.bytes
    sent = 0
    refused = None
    for i in range(40):
        r = join_request(os.urandom(32), NOW)
        refused = store.add(r.dht_key, r.encode(), NOW, source=f"8.8.8.{i}")
        if refused:
            break
        sent += len(r.encode())
    assert refused == "prefix_quota" and sent <= cap
    for i in range(20):  # 10.0.0.x is private: each address its own prefix
        r = join_request(os.urandom(32), NOW)
        assert store.add(r.dht_key, r.encode(), NOW, source=f"10.0.0.{i}") is None


def test_reply_takes_senders_in_turn() -> None:
    store = ValidatingStorage()
    gid = bytes(32)
    key = key_for(Kind.JOIN_REQUEST, gid)
    genuine = join_request(gid, NOW)
    store.add(key, genuine.encode(), NOW, source="1.1.1.1")
    for _ in range(32):  # newer, and more than one reply holds
        r = join_request(gid, NOW, ahead=500)
        assert store.add(key, r.encode(), NOW, source="8.8.8.8") is None
    chosen = store.reply_records(key, DEFAULT_REPLY_BUDGET, NOW)
    assert len(chosen) < 33
    assert genuine.encode() in chosen


# ---- property: the bookkeeping ---------------------------------------------------------------

_GIDS = [bytes([i]) * 32 for i in range(3)]
_SIGNERS = [Identity.generate() for _ in range(10)]
_OWN_SIGNERS = [Identity.generate() for _ in range(2)]
_HOSTS = ["8.8.8.1", "8.8.8.2", "8.8.9.1", "10.0.0.1", "2a00:1450::1", "2a00:1450::2"]


def _pool(signers: list[Identity]) -> list[SignedRecord]:
    return [
        sign_record(s, JoinRequest(g, "n", "m" * (40 * seq)), seq=seq, now=NOW, ttl=400 + 100 * seq)
        for g in _GIDS
        for s in signers
        for seq in (1, 2)
    ]


_NETWORK_RECORDS = _pool(_SIGNERS)
_OWN_RECORDS = _pool(_OWN_SIGNERS)

_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("offer"),
            st.integers(0, len(_NETWORK_RECORDS) - 1),
            st.sampled_from(_HOSTS),
        ),
        st.tuples(st.just("own"), st.integers(0, len(_OWN_RECORDS) - 1), st.just("")),
        st.tuples(st.just("wait"), st.integers(1, 40), st.just("")),
    ),
    max_size=80,
)


def _check_invariants(store: ValidatingStorage, now: float) -> None:
    live = [(k, e) for k, slots in store._data.items() for e in slots.values()]
    assert store.total_bytes == sum(len(e.raw) for _k, e in live) <= store.max_bytes
    assert store.count() == len(live) <= store.max_records
    by_address: dict[str, list[int]] = {}
    by_prefix: dict[str, list[int]] = {}
    for slots in store._data.values():
        assert 0 < len(slots) <= store.max_per_key
        for e in slots.values():
            if e.source is None or e.own:
                continue
            for book, name in ((by_address, e.source.address), (by_prefix, e.source.prefix)):
                book.setdefault(name, [0, 0])
                book[name][0] += len(e.raw)
                book[name][1] += 1
    for book, ledger, cap in (
        (by_address, store._by_address, store.address_cap),
        (by_prefix, store._by_prefix, store.prefix_cap),
    ):
        assert len(ledger) == len(book)  # nothing is remembered for a sender holding nothing
        for name, (nbytes, records) in book.items():
            assert (ledger[name].bytes, ledger[name].records) == (nbytes, records)
            assert nbytes <= cap.bytes and records <= cap.records
    assert store.senders <= 2 * len(live)


@settings(max_examples=150, deadline=None)
@given(_steps)
def test_quota_bookkeeping_holds_for_any_sequence_of_offers(
    steps: list[tuple[str, int, str]],
) -> None:
    store = ValidatingStorage(
        max_per_key=6,
        max_bytes=4000,
        max_records=16,
        hold_for=150,
        quotas=Quotas(address=1 / 4, prefix=3 / 8, key=1 / 2),
    )
    now = NOW
    own_kept: dict[bytes, SignedRecord] = {}  # slot -> the own record we must still hold
    for op, arg, host in steps:
        if op == "wait":
            now += arg
        elif op == "offer":
            rec = _NETWORK_RECORDS[arg]
            store.add(rec.dht_key, rec.encode(), now, source=host)
        else:
            rec = _OWN_RECORDS[arg]
            if store.add(rec.dht_key, rec.encode(), now, own=True) is None:
                own_kept[rec.slot] = rec
        _check_invariants(store, now)
        for slot, rec in list(own_kept.items()):
            if rec.expires <= now:
                del own_kept[slot]
                continue
            held = store.records(rec.dht_key, now)
            assert any(h.slot == slot for h in held), "an own record was evicted"
