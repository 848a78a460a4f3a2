"""Routing-table diversity (issue #13, item 13): one address cannot fill a routing table.

The regression tests run real nodes, each on its own loopback address; the attacker
is a real DHT node that pings the victim under hundreds of node ids from one ip:port.
The unit and property tests drive the table with literal contacts at global addresses
(loopback and private addresses are each their own prefix, so prefix limits need
global ones).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from dhtshare.dht import DhtNode
from dhtshare.dht.routing import (
    MAX_PER_ADDRESS,
    MAX_PER_PREFIX,
    MAX_PER_PREFIX_IN_BUCKET,
    DiverseRoutingTable,
)
from dhtshare.dht.server import _Candidates
from dhtshare.dht.sources import source_of
from dhtshare.identity import Identity
from dhtshare.records import PeerInfo, sign_record
from dhtshare.sim import Network

pytestmark = pytest.mark.timeout(90)

ATTACKER_HOST = "127.88.0.1"
IN_FLIGHT = 32


def id_at(own: bytes, shared: int) -> bytes:
    """A random id sharing exactly ``shared`` leading bits with ``own``."""
    bits = len(own) * 8
    flip = bits - 1 - shared
    prefix = ((int.from_bytes(own, "big") >> flip) ^ 1) << flip
    rest = int.from_bytes(os.urandom(len(own)), "big") & ((1 << flip) - 1)
    return (prefix | rest).to_bytes(len(own), "big")


def attack_ids(victim: bytes, target: bytes) -> list[bytes]:
    """20 ids at each of the 32 distances nearest the victim, and 40 right next to ``target``."""
    near_victim = [id_at(victim, d) for d in range(32) for _ in range(20)]
    return near_victim + [id_at(target, 150 + i % 8) for i in range(40)]


async def ping_as(attacker: DhtNode, victim: DhtNode, ids: Sequence[bytes]) -> None:
    """Ping ``victim`` once under each id, all from the attacker's one ip:port."""
    proto = attacker.protocol
    assert proto is not None
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(node_id: bytes) -> None:
        async with gate:
            await proto.ping(victim.address, node_id)

    await asyncio.gather(*(one(i) for i in ids))


def at(nodes: Sequence[Node], host: str, port: int | None = None) -> int:
    return sum(1 for n in nodes if n.ip == host and (port is None or n.port == port))


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    async with Network.start(12) as network:
        yield network


# ---- the regression tests: real nodes on loopback ----------------------------------------


async def test_many_ids_from_one_address_take_one_contact_and_none_of_the_nearest(
    net: Network,
) -> None:
    victim, target = net.nodes[5], os.urandom(20)
    attacker = DhtNode()
    await attacker.listen(0, ATTACKER_HOST)
    try:
        ids = attack_ids(victim.node.id, target)
        async with asyncio.timeout(60):
            await ping_as(attacker, victim, ids)
        port = attacker.address[1]
        contacts = victim.contacts()
        assert at(contacts, ATTACKER_HOST, port) <= 1, (
            f"{at(contacts, ATTACKER_HOST)} of {len(contacts)}"
        )
        proto = victim.protocol
        assert proto is not None
        nearest = proto.nearest(target)
        assert at(nearest, ATTACKER_HOST) <= 1
        assert len(nearest) >= len(net.nodes) - 2  # the honest nodes are all still there
        # and the DHT still works for the victim
        rec = sign_record(Identity.generate(), PeerInfo(), seq=1, now=victim.clock(), ttl=600)
        assert await net.nodes[1].put(rec) >= 1
        assert rec in await victim.get(rec.dht_key)
    finally:
        await attacker.aclose()


async def test_many_ports_on_one_address_take_a_few_contacts(net: Network) -> None:
    victim = net.nodes[5]
    attackers = [DhtNode() for _ in range(6)]
    try:
        for a in attackers:
            await a.listen(0, ATTACKER_HOST)
        async with asyncio.timeout(60):
            for a in attackers:
                await ping_as(a, victim, [id_at(victim.node.id, d) for d in range(16)])
        held = at(victim.contacts(), ATTACKER_HOST)
        assert held <= 3, f"{held} contacts at one address"
        assert held <= MAX_PER_ADDRESS
    finally:
        await asyncio.gather(*(a.aclose() for a in attackers))


# ---- unit tests of the table --------------------------------------------------------------


class _Done:
    """What ``asyncio.ensure_future`` passes through unchanged (a finished ping)."""

    _asyncio_future_blocking = False


class StubProtocol:
    """Counts the pings kademlia's table sends to a full bucket's head."""

    def __init__(self) -> None:
        self.pings = 0

    def call_ping(self, node: Node) -> _Done:
        self.pings += 1
        return _Done()


OWN = bytes(20)


def table(ksize: int = 20):  # type: ignore[no-untyped-def]
    return DiverseRoutingTable(StubProtocol(), ksize, Node(OWN))


def contacts(t) -> list[Node]:  # type: ignore[no-untyped-def]
    return [n for b in t.buckets for n in b.nodes.values()]


def grown_table():  # type: ignore[no-untyped-def]
    """A table split down to depth 9, 10 honest contacts per bucket (room in each)."""
    t = table()
    for depth in range(10):
        for i in range(10):
            t.add_contact(Node(id_at(OWN, depth), f"{20 + depth}.{i}.0.1", 4000))
    assert len(t.buckets) >= 9 and len(contacts(t)) == 100
    return t


def test_a_second_id_at_an_endpoint_is_not_added_until_the_first_is_gone() -> None:
    t = table()
    first, second = Node(id_at(OWN, 0), "8.8.8.8", 1000), Node(id_at(OWN, 1), "8.8.8.8", 1000)
    t.add_contact(first)
    t.add_contact(second)
    assert [n.id for n in contacts(t)] == [first.id]
    moved = Node(first.id, "9.9.9.9", 1000)  # a known id from elsewhere keeps its address
    t.add_contact(moved)
    assert [(n.id, n.ip) for n in contacts(t)] == [(first.id, "8.8.8.8")]
    t.remove_contact(first)
    t.add_contact(second)
    assert [n.id for n in contacts(t)] == [second.id]


def test_limits_per_address_per_prefix_in_a_bucket_and_in_the_table() -> None:
    t = grown_table()
    for depth in range(9):  # one address, many ports, every bucket
        for port in range(5):
            t.add_contact(Node(id_at(OWN, depth), "8.8.8.8", 2000 + port))
    assert at(contacts(t), "8.8.8.8") == MAX_PER_ADDRESS
    t = grown_table()
    for i in range(6):  # one /24, many addresses, one bucket
        t.add_contact(Node(id_at(OWN, 0), f"8.8.8.{i + 1}", 2000))
    assert sum(1 for n in contacts(t) if n.ip.startswith("8.8.8.")) == MAX_PER_PREFIX_IN_BUCKET
    t = grown_table()
    for depth in range(9):  # one /24, many addresses, every bucket
        for i in range(4):
            t.add_contact(Node(id_at(OWN, depth), f"8.8.8.{10 * depth + i + 1}", 2000))
    assert sum(1 for n in contacts(t) if n.ip.startswith("8.8.8.")) == MAX_PER_PREFIX


def test_ipv6_counts_by_48_and_lan_addresses_by_address() -> None:
    t = table()
    for i in range(5):
        t.add_contact(Node(id_at(OWN, 0), f"2a00:1450:4001:{i:x}::1", 2000))
        t.add_contact(Node(id_at(OWN, 0), f"192.168.1.{i + 1}", 2000))
    got = contacts(t)
    assert sum(1 for n in got if n.ip.startswith("2a00:")) == MAX_PER_PREFIX_IN_BUCKET
    assert sum(1 for n in got if n.ip.startswith("192.168.1.")) == 5


def test_a_replacement_is_promoted_only_within_the_limits() -> None:
    t = table(ksize=2)
    # two contacts in the far half, sharing 5 bits (depth 5: kademlia pings, never splits)
    a = Node(b"\xf8" + bytes(19), "1.1.1.1", 1)
    b = Node(b"\xfc" + bytes(19), "2.2.2.2", 1)
    near = Node(id_at(OWN, 100), "3.3.3.3", 1)
    for n in (near, a, b):
        t.add_contact(n)
    waiting = Node(b"\xfa" + bytes(19), "9.9.9.9", 1)
    t.add_contact(waiting)  # the far bucket is full: it waits in the cache
    assert waiting.id not in {n.id for n in contacts(t)}
    for port, depth in zip(range(2, 5), (10, 30, 50), strict=True):  # 9.9.9.9 reaches its limit
        t.add_contact(Node(id_at(OWN, depth), "9.9.9.9", port))
    assert at(contacts(t), "9.9.9.9") == MAX_PER_ADDRESS
    t.remove_contact(a)
    assert at(contacts(t), "9.9.9.9") == MAX_PER_ADDRESS  # not promoted past the limit
    assert waiting.id not in {n.id for n in contacts(t)}


def test_lookup_candidates_take_one_id_per_endpoint() -> None:
    target = os.urandom(20)
    cands = _Candidates(Node(target), 20)
    cands.push(Node(id_at(target, 150 + i % 8), ATTACKER_HOST, 5000) for i in range(64))
    cands.push(Node(id_at(target, i), f"127.1.{i}.1", 5000) for i in range(30))
    nearest = cands.nearest()
    assert len(nearest) == 20
    assert at(nearest, ATTACKER_HOST) == 1


# ---- property: any sequence of contacts ----------------------------------------------------

_HOSTS = ["8.8.8.1", "8.8.8.2", "8.8.9.1", "10.0.0.1", "2a00:1450::1", "2a00:1450::2", "9.9.9.9"]
_contact = st.tuples(
    st.integers(0, 159), st.sampled_from(_HOSTS), st.integers(1, 3), st.integers(0, 3)
)
_ops = st.lists(st.tuples(st.booleans(), _contact), max_size=120)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 5), _ops)
def test_table_limits_hold_for_any_sequence(ksize: int, ops: list) -> None:  # type: ignore[type-arg]
    t = table(ksize)
    for add, (shared, host, port, salt) in ops:
        node_id = ((1 << (159 - shared)) | salt).to_bytes(20, "big")
        node = Node(node_id, host, port)
        if add:
            t.add_contact(node)
        else:
            t.remove_contact(node)
        everyone = contacts(t)
        endpoints = [(n.ip, n.port) for n in everyone]
        assert len(endpoints) == len(set(endpoints))
        assert len({n.id for n in everyone}) == len(everyone)
        by_address: dict[str, int] = {}
        by_prefix: dict[str, int] = {}
        for bucket in t.buckets:
            assert len(bucket.nodes) <= ksize
            in_bucket: dict[str, int] = {}
            for n in bucket.nodes.values():
                assert t.buckets[t.get_bucket_for(n)] is bucket  # found where it is looked for
                src = source_of(n.ip)
                in_bucket[src.prefix] = in_bucket.get(src.prefix, 0) + 1
                by_address[src.address] = by_address.get(src.address, 0) + 1
                by_prefix[src.prefix] = by_prefix.get(src.prefix, 0) + 1
            assert max(in_bucket.values(), default=0) <= MAX_PER_PREFIX_IN_BUCKET
        assert max(by_address.values(), default=0) <= MAX_PER_ADDRESS
        assert max(by_prefix.values(), default=0) <= MAX_PER_PREFIX
        assert dict(t.index.addresses) == by_address and dict(t.index.prefixes) == by_prefix
        assert set(t.index.endpoints) == {(n.ip, n.port) for n in everyone}
