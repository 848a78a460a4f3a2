"""Send one first frame to a peer server, as a stranger would, and read its answer."""

from __future__ import annotations

import asyncio
import socket

WAIT = 5.0


async def send_first(server: tuple[str, int], data: bytes, source: str) -> bytes:
    """Connect from ``source``, send ``data``: the first answer, ``b""`` if it hung up."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, server)
        await loop.sock_sendall(sock, data)
        async with asyncio.timeout(WAIT):
            try:
                return await loop.sock_recv(sock, 4096)
            except ConnectionResetError:
                return b""
