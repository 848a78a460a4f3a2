"""The peer server's first-frame demux survives its handlers: a dial-back sink that raises
costs that one connection, and connections still waiting for their first frame close when
the server stops."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from support.firstframe import send_first

from dhtshare.identity import Identity
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import ShareRegistry
from dhtshare.wire.dialback import dialback_frame

HOST = "127.0.31.1"
WAIT = 5.0


async def _accepted(server: PeerServer) -> None:
    """Until the server took the connection (a bounded poll: it has no event for this)."""
    for _ in range(int(WAIT / 0.01)):
        if server.handshakes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never took the connection")


async def _stop(server: PeerServer, serving: asyncio.Task[None]) -> None:
    server.close()
    serving.cancel()
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def test_a_dialback_sink_that_raises_does_not_stop_the_server() -> None:
    server = PeerServer(Identity.generate(), HOST, shares=ShareRegistry(lambda g, k: False))
    calls: list[bytes] = []
    both = asyncio.Event()

    def broken(nonce: bytes, source: tuple[str, int]) -> None:
        calls.append(nonce)
        if len(calls) == 2:
            both.set()
        raise RuntimeError("a bug in the sink")

    server.dialback_sink = broken
    await server.start()
    serving = asyncio.create_task(server.serve())
    try:
        await server.serving.wait()
        for i in range(2):  # the second one proves the server outlived the first
            assert (
                await send_first(server.address, dialback_frame(bytes([i]) * 16), "127.0.31.2")
                == b""
            )
        async with asyncio.timeout(WAIT):
            await both.wait()
        assert server.stats["drop.bug"] == 2
        assert not serving.done()
    finally:
        await _stop(server, serving)


async def test_a_connection_waiting_for_its_first_frame_closes_with_the_server() -> None:
    server = PeerServer(Identity.generate(), HOST, shares=ShareRegistry(lambda g, k: False))
    await server.start()
    serving = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.bind(("127.0.31.3", 0))
        sock.setblocking(False)
        await server.serving.wait()
        await loop.sock_connect(sock, server.address)
        await _accepted(server)
        await _stop(server, serving)
        async with asyncio.timeout(WAIT):
            try:
                assert await loop.sock_recv(sock, 16) == b""  # closed, well before 5 s
            except ConnectionResetError:
                pass
