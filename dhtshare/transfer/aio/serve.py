"""Serve pieces of shared files to current members of the file's group, and nobody else.

The node fills a ``ShareRegistry`` (``transfer/share.py``): one ``Share`` per
``(group_id, content_id)`` with the file's path, layout, piece hashes and the set of
pieces we hold (all of them for a finished file; a growing set while we are still
downloading it).
``PeerServer`` accepts TCP connections, runs the server handshake (the client must prove
it holds the current access key of a group in ``ShareRegistry.access_keys``; whoever does
not learns nothing, not even our key: docs/wire.md), and then:

- refuses (``Reject`` with ``NOT_MEMBER`` or ``UNKNOWN_CONTENT`` and a one-line
  text) a client that is not a current member of the group it named, or that asks
  for a file we do not share;
- sends our ``Bitfield``, answers ``GetHashes`` with ``HashList`` chunks, and
  answers ``Request`` with ``Piece``, one block at a time from disk (in a worker
  thread), honouring ``Cancel`` for requests not yet served;
- re-checks membership before every block, so a member removed from the roster
  is cut off as soon as the node's view says so;
- sends ``Have`` whenever a partial share gains a verified piece (swarming);
- super-seeds a complete share served to two or more sessions at once: a new
  session is offered a window of rare pieces, more as it asks (``SuperSeed``, in
  ``transfer/superseed.py``).

Memory per connection is bounded: at most ``max_queued`` small requests wait,
and one block is read ahead of the one being sent. Bytes uploaded are counted
per peer key. Every task belongs to ``serve()``'s ``TaskGroup``.

Connections that have not finished the handshake cost little and are few: the wire
lets them hold a few hundred bytes (``MAX_HANDSHAKE_FRAME``); at most
``max_handshakes`` of them exist at once (a new one closes the oldest handshake of
the source address holding the most, so a few busy addresses cannot push out everyone
else's) and at most ``max_handshakes_per_ip`` per source address (an IPv6 /64 counts as
one address; a new one past that is refused); and each must finish within
``handshake_timeout`` seconds.

The first frame of a connection picks its handler (``_FirstFrame``): ``CLIENT_HELLO`` a
peer session; ``DIALBACK`` a reachability dial-back, handed to ``dialback_sink`` (then
closed); ``RELAY`` the relay server (``relay_handler``), which takes the connection over (a
node that does not relay answers ``Refused(NOT_RELAYING)``);
anything else (or a handler that is not set) is closed. Until it is handed over the
connection counts as a handshake (the limits above; the first frame is at most
``MAX_HANDSHAKE_FRAME`` bytes). ``adopt`` serves a socket connected elsewhere (a punched
connection, a relayed circuit) as a peer session, as if accepted.

Authenticated sessions are shared out the same way: at most ``max_sessions_per_key``
per member key and ``max_sessions_per_ip`` per source address (a newcomer past either
is refused ``BUSY``), and once all ``max_connections`` places are taken a newcomer
closes the oldest session of the key or address holding the most (if that holds at
least two more than the newcomer's), else is refused ``BUSY``. So one member, whatever
it opens, cannot keep another member's download out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable

from dhtshare.errors import NodeError, ProtocolError, StoreError
from dhtshare.identity import Identity
from dhtshare.stats import Counters
from dhtshare.store.partial import BlockReader
from dhtshare.transfer.aio.peer import (
    READ_TIMEOUT,
    PeerProtocol,
    PeerStream,
    accept_peer,
    server_protocol,
)
from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.superseed import SuperSeed
from dhtshare.transfer.swarm import KEEPALIVE_INTERVAL
from dhtshare.wire import (
    MAX_HANDSHAKE_FRAME,
    Bitfield,
    Cancel,
    ConnectionClosed,
    FrameType,
    GetHashes,
    HashList,
    Have,
    Keepalive,
    Piece,
    Reason,
    Reject,
    Request,
)
from dhtshare.wire.dialback import decode_dialback
from dhtshare.wire.frames import FRAME_HEADER_SIZE, peek_header, take_frame
from dhtshare.wire.relay import RefuseCode, Refused, relay_frame

__all__ = [
    "MAX_HANDSHAKES",
    "MAX_HANDSHAKES_PER_IP",
    "MAX_SESSIONS_PER_IP",
    "MAX_SESSIONS_PER_KEY",
    "SERVER_HANDSHAKE_TIMEOUT",
    "DialbackSink",
    "PeerServer",
    "RelayHandler",
    "handshake_source",
]

log = logging.getLogger(__name__)

SERVER_HANDSHAKE_TIMEOUT = 5.0
"""A client that has not authenticated this long after connecting is closed (slow-loris):
a handshake is three small frames, a second and a half of round trips."""
MAX_HANDSHAKES = 64
"""Connections still in the handshake at once; a new one past this closes the oldest of
the source address holding the most."""
MAX_HANDSHAKES_PER_IP = 8
"""Connections still in the handshake from one source address; more are refused."""
MAX_SESSIONS_PER_KEY = 8
"""Authenticated sessions of one member key at once (one per file it downloads from us)."""
MAX_SESSIONS_PER_IP = 16
"""Authenticated sessions from one source address at once (members behind one NAT)."""
NOTSENT_LOWAT = 256 * 1024
"""Unsent bytes the kernel may queue per connection (``TCP_NOTSENT_LOWAT``), so that
queued blocks stay where a Cancel can still recall them (measurements:
docs/performance-history.md, round 3)."""
DialbackSink = Callable[[bytes, tuple[str, int]], None]
"""Gets a dial-back's nonce and the address it came from."""
RelayHandler = Callable[[asyncio.Transport, bytes, bytes], Awaitable[None]]
"""Takes over a connection whose first frame is ``RELAY``: its transport, that frame's
payload, and the bytes read past it; it owns (and closes) the transport from then on."""


class PeerServer:
    """Accepts peer connections and serves the registry's shares to group members.

    ``await start()`` binds (``NodeError`` if the port is taken) and returns the
    address; ``serve()`` runs until cancelled and owns every connection's task.
    ``upload_rate`` (bytes/s, ``None``: unlimited) caps the sum of all uploads.
    ``superseed`` (default on) super-seeds complete shares served to two or more
    sessions at once (see ``SuperSeed``); ``superseed_idle`` is its ``idle_after``
    (and a quarter of its ``patience``). ``max_handshakes``, ``max_handshakes_per_ip``
    and ``handshake_timeout`` bound the connections that have not authenticated yet
    (the module doc); ``max_connections`` bounds the authenticated ones, shared out by
    ``max_sessions_per_key`` and ``max_sessions_per_ip`` (the module doc).
    ``dialback_sink`` and ``relay_handler`` (attributes, ``None`` by default) take the
    connections whose first frame is ``DIALBACK`` or ``RELAY``.
    """

    def __init__(
        self,
        identity: Identity,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        shares: ShareRegistry,
        upload_rate: float | None = None,
        max_connections: int = 128,
        max_sessions_per_key: int = MAX_SESSIONS_PER_KEY,
        max_sessions_per_ip: int = MAX_SESSIONS_PER_IP,
        max_queued: int = 128,
        max_handshakes: int = MAX_HANDSHAKES,
        max_handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP,
        handshake_timeout: float = SERVER_HANDSHAKE_TIMEOUT,
        idle_timeout: float = READ_TIMEOUT,
        superseed: bool = True,
        superseed_idle: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.superseed = superseed
        self.superseed_idle = superseed_idle
        self.rng = rng or random.Random()
        self.shares = shares
        self.max_connections = max_connections
        self.max_sessions_per_key = max_sessions_per_key
        self.max_sessions_per_ip = max_sessions_per_ip
        self.max_queued = max_queued
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_ip = max_handshakes_per_ip
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.bucket = TokenBucket(None, now=clock())
        self.set_upload_rate(upload_rate)
        self.uploaded: Counter[bytes] = Counter()
        self.stats = Counters()
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._sessions: set[_Session] = set()
        self._admitted = 0  # sessions admitted so far: their order (oldest first)
        self._handshaking: dict[asyncio.Transport, str] = {}  # -> source, oldest first
        self._handshakes_from: Counter[str] = Counter()
        self.serving = asyncio.Event()  # set once connections are accepted
        self._seeds: dict[Share, SuperSeed] = {}
        self.dialback_sink: DialbackSink | None = None
        self.relay_handler: RelayHandler | None = None

    def set_upload_rate(self, rate: float | None) -> None:
        """Change the upload limit (bytes/s; ``None`` or 0: unlimited)."""
        self.bucket.set_rate(rate, now=self.clock())

    @property
    def address(self) -> tuple[str, int]:
        """Where we listen (after ``start``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> int:
        return len(self._sessions)

    @property
    def handshakes(self) -> int:
        """Connections accepted that have not finished the handshake yet."""
        return len(self._handshaking)

    async def start(self) -> tuple[str, int]:
        """Bind the listening socket; ``NodeError`` if the address is unusable."""
        if self._server is None:
            try:
                if self._port:  # reuse_port would let us share a port another node holds
                    socket.create_server((self._host, self._port)).close()
                self._server = await asyncio.get_running_loop().create_server(
                    lambda: _FirstFrame(self._on_accept),
                    self._host,
                    self._port,
                    start_serving=False,
                    reuse_port=True,  # a hole punch connects from this port too
                )
            except OSError as exc:
                raise NodeError(
                    f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}",
                    "choose another port, or stop the program using it",
                ) from exc
        return self.address

    async def serve(self) -> None:
        """Accept and serve connections until cancelled; then close them all."""
        server = self._server
        if server is None:
            await self.start()
            server = self._server
        assert server is not None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                await server.start_serving()
                self.serving.set()
                await server.serve_forever()
            finally:
                self.serving.clear()
                self._tg = None
                server.close()

    def close(self) -> None:
        """Close the listening socket (``serve()`` does it too when cancelled)."""
        if self._server is not None:
            self._server.close()

    def adopt(self, sock: socket.socket, initial: bytes = b"") -> None:
        """Serve ``sock``, connected elsewhere (punched, or a relayed circuit), as a peer
        session accepted here, ``initial`` (bytes already read from it) first. Only a
        ``CLIENT_HELLO`` may start it. Closed at once if the server is not serving."""
        if self._tg is None:
            sock.close()
            return
        try:
            task = self._tg.create_task(self._adopt(sock, bytes(initial)))
        except RuntimeError:
            sock.close()
            return
        task.add_done_callback(lambda t: sock.close() if t.cancelled() else None)

    async def _adopt(self, sock: socket.socket, initial: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _FirstFrame(self._on_accept, initial, peer_only=True), sock=sock
            )
        except OSError as exc:
            log.debug("cannot adopt a connection: %s", exc)
            sock.close()

    def _on_accept(self, first: _FirstFrame) -> None:
        transport = first.transport
        assert transport is not None
        if self._tg is None:
            self.stats.incr("refuse.busy")
            transport.close()
            return
        peer = transport.get_extra_info("peername")
        source = handshake_source(str(peer[0])) if peer else "?"
        if self._handshakes_from[source] >= self.max_handshakes_per_ip:
            self.stats.incr("refuse.handshakes_per_ip")
            transport.abort()
            return
        while self._handshaking and len(self._handshaking) >= self.max_handshakes:
            self.stats.incr("evict.handshake")
            self._handshake_ended(self._handshake_to_evict(), close=True)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self._handshaking[transport] = source
        self._handshakes_from[source] += 1
        try:
            self._tg.create_task(self._run_connection(first))
        except RuntimeError:  # the TaskGroup is shutting down: nobody would serve it
            self._handshake_ended(transport, close=True)

    async def _run_connection(self, first: _FirstFrame) -> None:
        """Wait for the first frame (within ``handshake_timeout``) and hand the connection
        to its handler (the module doc)."""
        transport = first.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.handshake_timeout
        try:
            async with asyncio.timeout_at(deadline):
                frame = await first.frame
        except TimeoutError:
            frame = None
        except asyncio.CancelledError:  # the server stops: the connection goes with it
            self._handshake_ended(transport, close=True)
            raise
        if frame is None:
            self.stats.incr("drop.first_frame")
            self._handshake_ended(transport, close=True)
            return
        kind, payload, rest = frame
        if kind == FrameType.CLIENT_HELLO:
            protocol = server_protocol(self.identity, _no_callback, self.shares.access_keys)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            _feed(protocol, first.received)
            if first.eof:
                protocol.eof_received()
            transport.resume_reading()
            await self._run_session(protocol, max(0.0, deadline - loop.time()))
            return
        self._handshake_ended(transport)
        if kind == FrameType.DIALBACK and not first.peer_only and self.dialback_sink:
            transport.close()
            peer = transport.get_extra_info("peername")
            try:
                nonce = decode_dialback(payload)
            except ProtocolError:
                self.stats.incr("drop.dialback")
                return
            if peer:
                self.stats.incr("dialback")
                try:
                    self.dialback_sink(nonce, (str(peer[0]), int(peer[1])))
                except Exception:  # a bug must cost one dial-back, not the server
                    self.stats.incr("drop.bug")
                    log.exception("dial-back handler crashed")
        elif kind == FrameType.RELAY and not first.peer_only and self.relay_handler:
            self.stats.incr("relay")
            try:
                await self.relay_handler(transport, payload, rest)
            except Exception:  # a bug must cost one connection, not the server
                self.stats.incr("drop.bug")
                log.exception("relay connection crashed")
                transport.abort()
        elif kind == FrameType.RELAY and not first.peer_only:  # say so: the asker moves on
            self.stats.incr("refuse.not_relaying")
            transport.write(relay_frame(Refused(RefuseCode.NOT_RELAYING, "not relaying")))
            transport.close()
        else:
            self.stats.incr("drop.first_frame")
            transport.abort()

    def _handshake_to_evict(self) -> asyncio.Transport:
        """The oldest handshake of the source address holding the most (handshakes cost
        nothing, so the heaviest source pays for a newcomer, not whoever came first)."""
        most = max(self._handshakes_from.values())
        return next(t for t, src in self._handshaking.items() if self._handshakes_from[src] == most)

    def _handshake_ended(self, transport: asyncio.Transport, *, close: bool = False) -> None:
        """``transport`` no longer counts as a handshake in progress (``close``: end it)."""
        source = self._handshaking.pop(transport, None)
        if source is not None:
            self._handshakes_from[source] -= 1
            if self._handshakes_from[source] <= 0:
                del self._handshakes_from[source]
        if close:
            transport.abort()  # nothing worth a FIN: it never authenticated

    async def _run_session(self, protocol: PeerProtocol, handshake_timeout: float) -> None:
        """One connection, start to end; nothing it does can take the server down.

        A peer refused at once (not a member, a file we do not share, or no session
        place for it: ``_admit``) is rejected while it still counts as a handshake
        (per-address cap, global cap): a handshake costs any key nothing, so a refused
        peer must never hold one of the ``max_connections`` session places while its
        Reject lingers.
        """
        try:
            stream = await accept_peer(
                protocol,
                handshake_timeout=handshake_timeout,
                read_timeout=self.idle_timeout,
            )
            session = _Session(self, stream)
            if await session._refuse_if_needed() or not await self._admit(session):
                return
        except (ProtocolError, OSError, TimeoutError) as exc:
            self.stats.incr("drop.handshake")
            log.debug("handshake failed: %s", exc)
            return
        except Exception:  # a bug must cost one connection, not the server (its TaskGroup)
            self.stats.incr("drop.bug")
            log.exception("handshake crashed")
            if protocol.transport is not None:
                protocol.transport.close()
            return
        finally:
            assert protocol.transport is not None
            self._handshake_ended(protocol.transport)
        try:
            await session.run()
        except Exception as exc:  # never the server's: one connection ends, nothing more
            if _session_ending(exc):
                self.stats.incr("drop.session")
                log.debug("session with %s ended: %s", stream.remote_address, exc)
            else:  # a bug must cost one connection, not the server (its TaskGroup)
                self.stats.incr("drop.bug")
                log.exception("session with %s crashed", stream.remote_address)
        finally:
            self._sessions.discard(session)
            self._session_left(session)
            await session.close()

    async def _admit(self, session: _Session) -> bool:
        """Give ``session`` a place (True) or refuse it ``BUSY`` (False): see the module doc.

        The check and the taking of the place happen with no await in between.
        """
        refusal = self._no_place_for(session)
        if refusal is None:
            self._admitted += 1
            session.order = self._admitted
            self._sessions.add(session)
            return True
        self.stats.incr(f"refuse.{refusal}")
        await session.stream.reject(Reason.BUSY, "busy: too many connections, try again later")
        return False

    def _no_place_for(self, session: _Session) -> str | None:
        """Why ``session`` gets no place (a stats name), or ``None`` once it has one
        (closing the oldest session of the heaviest key or address if the server is full)."""
        keys = Counter(s.peer for s in self._sessions)
        sources = Counter(s.source for s in self._sessions)
        if keys[session.peer] >= self.max_sessions_per_key:
            return "sessions_per_key"
        if sources[session.source] >= self.max_sessions_per_ip:
            return "sessions_per_ip"
        if len(self._sessions) < self.max_connections:
            return None

        def load(s: _Session) -> int:
            return max(keys[s.peer], sources[s.source])

        victim = max(self._sessions, key=lambda s: (load(s), -s.order))
        if load(victim) < load(session) + 2:  # nobody holds clearly more than the newcomer
            return "busy"
        self.stats.incr("evict.session")
        self._sessions.discard(victim)
        victim.stream.abort(Reason.BUSY, "busy: this place went to another member")
        return None

    def _seed_for(self, share: Share) -> SuperSeed | None:
        """The super-seeding state of a complete share (``None``: not super-seeding)."""
        if not self.superseed or not share.complete:
            return None
        seed = self._seeds.get(share)
        if seed is None:
            count, size = share.layout.piece_count, share.layout.piece_size
            idle = self.superseed_idle
            seed = SuperSeed(count, size, self.rng, idle_after=idle, patience=4 * idle)
            self._seeds[share] = seed
        return seed

    def sessions_of(self, share: Share) -> list[_Session]:
        return [s for s in self._sessions if s.share is share]

    def _session_left(self, session: _Session) -> None:
        """Forget the session's offers; a super-seeded session left alone gets every piece."""
        share, seed = session.share, session.seed
        if share is None or seed is None:
            return
        seed.leave(session)
        rest = self.sessions_of(share)
        if not rest:
            self._seeds.pop(share, None)
        elif len(rest) == 1 and rest[0].seed is seed:
            rest[0].advertise(seed.flush(rest[0]))


class _FirstFrame(asyncio.BufferedProtocol):
    """An accepted connection until its first frame is in: ``frame`` then holds its type,
    payload and the bytes read past it (``None``: closed, or a header announcing more than
    ``MAX_HANDSHAKE_FRAME`` bytes), and reading pauses for the handler to take over.
    ``received`` is every byte read (``initial`` first)."""

    def __init__(
        self,
        on_connect: Callable[[_FirstFrame], None],
        initial: bytes = b"",
        *,
        peer_only: bool = False,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer_only = peer_only  # adopted: only a peer session may start here
        self.received = bytearray(initial)
        self.eof = False
        self.frame: asyncio.Future[tuple[int, bytes, bytes] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._room = bytearray(FRAME_HEADER_SIZE + MAX_HANDSHAKE_FRAME)
        self._on_connect = on_connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._on_connect(self)
        self._parse()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._room)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self._room[:nbytes]
        self._parse()

    def _parse(self) -> None:
        head = None if self.frame.done() else peek_header(self.received)
        if head is None:
            return
        if head[1] > MAX_HANDSHAKE_FRAME:
            self.frame.set_result(None)
        else:
            rest = bytearray(self.received)
            frame = take_frame(rest)
            if frame is None:
                return
            self.frame.set_result((frame[0], frame[1], bytes(rest)))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.frame.done():
            self.frame.set_result(None)
        return True  # the handler closes it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.frame.done():
            self.frame.set_result(None)


def _no_callback(protocol: PeerProtocol) -> None:
    pass


def _feed(protocol: PeerProtocol, data: bytes | bytearray) -> None:
    """Hand ``protocol`` bytes as if it had read them from its socket."""
    view = memoryview(data)
    while view:
        with protocol.get_buffer(len(view)) as room:
            size = min(len(room), len(view))
            room[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def handshake_source(host: str) -> str:
    """What ``max_handshakes_per_ip`` counts by: the IPv4 address, or the /64 network of
    an IPv6 address (one host is commonly handed a whole /64)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _session_ending(exc: BaseException) -> bool:
    """True for what ends a session in the normal course: the peer broke the protocol or
    went away, or the disk failed; also when a session's ``TaskGroup`` wraps only those."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_session_ending(e) for e in exc.exceptions)
    return isinstance(exc, ProtocolError | OSError | StoreError)


class _Session:
    """Serving one authenticated client: a receive loop and a send loop."""

    def __init__(self, server: PeerServer, stream: PeerStream) -> None:
        self.server = server
        self.stream = stream
        self.peer = stream.peer_key
        assert stream.peer is not None
        self.group_id = stream.peer.group_id
        self.content_id = stream.peer.content_id
        self.source = handshake_source(stream.remote_address[0])
        self.order = 0  # when admitted (PeerServer._admit)
        self.share: Share | None = None
        self.queue: deque[Request] = deque()
        self.wake = asyncio.Event()
        self.reader: BlockReader | None = None
        self.seed: SuperSeed | None = None

    def _refusal(self) -> tuple[Reason, str] | None:
        """Why this peer may not be served (now), or ``None``."""
        share = self.server.shares.get(self.group_id, self.content_id)
        if share is None or (self.share is not None and share is not self.share):
            return Reason.UNKNOWN_CONTENT, "this peer does not share that file (any more)"
        if not self.server.shares.is_member(self.group_id, self.peer):
            return Reason.NOT_MEMBER, "refused: you are not a member of this group"
        return None

    async def _refuse_if_needed(self) -> bool:
        refusal = self._refusal()
        if refusal is None:
            return False
        reason, text = refusal
        self.server.stats.incr(f"refuse.{reason.name.lower()}")
        await self.stream.reject(reason, text)
        return True

    async def run(self) -> None:
        if await self._refuse_if_needed():
            return
        share = self.server.shares.get(self.group_id, self.content_id)
        assert share is not None
        self.share = share
        await self.stream.send(self._first_bitfield(share))
        unlisten = share.listen(self._on_have)
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._send_loop())
                try:
                    await self._receive_loop(share)
                finally:
                    sender.cancel()
        finally:
            unlisten()

    def _first_bitfield(self, share: Share) -> Bitfield:
        """Every piece we hold, unless the share is super-seeded to this session."""
        self.seed = self.server._seed_for(share)
        if self.seed is None:
            return share.bitfield()
        alone = len(self.server.sessions_of(share)) <= 1
        offer = self.seed.join(self, self.server.clock(), full=alone)
        return Bitfield.from_pieces(share.layout.piece_count, offer)

    def _on_have(self, index: int) -> None:
        with contextlib.suppress(ProtocolError, OSError):
            self.stream.try_send(Have(index))

    def _seeder_busy(self) -> bool:
        """Another session of this share has requests waiting to be served."""
        share = self.share
        return share is not None and any(
            s.queue for s in self.server.sessions_of(share) if s is not self
        )

    def advertise(self, indices: Iterable[int]) -> None:
        """Offer more pieces (super-seeding): one ``Have`` each, in one write."""
        with contextlib.suppress(ProtocolError, OSError):
            if self.stream.open:
                self.stream.send_many_nowait([Have(i) for i in indices])

    def _reported(self, share: Share, event: Have | Bitfield) -> None:
        """The client told us what it holds: super-seeding offers elsewhere-rare pieces."""
        if self.seed is None:
            return
        if isinstance(event, Have):
            pieces = [event.index]
        elif event.piece_count == share.layout.piece_count:
            pieces = event.pieces()
        else:
            return
        self.advertise(self.seed.reported(self, pieces, self.server.clock()))

    # -- receiving ----------------------------------------------------------------

    async def _receive_loop(self, share: Share) -> None:
        async for event in self.stream:
            match event:
                case Request():
                    if not await self._enqueue(share, event):
                        return
                case Cancel(index, begin, length):
                    with contextlib.suppress(ValueError):
                        self.queue.remove(Request(index, begin, length))
                case GetHashes(start, count):
                    if not await self._send_hashes(share, start, count):
                        return
                case ConnectionClosed() | Reject():
                    return
                case Have() | Bitfield():
                    self._reported(share, event)
                case Keepalive():
                    pass
                case _:
                    self.server.stats.incr("drop.unexpected_message")

    async def _enqueue(self, share: Share, req: Request) -> bool:
        layout = share.layout
        if not 0 <= req.index < layout.piece_count or req.index not in share.have:
            await self.stream.reject(Reason.PROTOCOL, f"piece {req.index} was not offered")
            return False
        if req.begin + req.length > layout.piece_length(req.index):
            await self.stream.reject(Reason.PROTOCOL, "request runs past the end of its piece")
            return False
        if len(self.queue) >= self.server.max_queued:
            await self.stream.reject(Reason.BUSY, "too many requests queued")
            return False
        self.queue.append(req)
        self.wake.set()
        if self.seed is not None:
            now = self.server.clock()
            self.advertise(self.seed.requested(self, req.index, req.length, now))
        return True

    async def _send_hashes(self, share: Share, start: int, count: int) -> bool:
        if await self._refuse_if_needed():
            return False
        if start + count > len(share.hashes):
            await self.stream.reject(Reason.PROTOCOL, "hash range past the last piece")
            return False
        for chunk in HashList.chunks(start, share.hashes[start : start + count]):
            await self.stream.send(chunk)
        return True

    # -- sending ------------------------------------------------------------------

    async def _next_request(self) -> Request:
        """The next queued request; sends Keepalives (and super-seeding offers) while idle."""
        clock = self.server.clock
        keepalive_at = clock() + KEEPALIVE_INTERVAL
        while not self.queue:
            self.wake.clear()
            idle_at = None if self.seed is None else self.seed.idle_deadline(self)
            wake_at = keepalive_at if idle_at is None else min(keepalive_at, idle_at)
            try:
                async with asyncio.timeout(max(0.0, wake_at - clock())):
                    await self.wake.wait()
            except TimeoutError:
                now = clock()
                if self.seed is not None:
                    self.advertise(self.seed.idle(self, now, busy=self._seeder_busy()))
                if now >= keepalive_at:
                    keepalive_at = now + KEEPALIVE_INTERVAL
                    await self.stream.send(Keepalive())
        return self.queue.popleft()

    async def _send_loop(self) -> None:
        """Serve queued requests in order, reading one block ahead of the socket."""
        try:
            await self._serve_requests()
        except (StoreError, ConnectionError, ProtocolError) as exc:
            log.debug("serving %s stopped: %s", self.stream.remote_address, exc)
            reason, text = Reason.SHUTDOWN, "cannot serve this file right now"
            if isinstance(exc, StoreError):
                self.server.stats.incr("drop.read_error")
            await self.stream.reject(reason, text)

    async def _serve_requests(self) -> None:
        ahead: tuple[Request, asyncio.Task[bytes | bytearray]] | None = None
        try:
            while True:
                req, reading = ahead if ahead is not None else await self._start_read()
                ahead = None
                data = await reading
                if self.queue:  # read the next block while this one is sent
                    ahead = await self._start_read()
                if await self._refuse_if_needed():
                    return
                await self._throttle(len(data))
                await self.stream.send(Piece(req.index, req.begin, data))
                self.server.uploaded[self.peer] += len(data)
                if self.share is not None:
                    self.share.uploaded += len(data)
                    self.share.served_to.add(self.peer)
                if self.seed is not None:
                    self.seed.served(self, self.server.clock())
        finally:
            if ahead is not None:
                ahead[1].cancel()
                await asyncio.wait([ahead[1]])  # raises only if *we* are cancelled
                if not ahead[1].cancelled():
                    ahead[1].exception()  # retrieved: a read that failed as we stopped

    async def _start_read(self) -> tuple[Request, asyncio.Task[bytes | bytearray]]:
        req = await self._next_request()
        # Owned by _serve_requests: always awaited, or cancelled and awaited in its finally.
        return req, asyncio.create_task(self._read_block(req))

    async def _read_block(self, req: Request) -> bytes | bytearray:
        assert self.share is not None
        if self.reader is None:
            self.reader = await BlockReader.open(self.share.path)
        offset = req.index * self.share.layout.piece_size + req.begin
        return await self.reader.read(offset, req.length)

    async def _throttle(self, nbytes: int) -> None:
        wait = self.server.bucket.consume(nbytes, self.server.clock())
        if wait > 0:
            await asyncio.sleep(wait)

    # -- teardown -----------------------------------------------------------------

    async def close(self) -> None:
        await self.stream.aclose()
        if self.reader is not None:
            await self.reader.close()
