"""The reachability test on real DHT nodes on loopback (127.x): dial-backs, verdicts and
DHT client mode.

Each node listens for TCP dial-backs on its DHT port number with a small listener of
its own (``Listener``: one DIALBACK frame, handed to the service), as a PeerServer does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import peer_record
from support.nodes import NodeCluster

from dhtshare.dht.antiamp import DialBackLimit
from dhtshare.dht.dialback import send_tcp
from dhtshare.dht.protocol import DhtProtocol, packb
from dhtshare.dht.server import DhtNode
from dhtshare.identity import Identity
from dhtshare.node.commands import Commands
from dhtshare.reach.aio.reachability import ReachabilityService
from dhtshare.reach.autonat import MAX_WAIT, MIN_WAIT, ReachState, Verdict
from dhtshare.records import AddressKind, PeerAddress
from dhtshare.sim.network import loopback_host
from dhtshare.wire.dialback import decode_dialback
from dhtshare.wire.frames import FRAME_HEADER_SIZE, FrameType

pytestmark = pytest.mark.timeout(60)

Address = tuple[str, int]


class Listener:
    """A TCP listener on a node's DHT port: each DIALBACK first frame goes to ``sink``."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.sink: Any = None
        self.got: list[tuple[bytes, Address]] = []
        self.arrived = asyncio.Event()

    async def start(self, address: Address) -> None:
        self.server = await asyncio.start_server(self._on_conn, address[0], address[1])

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(FRAME_HEADER_SIZE)
            length, kind = int.from_bytes(head[:4], "big"), head[4]
            if kind == FrameType.DIALBACK and length <= 64:
                nonce = decode_dialback(await reader.readexactly(length))
                peer = writer.get_extra_info("peername")
                source = (str(peer[0]), int(peer[1]))
                self.got.append((nonce, source))
                self.arrived.set()
                if self.sink is not None:
                    self.sink(nonce, source)
        except (asyncio.IncompleteReadError, OSError, ValueError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Net:
    """DHT nodes, each on its own loopback address, around the first one."""

    def __init__(self) -> None:
        self.nodes: list[DhtNode] = []
        self.listeners: list[Listener] = []

    async def node(self, *, tcp: bool = True, join: bool = True, client: bool = False) -> DhtNode:
        dht = DhtNode(ksize=8)
        await dht.listen(0, loopback_host(len(self.nodes) + 1))
        self.nodes.append(dht)
        if tcp:
            listener = Listener()
            await listener.start(dht.address)
            self.listeners.append(listener)
        if client:
            dht.set_client_mode(True)
        if join and len(self.nodes) > 1:
            assert await dht.bootstrap([self.nodes[0].address]) > 0
        return dht

    def listener_of(self, dht: DhtNode) -> Listener:
        # listeners are made in node order, skipping nodes without one
        for listener in self.listeners:
            assert listener.server is not None
            if listener.server.sockets[0].getsockname()[:2] == dht.address:
                return listener
        raise LookupError(dht.address)

    def service(self, dht: DhtNode, **kwargs: Any) -> ReachabilityService:
        service = ReachabilityService(dht, **kwargs)
        service.attach(None)
        with contextlib.suppress(LookupError):
            self.listener_of(dht).sink = service.on_tcp
        return service

    async def settle(self) -> None:
        """Wait for every ping-back in flight (each ends within one RPC timeout)."""
        await asyncio.gather(*(n._proto().validations() for n in self.nodes))


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    network = Net()
    try:
        yield network
    finally:
        for listener in network.listeners:
            listener.close()
        await asyncio.gather(*(n.aclose() for n in network.nodes))


def in_client_mode(dht: DhtNode) -> bool:
    return dht.client_mode


async def servers(net: Net, count: int) -> list[DhtNode]:
    """The bootstrap node and ``count - 1`` more servers that joined through it."""
    out = [await net.node()]
    for _ in range(count - 1):
        out.append(await net.node())
    await net.settle()
    return out


async def test_a_reachable_node_is_public_at_once(net: Net) -> None:
    await servers(net, 4)
    me = await net.node()
    await net.settle()
    service = net.service(me)
    started = time.monotonic()
    state = await service.test_once()
    seconds = time.monotonic() - started
    assert state.verdict is Verdict.PUBLIC
    assert state.observed == me.address
    assert state.public_address == "{}:{}".format(*me.address)
    assert not me.client_mode
    assert seconds < MIN_WAIT, seconds  # decided on the dial-backs, not on the deadline


async def test_no_tcp_dial_back_means_private_and_client_mode(net: Net) -> None:
    await servers(net, 4)
    me = await net.node(tcp=False)  # nothing listens on its TCP port: like a NAT
    await net.settle()
    others = net.nodes[:-1]
    assert any(me.node.id in {c.id for c in o.contacts()} for o in others)
    service = net.service(me)
    started = time.monotonic()
    state = await service.test_once()
    seconds = time.monotonic() - started
    assert state.verdict is Verdict.PRIVATE
    assert in_client_mode(me)
    # it waited for the dial-back deadline (its floor), and not past its ceiling for long
    assert MIN_WAIT <= seconds < MAX_WAIT + 5.0, seconds
    # it told its contacts (RPC mode); each pinged it, heard a client, dropped it
    await asyncio.gather(*me._proto().tasks)
    await net.settle()
    assert all(me.node.id not in {c.id for c in o.contacts()} for o in others)
    answered, body = await others[0]._proto().ping(me.address, others[0].node.id)
    assert answered and body == b""
    # and once it is reachable again, a public verdict puts it back in server mode
    listener = Listener()
    await listener.start(me.address)
    net.listeners.append(listener)
    listener.sink = service.on_tcp
    assert (await service.test_once()).verdict is Verdict.PUBLIC
    assert not in_client_mode(me)
    await asyncio.gather(*me._proto().tasks)  # it told its contacts again
    await net.settle()
    assert all(me.node.id in {c.id for c in o.contacts()} for o in others)


async def test_dial_back_goes_only_to_a_validated_asker_and_is_rate_limited(net: Net) -> None:
    responder = await net.node()
    asker = await net.node(join=False)
    listener = net.listener_of(asker)
    udp: list[tuple[bytes, Address]] = []
    asker.set_dialback_sink(lambda nonce, source: udp.append((nonce, source)))
    nonce = os.urandom(16)
    # first contact: the responder has not validated the asker: it answers, dials nothing,
    # and pings the asker back
    reply = await asker.reach(responder.address, nonce)
    assert reply is not None and (reply.host, reply.port) == asker.address
    assert not reply.dialing
    await responder._proto().validations()
    assert responder._proto()._amp.is_validated(asker.address)
    # validated now: dialled back, by UDP from a fresh port and by TCP, at the observed address
    for _ in range(3):  # DialBackLimit: 3 per asker IP at once
        listener.arrived.clear()
        reply = await asker.reach(responder.address, nonce)
        assert reply is not None and reply.dialing
        async with asyncio.timeout(5):
            await listener.arrived.wait()
    assert [n for n, _ in listener.got] == [nonce] * 3
    assert len(udp) == 3 and all(n == nonce for n, _ in udp)
    assert all(source != responder.address for _, source in udp)  # fresh sockets
    reply = await asker.reach(responder.address, nonce)
    assert reply is not None and not reply.dialing  # rate limited
    assert responder.stats["dialback.sent"] == 3


async def test_an_address_that_never_answered_is_never_dialled(net: Net) -> None:
    responder = await net.node()
    # a raw socket sends reach and never answers anything (as a spoofed source would not)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind((loopback_host(50), 0))
    raw.setblocking(False)
    listener = Listener()
    await listener.start(raw.getsockname())
    net.listeners.append(listener)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(5):
            msg_id = os.urandom(20)
            body = packb(["reach", [os.urandom(20), os.urandom(16)]])
            raw.sendto(b"\x00" + msg_id + body, responder.address)
            async with asyncio.timeout(5):
                while True:
                    data = await loop.sock_recv(raw, 9000)
                    if data[1:21] == msg_id:
                        break
        await responder._proto().validations()  # the ping-backs time out
    finally:
        raw.close()
    assert responder.stats["dialback.sent"] == 0
    assert responder.stats["dialback.refused"] == 5
    assert listener.got == []


class Liar(DhtProtocol):
    """Says it dials back, then does something that must not count."""

    mode = "silent"

    def rpc_reach(self, sender: Address, nodeid: bytes, nonce: bytes) -> list[Any]:
        if self.mode == "wrong_nonce":
            super().rpc_reach(sender, nodeid, os.urandom(16))
        elif self.mode == "own_socket":  # UDP through the asker's NAT mapping, plus TCP
            body = packb(["dialback", [bytes(self.source_node.id), nonce]])
            self._send(b"\x00" + os.urandom(20) + body, sender)
            self._spawn(send_tcp(sender, nonce))
        return [sender[0], sender[1], True]


@pytest.mark.parametrize("mode", ["silent", "wrong_nonce", "own_socket"])
async def test_lying_dial_backs_count_for_nothing(net: Net, mode: str) -> None:
    boot = await net.node()
    liars = []
    for _ in range(3):
        dht = DhtNode(ksize=8)
        await dht.listen(0, loopback_host(len(net.nodes) + 1))
        dht._proto().__class__ = type("L", (Liar,), {"mode": mode})
        net.nodes.append(dht)
        await dht.bootstrap([boot.address])
        liars.append(dht)
    me = await net.node()
    await net.settle()
    service = net.service(me, extra_peers=lambda: [liar.address for liar in liars])
    service.policy.peers = 3
    service.candidates = lambda: [liar.address for liar in liars]  # type: ignore[method-assign]
    state = await service.test_once()
    assert state.verdict is Verdict.PRIVATE  # never public on lies


VICTIM = ("127.0.0.66", 80)


class Poisoner(DhtProtocol):
    """Reports a victim's address as the one it saw, and confirms correctly: its real
    dial-backs (UDP from a fresh port, TCP) go to the asker's real address."""

    def rpc_reach(self, sender: Address, nodeid: bytes, nonce: bytes) -> list[Any]:
        super().rpc_reach(sender, nodeid, nonce)
        return [*VICTIM, True]


async def test_sybils_in_one_network_cannot_name_our_public_address(net: Net) -> None:
    """Hostile test of issue 16, finding 1: three sybils in one /24 (127.200.0.x) report
    a victim's address and confirm; one honest peer reports ours. Before, the sybils'
    majority made the node public at the victim's address."""
    boot = await net.node()
    sybils = []
    for i in (31, 32, 33):
        dht = DhtNode(ksize=8)
        await dht.listen(0, f"127.200.0.{i}")
        dht._proto().__class__ = Poisoner
        net.nodes.append(dht)
        await dht.bootstrap([boot.address])
        sybils.append(dht)
    me = await net.node()
    await net.settle()
    service = net.service(me, own=lambda: ())  # no own-address shortcut: peers must agree
    peers = [boot.address, *(s.address for s in sybils)]
    service.candidates = lambda: peers  # type: ignore[method-assign]
    for _ in range(2):  # whoever answers first
        state = await service.test_once()
        assert state.verdict is Verdict.PUBLIC  # reachable: honest and sybils reached us
        assert state.observed != VICTIM and state.public_address != "127.0.0.66:80"
        assert state.observed is None  # one network each: no agreement
        peers.reverse()


async def test_a_dial_back_flood_leaves_a_reserve_for_routing_table_contacts(net: Net) -> None:
    """Hostile test of issue 16, finding 2: validated addresses flooding ``reach`` spend the
    responder's total dial-back budget; before, a contact in its routing table was then
    refused like everyone else (and two liars could flip it to private)."""
    responder = await net.node()
    contact = await net.node()  # joined: in the responder's routing table
    # clients: validated by the ping-back, but kept out of the routing table
    stranger = await net.node(join=False, client=True)
    flooders = [await net.node(join=False, client=True) for _ in range(4)]
    for asker in (stranger, *flooders):
        reply = await asker.reach(responder.address, os.urandom(16))
        assert reply is not None and not reply.dialing  # not validated yet
    await net.settle()
    proto = responder._proto()
    assert proto.router.id_at(*contact.address) == contact.node.id
    assert proto.router.id_at(*stranger.address) is None
    proto.dialback_limit = DialBackLimit(
        total=4, total_every=1000.0, reserved=1, reserved_every=1000.0
    )
    for flooder in flooders:
        reply = await flooder.reach(responder.address, os.urandom(16))
        assert reply is not None and reply.dialing
    reply = await stranger.reach(responder.address, os.urandom(16))
    assert reply is not None and not reply.dialing  # the total bucket is spent
    reply = await contact.reach(responder.address, os.urandom(16))
    assert reply is not None and reply.dialing  # the reserve
    assert responder.stats["dialback.sent"] == 5


async def test_client_nodes_stay_out_of_tables_but_look_up_and_store(net: Net) -> None:
    await servers(net, 5)
    clients = [await net.node(client=True) for _ in range(2)]
    await net.settle()
    client_ids = {c.node.id for c in clients}
    for server in net.nodes[:5]:
        assert client_ids.isdisjoint({c.id for c in server.contacts()})
    for client in clients:
        assert client.contact_count() >= 4  # it knows the servers
        assert client_ids.isdisjoint({c.id for c in client.contacts()})
    rec = peer_record(Identity.generate(), time.time())
    assert await clients[0].put(rec) >= 4
    assert await clients[1].get(rec.dht_key) == [rec]
    assert await net.nodes[3].get(rec.dht_key) == [rec]
    assert sum(s.stats["client_seen"] for s in net.nodes[:5]) >= 2


async def test_a_node_on_its_own_address_finds_itself_public_and_says_so(tmp_path: Path) -> None:
    async with NodeCluster.running(tmp_path, own_hosts=True) as cluster:
        nodes = [await cluster.node(f"n{i}") for i in range(3)]
        started = time.monotonic()
        for node in nodes:
            await known(node.reachability)
        assert time.monotonic() - started < 5.0
        for node in nodes:
            status = await Commands(node).cmd_status(progress=None)  # type: ignore[arg-type]
            assert status["reachability"] == "public"
            assert status["public_address"] == "{}:{}".format(*node.address)
            assert not node.dht.client_mode


async def test_an_observed_address_is_published_as_direct_only_at_our_port(
    tmp_path: Path,
) -> None:
    """Hostile test of issue 16, finding 1: a public node published whatever address
    peers agreed on (a victim's web server at port 80) as a direct address."""
    async with NodeCluster.running(tmp_path, own_hosts=True) as cluster:
        node = await cluster.node("n0")
        port = node.advertised[1]
        assert port != 80
        policy = node.reachability.policy
        policy.state = ReachState(Verdict.PUBLIC, ("203.0.113.9", 80))
        assert node.more_addresses() == node.relay_addresses()
        assert node.public_ip() == "203.0.113.9"  # the address others saw, all the same
        policy.state = ReachState(Verdict.PUBLIC, ("203.0.113.9", port))  # a forwarded port
        direct = PeerAddress(AddressKind.DIRECT, "203.0.113.9", port)
        assert node.more_addresses() == (direct, *node.relay_addresses())
        policy.state = ReachState(Verdict.UNKNOWN, ("203.0.113.9", port))
        assert node.more_addresses() == node.relay_addresses()  # not known public


async def known(service: ReachabilityService) -> None:
    """Wait (30 s at most) until ``service`` has a verdict."""
    done = asyncio.Event()
    service.add_listener(lambda state: done.set() if state.verdict is not Verdict.UNKNOWN else None)
    if service.state.verdict is Verdict.UNKNOWN:
        async with asyncio.timeout(30):
            await done.wait()


class RawPeer:
    """A bare UDP socket on its own loopback address, speaking the DHT's datagrams by hand."""

    def __init__(self, index: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((loopback_host(index), 0))
        self.sock.setblocking(False)
        self.address: Address = self.sock.getsockname()[:2]

    async def recv(self) -> bytes:
        async with asyncio.timeout(5):
            return await asyncio.get_running_loop().sock_recv(self.sock, 9000)

    def send(self, datagram: bytes, to: Address) -> None:
        self.sock.sendto(datagram, to)


@pytest.mark.parametrize(
    "body",
    [
        ["127.0.0.1", 4000],  # two items
        ["127.0.0.1", 4000, True, 1],  # four
        ["127.0.0.1", 4000, 1],  # dialing not a bool
        ["not an ip", 4000, True],
        ["127.0.0.1", 0, True],  # port 0
        ["224.0.0.1", 4000, True],  # multicast
        {"host": "127.0.0.1"},
        b"\x00" * 20,
    ],
)
async def test_a_malformed_reach_answer_is_no_answer(net: Net, body: Any) -> None:
    asker = await net.node(join=False)
    raw = RawPeer(60)
    try:
        asking = asyncio.ensure_future(asker.reach(raw.address, os.urandom(16)))
        request = await raw.recv()
        raw.send(b"\x01" + request[1:21] + packb(body), asker.address)
        assert await asking is None
    finally:
        raw.sock.close()
    assert asker.stats["drop.bad_reply"] == 1


async def test_a_dialback_datagram_is_handed_on_and_never_answered(net: Net) -> None:
    me = await net.node(join=False)
    got: list[tuple[bytes, Address]] = []
    me.set_dialback_sink(lambda nonce, source: got.append((nonce, source)))
    raw = RawPeer(61)
    try:
        nonce = os.urandom(16)
        dialback = packb(["dialback", [os.urandom(20), nonce]])
        raw.send(b"\x00" + os.urandom(20) + dialback, me.address)
        ping_id = os.urandom(20)
        raw.send(b"\x00" + ping_id + packb(["ping", [os.urandom(20)]]), me.address)
        first = await raw.recv()  # datagrams on loopback keep their order
        assert first[:21] == b"\x01" + ping_id  # the ping's reply: nothing came for the dialback
    finally:
        raw.sock.close()
    assert got == [(nonce, raw.address)]
    assert me.contact_count() == 0  # a dialback sender is not welcomed


async def test_a_node_that_knows_one_contact_meets_more_before_it_decides(net: Net) -> None:
    boot = (await servers(net, 4))[0]
    me = await net.node(tcp=False, join=False)
    for peer in await me._ping_all([boot.address]):
        me._proto().welcome_if_new(peer)
    assert me.contact_count() == 1  # one peer cannot make it private on its own
    state = await net.service(me).test_once()
    assert state.verdict is Verdict.PRIVATE
    assert me.contact_count() >= 2
