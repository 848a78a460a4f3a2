"""TCP hole punching over a relayed circuit, like libp2p's DCUtR (asyncio edge).

Both ends run this inside a fresh circuit, before any peer handshake
(docs/connectivity.md; the frames are ``wire/punch.py``, the timing ``reach/punch.py``):

1. the dialer D binds a fresh port ``q`` (``SO_REUSEADDR`` and ``SO_REUSEPORT``), listens
   on it and sends ``PunchConnect((public_ip, q))``;
2. the provider P answers ``PunchConnect((public_ip, listen_port))``;
3. D measures the round trip, sends ``PunchSync``, waits half a round trip and connects
   from ``q`` to P's addresses; P connects from its listen port (beside its listener) to
   D's as soon as it reads the sync. Both SYNs cross (TCP simultaneous open); a SYN that
   arrives between attempts finds a listener (D's on ``q``, P's peer listener);
4. ``punch_as_dialer`` returns the first connected socket (or ``None``); the caller runs
   the client handshake on it, which checks the key: nothing here is trusted.
   ``punch_as_listener`` hands its connected socket to ``adopt(sock, b"")`` and keeps
   watching the circuit: a ``CLIENT_HELLO`` there (D fell back to the relayed route)
   hands the circuit to ``adopt(circuit, bytes_read)``; end of stream closes it.

Everything is bounded: each wait has a deadline, each side makes ``ATTEMPTS`` connects
to each of at most ``MAX_TARGETS`` addresses (``reach/punch.punch_targets``: the offer is
not trusted; the provider dials only the IP the relay saw the dialer come from), a target
that refused a connect twice (a reset) is not tried again, and every socket this module opened
and did not hand over is closed.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
import time
from collections.abc import Callable

from dhtshare.dht.dialback import family_of
from dhtshare.errors import ProtocolError
from dhtshare.reach.punch import CONNECT_TIMEOUT, SYNC_TIMEOUT, PunchSchedule, punch_targets
from dhtshare.wire.frames import MAX_HANDSHAKE_FRAME, FrameType, peek_header, take_frame
from dhtshare.wire.punch import (
    PunchConnect,
    PunchMessage,
    PunchSync,
    decode_punch,
    punch_frame,
)

__all__ = [
    "FALLBACK_WAIT",
    "Adopt",
    "CircuitReader",
    "NewSocket",
    "bind_reusable",
    "punch_as_dialer",
    "punch_as_listener",
    "simultaneous_open",
    "tcp_socket",
]

log = logging.getLogger(__name__)

RESET_TRIES = 2
"""Connects a target that answers with a reset gets in one punch."""

FALLBACK_WAIT = 30.0
"""How long the provider keeps a circuit after its punch, for the dialer's fallback
handshake (or its end of stream)."""
_READ = 4096

NewSocket = Callable[[socket.AddressFamily], socket.socket]
Adopt = Callable[[socket.socket, bytes], object]
"""``PeerServer.adopt``: serve a connected socket, ``initial`` bytes first (may be async)."""


class CircuitReader:
    """Reads the PUNCH frames at the start of a circuit and nothing past them.

    ``next_punch`` returns the next PUNCH message, or ``None`` when the next frame is of
    another type (its bytes stay in ``buffered``, untouched) or the stream ended
    (``ended``). A malformed PUNCH frame raises ``RemoteProtocolError``.
    """

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buffered = bytearray(initial)
        self.ended = False
        self.handed = False  # the socket went to ``adopt``: its owner closes it

    async def _fill(self) -> bool:
        """Read more; False at end of stream."""
        if self.ended:
            return False
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, _READ)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.ended = True
            return False
        self.buffered += data
        return True

    async def wait_data(self) -> bool:
        """Until some byte is buffered (True) or the stream ended (False)."""
        while not self.buffered:
            if not await self._fill():
                return False
        return True

    async def next_punch(self) -> PunchMessage | None:
        while (head := peek_header(self.buffered)) is None:
            if not await self._fill():
                return None
        kind, length = head
        if kind != FrameType.PUNCH:
            return None
        if length > MAX_HANDSHAKE_FRAME:
            raise ProtocolError(f"punch frame of {length} bytes")
        while (frame := take_frame(self.buffered)) is None:
            if not await self._fill():
                return None
        return decode_punch(frame[1])

    def take(self) -> bytes:
        """Every buffered byte (handed to whoever reads the circuit next)."""
        data = bytes(self.buffered)
        self.buffered.clear()
        return data


def tcp_socket(family: socket.AddressFamily) -> socket.socket:
    """A new TCP socket (the default ``new_socket``; tests make them in namespaces)."""
    return socket.socket(family, socket.SOCK_STREAM)


def bind_reusable(
    host: str,
    port: int,
    family: socket.AddressFamily = socket.AF_INET,
    new_socket: NewSocket = tcp_socket,
) -> socket.socket:
    """A non-blocking TCP socket bound to ``host:port`` with ``SO_REUSEADDR`` and
    ``SO_REUSEPORT``, so it can share its port with a listener and other punch sockets."""
    sock = new_socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_once(
    bind: tuple[str, int], target: tuple[str, int], limit: float, new_socket: NewSocket
) -> socket.socket | None:
    """One connect from ``bind`` to ``target`` within ``limit`` seconds; the socket or None.
    Raises ``ConnectionRefusedError`` if the target answered with a reset."""
    if limit <= 0:
        return None
    try:
        sock = bind_reusable(bind[0], bind[1], family_of(target[0]), new_socket)
    except OSError as exc:
        log.debug("punch: cannot bind %s:%d: %s", bind[0], bind[1], exc)
        return None
    try:
        async with asyncio.timeout(limit):
            await asyncio.get_running_loop().sock_connect(sock, target)
    except ConnectionRefusedError:
        sock.close()
        raise
    except (OSError, TimeoutError) as exc:
        if not isinstance(exc, OSError) or exc.errno not in (errno.ECONNREFUSED, None):
            log.debug("punch: connect %s -> %s: %r", bind, target, exc)
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


async def _attempts(
    bind: tuple[str, int],
    target: tuple[str, int],
    schedule: PunchSchedule,
    start: float,
    clock: Callable[[], float],
    new_socket: NewSocket,
) -> socket.socket | None:
    """Connect from ``bind`` to ``target`` at each attempt time of ``schedule``, until
    one connects or the target refused ``RESET_TRIES`` times (a router may answer our SYN
    with a reset until the other side's has gone out: one more try; after that nobody
    punches there, so no more SYNs)."""
    refused = 0
    for k in range(schedule.attempts):
        wait = schedule.attempt_start(start, k) - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        left = schedule.attempt_deadline(start, k) - clock()
        try:
            sock = await _connect_once(bind, target, left, new_socket)
        except ConnectionRefusedError:
            refused += 1
            if refused >= RESET_TRIES:
                log.debug("punch: %s refused %d times: not tried again", target, refused)
                return None
            continue
        if sock is not None:
            return sock
    return None


async def simultaneous_open(
    bind: tuple[str, int],
    targets: tuple[tuple[str, int], ...],
    schedule: PunchSchedule,
    start: float,
    *,
    listener: socket.socket | None = None,
    clock: Callable[[], float] = time.monotonic,
    new_socket: NewSocket = tcp_socket,
) -> socket.socket | None:
    """The first connection made from ``bind`` to one of ``targets`` by the attempts of
    ``schedule`` (from ``start``), or accepted on ``listener``, before the punch's
    deadline; ``None`` if none. Every other socket made on the way is closed."""
    loop = asyncio.get_running_loop()

    async def accept() -> socket.socket | None:
        assert listener is not None
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        return conn

    tasks = [
        asyncio.ensure_future(_attempts(bind, t, schedule, start, clock, new_socket))
        for t in targets
    ]
    if listener is not None:
        tasks.append(asyncio.ensure_future(accept()))
    winner: socket.socket | None = None
    try:
        pending = set(tasks)
        deadline = schedule.deadline(start)
        while pending and winner is None:
            left = deadline - clock()
            if left <= 0:
                break
            done, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task.cancelled() or task.exception() is not None:
                    continue
                sock = task.result()
                if sock is None:
                    continue
                if winner is None:
                    winner = sock
                else:
                    sock.close()
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, socket.socket) and result is not winner:
                result.close()
    return winner


async def punch_as_dialer(
    circuit_sock: socket.socket,
    leftover: bytes,
    public_ip: str,
    *,
    bind_host: str = "",
    clock: Callable[[], float] = time.monotonic,
    new_socket: NewSocket = tcp_socket,
) -> socket.socket | None:
    """Punch through from the downloader's side of a fresh circuit (steps 1 to 3).

    Returns the connected socket (non-blocking; the caller runs the client handshake on
    it and closes the circuit if that succeeds), or ``None`` if the punch failed: the
    circuit then carries the handshake (the provider is still reading it). The circuit
    is never closed here. ``leftover``: bytes already read from the circuit.
    """
    loop = asyncio.get_running_loop()
    family = family_of(public_ip)
    host = bind_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    try:
        listener = bind_reusable(host, 0, family, new_socket)
    except OSError as exc:
        log.debug("punch: cannot bind a port: %s", exc)
        return None
    try:
        listener.listen(4)
        port = int(listener.getsockname()[1])
        reader = CircuitReader(circuit_sock, leftover)
        sent = clock()
        await loop.sock_sendall(circuit_sock, punch_frame(PunchConnect(((public_ip, port),))))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                answer = await reader.next_punch()
        except (TimeoutError, ProtocolError) as exc:
            log.debug("punch: no answer from the provider: %r", exc)
            return None
        if not isinstance(answer, PunchConnect) or reader.buffered:
            return None  # the provider does not punch: the circuit carries the session
        schedule = PunchSchedule(clock() - sent)
        targets = punch_targets(answer.addresses, public_ip)
        if not targets or not schedule.worth_trying:
            return None
        await loop.sock_sendall(circuit_sock, punch_frame(PunchSync()))
        start = schedule.dialer_start(clock())
        return await simultaneous_open(
            (host, port),
            targets,
            schedule,
            start,
            listener=listener,
            clock=clock,
            new_socket=new_socket,
        )
    except OSError as exc:
        log.debug("punch: circuit failed: %s", exc)
        return None
    finally:
        listener.close()


async def _adopt(adopt: Adopt, sock: socket.socket, initial: bytes) -> None:
    result = adopt(sock, initial)
    if inspect.isawaitable(result):
        await result


async def punch_as_listener(
    circuit_sock: socket.socket,
    leftover: bytes,
    listen_port: int,
    public_ip: str | None,
    adopt: Adopt,
    *,
    bind_host: str = "",
    source_ip: str | None = None,
    fallback_wait: float = FALLBACK_WAIT,
    clock: Callable[[], float] = time.monotonic,
    new_socket: NewSocket = tcp_socket,
) -> str:
    """Answer a punch on the provider's side of a fresh circuit (steps 2 to 4).

    ``bind_host``: the address the peer listener is bound to (its port is
    ``listen_port``); ``public_ip``: ours as others see it (``None``: unknown, so no
    punch is offered and the dialer falls back to the circuit when its wait ends);
    ``source_ip``: the dialer's IP as the relay saw it (its ``Incoming``): only offered
    addresses with that IP are dialled (``None``: no such filter; see ``punch_targets``).
    Every connection ends in ``adopt`` or closed: a connection made by
    the punch is adopted at once; the circuit is adopted when the dialer's first frame
    is not a PUNCH frame (it does not punch, or it fell back), with the bytes read.
    Returns what happened: ``"punched"`` (a punched socket was adopted; the circuit may
    have been adopted too), ``"relayed"`` (only the circuit was adopted) or ``"closed"``.
    """
    reader = CircuitReader(circuit_sock, leftover)
    punched = False
    try:
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                first = await reader.next_punch()
            if first is None:
                return await _hand_circuit(reader, adopt, punched)
            if not isinstance(first, PunchConnect):
                return "closed"
            if public_ip is None:  # nothing to offer: the dialer falls back after its wait
                async with asyncio.timeout(CONNECT_TIMEOUT + SYNC_TIMEOUT):
                    after = await reader.next_punch()
                if after is None:
                    return await _hand_circuit(reader, adopt, punched)
                return "closed"
            family = family_of(public_ip)
            targets = punch_targets(first.addresses, public_ip, source_ip)
            sent = clock()
            await asyncio.get_running_loop().sock_sendall(
                circuit_sock, punch_frame(PunchConnect(((public_ip, listen_port),)))
            )
            async with asyncio.timeout(SYNC_TIMEOUT):
                sync = await reader.next_punch()
        except (TimeoutError, ProtocolError, OSError) as exc:
            log.debug("punch: the dialer broke off: %r", exc)
            return "closed"
        if sync is None:
            return await _hand_circuit(reader, adopt, punched)
        if not isinstance(sync, PunchSync):
            return "closed"
        now = clock()
        schedule = PunchSchedule(now - sent)
        host = bind_host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        punch = asyncio.ensure_future(
            simultaneous_open(
                (host, listen_port),
                targets,
                schedule,
                schedule.listener_start(now),
                clock=clock,
                new_socket=new_socket,
            )
        )
        watch = asyncio.ensure_future(reader.wait_data())
        try:
            await asyncio.wait({punch, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not punch.done():
                punch.cancel()  # the circuit spoke first: the dialer fell back or finished
            result = await asyncio.gather(punch, return_exceptions=True)
        sock = result[0]
        if isinstance(sock, socket.socket):
            punched = True
            await _adopt(adopt, sock, b"")
        return await _hand_circuit(reader, adopt, punched, watch, fallback_wait)
    finally:
        if not reader.handed:
            circuit_sock.close()


async def _hand_circuit(
    reader: CircuitReader,
    adopt: Adopt,
    punched: bool,
    watch: asyncio.Future[bool] | None = None,
    wait: float = 0.0,
) -> str:
    """Adopt the circuit if the dialer sends a non-PUNCH byte on it within ``wait``
    (at once if bytes are buffered); else it is closed by the caller."""
    outcome = "punched" if punched else "closed"
    if watch is not None:
        try:
            async with asyncio.timeout(wait):
                has_data = await watch
        except TimeoutError:
            watch.cancel()
            return outcome
    else:
        has_data = bool(reader.buffered)
    if not has_data:
        return outcome
    reader.handed = True
    await _adopt(adopt, reader.sock, reader.take())
    return "punched" if punched else "relayed"
