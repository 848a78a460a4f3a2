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

Every connection proves the group's current access key (``access_key(group_id)``, asked
at each dial: it changes at every epoch); without one the download fails at once with
``FileShareError``, before any file is created.

It fails with ``FileShareError`` when no provider serves the file within
``provider_timeout`` seconds (or every provider refused us twice, ``retry_after``
apart, with their reason: a provider's cached roster may not list a member accepted
a moment ago until its next read),
and with ``StoreError`` on disk trouble (the ``.part`` file is kept). Every task
belongs to the ``TaskGroup`` inside ``run()``; cancelling ``run()`` pauses.

The decisions (whom to connect, what to request, what to cancel, whom to ban, when
to give up, save or keep alive) are the pure ``transfer/swarm.py``'s; this module
feeds it what the peers send and carries out its actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from dhtshare.atomic import read_hashes, write_hashes
from dhtshare.content import (
    FileLayout,
    check_layout,
    merkle_root,
    verify_hash_list,
    verify_piece,
)
from dhtshare.errors import (
    DhtshareError,
    FileShareError,
    ProtocolError,
    RemoteProtocolError,
    StoreError,
)
from dhtshare.identity import Identity, format_id
from dhtshare.records import FileEntry
from dhtshare.store.partial import PartialFile, owns, read_owner, safe_name
from dhtshare.store.resume import ResumeState, load_or_new
from dhtshare.transfer.aio.peer import READ_TIMEOUT, PeerStream, open_peer
from dhtshare.transfer.picker import PickerConfig
from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.transfer.share import AccessKey, MemberCheck, Share, ShareRegistry
from dhtshare.transfer.status import Complete, Downloading, DownloadStatus, Failed, Paused
from dhtshare.transfer.swarm import (
    Action,
    Ban,
    CompletePiece,
    Connect,
    ProviderAddr,
    Save,
    Send,
    Swarm,
    SwarmConfig,
    Verified,
    Verify,
    Violation,
)
from dhtshare.wire import (
    MAX_BLOCK,
    MAX_HASHES,
    Bitfield,
    ConnectionClosed,
    Event,
    GetHashes,
    HashList,
    Have,
    Message,
    Piece,
    Reason,
    Reject,
)

__all__ = [
    "DRAIN_QUIET",
    "Dial",
    "Download",
    "DownloadOptions",
    "FileInfo",
    "ProviderSource",
    "Upgrade",
    "check_info",
    "no_access_key",
]

log = logging.getLogger(__name__)

STORE_QUEUE_BYTES = 2 * 1024 * 1024
"""Completed pieces waiting to be hashed and written, at most (at least two pieces);
the batch being written holds as much again at most (one piece if pieces are bigger).
Short, so a piece is hashed while still in the CPU's cache and a slow disk stops the
reading of sockets early (docs/performance-history.md, round 3)."""
STORE_BATCH = 8
"""Most completed pieces hashed and written in one worker-thread call (and no more
than STORE_QUEUE_BYTES of them)."""


ProviderSource = Callable[[], Awaitable[list[ProviderAddr]]]
"""The node's provider lookup; called again every ``repoll_interval`` while pieces are missing."""
Dial = Callable[[ProviderAddr], Awaitable[tuple[PeerStream, str]]]
"""Opens a handshaken session with a provider: the stream and its route (``"direct"``,
``"punched"`` or ``"relayed"``; the node's ``node/dialer.py``). Raises ``OSError``,
``ProtocolError`` or ``TimeoutError`` if no route works."""
Upgrade = Callable[[ProviderAddr], Awaitable[tuple[PeerStream, str] | None]]
"""A relayed session's try for a better route: a session and its route, or ``None``."""
RELAYED = "relayed"
DRAIN_QUIET = 2.0
"""After an upgrade, the relayed stream is read until it is silent this long (the answers
to requests sent on it), then closed."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What the file entry says about the file to download; ``name`` is the output
    file's name, which may differ from the entry's (another file holds that one)."""

    group_id: bytes
    content_id: bytes
    name: str
    size: int
    piece_size: int

    @classmethod
    def of(cls, entry: FileEntry) -> FileInfo:
        """The download of ``entry``, under the entry's own name."""
        return cls(entry.group_id, entry.content_id, entry.name, entry.size, entry.piece_size)

    @property
    def layout(self) -> FileLayout:
        return FileLayout(self.size, self.piece_size)


def no_access_key(name: str) -> FileShareError:
    """The error of a download whose group's access key the node does not hold."""
    return FileShareError(
        f"cannot fetch {name!r}: this node holds no access key of its group",
        "only current members can download; check 'dhtshare group members GROUP',"
        " or wait until your node has read the group's latest records",
    )


def check_info(info: FileInfo) -> None:
    """``FileShareError`` unless the layout is one a file entry may have
    (``content.check_layout``), before anything is sized by it: the picker, the resume
    state and the hash list are sized by the piece count."""
    try:
        check_layout(info.size, info.piece_size)
    except ValueError:
        raise FileShareError(
            f"{info.name!r}: {info.size} bytes in pieces of {info.piece_size}"
            " is not a layout we accept",
            "the file entry is malformed; ask its sharer to share it again",
        ) from None


@dataclass(frozen=True, slots=True)
class DownloadOptions(SwarmConfig):
    """Tuning: the swarm's (``SwarmConfig``, which the ``Swarm`` is given as is) plus
    the adapter's own. The defaults suit the internet; tests shorten the timeouts."""

    rate_limit: float | None = None  # bytes/s for this download; None: unlimited
    connect_timeout: float = 10.0
    read_timeout: float = READ_TIMEOUT
    verify_on_resume: bool = False  # re-hash pieces the resume state calls verified
    picker: PickerConfig = field(default_factory=lambda: PickerConfig(block_size=MAX_BLOCK))


class Download:
    """One file: providers -> peers -> picker -> verified pieces on disk.

    Build it, then ``await run()`` (returns the final path). ``status()`` is a
    snapshot at any time. The bookkeeping is ``swarm`` (``transfer/swarm.py``): this
    class feeds it the sessions' events and carries out its actions with sockets,
    the disk and tasks; what it counts (sources, bytes, bans) is the swarm's.
    """

    def __init__(
        self,
        identity: Identity,
        info: FileInfo,
        out_dir: Path,
        *,
        providers: ProviderSource,
        is_member: MemberCheck,
        access_key: AccessKey,
        shares: ShareRegistry | None = None,
        state_path: Path | None = None,
        on_first_piece: Callable[[bytes], None] | None = None,
        on_have: Callable[[bytes, int], None] | None = None,
        options: DownloadOptions | None = None,
        bucket: TokenBucket | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        dial: Dial | None = None,
        upgrade: Upgrade | None = None,
        upgrade_delay: Callable[[int], float] | None = None,
    ) -> None:
        check_info(info)  # before anything is sized by it
        self.identity = identity
        self.info = info
        self.layout = info.layout
        self.out_dir = Path(out_dir)
        self.providers = providers
        self.is_member = is_member
        self.access_key = access_key
        self.shares = shares
        self.on_first_piece = on_first_piece
        self.on_have = on_have
        self.options = options or DownloadOptions()
        self.clock = clock
        self.dial: Dial = dial or self._dial_direct
        if (upgrade is None) != (upgrade_delay is None):
            raise ValueError("an upgrade comes with its delay (reach.punch.upgrade_delay)")
        self.upgrade = upgrade  # None: a relayed session stays relayed
        self.upgrade_delay = upgrade_delay or (lambda failures: 0.0)
        self.routes: dict[bytes, str] = {}  # peer -> the route of its latest session
        # A shared ``bucket`` is one limit over several downloads (the node's); else our own.
        self.bucket = bucket or TokenBucket(None, now=clock())
        if bucket is None:
            self.set_rate_limit(self.options.rate_limit)
        self.final_path = self.out_dir / safe_name(info.name)
        self._state_path = state_path
        self.share: Share | None = None
        self._partial: PartialFile | None = None
        self._clients: dict[bytes, _Client] = {}
        self.swarm = Swarm(
            self.final_path.name,
            self.layout.piece_lengths(),
            identity.public,
            _Links(self._clients),
            config=self.options,
            rng=rng or random.Random(),
            now=clock(),
        )
        self._store: asyncio.Queue[CompletePiece] = asyncio.Queue(
            max(2, STORE_QUEUE_BYTES // max(1, info.piece_size))
        )
        # A batch leaves the queue, which then fills again: at most STORE_QUEUE_BYTES in
        # the batch (one piece if pieces are bigger) plus a full queue.
        self._batch_limit = max(1, min(STORE_BATCH, STORE_QUEUE_BYTES // max(1, info.piece_size)))
        self._hash_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._fatal: DhtshareError | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._final: DownloadStatus | None = None
        self.peer_crashes = 0  # peer sessions ended by an unexpected exception

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

    def set_rate_limit(self, rate: float | None) -> None:
        """Limit this download to ``rate`` bytes/s (``None`` or 0: unlimited)."""
        self.bucket.set_rate(rate, now=self.clock())

    def rate(self) -> float:
        """Accepted bytes per second over the last few seconds."""
        return self.swarm.rate(self.clock())

    def status(self) -> DownloadStatus:
        """A snapshot: ``Downloading`` while running, else how it ended."""
        if self._final is not None:
            return self._final
        relayed = sum(1 for c in self._clients.values() if c.stream is not None and c.relayed)
        return Downloading(
            *self._status_fields(), rate=self.rate(), peers=self.swarm.peers, relayed=relayed
        )

    @property
    def ended(self) -> bool:
        """``run()`` has returned (or raised), or ``mark_ended`` said how it ended."""
        return self._final is not None

    def mark_ended(self, status: DownloadStatus) -> None:
        """This download ended before a restart: report ``status`` without running it."""
        self._final = status

    def _status_fields(
        self, path: Path | None = None
    ) -> tuple[str, int, int, str, dict[str, int], dict[str, str]]:
        """``name, size, bytes_done, path, sources, routes``: the fields every status shares."""
        sources = {format_id(k): v for k, v in self.swarm.sources.items()}
        routes = {format_id(k): v for k, v in self.routes.items()}
        where = str(path or self.part_path)
        return self.final_path.name, self.info.size, self.swarm.bytes_done, where, sources, routes

    async def _dial_direct(self, addr: ProviderAddr) -> tuple[PeerStream, str]:
        """The default ``dial``: ``addr.host:addr.port``, route ``"direct"``."""
        opts = self.options
        stream = await open_peer(
            self.identity,
            addr.host,
            addr.port,
            self.info.group_id,
            self.info.content_id,
            access_key=self.current_access_key(),
            handshake_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
        )
        return stream, "direct"

    async def run(self) -> Path:
        """Download until complete and return the final path (see the module doc)."""
        self.swarm.begin(self.clock())
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
        seconds = self.clock() - self.swarm.started
        self._final = Complete(*self._status_fields(path), seconds=seconds)
        return path

    # -- the run ------------------------------------------------------------------

    def stop_with(self, error: DhtshareError) -> None:
        """End the download with ``error`` (its main loop returns it)."""
        if self._fatal is None:
            self._fatal = error
        self._wake.set()

    def current_access_key(self) -> bytes:
        """The group's access key now; ``FileShareError`` if the node holds none."""
        key = self.access_key(self.info.group_id)
        if key is None:
            raise no_access_key(self.info.name)
        return key

    async def _run(self) -> Path:
        self.current_access_key()  # before any file is made
        if await asyncio.to_thread(self.final_path.exists):
            raise StoreError(
                f"{self.final_path} already exists", "move it away or choose another directory"
            )
        await self._open()
        finished = False
        try:
            if not self.swarm.done:
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
            state = await asyncio.to_thread(
                load_or_new, self.state_path, self.info.content_id, count
            )
            self.swarm.restore(state.verified)
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
                for task in helpers + [c.task for c in self._clients.values() if c.task]:
                    task.cancel()
        if error is not None:
            raise error

    async def _main_loop(self) -> DhtshareError | None:
        """Keep peers connected until every piece is verified; return what stopped us."""
        while not self.swarm.done:
            if self._fatal is not None:
                return self._fatal
            now = self.clock()
            if self.swarm.poll_due(now):
                self.swarm.providers_found(await self._poll(), now)
            self.apply(self.swarm.connect(now))
            stalled = self.swarm.update_stall(self.clock())
            if stalled is not None:
                return stalled
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.swarm.repoll_gap()):
                    await self._wake.wait()
        return None

    async def _poll(self) -> list[ProviderAddr] | None:
        """The providers the node knows now; ``None`` if the lookup failed."""
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                return await self.providers()
        except (DhtshareError, OSError, TimeoutError) as exc:
            log.info("provider lookup failed: %s", exc)
            return None

    # -- carrying out the swarm's actions ---------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        """Carry out ``actions`` that need no waiting (every kind but Verify and Save).

        A ``Violation`` raises ``RemoteProtocolError``: it comes from the events of
        the session that broke the protocol, and ends that session only.
        """
        for action in actions:
            match action:
                case Send(peer, messages):
                    self._send(peer, messages)
                case Ban(peer, why):
                    log.info("banning %s: %s", format_id(peer)[:12], why)
                    client = self._clients.get(peer)
                    if client is not None and client.stream is not None:
                        client.stream.abort(Reason.BAD_DATA, why)
                case Violation(_, why):
                    raise RemoteProtocolError(why, Reason.PROTOCOL)
                case Verified(index, first, count):
                    if self.share is not None:
                        self.share.add_piece(index)
                    self._notify(first, count)
                    if self.swarm.complete:
                        self._wake.set()
                case Connect(addr):
                    self._spawn(addr)
                case Verify() | Save():
                    raise AssertionError(f"{action} needs waiting for: use _execute")

    async def _execute(self, actions: list[Action]) -> None:
        """Carry out ``actions``, waiting for room in the store queue and for saves."""
        for action in actions:
            match action:
                case Verify(piece):
                    await self._store.put(piece)
                case Save():
                    await self._checkpoint()
                case _:
                    self.apply([action])

    def _send(self, peer: bytes, messages: tuple[Message, ...]) -> None:
        client = self._clients.get(peer)
        if client is not None and client.stream is not None and client.stream.open:
            client.stream.send_many_nowait(messages)

    def _spawn(self, addr: ProviderAddr) -> None:
        assert self._tg is not None
        client = _Client(self, addr)
        self._clients[addr.peer_key] = client
        client.task = self._tg.create_task(client.run())

    def session_ended(self, client: _Client) -> None:
        """``client``'s session is over: its requests go to the other peers."""
        key = client.addr.peer_key
        if self._clients.get(key) is client:
            del self._clients[key]
        self.apply(self.swarm.session_ended(key, self.clock()))
        self._wake.set()

    def peer_ready(self, client: _Client) -> bool:
        """``client`` has the file's hashes and its peer's Bitfield: start requesting.
        False if the peer may not be used (it was banned meanwhile)."""
        key = client.addr.peer_key
        self.apply(self.swarm.peer_ready(key, self.clock()))
        if not self.swarm.is_ready(key):
            return False
        self._wake.set()
        return True

    def ban(self, peer: bytes, why: str) -> None:
        """Drop ``peer`` and never use it again for this file."""
        self.apply(self.swarm.ban(peer, why))

    # -- hashes -------------------------------------------------------------------

    async def ensure_hashes(self, client: _Client) -> None:
        """Have the verified piece-hash list, fetching it through ``client`` if needed."""
        if self._hashes_known():
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
        return self.swarm.hashes is not None

    async def _set_hashes(self, hashes: tuple[bytes, ...], *, save: bool) -> None:
        if save:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_hashes, self.hashes_path, hashes)
        if self.options.verify_on_resume and self.swarm.verified:
            await self._reverify(hashes)
        self.swarm.start_picking(hashes)
        held = self.shares.get(self.info.group_id, self.info.content_id) if self.shares else None
        if self.shares is not None and self._partial is not None and not (held and held.complete):
            # a complete share of this file (shared by the user) keeps serving every piece
            self.share = self.shares.add(
                Share(
                    self.info.group_id,
                    self.info.content_id,
                    self._partial.part_path,
                    self.layout,
                    hashes,
                    self.swarm.verified,
                )
            )

    async def _reverify(self, hashes: tuple[bytes, ...]) -> None:
        assert self._partial is not None
        good = set(self.swarm.verified)
        for index in sorted(good):
            offset, length = self.layout.piece_offset(index), self.layout.piece_length(index)
            data = await self._partial.read(offset, length)
            if not await asyncio.to_thread(verify_piece, data, hashes[index]):
                good.discard(index)
        self.swarm.restore(good)

    # -- blocks and pieces ----------------------------------------------------------

    async def on_piece(self, client: _Client, msg: Piece) -> None:
        """A block arrived: the swarm accounts for it; a full piece is queued to be
        hashed and written; the bytes are paced by the rate limit; then the peer's
        pipeline is refilled if it drained enough."""
        key, now = client.addr.peer_key, self.clock()
        await self._execute(self.swarm.block(key, msg, now))
        wait = self.bucket.consume(len(msg.data), now)
        if wait > 0:
            await asyncio.sleep(wait)
        self.apply(self.swarm.refill(key, self.clock()))

    async def _store_loop(self) -> None:
        """Hash completed pieces off the loop and write the good ones, a batch at a time.

        Whatever queued up while the worker thread was busy goes in the next batch:
        one thread hop per batch, not per piece (what a hop costs:
        docs/performance-history.md, round 3).
        """
        while True:
            batch = [await self._store.get()]
            while len(batch) < self._batch_limit and not self._store.empty():
                batch.append(self._store.get_nowait())
            hashes = self.swarm.hashes
            assert hashes is not None and self._partial is not None
            jobs = [
                (
                    self.layout.piece_offset(item.index),
                    item.data,
                    functools.partial(verify_piece, expected=hashes[item.index]),
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
                self.apply(self.swarm.piece_checked(item, good, self.clock()))

    def _notify(self, first: bool, count: int) -> None:
        try:
            if first and self.on_first_piece is not None:
                self.on_first_piece(self.info.content_id)
            if self.on_have is not None:
                self.on_have(self.info.content_id, count)
        except Exception:
            log.exception("download progress callback failed")

    # -- timers, saving, finishing --------------------------------------------------

    async def _timer_loop(self) -> None:
        """Carry out the swarm's timers: expired requests, saves, keepalives.

        It naps at most half a second: an event may bring the next deadline closer.
        """
        while True:
            nap = self.swarm.next_deadline() - self.clock()
            await asyncio.sleep(min(0.5, max(0.01, nap)))
            await self._execute(self.swarm.handle_timer(self.clock()))

    async def _checkpoint(self) -> None:
        """fsync the pieces, then save the state that trusts them (atomically)."""
        if self._partial is None or self._partial.closed:
            return
        snapshot = ResumeState(
            self.info.content_id, self.layout.piece_count, set(self.swarm.verified)
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
        assert self._partial is not None and self.swarm.hashes is not None
        if merkle_root(self.swarm.hashes) != self.info.content_id or not self.swarm.complete:
            raise FileShareError("download incomplete", "resume the download")
        path = await self._partial.finalize()
        for leftover in (self.state_path, self.hashes_path):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(leftover.unlink, missing_ok=True)
        if self.share is not None:
            self.share.path = path
        return path


class _Links:
    """What the swarm may ask about a peer's connection (``swarm.Links``)."""

    def __init__(self, clients: dict[bytes, _Client]) -> None:
        self._clients = clients

    def _stream(self, peer: bytes) -> PeerStream | None:
        client = self._clients.get(peer)
        return None if client is None else client.stream

    def writable(self, peer: bytes) -> bool:
        stream = self._stream(peer)
        return stream is not None and stream.open

    def arriving(self, peer: bytes) -> int:
        stream = self._stream(peer)
        return 0 if stream is None else stream.buffered_in()


class _Client:
    """One provider connection: handshake, bitfield, hashes, then request and receive.

    It feeds what its peer sends to the download's ``swarm`` and has the download
    carry out the answer (``Download.apply``)."""

    def __init__(self, download: Download, addr: ProviderAddr) -> None:
        self.dl = download
        self.addr = addr
        self.stream: PeerStream | None = None
        self.route = ""
        self.task: asyncio.Task[None] | None = None
        self.error = ""

    @property
    def relayed(self) -> bool:
        return self.route == RELAYED

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
        except FileShareError as exc:  # the group's access key is gone: the download's end
            self.error = exc.message
            self.dl.stop_with(exc)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.dl.peer_crashes += 1
            log.exception("provider %s:%d crashed its session", self.addr.host, self.addr.port)
        finally:
            self.dl.session_ended(self)
            if self.stream is not None:
                await self.stream.aclose()

    async def _run(self) -> None:
        dl, opts = self.dl, self.dl.options
        info = dl.info
        dl.current_access_key()  # gone (a new epoch without us): the download ends
        async with asyncio.timeout(opts.connect_timeout * 3):  # every route's tries in all
            self.stream, self.route = await dl.dial(self.addr)
        dl.routes[self.addr.peer_key] = self.route
        key = self.stream.peer_key
        if key != self.addr.peer_key or not dl.is_member(info.group_id, key):
            self.stream.abort(Reason.NOT_MEMBER, "you are not a member of this group")
            raise ProtocolError("provider is not a current member of the group")
        if not await self._first_bitfield():
            return
        await dl.ensure_hashes(self)
        if not dl.peer_ready(self):
            return
        first = self.stream
        upgrader = None
        if self.relayed and dl.upgrade is not None:
            upgrader = asyncio.ensure_future(self._upgrade_loop())
        try:
            await self._read(first)
            if self.stream is not first and upgrader is not None:
                await upgrader  # it reads the upgraded stream until that ends
        finally:
            if upgrader is not None:
                upgrader.cancel()
                await asyncio.gather(upgrader, return_exceptions=True)
            if self.stream is not first:
                await first.aclose()

    async def _read(self, stream: PeerStream) -> None:
        """Handle ``stream``'s events until it ends. A stream replaced by an upgrade is
        read until it is ``DRAIN_QUIET`` seconds silent; its end is then no error."""
        try:
            async for event in stream:
                if not await self._on_event(event):
                    return
        except (ProtocolError, OSError, TimeoutError):
            if stream is self.stream:
                raise

    async def _upgrade_loop(self) -> None:
        """Try for a better route than the relay, with backoff; a session that works
        (its Bitfield read) replaces the relayed one: new requests go to it at once,
        the relayed stream is drained, and this task reads the new one."""
        dl, key = self.dl, self.addr.peer_key
        assert dl.upgrade is not None
        failures = 0
        while True:
            await asyncio.sleep(dl.upgrade_delay(failures))
            failures += 1
            got = await dl.upgrade(self.addr)
            if got is None:
                continue
            stream, route = got
            if stream.peer_key != key or not dl.is_member(dl.info.group_id, key):
                await stream.aclose()
                continue
            if not await self._opening(stream):
                await stream.aclose()
                continue
            old, self.stream, self.route = self.stream, stream, route
            dl.routes[key] = route
            log.info("session with %s upgraded to %s", format_id(key)[:12], route)
            if old is not None:
                old.read_timeout = DRAIN_QUIET
            await self._read(stream)
            return

    async def _opening(self, stream: PeerStream) -> bool:
        """Read a new session's opening up to its Bitfield (the swarm already knows the
        peer's pieces); False if it ended first."""
        try:
            async with asyncio.timeout(self.dl.options.connect_timeout):
                async for event in stream:
                    if isinstance(event, Bitfield):
                        return True
                    if isinstance(event, ConnectionClosed | Reject):
                        return False
        except (ProtocolError, OSError, TimeoutError):
            return False
        return False

    async def _first_bitfield(self) -> bool:
        """Handle events until the peer's Bitfield; False if the connection ended first."""
        assert self.stream is not None
        async for event in self.stream:
            if isinstance(event, Bitfield):
                self.dl.apply(self.dl.swarm.bitfield(self.addr.peer_key, event))
                return True
            if not await self._on_event(event):
                return False
        return False

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
        dl, key = self.dl, self.addr.peer_key
        match event:
            case Piece():
                await dl.on_piece(self, event)
            case Have(index):
                dl.apply(dl.swarm.have(key, index, dl.clock()))
            case Reject(reason, text):
                self.error = text or f"rejected (reason {reason})"
                dl.swarm.rejected(key, reason, self.error)
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
