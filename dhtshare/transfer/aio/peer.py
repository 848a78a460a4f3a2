"""The one asyncio adapter that drives a sans-I/O ``PeerConnection`` over TCP.

Its loop is the one the style guide asks for: wait for input (under
``asyncio.timeout``), hand out every event, write whatever the connection queued.
Input arrives through ``PeerProtocol``, an ``asyncio.BufferedProtocol``: the
socket is read straight into the frame decoder's buffer, with no copy in between
(measurements: docs/performance-history.md, round 4).
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
import socket
import sys
import termios
from collections.abc import AsyncIterator, Callable, Iterable

from dhtshare.errors import ProtocolError, RemoteProtocolError
from dhtshare.identity import Identity
from dhtshare.wire import (
    AccessKeys,
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
    "PeerProtocol",
    "PeerStream",
    "accept_peer",
    "open_peer",
    "open_peer_on",
    "server_protocol",
]

READ_SIZE = 64 * 1024
"""Least room offered to a socket read. A read may fill all the decoder's free room,
which grows (doubling) with the frames a connection carries: a connection that only
carries requests keeps a small buffer, one that carries blocks a large one."""
STREAM_LIMIT = 1024 * 1024
"""Unparsed input at which reading pauses until the consumer needs more."""
WRITE_HIGH_WATER = 512 * 1024
"""Transport buffer size at which ``send`` starts waiting for the socket to drain."""
_FIONREAD: int | None = getattr(termios, "FIONREAD", None)
"""The ioctl that tells how many received bytes wait in a socket (POSIX systems)."""
HANDSHAKE_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
LINGER = 2.0
"""After sending a Reject, how long we wait for the peer to close its end."""


class PeerProtocol(asyncio.BufferedProtocol):
    """Receives a TCP connection's bytes straight into its ``PeerConnection``.

    It wakes whoever waits in ``wait_for_input``, pauses reading while
    ``STREAM_LIMIT`` unparsed bytes wait (the consumer resumes it when it needs
    more), and lets writers wait for the transport to drain. ``on_connect`` is
    called once the transport exists (a server starts its session there).
    """

    def __init__(
        self,
        conn: PeerConnection,
        on_connect: Callable[[PeerProtocol], None] | None = None,
    ) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0
        self.ended = False  # the peer closed its end, or the connection is gone
        self._on_connect = on_connect
        self._waiters: list[asyncio.Future[None]] = []  # the reader, and a lingering reject
        self._drainers: list[asyncio.Future[None]] = []
        self.reading_paused = asyncio.Event()  # set while a backlog holds reading off
        self._paused_writing = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(READ_SIZE)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        self.conn.buffer_updated(nbytes)
        if self.conn.buffered >= STREAM_LIMIT and not self.reading_paused.is_set():
            assert self.transport is not None
            self.transport.pause_reading()
            self.reading_paused.set()
        self._wake()

    def eof_received(self) -> bool:
        self._end()
        return True  # keep our direction open: a Reject may still have to go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()  # a reset reads as end of stream
        if not self._lost.done():
            self._lost.set_result(None)
        self.resume_writing()  # writers waiting to drain wake up and see the loss

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for waiter in self._drainers:
            if not waiter.done():
                waiter.set_result(None)
        self._drainers.clear()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.conn.receive_data(b"")
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def lost(self) -> bool:
        """True once the transport is gone."""
        return self._lost.done()

    async def wait_for_input(self) -> None:
        """Resume reading if paused, then wait for more input or the end of it."""
        if self.ended:
            return
        if self.reading_paused.is_set() and self.transport is not None:
            self.reading_paused.clear()
            self.transport.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high mark.

        Raises ``ConnectionResetError`` once the connection is gone (as asyncio's
        ``StreamWriter.drain`` does, it lets a closing transport report its loss first).
        """
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # connection_lost is scheduled, not yet called
        if self.lost:
            raise ConnectionResetError("connection lost")
        if not self._paused_writing:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drainers.append(waiter)
        await waiter
        if self.lost:
            raise ConnectionResetError("connection lost")

    async def wait_lost(self) -> None:
        """Until the transport is gone."""
        await asyncio.shield(self._lost)


class PeerStream:
    """A ``PeerConnection`` bound to its ``PeerProtocol`` and transport.

    Iterate it (``async for event in stream``) to receive; the iteration ends
    after ``ConnectionClosed`` or a ``Reject``. ``bytes_in`` and ``bytes_out``
    count wire bytes.
    """

    def __init__(
        self,
        protocol: PeerProtocol,
        *,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> None:
        if protocol.transport is None:
            raise ValueError("the protocol has no transport yet")
        self.conn = protocol.conn
        self._protocol = protocol
        self._transport = protocol.transport
        self.read_timeout = read_timeout
        self.peer: HandshakeComplete | None = None
        self.bytes_out = 0
        self._finished = False
        self._reading = False
        sock = protocol.transport.get_extra_info("socket")
        self._fileno: int = sock.fileno() if sock is not None else -1

    @property
    def bytes_in(self) -> int:
        return self._protocol.bytes_in

    @property
    def peer_key(self) -> bytes:
        """The authenticated key of the peer (after the handshake)."""
        if self.peer is None:
            raise RuntimeError("handshake not complete")
        return self.peer.peer_key

    @property
    def remote_address(self) -> tuple[str, int]:
        info = self._transport.get_extra_info("peername")
        return (str(info[0]), int(info[1])) if info else ("?", 0)

    def buffered_in(self) -> int:
        """Bytes the peer sent that wait in our buffers: the kernel's and the decoder's."""
        total = self.conn.buffered
        if self._fileno >= 0 and _FIONREAD is not None and not self._transport.is_closing():
            try:  # asked once per peer at every endgame top-up: kept cheap
                raw = fcntl.ioctl(self._fileno, _FIONREAD, b"\0\0\0\0")
            except OSError:
                return total
            total += int.from_bytes(raw, sys.byteorder)
        return total

    @property
    def open(self) -> bool:
        """True while messages may still be sent."""
        return self.conn.state is State.OPEN and not self._transport.is_closing()

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
                await self._protocol.wait_for_input()
            finally:
                self._reading = False

    def _poll(self) -> Event | None:
        try:
            event = self.conn.next_event()
        except RemoteProtocolError as exc:
            self._finished = True
            self._send_reject_nowait(exc.reason, str(exc))
            self._transport.close()
            raise
        pending = self.conn.data_to_send()
        if pending:
            self._write(pending)
        return event

    # -- sending --------------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        self.bytes_out += len(data)
        self._transport.write(data)

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
        await self._protocol.drain()

    def try_send(self, msg: Message) -> bool:
        """``send_nowait`` that quietly does nothing on a closed connection."""
        if not self.open:
            return False
        self.send_nowait(msg)
        return True

    def _send_reject_nowait(self, reason: int, text: str) -> None:
        if self.conn.state in (State.CLOSED, State.IDLE) or self._transport.is_closing():
            return
        text = text.encode("utf-8")[:200].decode("utf-8", "ignore")
        self._write(self.conn.send(Reject(int(reason), text)))

    def _half_close(self, reason: int, text: str) -> None:
        """Send a ``Reject``, then end our direction (FIN); incoming bytes are discarded."""
        self._send_reject_nowait(reason, text)
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        if not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()
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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER):
                while not self._protocol.ended:  # input after our close is discarded
                    await self._protocol.wait_for_input()
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and wait (briefly) until the socket is closed."""
        self._finished = True
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        if not self._transport.is_closing():
            self._transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._protocol.wait_lost()

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
    access_key: bytes,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = READ_TIMEOUT,
) -> PeerStream:
    """Connect to ``host:port`` and run the client handshake with the group's current
    ``access_key``; the stream is ready to use.

    Raises ``OSError`` if the connection cannot be made and ``ProtocolError`` if the
    handshake fails (a peer that does not hold ``access_key`` fails it too); the socket
    is closed in both cases.
    """
    conn = _client(identity, group_id, content_id, access_key)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(handshake_timeout):
        _, protocol = await loop.create_connection(lambda: PeerProtocol(conn), host, port)
    return await _handshaken(protocol, handshake_timeout, read_timeout)


async def open_peer_on(
    sock: socket.socket,
    identity: Identity,
    group_id: bytes,
    content_id: bytes,
    *,
    access_key: bytes,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = READ_TIMEOUT,
) -> PeerStream:
    """``open_peer`` over ``sock``, already connected (a punched connection or a relayed
    circuit): the client handshake checks the peer's key as on any connection.

    The stream owns ``sock`` from the start: it is closed if the handshake fails."""
    try:
        conn = _client(identity, group_id, content_id, access_key)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        _, protocol = await loop.create_connection(lambda: PeerProtocol(conn), sock=sock)
    except BaseException:
        sock.close()
        raise
    return await _handshaken(protocol, handshake_timeout, read_timeout)


def _client(
    identity: Identity, group_id: bytes, content_id: bytes, access_key: bytes
) -> PeerConnection:
    return PeerConnection(
        Role.CLIENT,
        identity.signing_key,
        group_id=group_id,
        content_id=content_id,
        access_key=access_key,
    )


def server_protocol(
    identity: Identity, on_connect: Callable[[PeerProtocol], None], access_keys: AccessKeys
) -> PeerProtocol:
    """The protocol of one accepted connection (a server's ``create_server`` factory);
    ``access_keys()``: the groups it serves, asked when the ClientHello arrives."""
    conn = PeerConnection(Role.SERVER, identity.signing_key, access_keys=access_keys)
    return PeerProtocol(conn, on_connect)


async def accept_peer(
    protocol: PeerProtocol,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = READ_TIMEOUT,
) -> PeerStream:
    """Run the server handshake on an accepted connection; the stream is ready to use."""
    return await _handshaken(protocol, handshake_timeout, read_timeout)


async def _handshaken(
    protocol: PeerProtocol,
    handshake_timeout: float,
    read_timeout: float | None,
) -> PeerStream:
    """A stream over ``protocol`` whose handshake finished; closed again if it did not."""
    stream = PeerStream(protocol, read_timeout=read_timeout)
    try:
        await stream.handshake(handshake_timeout)
    except BaseException:
        await stream.aclose()
        raise
    return stream
