"""Circuit relays (like libp2p's circuit relay v2): the relay, the keeper, the dialling side.

``RelayServer`` takes over the connections whose first frame is ``RELAY`` (it is a
``PeerServer.relay_handler``):

- ``Reserve`` (signed by the key it names, its time within ``RESERVE_SKEW`` of ours): a
  reservation, held while that connection stays open and is renewed before its ttl runs out
  (``RelayBook`` admits it); a reservation of the same key on a new connection replaces
  the held one only if its time is later (so a replayed ``Reserve`` cannot);
- ``Connect(key)``: the relay sends ``Incoming`` on ``key``'s reservation connection and
  waits (``accept_timeout``) for a connection whose first frame is ``Accept`` with that
  circuit id; then ``Ready`` to both, and from the next byte it splices the two sockets:
  two ``BufferedProtocol`` s write each read (up to ``SPLICE_BUFFER`` bytes) straight into
  the other's transport, pausing a side's reading while the other's write buffer is full;
  no task per byte. A circuit is cut at ``circuit_bytes`` or ``circuit_seconds``.
  Otherwise ``Refused``: no reservation, a limit, or a target that did not accept.

The relay reads only the control frames; what follows ``Ready`` is the two ends' business
(their peer handshake is end-to-end encrypted).

``RelayKeeper`` runs on a private node: it holds reservations at up to ``max_relays`` of
the candidates it is given (public DHT contacts: TCP to the UDP port number), renews them,
and answers ``Incoming`` by opening the circuit (``Accept``, wait for ``Ready``) and handing
``(socket, bytes read past Ready)`` to ``on_circuit`` (``PeerServer.adopt``, or the punch).
``open_circuit`` is the downloader's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from dhtshare import crypto
from dhtshare.errors import ProtocolError
from dhtshare.identity import Identity
from dhtshare.reach.relaylimits import RelayBook, RelayLimits
from dhtshare.stats import Counters
from dhtshare.transfer.aio.serve import handshake_source
from dhtshare.wire.frames import FRAME_HEADER_SIZE, FrameType
from dhtshare.wire.relay import (
    CIRCUIT_ID_SIZE,
    MAX_RELAY_PAYLOAD,
    RESERVE_PURPOSE,
    Accept,
    Connect,
    Incoming,
    Ready,
    RefuseCode,
    Refused,
    RelayMessage,
    Reserve,
    Reserved,
    decode_relay,
    relay_frame,
    reserve_message,
)

__all__ = [
    "CONTROL_TIMEOUT",
    "MAX_OPENING",
    "RESERVE_SKEW",
    "SPLICE_BUFFER",
    "RelayKeeper",
    "RelayServer",
    "open_circuit",
]

log = logging.getLogger(__name__)

SPLICE_BUFFER = 256 * 1024
"""Bytes one splice read may take (and the per-direction write buffer high mark)."""
RESERVE_SKEW = 300.0
"""How far a ``Reserve``'s time may be from the relay's clock (seconds)."""
CONTROL_TIMEOUT = 10.0
"""How long either side waits for the other's next control frame (connect included)."""
MAX_OPENING = 16
"""Circuits a keeper opens at once; an ``Incoming`` past that is ignored."""
_CONTROL_BACKLOG = 64 * 1024
"""Unread bytes a control connection may hold before its reading pauses."""


# ---- control frames over an asyncio transport (the relay's side) ----------------------


class _Control(asyncio.Protocol):
    """A relay-side connection while it speaks RELAY control frames."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ended = False
        self.reserved_at = -1  # the time of the last Reserve granted on it
        self._wake: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _CONTROL_BACKLOG and self.transport is not None:
            self.transport.pause_reading()
        self._notify()

    def eof_received(self) -> bool:
        self.ended = True
        self._notify()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def send(self, msg: RelayMessage) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(relay_frame(msg))

    async def next(self) -> RelayMessage | None:
        """The next control message, ``None`` at end of stream (cancel it to time out).
        Raises ``ProtocolError`` for anything but a well-formed RELAY frame."""
        while True:
            msg = _parse_frame(self.buf)
            if msg is not None:
                return msg
            if self.ended:
                return None
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse_frame(buf: bytearray) -> RelayMessage | None:
    """Take one RELAY frame off the front of ``buf`` (``None``: not all there yet)."""
    if len(buf) < FRAME_HEADER_SIZE:
        return None
    length = int.from_bytes(buf[:4], "big")
    if buf[4] != FrameType.RELAY or length > MAX_RELAY_PAYLOAD:
        raise ProtocolError(f"not a relay control frame (type {buf[4]}, {length} bytes)")
    if len(buf) < FRAME_HEADER_SIZE + length:
        return None
    msg = decode_relay(bytes(buf[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + length]))
    del buf[: FRAME_HEADER_SIZE + length]
    return msg


def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    return (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)


def _ip_literal(host: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4 (the wire carries 4 or 16 bytes)."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host.split("%", 1)[0]


# ---- splicing -----------------------------------------------------------------------


class _Pipe(asyncio.BufferedProtocol):
    """One direction of a circuit: what its transport reads, the other transport writes."""

    def __init__(self, circuit: _Circuit, transport: asyncio.Transport) -> None:
        self.circuit = circuit
        self.transport = transport
        self.other: _Pipe = self
        self.buf = bytearray(SPLICE_BUFFER)
        self.eof = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.forward(memoryview(self.buf)[:nbytes])

    def forward(self, data: bytes | memoryview) -> None:
        out = self.other.transport
        if out.is_closing():
            return
        out.write(data)
        if out.get_write_buffer_size() and isinstance(data, memoryview):
            self.buf = bytearray(SPLICE_BUFFER)  # the transport may still hold a view of it
        self.circuit.carried(len(data), data)

    def pause_writing(self) -> None:  # our transport's buffer is full: stop its source
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        out = self.other.transport
        if self.other.eof:
            self.circuit.close()
        elif not out.is_closing() and out.can_write_eof():
            out.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.circuit.lost(self)


class _Circuit:
    """Two spliced transports, cut by the relay's byte and time limits."""

    def __init__(
        self,
        relay: RelayServer,
        a: _Control,
        b: _Control,
    ) -> None:
        assert a.transport is not None and b.transport is not None
        self.relay = relay
        self.bytes = 0
        self.started = relay.clock()
        self.done = asyncio.get_running_loop().create_future()
        self._lost: set[_Pipe] = set()
        self.a, self.b = _Pipe(self, a.transport), _Pipe(self, b.transport)
        self.a.other, self.b.other = self.b, self.a
        for pipe in (self.a, self.b):
            pipe.transport.set_write_buffer_limits(high=SPLICE_BUFFER)
            pipe.transport.set_protocol(pipe)
        # bytes either end sent before it saw Ready go through first
        for pipe, ctl in ((self.a, a), (self.b, b)):
            if ctl.buf:
                pipe.forward(bytes(ctl.buf))
                ctl.buf.clear()
            if ctl.ended:
                pipe.eof_received()
            else:
                pipe.transport.resume_reading()
        limit = relay.limits.circuit_seconds
        self._timer = asyncio.get_running_loop().call_later(limit, self.cut, "limit")

    def carried(self, nbytes: int, data: bytes | memoryview) -> None:
        self.bytes += nbytes
        if self.relay.tap is not None:
            self.relay.tap(bytes(data))
        if self.relay.book.circuit_over(self.bytes, self.started, self.relay.clock()):
            self.cut("limit")

    def cut(self, why: str) -> None:
        if not self.done.done():
            self.relay.stats.incr(f"circuit.cut.{why}")
            log.debug("relay circuit cut: %s limit", why)
        self.abort()

    def close(self) -> None:
        """Both ends: write out what is buffered, then close."""
        for pipe in (self.a, self.b):
            pipe.transport.close()

    def abort(self) -> None:
        self._timer.cancel()
        for pipe in (self.a, self.b):
            pipe.transport.abort()
        self._finish()

    def lost(self, pipe: _Pipe) -> None:
        self._lost.add(pipe)
        pipe.other.transport.close()  # flushes what it still has to write
        if len(self._lost) == 2:
            self._finish()

    def _finish(self) -> None:
        self._timer.cancel()
        if not self.done.done():
            self.done.set_result(None)


# ---- the relay ------------------------------------------------------------------------


class RelayServer:
    """Grants reservations and splices circuits (the module doc); ``handle`` is a
    ``PeerServer.relay_handler``. ``tap`` (tests only) sees every byte a circuit forwards.
    ``clock`` is wall-clock seconds (a ``Reserve`` carries unix time)."""

    def __init__(
        self,
        limits: RelayLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or RelayLimits()
        self.book = RelayBook(self.limits)
        self.clock = clock
        self.stats = Counters()
        self.tap: Callable[[bytes], None] | None = None
        self._holders: dict[bytes, _Control] = {}  # key -> its reservation connection
        self._pending: dict[bytes, asyncio.Future[_Control]] = {}  # circuit id -> Accept
        self._circuits: set[_Circuit] = set()

    @property
    def reservations(self) -> int:
        return len(self._holders)

    @property
    def circuits(self) -> int:
        return self.book.circuits

    @property
    def buffered(self) -> int:
        """Bytes the circuits hold in their write buffers (flow control bounds it)."""
        return sum(p.transport.get_write_buffer_size() for c in self._circuits for p in (c.a, c.b))

    async def handle(self, transport: asyncio.Transport, payload: bytes, rest: bytes) -> None:
        """Serve one connection whose first frame (``payload``) is RELAY, until it ends or
        becomes half of a circuit (whose end the ``Connect`` side awaits)."""
        ctl = _Control()
        transport.set_protocol(ctl)
        ctl.connection_made(transport)
        ctl.buf += rest
        transport.resume_reading()
        try:
            msg = decode_relay(payload)
        except ProtocolError:
            self.stats.incr("drop.malformed")
            transport.abort()
            return
        match msg:
            case Reserve():
                await self._hold(ctl, msg)
            case Connect(target):
                await self._connect(ctl, target)
            case Accept(circuit_id):
                self._accept(ctl, circuit_id)
            case _:
                self.stats.incr("drop.unexpected")
                transport.abort()

    def _refuse(self, ctl: _Control, code: RefuseCode, text: str) -> None:
        self.stats.incr(f"refuse.{code.name.lower()}")
        ctl.send(Refused(code, text))
        ctl.close()

    def _valid(self, msg: Reserve) -> bool:
        fresh = abs(msg.time - self.clock()) <= RESERVE_SKEW
        signed = crypto.verify(
            msg.key, RESERVE_PURPOSE, reserve_message(msg.key, msg.time), msg.signature
        )
        return fresh and signed

    def _grant(self, ctl: _Control, msg: Reserve, source: str) -> float | None:
        """Admit (or renew) ``msg``: its expiry, or ``None`` once refused (and closed)."""
        if not self._valid(msg):
            self._refuse(ctl, RefuseCode.BAD_REQUEST, "bad signature or clock skew")
            return None
        granted = self.book.reserve(msg.key, source, self.clock())
        if isinstance(granted, RefuseCode):
            self._refuse(ctl, granted, "too many reservations")
            return None
        assert ctl.transport is not None
        host, port = _peer_of(ctl.transport)
        ctl.send(Reserved(int(self.limits.reservation_ttl), _ip_literal(host), port))
        return granted

    async def _hold(self, ctl: _Control, first: Reserve) -> None:
        assert ctl.transport is not None
        source = handshake_source(_peer_of(ctl.transport)[0])
        key = first.key
        old = self._holders.get(key)
        if old is not None and first.time <= old.reserved_at:
            # a replayed Reserve (it travels in the clear) must not take a reservation over
            self._refuse(ctl, RefuseCode.BAD_REQUEST, "an older reservation")
            return
        expires = self._grant(ctl, first, source)
        if expires is None:
            return
        ctl.reserved_at = first.time
        self._holders[key] = ctl
        if old is not None:
            old.close()
        self.stats.incr("reserve")
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, expires - self.clock())):
                        msg = await ctl.next()
                except TimeoutError:
                    self.stats.incr("reserve.expired")
                    return
                if not isinstance(msg, Reserve) or msg.key != key:
                    return  # end of stream, or a message not allowed here
                renewed = self._grant(ctl, msg, source)
                if renewed is None:
                    return
                expires, ctl.reserved_at = renewed, max(ctl.reserved_at, msg.time)
                self.stats.incr("reserve.renewed")
        except ProtocolError:
            self.stats.incr("drop.malformed")
        finally:
            if self._holders.get(key) is ctl:
                del self._holders[key]
                self.book.release(key, source)
            ctl.close()

    async def _connect(self, ctl: _Control, target: bytes) -> None:
        assert ctl.transport is not None
        holder = self._holders.get(target)
        refusal = self.book.open_circuit(target, self.clock())
        if refusal is None and holder is None:  # booked but its connection is gone
            self.book.close_circuit(target)
            refusal = RefuseCode.NO_RESERVATION
        if refusal is not None:
            text = "no reservation" if refusal is RefuseCode.NO_RESERVATION else "limit"
            self._refuse(ctl, refusal, text)
            return
        assert holder is not None
        circuit_id = os.urandom(CIRCUIT_ID_SIZE)
        accepted = asyncio.get_running_loop().create_future()
        self._pending[circuit_id] = accepted
        spliced = False
        try:
            host, port = _peer_of(ctl.transport)
            holder.send(Incoming(circuit_id, _ip_literal(host), port))
            try:
                async with asyncio.timeout(self.limits.accept_timeout):
                    other = await accepted
            except TimeoutError:
                self._refuse(ctl, RefuseCode.TIMEOUT, "the target did not accept")
                return
            if ctl.ended or other.ended:
                ctl.close()
                other.close()
                return
            ctl.send(Ready())
            other.send(Ready())
            circuit = _Circuit(self, ctl, other)
            spliced = True
            self._circuits.add(circuit)
            self.stats.incr("circuit")
            try:
                await asyncio.shield(circuit.done)
            finally:
                self._circuits.discard(circuit)
                circuit.abort()
        finally:
            self._pending.pop(circuit_id, None)
            self.book.close_circuit(target)
            if not spliced:  # refused, or the relay stops: neither end is left open
                ctl.close()
                if accepted.done() and not accepted.cancelled():
                    accepted.result().close()

    def _accept(self, ctl: _Control, circuit_id: bytes) -> None:
        waiting = self._pending.pop(circuit_id, None)
        if waiting is None or waiting.done():
            self._refuse(ctl, RefuseCode.BAD_REQUEST, "unknown circuit")
            return
        waiting.set_result(ctl)  # the Connect side owns it from here


# ---- the client side (sockets) --------------------------------------------------------


async def _connect_socket(
    relay: tuple[str, int], limit: float, local: str | None = None
) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(relay[0], relay[1], type=socket.SOCK_STREAM)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        if local is not None:
            sock.bind((local, 0))
        async with asyncio.timeout(limit):
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _read_message(sock: socket.socket, buf: bytearray) -> RelayMessage:
    """The next control message from ``sock`` (bytes past it stay in ``buf``);
    ``ProtocolError`` if the relay closes or sends anything else."""
    loop = asyncio.get_running_loop()
    while True:
        msg = _parse_frame(buf)
        if msg is not None:
            return msg
        try:
            data = await loop.sock_recv(sock, 4096)
        except ConnectionError:
            data = b""
        if not data:
            raise ProtocolError("the relay closed the connection")
        buf += data


async def open_circuit(
    relay: tuple[str, int],
    target_key: bytes,
    *,
    limit: float = 2 * CONTROL_TIMEOUT,
    local: str | None = None,
) -> tuple[socket.socket, bytes]:
    """A circuit to the holder of ``target_key`` through ``relay``: the connected socket
    and any bytes read past ``Ready``. Raises ``ProtocolError`` if the relay refuses
    (its reason in the message), breaks the protocol or does not answer within
    ``limit`` seconds, and ``OSError`` if it cannot be reached. ``local``: the address
    to connect from (default: the system's choice)."""
    where = f"{relay[0]}:{relay[1]}"
    try:
        async with asyncio.timeout(limit):
            sock = await _connect_socket(relay, limit, local)
            try:
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(sock, relay_frame(Connect(target_key)))
                buf = bytearray()
                msg = await _read_message(sock, buf)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise ProtocolError(f"relay {where} did not open a circuit within {limit:g} s") from None
    except ProtocolError as exc:
        raise ProtocolError(f"relay {where}: {exc}") from exc
    if isinstance(msg, Ready):
        return sock, bytes(buf)
    sock.close()
    if isinstance(msg, Refused):
        why = _refusal_text(msg)
        raise ProtocolError(f"relay {where} refused the circuit: {why}")
    raise ProtocolError(f"relay {where} answered a Connect with {type(msg).__name__}")


def _refusal_text(msg: Refused) -> str:
    try:
        name = RefuseCode(msg.code).name.lower().replace("_", " ")
    except ValueError:
        name = f"code {msg.code}"
    return f"{name} ({msg.text})" if msg.text and msg.text != name else name


OnCircuit = Callable[[socket.socket, bytes], Any]


class RelayKeeper:
    """Holds reservations at up to ``max_relays`` relays for a private node (module doc).

    ``candidates()`` lists relays to try, best first (public DHT contacts); a relay that
    failed or refused is not tried again for ``retry_after`` seconds. ``relays`` is where
    reservations are held now; ``on_change()`` runs whenever that list changes.
    ``on_circuit(sock, leftover)`` gets each circuit opened to us (it owns the socket; if
    it returns an awaitable, that runs in the keeper's task group).
    ``local`` is the address to connect from (default: the system's choice).
    ``run()`` works until cancelled.
    """

    def __init__(
        self,
        identity: Identity,
        candidates: Callable[[], Iterable[tuple[str, int]]],
        on_circuit: OnCircuit,
        *,
        max_relays: int = 2,
        retry_after: float = 60.0,
        check_every: float = 10.0,
        on_change: Callable[[], None] | None = None,
        local: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.local = local
        self.candidates = candidates
        self.on_circuit = on_circuit
        self.max_relays = max_relays
        self.retry_after = retry_after
        self.check_every = check_every
        self.on_change = on_change
        self.clock = clock
        self.observed: dict[tuple[str, int], tuple[str, int]] = {}  # relay -> how it sees us
        self.stats = Counters()
        self._held: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._failed: dict[tuple[str, int], float] = {}  # relay -> monotonic time
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._opening = 0  # circuits being opened (Accept sent, Ready not yet read)

    @property
    def relays(self) -> list[tuple[str, int]]:
        """Relays where a reservation is held now."""
        return list(self.observed)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg  # circuits run here: they outlive the reservation that announced them
            while True:
                self._fill(tg)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.check_every):
                        await self._wake.wait()

    def _fill(self, tg: asyncio.TaskGroup) -> None:
        now = time.monotonic()
        for relay in [r for r, at in self._failed.items() if now - at >= self.retry_after]:
            del self._failed[relay]
        for relay in self.candidates():
            if len(self._held) >= self.max_relays:
                return
            if relay in self._held or now - self._failed.get(relay, -1e9) < self.retry_after:
                continue
            self._held[relay] = tg.create_task(self._hold(relay))

    def _reserve(self) -> Reserve:
        key, when = self.identity.public, int(self.clock())
        signature = crypto.sign(
            self.identity.signing_key, RESERVE_PURPOSE, reserve_message(key, when)
        )
        return Reserve(key, when, signature)

    async def _hold(self, relay: tuple[str, int]) -> None:
        sock: socket.socket | None = None
        try:
            sock = await _connect_socket(relay, CONTROL_TIMEOUT, self.local)
            await self._keep(relay, sock)
        except (OSError, ProtocolError, TimeoutError) as exc:
            log.debug("relay %s:%d: %s", *relay, exc)
        finally:
            if sock is not None:
                sock.close()
            self._failed[relay] = time.monotonic()
            self._held.pop(relay, None)
            if self.observed.pop(relay, None) is not None and self.on_change is not None:
                self.on_change()
            self._wake.set()

    async def _keep(self, relay: tuple[str, int], sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        await loop.sock_sendall(sock, relay_frame(self._reserve()))
        async with asyncio.timeout(CONTROL_TIMEOUT):
            msg = await _read_message(sock, buf)
        if not isinstance(msg, Reserved):
            why = _refusal_text(msg) if isinstance(msg, Refused) else type(msg).__name__
            self.stats.incr("refused")
            raise ProtocolError(f"no reservation: {why}")
        self.stats.incr("reserved")
        self.observed[relay] = (msg.host, msg.port)
        if self.on_change is not None:
            self.on_change()
        renew_at = time.monotonic() + msg.ttl / 2
        renewing = False
        assert self._tg is not None
        while True:
            wait = renew_at - time.monotonic()
            if renewing:
                wait = CONTROL_TIMEOUT  # the relay owes us a Reserved
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    msg = await _read_message(sock, buf)
            except TimeoutError:
                if renewing:
                    raise ProtocolError("the relay did not renew the reservation") from None
                await loop.sock_sendall(sock, relay_frame(self._reserve()))
                renewing = True
                continue
            match msg:
                case Incoming(circuit_id):
                    if self._opening >= MAX_OPENING:  # a relay flooding us with Incoming
                        self.stats.incr("drop.incoming")
                        continue
                    self._opening += 1
                    self._tg.create_task(self._accept(relay, circuit_id))
                case Reserved(ttl):
                    renewing = False
                    renew_at = time.monotonic() + ttl / 2
                case _:
                    raise ProtocolError(f"the relay sent {type(msg).__name__}")

    async def _accept(self, relay: tuple[str, int], circuit_id: bytes) -> None:
        """Open the circuit ``Incoming`` announced and hand it to ``on_circuit``."""
        try:
            opened = await self._open(relay, circuit_id)
        finally:
            self._opening -= 1
        if opened is None:
            return
        sock, leftover = opened
        self.stats.incr("circuit")
        try:
            handed = self.on_circuit(sock, leftover)
            if inspect.isawaitable(handed):  # e.g. a hole punch over the circuit
                await handed
        except Exception:  # one circuit's trouble must not end the reservation
            log.exception("a circuit from relay %s:%d failed", *relay)

    async def _open(
        self, relay: tuple[str, int], circuit_id: bytes
    ) -> tuple[socket.socket, bytes] | None:
        """A new connection to ``relay`` that accepted ``circuit_id`` and read ``Ready``."""
        try:
            sock = await _connect_socket(relay, CONTROL_TIMEOUT, self.local)
        except (OSError, TimeoutError) as exc:
            log.debug("cannot accept a circuit at %s:%d: %s", *relay, exc)
            return None
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, relay_frame(Accept(circuit_id)))
            buf = bytearray()
            async with asyncio.timeout(CONTROL_TIMEOUT):
                msg = await _read_message(sock, buf)
            if not isinstance(msg, Ready):
                raise ProtocolError(f"the relay answered Accept with {type(msg).__name__}")
        except (OSError, ProtocolError, TimeoutError) as exc:
            log.debug("circuit at %s:%d failed: %s", *relay, exc)
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        return sock, bytes(buf)
