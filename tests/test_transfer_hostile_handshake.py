"""Connections that never authenticate (issue #13, item 10).

Before the handshake is done a peer is nobody: it may make the node hold a frame of a
few hundred bytes, for a few seconds, on a bounded number of connections. Checked on
the sans-I/O connection and against a real ``PeerServer`` on 127.0.0.0/8, with an
honest download going on beside the flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.errors import RemoteProtocolError
from dhtshare.identity import Identity
from dhtshare.sim.halfopen import HalfOpen
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.aio.serve import PeerServer, handshake_source
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import FrameType, PeerConnection, Reason, Role, State

GROUP = bytes(range(32))
PIECE = 256 * 1024
CAP = 64  # PeerServer's default max_handshakes
DEADLINE = 5.0  # PeerServer's default handshake_timeout: "a few seconds"
BIG_HELLO = struct.pack(">IB", 1024 * 1024, FrameType.CLIENT_HELLO)  # announces 1 MiB


def handshaken_pair() -> tuple[PeerConnection, PeerConnection]:
    client = PeerConnection(
        Role.CLIENT,
        Identity.generate().signing_key,
        group_id=GROUP,
        content_id=bytes(32),
        access_key=access_key(GROUP),
    )
    server = PeerConnection(
        Role.SERVER, Identity.generate().signing_key, access_keys=access_keys(GROUP)
    )
    server.receive_data(client.initiate())
    assert server.next_event() is None
    client.receive_data(server.data_to_send())
    assert client.next_event() is not None
    server.receive_data(client.data_to_send())
    assert server.next_event() is not None
    return client, server


def test_frame_limit_and_read_room_depend_on_authentication() -> None:
    server = PeerConnection(
        Role.SERVER, Identity.generate().signing_key, access_keys=access_keys(GROUP)
    )
    assert len(server.get_buffer(64 * 1024)) <= 1024  # no 64 KiB per half-open connection
    server.receive_data(BIG_HELLO)
    with pytest.raises(RemoteProtocolError) as err:
        server.next_event()  # at the header, before any of the payload
    assert err.value.reason == Reason.FRAME_TOO_LARGE

    client, server = handshaken_pair()
    assert server.state is State.OPEN and client.state is State.OPEN
    assert len(server.get_buffer(64 * 1024)) >= 64 * 1024  # a member reads in large chunks
    server.receive_data(struct.pack(">IB", 1024 * 1024, FrameType.SEALED))
    assert server.next_event() is None  # a member may announce a block-sized frame


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[PeerServer, ProviderAddr, Path, bytes]]:
    """A real server sharing a 2 MiB file with every member; yields it, its address,
    the file and the file's content id."""
    data = random.Random(7).randbytes(2 * 1024 * 1024)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    layout = FileLayout(len(data), PIECE)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    identity = Identity.generate()
    registry = ShareRegistry(lambda group, key: group == GROUP, access_keys(GROUP))
    registry.add(Share(GROUP, cid, path, layout, hashes))
    server = PeerServer(identity, shares=registry)
    host, port = await server.start()
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        await server.serving.wait()
    try:
        yield server, ProviderAddr(identity.public, host, port), path, cid
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_unauthenticated_peer_announcing_a_large_frame_is_closed_at_once(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as (_, addr, _path, _cid):
        flood = HalfOpen()
        try:
            await flood.open(addr.host, addr.port, "127.0.0.1", BIG_HELLO + bytes(4096))
            async with asyncio.timeout(2):  # the handshake deadline is 5 s: not waited for
                await flood.until_closed(1)
        finally:
            await flood.close()


async def test_half_open_flood_is_capped_and_an_honest_download_completes(
    tmp_path: Path,
) -> None:
    sources = [f"127.0.{i}.{j}" for i in (3, 4) for j in range(2, 12)]  # 20 addresses
    per_source = 8
    async with serving(tmp_path) as (server, addr, path, cid):
        flood = HalfOpen()
        try:
            for source in sources:  # 160 connections, each 50 bytes into a ClientHello
                for _ in range(per_source):
                    await flood.open(
                        addr.host, addr.port, source, struct.pack(">IB", 154, 1) + bytes(45)
                    )
            # one address past its share is refused
            for _ in range(4):
                await flood.open(addr.host, addr.port, "127.0.5.2")
            for _ in range(per_source + 4):
                await flood.open(addr.host, addr.port, "127.0.5.3")
            total = len(sources) * per_source + 4 + per_source + 4
            async with asyncio.timeout(3):  # well before the 5 s handshake deadline
                await flood.until_closed(total - CAP)
            assert server.handshakes <= server.max_handshakes == CAP

            me = Identity.generate()

            async def providers() -> list[ProviderAddr]:
                return [addr]

            info = FileInfo(GROUP, cid, "out.bin", path.stat().st_size, PIECE)
            dl = Download(me, info, tmp_path / "out", providers=providers,
                          access_key=access_key, is_member=lambda g, k: True,
                          options=DownloadOptions())  # fmt: skip
            async with asyncio.timeout(20):
                got = await dl.run()
            assert got.read_bytes() == path.read_bytes()
        finally:
            await flood.close()


async def test_slow_loris_is_closed_after_the_handshake_deadline(tmp_path: Path) -> None:
    hello = struct.pack(">IB", 154, 1) + bytes(154)
    async with serving(tmp_path) as (server, addr, _path, _cid):
        flood = HalfOpen()
        try:
            await flood.open(addr.host, addr.port, "127.0.0.1", hello[:1])
            writer = flood.writers[0]

            async def drip() -> None:  # one byte every half second: never finishes
                for byte in hello[1:]:
                    await asyncio.sleep(0.5)
                    writer.write(bytes([byte]))

            dripping = asyncio.create_task(drip())
            try:
                async with asyncio.timeout(DEADLINE + 3):
                    await flood.until_closed(1)
            finally:
                dripping.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await dripping
            assert server.handshake_timeout == DEADLINE
        finally:
            await flood.close()


def test_per_address_cap_counts_an_ipv6_64_as_one_address() -> None:
    one_64 = "2001:db8::/64"
    assert handshake_source("2001:db8::1") == handshake_source("2001:db8::ffff:1") == one_64
    assert handshake_source("2001:db8:0:1::1") != handshake_source("2001:db8::1")
    assert handshake_source("::ffff:10.0.0.1") == handshake_source("10.0.0.1") == "10.0.0.1"
    assert handshake_source("127.0.0.1") != handshake_source("127.0.0.2")
