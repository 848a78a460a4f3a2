"""Serve pieces of shared files to current members of the file's group, and nobody else.

The node fills a ``ShareRegistry``: one ``Share`` per ``(group_id, content_id)``
with the file's path, layout, piece hashes and the set of pieces we hold (all of
them for a finished file; a growing set while we are still downloading it).
``PeerServer`` accepts TCP connections, runs the server handshake, and then:

- refuses (``Reject`` with ``NOT_MEMBER`` or ``UNKNOWN_CONTENT`` and a one-line
  text) a client that is not a current member of the group it named, or that asks
  for a file we do not share;
- sends our ``Bitfield``, answers ``GetHashes`` with ``HashList`` chunks, and
  answers ``Request`` with ``Piece``, one block at a time from disk (in a worker
  thread), honouring ``Cancel`` for requests not yet served;
- re-checks membership before every block, so a member removed from the roster
  is cut off as soon as the node's view says so;
- sends ``Have`` whenever a partial share gains a verified piece (swarming).

Memory per connection is bounded: at most ``max_queued`` small requests wait,
and one block is read ahead of the one being sent. Bytes uploaded are counted
per peer key. Every task belongs to ``serve()``'s ``TaskGroup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from dhtshare.errors import NodeError, ProtocolError, StoreError
from dhtshare.files.content import FileLayout, merkle_root
from dhtshare.identity import Identity
from dhtshare.stats import Counters
from dhtshare.store.partial import BlockReader
from dhtshare.transfer.peer import (
    HANDSHAKE_TIMEOUT,
    READ_TIMEOUT,
    STREAM_LIMIT,
    PeerStream,
    accept_peer,
)
from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.wire import (
    MAX_BLOCK,
    Bitfield,
    Cancel,
    ConnectionClosed,
    GetHashes,
    HashList,
    Have,
    Keepalive,
    Piece,
    Reason,
    Reject,
    Request,
)

__all__ = ["KEEPALIVE_INTERVAL", "MemberCheck", "PeerServer", "Share", "ShareRegistry"]

log = logging.getLogger(__name__)

MemberCheck = Callable[[bytes, bytes], bool]
"""``is_member(group_id, peer_key)``: the node's current roster view."""

KEEPALIVE_INTERVAL = 20.0
"""An idle server session sends a Keepalive this often (well under READ_TIMEOUT)."""


class Share:
    """One file served in one group: its layout, piece hashes and the pieces we hold.

    ``have=None`` means every piece (a finished file). For a download in progress
    ``path`` is the ``.part`` file and ``add_piece`` grows ``have`` as pieces are
    verified; listeners (connected peers) hear about each new piece.
    """

    def __init__(
        self,
        group_id: bytes,
        content_id: bytes,
        path: Path,
        layout: FileLayout,
        hashes: Sequence[bytes],
        have: Iterable[int] | None = None,
    ) -> None:
        if len(hashes) != layout.piece_count:
            raise ValueError(f"{len(hashes)} hashes for {layout.piece_count} pieces")
        if merkle_root(hashes) != content_id:
            raise ValueError("piece hashes do not match the content id")
        self.group_id = group_id
        self.content_id = content_id
        self.path = Path(path)
        self.layout = layout
        self.hashes = tuple(hashes)
        count = layout.piece_count
        self.have: set[int] = set(range(count)) if have is None else set(have)
        if any(not 0 <= i < count for i in self.have):
            raise ValueError("have holds a piece index out of range")
        self._listeners: list[Callable[[int], None]] = []

    @property
    def complete(self) -> bool:
        return len(self.have) == self.layout.piece_count

    def bitfield(self) -> Bitfield:
        """The pieces we hold, as the wire's Bitfield."""
        return Bitfield.from_pieces(self.layout.piece_count, self.have)

    def add_piece(self, index: int) -> None:
        """Piece ``index`` is verified and on disk: serve it and tell connected peers."""
        if index in self.have:
            return
        self.layout.piece_length(index)  # IndexError if out of range
        self.have.add(index)
        for listener in list(self._listeners):
            listener(index)

    def listen(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(index)`` for every new piece; returns the unsubscribe function."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)


class ShareRegistry:
    """The shares a node serves, by ``(group_id, content_id)``, and its membership check."""

    def __init__(self, is_member: MemberCheck) -> None:
        self.is_member = is_member
        self._shares: dict[tuple[bytes, bytes], Share] = {}

    def add(self, share: Share) -> Share:
        """Serve ``share`` (replacing any share of the same file in the same group)."""
        self._shares[share.group_id, share.content_id] = share
        return share

    def get(self, group_id: bytes, content_id: bytes) -> Share | None:
        return self._shares.get((group_id, content_id))

    def remove(self, group_id: bytes, content_id: bytes) -> Share | None:
        """Stop serving; connected peers are refused at their next request."""
        return self._shares.pop((group_id, content_id), None)

    def __iter__(self) -> Iterator[Share]:
        return iter(list(self._shares.values()))

    def __len__(self) -> int:
        return len(self._shares)


class PeerServer:
    """Accepts peer connections and serves the registry's shares to group members.

    ``await start()`` binds (``NodeError`` if the port is taken) and returns the
    address; ``serve()`` runs until cancelled and owns every connection's task.
    ``upload_rate`` (bytes/s, ``None``: unlimited) caps the sum of all uploads.
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
        max_queued: int = 128,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        idle_timeout: float = READ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.shares = shares
        self.max_connections = max_connections
        self.max_queued = max_queued
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

    def set_upload_rate(self, rate: float | None) -> None:
        """Change the upload limit (bytes/s; ``None`` or 0: unlimited)."""
        burst = max(float(MAX_BLOCK), (rate or 0) / 4) if rate else None
        self.bucket.set_rate(rate, burst, self.clock())

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

    async def start(self) -> tuple[str, int]:
        """Bind the listening socket; ``NodeError`` if the address is unusable."""
        if self._server is None:
            try:
                self._server = await asyncio.start_server(
                    self._on_accept, self._host, self._port, limit=STREAM_LIMIT,
                    start_serving=False,
                )  # fmt: skip
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
                await server.serve_forever()
            finally:
                self._tg = None
                server.close()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tg is None or len(self._sessions) >= self.max_connections:
            self.stats.incr("refuse.busy")
            writer.close()
            return
        self._tg.create_task(self._run_session(reader, writer))

    async def _run_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One connection, start to end; nothing it does can take the server down."""
        try:
            stream = await accept_peer(
                self.identity,
                reader,
                writer,
                handshake_timeout=self.handshake_timeout,
                read_timeout=self.idle_timeout,
            )
        except (ProtocolError, OSError) as exc:
            self.stats.incr("drop.handshake")
            log.debug("handshake failed: %s", exc)
            return
        session = _Session(self, stream)
        self._sessions.add(session)
        try:
            await session.run()
        except (ProtocolError, OSError, StoreError) as exc:
            self.stats.incr("drop.session")
            log.debug("session with %s ended: %s", stream.remote_address, exc)
        finally:
            self._sessions.discard(session)
            await session.close()


class _Session:
    """Serving one authenticated client: a receive loop and a send loop."""

    def __init__(self, server: PeerServer, stream: PeerStream) -> None:
        self.server = server
        self.stream = stream
        self.peer = stream.peer_key
        assert stream.peer is not None
        self.group_id = stream.peer.group_id
        self.content_id = stream.peer.content_id
        self.share: Share | None = None
        self.queue: deque[Request] = deque()
        self.wake = asyncio.Event()
        self.reader: BlockReader | None = None

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
        await self.stream.send(share.bitfield())
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

    def _on_have(self, index: int) -> None:
        with contextlib.suppress(ProtocolError, OSError):
            self.stream.try_send(Have(index))

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
                case Keepalive() | Have() | Bitfield():
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
        """The next queued request; sends Keepalives while idle."""
        while not self.queue:
            self.wake.clear()
            try:
                async with asyncio.timeout(KEEPALIVE_INTERVAL):
                    await self.wake.wait()
            except TimeoutError:
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
        ahead: tuple[Request, asyncio.Task[bytes]] | None = None
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
        finally:
            if ahead is not None:
                ahead[1].cancel()
                with contextlib.suppress(BaseException):
                    await ahead[1]

    async def _start_read(self) -> tuple[Request, asyncio.Task[bytes]]:
        req = await self._next_request()
        # Owned by _serve_requests: always awaited, or cancelled and awaited in its finally.
        return req, asyncio.create_task(self._read_block(req))

    async def _read_block(self, req: Request) -> bytes:
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
