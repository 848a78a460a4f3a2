"""PeerProtocol over a real loopback socket: backpressure, and waiters that share it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from support.access import access_key, access_keys

from dhtshare.identity import Identity
from dhtshare.transfer.aio.peer import (
    LINGER,
    STREAM_LIMIT,
    PeerProtocol,
    PeerStream,
    accept_peer,
    open_peer,
    server_protocol,
)
from dhtshare.wire import MAX_BLOCK, ConnectionClosed, Keepalive, Piece, Reason

GROUP = bytes(range(32))
CONTENT = bytes(range(32, 64))
BLOCKS = 16  # 4 MiB: four times STREAM_LIMIT


@asynccontextmanager
async def connected() -> AsyncIterator[tuple[PeerStream, PeerStream]]:
    """A client stream and the server's stream of the same loopback connection."""
    accepted: asyncio.Queue[PeerStream] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def accept(protocol: PeerProtocol) -> None:
        await accepted.put(await accept_peer(protocol))

    def on_connect(protocol: PeerProtocol) -> None:
        tasks.add(asyncio.get_running_loop().create_task(accept(protocol)))

    server_id = Identity.generate()
    server = await asyncio.get_running_loop().create_server(
        lambda: server_protocol(server_id, on_connect, access_keys(GROUP)), "127.0.0.1", 0
    )
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with asyncio.timeout(10):
            client = await open_peer(
                Identity.generate(), host, port, GROUP, CONTENT, access_key=access_key(GROUP)
            )
            served = await accepted.get()
        yield client, served
        await client.aclose()
        await served.aclose()
    finally:
        server.close()
        await server.wait_closed()


async def test_reading_pauses_under_a_backlog_and_resumes_for_the_consumer() -> None:
    async with connected() as (client, seeder):
        blocks = [bytes([i]) * MAX_BLOCK for i in range(BLOCKS)]
        for i, block in enumerate(blocks):
            seeder.send_nowait(Piece(i, 0, block))  # the transport buffers what TCP won't
        protocol = client._protocol
        transport = protocol.transport
        assert transport is not None
        async with asyncio.timeout(10):
            await protocol.reading_paused.wait()  # nobody consumes: the backlog stops reading
            assert not transport.is_reading()
            assert STREAM_LIMIT <= client.conn.buffered < 3 * STREAM_LIMIT
            got = []
            while len(got) < BLOCKS:  # consuming resumes reading, until every block is in
                event = await anext(client)
                assert isinstance(event, Piece)
                got.append(bytes(event.data))
        assert got == blocks


async def test_a_lingering_reject_and_a_reader_both_see_the_peer_close() -> None:
    # reject() lingers for the peer's FIN while another task also waits for input:
    # the FIN must wake both, long before the LINGER limit.
    async with connected() as (client, server):
        lingering = asyncio.create_task(server.reject(Reason.SHUTDOWN, "going away"))
        await asyncio.sleep(0)  # it sends the Reject and starts to linger
        reader = asyncio.create_task(anext(server, ConnectionClosed()))
        async with asyncio.timeout(10):
            async for _ in client:  # the client reads the Reject, then closes its end
                pass
            await client.aclose()
        async with asyncio.timeout(LINGER / 2):
            await lingering
            assert isinstance(await reader, ConnectionClosed)


async def test_sending_on_an_aborted_connection_raises_at_once() -> None:
    async with connected() as (_client, server):
        transport = server._protocol.transport
        assert transport is not None
        transport.abort()  # connection_lost is only scheduled by this
        with pytest.raises(ConnectionResetError):
            await server.send(Keepalive())
