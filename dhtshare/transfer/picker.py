"""Pure piece picker for one file: which blocks to ask which peer for, and when.

Pieces are split into blocks of ``block_size`` bytes (the last may be shorter);
a ``Block`` is ``(index, begin, length)``. The picker tracks which peers have
which pieces, which blocks are requested from whom and since when, and which
pieces are received and verified. It never reads a clock (every call that
needs time takes ``now``) and takes its ``random.Random`` from the caller.

Policy, in the order ``next_requests`` applies it:

1. finish pieces already started (oldest first) that the peer has;
2. start new pieces, rarest first (fewest peers have it), ties broken at random,
   while fewer than ``max_partial_bytes`` worth of pieces are in flight;
3. endgame: when every block that some peer could send is already requested,
   a peer *steals* work: it is also asked for blocks queued at another peer that
   it would deliver sooner, judged by the block's place in that peer's queue and
   both peers' throughput (latest-queued first, ``endgame_margin`` blocks of
   slack for what the other peer has already sent on its way). Blocks whose
   bytes already wait in our buffers (``note_arriving``, told by the caller) are
   never stolen. The first copy to arrive cancels the others, which are then
   still queued at the slow peer, so few bytes are sent twice.

A peer's pipeline depth follows its measured throughput: enough blocks to keep
``target_latency`` seconds of data in flight, clamped to ``min_depth..max_depth``.
Peers that deliver share a budget of ``total_depth`` blocks in proportion to their
throughput (each share rounded up, never below ``min_depth``): one peer may use all
of it, several split it, so what waits for us in socket buffers does not grow with
the number of peers.
A request older than ``max(min_timeout, timeout_factor * mean latency)`` expires
and becomes requestable again; a peer that times out ``snub_after`` times in a
row is snubbed (one request at a time) until it delivers again.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BLOCK_SIZE",
    "Block",
    "Expired",
    "PickerConfig",
    "PiecePicker",
    "Received",
]

BLOCK_SIZE = 128 * 1024
_BULK_COUNT = 64
"""From this many pieces (and a quarter of the file) on, ``_count`` rebuilds the
availability index in one pass: the rebuild walks every piece."""
PeerId = bytes
PeerBlock = tuple[PeerId, "Block"]


@dataclass(frozen=True, slots=True, order=True)
class Block:
    """``length`` bytes of piece ``index`` starting at ``begin``."""

    index: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class PickerConfig:
    """Tuning knobs; the defaults suit a LAN-to-WAN swarm."""

    block_size: int = BLOCK_SIZE
    min_depth: int = 2
    max_depth: int = 64
    total_depth: int = 64  # blocks in flight to all peers together (16 MiB of 256 KiB)
    target_latency: float = 2.0  # seconds of data to keep requested from each peer
    rate_window: float = 10.0  # seconds of history behind a peer's throughput
    min_timeout: float = 5.0
    timeout_factor: float = 4.0  # a request expires after this many mean latencies
    snub_after: int = 3  # consecutive timeouts before a peer is snubbed
    endgame_copies: int = 2  # most peers one block is requested from in endgame
    endgame_margin: float = 4.0  # blocks a peer may have sent before our Cancel reaches it
    max_partial_bytes: int = 64 * 1024 * 1024  # started, unverified pieces in flight
    latency_alpha: float = 0.25  # weight of a new sample in the mean latency

    def __post_init__(self) -> None:
        if self.block_size <= 0 or not 1 <= self.min_depth <= self.max_depth:
            raise ValueError("block_size must be positive and 1 <= min_depth <= max_depth")
        if self.total_depth < self.min_depth:
            raise ValueError("total_depth must be at least min_depth")


@dataclass(frozen=True, slots=True)
class Received:
    """What ``block_received`` did: ``accepted`` (the block was needed), whether its
    piece now has every block (verify it next), and requests to Cancel elsewhere."""

    accepted: bool
    piece_complete: bool
    cancels: tuple[PeerBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class Expired:
    """What ``expire`` did: requests that timed out (send Cancel) and peers newly snubbed."""

    timed_out: tuple[PeerBlock, ...] = ()
    snubbed: tuple[PeerId, ...] = ()


@dataclass(slots=True)
class _Peer:
    have: set[int]
    pending: dict[Block, float] = field(default_factory=dict)  # block -> time sent
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (time, bytes)
    sampled: int = 0  # bytes in samples
    since: float | None = None  # time of the first request
    latency: float | None = None
    timeouts: int = 0  # consecutive
    snubbed: bool = False
    arriving: int = 0  # bytes from this peer already in our buffers, not yet delivered


@dataclass(slots=True)
class _Piece:
    seq: int  # start order: lower started earlier
    received: set[int] = field(default_factory=set)  # block numbers
    requested: dict[int, list[PeerId]] = field(default_factory=dict)  # block number -> peers
    contributors: set[PeerId] = field(default_factory=set)


class PiecePicker:
    """Chooses blocks to request for one file; see the module docstring for the policy."""

    def __init__(
        self,
        piece_lengths: Sequence[int],
        rng: random.Random,
        config: PickerConfig | None = None,
    ) -> None:
        if any(n <= 0 for n in piece_lengths):
            raise ValueError("every piece must have a positive length")
        self.config = config or PickerConfig()
        self._lengths = list(piece_lengths)
        self._rng = rng
        self._have = [False] * len(self._lengths)
        self._availability = [0] * len(self._lengths)
        self._pieces: dict[int, _Piece] = {}  # started, not verified; oldest first
        self._peers: dict[PeerId, _Peer] = {}
        self._banned: set[PeerId] = set()
        biggest = max(self._lengths, default=1)
        self._partial_cap = max(2, self.config.max_partial_bytes // biggest)
        self._seq = 0
        # Index of the pieces we could start (neither verified nor started), by
        # availability: _levels[n] lists those that n peers have, _slot[i] is i's
        # position in its list (-1: not a candidate). Picking the rarest piece is then
        # a look at the lowest non-empty level, not a scan of every piece.
        self._levels: dict[int, list[int]] = {0: list(range(len(self._lengths)))}
        self._slot = list(range(len(self._lengths)))
        self._open: set[int] = set()  # started pieces with a block nobody was asked for
        self._live_started = 0  # started pieces that some connected peer has
        self._verified = 0

    # -- geometry ---------------------------------------------------------------

    @property
    def piece_count(self) -> int:
        return len(self._lengths)

    def piece_length(self, index: int) -> int:
        return self._lengths[index]

    def block_count(self, index: int) -> int:
        return -(-self._lengths[index] // self.config.block_size)

    def block(self, index: int, number: int) -> Block:
        """Block ``number`` of piece ``index``."""
        begin = number * self.config.block_size
        return Block(index, begin, min(self.config.block_size, self._lengths[index] - begin))

    def blocks(self, index: int) -> list[Block]:
        return [self.block(index, n) for n in range(self.block_count(index))]

    def _number(self, block: Block) -> int:
        """The block's number in its piece; ``ValueError`` if it is not one of our blocks."""
        self._check_index(block.index)
        number, rest = divmod(block.begin, self.config.block_size)
        if rest or not 0 <= number < self.block_count(block.index):
            raise ValueError(f"{block} does not start a block")
        if self.block(block.index, number) != block:
            raise ValueError(f"{block} has the wrong length")
        return number

    def is_block(self, block: Block) -> bool:
        """True if ``block`` is one of this file's blocks (index, start and length).

        For input from a peer: checked where a ``Piece`` arrives, so the methods that
        take a block may treat a bad one as a bug (``ValueError``)."""
        if not 0 <= block.index < self.piece_count:
            return False
        number, rest = divmod(block.begin, self.config.block_size)
        if rest or not 0 <= number < self.block_count(block.index):
            return False
        return self.block(block.index, number) == block

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.piece_count:
            raise ValueError(f"piece {index} out of range 0..{self.piece_count - 1}")

    # -- the index ---------------------------------------------------------------

    def _candidate_add(self, index: int) -> None:
        if self._slot[index] < 0 and not self._have[index] and index not in self._pieces:
            level = self._levels.setdefault(self._availability[index], [])
            self._slot[index] = len(level)
            level.append(index)

    def _candidate_remove(self, index: int) -> None:
        slot = self._slot[index]
        if slot < 0:
            return
        level = self._levels[self._availability[index]]
        last = level.pop()
        if last != index:
            level[slot] = last
            self._slot[last] = slot
        self._slot[index] = -1

    def _add_availability(self, index: int, delta: int) -> None:
        old = self._availability[index]
        candidate = self._slot[index] >= 0
        if candidate:
            self._candidate_remove(index)
        self._availability[index] = new = old + delta
        if candidate:
            self._candidate_add(index)
        elif index in self._pieces and (old > 0) != (new > 0):
            self._live_started += 1 if new > 0 else -1

    def _start(self, index: int) -> _Piece:
        piece = self._pieces.get(index)
        if piece is None:
            self._candidate_remove(index)
            self._seq += 1
            piece = self._pieces[index] = _Piece(self._seq)
            if self._availability[index] > 0:
                self._live_started += 1
        return piece

    def _unstart(self, index: int) -> _Piece | None:
        piece = self._pieces.pop(index, None)
        if piece is not None:
            self._open.discard(index)
            if self._availability[index] > 0:
                self._live_started -= 1
            self._candidate_add(index)
        return piece

    def _update_open(self, index: int, piece: _Piece) -> None:
        if len(piece.received) + len(piece.requested) < self.block_count(index):
            self._open.add(index)
        else:
            self._open.discard(index)

    # -- our progress -----------------------------------------------------------

    def has(self, index: int) -> bool:
        """True if piece ``index`` is verified."""
        return self._have[index]

    @property
    def verified_count(self) -> int:
        return self._verified

    @property
    def complete(self) -> bool:
        return self._verified == self.piece_count

    def mark_have(self, index: int) -> list[PeerBlock]:
        """Record piece ``index`` as verified (e.g. from resume state); returns stale requests."""
        self._check_index(index)
        if not self._have[index]:
            self._have[index] = True
            self._verified += 1
        piece = self._unstart(index)  # a verified piece is no candidate: _have is set
        self._candidate_remove(index)
        cancels: list[PeerBlock] = []
        for number, peers in ({} if piece is None else piece.requested).items():
            block = self.block(index, number)
            for peer in peers:
                self._peers[peer].pending.pop(block, None)
                cancels.append((peer, block))
        return cancels

    def piece_verified(self, index: int) -> list[PeerBlock]:
        """The piece's hash checked out; it is written and can be served."""
        return self.mark_have(index)

    def piece_failed(self, index: int) -> frozenset[PeerId]:
        """The piece's hash did not match: every block becomes requestable again.

        Returns the peers that sent blocks of it (a caller may ban a sole sender).
        """
        self._check_index(index)
        piece = self._pieces.get(index)
        if piece is None:
            return frozenset()
        senders = frozenset(piece.contributors)
        piece.received.clear()
        piece.contributors.clear()
        self._update_open(index, piece)
        self._drop_if_idle(index)
        return senders

    # -- peers ------------------------------------------------------------------

    def add_peer(self, peer: PeerId, have: Collection[int] = ()) -> bool:
        """Add (or re-announce) a peer with the pieces it has (its Bitfield's, and any
        Haves); False for a banned peer. A piece out of range raises ``ValueError``."""
        if peer in self._banned:
            return False
        have = set(have)
        if have and not (min(have) >= 0 and max(have) < self.piece_count):
            raise ValueError(f"a piece out of range 0..{self.piece_count - 1}")
        old = self._peers.get(peer)
        if old is not None:
            self._count(old.have, -1)
            old.have = have
        else:
            self._peers[peer] = _Peer(have)
        self._count(have, +1)
        return True

    def peer_has(self, peer: PeerId, index: int) -> None:
        """Record that ``peer`` now has piece ``index`` (a Have message); unknown peers: ignored."""
        self._check_index(index)
        state = self._peers.get(peer)
        if state is not None and index not in state.have:
            state.have.add(index)
            self._add_availability(index, 1)

    def availability(self, index: int) -> int:
        """How many connected peers have piece ``index``."""
        return self._availability[index]

    def is_seed(self, peer: PeerId) -> bool:
        """True if ``peer`` has every piece (as far as its Bitfield and Haves say)."""
        state = self._peers.get(peer)
        return state is not None and len(state.have) == self.piece_count

    def interesting(self, peer: PeerId) -> bool:
        """True if ``peer`` has a piece we lack."""
        state = self._peers.get(peer)
        return state is not None and any(not self._have[i] for i in state.have)

    def in_flight(self, peer: PeerId) -> int:
        """How many blocks requested from ``peer`` are neither received nor withdrawn
        (cancelled because another peer delivered them, or expired)."""
        state = self._peers.get(peer)
        return 0 if state is None else len(state.pending)

    def pending(self, peer: PeerId) -> list[Block]:
        """Blocks requested from ``peer`` and not yet received, oldest first."""
        state = self._peers.get(peer)
        return [] if state is None else list(state.pending)

    def remove_peer(self, peer: PeerId) -> None:
        """Forget ``peer``; its pending requests become requestable from others."""
        state = self._peers.pop(peer, None)
        if state is None:
            return
        self._count(state.have, -1)
        for block in state.pending:
            self._forget_requester(peer, block)

    def ban(self, peer: PeerId) -> None:
        """Remove ``peer`` and never accept it again."""
        self.remove_peer(peer)
        self._banned.add(peer)

    def is_banned(self, peer: PeerId) -> bool:
        return peer in self._banned

    def is_snubbed(self, peer: PeerId) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.snubbed

    def _count(self, indices: Collection[int], delta: int) -> None:
        """Add ``delta`` to the availability of each of ``indices``.

        A bitfield (a seeder's: every piece) changes many at once: then the counts
        are changed in one pass and the index rebuilt in another, instead of moving
        each piece between levels one by one.
        """
        if len(indices) < _BULK_COUNT or 4 * len(indices) < len(self._slot):
            for i in indices:
                self._add_availability(i, delta)
            return
        availability, started = self._availability, self._pieces
        for i in indices:
            old = availability[i]
            availability[i] = new = old + delta
            if i in started and (old > 0) != (new > 0):
                self._live_started += 1 if new > 0 else -1
        self._rebuild_levels()

    def _rebuild_levels(self) -> None:
        """Recompute ``_levels`` (and ``_slot``) from the candidates' availability."""
        levels: dict[int, list[int]] = {}
        slot, availability = self._slot, self._availability
        for i, position in enumerate(slot):
            if position >= 0:
                level = levels.setdefault(availability[i], [])
                slot[i] = len(level)
                level.append(i)
        self._levels = levels

    # -- peer measurements --------------------------------------------------------

    def throughput(self, peer: PeerId, now: float) -> float:
        """Bytes per second received from ``peer`` over the recent window."""
        state = self._peers.get(peer)
        return 0.0 if state is None else self._rate(state, now)

    def _rate(self, state: _Peer, now: float) -> float:
        if state.since is None:
            return 0.0
        window = self.config.rate_window
        while state.samples and state.samples[0][0] < now - window:
            state.sampled -= state.samples.popleft()[1]
        span = min(window, max(1.0, now - state.since))
        return state.sampled / span

    def depth(self, peer: PeerId, now: float) -> int:
        """How many requests to keep in flight to ``peer``.

        ``target_latency`` seconds of its throughput, within ``min_depth..max_depth``,
        and, while other peers deliver too, at most its throughput's share of
        ``total_depth`` (rounded up): what waits for us in socket buffers then does not
        grow with the number of peers (docs/performance-history.md, round 5).
        """
        cfg = self.config
        if self.is_snubbed(peer):
            return 1
        mine = self.throughput(peer, now)
        wanted = math.ceil(mine * cfg.target_latency / cfg.block_size)
        if mine > 0:
            total = sum(self._rate(state, now) for state in self._peers.values())
            if total > mine:  # someone else delivers too: take our share
                wanted = min(wanted, math.ceil(cfg.total_depth * mine / total))
        return max(cfg.min_depth, min(cfg.max_depth, wanted))

    def request_timeout(self, peer: PeerId) -> float:
        """Seconds after which a request to ``peer`` expires."""
        state = self._peers.get(peer)
        latency = state.latency if state is not None else None
        if latency is None:
            return self.config.min_timeout
        return max(self.config.min_timeout, self.config.timeout_factor * latency)

    # -- requesting -------------------------------------------------------------

    def next_requests(self, peer: PeerId, now: float) -> list[Block]:
        """New blocks to request from ``peer`` now, filling its pipeline; recorded as sent."""
        state = self._peers.get(peer)
        if state is None:
            return []
        room = self.depth(peer, now) - len(state.pending)
        picked: list[Block] = []
        if room > 0:
            self._pick_started(state, room, picked)
            self._pick_new(state, room, picked)
            if len(picked) < room and self.in_endgame:
                self._pick_duplicates(peer, state, room, picked, now)
        for block in picked:
            self._record(peer, state, block, now)
        return picked

    def _free_numbers(self, index: int, piece: _Piece) -> Iterable[int]:
        for n in range(self.block_count(index)):
            if n not in piece.received and n not in piece.requested:
                yield n

    def _take_free(self, index: int, room: int, picked: list[Block]) -> None:
        piece = self._start(index)
        for n in self._free_numbers(index, piece):
            if len(picked) >= room:
                break
            picked.append(self.block(index, n))
            piece.requested[n] = []  # claimed; the requester is added in _record
        self._update_open(index, piece)

    def _pick_started(self, state: _Peer, room: int, picked: list[Block]) -> None:
        if not self._open:
            return
        for index in sorted(self._open, key=lambda i: self._pieces[i].seq):  # oldest first
            if len(picked) >= room:
                return
            if index in state.have:
                self._take_free(index, room, picked)

    def _pick_new(self, state: _Peer, room: int, picked: list[Block]) -> None:
        # pieces nobody connected has do not count, so a vanished peer cannot stall us
        while len(picked) < room and self._live_started < self._partial_cap:
            index = self._rarest(state.have)
            if index is None:
                return
            self._take_free(index, room, picked)

    def _rarest(self, have: set[int]) -> int | None:
        """The rarest piece in ``have`` we neither hold nor started; random among ties.

        A peer with every piece takes a random one from the lowest non-empty level;
        otherwise the smaller of (candidates, the peer's pieces) is scanned.
        """
        levels = sorted(n for n, level in self._levels.items() if n > 0 and level)
        if not levels:
            return None
        if len(have) == self.piece_count:
            # A seeder gets only pieces that no partial peer (another downloader) has,
            # while one could serve us: seeders' upload goes to pieces nobody else has.
            full = sum(1 for p in self._peers.values() if len(p.have) == self.piece_count)
            if levels[0] > full and self._partial_sources():
                return None
            return self._rng.choice(self._levels[levels[0]])
        if sum(len(self._levels[n]) for n in levels) <= len(have):
            for n in levels:
                ties = [i for i in self._levels[n] if i in have]
                if ties:
                    return self._rng.choice(ties)
            return None
        best: list[int] = []
        best_count = 0
        for i in sorted(have):
            if self._slot[i] < 0:
                continue
            count = self._availability[i]
            if not best or count < best_count:
                best, best_count = [i], count
            elif count == best_count:
                best.append(i)
        return self._rng.choice(best) if best else None

    def _partial_sources(self) -> bool:
        """True if a connected peer that is not a seeder and not snubbed has pieces."""
        count = self.piece_count
        return any(0 < len(p.have) < count and not p.snubbed for p in self._peers.values())

    def note_arriving(self, peer: PeerId, nbytes: int) -> None:
        """``peer``'s bytes that have reached us but are not yet delivered (buffered).

        Endgame never steals the blocks these bytes hold: they are already here, so a
        second copy could not arrive sooner, and a Cancel could not stop the first.
        """
        state = self._peers.get(peer)
        if state is not None:
            state.arriving = max(0, nbytes)

    @property
    def in_endgame(self) -> bool:
        """True once every block some peer could send is requested or received."""
        if any(level for n, level in self._levels.items() if n > 0):
            return False  # an unstarted piece someone has
        return all(self._availability[i] == 0 for i in self._open)

    def _pick_duplicates(
        self, peer: PeerId, state: _Peer, room: int, picked: list[Block], now: float
    ) -> None:
        """Endgame work stealing: blocks queued elsewhere that ``peer`` would deliver sooner.

        Times are in bytes / throughput; a peer without a measured throughput is
        taken to be as fast as the other one (both unknown: equally fast), unless
        it has been asked for a second or more without delivering: then it is
        stalled, and everything queued at it may be stolen.
        """
        cfg = self.config
        mine = self._eta_rate(state, now)
        if mine == 0.0:
            return  # stalled ourselves
        queued = sum(b.length for b in state.pending) + sum(b.length for b in picked)
        offers: list[tuple[float, float, Block]] = []  # (other's eta, our rate, block)
        for other, other_state in self._peers.items():
            if other == peer or not other_state.pending:
                continue
            rate = self._eta_rate(other_state, now)
            ours = mine or rate or 1.0
            # bytes already on their way: in our buffers, or sent before a Cancel could land
            ahead = -(cfg.endgame_margin * cfg.block_size + other_state.arriving)
            here = other_state.arriving
            for block in other_state.pending:  # oldest first: the other's queue order
                ahead += block.length
                here -= block.length
                if here >= 0:
                    continue  # its bytes are in our buffers, even if the peer now stalls
                if block.index in state.have:
                    eta = math.inf if rate == 0.0 else ahead / (rate or ours)
                    offers.append((eta, ours, block))
        offers.sort(key=lambda offer: offer[0], reverse=True)  # latest to arrive first
        for eta, ours, block in offers:
            if len(picked) >= room:
                return
            my_eta = (queued + block.length) / ours
            if my_eta >= eta:
                return  # every later offer arrives sooner from its own peer
            peers = self._pieces[block.index].requested.get(self._number(block), [])
            if peer in peers or not 0 < len(peers) < cfg.endgame_copies or block in picked:
                continue
            picked.append(block)
            queued += block.length

    def _eta_rate(self, state: _Peer, now: float) -> float | None:
        """Bytes/s for endgame estimates: measured, 0.0 for a stalled peer, None if unknown."""
        rate = self._rate(state, now)
        if rate > 0:
            return rate
        stalled = state.since is not None and now - state.since >= 1.0 and state.pending
        return 0.0 if stalled else None

    def _record(self, peer: PeerId, state: _Peer, block: Block, now: float) -> None:
        state.pending[block] = now
        if state.since is None:
            state.since = now
        self._pieces[block.index].requested.setdefault(self._number(block), []).append(peer)

    # -- responses --------------------------------------------------------------

    def block_received(self, peer: PeerId, block: Block, now: float) -> Received:
        """A block arrived from ``peer``; ``ValueError`` if it is not one of our blocks.

        A block is accepted only from a known peer, for a started piece, when not
        already received (a late answer to an expired request still counts).
        """
        number = self._number(block)
        state = self._peers.get(peer)
        if state is None:
            return Received(False, False)
        self._note_delivery(state, block, now)
        piece = self._pieces.get(block.index)
        if piece is None or number in piece.received:
            self._forget_pending(peer, block)
            return Received(False, False)
        state.pending.pop(block, None)
        piece.received.add(number)
        piece.contributors.add(peer)
        others = [p for p in piece.requested.pop(number, []) if p != peer]
        self._update_open(block.index, piece)
        for other in others:
            self._peers[other].pending.pop(block, None)
        complete = len(piece.received) == self.block_count(block.index)
        return Received(True, complete, tuple((p, block) for p in others))

    def _note_delivery(self, state: _Peer, block: Block, now: float) -> None:
        state.samples.append((now, block.length))
        state.sampled += block.length
        sent = state.pending.get(block)
        if sent is None:
            return
        sample = max(0.0, now - sent)
        alpha = self.config.latency_alpha
        state.latency = (
            sample if state.latency is None else (1 - alpha) * state.latency + alpha * sample
        )
        state.timeouts = 0
        state.snubbed = False

    def _forget_pending(self, peer: PeerId, block: Block) -> bool:
        """Drop ``block`` from ``peer``'s pending requests; True if it was pending."""
        state = self._peers.get(peer)
        if state is None or state.pending.pop(block, None) is None:
            return False
        self._forget_requester(peer, block)
        return True

    def _forget_requester(self, peer: PeerId, block: Block) -> None:
        piece = self._pieces.get(block.index)
        if piece is None:
            return
        number = self._number(block)
        peers = piece.requested.get(number, [])
        if peer in peers:
            peers.remove(peer)
        if not peers:
            piece.requested.pop(number, None)
            self._update_open(block.index, piece)
        self._drop_if_idle(block.index)

    def _drop_if_idle(self, index: int) -> None:
        """Un-start a piece that has nothing received and nothing requested."""
        piece = self._pieces.get(index)
        if piece is not None and not piece.received and not piece.requested:
            self._unstart(index)

    # -- timeouts ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time a pending request expires (when to call ``expire``)."""
        deadlines = [
            sent + self.request_timeout(peer)
            for peer, state in self._peers.items()
            for sent in state.pending.values()
        ]
        return min(deadlines, default=None)

    def expire(self, now: float) -> Expired:
        """Expire overdue requests, making them requestable again; snub repeat offenders."""
        timed_out: list[PeerBlock] = []
        snubbed: list[PeerId] = []
        for peer, state in self._peers.items():
            limit = self.request_timeout(peer)
            late = [b for b, sent in state.pending.items() if now - sent >= limit]
            if not late:
                continue
            for block in late:
                self._forget_pending(peer, block)
                timed_out.append((peer, block))
            state.timeouts += 1
            if state.timeouts >= self.config.snub_after and not state.snubbed:
                state.snubbed = True
                snubbed.append(peer)
        return Expired(tuple(timed_out), tuple(snubbed))
