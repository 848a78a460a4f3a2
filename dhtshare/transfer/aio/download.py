"""Download one file from many providers at once, verifying every piece.

``Download.run()`` does, in order (docs/transfer.md has the full story):

1. refuse at once if the final name exists (``StoreError``); create ``<name>.part``
   (``O_EXCL``: a file this download did not create is never opened), or reopen
   the one it created earlier and load the resume state (a new ``.part`` discards it);
2. poll the node's ``providers()`` callable and connect to up to ``max_peers`` of
   them at once (re-polled while pieces are missing); each connection is a client
   handshake, and the server's key must be a current group member;
3. fetch the piece-hash list from the first peer that offers it and check it
   against the content id (the hash-tree root); a list that does not match bans
   that peer, and the next peer is asked;
4. let the ``PiecePicker`` choose blocks (rarest first, pipelined by measured
   throughput, endgame with cancels, expired requests re-assigned);
5. hash every completed piece off the event loop; a good piece is written at
   its offset, marked in the resume state, served to others and announced
   (``Have``) to providers lacking some piece (``on_have``); a
   bad piece is fetched again and its sender is banned for this file;
6. save the resume state every ``save_interval`` seconds and when stopped;
7. finalize (rename to the final name, never over an existing file) when
   every piece is verified.

It fails with ``FileShareError`` when no provider serves the file within
``provider_timeout`` seconds (or every provider refused us twice, ``retry_after``
apart, with their reason: a provider's cached roster may not list a member accepted
a moment ago until its next read),
and with ``StoreError`` on disk trouble (the ``.part`` file is kept). Every task
belongs to the ``TaskGroup`` inside ``run()``; cancelling ``run()`` pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dhtshare.atomic import read_hashes, write_hashes
from dhtshare.errors import (
    DhtshareError,
    FileShareError,
    ProtocolError,
    RemoteProtocolError,
    StoreError,
)
from dhtshare.files.content import (
    MAX_FILE_PIECES,
    MAX_PIECE_SIZE,
    FileLayout,
    merkle_root,
    verify_hash_list,
    verify_piece,
)
from dhtshare.identity import Identity, format_id
from dhtshare.store.partial import PartialFile, owns, read_owner, safe_name
from dhtshare.store.resume import ResumeState, load_or_new
from dhtshare.transfer.aio.peer import READ_TIMEOUT, PeerStream, open_peer
from dhtshare.transfer.aio.serve import KEEPALIVE_INTERVAL
from dhtshare.transfer.picker import Block, PickerConfig, PiecePicker
from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.transfer.share import MemberCheck, Share, ShareRegistry
from dhtshare.transfer.status import Complete, Downloading, DownloadStatus, Failed, Paused
from dhtshare.wire import (
    MAX_BLOCK,
    MAX_HASHES,
    Bitfield,
    Cancel,
    ConnectionClosed,
    Event,
    GetHashes,
    HashList,
    Have,
    Keepalive,
    Piece,
    Reason,
    Reject,
    Request,
)

__all__ = [
    "Download",
    "DownloadOptions",
    "FileInfo",
    "ProviderAddr",
    "ProviderSource",
    "check_info",
]

log = logging.getLogger(__name__)

STORE_QUEUE_BYTES = 2 * 1024 * 1024
"""Completed pieces waiting to be hashed and written, at most (at least two pieces);
the batch being written holds as much again at most (one piece if pieces are bigger).

Short on purpose: a piece is hashed and written while its bytes are still in the
CPU's cache, and a slow disk stops the reading of sockets early (backpressure).
In an A/B run (six runs each), four seeders cost the downloader 1.10 s of CPU for
256 MiB with 16 MiB here, 0.93 s with 2 MiB (docs/performance.md, round 3)."""
STORE_BATCH = 8
"""Most completed pieces hashed and written in one worker-thread call (and no more
than STORE_QUEUE_BYTES of them)."""
RATE_WINDOW = 5.0


@dataclass(frozen=True, slots=True)
class ProviderAddr:
    """A peer that holds (some of) the file, and where to reach it."""

    peer_key: bytes
    host: str
    port: int


ProviderSource = Callable[[], Awaitable[list[ProviderAddr]]]
"""The node's provider lookup; called again every ``repoll_interval`` while pieces are missing."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the file entry says about the file to download."""

    group_id: bytes
    content_id: bytes
    name: str
    size: int
    piece_size: int

    @property
    def layout(self) -> FileLayout:
        return FileLayout(self.size, self.piece_size)


def check_info(info: FileInfo) -> None:
    """``FileShareError`` unless the layout is one a download can afford: a piece size
    within ``MAX_PIECE_SIZE`` and at most ``MAX_FILE_PIECES`` pieces (the picker, the
    resume state and the hash list are sized by the piece count)."""
    size, piece = info.size, info.piece_size
    if not (size >= 0 and 0 < piece <= MAX_PIECE_SIZE and -(-size // piece) <= MAX_FILE_PIECES):
        raise FileShareError(
            f"{info.name!r}: {size} bytes in pieces of {piece} is not a layout we accept",
            "the file entry is malformed; ask its sharer to share it again",
        )


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    """Tuning; the defaults suit the internet, tests shorten the timeouts."""

    max_peers: int = 12
    rate_limit: float | None = None  # bytes/s for this download; None: unlimited
    provider_timeout: float = 60.0  # fail if nobody serves missing pieces this long
    repoll_interval: float = 5.0
    retry_after: float = 5.0  # before reconnecting to a provider whose connection ended
    save_interval: float = 2.0
    connect_timeout: float = 10.0
    read_timeout: float = READ_TIMEOUT
    verify_on_resume: bool = False  # re-hash pieces the resume state calls verified
    picker: PickerConfig = field(default_factory=lambda: PickerConfig(block_size=MAX_BLOCK))


@dataclass(slots=True)
class _Assembly:
    """The blocks of one piece received so far, and who sent each."""

    data: bytes | bytearray | memoryview
    senders: dict[int, bytes] = field(default_factory=dict)  # begin -> peer


@dataclass(slots=True)
class _Verify:
    index: int
    data: bytes | bytearray | memoryview
    senders: dict[int, bytes]


class Download:
    """One file: providers -> peers -> picker -> verified pieces on disk.

    Build it, then ``await run()`` (returns the final path). ``status()`` is a
    snapshot at any time. ``sources`` counts accepted bytes per peer key and
    ``bytes_received`` every block byte that arrived (duplicates included).
    """

    def __init__(
        self,
        identity: Identity,
        info: FileInfo,
        out_dir: Path,
        *,
        providers: ProviderSource,
        is_member: MemberCheck,
        shares: ShareRegistry | None = None,
        state_path: Path | None = None,
        on_first_piece: Callable[[bytes], None] | None = None,
        on_have: Callable[[bytes, int], None] | None = None,
        options: DownloadOptions | None = None,
        bucket: TokenBucket | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_info(info)  # before anything is sized by it
        self.identity = identity
        self.info = info
        self.layout = info.layout
        self.out_dir = Path(out_dir)
        self.providers = providers
        self.is_member = is_member
        self.shares = shares
        self.on_first_piece = on_first_piece
        self.on_have = on_have
        self.options = options or DownloadOptions()
        self.clock = clock
        self.picker = PiecePicker(
            self.layout.piece_lengths(), rng or random.Random(), self.options.picker
        )
        # A shared ``bucket`` is one limit over several downloads (the node's); else our own.
        self.bucket = bucket or TokenBucket(None, now=clock())
        if bucket is None:
            self.set_rate_limit(self.options.rate_limit)
        self.final_path = self.out_dir / safe_name(info.name)
        self._state_path = state_path
        self.hashes: tuple[bytes, ...] | None = None
        self.share: Share | None = None
        self.sources: Counter[bytes] = Counter()
        self.bytes_received = 0
        self.banned: set[bytes] = set()
        self.refused: dict[bytes, str] = {}  # provider -> its reason, once it refused twice
        self._refused_once: dict[bytes, str] = {}  # refused once: tried again after retry_after
        self._partial: PartialFile | None = None
        self._state = ResumeState(info.content_id, self.layout.piece_count)
        self._sessions: dict[bytes, _Client] = {}
        self._ended_at: dict[bytes, float] = {}
        self._assembly: dict[int, _Assembly] = {}
        self._suspects: dict[int, _Verify] = {}
        self._store: asyncio.Queue[_Verify] = asyncio.Queue(
            max(2, STORE_QUEUE_BYTES // max(1, info.piece_size))
        )
        # A batch leaves the queue, which then fills again: at most STORE_QUEUE_BYTES in
        # the batch (one piece if pieces are bigger) plus a full queue.
        self._batch_limit = max(1, min(STORE_BATCH, STORE_QUEUE_BYTES // max(1, info.piece_size)))
        self._hash_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._fatal: DhtshareError | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._rate: deque[tuple[float, int]] = deque()
        self._final: DownloadStatus | None = None
        self._started = clock()
        self._progress_at = clock()
        self._polled_at = float("-inf")
        self._polls = 0
        self._known: dict[bytes, ProviderAddr] = {}
        self.peer_crashes = 0  # peer sessions ended by an unexpected exception
        self._connecting_since: dict[bytes, float] = {}  # first try, until it gets ready

    # -- public -------------------------------------------------------------------

    @property
    def part_path(self) -> Path:
        return self.final_path.with_name(self.final_path.name + ".part")

    @property
    def state_path(self) -> Path:
        return self._state_path or self.final_path.with_name(self.final_path.name + ".resume")

    @property
    def owner_path(self) -> Path:
        """Which ``.part`` file this download created (``store.partial``'s owner record)."""
        return self.state_path.with_name(self.state_path.name + ".owner")

    @property
    def hashes_path(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".hashes")

    @property
    def bytes_done(self) -> int:
        return sum(self.layout.piece_length(i) for i in self._state.verified)

    @property
    def peers(self) -> int:
        """Connected peers that finished the handshake."""
        return sum(1 for s in self._sessions.values() if s.ready)

    def set_rate_limit(self, rate: float | None) -> None:
        """Limit this download to ``rate`` bytes/s (``None`` or 0: unlimited)."""
        burst = max(float(MAX_BLOCK), rate / 4) if rate else None
        self.bucket.set_rate(rate, burst, self.clock())

    def rate(self) -> float:
        """Accepted bytes per second over the last few seconds."""
        now = self.clock()
        while self._rate and self._rate[0][0] < now - RATE_WINDOW:
            self._rate.popleft()
        span = min(RATE_WINDOW, max(1e-3, now - self._started))
        return sum(n for _, n in self._rate) / span

    def status(self) -> DownloadStatus:
        """A snapshot: ``Downloading`` while running, else how it ended."""
        if self._final is not None:
            return self._final
        return Downloading(*self._status_fields(), rate=self.rate(), peers=self.peers)

    def _status_fields(self, path: Path | None = None) -> tuple[str, int, int, str, dict[str, int]]:
        """``name, size, bytes_done, path, sources``: the fields every status shares."""
        sources = {format_id(k): v for k, v in self.sources.items()}
        where = str(path or self.part_path)
        return self.final_path.name, self.info.size, self.bytes_done, where, sources

    async def run(self) -> Path:
        """Download until complete and return the final path (see the module doc)."""
        self._started = self._progress_at = self.clock()
        try:
            path = await self._run()
        except asyncio.CancelledError:
            self._final = Paused(*self._status_fields())
            raise
        except DhtshareError as exc:
            self._final = Failed(*self._status_fields(), error=exc.message, hint=exc.hint)
            raise
        except Exception as exc:  # never left "downloading" with nobody working on it
            text = f"download stopped by an internal error: {type(exc).__name__}"
            self._final = Failed(*self._status_fields(), error=text, hint="see the node's log")
            raise
        seconds = self.clock() - self._started
        self._final = Complete(*self._status_fields(path), seconds=seconds)
        return path

    # -- the run ------------------------------------------------------------------

    async def _run(self) -> Path:
        if await asyncio.to_thread(self.final_path.exists):
            raise StoreError(
                f"{self.final_path} already exists", "move it away or choose another directory"
            )
        await self._open()
        finished = False
        try:
            if not self._state.complete or self.hashes is None:
                await self._transfer()
            path = await self._finish()
            finished = True
            return path
        finally:
            if not finished:
                await self._close_quietly()

    async def _open(self) -> None:
        self._partial = await PartialFile.open(
            self.out_dir, self.info.name, self.info.size, owner=self.owner_path
        )
        if not self._partial.created:  # our own .part: resume it
            count = self.layout.piece_count
            self._state = await asyncio.to_thread(
                load_or_new, self.state_path, self.info.content_id, count
            )
            hashes = await asyncio.to_thread(read_hashes, self.hashes_path, count)
            if hashes is not None and verify_hash_list(hashes, self.info.content_id, count):
                await self._set_hashes(hashes, save=False)
        if self.layout.piece_count == 0:
            await self._set_hashes((), save=False)

    async def _transfer(self) -> None:
        error: DhtshareError | None = None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            helpers = [tg.create_task(self._store_loop()), tg.create_task(self._timer_loop())]
            try:
                error = await self._main_loop()
            finally:
                self._tg = None
                for task in helpers + [s.task for s in self._sessions.values() if s.task]:
                    task.cancel()
        if error is not None:
            raise error

    async def _main_loop(self) -> DhtshareError | None:
        """Keep peers connected until every piece is verified; return what stopped us."""
        while not (self._state.complete and self.hashes is not None):
            if self._fatal is not None:
                return self._fatal
            await self._connect_providers()
            stalled = self._stalled()
            if stalled is not None:
                return stalled
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._repoll_gap()):
                    await self._wake.wait()
        return None

    def note_refusal(self, peer: bytes, why: str) -> None:
        """A provider refused us: the first time it is tried again after ``retry_after``
        (its roster may be a moment old), the second time it is refused for this download."""
        if self._refused_once.pop(peer, None) is not None:
            self.refused[peer] = why
        else:
            self._refused_once[peer] = why

    def _stalled(self) -> DhtshareError | None:
        """The error to fail with if nobody can serve us, or ``None`` while there is hope."""
        now = self.clock()
        if any(s.ready and s.useful(now) for s in self._sessions.values()):
            self._progress_at = now  # a connected peer with pieces we lack, delivering
            return None
        if any(s.useful(now) for s in self._sessions.values()):
            return None  # still connecting: hope, but the stall clock keeps running
        candidates = [k for k in self._known if k not in self.banned]
        if candidates and not self._sessions and all(k in self.refused for k in candidates):
            text = self.refused[candidates[0]]
            return FileShareError(
                f"every provider of {self.final_path.name} refused us: {text}",
                "ask the group's owner to accept you, then download again",
            )
        if now - self._progress_at < self.options.provider_timeout:
            return None
        dropped = len(self.banned)
        why = f"; {dropped} dropped for bad data or protocol errors" if dropped else ""
        return FileShareError(
            f"no providers for {self.final_path.name} (nobody served it for "
            f"{self.options.provider_timeout:g} s{why})",
            "try again later, when a member who holds the file is online",
        )

    async def _connect_providers(self) -> None:
        now = self.clock()
        if now - self._polled_at >= self._repoll_gap() or not self._known:
            self._polled_at = now
            self._polls += 1
            self._known = await self._poll()
        for key, addr in self._known.items():
            if len(self._sessions) >= self.options.max_peers:
                return
            if key in self._sessions or key in self.banned or key in self.refused:
                continue
            if now - self._ended_at.get(key, float("-inf")) < self.options.retry_after:
                continue
            self._spawn(addr)

    def _repoll_gap(self) -> float:
        """Seconds between provider polls: 0.5, 1, 2, ... up to ``repoll_interval``.

        Other downloaders announce themselves after their first piece; polling
        soon after we start finds them while there is still much to swap.
        """
        return min(self.options.repoll_interval, 0.25 * (1 << min(self._polls, 8)))

    async def _poll(self) -> dict[bytes, ProviderAddr]:
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                found = await self.providers()
        except (DhtshareError, OSError, TimeoutError) as exc:
            log.info("provider lookup failed: %s", exc)
            return self._known
        me = self.identity.public
        return {a.peer_key: a for a in found if a.peer_key != me}

    def _spawn(self, addr: ProviderAddr) -> None:
        assert self._tg is not None
        client = _Client(self, addr)
        self._connecting_since.setdefault(addr.peer_key, self.clock())
        self._sessions[addr.peer_key] = client
        client.task = self._tg.create_task(client.run())

    def _session_ended(self, client: _Client) -> None:
        key = client.addr.peer_key
        if self._sessions.get(key) is client:
            del self._sessions[key]
        self._ended_at[key] = self.clock()
        self.picker.remove_peer(key)
        self._top_up_all()
        self._wake.set()

    # -- hashes -------------------------------------------------------------------

    async def ensure_hashes(self, client: _Client) -> None:
        """Have the verified piece-hash list, fetching it through ``client`` if needed."""
        if self.hashes is not None:
            return
        async with self._hash_lock:
            if self._hashes_known():  # another session fetched them while we waited
                return
            count = self.layout.piece_count
            hashes = await client.fetch_hashes(count)
            if not verify_hash_list(hashes, self.info.content_id, count):
                self.ban(client.addr.peer_key, "piece hashes do not match the content id")
                raise ProtocolError("piece hashes do not match the content id")
            await self._set_hashes(tuple(hashes), save=True)

    def _hashes_known(self) -> bool:
        return self.hashes is not None

    async def _set_hashes(self, hashes: tuple[bytes, ...], *, save: bool) -> None:
        if save:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_hashes, self.hashes_path, hashes)
        if self.options.verify_on_resume and self._state.verified:
            await self._reverify(hashes)
        self.hashes = hashes
        for index in sorted(self._state.verified):
            self.picker.mark_have(index)
        if self.shares is not None and self._partial is not None:
            self.share = self.shares.add(
                Share(
                    self.info.group_id,
                    self.info.content_id,
                    self._partial.part_path,
                    self.layout,
                    hashes,
                    self._state.verified,
                )
            )

    async def _reverify(self, hashes: tuple[bytes, ...]) -> None:
        assert self._partial is not None
        for index in sorted(self._state.verified):
            offset, length = self.layout.piece_offset(index), self.layout.piece_length(index)
            data = await self._partial.read(offset, length)
            if not await asyncio.to_thread(verify_piece, data, hashes[index]):
                self._state.verified.discard(index)

    # -- blocks and pieces ----------------------------------------------------------

    async def on_piece(self, client: _Client, msg: Piece) -> None:
        """A block arrived: account for it, assemble its piece, queue a full piece."""
        key, size = client.addr.peer_key, len(msg.data)
        now = self.clock()
        self.bytes_received += size
        client.received += size
        result = self.picker.block_received(key, Block(msg.index, msg.begin, size), now)
        self._send_cancels(result.cancels)
        if result.accepted:
            self.sources[key] += size
            self._rate.append((now, size))
            piece = self._assemble(key, msg)
            if result.piece_complete:
                del self._assembly[msg.index]
                await self._store.put(_Verify(msg.index, piece.data, piece.senders))
        wait = self.bucket.consume(size, now)
        if wait > 0:
            await asyncio.sleep(wait)

    def _assemble(self, key: bytes, msg: Piece) -> _Assembly:
        length = self.layout.piece_length(msg.index)
        piece = self._assembly.get(msg.index)
        if piece is None:
            whole = msg.begin == 0 and len(msg.data) == length
            piece = _Assembly(msg.data if whole else bytearray(length))
            self._assembly[msg.index] = piece
        if isinstance(piece.data, bytearray):
            piece.data[msg.begin : msg.begin + len(msg.data)] = msg.data
        piece.senders[msg.begin] = key
        return piece

    async def _store_loop(self) -> None:
        """Hash completed pieces off the loop and write the good ones, a batch at a time.

        Whatever queued up while the worker thread was busy goes in the next batch:
        one thread hop per batch instead of one per piece (a hop costs about 0.1-0.2
        ms here, as much as writing a 256 KiB piece to the page cache).
        """
        while True:
            batch = [await self._store.get()]
            while len(batch) < self._batch_limit and not self._store.empty():
                batch.append(self._store.get_nowait())
            assert self.hashes is not None and self._partial is not None
            jobs = [
                (
                    self.layout.piece_offset(item.index),
                    item.data,
                    functools.partial(verify_piece, expected=self.hashes[item.index]),
                )
                for item in batch
            ]
            try:
                results = await self._partial.write_pieces_if(jobs)
            except StoreError as exc:
                self._fatal = exc
                self._wake.set()
                return
            for item, good in zip(batch, results, strict=True):
                if good:
                    self._piece_verified(item)
                else:
                    self._piece_failed(item)

    def _piece_verified(self, item: _Verify) -> None:
        self._send_cancels(self.picker.piece_verified(item.index))
        first = not self._state.verified
        self._state.mark(item.index)
        self._progress_at = self.clock()
        self._blame(item)
        if self.share is not None:
            self.share.add_piece(item.index)
        self._tell_servers(item.index)
        self._notify(first)
        self._top_up_all(idle_only=True)  # a verified piece may lift the partial-piece cap
        if self._state.complete:
            self._wake.set()

    def _tell_servers(self, index: int) -> None:
        """``Have`` to each provider that lacks some piece: a super-seeding seeder
        (which looks like such a peer) uses it to offer pieces the swarm lacks."""
        for client in self._sessions.values():
            seed = self.picker.is_seed(client.addr.peer_key)
            if client.ready and client.stream is not None and not seed:
                client.stream.try_send(Have(index))

    def _notify(self, first: bool) -> None:
        try:
            if first and self.on_first_piece is not None:
                self.on_first_piece(self.info.content_id)
            if self.on_have is not None:
                self.on_have(self.info.content_id, len(self._state.verified))
        except Exception:
            log.exception("download progress callback failed")

    def _piece_failed(self, item: _Verify) -> None:
        """A piece failed its hash: fetch it again; ban its sender if there was one."""
        senders = set(item.senders.values())
        self.picker.piece_failed(item.index)
        if len(senders) == 1:
            self.ban(senders.pop(), f"piece {item.index} failed its hash check")
        else:  # several senders: blame the ones whose blocks differ from the good copy
            self._suspects[item.index] = _Verify(item.index, bytes(item.data), item.senders)
        self._top_up_all()

    def _blame(self, good: _Verify) -> None:
        bad = self._suspects.pop(good.index, None)
        if bad is None:
            return
        block = self.picker.config.block_size
        view, ref = memoryview(bad.data), memoryview(good.data)
        for begin, peer in bad.senders.items():
            if view[begin : begin + block] != ref[begin : begin + block]:
                self.ban(peer, f"a block of piece {good.index} was corrupt")

    def ban(self, peer: bytes, why: str) -> None:
        """Drop ``peer`` and never use it again for this file."""
        log.info("banning %s: %s", format_id(peer)[:12], why)
        self.banned.add(peer)
        self.picker.ban(peer)
        client = self._sessions.get(peer)
        if client is not None and client.stream is not None:
            client.stream.abort(Reason.BAD_DATA, why)

    def note_arriving(self) -> None:
        """Tell the picker how much each peer's data already waits in our buffers."""
        for key, client in self._sessions.items():
            if client.stream is not None:
                self.picker.note_arriving(key, client.stream.buffered_in())

    def _send_cancels(self, cancels: Iterable[tuple[bytes, Block]]) -> None:
        for peer, b in cancels:
            client = self._sessions.get(peer)
            if client is not None and client.stream is not None:
                client.stream.try_send(Cancel(b.index, b.begin, b.length))

    def _top_up_all(self, *, idle_only: bool = False) -> None:
        if self.picker.in_endgame:
            self.note_arriving()  # once for all, not once per client
        for client in list(self._sessions.values()):
            if not idle_only or client.idle:
                client.top_up(note_arriving=False)

    # -- timers, saving, finishing --------------------------------------------------

    async def _timer_loop(self) -> None:
        """Expire overdue requests, save progress, keep idle connections alive."""
        saved_at = keepalive_at = self.clock()
        saved = len(self._state.verified)
        while True:
            now = self.clock()
            deadline = self.picker.next_deadline()
            nap = 0.5 if deadline is None else min(0.5, max(0.01, deadline - now))
            await asyncio.sleep(nap)
            now = self.clock()
            expired = self.picker.expire(now)
            if expired.timed_out:
                self._send_cancels(expired.timed_out)
                self._top_up_all()
            if now - saved_at >= self.options.save_interval and len(self._state.verified) != saved:
                saved, saved_at = len(self._state.verified), now
                await self._checkpoint()
            if now - keepalive_at >= KEEPALIVE_INTERVAL:
                keepalive_at = now
                for client in list(self._sessions.values()):
                    if client.stream is not None:
                        client.stream.try_send(Keepalive())

    async def _checkpoint(self) -> None:
        """fsync the pieces, then save the state that trusts them (atomically)."""
        if self._partial is None or self._partial.closed:
            return
        snapshot = ResumeState(
            self.info.content_id, self.layout.piece_count, set(self._state.verified)
        )
        await self._partial.sync()
        await asyncio.to_thread(snapshot.save, self.state_path)

    async def _close_quietly(self) -> None:
        """Paused or failed: save what we have, keep the ``.part`` file."""
        try:
            await self._checkpoint()
        except (StoreError, OSError) as exc:
            log.warning("could not save the resume state: %s", exc)
        if self._partial is not None:
            await self._partial.close()

    async def discard(self) -> None:
        """Delete what an ended (cancelled, paused or failed) download left: its
        ``.part`` file, only if the owner record says this download created it (a
        file of the same name that is not ours is left alone), and its resume state,
        piece hashes and owner record. Call it once ``run()`` has returned."""

        def remove() -> None:
            if owns(read_owner(self.owner_path), self.part_path):
                self.part_path.unlink(missing_ok=True)
            for leftover in (self.state_path, self.hashes_path, self.owner_path):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def _finish(self) -> Path:
        assert self._partial is not None and self.hashes is not None
        if merkle_root(self.hashes) != self.info.content_id or not self._state.complete:
            raise FileShareError("download incomplete", "resume the download")
        path = await self._partial.finalize()
        for leftover in (self.state_path, self.hashes_path):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(leftover.unlink, missing_ok=True)
        if self.share is not None:
            self.share.path = path
        return path


def refill_due(drained: int, asked: int) -> bool:
    """Whether a peer's pipeline (``asked`` requests in flight at the last refill,
    ``drained`` of them since received, cancelled or expired) has drained enough to
    send it a new batch of Requests.

    A quarter of it, so a deep pipeline never runs low; a shallow one (a peer's share
    of the picker's ``total_depth``) waits for half of it, or 8 blocks, so that each
    batch, and the wake-up it costs the peer, still carries several requests.
    """
    return drained >= max(asked / 4, min(asked / 2, 8))


class _Client:
    """One provider connection: handshake, bitfield, hashes, then request and receive."""

    def __init__(self, download: Download, addr: ProviderAddr) -> None:
        self.dl = download
        self.addr = addr
        self.stream: PeerStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.ready = False
        self.received = 0
        self.error = ""
        self._early_have: set[int] = set()
        self._asked = 0  # requests in flight right after the last top-up

    def useful(self, now: float) -> bool:
        """Still connecting (for at most ``provider_timeout`` since we first tried this
        peer without it getting ready), or connected with a piece we lack and not
        snubbed (it delivers what we ask). A peer that claims pieces and never sends
        them, or never finishes its greeting, stops counting; so does the download."""
        key = self.addr.peer_key
        if not self.ready:
            since = self.dl._connecting_since.get(key, now)
            return now - since < self.dl.options.provider_timeout
        picker = self.dl.picker
        return picker.interesting(key) and not picker.is_snubbed(key)

    async def run(self) -> None:
        """Serve the download until this connection ends; whatever ends it ends it alone.

        A protocol, network or timeout error is this peer's; any other exception (input
        we failed to check, or a bug) is logged and counted in ``Download.peer_crashes``,
        and never reaches the download's ``TaskGroup``, which would cancel every peer.
        """
        try:
            await self._run()
        except (ProtocolError, OSError, TimeoutError) as exc:
            self.error = str(exc) or type(exc).__name__
            log.debug("provider %s:%d: %s", self.addr.host, self.addr.port, self.error)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.dl.peer_crashes += 1
            log.exception("provider %s:%d crashed its session", self.addr.host, self.addr.port)
        finally:
            self.dl._session_ended(self)
            if self.stream is not None:
                await self.stream.aclose()

    async def _run(self) -> None:
        dl, opts = self.dl, self.dl.options
        info = dl.info
        self.stream = await open_peer(
            dl.identity, self.addr.host, self.addr.port, info.group_id, info.content_id,
            handshake_timeout=opts.connect_timeout, read_timeout=opts.read_timeout,
        )  # fmt: skip
        key = self.stream.peer_key
        if key != self.addr.peer_key or not dl.is_member(info.group_id, key):
            self.stream.abort(Reason.NOT_MEMBER, "you are not a member of this group")
            raise ProtocolError("provider is not a current member of the group")
        have = await self._first_bitfield()
        if have is None:
            return
        await dl.ensure_hashes(self)
        have |= self._early_have
        bits = Bitfield.from_pieces(dl.layout.piece_count, have).bits
        if not dl.picker.add_peer(key, bits):
            return
        if len(have) < dl.layout.piece_count and dl._state.verified:
            # it may be super-seeding: tell it what we hold (then Have per new piece)
            mine = Bitfield.from_pieces(dl.layout.piece_count, dl._state.verified)
            self.stream.send_nowait(mine)
        self.ready = True
        dl._connecting_since.pop(key, None)
        dl._wake.set()
        self.top_up()
        async for event in self.stream:
            if not await self._on_event(event):
                return

    async def _first_bitfield(self) -> set[int] | None:
        assert self.stream is not None
        async for event in self.stream:
            if isinstance(event, Bitfield):
                if event.piece_count != self.dl.layout.piece_count:
                    raise self._violation("bitfield for a different piece count")
                return set(event.pieces())
            if not await self._on_event(event):
                return None
        return None

    async def fetch_hashes(self, count: int) -> list[bytes]:
        """Ask this peer for all ``count`` piece hashes and collect its answers."""
        assert self.stream is not None
        for start in range(0, count, MAX_HASHES):
            self.stream.send_nowait(GetHashes(start, min(MAX_HASHES, count - start)))
        got: list[bytes] = []
        async for event in self.stream:
            if isinstance(event, HashList):
                if event.start != len(got) or len(got) + len(event.hashes) > count:
                    raise self._violation("hash list out of order or too long")
                got.extend(event.hashes)
                if len(got) == count:
                    return got
            elif not await self._on_event(event):
                break
        raise ProtocolError("connection ended before the piece hashes arrived")

    async def _on_event(self, event: Event) -> bool:
        """Handle one event; False when the connection is over."""
        match event:
            case Piece(index, begin, data):
                if not self.ready:
                    raise self._violation("piece before it was requested")
                if not self.dl.picker.is_block(Block(index, begin, len(data))):
                    raise self._violation(f"piece {index} at {begin}+{len(data)} is no block")
                await self.dl.on_piece(self, event)
                drained = self._asked - self.dl.picker.in_flight(self.addr.peer_key)
                if refill_due(drained, self._asked):  # received, cancelled or expired
                    self.top_up()
            case Have(index):
                self._on_have(index)
            case Reject(reason, text):
                self._on_reject(reason, text)
                return False
            case ConnectionClosed():
                return False
            case _:
                pass  # Keepalive, and messages a server has no reason to send
        return True

    def _violation(self, text: str) -> RemoteProtocolError:
        """The error for a message that breaks the protocol: this peer is banned for the
        file (its stream aborted with a Reject), and the error ends its session only."""
        self.dl.ban(self.addr.peer_key, text)
        return RemoteProtocolError(text, Reason.PROTOCOL)

    def _on_have(self, index: int) -> None:
        if not 0 <= index < self.dl.layout.piece_count:
            raise self._violation(f"Have for piece {index} out of range")
        if self.ready:
            self.dl.picker.peer_has(self.addr.peer_key, index)
            self.top_up()
        else:
            self._early_have.add(index)

    def _on_reject(self, reason: int, text: str) -> None:
        self.error = text or f"rejected (reason {reason})"
        if reason in (Reason.NOT_MEMBER, Reason.UNKNOWN_CONTENT):
            self.dl.note_refusal(self.addr.peer_key, self.error)

    @property
    def idle(self) -> bool:
        """Nothing requested from this peer is outstanding (as far as we know)."""
        return self.dl.picker.in_flight(self.addr.peer_key) == 0

    def top_up(self, *, note_arriving: bool = True) -> None:
        """Fill this peer's request pipeline from the picker.

        Topping up after every block would cost a picker scan per block; on the
        block path it is done when ``refill_due`` says so. In the
        endgame the picker first learns what already waits in our buffers, unless
        the caller just told it (``note_arriving=False``).
        """
        if not self.ready or self.stream is None or not self.stream.open:
            return
        key = self.addr.peer_key
        if note_arriving and self.dl.picker.in_endgame:
            self.dl.note_arriving()
        blocks = self.dl.picker.next_requests(key, self.dl.clock())
        self.stream.send_many_nowait([Request(b.index, b.begin, b.length) for b in blocks])
        self._asked = self.dl.picker.in_flight(key)
