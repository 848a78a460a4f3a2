"""The download's pure core (transfer/swarm.py): events in, actions out, literal times.

Files here are tiny: pieces of 8 bytes in blocks of 4, so each action can be spelled out.
"""

from __future__ import annotations

import random

from dhtshare.transfer.picker import PickerConfig
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
from dhtshare.wire import Bitfield, Cancel, Have, Keepalive, Piece, Reason, Request

A, B, ME = b"A" * 32, b"B" * 32, b"M" * 32
GOOD, BAD = b"good", b"evil"


class Links:
    """The adapter's answers, as a table: closed connections and bytes in our buffers."""

    def __init__(self) -> None:
        self.closed: set[bytes] = set()
        self.buffered: dict[bytes, int] = {}

    def writable(self, peer: bytes) -> bool:
        return peer not in self.closed

    def arriving(self, peer: bytes) -> int:
        return self.buffered.get(peer, 0)


def make(pieces: int = 1, piece: int = 8, **picker: float) -> Swarm:
    cfg = SwarmConfig(picker=PickerConfig(block_size=4, **picker))  # type: ignore[arg-type]
    swarm = Swarm("f.bin", [piece] * pieces, ME, Links(), config=cfg, rng=random.Random(0))
    swarm.start_picking((bytes(32),) * pieces)  # the swarm keeps hashes, never reads them
    return swarm


def addr(peer: bytes) -> ProviderAddr:
    return ProviderAddr(peer, "127.0.0.1", 7000 + peer[0])


def connect(swarm: Swarm, *peers: bytes, now: float = 0.0) -> None:
    swarm.providers_found([addr(p) for p in peers], now)
    assert swarm.connect(now) == [Connect(addr(p)) for p in peers]


def ready(swarm: Swarm, peer: bytes, pieces: list[int], now: float) -> list[Action]:
    assert swarm.bitfield(peer, Bitfield.from_pieces(swarm.piece_count, pieces)) == []
    return swarm.peer_ready(peer, now)


def completed(actions: list[Action]) -> CompletePiece:
    """The piece the last action asks to verify."""
    last = actions[-1]
    assert isinstance(last, Verify)
    return last.piece


def sent(actions: list[Action]) -> list[int]:
    """How many messages each action sends (every action must be a Send)."""
    assert all(isinstance(a, Send) for a in actions)
    return [len(a.messages) for a in actions if isinstance(a, Send)]


def asks(*blocks: tuple[int, int]) -> tuple[Request, ...]:
    return tuple(Request(index, begin, 4) for index, begin in blocks)


def cancel(peer: bytes, index: int, begin: int) -> Send:
    return Send(peer, (Cancel(index, begin, 4),))


def test_a_bad_piece_from_one_sender_bans_it_and_it_is_never_tried_again() -> None:
    swarm = make()
    connect(swarm, A, B)
    assert ready(swarm, A, [0], now=0.0) == [Send(A, asks((0, 0), (0, 4)))]
    assert ready(swarm, B, [0], now=0.0) == []  # all asked of A; not worth a duplicate yet
    assert swarm.block(A, Piece(0, 0, BAD), now=1.0) == []
    done = swarm.block(A, Piece(0, 4, GOOD), now=1.0)
    assert done == [Verify(CompletePiece(0, bytearray(BAD + GOOD), {0: A, 4: A}))]

    after = swarm.piece_checked(completed(done), False, now=1.5)
    assert after == [Ban(A, "piece 0 failed its hash check"), Send(B, asks((0, 0), (0, 4)))]
    assert swarm.banned == {A} and swarm.picker.is_banned(A)
    assert swarm.session_ended(A, now=2.0) == []
    assert swarm.connect(now=100.0) == []  # banned: never connected again


def test_a_bad_piece_from_several_senders_bans_the_one_whose_block_differs() -> None:
    swarm = make()
    connect(swarm, A, B)
    ready(swarm, A, [0], now=0.0)
    ready(swarm, B, [0], now=0.0)
    assert swarm.block(A, Piece(0, 0, GOOD), now=1.0) == []
    # B answers a block asked of A (a late answer counts): A's copy is cancelled
    done = swarm.block(B, Piece(0, 4, BAD), now=1.0)
    assert done[0] == cancel(A, 0, 4)
    bad = CompletePiece(0, bytearray(GOOD + BAD), {0: A, 4: B})
    assert done[1:] == [Verify(bad)]
    refetch = swarm.piece_checked(bad, False, now=1.0)
    assert not any(isinstance(action, Ban) for action in refetch)  # who lied is not known yet
    assert swarm.banned == set()

    swarm.block(A, Piece(0, 0, GOOD), now=2.0)
    good = CompletePiece(0, bytearray(GOOD + GOOD), {0: A, 4: A})
    assert swarm.block(A, Piece(0, 4, GOOD), now=2.0)[-1] == Verify(good)
    verified = swarm.piece_checked(good, True, now=2.0)
    assert verified == [Ban(B, "a block of piece 0 was corrupt"), Verified(0, True, 1)]
    assert swarm.banned == {B} and swarm.done


def test_endgame_steals_a_stalled_peers_blocks_and_the_first_copy_cancels_the_other() -> None:
    swarm = make()
    connect(swarm, A, B)
    ready(swarm, A, [0], now=0.0)
    # A has delivered nothing for 3 s: in the endgame, B is asked for the same blocks
    assert ready(swarm, B, [0], now=3.0) == [Send(B, asks((0, 0), (0, 4)))]
    assert swarm.block(B, Piece(0, 0, GOOD), now=3.5) == [cancel(A, 0, 0)]
    assert swarm.block(B, Piece(0, 4, GOOD), now=3.5)[0] == cancel(A, 0, 4)
    assert swarm.picker.in_flight(A) == 0
    # A's copy, cancelled too late, arrives anyway: counted, never accepted twice
    assert swarm.block(A, Piece(0, 0, GOOD), now=4.0) == []
    assert swarm.sources == {B: 8} and swarm.bytes_received == 12


def test_blocks_already_in_our_buffers_are_not_stolen() -> None:
    swarm = make()
    links = swarm.links
    assert isinstance(links, Links)
    connect(swarm, A, B)
    ready(swarm, A, [0], now=0.0)
    links.buffered[A] = 4  # A's first block has reached us, unread
    assert ready(swarm, B, [0], now=3.0) == [Send(B, asks((0, 4)))]


def test_a_stalled_peers_requests_expire_at_its_deadline_and_go_to_another() -> None:
    swarm = make()
    connect(swarm, B, A)  # B first: it is topped up first when requests come free
    ready(swarm, A, [0], now=0.0)
    # B joins before A could be called stalled, and not fast enough to steal from it
    assert ready(swarm, B, [0], now=0.5) == []
    assert swarm.next_deadline() == 5.0  # min_timeout after A was asked
    assert swarm.handle_timer(4.99) == []
    assert swarm.handle_timer(5.0) == [
        cancel(A, 0, 0),
        cancel(A, 0, 4),
        Send(B, asks((0, 0), (0, 4))),
    ]
    assert swarm.picker.pending(A) == [] and swarm.next_deadline() == 10.0


def test_a_peer_that_delivers_nothing_takes_no_share_of_the_budget() -> None:
    swarm = make(pieces=16, piece=16, total_depth=8)
    connect(swarm, A, B)
    everything = list(range(16))
    ready(swarm, A, everything, now=0.0)
    ready(swarm, B, everything, now=0.0)
    assert swarm.picker.in_flight(B) == 2  # min_depth, for a peer not measured yet
    now = 0.0
    for _ in range(10):  # A: a block every 0.1 s, 40 bytes/s over the first second
        now += 0.1
        block = swarm.picker.pending(A)[0]
        swarm.block(A, Piece(block.index, block.begin, GOOD), now)
        swarm.refill(A, now)
    # 2 s of A's throughput is 20 blocks, far above the budget of 8: B takes no share
    assert swarm.picker.depth(A, now) == 20
    assert swarm.picker.in_flight(A) == 14  # refilled at 0.8 s, when 14 were wanted
    assert swarm.picker.depth(B, now) == 2
    block = swarm.picker.pending(B)[0]
    swarm.block(B, Piece(block.index, block.begin, GOOD), now)  # B delivers 4 bytes/s
    # now A's share of 8 is 40/44 of it, rounded up
    assert swarm.picker.depth(A, now) == 8


def test_a_pipeline_is_refilled_once_it_drained_enough() -> None:
    swarm = make(pieces=8, min_depth=4, max_depth=4)
    connect(swarm, A)
    first = ready(swarm, A, list(range(8)), now=0.0)
    assert sent(first) == [4]
    blocks = swarm.picker.pending(A)
    swarm.block(A, Piece(blocks[0].index, blocks[0].begin, GOOD), now=1.0)
    assert swarm.refill(A, now=1.0) == []  # one of four drained: not yet
    swarm.block(A, Piece(blocks[1].index, blocks[1].begin, GOOD), now=1.0)
    assert sent(swarm.refill(A, now=1.0)) == [2]  # half of a shallow pipeline: two more


def test_nobody_serving_fails_the_download_after_provider_timeout() -> None:
    swarm = make()
    connect(swarm, A, now=0.0)  # connecting, never ready
    assert swarm.update_stall(59.9) is None
    error = swarm.update_stall(60.0)
    assert error is not None
    assert error.message == "no providers for f.bin (nobody served it for 60 s)"


def test_providers_none_could_reach_fail_with_the_relay_hint() -> None:
    """Listed, but every connection failed (a sharer behind a router with no relay)."""
    swarm = make()
    connect(swarm, A, now=0.0)
    swarm.session_ended(A, now=1.0)  # the connection failed
    assert swarm.update_stall(59.9) is None
    error = swarm.update_stall(60.0)
    assert error is not None
    assert error.message == (
        "no providers for f.bin (nobody served it for 60 s: 1 listed, none connected now)"
    )
    assert "relay" in error.hint


def test_a_peer_that_serves_keeps_the_download_alive_and_its_ban_is_counted() -> None:
    swarm = make(pieces=2)
    connect(swarm, A, B)
    ready(swarm, A, [0, 1], now=0.0)
    assert swarm.update_stall(100.0) is None  # A has pieces we lack: the stall clock restarts
    swarm.ban(B, "bad data")
    swarm.session_ended(A, now=120.0)
    assert swarm.update_stall(159.9) is None
    error = swarm.update_stall(160.0)
    assert error is not None and error.message.endswith(
        "(nobody served it for 60 s; 1 dropped for bad data or protocol errors)"
    )


def test_a_provider_that_refuses_twice_is_given_up_and_the_download_fails() -> None:
    swarm = make()
    connect(swarm, A, now=0.0)
    swarm.rejected(A, Reason.NOT_MEMBER, "you are not a member")
    swarm.session_ended(A, now=1.0)
    assert swarm.connect(now=5.99) == []  # retry_after: 5 s
    assert swarm.update_stall(5.99) is None  # refused once: its roster may be a moment old
    assert swarm.connect(now=6.0) == [Connect(addr(A))]
    swarm.rejected(A, Reason.NOT_MEMBER, "you are not a member")
    swarm.session_ended(A, now=7.0)
    error = swarm.update_stall(7.0)
    assert error is not None
    assert error.message == "every provider of f.bin refused us: you are not a member"
    assert swarm.connect(now=100.0) == []


def test_protocol_violations_ban_the_peer_and_end_its_session() -> None:
    swarm = make(pieces=2)
    connect(swarm, A, B)
    why = "piece before it was requested"
    assert swarm.block(A, Piece(0, 0, GOOD), now=0.0) == [Ban(A, why), Violation(A, why)]
    why = "bitfield for a different piece count"
    assert swarm.bitfield(B, Bitfield.from_pieces(3, [0])) == [Ban(B, why), Violation(B, why)]
    assert swarm.banned == {A, B}


def test_a_block_that_is_no_block_and_a_have_out_of_range_are_violations() -> None:
    swarm = make(pieces=2)
    connect(swarm, A, B)
    ready(swarm, A, [0], now=0.0)
    ready(swarm, B, [0], now=0.0)
    why = "piece 0 at 2+4 is no block"
    assert swarm.block(A, Piece(0, 2, GOOD), now=1.0) == [Ban(A, why), Violation(A, why)]
    why = "Have for piece 2 out of range"
    assert swarm.have(B, 2, now=1.0) == [Ban(B, why), Violation(B, why)]


def test_haves_before_ready_count_and_a_partial_peer_hears_what_we_hold() -> None:
    swarm = make(pieces=3, min_depth=4)
    swarm.restore([0])
    swarm.start_picking((bytes(32),) * 3)
    connect(swarm, A)
    assert swarm.have(A, 2, now=0.0) == []  # before its Bitfield: remembered
    actions = ready(swarm, A, [1], now=0.0)
    assert actions[0] == Send(A, (Bitfield.from_pieces(3, [0]),))  # it may super-seed
    requests = actions[1]
    assert isinstance(requests, Send) and len(actions) == 2
    assert set(requests.messages) == set(asks((1, 0), (1, 4), (2, 0), (2, 4)))
    assert swarm.picker.availability(2) == 1 and swarm.peers == 1


def test_a_verified_piece_is_announced_to_partial_peers_only() -> None:
    swarm = make(pieces=2)
    connect(swarm, A, B)
    ready(swarm, A, [0, 1], now=0.0)  # a seed
    ready(swarm, B, [0], now=0.0)
    blocks = swarm.picker.pending(A)
    for block in blocks[:2]:
        actions = swarm.block(A, Piece(block.index, block.begin, GOOD), now=1.0)
    piece = completed(actions)
    verified = swarm.piece_checked(piece, True, now=1.0)
    assert verified[:2] == [Send(B, (Have(piece.index),)), Verified(piece.index, True, 1)]
    assert swarm.bytes_done == 8


def test_progress_is_saved_every_save_interval_and_connections_kept_alive() -> None:
    swarm = make(pieces=2)
    connect(swarm, A)
    assert swarm.next_deadline() == 20.0  # only the keepalive: nothing to save
    swarm.restore([0])  # as if a piece was verified since the last save
    assert swarm.next_deadline() == 20.0  # a restored state is the saved one
    ready(swarm, A, [1], now=0.0)
    swarm.block(A, Piece(1, 0, GOOD), now=1.0)
    done = swarm.block(A, Piece(1, 4, GOOD), now=1.0)
    swarm.piece_checked(completed(done), True, now=1.0)
    assert swarm.next_deadline() == 2.0  # save_interval after the start
    assert swarm.handle_timer(2.0) == [Save()]
    assert swarm.next_deadline() == 20.0
    assert swarm.handle_timer(20.0) == [Send(A, (Keepalive(),))]
    assert swarm.next_deadline() == 40.0


def test_a_closed_connection_is_not_asked_for_blocks() -> None:
    swarm = make()
    links = swarm.links
    assert isinstance(links, Links)
    links.closed.add(A)
    connect(swarm, A)
    assert ready(swarm, A, [0], now=0.0) == []
    assert swarm.picker.in_flight(A) == 0
