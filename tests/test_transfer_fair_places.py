"""Review of issue #13: one member or a few addresses cannot take every place on a server.

Session places (authenticated connections) are shared out per member key and per source
address, and a full server gives the place of the heaviest holder to a newcomer; the
handshake places are taken back from the source address holding the most, not from
whoever came first. Real ``PeerServer`` and clients on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.errors import ProtocolError
from dhtshare.identity import Identity
from dhtshare.sim.halfopen import HalfOpen
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.aio.peer import PeerProtocol, PeerStream
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import (
    Bitfield,
    HandshakeComplete,
    Keepalive,
    PeerConnection,
    Piece,
    Reason,
    Reject,
    Request,
    Role,
)

pytestmark = pytest.mark.timeout(90)

GROUP = bytes(range(32))
PIECE = 256 * 1024
DATA = random.Random(7).randbytes(2 * 1024 * 1024)


@asynccontextmanager
async def serving(
    tmp_path: Path, **options: int
) -> AsyncIterator[tuple[PeerServer, ProviderAddr, bytes]]:
    """A real server sharing a 2 MiB file with every key; yields it, its address and the
    file's content id."""
    path = tmp_path / "src.bin"
    path.write_bytes(DATA)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    identity = Identity.generate()
    registry = ShareRegistry(lambda group, key: group == GROUP, access_keys(GROUP))
    registry.add(Share(GROUP, cid, path, FileLayout(len(DATA), PIECE), hashes))
    server = PeerServer(identity, shares=registry, **options)  # type: ignore[arg-type]
    host, port = await server.start()
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        await server.serving.wait()
    try:
        yield server, ProviderAddr(identity.public, host, port), cid
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def session(
    addr: ProviderAddr, cid: bytes, member: Identity, source: str
) -> tuple[PeerStream, Bitfield | Reject | None]:
    """A member's session from ``source``: the stream and its first message (the server's
    Bitfield if it got a place, else its Reject; ``None``: closed during the handshake)."""
    conn = PeerConnection(
        Role.CLIENT,
        member.signing_key,
        group_id=GROUP,
        content_id=cid,
        access_key=access_key(GROUP),
    )
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        _, protocol = await loop.create_connection(
            lambda: PeerProtocol(conn), addr.host, addr.port, local_addr=(source, 0)
        )
        stream = PeerStream(protocol)
        try:
            await stream.handshake(5)
            first = await anext(stream)
        except ProtocolError:
            await stream.aclose()
            return stream, None
        except BaseException:
            await stream.aclose()
            raise
    assert isinstance(first, Bitfield | Reject), first
    return stream, first


async def test_one_member_flooding_sessions_leaves_room_for_another_members_download(
    tmp_path: Path,
) -> None:
    flooder, honest = Identity.generate(), Identity.generate()
    async with serving(tmp_path) as (server, addr, cid):
        held: list[PeerStream] = []
        try:
            placed = 0
            for _ in range(server.max_connections + 8):  # one key, one address, bounded
                stream, first = await session(addr, cid, flooder, "127.0.8.2")
                if isinstance(first, Bitfield):
                    placed += 1
                    held.append(stream)
                else:
                    assert first is None or first.reason == Reason.BUSY
                    await stream.aclose()
            assert placed >= 1

            mine, first = await session(addr, cid, honest, "127.0.8.3")
            await mine.aclose()
            assert isinstance(first, Bitfield), "the flooding member took every place"

            async def providers() -> list[ProviderAddr]:
                return [addr]

            info = FileInfo(GROUP, cid, "out.bin", len(DATA), PIECE)
            dl = Download(honest, info, tmp_path / "out", providers=providers,
                          access_key=access_key, is_member=lambda g, k: True,
                          options=DownloadOptions())  # fmt: skip
            async with asyncio.timeout(20):
                got = await dl.run()
            assert got.read_bytes() == DATA
            assert placed == server.max_sessions_per_key < server.max_connections
        finally:
            for stream in held:
                await stream.aclose()


async def test_many_keys_from_one_address_hold_a_bounded_share_of_places(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (server, addr, cid):
        held: list[PeerStream] = []
        try:
            placed, attempts = 0, 24
            for _ in range(attempts):
                stream, first = await session(addr, cid, Identity.generate(), "127.0.9.2")
                if isinstance(first, Bitfield):
                    placed += 1
                    held.append(stream)
                else:
                    await stream.aclose()
            assert placed < attempts, "one address took a place for every key it brought"
            assert placed == server.max_sessions_per_ip < server.max_connections
            stream, first = await session(addr, cid, Identity.generate(), "127.0.9.3")
            held.append(stream)
            assert isinstance(first, Bitfield)  # another address still gets a place
        finally:
            for stream in held:
                await stream.aclose()


async def test_full_server_gives_the_heaviest_members_place_to_a_newcomer(
    tmp_path: Path,
) -> None:
    flooder, honest = Identity.generate(), Identity.generate()
    async with serving(tmp_path, max_connections=4) as (server, addr, cid):
        held: list[PeerStream] = []
        try:
            for _ in range(4):  # the flooder fills the server
                stream, first = await session(addr, cid, flooder, "127.0.10.2")
                held.append(stream)
                assert isinstance(first, Bitfield)
            assert server.connections == 4

            mine, first = await session(addr, cid, honest, "127.0.10.3")
            held.append(mine)
            assert isinstance(first, Bitfield), "a full server refused the newcomer"

            again, first = await session(addr, cid, flooder, "127.0.10.2")
            held.append(again)
            assert isinstance(first, Reject) and first.reason == Reason.BUSY

            await mine.send(Request(0, 0, 16 * 1024))  # the newcomer is served
            async with asyncio.timeout(5):
                async for event in mine:
                    if not isinstance(event, Bitfield | Keepalive):
                        break
            assert isinstance(event, Piece) and event.data == DATA[: 16 * 1024]
        finally:
            for stream in held:
                await stream.aclose()


async def test_handshake_flood_from_a_few_addresses_does_not_evict_an_honest_handshake(
    tmp_path: Path,
) -> None:
    sources = [f"127.0.11.{i}" for i in range(2, 10)]  # 8 addresses
    async with serving(tmp_path) as (server, addr, cid):
        cap, per_ip = server.max_handshakes, server.max_handshakes_per_ip
        assert len(sources) * per_ip == cap  # the 8 addresses can hold every place
        flood = HalfOpen()
        reader, writer = await asyncio.open_connection(
            addr.host, addr.port, local_addr=("127.0.11.20", 0)
        )  # the honest client connects first and is slow to say hello
        try:
            rounds = 2 * cap // len(sources)
            for _ in range(rounds):  # 128 connections, round robin, as fast as accepted
                for source in sources:
                    await flood.open(addr.host, addr.port, source)
            async with asyncio.timeout(4):  # before the 5 s handshake deadline
                await flood.until_closed(rounds * len(sources) - cap)

            conn = PeerConnection(
                Role.CLIENT,
                Identity.generate().signing_key,
                group_id=GROUP,
                content_id=cid,
                access_key=access_key(GROUP),
            )
            writer.write(conn.initiate())
            async with asyncio.timeout(5):
                while (event := conn.next_event()) is None:
                    data = await reader.read(4096)
                    assert data, "the honest handshake was evicted by the flood"
                    conn.receive_data(data)
            assert isinstance(event, HandshakeComplete)
            writer.write(conn.data_to_send())
            async with asyncio.timeout(5):
                while (event := conn.next_event()) is None:
                    data = await reader.read(4096)
                    assert data, "the server closed the honest session"
                    conn.receive_data(data)
            assert isinstance(event, Bitfield)
            assert server.handshakes <= cap
        finally:
            writer.close()
            await flood.close()
