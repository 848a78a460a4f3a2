"""DhtProtocol: guarded intake, reply checks, adaptive timeouts, eviction, no leaks."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import umsgpack
from conftest import peer_record
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node

from dhtshare.dht import DhtNode, DhtProtocol, RpcTimeouts, ValidatingStorage
from dhtshare.dht.protocol import MAX_DATAGRAM
from dhtshare.identity import Identity

pytestmark = pytest.mark.timeout(30)

ID = bytes(range(20))
MSG = os.urandom(20)


def request(body: Any) -> bytes:
    return b"\x00" + MSG + bytes(umsgpack.packb(body))


class FakePeer(asyncio.DatagramProtocol):
    """A raw UDP endpoint: answers pings with its id, queues other requests for the test."""

    def __init__(self) -> None:
        self.id = os.urandom(20)
        self.requests: asyncio.Queue[tuple[bytes, Any, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:1] != b"\x00":
            return
        msg_id, body = data[1:21], umsgpack.unpackb(data[21:])
        if body[0] == "ping":
            self.reply(msg_id, self.id, addr)
        else:
            self.requests.put_nowait((msg_id, body, addr))

    def reply(self, msg_id: bytes, body: Any, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(b"\x01" + msg_id + umsgpack.packb(body), addr)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)


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
async def fake() -> AsyncIterator[FakePeer]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(FakePeer, local_addr=("127.0.0.1", 0))
    try:
        yield peer
    finally:
        transport.close()


@pytest.mark.parametrize(
    ("datagram", "counter"),
    [
        (b"\x00" * 10, "drop.short"),
        (b"\x00" + MSG + b"\xc1", "drop.bad_msgpack"),
        (b"\x07" + MSG + umsgpack.packb(["ping", [ID]]), "drop.unknown_type"),
        (request({"ping": 1}), "drop.bad_request"),
        (request(["ping"]), "drop.bad_request"),
        (request(["ping", [ID, b"extra"]]), "drop.bad_request"),
        (request(["ping", [b"short"]]), "drop.bad_request"),
        (request(["store", [ID, ID, 5]]), "drop.bad_request"),
        (request(["find_node", [ID]]), "drop.bad_request"),
        (request(["stun", []]), "drop.bad_request"),
        (request(["__init__", []]), "drop.bad_request"),
        (request(["ping", ID]), "drop.bad_request"),
        (b"\x00" + MSG + b"\xc4" + b"x" * (MAX_DATAGRAM + 100), "drop.oversize"),
        (b"\x01" + MSG + umsgpack.packb(ID), "drop.unexpected_reply"),
    ],
)
async def test_bad_datagrams_are_dropped_counted_and_node_keeps_answering(
    pair: tuple[DhtNode, DhtNode], datagram: bytes, counter: str
) -> None:
    a, b = pair
    assert b.protocol is not None and b.protocol.transport is not None
    rec = peer_record(Identity.generate(), time.time())
    assert a.storage.add(rec.dht_key, rec.encode(), time.time()) is None  # only a holds it
    b.protocol.transport.sendto(datagram, a.address)
    ok, their_id = await b.protocol.ping(a.address, b.node.id)  # queued behind the garbage
    assert ok
    assert their_id == a.node.id
    assert a.stats[counter] == 1
    assert a.stats["error.handler"] == 0
    assert b.storage.count(rec.dht_key) == 0
    assert await b.get(rec.dht_key) == [rec]  # a still answers lookups
    assert a.stats["rpc_in.find_value"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"\x00", b"\x01", b"\x02"]))
def test_any_bytes_never_raise(data: bytes, kind: bytes) -> None:
    proto = DhtProtocol(Node(ID), ValidatingStorage(), 20)
    proto.datagram_received(kind + MSG + data, ("127.0.0.1", 9))
    proto.datagram_received(data, ("127.0.0.1", 9))


async def test_malformed_reply_counts_as_failure(
    pair: tuple[DhtNode, DhtNode], fake: FakePeer
) -> None:
    a, _ = pair
    assert a.protocol is not None
    pending = a.protocol.find_node(fake.address, a.node.id, ID)
    msg_id, _body, addr = await fake.requests.get()
    fake.reply(msg_id, {"not": "a contact list"}, addr)
    assert await pending == (False, None)
    assert a.stats["drop.bad_reply"] == 1


async def test_bad_contact_costs_only_that_contact(
    pair: tuple[DhtNode, DhtNode], fake: FakePeer
) -> None:
    a, b = pair
    assert a.protocol is not None
    good = [b.node.id, *b.address]
    pending = a.protocol.find_node(fake.address, a.node.id, ID)
    msg_id, _body, addr = await fake.requests.get()
    fake.reply(msg_id, [["not", "a", "contact"], good, [ID, "localhost", 5]], addr)
    ok, contacts = await pending
    assert ok
    assert [tuple(c) for c in contacts] == [tuple(good)]
    assert a.stats["drop.bad_contact"] == 2
    assert a.stats["drop.bad_reply"] == 0


async def test_reply_from_another_address_is_ignored(
    pair: tuple[DhtNode, DhtNode], fake: FakePeer
) -> None:
    a, b = pair
    assert a.protocol is not None and b.protocol is not None and a.protocol.transport is not None
    pending = b.protocol.find_node(fake.address, b.node.id, ID)
    msg_id, _body, _addr = await fake.requests.get()
    a.protocol.transport.sendto(b"\x01" + msg_id + umsgpack.packb([]), b.address)
    assert await pending == (False, None)  # the spoofed reply did not resolve it; the timer did
    assert b.stats["drop.wrong_sender"] == 1


async def test_timeout_follows_measured_rtt(pair: tuple[DhtNode, DhtNode], fake: FakePeer) -> None:
    a, b = pair
    assert a.protocol is not None and b.protocol is not None
    bounds = b.protocol.timeouts
    assert bounds == RpcTimeouts()
    fresh = DhtProtocol(Node(ID), ValidatingStorage(), 20)
    assert fresh.rpc_timeout(fake.address) == bounds.initial  # nothing measured yet
    assert b.protocol.rpc_timeout(a.address) == bounds.minimum  # loopback: 4*srtt << 0.2 s
    assert b.protocol.rpc_timeout(fake.address) == bounds.minimum  # from all peers' estimate
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await b.protocol.find_node(fake.address, b.node.id, ID) == (False, None)
    assert loop.time() - started < bounds.initial
    assert b.stats["rpc_timeout"] == 1
    assert not b.protocol._outstanding


async def test_contact_evicted_after_repeated_failures(pair: tuple[DhtNode, DhtNode]) -> None:
    a, b = pair
    assert a.protocol is not None
    peer = Node(b.node.id, *b.address)
    assert a.contact_count() == 1
    assert (await a.protocol.call_ping(peer))[0]  # measures the round trip: short timeouts
    b.stop()
    await a.protocol.call_ping(peer)
    assert a.contact_count() == 1
    await a.protocol.call_ping(peer)
    assert a.contact_count() == 0
    assert a.stats["contact_evicted"] == 1


async def test_close_fails_outstanding_rpcs(pair: tuple[DhtNode, DhtNode], fake: FakePeer) -> None:
    a, _ = pair
    assert a.protocol is not None
    pending = a.protocol.find_node(fake.address, a.node.id, ID)
    await fake.requests.get()
    a.stop()
    assert await pending == (False, None)
    assert not a.protocol._outstanding
