"""The asyncio adapter and the server, driven by a hand-written client over real TCP."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.errors import NodeError
from dhtshare.identity import Identity, format_id
from dhtshare.transfer.aio.peer import PeerStream, open_peer
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.status import Complete, Downloading, Failed, Paused
from dhtshare.wire import (
    Bitfield,
    Cancel,
    Event,
    FrameDecoder,
    FrameType,
    GetHashes,
    HashList,
    Have,
    Piece,
    Reason,
    Reject,
    Request,
    decode_message,
    encode_frame,
)

PIECE = 256 * 1024
GROUP = bytes(range(32))


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes, list[bytes]]:
    data = random.Random(7).randbytes(5 * PIECE + 1000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return path, data, hash_file(path, PIECE)


class Node:
    def __init__(self, server: PeerServer, registry: ShareRegistry, members: set[bytes]) -> None:
        self.server, self.registry, self.members = server, registry, members


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    members: set[bytes] = set()
    registry = ShareRegistry(lambda g, k: g == GROUP and k in members, access_keys(GROUP))
    server = PeerServer(Identity.generate(), shares=registry)
    members.add(server.identity.public)
    await server.start()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(server.serve())
        yield Node(server, registry, members)
        task.cancel()


async def connect(node: Node, me: Identity, content_id: bytes) -> PeerStream:
    host, port = node.server.address
    return await open_peer(me, host, port, GROUP, content_id, access_key=access_key(GROUP))


async def next_event(stream: PeerStream) -> Event:
    async with asyncio.timeout(5):
        return await anext(stream)


def member(node: Node) -> Identity:
    me = Identity.generate()
    node.members.add(me.public)
    return me


async def test_serves_bitfield_hashes_and_blocks(
    node: Node, source: tuple[Path, bytes, list[bytes]]
) -> None:
    path, data, hashes = source
    layout = FileLayout(len(data), PIECE)
    cid = merkle_root(hashes)
    node.registry.add(Share(GROUP, cid, path, layout, hashes))
    me = member(node)
    async with await connect(node, me, cid) as stream:
        assert stream.peer_key == node.server.identity.public
        bits = await next_event(stream)
        assert isinstance(bits, Bitfield) and bits.pieces() == list(range(6))
        await stream.send(GetHashes(0, 6))
        got = await next_event(stream)
        assert isinstance(got, HashList) and list(got.hashes) == hashes
        await stream.send(Request(5, 0, 1000))
        await stream.send(Request(2, 4096, 8192))
        first, second = await next_event(stream), await next_event(stream)
        assert isinstance(first, Piece) and bytes(first.data) == data[5 * PIECE :]
        assert isinstance(second, Piece)
        assert bytes(second.data) == data[2 * PIECE + 4096 : 2 * PIECE + 4096 + 8192]
    assert node.server.uploaded[me.public] == 1000 + 8192


async def test_partial_share_serves_only_what_it_has_and_announces_more(
    node: Node, source: tuple[Path, bytes, list[bytes]]
) -> None:
    path, data, hashes = source
    cid = merkle_root(hashes)
    share = node.registry.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes, {1}))
    async with await connect(node, member(node), cid) as stream:
        bits = await next_event(stream)
        assert isinstance(bits, Bitfield) and bits.pieces() == [1]
        share.add_piece(3)
        assert await next_event(stream) == Have(3)
        await stream.send(Request(4, 0, 16))  # never offered
        reject = await next_event(stream)
        assert isinstance(reject, Reject) and reject.reason == Reason.PROTOCOL
        assert [e async for e in stream] == []  # the stream ends after a Reject
        assert not stream.open


async def test_unknown_file_and_non_member_are_rejected(
    node: Node, source: tuple[Path, bytes, list[bytes]]
) -> None:
    path, data, hashes = source
    cid = merkle_root(hashes)
    node.registry.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))
    async with await connect(node, member(node), bytes(32)) as stream:
        reject = await next_event(stream)
        assert isinstance(reject, Reject) and reject.reason == Reason.UNKNOWN_CONTENT
    async with await connect(node, Identity.generate(), cid) as stream:
        reject = await next_event(stream)
        assert isinstance(reject, Reject) and reject.reason == Reason.NOT_MEMBER
        assert "not a member" in reject.text
    assert node.server.stats["refuse.not_member"] == 1
    assert sum(node.server.uploaded.values()) == 0


async def test_cancelled_requests_are_not_served(
    node: Node, source: tuple[Path, bytes, list[bytes]]
) -> None:
    path, data, hashes = source
    cid = merkle_root(hashes)
    node.registry.add(Share(GROUP, cid, path, FileLayout(len(data), PIECE), hashes))
    node.server.set_upload_rate(4 * PIECE)  # a block every 0.25 s after the first
    async with await connect(node, member(node), cid) as stream:
        await next_event(stream)  # Bitfield
        for i in range(5):
            stream.send_nowait(Request(i, 0, PIECE))
        stream.send_nowait(Cancel(4, 0, PIECE))
        stream.send_nowait(Cancel(3, 0, PIECE))
        stream.send_nowait(Request(5, 0, 16))
        got = [await next_event(stream) for _ in range(4)]
    indices = [e.index for e in got if isinstance(e, Piece)]
    # 1 and 2 may be read ahead by then; the cancelled 3 and 4 are never sent
    assert indices == [0, 1, 2, 5]


async def test_server_port_in_use_is_a_node_error(node: Node) -> None:
    _, port = node.server.address
    other = PeerServer(Identity.generate(), port=port, shares=ShareRegistry(lambda g, k: True))
    with pytest.raises(NodeError, match="cannot listen"):
        await other.start()


async def test_share_checks_its_hashes(source: tuple[Path, bytes, list[bytes]]) -> None:
    path, data, hashes = source
    with pytest.raises(ValueError, match="content id"):
        Share(GROUP, bytes(32), path, FileLayout(len(data), PIECE), hashes)


async def test_garbage_instead_of_a_handshake_is_rejected(node: Node) -> None:
    host, port = node.server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode_frame(FrameType.CLIENT_HELLO, b"GET / HTTP/1.1\r\n" * 20))
    async with asyncio.timeout(5):
        answer = await reader.read()  # until the server closes
    writer.close()
    decoder = FrameDecoder()
    decoder.feed(answer)
    frame = decoder.next_frame()
    assert frame is not None and frame[0] == FrameType.REJECT
    reject = decode_message(frame[1])
    assert isinstance(reject, Reject) and reject.reason == Reason.BAD_MAGIC
    assert sum(node.server.uploaded.values()) == 0


async def test_connecting_to_nobody_is_an_os_error() -> None:
    with pytest.raises(ConnectionRefusedError):
        await open_peer(
            Identity.generate(), "127.0.0.1", 1, GROUP, bytes(32), access_key=access_key(GROUP)
        )


def test_status_json_shapes() -> None:
    peer = format_id(bytes(32))
    running = Downloading(
        "a.bin", 100, 40, "/d/a.bin.part", {peer: 40}, {peer: "relayed"}, 12.5, 2, relayed=1
    )
    assert running.to_json() == {
        "state": "downloading",
        "name": "a.bin",
        "size": 100,
        "bytes_done": 40,
        "path": "/d/a.bin.part",
        "sources": {peer: 40},
        "routes": {peer: "relayed"},
        "rate": 12.5,
        "peers": 2,
        "relayed": 1,
    }
    assert running.fraction == 0.4
    assert Paused("a.bin", 100, 40, "/d/a.bin.part").to_json()["state"] == "paused"
    done = Complete("a.bin", 100, 100, "/d/a.bin", {peer: 100}, seconds=1.5).to_json()
    assert done["state"] == "complete" and done["seconds"] == 1.5
    failed = Failed("a.bin", 100, 0, "/d/a.bin.part", error="no providers", hint="later")
    assert failed.to_json()["error"] == "no providers"
    assert Complete("e", 0, 0, "/d/e").fraction == 1.0
