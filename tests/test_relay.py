"""Circuit relays over real sockets on 127.x: reservations, a relayed peer session, limits.

The relay is a ``PeerServer`` with no shares whose ``relay_handler`` is a ``RelayServer``
(as on a node); the provider is reached only through its reservation (``RelayKeeper``,
circuits handed to ``PeerServer.adopt``); the downloader opens the circuit
(``open_circuit``) and runs the ordinary client handshake on it (``open_peer_on``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.nodes import NodeCluster

from dhtshare import crypto
from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.errors import ProtocolError
from dhtshare.identity import Identity
from dhtshare.node.commands import Commands
from dhtshare.reach.aio.relay import SPLICE_BUFFER, RelayKeeper, RelayServer, open_circuit
from dhtshare.reach.autonat import ReachState, Verdict
from dhtshare.reach.relaylimits import RelayLimits
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
    RefuseCode,
    Refused,
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
    target = Identity.generate()
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
        identity, lambda: [relay.address], server.adopt, on_change=changed.set, local=PROVIDER_HOST
    )
    tg.create_task(keeper.run(), name="relaytest-keeper")
    async with asyncio.timeout(WAIT):
        while not keeper.relays:
            changed.clear()
            await changed.wait()
    return server, keeper


def windows(data: bytes, size: int = 64) -> set[bytes]:
    """Every ``size``-byte run of ``data`` at a multiple of ``size``: any plaintext run of
    ``2 * size - 1`` bytes or more contains one."""
    return {data[i : i + size] for i in range(0, len(data) - size + 1, size)}


def hits(captured: bytes, runs: set[bytes], size: int = 64) -> int:
    return sum(1 for i in range(len(captured) - size + 1) if captured[i : i + size] in runs)


class WireCapture:
    """Every TCP payload to or from ``host`` on the loopback interface, per flow, as the
    kernel carried it (an ``AF_PACKET`` socket: needs root), read by a thread."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        try:
            with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (33): root may exceed rmem_max
                self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
            self.sock.bind(("lo", 0))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(0.05)
        self.host = socket.inet_aton(host)
        self.flows: dict[bytes, bytearray] = {}
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                frame, where = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                if self._stop.is_set():
                    return  # stopped, and nothing more waits
                continue
            if where[2] != socket.PACKET_HOST:  # lo shows each packet leaving and arriving
                continue
            ip = frame[14:]  # after the (all-zero) Ethernet header of lo
            if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                continue
            if self.host not in (ip[12:16], ip[16:20]):
                continue
            tcp = ip[(ip[0] & 15) * 4 : int.from_bytes(ip[2:4], "big")]
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                self.packets += 1
                self.flows.setdefault(ip[12:20] + tcp[:4], bytearray()).extend(payload)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        # PACKET_STATISTICS (SOL_PACKET 263, 6): packets seen, and dropped for want of room
        self.drops = struct.unpack("II", self.sock.getsockopt(263, 6, 8))[1]
        self.sock.close()


def wire_capture(host: str) -> WireCapture | None:
    try:
        return WireCapture(host)
    except (OSError, AttributeError):  # not root, or not Linux
        return None


async def test_relayed_download_and_the_relay_sees_no_plaintext(
    tg: asyncio.TaskGroup, tmp_path: Path
) -> None:
    data = random.Random(16).randbytes(6 * PIECE + 777)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    me, provider = Identity.generate(), Identity.generate()
    shares = ShareRegistry(lambda g, k: g == GROUP and k in {me.public, provider.public})
    shares.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))

    relay = await start_relay(tg)
    captured: list[bytes] = []
    relay.relay.tap = captured.append
    wire = wire_capture(RELAY_HOST)
    try:
        await relayed_download(tg, relay, shares, provider, me, data, hashes)
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
    if wire is None:
        pytest.skip("no AF_PACKET capture (needs root on Linux); the tap found no plaintext")
    flows = [bytes(f) for f in wire.flows.values()]
    assert wire.drops == 0  # the capture missed nothing
    assert sum(map(len, flows)) > 2 * len(data)  # in from the provider, out to us
    assert any(provider.public in f for f in flows)  # the plaintext Reserve and Connect
    assert sum(hits(f, runs) for f in flows) == 0


async def relayed_download(
    tg: asyncio.TaskGroup,
    relay: Relay,
    shares: ShareRegistry,
    provider: Identity,
    me: Identity,
    data: bytes,
    hashes: list[bytes],
) -> None:
    """Fetch the whole file from ``provider``, reached only through ``relay``."""
    cid = merkle_root(hashes)
    server, keeper = await start_provider(tg, relay, shares, provider)
    assert keeper.relays == [relay.address]
    assert keeper.observed[relay.address][0] == PROVIDER_HOST
    assert relay.relay.reservations == 1

    sock, rest = await open_circuit(relay.address, provider.public)
    assert rest == b""
    got = bytearray(len(data))
    async with await open_peer_on(sock, me, GROUP, cid) as stream:
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


async def test_reservation_flood_from_one_address_is_capped(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(max_reservations_per_source=4))
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    answers = []
    try:
        for _ in range(7):
            me = Identity.generate()
            sock = socket.socket()
            sock.bind(("127.0.17.1", 0))
            sock.setblocking(False)
            held.append(sock)
            await loop.sock_connect(sock, relay.address)
            when = int(time.time())
            sig = crypto.sign(me.signing_key, RESERVE_PURPOSE, reserve_message(me.public, when))
            await loop.sock_sendall(sock, relay_frame(Reserve(me.public, when, sig)))
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
    victim, forger = Identity.generate(), Identity.generate()
    when = int(time.time())
    sig = crypto.sign(forger.signing_key, RESERVE_PURPOSE, reserve_message(victim.public, when))
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, relay.address)
        await loop.sock_sendall(sock, relay_frame(Reserve(victim.public, when, sig)))
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
    """DIALBACK goes to the sink; a RELAY frame on a server that does not relay, garbage,
    and an oversized first frame are closed; the server goes on serving."""
    server = PeerServer(Identity.generate(), RELAY_HOST, shares=ShareRegistry(lambda g, k: False))
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
    server.dialback_sink = lambda nonce, source: got.put_nowait((nonce, source))
    await server.start()
    tg.create_task(server.serve(), name="relaytest-demux")
    await server.serving.wait()
    loop = asyncio.get_running_loop()

    async def send_first(data: bytes) -> bytes:
        with socket.socket() as sock:
            sock.bind(("127.0.19.1", 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, server.address)
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(WAIT):
                try:
                    return await loop.sock_recv(sock, 4096)  # b"": the server closed
                except ConnectionResetError:
                    return b""

    nonce = bytes(range(16))
    assert await send_first(dialback_frame(nonce)) == b""
    async with asyncio.timeout(WAIT):
        assert (await got.get())[0] == nonce
    assert await send_first(relay_frame(Reserved(1, "127.0.0.1", 1))) == b""
    assert await send_first(encode_frame(99, b"x" * 10)) == b""
    assert await send_first((10_000).to_bytes(4, "big") + bytes([1])) == b""
    assert server.stats["drop.first_frame"] == 3
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


async def no_progress(doc: dict[str, Any]) -> None:
    pass


async def raw_reserve(
    relay: tuple[str, int], me: Identity, source: str = "127.0.17.9"
) -> tuple[socket.socket, RelayMessage]:
    """A reservation made by hand: the socket holding it and the relay's answer."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, relay)
        when = int(time.time())
        sig = crypto.sign(me.signing_key, RESERVE_PURPOSE, reserve_message(me.public, when))
        await loop.sock_sendall(sock, relay_frame(Reserve(me.public, when, sig)))
        async with asyncio.timeout(WAIT):
            reply = await loop.sock_recv(sock, 4096)
    except BaseException:
        sock.close()
        raise
    return sock, decode_relay(reply[5:])


async def test_target_that_never_accepts_costs_the_accept_timeout(tg: asyncio.TaskGroup) -> None:
    relay = await start_relay(tg, RelayLimits(accept_timeout=0.3))
    target = Identity.generate()
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
    target = Identity.generate()
    changed = asyncio.Event()
    keeper = RelayKeeper(
        target,
        lambda: [plain.address, relay.address],
        lambda s, _: s.close(),
        on_change=changed.set,
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
    shares = ShareRegistry(lambda g, k: g == GROUP and k == me.public)
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
    opening = asyncio.ensure_future(open_peer_on(client, me, GROUP, cid))
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
    me = Identity.generate()
    when = int(time.time())
    sig = crypto.sign(me.signing_key, RESERVE_PURPOSE, reserve_message(me.public, when))
    frame = relay_frame(Reserve(me.public, when, sig))  # in the clear: anyone on path has it
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
        sig = crypto.sign(me.signing_key, RESERVE_PURPOSE, reserve_message(me.public, when + 1))
        later.setblocking(False)
        await loop.sock_connect(later, relay.address)
        await loop.sock_sendall(later, relay_frame(Reserve(me.public, when + 1, sig)))
        async with asyncio.timeout(WAIT):
            assert isinstance(decode_relay((await loop.sock_recv(later, 4096))[5:]), Reserved)
            with contextlib.suppress(ConnectionResetError):
                assert await loop.sock_recv(first, 4096) == b""  # the older one is closed
    assert relay.relay.stats["reserve"] == 2


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
