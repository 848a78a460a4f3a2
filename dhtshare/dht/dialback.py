"""The responder's side of a reachability dial-back (DHT RPC ``reach``): I/O only.

The asker's address was validated and the rate limit allowed it (``protocol.py``
decides); this module sends, to that one address, a UDP datagram from a *fresh* socket
(another source port, so a NAT that only lets in replies to the asker's own mapping
drops it) and a DIALBACK frame on a new TCP connection. Both carry the asker's nonce.
Every failure is swallowed: a dial-back that does not arrive is the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

from dhtshare.wire.dialback import dialback_frame

__all__ = ["CONNECT_TIMEOUT", "dial_back", "family_of", "send_tcp", "send_udp"]

#: Seconds a TCP dial-back may take to connect and write its frame.
CONNECT_TIMEOUT = 3.0

Address = tuple[str, int]


def family_of(host: str) -> socket.AddressFamily:
    """The socket family of an IP address (``ValueError`` if ``host`` is not one)."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def send_udp(address: Address, datagram: bytes, local_host: str | None = None) -> bool:
    """Send ``datagram`` to ``address`` from a new UDP socket (a fresh port); True if sent."""
    try:
        with socket.socket(family_of(address[0]), socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.bind((local_host or "", 0))
            sock.sendto(datagram, address)
    except (OSError, ValueError):  # ValueError: not an IP address
        return False
    return True


async def send_tcp(
    address: Address,
    nonce: bytes,
    local_host: str | None = None,
    seconds: float = CONNECT_TIMEOUT,
) -> bool:
    """Connect to ``address``, send one DIALBACK frame with ``nonce``, close; True if sent."""
    local = (local_host, 0) if local_host else None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(seconds):
            _reader, writer = await asyncio.open_connection(
                address[0], address[1], local_addr=local
            )
            writer.write(dialback_frame(nonce))
            await writer.drain()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(seconds):
                    await writer.wait_closed()
    return True


async def dial_back(
    address: Address, nonce: bytes, datagram: bytes, local_host: str | None = None
) -> tuple[bool, bool]:
    """Both dial-backs to ``address``: ``datagram`` by UDP and ``nonce`` by TCP.

    Returns whether each was sent (not whether it arrived: only the asker knows).
    """
    udp = send_udp(address, datagram, local_host)
    tcp = await send_tcp(address, nonce, local_host)
    return udp, tcp
