"""Review of issue #13, item 10: a refused peer never holds a session place.

A handshake costs any key nothing. A peer that completes it and is then refused (not a
member, or a file the server does not share) used to count among ``max_connections``
while its Reject lingered: one address with throw-away keys kept all 128 places full and
every member was refused as busy. Real server and clients on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import pytest
from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import PeerConnection, Role

pytestmark = pytest.mark.timeout(60)

GROUP = bytes(range(32))
PIECE = 256 * 1024


async def authenticate_and_hold(
    host: str, port: int, content_id: bytes, held: list[asyncio.StreamWriter]
) -> None:
    """Finish a handshake under a throw-away key from 127.0.6.2, then never close."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.6.2", 0))
    held.append(writer)
    conn = PeerConnection(
        Role.CLIENT,
        Identity.generate().signing_key,
        group_id=GROUP,
        content_id=content_id,
        access_key=access_key(GROUP),
    )
    writer.write(conn.initiate())
    while conn.next_event() is None:
        data = await reader.read(4096)
        if not data:
            return
        conn.receive_data(data)
    writer.write(conn.data_to_send())


async def test_non_members_from_one_address_cannot_fill_the_session_places(
    tmp_path: Path,
) -> None:
    data = random.Random(7).randbytes(2 * 1024 * 1024)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    member = Identity.generate()
    registry = ShareRegistry(
        lambda group, key: group == GROUP and key == member.public, access_keys(GROUP)
    )
    registry.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))
    identity = Identity.generate()
    server = PeerServer(identity, shares=registry, max_connections=16)
    host, port = await server.start()
    serving = asyncio.create_task(server.serve())
    held: list[asyncio.StreamWriter] = []
    try:
        async with asyncio.timeout(5):
            await server.serving.wait()
        for _ in range(8):  # 48 handshakes from one address, 8 at a time
            async with asyncio.timeout(5):
                await asyncio.gather(
                    *(authenticate_and_hold(host, port, cid, held) for _ in range(6)),
                    return_exceptions=True,
                )
        assert server.connections == 0  # the refused hold no session place

        async def providers() -> list[ProviderAddr]:
            return [ProviderAddr(identity.public, host, port)]

        info = FileInfo(GROUP, cid, "out.bin", len(data), PIECE)
        download = Download(
            member,
            info,
            tmp_path / "out",
            providers=providers,
            access_key=access_key,
            is_member=lambda g, k: True,
            options=DownloadOptions(provider_timeout=5),
        )
        async with asyncio.timeout(20):
            got = await download.run()
        assert got.read_bytes() == data
    finally:
        for writer in held:
            writer.close()
        for _ in range(50):  # the lingering Rejects see the close (at most 5 s)
            if server.handshakes == 0 and server.connections == 0:
                break
            await asyncio.sleep(0.1)
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
