"""Circuit relays over real sockets on 127.x: reservations, a relayed peer session, limits.

The relay is a ``PeerServer`` with no shares whose ``relay_handler`` is a ``RelayServer``
(as on a node); the provider is reached only through its reservation (``RelayKeeper``,
circuits handed to ``PeerServer.adopt``); the downloader opens the circuit
(``open_circuit``) and runs the ordinary client handshake on it (``open_peer_on``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.access import access_key, access_keys
from support.capture import hits, on_hosts, windows, wire_capture
from support.firstframe import send_first as send_first_frame
from support.nodes import NodeCluster

from dhtshare import crypto
from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.errors import ProtocolError
from dhtshare.identity import Identity
from dhtshare.node.commands import Commands
from dhtshare.reach.aio.relay import (
    REHOLD_AFTER,
    SPLICE_BUFFER,
    RelayKeeper,
    RelayServer,
    open_circuit,
)
from dhtshare.reach.autonat import ReachState, Verdict
from dhtshare.reach.relaylimits import KeeperLimits, RelayLimits, renew_after
from dhtshare.records import AddressKind
from dhtshare.transfer.aio.peer import open_peer_on
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.wire import MAGIC, Bitfield, FrameType, GetHashes, HashList, Piece, Request
from dhtshare.wire.dialback import dialback_frame
from dhtshare.wire.frames import encode_frame
from dhtshare.wire.relay import (
    RESERVE_PURPOSE,
    Accept,
    Incoming,
    Ready,
    RefuseCode,
    Refused,
    RelayKey,
    RelayMessage,
    Reserve,
    Reserved,
    decode_relay,
    relay_frame,
    reserve_message,
)

PIECE = 256 * 1024
GROUP = bytes(range(32))
RELAY_HOST = "127.0.16.1"
PROVIDER_HOST = "127.0.16.2"
WAIT = 10.0


def signed_reserve(
    me: RelayKey, relay: tuple[str, int], when: int | None = None, signer: RelayKey | None = None
) -> Reserve:
    """``me``'s ``Reserve`` addressed to ``relay`` (signed by ``signer``: default ``me``)."""
    when = int(time.time()) if when is None else when
    message = reserve_message(me.public, when, *relay)
    sig = crypto.sign((signer or me).signing_key, RESERVE_PURPOSE, message)
    return Reserve(me.public, when, *relay, sig)


@dataclass
class Relay:
    server: PeerServer
    relay: RelayServer

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address


@pytest.fixture
async def tg() -> AsyncIterator[asyncio.TaskGroup]:
    async with asyncio.TaskGroup() as group:
        yield group
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task() and task.get_name().startswith("relaytest"):
                task.cancel()


async def start_relay(tg: asyncio.TaskGroup, limits: RelayLimits | None = None) -> Relay:
    server = PeerServer(Identity.generate(), RELAY_HOST, shares=ShareRegistry(lambda g, k: False))
    relay = RelayServer(limits)
    server.relay_handler = relay.handle
    await server.start()
    tg.create_task(server.serve(), name="relaytest-relay")
    await server.serving.wait()
    return Relay(server, relay)


async def reserved_circuit(
    tg: asyncio.TaskGroup, relay: Relay
) -> tuple[socket.socket, socket.socket]:
    """A new key's reservation at ``relay`` (its keeper in ``tg``), and a circuit to it:
    the downloader's socket and the target's."""
    target = RelayKey.generate()
    circuits: asyncio.Queue[socket.socket] = asyncio.Queue()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target, lambda: [relay.address], lambda s, _: circuits.put_nowait(s), on_change=changed.set
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        await changed.wait()
    sock, _ = await open_circuit(relay.address, target.public)
    async with asyncio.timeout(WAIT):
        return sock, await circuits.get()


async def start_provider(
    tg: asyncio.TaskGroup, relay: Relay, shares: ShareRegistry, identity: Identity
) -> tuple[PeerServer, RelayKeeper]:
    server = PeerServer(identity, PROVIDER_HOST, shares=shares)
    await server.start()
    tg.create_task(server.serve(), name="relaytest-provider")
    await server.serving.wait()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        RelayKey.generate(),
        lambda: [relay.address],
        server.adopt,
        on_change=changed.set,
        local=PROVIDER_HOST,
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        while not keeper.relays:
            changed.clear()
            await changed.wait()
    return server, keeper


async def test_relayed_download_and_the_relay_sees_no_plaintext(
    tg: asyncio.TaskGroup, tmp_path: Path
) -> None:
    data = random.Random(16).randbytes(6 * PIECE + 777)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    me, provider = Identity.generate(), Identity.generate()
    shares = ShareRegistry(
        lambda g, k: g == GROUP and k in {me.public, provider.public}, access_keys(GROUP)
    )
    shares.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))

    relay = await start_relay(tg)
    captured: list[bytes] = []
    relay.relay.tap = captured.append
    wire = wire_capture(on_hosts(RELAY_HOST))
    try:
        relay_key = await relayed_download(tg, relay, shares, provider, me, data, hashes)
    finally:
        if wire is not None:
            wire.close()

    runs = windows(data)
    assert hits(data[1000:5000], runs) > 0  # the search finds plaintext where there is some
    # what the relay forwarded (its splice's tap)
    seen = b"".join(captured)
    assert len(seen) > len(data)  # every byte of the session went through the tap
    # positive control: the tap sees the stream's plaintext framing (the ClientHello)
    assert encode_frame(FrameType.CLIENT_HELLO, b"")[4:5] + MAGIC in seen
    assert hits(seen, runs) == 0
    # what went over the wire to and from the relay (as root: every packet on lo)
    if wire is None and os.geteuid() != 0:  # CI runs as root: there it must capture
        pytest.skip("the wire capture needs root (AF_PACKET); the tap found no plaintext")
    assert wire is not None, "no AF_PACKET capture on lo, though root"
    flows = [bytes(f) for f in wire.flows.values()]
    assert wire.drops == 0  # the capture missed nothing
    assert sum(map(len, flows)) > 2 * len(data)  # in from the provider, out to us
    assert any(relay_key in f for f in flows)  # the plaintext Reserve and Connect name it
    assert sum(hits(f, runs) for f in flows) == 0


async def relayed_download(
    tg: asyncio.TaskGroup,
    relay: Relay,
    shares: ShareRegistry,
    provider: Identity,
    me: Identity,
    data: bytes,
    hashes: list[bytes],
) -> bytes:
    """Fetch the whole file from ``provider``, reached only through ``relay``; the relay
    key it reserved under."""
    cid = merkle_root(hashes)
    server, keeper = await start_provider(tg, relay, shares, provider)
    assert keeper.relays == [relay.address]
    assert keeper.observed[relay.address][0] == PROVIDER_HOST
    assert relay.relay.reservations == 1

    sock, rest = await open_circuit(relay.address, keeper.key.public)
    assert rest == b""
    got = bytearray(len(data))
    async with await open_peer_on(sock, me, GROUP, cid, access_key=access_key(GROUP)) as stream:
        assert stream.peer_key == provider.public  # the handshake checked the far end
        async with asyncio.timeout(WAIT):
            bits = await anext(stream)
            assert isinstance(bits, Bitfield) and bits.pieces() == list(range(7))
            await stream.send(GetHashes(0, 7))
            listed = await anext(stream)
            assert isinstance(listed, HashList) and list(listed.hashes) == hashes
            for i in range(7):
                stream.send_nowait(Request(i, 0, min(PIECE, len(data) - i * PIECE)))
            for _ in range(7):
                piece = await anext(stream)
                assert isinstance(piece, Piece)
                got[piece.index * PIECE : piece.index * PIECE + len(piece.data)] = piece.data
    assert bytes(got) == data
    assert server.uploaded[me.public] == len(data)
    assert relay.relay.stats["circuit"] == 1
    return keeper.key.public


async def test_reservation_flood_from_one_address_is_capped(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(max_reservations_per_source=4))
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    answers = []
    try:
        for _ in range(7):
            me = RelayKey.generate()
            sock = socket.socket()
            sock.bind(("127.0.17.1", 0))
            sock.setblocking(False)
            held.append(sock)
            await loop.sock_connect(sock, relay.address)
            await loop.sock_sendall(sock, relay_frame(signed_reserve(me, relay.address)))
            async with asyncio.timeout(WAIT):
                reply = await loop.sock_recv(sock, 4096)
            answers.append(decode_relay(reply[5:]))
    finally:
        for sock in held:
            sock.close()
    assert [type(a) for a in answers] == [Reserved] * 4 + [Refused] * 3
    assert all(a.code == RefuseCode.LIMIT for a in answers[4:] if isinstance(a, Refused))
    assert relay.relay.stats["refuse.limit"] == 3


async def test_forged_reservation_is_refused(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg)
    loop = asyncio.get_running_loop()
    victim, forger = RelayKey.generate(), RelayKey.generate()
    forged = signed_reserve(victim, relay.address, signer=forger)
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, relay.address)
        await loop.sock_sendall(sock, relay_frame(forged))
        async with asyncio.timeout(WAIT):
            reply = decode_relay((await loop.sock_recv(sock, 4096))[5:])
    assert isinstance(reply, Refused) and reply.code == RefuseCode.BAD_REQUEST
    assert relay.relay.reservations == 0


async def test_connect_without_reservation_is_refused_fast(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="refused the circuit: no reservation"):
        await open_circuit(relay.address, bytes(32))
    assert time.monotonic() - started < 1.0


async def test_circuit_past_its_byte_limit_is_cut(tg: asyncio.TaskGroup) -> None:
    limit = 1024 * 1024
    relay = await start_relay(tg, RelayLimits(circuit_bytes=limit))
    sock, far = await reserved_circuit(tg, relay)
    loop = asyncio.get_running_loop()
    received = 0

    async def drain() -> None:
        nonlocal received
        while True:
            try:
                data = await loop.sock_recv(far, 1 << 16)
            except ConnectionError:
                return
            if not data:
                return
            received += len(data)

    async def flood() -> None:
        chunk = bytes(1 << 16)
        try:
            for _ in range(4 * limit // len(chunk)):
                await loop.sock_sendall(sock, chunk)
        except ConnectionError:
            pass

    try:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(drain(), flood())
    finally:
        sock.close()
        far.close()
    assert limit <= received < limit + 2 * 256 * 1024
    assert relay.relay.stats["circuit.cut.limit"] == 1
    assert relay.relay.circuits == 0


async def test_stalling_or_dropping_relay_costs_bounded_time() -> None:
    loop = asyncio.get_running_loop()
    accepted: list[asyncio.StreamWriter] = []

    def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # holds it open, says nothing

    def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    staller = await asyncio.start_server(stall, "127.0.18.1", 0)
    dropper = await asyncio.start_server(drop, "127.0.18.2", 0)
    try:
        started = loop.time()
        with pytest.raises(ProtocolError, match=r"within 0\.5 s"):
            await open_circuit(staller.sockets[0].getsockname(), bytes(32), limit=0.5)
        assert loop.time() - started < 1.5
        started = loop.time()
        with pytest.raises(ProtocolError, match="closed"):
            await open_circuit(dropper.sockets[0].getsockname(), bytes(32))
        assert loop.time() - started < 1.0
    finally:
        for writer in accepted:
            writer.close()
        staller.close()
        dropper.close()


async def test_first_frame_demux(tg: asyncio.TaskGroup) -> None:
    """DIALBACK goes to the sink; a RELAY frame on a server that does not relay is refused
    (NOT_RELAYING); garbage and an oversized first frame are closed; the server goes on."""
    server = PeerServer(Identity.generate(), RELAY_HOST, shares=ShareRegistry(lambda g, k: False))
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
    server.dialback_sink = lambda nonce, source: got.put_nowait((nonce, source))
    await server.start()
    tg.create_task(server.serve(), name="relaytest-demux")
    await server.serving.wait()

    async def send_first(data: bytes) -> bytes:
        return await send_first_frame(server.address, data, "127.0.19.1")

    nonce = bytes(range(16))
    assert await send_first(dialback_frame(nonce)) == b""
    async with asyncio.timeout(WAIT):
        assert (await got.get())[0] == nonce
    refused = decode_relay((await send_first(relay_frame(Reserved(1, "127.0.0.1", 1))))[5:])
    assert isinstance(refused, Refused) and refused.code == RefuseCode.NOT_RELAYING
    assert await send_first(encode_frame(99, b"x" * 10)) == b""
    assert await send_first((10_000).to_bytes(4, "big") + bytes([1])) == b""
    assert server.stats["drop.first_frame"] == 2
    assert server.stats["refuse.not_relaying"] == 1
    assert server.handshakes == 0


async def test_node_relays_when_public_and_reserves_when_private(tmp_path: Path) -> None:
    """The node's wiring: a public node takes RELAY connections, a private one holds a
    reservation at a DHT contact and names it in ``status`` and in its provider records."""
    async with NodeCluster.running(tmp_path, own_hosts=True) as cluster:
        public, private = await cluster.node("public"), await cluster.node("private")
        for node in (public, private):
            node.reachability._listeners.clear()  # the loopback test would say "public"
        public._reach_changed(ReachState(Verdict.PUBLIC))
        assert public.server.relay_handler is not None
        changed, announce = asyncio.Event(), private.keeper.on_change
        assert announce is not None

        def on_change() -> None:
            announce()
            changed.set()

        private.keeper.on_change = on_change
        private._reach_changed(ReachState(Verdict.PRIVATE))
        assert private.server.relay_handler is None
        async with asyncio.timeout(WAIT):
            while not private.relays:
                changed.clear()
                await changed.wait()
        assert private.relays == [public.address]
        assert public.relay_server is not None and public.relay_server.reservations == 1
        status = await Commands(private).handle("status", {}, no_progress)
        assert status["relays"] == ["{}:{}".format(*public.address)]
        assert [(a.kind, a.host, a.port) for a in private.relay_addresses()] == [
            (AddressKind.RELAY, *public.address)
        ]
        # the records name the relay key the reservation is held under, not the identity
        relay_key = private.keeper.key.public
        assert [a.key for a in private.relay_addresses()] == [relay_key]
        assert relay_key != private.identity.public
        assert public.relay_server._holders.keys() == {relay_key}


async def no_progress(doc: dict[str, Any]) -> None:
    pass


async def raw_reserve(
    relay: tuple[str, int],
    me: RelayKey,
    source: str = "127.0.17.9",
    addressed: tuple[str, int] | None = None,
) -> tuple[socket.socket, RelayMessage]:
    """A reservation made by hand: the socket holding it and the relay's answer
    (``addressed``: the relay address the ``Reserve`` names, default ``relay``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, relay)
        await loop.sock_sendall(sock, relay_frame(signed_reserve(me, addressed or relay)))
        async with asyncio.timeout(WAIT):
            reply = await loop.sock_recv(sock, 4096)
    except BaseException:
        sock.close()
        raise
    return sock, decode_relay(reply[5:])


async def test_target_that_never_accepts_costs_the_accept_timeout(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(accept_timeout=0.3))
    target = RelayKey.generate()
    sock, answer = await raw_reserve(relay.address, target)
    try:
        assert isinstance(answer, Reserved)
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="refused the circuit: timeout"):
            await open_circuit(relay.address, target.public)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert relay.relay.circuits == 0
    finally:
        sock.close()
    # an Accept naming no pending circuit is refused at once
    loop = asyncio.get_running_loop()
    with socket.socket() as stray:
        stray.setblocking(False)
        await loop.sock_connect(stray, relay.address)
        await loop.sock_sendall(stray, relay_frame(Accept(bytes(16))))
        async with asyncio.timeout(WAIT):
            reply = decode_relay((await loop.sock_recv(stray, 4096))[5:])
    assert isinstance(reply, Refused) and reply.code == RefuseCode.BAD_REQUEST


async def test_keeper_renews_and_skips_relays_that_refuse(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(reservation_ttl=1.0))
    # a node that does not relay: it closes RELAY connections
    plain = PeerServer(Identity.generate(), "127.0.16.9", shares=ShareRegistry(lambda g, k: False))
    await plain.start()
    tg.create_task(plain.serve(), name="relaytest-plain")
    await plain.serving.wait()
    target = RelayKey.generate()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target,
        lambda: [plain.address, relay.address],
        lambda s, _: s.close(),
        on_change=changed.set,
        limits=KeeperLimits(min_renew=0.0),  # renew every half ttl, however short
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        while not keeper.relays:
            changed.clear()
            await changed.wait()
    assert keeper.relays == [relay.address]
    await asyncio.sleep(2.5)  # time passes: two and a half ttls, renewed every half ttl
    assert keeper.relays == [relay.address]
    assert relay.relay.reservations == 1
    assert relay.relay.stats["reserve.renewed"] >= 3
    assert relay.relay.stats["reserve.expired"] == 0


async def test_adopt_serves_a_socket_with_bytes_already_read(
    tg: asyncio.TaskGroup, tmp_path: Path
) -> None:
    """``adopt`` feeds the bytes read so far first (here a ClientHello cut in two), and an
    adopted socket may only start a peer session (a DIALBACK frame there is closed)."""
    data = random.Random(3).randbytes(PIECE + 10)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    me, provider = Identity.generate(), Identity.generate()
    shares = ShareRegistry(lambda g, k: g == GROUP and k == me.public, access_keys(GROUP))
    shares.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))
    server = PeerServer(provider, PROVIDER_HOST, shares=shares)
    server.dialback_sink = lambda nonce, source: pytest.fail("an adopted socket is no dial-back")
    await server.start()
    tg.create_task(server.serve(), name="relaytest-adopt")
    await server.serving.wait()
    loop = asyncio.get_running_loop()

    async def pair() -> tuple[socket.socket, socket.socket]:
        listener = socket.create_server(("127.0.23.1", 0))
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        with listener:
            connecting = asyncio.ensure_future(loop.sock_connect(client, listener.getsockname()))
            accepted, _ = await loop.sock_accept(listener)
            await connecting
        accepted.setblocking(False)
        return client, accepted

    client, far = await pair()
    opening = asyncio.ensure_future(
        open_peer_on(client, me, GROUP, cid, access_key=access_key(GROUP))
    )
    async with asyncio.timeout(WAIT):
        head = await loop.sock_recv(far, 20)  # part of the ClientHello
    server.adopt(far, head)
    async with await opening as stream, asyncio.timeout(WAIT):
        assert stream.peer_key == provider.public
        assert isinstance(await anext(stream), Bitfield)
        await stream.send(Request(1, 0, 10))
        piece = await anext(stream)
        assert isinstance(piece, Piece) and bytes(piece.data) == data[PIECE:]

    client, far = await pair()
    with client:
        server.adopt(far, dialback_frame(bytes(16)))
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionResetError):
                assert await loop.sock_recv(client, 100) == b""  # closed
    assert server.stats["drop.first_frame"] == 1


async def test_a_replayed_reserve_cannot_take_a_reservation_over(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg)
    loop = asyncio.get_running_loop()
    me = RelayKey.generate()
    when = int(time.time())
    frame = relay_frame(signed_reserve(me, relay.address, when))  # in the clear: on path
    answers = []
    with socket.socket() as first, socket.socket() as replay, socket.socket() as later:
        for sock, what in ((first, frame), (replay, frame)):
            sock.setblocking(False)
            await loop.sock_connect(sock, relay.address)
            await loop.sock_sendall(sock, what)
            async with asyncio.timeout(WAIT):
                answers.append(decode_relay((await loop.sock_recv(sock, 4096))[5:]))
        assert isinstance(answers[0], Reserved)
        assert isinstance(answers[1], Refused) and answers[1].code == RefuseCode.BAD_REQUEST
        assert relay.relay.reservations == 1
        # the key's owner, reconnecting later, takes its reservation over
        later.setblocking(False)
        await loop.sock_connect(later, relay.address)
        await loop.sock_sendall(later, relay_frame(signed_reserve(me, relay.address, when + 1)))
        async with asyncio.timeout(WAIT):
            assert isinstance(decode_relay((await loop.sock_recv(later, 4096))[5:]), Reserved)
            with contextlib.suppress(ConnectionResetError):
                assert await loop.sock_recv(first, 4096) == b""  # the older one is closed
    assert relay.relay.stats["reserve"] == 2


async def test_a_renewal_flood_on_one_connection_ends_it(tg: asyncio.TaskGroup) -> None:
    """Each renewal costs a signature check: one sent too soon after the last ends the
    connection, so one connection cannot keep the relay verifying."""
    relay = await start_relay(tg)
    loop = asyncio.get_running_loop()
    me = RelayKey.generate()
    sock, answer = await raw_reserve(relay.address, me)
    with sock:
        assert isinstance(answer, Reserved)
        frame = relay_frame(signed_reserve(me, relay.address))
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for _ in range(1000):  # the relay hangs up long before this ends
                    await loop.sock_sendall(sock, frame)
            with contextlib.suppress(ConnectionResetError):
                while await loop.sock_recv(sock, 4096):
                    pass  # until the relay closed it
    assert relay.relay.stats["drop.renewal"] == 1
    assert relay.relay.stats["reserve.renewed"] == 0


async def test_a_circuit_to_a_reader_that_stops_holds_little(tg: asyncio.TaskGroup) -> None:
    """Flow control: while the far end reads nothing, the relay stops reading the near end
    (its buffers stay near one splice read), so the sender blocks."""
    relay = await start_relay(tg)
    sock, far = await reserved_circuit(tg, relay)  # far is never read
    loop = asyncio.get_running_loop()
    flood = memoryview(bytes(64 * 1024 * 1024))  # far more than all the kernel buffers
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await loop.sock_sendall(sock, flood)
        assert 0 < relay.relay.buffered <= 2 * SPLICE_BUFFER
    finally:
        sock.close()
        far.close()


async def test_circuit_past_its_time_limit_is_cut(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(circuit_seconds=0.3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    sock, far = await reserved_circuit(tg, relay)
    try:
        await loop.sock_sendall(sock, b"ping")
        async with asyncio.timeout(WAIT):
            assert await loop.sock_recv(far, 16) == b"ping"
            with contextlib.suppress(ConnectionResetError):
                assert await loop.sock_recv(sock, 16) == b""  # cut, with nothing sent
        assert 0.3 <= loop.time() - started < 2.0
    finally:
        sock.close()
        far.close()
    assert relay.relay.stats["circuit.cut.limit"] == 1


class FloodingRelay:
    """A hostile relay: grants every ``Reserve``, then sends ``count`` ``Incoming`` at once
    (each naming ``source``); it answers each ``Accept`` with ``Ready`` and holds it open."""

    def __init__(self, count: int, source: tuple[str, int], ttl: int = 600) -> None:
        self.count, self.source, self.ttl = count, source, ttl
        self.reserves: list[float] = []  # when each Reserve arrived (loop time)
        self.reserve_conns = 0
        self.accepts = 0
        self.got_reserve = asyncio.Event()
        self._held: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        first = True
        try:
            while True:
                head = await reader.readexactly(5)
                msg = decode_relay(await reader.readexactly(int.from_bytes(head[:4], "big")))
                if isinstance(msg, Accept):
                    self.accepts += 1
                    writer.write(relay_frame(Ready()))
                    continue  # held open, never a byte more
                assert isinstance(msg, Reserve)
                self.reserves.append(asyncio.get_running_loop().time())
                self.got_reserve.set()
                self.reserve_conns += first
                peer = writer.get_extra_info("peername")
                writer.write(relay_frame(Reserved(self.ttl, peer[0], peer[1])))
                if first:
                    for _ in range(self.count):
                        writer.write(relay_frame(Incoming(os.urandom(16), *self.source)))
                first = False
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def close(self) -> None:
        for writer in self._held:
            writer.close()


async def test_keeper_bounds_the_circuits_of_a_relay_flooding_incoming(
    tg: asyncio.TaskGroup,
) -> None:
    """A relay sending Incoming after Incoming gets at most ``circuits_per_relay`` circuits
    (held open by an ``on_circuit`` that does not return), the rest are ignored, and the
    relay is dropped and not tried again for ``drop_seconds``."""
    fake = FloodingRelay(200, ("127.0.24.9", 5555))
    server = await asyncio.start_server(fake.serve, "127.0.24.1", 0)
    relay = server.sockets[0].getsockname()[:2]
    held = asyncio.Event()  # never set: each circuit handed over stays with on_circuit
    sources: list[tuple[str, int]] = []
    polled, changed = asyncio.Event(), asyncio.Event()

    async def on_circuit(sock: socket.socket, leftover: bytes, source: tuple[str, int]) -> None:
        sources.append(source)
        with sock:
            await held.wait()

    def candidates() -> list[tuple[str, int]]:
        polled.set()
        return [relay]

    keeper = RelayKeeper(
        RelayKey.generate(),
        candidates,
        on_circuit,
        retry_after=0.0,  # a relay that merely failed is tried again at once
        check_every=0.05,
        on_change=changed.set,
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    try:
        async with asyncio.timeout(WAIT):
            while keeper.stats["drop.relay"] == 0:
                changed.clear()
                await changed.wait()
            for _ in range(3):  # the keeper looks at its candidates again, and again
                polled.clear()
                await polled.wait()
        assert keeper.relays == []
        assert fake.reserve_conns == 1  # dropped, not retried
        assert keeper.stats["drop.incoming"] >= KeeperLimits().max_strikes - 1
        assert fake.accepts <= KeeperLimits().circuits_per_relay
        assert len(sources) <= KeeperLimits().circuits_per_relay
        assert set(sources) == {("127.0.24.9", 5555)}  # the source the relay reported
    finally:
        fake.close()
        server.close()


async def test_keeper_renews_no_faster_than_its_floor(tg: asyncio.TaskGroup) -> None:
    """A relay naming a zero ttl does not make the keeper sign Reserve after Reserve."""
    fake = FloodingRelay(0, ("127.0.24.9", 1), ttl=0)
    server = await asyncio.start_server(fake.serve, "127.0.24.2", 0)
    relay = server.sockets[0].getsockname()[:2]
    keeper = RelayKeeper(
        RelayKey.generate(),
        lambda: [relay],
        lambda s, _: s.close(),
        limits=KeeperLimits(min_renew=0.3),
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    try:
        async with asyncio.timeout(WAIT):
            while len(fake.reserves) < 3:
                fake.got_reserve.clear()
                await fake.got_reserve.wait()
        gaps = [b - a for a, b in zip(fake.reserves, fake.reserves[1:], strict=False)]
        assert min(gaps) >= 0.29
        assert fake.reserve_conns == 1
    finally:
        fake.close()
        server.close()
    assert renew_after(0, KeeperLimits()) == 60.0  # the default floor


async def test_on_circuit_gets_the_downloaders_address(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg)
    target = RelayKey.generate()
    got: asyncio.Queue[tuple[socket.socket, tuple[str, int]]] = asyncio.Queue()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target,
        lambda: [relay.address],
        lambda s, _, source: got.put_nowait((s, source)),
        on_change=changed.set,
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        await changed.wait()
    sock, _ = await open_circuit(relay.address, target.public, local="127.0.24.7")
    with sock:
        async with asyncio.timeout(WAIT):
            far, source = await got.get()
        far.close()
        assert source == sock.getsockname()[:2] == ("127.0.24.7", sock.getsockname()[1])


async def wait_closed(sock: socket.socket) -> None:
    """Until the far end closes or resets ``sock`` (whatever it sends is read and dropped)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        while await loop.sock_recv(sock, 4096):
            pass


async def test_idle_circuit_is_cut(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(circuit_idle=0.3))
    loop = asyncio.get_running_loop()
    sock, far = await reserved_circuit(tg, relay)
    try:
        for _ in range(3):  # traffic keeps it open past the idle time
            await loop.sock_sendall(sock, b"ping")
            async with asyncio.timeout(WAIT):
                assert await loop.sock_recv(far, 16) == b"ping"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await loop.sock_recv(far, 16)
        started = loop.time()
        async with asyncio.timeout(WAIT):
            await wait_closed(sock)
            await wait_closed(far)
        assert 0.05 <= loop.time() - started < 2.0
    finally:
        sock.close()
        far.close()
    assert relay.relay.stats["circuit.cut.idle"] == 1
    assert relay.relay.circuits == 0


async def test_half_closed_circuit_is_cut(tg: asyncio.TaskGroup) -> None:
    """One end ends its side; the other (never closing) keeps the circuit
    ``half_close_seconds`` at most, even while it still sends."""
    relay = await start_relay(tg, RelayLimits(half_close_seconds=0.3))
    loop = asyncio.get_running_loop()
    sock, far = await reserved_circuit(tg, relay)
    try:
        sock.shutdown(socket.SHUT_WR)
        started = loop.time()
        async with asyncio.timeout(WAIT):
            assert await loop.sock_recv(far, 16) == b""  # the EOF went through
            await loop.sock_sendall(far, b"still here")
            assert await loop.sock_recv(sock, 16) == b"still here"  # half-close works
            await wait_closed(sock)
        assert 0.25 <= loop.time() - started < 2.0
    finally:
        sock.close()
        far.close()
    assert relay.relay.stats["circuit.cut.half_closed"] == 1
    assert relay.relay.circuits == 0


async def test_one_downloader_source_cannot_take_every_circuit(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(max_circuits_per_source=2))
    target = RelayKey.generate()
    circuits: asyncio.Queue[socket.socket] = asyncio.Queue()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target, lambda: [relay.address], lambda s, _: circuits.put_nowait(s), on_change=changed.set
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        await changed.wait()
    opened: list[socket.socket] = []
    try:
        for _ in range(2):
            opened.append((await open_circuit(relay.address, target.public, local="127.0.25.1"))[0])
        with pytest.raises(ProtocolError, match="refused the circuit: limit"):
            await open_circuit(relay.address, target.public, local="127.0.25.1")
        opened.append((await open_circuit(relay.address, target.public, local="127.0.25.2"))[0])
        async with asyncio.timeout(WAIT):  # the target's ends of the three
            for _ in range(3):
                opened.append(await circuits.get())
    finally:
        for sock in opened:
            sock.close()
    assert relay.relay.stats["refuse.limit"] == 1


async def test_one_holder_source_cannot_take_every_circuit(tg: asyncio.TaskGroup) -> None:
    """Circuits to all the reservations held from one source count together."""
    relay = await start_relay(tg, RelayLimits(max_circuits_per_holder=2))
    keys = [RelayKey.generate() for _ in range(3)]
    held = [await raw_reserve(relay.address, k, source="127.0.25.10") for k in keys[:2]]
    held.append(await raw_reserve(relay.address, keys[2], source="127.0.25.11"))
    loop = asyncio.get_running_loop()
    pending = []
    try:
        assert all(isinstance(answer, Reserved) for _, answer in held)
        # the holders never accept: each Connect waits, holding its slot meanwhile
        for n, k in enumerate(keys[:2]):
            pending.append(
                asyncio.ensure_future(
                    open_circuit(relay.address, k.public, local=f"127.0.25.{20 + n}")
                )
            )
        async with asyncio.timeout(WAIT):
            for sock, _ in held[:2]:  # each got its Incoming: both circuits are counted
                assert (await loop.sock_recv(sock, 4096))[4] == FrameType.RELAY
        with pytest.raises(ProtocolError, match="refused the circuit: limit"):
            await open_circuit(relay.address, keys[0].public, local="127.0.25.30")
        pending.append(
            asyncio.ensure_future(open_circuit(relay.address, keys[2].public, local="127.0.25.31"))
        )
        async with asyncio.timeout(WAIT):  # another holder's key still gets one
            assert (await loop.sock_recv(held[2][0], 4096))[4] == FrameType.RELAY
    finally:
        for task in pending:
            task.cancel()
        for sock, _ in held:
            sock.close()
    assert relay.relay.stats["refuse.limit"] == 1


async def test_reservations_from_one_network_are_capped(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(
        tg, RelayLimits(max_reservations_per_source=4, max_reservations_per_network=3)
    )
    held = []
    try:
        for n in range(4):
            held.append(await raw_reserve(relay.address, RelayKey.generate(), f"127.0.26.{n + 1}"))
        held.append(await raw_reserve(relay.address, RelayKey.generate(), "127.0.27.1"))
        answers = [type(answer) for _, answer in held]
    finally:
        for sock, _ in held:
            sock.close()
    assert answers == [Reserved, Reserved, Reserved, Refused, Reserved]


async def test_a_reserve_for_another_relay_is_refused(tg: asyncio.TaskGroup) -> None:
    """A relay the node uses cannot replay the node's Reserve to another relay: the
    signature covers the relay's address, and a relay takes only its own."""
    relay = await start_relay(tg)
    me = RelayKey.generate()
    elsewhere = ("127.0.28.1", 4601)  # the relay the Reserve was meant for
    sock, answer = await raw_reserve(relay.address, me, addressed=elsewhere)
    sock.close()
    assert isinstance(answer, Refused) and answer.code == RefuseCode.BAD_REQUEST
    assert "another relay" in answer.text
    # the same address with the signature changed to name this relay: a bad signature
    forged = dataclasses.replace(
        signed_reserve(me, elsewhere), host=relay.address[0], port=relay.address[1]
    )
    loop = asyncio.get_running_loop()
    with socket.socket() as raw:
        raw.setblocking(False)
        await loop.sock_connect(raw, relay.address)
        await loop.sock_sendall(raw, relay_frame(forged))
        async with asyncio.timeout(WAIT):
            reply = decode_relay((await loop.sock_recv(raw, 4096))[5:])
    assert isinstance(reply, Refused) and reply.text == "bad signature"
    assert relay.relay.reservations == 0


async def test_a_reserve_for_an_own_address_is_accepted(tg: asyncio.TaskGroup) -> None:
    """Behind a forwarded port the node's address (``own_addresses``) is not the socket's."""
    public = ("203.0.113.5", 4000)
    server = PeerServer(Identity.generate(), RELAY_HOST, shares=ShareRegistry(lambda g, k: False))
    relay = RelayServer(own_addresses=lambda: [public])
    server.relay_handler = relay.handle
    await server.start()
    tg.create_task(server.serve(), name="relaytest-relay")
    await server.serving.wait()
    sock, answer = await raw_reserve(server.address, RelayKey.generate(), addressed=public)
    sock.close()
    assert isinstance(answer, Reserved)
    sock, answer = await raw_reserve(
        server.address, RelayKey.generate(), addressed=("203.0.113.5", 4001)
    )
    sock.close()
    assert isinstance(answer, Refused)


async def test_a_keeper_reserves_again_soon_after_its_relay_restarts(
    tg: asyncio.TaskGroup,
) -> None:
    """A reservation that worked and then ended (the relay restarted) is asked for again
    after ``REHOLD_AFTER`` seconds, not after ``retry_after`` (60 s): members behind NAT
    are unreachable while they hold no relay."""
    first = await start_relay(tg)
    host, port = first.address
    target = RelayKey.generate()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target,
        lambda: [(host, port)],
        lambda s, _: s.close(),
        on_change=changed.set,
        check_every=1.0,
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        while not keeper.relays:
            changed.clear()
            await changed.wait()
    first.server.close()  # the relay stops ...
    async with asyncio.timeout(WAIT):
        while keeper.relays:
            changed.clear()
            await changed.wait()
    again = PeerServer(Identity.generate(), host, port, shares=ShareRegistry(lambda g, k: False))
    again.relay_handler = RelayServer().handle  # ... and is back on the same address
    await again.start()
    tg.create_task(again.serve(), name="relaytest-relay-again")
    lost = asyncio.get_running_loop().time()
    async with asyncio.timeout(REHOLD_AFTER + 5.0):
        while not keeper.relays:
            changed.clear()
            await changed.wait()
    assert asyncio.get_running_loop().time() - lost < keeper.retry_after
