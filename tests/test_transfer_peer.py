"""PeerProtocol over a real loopback socket: reading pauses while input piles up."""

from __future__ import annotations

import asyncio

from dhtshare.identity import Identity
from dhtshare.transfer.peer import (
    STREAM_LIMIT,
    PeerProtocol,
    PeerStream,
    accept_peer,
    open_peer,
    server_protocol,
)
from dhtshare.wire import MAX_BLOCK, Piece

GROUP = bytes(range(32))
CONTENT = bytes(range(32, 64))
BLOCKS = 16  # 4 MiB: four times STREAM_LIMIT


async def test_reading_pauses_under_a_backlog_and_resumes_for_the_consumer() -> None:
    accepted: asyncio.Queue[PeerStream] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def accept(protocol: PeerProtocol) -> None:
        await accepted.put(await accept_peer(protocol))

    def on_connect(protocol: PeerProtocol) -> None:
        task = asyncio.get_running_loop().create_task(accept(protocol))
        tasks.add(task)

    server_id = Identity.generate()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: server_protocol(server_id, on_connect), "127.0.0.1", 0
    )
    host, port = server.sockets[0].getsockname()[:2]
    async with asyncio.timeout(10):
        client = await open_peer(Identity.generate(), host, port, GROUP, CONTENT)
        seeder = await accepted.get()
        blocks = [bytes([i]) * MAX_BLOCK for i in range(BLOCKS)]
        for i, block in enumerate(blocks):
            seeder.send_nowait(Piece(i, 0, block))  # the transport buffers what TCP won't
        protocol = client._protocol
        transport = protocol.transport
        assert transport is not None
        await protocol.reading_paused.wait()  # nobody consumes: the backlog stops reading
        assert not transport.is_reading()
        assert STREAM_LIMIT <= client.conn.buffered < 3 * STREAM_LIMIT
        got = []
        while len(got) < BLOCKS:  # consuming resumes reading, until every block is in
            event = await anext(client)
            assert isinstance(event, Piece)
            got.append(bytes(event.data))
        assert got == blocks
        await client.aclose()
        await seeder.aclose()
    server.close()
    await server.wait_closed()
