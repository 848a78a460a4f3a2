"""The one asyncio adapter that drives a sans-I/O ``PeerConnection`` over TCP streams.

Its loop is the one the style guide asks for: read (under ``asyncio.timeout``),
``receive_data``, hand out every event, write whatever the connection queued.
Sending is synchronous up to the transport (``send_nowait``) so that frames
leave in the order their nonces were assigned; ``send`` also waits for the
transport's buffer to drain (backpressure). This module starts no tasks: the
caller's ``TaskGroup`` owns whatever task iterates a ``PeerStream``.

A protocol error from the peer is answered with a ``Reject`` carrying its reason
code before the error is raised to the caller; silence longer than the read
timeout is the same, with ``Reason.TIMEOUT``. A reset connection reads as end of
stream, so callers see ``ConnectionClosed`` either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sys
import termios
from collections.abc import AsyncIterator, Iterable

from dhtshare.errors import ProtocolError, RemoteProtocolError
from dhtshare.identity import Identity
from dhtshare.wire import (
    ConnectionClosed,
    Event,
    HandshakeComplete,
    Message,
    PeerConnection,
    Reason,
    Reject,
    Role,
    State,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "READ_SIZE",
    "READ_TIMEOUT",
    "STREAM_LIMIT",
    "PeerStream",
    "accept_peer",
    "open_peer",
]

READ_SIZE = 512 * 1024
"""Bytes asked for per read: two full blocks, so the reader's buffer empties each time."""
STREAM_LIMIT = 1024 * 1024
"""StreamReader buffer size before the socket is paused (asyncio's default is 64 KiB)."""
WRITE_HIGH_WATER = 512 * 1024
"""Transport buffer size at which ``send`` starts waiting for the socket to drain."""
_FIONREAD: int | None = getattr(termios, "FIONREAD", None)
"""The ioctl that tells how many received bytes wait in a socket (POSIX systems)."""
HANDSHAKE_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
LINGER = 2.0
"""After sending a Reject, how long we wait for the peer to close its end."""


class PeerStream:
    """A ``PeerConnection`` bound to an asyncio reader and writer.

    Iterate it (``async for event in stream``) to receive; the iteration ends
    after ``ConnectionClosed`` or a ``Reject``. ``bytes_in`` and ``bytes_out``
    count wire bytes.
    """

    def __init__(
        self,
        conn: PeerConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> None:
        self.conn = conn
        self._reader = reader
        self._writer = writer
        self.read_timeout = read_timeout
        self.peer: HandshakeComplete | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._finished = False
        self._reading = False
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    @property
    def peer_key(self) -> bytes:
        """The authenticated key of the peer (after the handshake)."""
        if self.peer is None:
            raise RuntimeError("handshake not complete")
        return self.peer.peer_key

    @property
    def remote_address(self) -> tuple[str, int]:
        info = self._writer.get_extra_info("peername")
        return (str(info[0]), int(info[1])) if info else ("?", 0)

    def buffered_in(self) -> int:
        """Bytes the peer sent that wait in our buffers: the kernel's, asyncio's, ours."""
        total = self.conn.buffered + len(getattr(self._reader, "_buffer", b""))
        sock = self._writer.get_extra_info("socket")
        if sock is not None and _FIONREAD is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(sock.fileno(), _FIONREAD, b"\0\0\0\0")
                total += int.from_bytes(raw, sys.byteorder)
        return total

    @property
    def open(self) -> bool:
        """True while messages may still be sent."""
        return self.conn.state is State.OPEN and not self._writer.is_closing()

    # -- handshake ----------------------------------------------------------------

    async def handshake(self, limit: float = HANDSHAKE_TIMEOUT) -> HandshakeComplete:
        """Run the handshake (writing the ClientHello first for a client).

        Raises ``ProtocolError`` if the peer rejects us, breaks the protocol, closes,
        or does not finish within ``timeout`` seconds.
        """
        if self.conn.role is Role.CLIENT:
            self._write(self.conn.initiate())
        try:
            async with asyncio.timeout(limit):
                event = await self._next_event()
        except TimeoutError:
            await self.reject(Reason.TIMEOUT, "handshake timed out")
            raise RemoteProtocolError("handshake timed out", Reason.TIMEOUT) from None
        if isinstance(event, HandshakeComplete):
            self.peer = event
            return event
        if isinstance(event, Reject):
            raise ProtocolError(f"peer refused the connection: {event.text or event.reason}")
        raise RemoteProtocolError("peer closed during the handshake", Reason.PROTOCOL)

    # -- receiving ------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._finished:
            raise StopAsyncIteration
        if self.read_timeout is None:
            return await self._next_event()
        try:
            async with asyncio.timeout(self.read_timeout):
                return await self._next_event()
        except TimeoutError:
            await self.reject(Reason.TIMEOUT, f"silent for {self.read_timeout:g} s")
            raise RemoteProtocolError("peer silent too long", Reason.TIMEOUT) from None

    async def _next_event(self) -> Event:
        """Read until the connection yields one event; writes handshake replies."""
        while True:
            event = self._poll()
            if event is not None:
                if isinstance(event, ConnectionClosed | Reject):
                    self._finished = True
                return event
            self._reading = True
            try:
                data = await self._read()
            finally:
                self._reading = False
            self.bytes_in += len(data)
            self.conn.receive_data(data)

    def _poll(self) -> Event | None:
        try:
            event = self.conn.next_event()
        except RemoteProtocolError as exc:
            self._finished = True
            self._send_reject_nowait(exc.reason, str(exc))
            self._writer.close()
            raise
        pending = self.conn.data_to_send()
        if pending:
            self._write(pending)
        return event

    async def _read(self) -> bytes:
        try:
            return await self._reader.read(READ_SIZE)
        except OSError:
            return b""  # a reset connection: treated as end of stream

    # -- sending --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._writer.write(data)

    def send_nowait(self, msg: Message) -> None:
        """Queue ``msg`` on the transport without waiting (for small messages)."""
        self._write(self.conn.send(msg))

    def send_many_nowait(self, msgs: Iterable[Message]) -> None:
        """Queue several messages with one transport write (one syscall, not one each)."""
        data = b"".join([self.conn.send(m) for m in msgs])
        if data:
            self._write(data)

    async def send(self, msg: Message) -> None:
        """Send ``msg`` and wait while the transport's buffer is above its high mark.

        Raises ``ConnectionError`` if the connection is gone.
        """
        self.send_nowait(msg)
        await self._writer.drain()

    def try_send(self, msg: Message) -> bool:
        """``send_nowait`` that quietly does nothing on a closed connection."""
        if not self.open:
            return False
        self.send_nowait(msg)
        return True

    def _send_reject_nowait(self, reason: int, text: str) -> None:
        if self.conn.state in (State.CLOSED, State.IDLE) or self._writer.is_closing():
            return
        text = text.encode("utf-8")[:200].decode("utf-8", "ignore")
        self._write(self.conn.send(Reject(int(reason), text)))

    def _half_close(self, reason: int, text: str) -> None:
        """Send a ``Reject``, then end our direction (FIN); incoming bytes are discarded."""
        self._send_reject_nowait(reason, text)
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        if not self._writer.is_closing() and self._writer.can_write_eof():
            self._writer.write_eof()
        self.read_timeout = min(self.read_timeout or LINGER, LINGER)

    def abort(self, reason: int, text: str) -> None:
        """Reject and half-close without waiting; whoever iterates the stream sees it end.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the Reject before the peer reads it; so we send FIN and let the peer
        close first (or the read timeout, shortened to ``LINGER``, expire).
        """
        self._half_close(reason, text)

    async def reject(self, reason: int, text: str) -> None:
        """Reject and close: lingers (reading and discarding) until the peer closes.

        If another coroutine is iterating the stream, that one sees the end instead,
        and its owner closes the stream.
        """
        self._half_close(reason, text)
        if self._reading:
            return
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LINGER):
                while await self._reader.read(READ_SIZE):
                    pass
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and wait (briefly) until the socket is closed."""
        self._finished = True
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    async def __aenter__(self) -> PeerStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_peer(
    identity: Identity,
    host: str,
    port: int,
    group_id: bytes,
    content_id: bytes,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = READ_TIMEOUT,
) -> PeerStream:
    """Connect to ``host:port`` and run the client handshake; the stream is ready to use.

    Raises ``OSError`` if the connection cannot be made and ``ProtocolError`` if the
    handshake fails; the socket is closed in both cases.
    """
    async with asyncio.timeout(handshake_timeout):
        reader, writer = await asyncio.open_connection(host, port, limit=STREAM_LIMIT)
    conn = PeerConnection(
        Role.CLIENT, identity.signing_key, group_id=group_id, content_id=content_id
    )
    return await _handshaken(conn, reader, writer, handshake_timeout, read_timeout)


async def accept_peer(
    identity: Identity,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = READ_TIMEOUT,
) -> PeerStream:
    """Run the server handshake on an accepted connection; the stream is ready to use."""
    conn = PeerConnection(Role.SERVER, identity.signing_key)
    return await _handshaken(conn, reader, writer, handshake_timeout, read_timeout)


async def _handshaken(
    conn: PeerConnection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handshake_timeout: float,
    read_timeout: float | None,
) -> PeerStream:
    """A stream over ``conn`` whose handshake finished; closed again if it did not."""
    stream = PeerStream(conn, reader, writer, read_timeout=read_timeout)
    try:
        await stream.handshake(handshake_timeout)
    except BaseException:
        await stream.aclose()
        raise
    return stream
