"""The four measured kademlia 2.2.3 / rpcudp 5.0.1 defects (shared/kademlia-defects/).

Each test runs twice: on the plain library, where it is a strict xfail (so it proves
the defect is there), and on dhtshare's adapter, where it must pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import umsgpack
from conftest import FakeClock, peer_record
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from dhtshare.dht import DhtNode, ValidatingStorage
from dhtshare.errors import DhtError
from dhtshare.identity import Identity
from dhtshare.records import SignedRecord

pytestmark = pytest.mark.timeout(30)


def variants(reason: str) -> pytest.MarkDecorator:
    """Parametrize over the plain library (strict xfail) and the adapter."""
    return pytest.mark.parametrize(
        "plain",
        [
            pytest.param(True, marks=pytest.mark.xfail(strict=True, reason=reason), id="plain"),
            pytest.param(False, id="adapter"),
        ],
    )


class Nodes:
    """Starts servers of either kind on 127.0.0.1 port 0 and stops them all."""

    def __init__(self, plain: bool, clock: FakeClock) -> None:
        self.plain, self.clock = plain, clock
        self.servers: list[Any] = []

    async def start(self, ksize: int = 20, node_id: bytes | None = None, **kw: Any) -> Any:
        if self.plain:
            server: Any = Server(ksize=ksize, node_id=node_id)
        else:
            server = DhtNode(ksize, node_id=node_id, clock=self.clock, **kw)
        self.servers.append(server)
        await server.listen(0, "127.0.0.1")
        if self.plain:
            server.protocol._wait_timeout = 0.3  # keep the plain runs short
        return server

    async def close(self) -> None:
        for s in self.servers:
            s.stop()
            if isinstance(s, DhtNode):
                await s.aclose()


@pytest.fixture
async def nodes(plain: bool, clock: FakeClock) -> AsyncIterator[Nodes]:
    made = Nodes(plain, clock)
    try:
        yield made
    finally:
        await made.close()


def addr(server: Any) -> tuple[str, int]:
    host, port = server.transport.get_extra_info("sockname")[:2]
    return (host, port)


def record_where(clock: FakeClock, ok: Callable[[bytes], bool]) -> SignedRecord:
    """A PEER record whose DHT key satisfies ``ok`` (about 1 in 8 do)."""
    for _ in range(200):
        rec = peer_record(Identity.generate(), clock())
        if ok(rec.dht_key):
            return rec
    raise AssertionError("no key found")


def nid(first: int, last: int) -> bytes:
    return bytes([first]) + bytes(18) + bytes([last])


# ------------------------------------------------------------------ 1. store push loop


@variants("welcome_if_new re-pushes to a node in the replacement cache on every reply")
async def test_no_store_push_loop(nodes: Nodes, clock: FakeClock, plain: bool) -> None:
    a = await nodes.start(1, nid(0x00, 0x00))
    h = await nodes.start(1, nid(0x80, 0x01))
    b = await nodes.start(1, nid(0x80, 0x02))

    # A closer to the key than H, and B closer than H (store_push_loop.py's set-up);
    # the plain library judges closeness on digest(key), the adapter on the key itself.
    def close(k: bytes) -> bool:
        return k[0] < 0x80 and k[-1] & 0x03 == 0x02

    def hashed_close(k: bytes) -> bool:
        return close(bytes(digest(k)))

    rec = record_where(clock, hashed_close if plain else close)
    if plain:
        a.storage[rec.dht_key] = rec.encode()
    else:
        a.storage.add(rec.dht_key, rec.encode(), clock(), own=True)
    stores: list[bytes] = []
    real_store = b.protocol.rpc_store

    def counting_store(sender: Any, nodeid: bytes, key: bytes, value: Any) -> Any:
        stores.append(key)
        return real_store(sender, nodeid, key, value)

    b.protocol.rpc_store = counting_store
    await h.protocol.ping(addr(a), h.node.id)  # A learns H: its only bucket slot
    for _ in range(6):  # B talks to A: B lands in the replacement cache
        assert (await b.protocol.ping(addr(a), b.node.id))[0]
    await h.protocol.ping(addr(a), h.node.id)  # one more round trip for pushes in flight
    assert len(stores) <= 1


# ------------------------------------------------------------------ 2. cancelled RPC


class SlowPeer(asyncio.DatagramProtocol):
    """Answers pings at once; holds every other request until the test replies."""

    def __init__(self) -> None:
        self.id = bytes(range(20))
        self.held: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, sender: tuple[str, int]) -> None:
        msg_id, body = data[1:21], umsgpack.unpackb(data[21:])
        if body[0] == "ping":
            self.answer(msg_id, self.id, sender)
        else:
            self.held.put_nowait((msg_id, sender))

    def answer(self, msg_id: bytes, body: Any, sender: tuple[str, int]) -> None:
        self.transport.sendto(b"\x01" + msg_id + umsgpack.packb(body), sender)


@variants("rpcudp keeps cancelled futures in _outstanding and set_result()s them later")
async def test_cancelled_lookup_leaves_nothing_behind(nodes: Nodes, plain: bool) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    transport, slow = await loop.create_datagram_endpoint(SlowPeer, local_addr=("127.0.0.1", 0))
    try:
        a = await nodes.start()
        a.protocol.router.add_contact(Node(slow.id, *transport.get_extra_info("sockname")[:2]))
        lookup = loop.create_task(a.get(b"some-key" if plain else bytes(20)))
        msg_id, sender = await slow.held.get()
        lookup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lookup
        assert len(a.protocol._outstanding) == 0
        slow.answer(msg_id, [], sender)  # the late reply
        assert (await a.protocol.ping(transport.get_extra_info("sockname")[:2], a.node.id))[0]
        assert len(a.protocol._outstanding) == 0
        assert errors == []
    finally:
        transport.close()
        loop.set_exception_handler(old_handler)


# ------------------------------------------------------------------ 3. set with dead nodes


@variants("set_digest raises ValueError from max([]) when every contact is dead")
async def test_store_with_every_contact_dead_is_a_dht_error(
    nodes: Nodes, clock: FakeClock, plain: bool
) -> None:
    a = await nodes.start()
    c = await nodes.start()
    await a.bootstrap([addr(c)])
    c.stop()
    rec = peer_record(Identity.generate(), clock())
    with pytest.raises(DhtError):
        await a.set_digest(rec.dht_key, rec.encode())


# ------------------------------------------------------------------ 4. stale re-store (#107)


@variants("every holder re-stores what it holds hourly, so old values overwrite new ones")
async def test_refresh_does_not_bring_back_stale_values(
    nodes: Nodes, clock: FakeClock, plain: bool
) -> None:
    alice = Identity.generate()
    old = peer_record(alice, clock(), seq=1, ttl=86400)
    new = peer_record(alice, clock(), seq=2, ttl=86400)
    key = old.dht_key
    kw = {} if plain else {"storage": ValidatingStorage(clock=clock, hold_for=1e5)}
    a = await nodes.start(**kw)
    kw = {} if plain else {"storage": ValidatingStorage(clock=clock, hold_for=1e5)}
    b = await nodes.start(**kw)
    await a.bootstrap([addr(b)])
    if plain:
        a.storage[key] = old.encode()
        b.storage[key] = new.encode()
        a.storage.data[key] = (time.monotonic() - 7200, old.encode())  # held for two hours
    else:
        a.storage.add(key, old.encode(), clock())
        b.storage.add(key, new.encode(), clock())
        clock.advance(7200)
    await a._refresh_table()
    expected = new.encode() if plain else [new.encode()]
    assert b.storage.get(key) == expected
    if not plain:
        assert b.stats["rpc_in.store"] == 0  # A re-stores nothing it merely holds
