"""Circuit relays (like libp2p's circuit relay v2): the relay, the keeper, the dialling side.

``RelayServer`` takes over the connections whose first frame is ``RELAY`` (it is a
``PeerServer.relay_handler``):

- ``Reserve`` (signed by the relay key it names, its time within ``RESERVE_SKEW`` of ours, naming
  one of our own addresses: the connection's local address or one of ``own_addresses()``,
  so a ``Reserve`` sent to another relay cannot be replayed here): a reservation, held
  while that connection stays open and is renewed before its ttl runs out (``RelayBook``
  admits it); a reservation of the same key on a new connection replaces the held one
  only if its time is later (so a replayed ``Reserve`` cannot);
- ``Connect(key)``: the relay sends ``Incoming`` on ``key``'s reservation connection and
  waits (``accept_timeout``) for a connection whose first frame is ``Accept`` with that
  circuit id; then ``Ready`` to both, and from the next byte it splices the two sockets:
  two ``BufferedProtocol`` s write each read (up to ``SPLICE_BUFFER`` bytes) straight into
  the other's transport, pausing a side's reading while the other's write buffer is full;
  no task per byte. A circuit is cut at ``circuit_bytes`` or ``circuit_seconds``, after
  ``circuit_idle`` seconds with no byte either way, and ``half_close_seconds`` after one
  end ended its side. Otherwise ``Refused``: no reservation, a limit, or a target that
  did not accept.

The relay reads only the control frames; what follows ``Ready`` is the two ends' business
(their peer handshake is end-to-end encrypted).

A relay knows reservation holders only by their *relay key* (``wire.relay.RelayKey``:
random per node start, never the identity key; issue 17), so neither it nor anyone
watching the control frames learns which member holds a reservation or is dialled.

``RelayKeeper`` runs on a private node: under its ``RelayKey`` (which the node's provider
records name next to each relay), it holds reservations at up to ``max_relays`` of
the candidates it is given (public DHT contacts: TCP to the UDP port number), renews them
(no more often than ``KeeperLimits.min_renew``), and answers ``Incoming`` by opening the
circuit (``Accept``, wait for ``Ready``) and handing ``(socket, bytes read past Ready,
the downloader's address as the relay reported it)`` to ``on_circuit`` (the punch, or
``PeerServer.adopt``). Each relay's ``Incoming`` pass an ``IncomingGate`` (a few circuits
at once, a rate); a relay that keeps sending more is dropped and not tried again for
``KeeperLimits.drop_seconds``. ``open_circuit`` is the downloader's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from dhtshare import crypto
from dhtshare.errors import ProtocolError
from dhtshare.reach.relaylimits import (
    CircuitSlot,
    IncomingGate,
    KeeperLimits,
    RelayBook,
    RelayLimits,
    Verdict,
    renew_after,
)
from dhtshare.stats import Counters
from dhtshare.transfer.aio.serve import handshake_source
from dhtshare.wire.frames import FrameType, peek_header, take_frame
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
    RelayKey,
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
    "OnCircuit",
    "RelayKeeper",
    "RelayKey",
    "RelayServer",
    "open_circuit",
]

log = logging.getLogger(__name__)

SPLICE_BUFFER = 256 * 1024
"""Bytes one splice read may take (and the per-direction write buffer high mark)."""
RESERVE_SKEW = 300.0
REHOLD_AFTER = 5.0
"""Seconds before a keeper asks again a relay whose reservation worked and then ended
(a relay that restarts is back within seconds; one that failed waits ``retry_after``)."""
RENEW_GAP = 30.0
"""Seconds a renewal must come after the last one at least (less for a short lifetime)."""
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
    head = peek_header(buf)
    if head is None:
        return None
    kind, length = head
    if kind != FrameType.RELAY or length > MAX_RELAY_PAYLOAD:
        raise ProtocolError(f"not a relay control frame (type {kind}, {length} bytes)")
    frame = take_frame(buf)
    return None if frame is None else decode_relay(frame[1])


def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    return (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)


def _ip_literal(host: str) -> str:
    """An IPv4-mapped IPv6 address as plain IPv4 (the wire carries 4 or 16 bytes)."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host.split("%", 1)[0]


def _same_address(host: str, port: int) -> tuple[str, int]:
    """``host:port`` in one spelling (IPv4-mapped IPv6 as IPv4), to compare addresses."""
    try:
        ip = ipaddress.ip_address(_ip_literal(host))
    except ValueError:
        return host, port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


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
        else:
            if not out.is_closing() and out.can_write_eof():
                out.write_eof()
            self.circuit.half_closed()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.circuit.lost(self)


class _Circuit:
    """Two spliced transports, cut by the relay's byte and time limits (``circuit_deadline``:
    its age, idleness, an end's half-close; times on the loop's clock)."""

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
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._began = self._active = loop.time()
        self._half_closed: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.done = loop.create_future()
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
        self._schedule()

    def _schedule(self) -> None:
        """(Re)arm the timer for the earliest time limit; cut if it has passed."""
        if self.done.done():
            return
        when, why = self.relay.book.circuit_deadline(self._began, self._active, self._half_closed)
        if when <= self._loop.time():
            self.cut(why)
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._schedule)

    def half_closed(self) -> None:
        """One end ended its side (or its connection): the other has a little while."""
        if self._half_closed is None:
            self._half_closed = self._loop.time()
            self._schedule()

    def carried(self, nbytes: int, data: bytes | memoryview) -> None:
        self.bytes += nbytes
        self._active = self._loop.time()
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
        for pipe in (self.a, self.b):
            pipe.transport.abort()
        self._finish()

    def lost(self, pipe: _Pipe) -> None:
        self._lost.add(pipe)
        pipe.other.transport.close()  # flushes what it still has to write
        if len(self._lost) == 2:
            self._finish()
        else:
            self.half_closed()  # the flush gets ``half_close_seconds``

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.done.done():
            self.done.set_result(None)


# ---- the relay ------------------------------------------------------------------------


class RelayServer:
    """Grants reservations and splices circuits (the module doc); ``handle`` is a
    ``PeerServer.relay_handler``. ``tap`` (tests only) sees every byte a circuit forwards.
    ``clock`` is wall-clock seconds (a ``Reserve`` carries unix time). A ``Reserve`` must
    name the address its connection reached (the local address) or one of
    ``own_addresses()`` (e.g. the node's verified public address, when a NAT forwards a
    port to it)."""

    def __init__(
        self,
        limits: RelayLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        own_addresses: Callable[[], Iterable[tuple[str, int]]] | None = None,
    ) -> None:
        self.limits = limits or RelayLimits()
        self.book = RelayBook(self.limits)
        self.clock = clock
        self.own_addresses = own_addresses
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

    def _ours(self, ctl: _Control, host: str, port: int) -> bool:
        """Whether ``host:port`` is this relay: where ``ctl`` connected, or an own address."""
        wanted = _same_address(host, port)
        assert ctl.transport is not None
        local = ctl.transport.get_extra_info("sockname")
        if local and _same_address(str(local[0]), int(local[1])) == wanted:
            return True
        if self.own_addresses is None:
            return False
        try:
            return any(_same_address(h, p) == wanted for h, p in self.own_addresses())
        except Exception:  # a broken callback must not end the relay
            log.exception("own_addresses failed")
            return False

    def _valid(self, ctl: _Control, msg: Reserve) -> str | None:
        """Why ``msg`` is refused, or ``None``."""
        if abs(msg.time - self.clock()) > RESERVE_SKEW:
            return "clock skew"
        signed = reserve_message(msg.key, msg.time, msg.host, msg.port)
        if not crypto.verify(msg.key, RESERVE_PURPOSE, signed, msg.signature):
            return "bad signature"
        if not self._ours(ctl, msg.host, msg.port):
            self.stats.incr("refuse.not_ours")
            return "addressed to another relay"
        return None

    def _grant(self, ctl: _Control, msg: Reserve, source: str) -> float | None:
        """Admit (or renew) ``msg``: its expiry, or ``None`` once refused (and closed)."""
        why = self._valid(ctl, msg)
        if why is not None:
            self._refuse(ctl, RefuseCode.BAD_REQUEST, why)
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
        # A renewal costs a signature check: it must be no older than the last one and come
        # no sooner than a quarter of the lifetime (30 s at most) after it, else the
        # connection ends (one connection could otherwise make us verify without end).
        gap = min(RENEW_GAP, self.limits.reservation_ttl / 4)
        renewed_at = self.clock()
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
                if msg.time < ctl.reserved_at or self.clock() - renewed_at < gap:
                    self.stats.incr("drop.renewal")
                    return
                renewed_at = self.clock()
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
        source = handshake_source(_peer_of(ctl.transport)[0])
        slot = self.book.open_circuit(target, source, self.clock())
        if isinstance(slot, CircuitSlot) and holder is None:  # booked but its connection is gone
            self.book.close_circuit(slot)
            slot = RefuseCode.NO_RESERVATION
        if not isinstance(slot, CircuitSlot):
            text = "no reservation" if slot is RefuseCode.NO_RESERVATION else "limit"
            self._refuse(ctl, slot, text)
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
            self.book.close_circuit(slot)
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
    """A circuit to the holder of the relay key ``target_key`` (from its provider record)
    through ``relay``: the connected socket
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


OnCircuit = Callable[[socket.socket, bytes, tuple[str, int]], Any]
"""``on_circuit(sock, leftover, source)``: a circuit opened to us, the bytes read past
``Ready``, and the downloader's address as the relay reported it (in ``Incoming``)."""


def _with_source(
    on_circuit: OnCircuit | Callable[[socket.socket, bytes], Any],
) -> OnCircuit:
    """``on_circuit`` as an ``OnCircuit``: one that takes only ``(sock, leftover)``, as
    ``PeerServer.adopt`` does, is wrapped to ignore the source."""
    try:
        inspect.signature(on_circuit).bind(None, b"", ("", 0))
    except TypeError:
        two = on_circuit

        def wrapped(sock: socket.socket, leftover: bytes, source: tuple[str, int]) -> Any:
            return two(sock, leftover)  # type: ignore[call-arg]

        return wrapped
    except ValueError:  # no signature to inspect: assume the current one
        pass
    return on_circuit  # type: ignore[return-value]


class _Flooded(Exception):
    """A relay sent ``Incoming`` past its gate again and again."""


class RelayKeeper:
    """Holds reservations at up to ``max_relays`` relays for a private node (module doc),
    under ``key`` (a ``RelayKey``; never the node's identity: a ``TypeError`` otherwise).

    ``candidates()`` lists relays to try, best first (public DHT contacts); a relay that
    failed or refused is not tried again for ``retry_after`` seconds, one dropped for
    flooding us with ``Incoming`` not for ``limits.drop_seconds``. ``relays`` is where
    reservations are held now; ``on_change()`` runs whenever that list changes.
    ``on_circuit(sock, leftover, source)`` gets each circuit opened to us (it owns the
    socket; if it returns an awaitable, that runs in the keeper's task group, and the
    circuit counts against its relay's ``limits.circuits_per_relay`` until it is done); a
    callable of ``(sock, leftover)`` only, like ``PeerServer.adopt``, is called without
    the source. ``local`` is the address to connect from (default: the system's choice).
    ``run()`` works until cancelled.
    """

    def __init__(
        self,
        key: RelayKey,
        candidates: Callable[[], Iterable[tuple[str, int]]],
        on_circuit: OnCircuit | Callable[[socket.socket, bytes], Any],
        *,
        max_relays: int = 2,
        retry_after: float = 60.0,
        check_every: float = 10.0,
        on_change: Callable[[], None] | None = None,
        local: str | None = None,
        clock: Callable[[], float] = time.time,
        limits: KeeperLimits | None = None,
    ) -> None:
        if not isinstance(key, RelayKey):  # an identity would name the member to every relay
            raise TypeError(f"a RelayKeeper reserves under a RelayKey, not {type(key).__name__}")
        self.key = key
        self.local = local
        self.candidates = candidates
        self.on_circuit = _with_source(on_circuit)
        self.max_relays = max_relays
        self.retry_after = retry_after
        self.check_every = check_every
        self.on_change = on_change
        self.clock = clock
        self.limits = limits or KeeperLimits()
        self.observed: dict[tuple[str, int], tuple[str, int]] = {}  # relay -> how it sees us
        self.stats = Counters()
        self._held: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._retry_at: dict[tuple[str, int], float] = {}  # relay -> monotonic time
        self._gates: dict[tuple[str, int], IncomingGate] = {}  # each relay's Incoming
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
        for relay in [r for r, at in self._retry_at.items() if now >= at]:
            del self._retry_at[relay]
        for relay in self.candidates():
            if len(self._held) >= self.max_relays:
                return
            if relay in self._held or relay in self._retry_at:
                continue
            self._held[relay] = tg.create_task(self._hold(relay))

    def _reserve(self, relay: tuple[str, int]) -> Reserve:
        """A fresh ``Reserve`` for the relay we reached at ``relay`` (an IP literal)."""
        return self.key.reserve(int(self.clock()), *relay)

    async def _hold(self, relay: tuple[str, int]) -> None:
        sock: socket.socket | None = None
        retry = self.retry_after
        try:
            sock = await _connect_socket(relay, CONTROL_TIMEOUT, self.local)
            await self._keep(relay, sock)
        except _Flooded:
            retry = self.limits.drop_seconds
            log.info("relay %s:%d sends too many circuits: dropped", *relay)
        except (OSError, ProtocolError, TimeoutError) as exc:
            log.debug("relay %s:%d: %s", *relay, exc)
        finally:
            if sock is not None:
                sock.close()
            if retry == self.retry_after and relay in self.observed:
                retry = REHOLD_AFTER  # it worked until now (the relay restarted, say)
            self._retry_at[relay] = max(self._retry_at.get(relay, 0.0), time.monotonic() + retry)
            self._held.pop(relay, None)
            if self.observed.pop(relay, None) is not None and self.on_change is not None:
                self.on_change()
            self._wake.set()

    async def _keep(self, relay: tuple[str, int], sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        peer = sock.getpeername()  # the relay as we reached it: what our Reserve names
        dialled = (_ip_literal(str(peer[0])), int(peer[1]))
        await loop.sock_sendall(sock, relay_frame(self._reserve(dialled)))
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
        renew_at = time.monotonic() + renew_after(msg.ttl, self.limits)
        renewing = False
        gate = self._gates.get(relay)
        if gate is None:
            gate = self._gates[relay] = IncomingGate(self.limits, time.monotonic())
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
                await loop.sock_sendall(sock, relay_frame(self._reserve(dialled)))
                renewing = True
                continue
            match msg:
                case Incoming(circuit_id, host, port):
                    verdict = gate.admit(time.monotonic())
                    if verdict is Verdict.OPEN and self._opening >= MAX_OPENING:
                        gate.done()
                        verdict = Verdict.IGNORE
                    if verdict is Verdict.DROP:
                        self.stats.incr("drop.relay")
                        raise _Flooded
                    if verdict is Verdict.IGNORE:  # a relay flooding us with Incoming
                        self.stats.incr("drop.incoming")
                        continue
                    self._opening += 1
                    self._tg.create_task(self._accept(relay, gate, circuit_id, (host, port)))
                case Reserved(ttl):
                    renewing = False
                    renew_at = time.monotonic() + renew_after(ttl, self.limits)
                case _:
                    raise ProtocolError(f"the relay sent {type(msg).__name__}")

    async def _accept(
        self,
        relay: tuple[str, int],
        gate: IncomingGate,
        circuit_id: bytes,
        source: tuple[str, int],
    ) -> None:
        """Open the circuit ``Incoming`` announced and hand it to ``on_circuit``."""
        try:
            try:
                opened = await self._open(relay, circuit_id)
            finally:
                self._opening -= 1
            if opened is None:
                return
            sock, leftover = opened
            self.stats.incr("circuit")
            try:
                handed = self.on_circuit(sock, leftover, source)
                if inspect.isawaitable(handed):  # e.g. a hole punch over the circuit
                    await handed
            except Exception:  # one circuit's trouble must not end the reservation
                log.exception("a circuit from relay %s:%d failed", *relay)
        finally:
            gate.done()

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
