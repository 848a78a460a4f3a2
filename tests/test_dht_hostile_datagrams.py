"""Issue #13, items 1 and 6: the DHT datagram boundary against hostile input.

Real nodes and raw UDP sockets on 127.0.0.1. Item 1: no contact in a reply can close a
node's socket. Item 6: replies to an address that never answered stay within 3x what
it sent, pushes go only to addresses that answered, and the push scan is cheap.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import umsgpack
from conftest import peer_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kademlia.node import Node
from support.hostile import HOSTILE_HOSTS

from dhtshare.dht import DhtNode
from dhtshare.identity import Identity
from dhtshare.records import JoinRequest, SignedRecord, sign_record

pytestmark = pytest.mark.timeout(90)

Address = tuple[str, int]
ERRORS = ("error.intake", "error.callback", "error.task", "error.handler", "error.send")


class RawPeer(asyncio.DatagramProtocol):
    """A UDP socket speaking the DHT wire by hand.

    ``contacts`` (a function of the request) is what it answers find_node/find_value
    with; it answers pings with its id when ``answer`` is set, and stores with True.
    Every datagram it receives is kept, with its size.
    """

    def __init__(self, *, answer: bool = True) -> None:
        self.id = os.urandom(20)
        self.answer = answer
        self.contacts: Callable[[str], Any] = lambda _name: []
        self.sent = 0
        self.got: list[tuple[bytes, Any]] = []  # (kind + msg id, body)
        self.received = 0
        self.waiting: dict[bytes, asyncio.Future[Any]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += len(data)
        msg_id, body = data[1:21], umsgpack.unpackb(data[21:])
        self.got.append((data[:21], body))
        if data[:1] == b"\x01":
            waiter = self.waiting.pop(msg_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
            return
        if not self.answer:
            return
        name = body[0]
        reply = self.id if name == "ping" else True if name == "store" else self.contacts(name)
        self.send(b"\x01" + msg_id + umsgpack.packb(reply), addr)

    def send(self, datagram: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.sent += len(datagram)
        self.transport.sendto(datagram, addr)

    def request(self, name: str, args: list[Any], addr: Address) -> asyncio.Future[Any]:
        msg_id = os.urandom(20)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[msg_id] = waiter
        self.send(b"\x00" + msg_id + umsgpack.packb([name, args]), addr)
        return waiter

    async def barrier(self, addr: Address) -> bool:
        """One ping round trip: every datagram the node sent us before it has arrived."""
        for _ in range(3):  # the old code floods this socket; a lost reply is retried
            try:
                async with asyncio.timeout(2):
                    await self.request("ping", [os.urandom(20)], addr)
                return True
            except TimeoutError:
                continue
        return False

    def stores(self) -> int:
        return sum(1 for head, body in self.got if head[:1] == b"\x00" and body[0] == "store")

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    @property
    def node(self) -> Node:
        return Node(self.id, *self.address)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Any]]:
    transports: list[asyncio.BaseTransport] = []

    async def make(**kw: Any) -> RawPeer:
        loop = asyncio.get_running_loop()
        transport, peer = await loop.create_datagram_endpoint(
            lambda: RawPeer(**kw), local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)
        return peer

    try:
        yield make
    finally:
        for transport in transports:
            transport.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DhtNode, DhtNode]]:
    a, b = DhtNode(), DhtNode()
    try:
        await a.listen()
        await b.listen()
        await b.bootstrap([a.address])
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything that reaches the event loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        yield errors
    finally:
        loop.set_exception_handler(old)


# ------------------------------------------------------------------ item 1


async def test_reply_with_non_address_contact_leaves_dht_working(
    pair: tuple[DhtNode, DhtNode], raw: Callable[..., Any], loop_errors: list[dict[str, Any]]
) -> None:
    a, b = pair
    assert a.protocol is not None and b.protocol is not None
    liar: RawPeer = await raw()
    hostile = [[os.urandom(20), host, 4000] for host in HOSTILE_HOSTS]
    hostile += [[os.urandom(20), *a.address]]  # a's own address
    liar.contacts = lambda name: (
        hostile if name == "find_node" else {"value": [b"junk"], "nodes": hostile}
    )
    a.protocol.router.add_contact(liar.node)
    await a.get(os.urandom(20))  # asks the liar, then every contact it named
    await a.bootstrap([liar.address])  # and find_node, through the liar
    assert liar.got, "the liar was never asked"
    assert a.running
    ok, their_id = await b.protocol.ping(a.address, b.node.id)
    assert ok and their_id == a.node.id
    rec = peer_record(Identity.generate(), time.time())
    assert await a.put(rec) >= 1  # b stored it
    held = peer_record(Identity.generate(), time.time())
    assert b.storage.add(held.dht_key, held.encode(), time.time()) is None
    assert await a.get(held.dht_key) == [held]
    assert loop_errors == []
    assert sum(a.stats[name] for name in ERRORS) == 0
    assert a.stats["drop.bad_contact"] + a.stats["drop.useless_contact"] >= len(hostile)


def _msgpack_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=50)
        | st.binary(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=8,
    )


def test_arbitrary_contacts_never_close_the_transport() -> None:
    """Any msgpack values in the contact positions of find_node/find_value replies."""

    async def setup() -> tuple[DhtNode, DhtNode, RawPeer, asyncio.BaseTransport]:
        loop = asyncio.get_running_loop()
        a, b = DhtNode(), DhtNode()
        await a.listen()
        await b.listen()
        await b.bootstrap([a.address])
        transport, liar = await loop.create_datagram_endpoint(RawPeer, local_addr=("127.0.0.1", 0))
        return a, b, liar, transport

    errors: list[dict[str, Any]] = []
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        a, b, liar, transport = runner.run(setup())
        assert a.protocol is not None and b.protocol is not None
        ports = [b.address[1], liar.address[1], a.address[1]]
        ids = st.binary(min_size=20, max_size=20)
        contact = st.one_of(
            _msgpack_values(),
            st.tuples(ids, st.just("127.0.0.1"), st.sampled_from(ports)).map(list),
            st.tuples(  # well shaped, hostile host
                ids,
                st.one_of(st.sampled_from(HOSTILE_HOSTS), st.text(max_size=60)),
                st.integers(min_value=1, max_value=65535),
            ).map(list),
            st.tuples(
                st.one_of(ids, _msgpack_values()),
                st.one_of(st.sampled_from(HOSTILE_HOSTS), st.text(max_size=60), _msgpack_values()),
                st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), _msgpack_values()),
            ).map(list),
        )

        async def exercise(contacts: list[Any], as_values: bool) -> None:
            body = {"value": [b"x"], "nodes": contacts} if as_values else contacts
            liar.contacts = lambda name: body if name == "find_value" else contacts
            a.protocol.router.add_contact(liar.node)
            async with asyncio.timeout(20):
                await a.get(os.urandom(20))
                assert a.running
                ok, their_id = await b.protocol.ping(a.address, b.node.id)
            assert ok and their_id == a.node.id

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(contact, max_size=8), st.booleans())
        def check(contacts: list[Any], as_values: bool) -> None:
            runner.run(exercise(contacts, as_values))
            assert errors == []
            assert sum(a.stats[name] for name in ERRORS) == 0

        try:
            check()
        finally:
            transport.close()
            runner.run(a.aclose())
            runner.run(b.aclose())


# ------------------------------------------------------------------ item 6


def _crowded_key(now: float, count: int = 64) -> list[SignedRecord]:
    """``count`` join requests under one key: more than one datagram's worth."""
    group = os.urandom(32)
    return [
        sign_record(
            Identity.generate(), JoinRequest(group, "n" * 16, "m" * 60), seq=1, now=now, ttl=3600
        )
        for _ in range(count)
    ]


@pytest.fixture
async def holder() -> AsyncIterator[tuple[DhtNode, bytes]]:
    """A node alone (no contacts: it would push everything) holding 8 KB under one key
    and 200 more records it could push."""
    node = DhtNode()
    await node.listen()
    now = time.time()
    crowd = _crowded_key(now)
    for rec in crowd + [peer_record(Identity.generate(), now) for _ in range(200)]:
        assert node.storage.add(rec.dht_key, rec.encode(), now, own=True) is None
    try:
        yield node, crowd[0].dht_key
    finally:
        await node.aclose()


async def test_replies_to_an_unvalidated_address_stay_within_3x_of_what_it_sent(
    holder: tuple[DhtNode, bytes], raw: Callable[..., Any]
) -> None:
    node, key = holder
    peer: RawPeer = await raw(answer=False)  # as a spoofed source: never answers
    rec = peer_record(Identity.generate(), time.time())
    for _ in range(3):
        peer.request("ping", [os.urandom(20)], node.address)
        peer.request("find_node", [os.urandom(20), os.urandom(20)], node.address)
        peer.request("find_value", [os.urandom(20), key], node.address)
        peer.request("store", [os.urandom(20), rec.dht_key, rec.encode()], node.address)
    assert await peer.barrier(node.address)
    assert peer.received <= 3 * peer.sent, f"{peer.received} bytes for {peer.sent}"
    assert peer.stores() == 0  # never pushed to an address that did not answer
    assert node.stats["validate.ping"] >= 1  # but pinged back


async def test_padded_first_request_gets_a_full_reply_within_3x(
    holder: tuple[DhtNode, bytes], raw: Callable[..., Any]
) -> None:
    node, key = holder
    peer: RawPeer = await raw(answer=False)
    padding = bytes(2755 - 86)  # what dhtshare sends on first contact (padded_size)
    async with asyncio.timeout(10):
        reply = await peer.request("find_value", [os.urandom(20), key, padding], node.address)
    assert isinstance(reply, dict)
    assert len(umsgpack.packb(reply)) > 8000  # the whole datagram's worth of records
    assert await peer.barrier(node.address)
    assert peer.received <= 3 * peer.sent


async def test_pushes_go_only_to_an_address_that_answered_and_once(
    holder: tuple[DhtNode, bytes], raw: Callable[..., Any]
) -> None:
    node, _key = holder
    honest: RawPeer = await raw(answer=True)
    async with asyncio.timeout(20):
        await honest.request("ping", [honest.id], node.address)
        assert await honest.barrier(node.address)
        assert node.protocol is not None
        while node.protocol.tasks:  # the pushes, each answered
            assert await honest.barrier(node.address)
    pushed = honest.stores()
    assert 0 < pushed <= 64
    for _ in range(5):  # new node ids from the same address get nothing more
        await honest.request("ping", [os.urandom(20)], node.address)
    assert await honest.barrier(node.address)
    assert not node.protocol.tasks
    assert honest.stores() == pushed


async def test_first_request_to_a_node_gets_its_records(holder: tuple[DhtNode, bytes]) -> None:
    """A lookup whose first datagram to the holder is the find_value: padding buys it
    the full reply from a node that has never heard of it."""
    node, key = holder
    fresh = DhtNode()
    try:
        await fresh.listen()
        assert fresh.protocol is not None
        fresh.protocol.router.add_contact(Node(node.node.id, *node.address))  # never talked
        found = await fresh.get(key)
        assert len(found) == len(node.storage.reply_records(key, 8160, time.time()))
        assert len(found) > 20  # a datagram's worth, not what 3x an unpadded request buys
    finally:
        await fresh.aclose()


@pytest.mark.parametrize(
    "source", [("224.0.0.1", 4000), ("255.255.255.255", 4000), ("10.0.0.1", 0), ("0.0.0.0", 9)]
)
async def test_datagram_from_a_source_no_reply_may_go_to_is_dropped(
    pair: tuple[DhtNode, DhtNode], source: Address
) -> None:
    a, b = pair
    assert a.protocol is not None and b.protocol is not None
    ping = b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [os.urandom(20)]])
    pings = a.stats["rpc_in.ping"]
    a.protocol.datagram_received(ping, source)
    assert a.stats["drop.bad_source"] == 1
    assert a.stats["rpc_in.ping"] == pings
    assert (await b.protocol.ping(a.address, b.node.id))[0]


async def test_a_claimed_node_id_joins_the_table_only_if_its_address_answers_with_it(
    pair: tuple[DhtNode, DhtNode], raw: Callable[..., Any]
) -> None:
    a, _b = pair
    peer: RawPeer = await raw(answer=True)  # answers pings with peer.id
    claimed = os.urandom(20)
    async with asyncio.timeout(10):
        await peer.request("find_node", [claimed, os.urandom(20)], a.address)
        assert await peer.barrier(a.address)  # a's ping-back was answered before this
    ids = {n.id for n in a.contacts()}
    assert claimed not in ids
    assert peer.id in ids
    assert a.stats["validate.ping"] >= 1
