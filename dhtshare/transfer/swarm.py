"""The bookkeeping of one download, sans I/O: peer events in, actions out.

``Swarm`` knows the providers, the peer sessions, the picker, the pieces being
assembled and the verified ones; it never reads a clock (every call that needs
time takes ``now``), opens nothing and sends nothing. Each event method returns
the ``Action``\\ s the adapter (``transfer/aio/download.py``) must carry out, in
order: send messages, connect to a provider, ban a peer, hash and store a
completed piece, save the resume state.

It draws no randomness of its own either: the caller passes the ``rng`` (a seeded
one in tests).

Rules it keeps:

- a block is accepted from a ready peer only, once, for a piece still missing;
  its other copies (endgame) are cancelled when it arrives;
- a piece that fails its hash is fetched again: a sole sender is banned at once;
  with several senders, those whose blocks differ from the copy that later
  verifies are banned;
- a peer that breaks the protocol is banned, and its session ends (``Violation``);
- a provider that refuses us as a non-member (or for an unknown file) is tried
  once more after ``retry_after``; refused twice, it is not tried again;
- a peer's pipeline is refilled when ``refill_due`` says enough of it drained;
- ``update_stall`` fails the download when no peer has served a missing piece for
  ``provider_timeout`` seconds, or every provider refused us twice;
- ``next_deadline`` / ``handle_timer`` expire overdue requests (their blocks go to
  other peers), save the progress every ``save_interval`` seconds while it
  changes, and keep every connection alive.

The one thing the core asks instead of being told is ``Links``: whether a peer's
connection can still be written to, and how many of its bytes already wait in our
buffers. The latter is read only in the endgame when a pipeline is filled; telling
it on every block would cost a system call per block.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from dhtshare.errors import FileShareError
from dhtshare.records import PeerAddress, every_address
from dhtshare.transfer.picker import Block, PickerConfig, PiecePicker
from dhtshare.wire import Bitfield, Cancel, Have, Keepalive, Message, Piece, Reason, Request

__all__ = [
    "KEEPALIVE_INTERVAL",
    "RATE_WINDOW",
    "Action",
    "Ban",
    "CompletePiece",
    "Connect",
    "Links",
    "ProviderAddr",
    "Save",
    "Send",
    "Swarm",
    "SwarmConfig",
    "Verified",
    "Verify",
    "Violation",
    "refill_due",
]

PeerId = bytes
RATE_WINDOW = 5.0
"""Seconds of accepted bytes behind ``Swarm.rate``."""
KEEPALIVE_INTERVAL = 20.0
"""An idle session, ours or a server's, sends a Keepalive this often (well under the
read timeout of ``transfer/aio/peer.py``)."""


@dataclass(frozen=True, slots=True)
class ProviderAddr:
    """A peer that holds (some of) the file, and where to reach it: ``host:port`` directly,
    or one of ``addresses`` (more direct addresses, and relays: the node's dialer decides)."""

    peer_key: bytes
    host: str
    port: int
    addresses: tuple[PeerAddress, ...] = ()

    def every_address(self) -> tuple[PeerAddress, ...]:
        """The main address first, then the others, each once."""
        return every_address(self.host, self.port, self.addresses)


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    """The download's timing and limits; ``DownloadOptions`` adds the adapter's own."""

    max_peers: int = 12
    provider_timeout: float = 60.0  # fail if nobody serves missing pieces this long
    repoll_interval: float = 5.0
    retry_after: float = 5.0  # before reconnecting to a provider whose connection ended
    save_interval: float = 2.0
    keepalive_interval: float = KEEPALIVE_INTERVAL
    picker: PickerConfig = field(default_factory=PickerConfig)


@dataclass(slots=True)
class CompletePiece:
    """Every block of piece ``index``, and who sent each (``begin -> peer``)."""

    index: int
    data: bytes | bytearray | memoryview
    senders: dict[int, PeerId] = field(default_factory=dict)


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``messages`` to ``peer`` in one write, if its connection is still open."""

    peer: PeerId
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a session with this provider (``session_ended`` when it is over)."""

    addr: ProviderAddr


@dataclass(frozen=True, slots=True)
class Ban:
    """``peer`` is dropped for this file: abort its connection (``Reason.BAD_DATA``)."""

    peer: PeerId
    why: str


@dataclass(frozen=True, slots=True)
class Violation:
    """``peer`` broke the protocol (it is banned already): end its session with this error."""

    peer: PeerId
    why: str


@dataclass(frozen=True, slots=True)
class Verify:
    """Hash ``piece``, write it if good, then report with ``piece_checked``."""

    piece: CompletePiece


@dataclass(frozen=True, slots=True)
class Verified:
    """Piece ``index`` is verified and written: serve it, report progress (``first``:
    the download's first piece; ``count``: pieces verified now)."""

    index: int
    first: bool
    count: int


@dataclass(frozen=True, slots=True)
class Save:
    """Make the written pieces durable, then save the resume state (``verified``)."""


Action: TypeAlias = Send | Connect | Ban | Violation | Verify | Verified | Save


class Links(Protocol):
    """What the core may ask the adapter about a peer's connection (reads, no effects)."""

    def writable(self, peer: PeerId) -> bool:
        """True while messages to ``peer`` can be sent."""
        ...

    def arriving(self, peer: PeerId) -> int:
        """Bytes ``peer`` sent that wait in our buffers, not yet handed to us."""
        ...


def refill_due(drained: int, asked: int) -> bool:
    """Whether a peer's pipeline (``asked`` requests in flight at the last refill,
    ``drained`` of them since received, cancelled or expired) has drained enough to
    send it a new batch of Requests.

    A quarter of it, so a deep pipeline never runs low; a shallow one (a peer's share
    of the picker's ``total_depth``) waits for half of it, or 8 blocks, so that each
    batch, and the wake-up it costs the peer, still carries several requests.
    """
    return drained >= max(asked / 4, min(asked / 2, 8))


@dataclass(slots=True)
class _Session:
    """One provider connection, from ``Connect`` to ``session_ended``."""

    addr: ProviderAddr
    ready: bool = False  # handshake, bitfield and hashes done; in the picker
    have: set[int] | None = None  # its Bitfield, until it is ready
    early: set[int] = field(default_factory=set)  # its Haves before it was ready
    asked: int = 0  # requests in flight right after the last top-up


class Swarm:
    """One file's download bookkeeping; see the module docstring for the rules.

    ``name`` is the file's name in error messages, ``me`` our own key (never a
    provider of ours). ``sources`` counts accepted bytes per peer,
    ``bytes_received`` every block byte that arrived (duplicates included).
    """

    def __init__(
        self,
        name: str,
        piece_lengths: Sequence[int],
        me: PeerId,
        links: Links,
        *,
        rng: random.Random,
        config: SwarmConfig | None = None,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.me = me
        self.links = links
        self.config = config or SwarmConfig()
        self.picker = PiecePicker(piece_lengths, rng, self.config.picker)
        self.verified: set[int] = set()
        self.hashes: tuple[bytes, ...] | None = None  # the verified piece hashes, once known
        self.sources: Counter[PeerId] = Counter()
        self.bytes_received = 0
        self.banned: set[PeerId] = set()
        self.refused: dict[PeerId, str] = {}  # provider -> its reason, once it refused twice
        self._refused_once: dict[PeerId, str] = {}  # refused once: tried again after retry_after
        self._known: dict[PeerId, ProviderAddr] = {}
        self._sessions: dict[PeerId, _Session] = {}
        self._ended_at: dict[PeerId, float] = {}
        self._connecting_since: dict[PeerId, float] = {}  # first try, until it gets ready
        self._assembly: dict[int, CompletePiece] = {}
        self._suspects: dict[int, CompletePiece] = {}  # failed pieces with several senders
        self._rate: deque[tuple[float, int]] = deque()
        self._polled_at = float("-inf")
        self._polls = 0
        self._saved = 0  # pieces verified at the last save
        self.begin(now)

    # -- progress ---------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """The download (re)starts at ``now``: the clocks of rate, stall, save and keepalive."""
        self.started = self._progress_at = self._saved_at = self._keepalive_at = now

    def restore(self, verified: Iterable[int]) -> None:
        """The pieces a resume state (re-checked, if asked) calls verified."""
        self.verified = set(verified)
        self._saved = len(self.verified)

    def start_picking(self, hashes: tuple[bytes, ...]) -> None:
        """The piece hashes are known (verified against the content id by the caller):
        pieces can be verified, and peers get ready."""
        self.hashes = hashes
        for index in sorted(self.verified):
            self.picker.mark_have(index)

    @property
    def piece_count(self) -> int:
        return self.picker.piece_count

    @property
    def complete(self) -> bool:
        return len(self.verified) == self.piece_count

    @property
    def done(self) -> bool:
        """Every piece verified, against known hashes: the file can be finalized."""
        return self.complete and self.hashes is not None

    @property
    def bytes_done(self) -> int:
        return sum(self.picker.piece_length(i) for i in self.verified)

    @property
    def peers(self) -> int:
        """Sessions that are ready (in the picker)."""
        return sum(1 for s in self._sessions.values() if s.ready)

    def is_ready(self, peer: PeerId) -> bool:
        session = self._sessions.get(peer)
        return session is not None and session.ready

    def rate(self, now: float) -> float:
        """Accepted bytes per second over the last ``RATE_WINDOW`` seconds."""
        while self._rate and self._rate[0][0] < now - RATE_WINDOW:
            self._rate.popleft()
        span = min(RATE_WINDOW, max(1e-3, now - self.started))
        return sum(n for _, n in self._rate) / span

    # -- providers --------------------------------------------------------------------

    def repoll_gap(self) -> float:
        """Seconds between provider polls: 0.5, 1, 2, ... up to ``repoll_interval``.

        Other downloaders announce themselves after their first piece; polling
        soon after we start finds them while there is still much to swap.
        """
        return min(self.config.repoll_interval, 0.25 * (1 << min(self._polls, 8)))

    def poll_due(self, now: float) -> bool:
        """True when the providers should be looked up (again)."""
        return now - self._polled_at >= self.repoll_gap() or not self._known

    def providers_found(self, found: Iterable[ProviderAddr] | None, now: float) -> None:
        """A lookup started at ``now`` gave ``found`` (``None``: it failed; keep the last)."""
        self._polled_at = now
        self._polls += 1
        if found is not None:
            self._known = {a.peer_key: a for a in found if a.peer_key != self.me}

    def connect(self, now: float) -> list[Action]:
        """Sessions to open: known providers not connected, banned, refused twice, or
        ended less than ``retry_after`` ago; at most ``max_peers`` sessions in all."""
        actions: list[Action] = []
        for key, addr in self._known.items():
            if len(self._sessions) >= self.config.max_peers:
                break
            if key in self._sessions or key in self.banned or key in self.refused:
                continue
            if now - self._ended_at.get(key, float("-inf")) < self.config.retry_after:
                continue
            self._connecting_since.setdefault(key, now)
            self._sessions[key] = _Session(addr)
            actions.append(Connect(addr))
        return actions

    def update_stall(self, now: float) -> FileShareError | None:
        """Restart the stall clock at ``now`` while a ready peer can serve us; then the
        error to fail with if nobody can, or ``None`` while there is hope."""
        if any(s.ready and self._useful(k, s, now) for k, s in self._sessions.items()):
            self._progress_at = now  # a connected peer with pieces we lack, delivering
            return None
        if any(self._useful(k, s, now) for k, s in self._sessions.items()):
            return None  # still connecting: hope, but the stall clock keeps running
        candidates = [k for k in self._known if k not in self.banned]
        if candidates and not self._sessions and all(k in self.refused for k in candidates):
            return FileShareError(
                f"every provider of {self.name} refused us: {self.refused[candidates[0]]}",
                "ask the group's owner to accept you, then download again",
            )
        timeout = self.config.provider_timeout
        if now - self._progress_at < timeout:
            return None
        dropped = len(self.banned)
        why = f"; {dropped} dropped for bad data or protocol errors" if dropped else ""
        if candidates and not self._sessions:
            return FileShareError(
                f"no providers for {self.name} (nobody served it for {timeout:g} s:"
                f" {len(candidates)} listed, none connected now{why})",
                "try again later; if a member who holds it is online behind a home router,"
                " it needs a relay: see `relays` in its `dhtshare node status` (a bootstrap"
                " node started with --relay is one)",
            )
        return FileShareError(
            f"no providers for {self.name} (nobody served it for {timeout:g} s{why})",
            "try again later, when a member who holds the file is online",
        )

    def _useful(self, key: PeerId, session: _Session, now: float) -> bool:
        """Still connecting (for at most ``provider_timeout`` since we first tried this
        peer without it getting ready), or ready with a piece we lack and not snubbed
        (it delivers what we ask). A peer that claims pieces and never sends them, or
        never finishes its greeting, stops counting; so does the download."""
        if not session.ready:
            since = self._connecting_since.get(key, now)
            return now - since < self.config.provider_timeout
        return self.picker.interesting(key) and not self.picker.is_snubbed(key)

    # -- a session's events -------------------------------------------------------------

    def bitfield(self, peer: PeerId, bitfield: Bitfield) -> list[Action]:
        """The peer's first ``Bitfield``: the pieces it holds."""
        if bitfield.piece_count != self.piece_count:
            return self.violation(peer, "bitfield for a different piece count")
        session = self._sessions.get(peer)
        if session is not None:
            session.have = set(bitfield.pieces())
        return []

    def peer_ready(self, peer: PeerId, now: float) -> list[Action]:
        """Handshake, bitfield and hashes done: add the peer to the picker and fill its
        pipeline; a peer lacking some piece hears which pieces we hold (it may be a
        super-seeding seeder). A banned peer stays not ready (see ``is_ready``)."""
        session = self._sessions.get(peer)
        if session is None or session.have is None:
            return []
        have = session.have | session.early
        if not self.picker.add_peer(peer, have):
            return []
        actions: list[Action] = []
        if len(have) < self.piece_count and self.verified:
            mine = Bitfield.from_pieces(self.piece_count, self.verified)
            actions.append(Send(peer, (mine,)))
        session.ready, session.have, session.early = True, None, set()
        self._connecting_since.pop(peer, None)
        return actions + self._top_up(peer, now)

    def block(self, peer: PeerId, piece: Piece, now: float) -> list[Action]:
        """A ``Piece`` message: account for it, assemble its piece, verify a full piece.

        After the adapter has paced the bytes, it calls ``refill`` for this peer."""
        if not self.is_ready(peer):
            return self.violation(peer, "piece before it was requested")
        block = Block(piece.index, piece.begin, len(piece.data))
        if not self.picker.is_block(block):
            why = f"piece {block.index} at {block.begin}+{block.length} is no block"
            return self.violation(peer, why)
        self.bytes_received += block.length
        result = self.picker.block_received(peer, block, now)
        actions = self._cancels(result.cancels)
        if result.accepted:
            self.sources[peer] += block.length
            self._rate.append((now, block.length))
            assembly = self._assemble(peer, piece)
            if result.piece_complete:
                del self._assembly[piece.index]
                actions.append(Verify(assembly))
        return actions

    def refill(self, peer: PeerId, now: float) -> list[Action]:
        """Requests for ``peer`` if its pipeline drained enough since the last top-up
        (``refill_due``); topping up after every block would cost a picker scan each."""
        session = self._sessions.get(peer)
        if session is None:
            return []
        drained = session.asked - self.picker.in_flight(peer)
        return self._top_up(peer, now) if refill_due(drained, session.asked) else []

    def have(self, peer: PeerId, index: int, now: float) -> list[Action]:
        """A ``Have``: ``peer`` gained piece ``index``."""
        if not 0 <= index < self.piece_count:
            return self.violation(peer, f"Have for piece {index} out of range")
        session = self._sessions.get(peer)
        if session is None:
            return []
        if not session.ready:
            session.early.add(index)
            return []
        self.picker.peer_has(peer, index)
        return self._top_up(peer, now)

    def rejected(self, peer: PeerId, reason: int, text: str) -> None:
        """The peer ended the session with a ``Reject``. Refused as a non-member (or for
        a file it lacks), it is tried once more after ``retry_after``: its roster may be
        a moment old. Refused twice, it is not tried again for this download."""
        if reason not in (Reason.NOT_MEMBER, Reason.UNKNOWN_CONTENT):
            return
        if self._refused_once.pop(peer, None) is not None:
            self.refused[peer] = text
        else:
            self._refused_once[peer] = text

    def session_ended(self, peer: PeerId, now: float) -> list[Action]:
        """The session is over: its requests go to the other peers."""
        self._sessions.pop(peer, None)
        self._ended_at[peer] = now
        self.picker.remove_peer(peer)
        return self._top_up_all(now)

    def ban(self, peer: PeerId, why: str) -> list[Action]:
        """Drop ``peer`` and never use it again for this file."""
        self.banned.add(peer)
        self.picker.ban(peer)
        return [Ban(peer, why)]

    def violation(self, peer: PeerId, why: str) -> list[Action]:
        """``peer`` broke the protocol: it is banned and its session ends."""
        return [*self.ban(peer, why), Violation(peer, why)]

    # -- pieces ---------------------------------------------------------------------------

    def _assemble(self, peer: PeerId, msg: Piece) -> CompletePiece:
        length = self.picker.piece_length(msg.index)
        piece = self._assembly.get(msg.index)
        if piece is None:
            whole = msg.begin == 0 and len(msg.data) == length
            piece = CompletePiece(msg.index, msg.data if whole else bytearray(length))
            self._assembly[msg.index] = piece
        if isinstance(piece.data, bytearray):
            piece.data[msg.begin : msg.begin + len(msg.data)] = msg.data
        piece.senders[msg.begin] = peer
        return piece

    def piece_checked(self, piece: CompletePiece, good: bool, now: float) -> list[Action]:
        """The outcome of a ``Verify``: a good piece is written; a bad one is fetched again."""
        return self._verified(piece, now) if good else self._failed(piece, now)

    def _verified(self, piece: CompletePiece, now: float) -> list[Action]:
        index = piece.index
        actions = self._cancels(self.picker.piece_verified(index))
        first = not self.verified
        self.verified.add(index)
        self._progress_at = now
        actions += self._blame(piece)
        for key, session in self._sessions.items():  # a super-seeder offers what we lack
            if session.ready and key not in self.banned and not self.picker.is_seed(key):
                actions.append(Send(key, (Have(index),)))
        actions.append(Verified(index, first, len(self.verified)))
        # a verified piece may lift the picker's cap on pieces in flight
        return actions + self._top_up_all(now, idle_only=True)

    def _failed(self, piece: CompletePiece, now: float) -> list[Action]:
        senders = set(piece.senders.values())
        self.picker.piece_failed(piece.index)
        actions: list[Action] = []
        if len(senders) == 1:
            actions += self.ban(senders.pop(), f"piece {piece.index} failed its hash check")
        else:  # blame, once a good copy arrives, the senders whose blocks differ from it
            self._suspects[piece.index] = CompletePiece(
                piece.index, bytes(piece.data), piece.senders
            )
        return actions + self._top_up_all(now)

    def _blame(self, good: CompletePiece) -> list[Action]:
        bad = self._suspects.pop(good.index, None)
        if bad is None:
            return []
        size = self.picker.config.block_size
        view, ref = memoryview(bad.data), memoryview(good.data)
        actions: list[Action] = []
        for begin, peer in bad.senders.items():
            if view[begin : begin + size] != ref[begin : begin + size]:
                actions += self.ban(peer, f"a block of piece {good.index} was corrupt")
        return actions

    # -- requests ---------------------------------------------------------------------------

    def _cancels(self, cancels: Iterable[tuple[PeerId, Block]]) -> list[Action]:
        return [Send(peer, (Cancel(b.index, b.begin, b.length),)) for peer, b in cancels]

    def _note_arriving(self) -> None:
        for key, session in self._sessions.items():
            if session.ready:
                self.picker.note_arriving(key, self.links.arriving(key))

    def _top_up(self, peer: PeerId, now: float, *, note_arriving: bool = True) -> list[Action]:
        """Fill ``peer``'s pipeline from the picker. In the endgame the picker first
        learns what already waits in our buffers, unless the caller just told it."""
        session = self._sessions.get(peer)
        if session is None or not session.ready or not self.links.writable(peer):
            return []
        if note_arriving and self.picker.in_endgame:
            self._note_arriving()
        blocks = self.picker.next_requests(peer, now)
        session.asked = self.picker.in_flight(peer)
        if not blocks:
            return []
        return [Send(peer, tuple(Request(b.index, b.begin, b.length) for b in blocks))]

    def _top_up_all(self, now: float, *, idle_only: bool = False) -> list[Action]:
        if self.picker.in_endgame:
            self._note_arriving()  # once for all, not once per peer
        actions: list[Action] = []
        for key in list(self._sessions):
            if not idle_only or self.picker.in_flight(key) == 0:
                actions += self._top_up(key, now, note_arriving=False)
        return actions

    # -- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When ``handle_timer`` next has work: a request expires, progress is due to be
        saved, or the connections to be kept alive."""
        deadlines = [self._keepalive_at + self.config.keepalive_interval]
        expiry = self.picker.next_deadline()
        if expiry is not None:
            deadlines.append(expiry)
        if len(self.verified) != self._saved:
            deadlines.append(self._saved_at + self.config.save_interval)
        return min(deadlines)

    def handle_timer(self, now: float) -> list[Action]:
        """Expire overdue requests (cancel them, give their blocks to others), save the
        progress if it changed ``save_interval`` seconds after the last save, and send
        a Keepalive to every session every ``keepalive_interval`` seconds."""
        actions: list[Action] = []
        expired = self.picker.expire(now)
        if expired.timed_out:
            actions += self._cancels(expired.timed_out)
            actions += self._top_up_all(now)
        if now - self._saved_at >= self.config.save_interval and len(self.verified) != self._saved:
            self._saved, self._saved_at = len(self.verified), now
            actions.append(Save())
        if now - self._keepalive_at >= self.config.keepalive_interval:
            self._keepalive_at = now
            actions += [Send(key, (Keepalive(),)) for key in self._sessions]
        return actions
