"""The piece picker (transfer/picker.py): pure, literal times, seeded randomness."""

from __future__ import annotations

import random

import pytest

from dhtshare.transfer.picker import Block, PickerConfig, PiecePicker
from dhtshare.wire import Bitfield

A, B, C, D = b"A", b"B", b"C", b"D"


def make(lengths: list[int], seed: int = 0, **config: float) -> PiecePicker:
    cfg = PickerConfig(block_size=4, **config)  # type: ignore[arg-type]
    return PiecePicker(lengths, random.Random(seed), cfg)


def bits(count: int, *indices: int) -> list[int]:
    """The pieces a peer's Bitfield says it holds, as the download hands them over."""
    return Bitfield.from_pieces(count, indices).pieces()


def test_a_peer_with_a_piece_out_of_range_is_refused() -> None:
    picker = make([4, 4])
    with pytest.raises(ValueError, match="out of range"):
        picker.add_peer(A, [2])
    with pytest.raises(ValueError, match="out of range"):
        picker.add_peer(A, [-1])
    assert picker.add_peer(A, [0, 1]) and picker.availability(1) == 1


def test_blocks_of_a_piece() -> None:
    picker = make([10])
    assert picker.blocks(0) == [Block(0, 0, 4), Block(0, 4, 4), Block(0, 8, 2)]
    with pytest.raises(ValueError, match="wrong length"):
        picker.block_received(A, Block(0, 8, 4), now=0.0)
    with pytest.raises(ValueError, match="does not start"):
        picker.block_received(A, Block(0, 2, 4), now=0.0)
    with pytest.raises(ValueError, match="out of range"):
        picker.block_received(A, Block(1, 0, 4), now=0.0)


def test_rarest_first() -> None:
    picker = make([4, 4, 4, 4])
    picker.add_peer(A, bits(4, 0, 1, 2, 3))
    picker.add_peer(B, bits(4, 0, 1, 2))
    picker.add_peer(C, bits(4, 0, 1))
    assert [picker.availability(i) for i in range(4)] == [3, 3, 2, 1]
    # A has every piece (a seeder): it is asked only for what no other peer has
    assert picker.next_requests(A, now=0.0) == [Block(3, 0, 4)]
    assert picker.next_requests(B, now=0.0) in (
        [Block(2, 0, 4), Block(0, 0, 4)],
        [Block(2, 0, 4), Block(1, 0, 4)],
    )


def test_rarest_first_among_partial_peers() -> None:
    picker = make([4, 4, 4, 4])
    picker.add_peer(A, bits(4, 0, 1, 2))
    picker.add_peer(B, bits(4, 0, 1))
    asked = picker.next_requests(A, now=0.0)
    assert asked[0] == Block(2, 0, 4)  # the rarest first
    assert len(asked) == 2


def test_seeder_serves_others_pieces_when_no_partial_peer_can() -> None:
    picker = make([4, 4])
    picker.add_peer(A, bits(2, 0, 1))
    picker.add_peer(B, bits(2, 0))
    assert picker.next_requests(A, now=0.0) == [Block(1, 0, 4)]  # piece 0: B's
    picker.remove_peer(B)
    assert picker.next_requests(A, now=0.0) == [Block(0, 0, 4)]


def test_a_super_seeding_seeder_is_a_partial_peer_until_it_offers_everything() -> None:
    picker = make([4, 4, 4, 4])
    picker.add_peer(A, bits(4, 2))  # a super-seeding seeder: offered piece 2 only
    picker.add_peer(B, bits(4, 0, 1))
    assert not picker.is_seed(A)
    assert picker.next_requests(A, now=0.0) == [Block(2, 0, 4)]  # only what it offered
    for i in (0, 1, 3):  # its Have messages offer the rest
        picker.peer_has(A, i)
    assert picker.is_seed(A)
    # now it is a seeder: asked only for what no partial peer (B) has
    assert picker.next_requests(A, now=0.0) == [Block(3, 0, 4)]


def test_rarest_follows_have_messages() -> None:
    picker = make([4, 4, 4])
    picker.add_peer(A, bits(3, 0, 1, 2))
    picker.add_peer(B, bits(3, 0, 2))
    picker.peer_has(C, 0)  # unknown peer: ignored
    picker.add_peer(C)
    picker.peer_has(C, 0)
    picker.peer_has(C, 2)
    assert [picker.availability(i) for i in range(3)] == [3, 1, 3]
    assert picker.next_requests(A, now=0.0)[0] == Block(1, 0, 4)


def _order(seed: int) -> list[int]:
    picker = make([4] * 12, seed=seed, min_depth=12, max_depth=12)
    picker.add_peer(A, bits(12, *range(12)))
    return [b.index for b in picker.next_requests(A, now=0.0)]


def test_tie_break_is_random_but_seeded() -> None:
    assert _order(7) == _order(7)
    assert sorted(_order(7)) == list(range(12))
    orders = {tuple(_order(seed)) for seed in range(5)}
    assert len(orders) > 1  # the seed matters


def test_rare_piece_wins_whatever_the_seed() -> None:
    for seed in range(20):
        picker = make([4] * 6, seed=seed, min_depth=1, max_depth=1)
        picker.add_peer(A, bits(6, *range(6)))
        picker.add_peer(B, bits(6, 0, 1, 2, 3, 5))
        assert picker.next_requests(A, now=0.0) == [Block(4, 0, 4)]


def test_started_pieces_are_finished_first() -> None:
    picker = make([16, 16])  # four blocks per piece
    picker.add_peer(A, bits(2, 0, 1))
    picker.add_peer(B, bits(2, 0, 1))
    first = picker.next_requests(A, now=0.0)
    started = first[0].index
    assert [b.begin for b in first] == [0, 4]
    picker.add_peer(C, bits(2, started))  # the started piece is now the less rare one
    second = picker.next_requests(B, now=0.0)
    assert second == [Block(started, 8, 4), Block(started, 12, 4)]


def _deliver_all(picker: PiecePicker, peer: bytes, now: float) -> int:
    done = 0
    for block in picker.pending(peer):
        picker.block_received(peer, block, now)
        done += 1
    return done


def test_pipeline_depth_grows_with_throughput() -> None:
    picker = PiecePicker([64 * 1024] * 4000, random.Random(1), PickerConfig(block_size=16 * 1024))
    picker.add_peer(A, bits(4000, *range(4000)))
    assert len(picker.next_requests(A, now=0.0)) == 2
    depths = []
    for step in range(1, 11):
        now = step * 0.1  # every request answered within 100 ms
        _deliver_all(picker, A, now)
        depths.append(len(picker.next_requests(A, now)))
    assert depths == sorted(depths)
    assert depths[-1] > 2
    assert picker.depth(A, now=1.0) == picker.config.max_depth  # clamped
    # throughput is measured over a window: after a long silence, depth falls back
    _deliver_all(picker, A, 1.0)
    assert picker.depth(A, now=30.0) == picker.config.min_depth


def test_depth_formula() -> None:
    picker = PiecePicker(
        [1 << 20] * 8, random.Random(1), PickerConfig(block_size=1000, target_latency=2.0)
    )
    picker.add_peer(A, bits(8, *range(8)))
    picker.next_requests(A, now=0.0)
    for t in range(10):
        picker.block_received(A, picker.pending(A)[0], now=float(t))
        picker.next_requests(A, now=float(t))
    # 10 blocks of 1000 bytes in a 10 s window: 1000 B/s; 2 s of that is 2 blocks
    assert picker.throughput(A, now=10.0) == pytest.approx(1000.0)
    assert picker.depth(A, now=10.0) == 2
    for _ in range(20):
        picker.block_received(A, picker.pending(A)[0], now=10.0)
        picker.next_requests(A, now=10.0)
    assert picker.throughput(A, now=10.0) == pytest.approx(3000.0)  # 6 blocks in 2 s
    assert picker.depth(A, now=10.0) == 6


def test_peers_share_one_in_flight_budget_by_throughput() -> None:
    cfg = PickerConfig(block_size=1000, target_latency=2.0, max_depth=64, total_depth=16)
    picker = PiecePicker([1 << 20] * 8, random.Random(1), cfg)
    everything = bits(8, *range(8))
    picker.add_peer(A, everything)
    for _ in range(30):  # A alone, 30 kB/s: 60 blocks wanted, its own cap is 64
        picker.next_requests(A, now=0.0)
        picker.block_received(A, picker.pending(A)[0], now=0.5)
    assert picker.depth(A, now=1.0) == 60  # one peer is not held to the shared budget
    picker.add_peer(B, everything)
    picker.add_peer(C, everything)
    assert picker.depth(A, now=1.0) == 60  # peers that deliver nothing take no share
    for peer, count in ((B, 30), (C, 10)):  # B as fast as A, C a third of that
        for _ in range(count):
            picker.next_requests(peer, now=0.5)
            picker.block_received(peer, picker.pending(peer)[0], now=0.5)
    # 30 + 30 + 10 kB/s: shares of 16 blocks are 30/70, 30/70 and 10/70, rounded up
    assert [picker.depth(p, now=1.0) for p in (A, B, C)] == [7, 7, 3]
    picker.add_peer(D, everything)  # connected, nothing delivered yet: no share taken
    assert picker.depth(A, now=1.0) == 7
    assert picker.depth(D, now=1.0) == cfg.min_depth  # unknown peer: the least
    with pytest.raises(ValueError, match="total_depth"):
        PickerConfig(min_depth=4, total_depth=3)


def test_no_duplicates_before_endgame() -> None:
    picker = make([8, 8])
    picker.add_peer(A, bits(2, 0, 1))
    picker.add_peer(B, bits(2, 0, 1))
    a = picker.next_requests(A, now=0.0)
    b = picker.next_requests(B, now=0.0)
    assert not set(a) & set(b)
    assert len(a) == len(b) == 2


def test_endgame_duplicates_and_cancels() -> None:
    picker = make([8], endgame_margin=0)
    for peer in (A, B, C):
        picker.add_peer(peer, bits(1, 0))
    assert picker.next_requests(A, now=0.0) == [Block(0, 0, 4), Block(0, 4, 4)]
    # B (as fast as A, as far as we know) steals only the block at the end of A's queue
    assert picker.next_requests(B, now=0.0) == [Block(0, 4, 4)]
    assert picker.next_requests(C, now=0.0) == []  # no sooner than A, and two copies at most
    got = picker.block_received(B, Block(0, 4, 4), now=1.0)
    assert got.accepted
    assert not got.piece_complete
    assert got.cancels == ((A, Block(0, 4, 4)),)
    assert picker.pending(A) == [Block(0, 0, 4)]
    late = picker.block_received(A, Block(0, 4, 4), now=1.5)  # crossed our Cancel
    assert not late.accepted
    done = picker.block_received(A, Block(0, 0, 4), now=2.0)
    assert done.accepted
    assert done.piece_complete
    assert done.cancels == ()
    assert picker.pending(B) == []
    assert picker.piece_verified(0) == []
    assert picker.complete


def test_endgame_steals_from_the_tail_of_an_equal_peer() -> None:
    picker = make([4] * 8, min_depth=8, max_depth=8, endgame_margin=0)
    picker.add_peer(A, bits(8, *range(8)))
    picker.add_peer(B, bits(8, *range(8)))
    asked = picker.next_requests(A, now=0.0)
    assert len(asked) == 8
    stolen = picker.next_requests(B, now=0.0)
    assert stolen == asked[:3:-1]  # the last four, latest first: they meet in the middle


def test_blocks_another_peer_delivered_leave_the_pipeline() -> None:
    # The downloader refills a pipeline by how far it drained (refill_due): a block
    # cancelled because B delivered it first counts as drained at A, like one A sent.
    picker = make([4] * 8, min_depth=8, max_depth=8, endgame_margin=0)
    picker.add_peer(A, bits(8, *range(8)))
    picker.add_peer(B, bits(8, *range(8)))
    asked = picker.next_requests(A, now=0.0)
    stolen = picker.next_requests(B, now=0.0)
    assert (picker.in_flight(A), picker.in_flight(B)) == (8, len(stolen))
    picker.block_received(B, stolen[0], now=0.1)
    assert picker.in_flight(A) == 7  # withdrawn: the caller sends A a Cancel
    picker.block_received(A, asked[0], now=0.1)
    assert picker.in_flight(A) == 6
    assert picker.in_flight(C) == 0  # an unknown peer has nothing in flight


def test_endgame_margin_leaves_blocks_already_on_their_way() -> None:
    picker = make([4] * 8, min_depth=8, max_depth=8, endgame_margin=2)
    picker.add_peer(A, bits(8, *range(8)))
    picker.add_peer(B, bits(8, *range(8)))
    asked = picker.next_requests(A, now=0.0)
    assert picker.next_requests(B, now=0.0) == asked[:4:-1]


def test_endgame_leaves_blocks_already_in_our_buffers() -> None:
    picker = make([4] * 8, min_depth=8, max_depth=8, endgame_margin=0)
    picker.add_peer(A, bits(8, *range(8)))
    picker.add_peer(B, bits(8, *range(8)))
    asked = picker.next_requests(A, now=0.0)
    assert picker.in_endgame  # every block is asked for
    picker.note_arriving(A, 6 * 4)  # A's first six blocks already sit in our buffers
    # Two are still to come from A: B takes the last (they meet in the middle), where
    # without the note it would take four (test_endgame_steals_from_the_tail...).
    assert picker.next_requests(B, now=0.0) == [asked[7]]


def test_endgame_leaves_a_stalled_peers_blocks_that_are_already_here() -> None:
    picker = make([4] * 4, min_depth=4, max_depth=4)
    picker.add_peer(A, bits(4, *range(4)))
    asked = picker.next_requests(A, now=0.0)
    picker.add_peer(B, bits(4, *range(4)))
    picker.note_arriving(A, 2 * 4)  # A's first two blocks wait in our buffers, unread
    assert sorted(picker.next_requests(B, now=3.0)) == sorted(asked[2:])  # A stalled


def test_endgame_steals_everything_from_a_stalled_peer() -> None:
    picker = make([4] * 4, min_depth=4, max_depth=4)
    picker.add_peer(A, bits(4, *range(4)))
    asked = picker.next_requests(A, now=0.0)
    picker.add_peer(B, bits(4, *range(4)))
    assert picker.next_requests(B, now=0.5) == []  # A may still be on its way
    assert sorted(picker.next_requests(B, now=3.0)) == sorted(asked)  # A stalled


def test_timeout_reassigns_to_another_peer() -> None:
    picker = make([8, 8])
    picker.add_peer(A, bits(2, 0, 1))
    picker.add_peer(B, bits(2, 0, 1))
    asked = picker.next_requests(A, now=0.0)
    assert picker.next_deadline() == 5.0
    assert picker.expire(now=4.9).timed_out == ()
    expired = picker.expire(now=5.0)
    assert expired.timed_out == tuple((A, b) for b in asked)
    assert picker.pending(A) == []
    assert picker.next_requests(B, now=5.0) == asked
    assert picker.next_deadline() == 10.0


def test_timeout_scales_with_latency() -> None:
    picker = make([4] * 6, min_depth=1, max_depth=1)
    picker.add_peer(A, bits(6, *range(6)))
    first = picker.next_requests(A, now=0.0)
    picker.block_received(A, first[0], now=3.0)  # 3 s latency
    assert picker.request_timeout(A) == 12.0
    picker.next_requests(A, now=3.0)
    assert picker.expire(now=14.9).timed_out == ()
    assert len(picker.expire(now=15.0).timed_out) == 1


def test_late_block_after_timeout_still_counts() -> None:
    picker = make([8])
    picker.add_peer(A, bits(1, 0))
    picker.add_peer(B, bits(1, 0))
    picker.next_requests(A, now=0.0)
    picker.block_received(A, Block(0, 0, 4), now=1.0)  # keeps the piece started
    picker.expire(now=10.0)
    assert picker.next_requests(B, now=10.0) == [Block(0, 4, 4)]
    got = picker.block_received(A, Block(0, 4, 4), now=10.5)
    assert got.accepted
    assert got.piece_complete
    assert got.cancels == ((B, Block(0, 4, 4)),)


def test_repeated_timeouts_snub_a_peer() -> None:
    picker = make([4] * 10)
    picker.add_peer(A, bits(10, *range(10)))
    now = 0.0
    reports = []
    for _ in range(3):
        picker.next_requests(A, now)
        now += 5.0
        reports.append(picker.expire(now).snubbed)
    assert reports == [(), (), (A,)]
    assert picker.is_snubbed(A)
    assert len(picker.next_requests(A, now)) == 1  # one request at a time
    picker.block_received(A, picker.pending(A)[0], now + 1.0)
    assert not picker.is_snubbed(A)
    assert picker.depth(A, now + 1.0) >= 2


def test_remove_peer_frees_requests() -> None:
    picker = make([8])
    picker.add_peer(A, bits(1, 0))
    picker.add_peer(B, bits(1, 0))
    asked = picker.next_requests(A, now=0.0)
    picker.remove_peer(A)
    assert picker.availability(0) == 1
    assert picker.next_requests(B, now=1.0) == asked
    assert picker.add_peer(A, bits(1, 0))  # removal is not a ban


def test_ban_frees_requests_and_refuses_the_peer() -> None:
    picker = make([8])
    picker.add_peer(A, bits(1, 0))
    picker.add_peer(B, bits(1, 0))
    asked = picker.next_requests(A, now=0.0)
    picker.ban(A)
    assert picker.is_banned(A)
    assert not picker.add_peer(A, bits(1, 0))
    assert picker.next_requests(A, now=1.0) == []
    assert not picker.block_received(A, asked[0], now=1.0).accepted
    assert picker.availability(0) == 1
    assert picker.next_requests(B, now=1.0) == asked


def test_failed_piece_is_requested_again() -> None:
    picker = make([8, 4])
    picker.add_peer(A, bits(2, 0))
    picker.add_peer(B, bits(2, 0))
    for block in picker.next_requests(A, now=0.0):
        result = picker.block_received(A, block, now=1.0)
    assert result.piece_complete
    assert picker.next_requests(B, now=1.0) == []  # complete, awaiting verification
    assert picker.piece_failed(0) == frozenset({A})
    picker.ban(A)
    assert picker.next_requests(B, now=2.0) == [Block(0, 0, 4), Block(0, 4, 4)]
    assert not picker.has(0)


def test_unsolicited_block_for_unstarted_piece_is_refused() -> None:
    picker = make([8, 8])
    picker.add_peer(A, bits(2, 0, 1))
    assert not picker.block_received(A, Block(1, 0, 4), now=0.0).accepted
    assert not picker.block_received(D, Block(1, 0, 4), now=0.0).accepted  # unknown peer


def test_resume_marks_and_bitfield() -> None:
    picker = make([4, 4, 4, 4], min_depth=4, max_depth=4)
    picker.add_peer(A, bits(4, 0, 1, 2, 3))
    picker.mark_have(0)
    picker.mark_have(2)
    assert [i for i in range(4) if picker.has(i)] == [0, 2]
    assert picker.verified_count == 2
    assert sorted(b.index for b in picker.next_requests(A, now=0.0)) == [1, 3]
    assert picker.interesting(A)
    picker.piece_verified(1)
    picker.piece_verified(3)
    assert not picker.interesting(A)


def test_partial_pieces_in_flight_are_capped() -> None:
    picker = make([4] * 10, min_depth=8, max_depth=8, max_partial_bytes=12)
    picker.add_peer(A, bits(10, *range(10)))
    asked = picker.next_requests(A, now=0.0)
    assert len(asked) == 3  # 12 bytes / 4-byte pieces
    for block in asked:
        assert picker.block_received(A, block, now=1.0).piece_complete
    assert picker.next_requests(A, now=1.0) == []  # still unverified: still in flight
    picker.piece_verified(asked[0].index)
    assert len(picker.next_requests(A, now=1.0)) == 1


def test_cap_ignores_pieces_nobody_has() -> None:
    picker = make([8] * 4, min_depth=1, max_depth=1, max_partial_bytes=8)  # cap: 2 pieces
    picker.add_peer(A, bits(4, 0))
    picker.add_peer(B, bits(4, 1))
    for peer in (A, B):
        block = picker.next_requests(peer, now=0.0)[0]
        picker.block_received(peer, block, now=1.0)  # pieces 0 and 1 half received
    picker.add_peer(C, bits(4, 2, 3))
    assert picker.next_requests(C, now=1.0) == []  # cap reached
    picker.remove_peer(A)
    picker.remove_peer(B)
    # nobody left has pieces 0 and 1: they no longer hold C back
    assert picker.next_requests(C, now=2.0) in ([Block(2, 0, 4)], [Block(3, 0, 4)])
    picker.add_peer(D, bits(4, 0))
    assert picker.next_requests(D, now=2.0) == [Block(0, 4, 4)]  # the half piece resumes


def test_endgame_ignores_pieces_nobody_has() -> None:
    picker = make([8, 4], endgame_margin=0)
    picker.add_peer(A, bits(2, 0))
    picker.add_peer(B, bits(2, 0))
    assert picker.next_requests(A, now=0.0) == [Block(0, 0, 4), Block(0, 4, 4)]
    # piece 1 is missing everywhere; piece 0 is all requested, so endgame begins
    assert picker.next_requests(B, now=0.0) == [Block(0, 4, 4)]


def test_delivery_resets_the_timeout_count() -> None:
    picker = make([4] * 10, min_depth=1, max_depth=1)
    picker.add_peer(A, bits(10, *range(10)))
    now = 0.0
    for round_ in range(4):
        picker.next_requests(A, now)
        if round_ == 2:
            picker.block_received(A, picker.pending(A)[0], now + 1.0)
            picker.next_requests(A, now + 1.0)
        now += 10.0
        assert picker.expire(now).snubbed == ()
    assert not picker.is_snubbed(A)


def test_a_seeders_bitfield_counts_like_its_pieces_one_by_one() -> None:
    # add_peer with a whole bitfield takes the bulk path; Haves take the single one.
    # Both must leave the same rarest-first choices behind.
    count = 300
    bulk, single = make([1024] * count, seed=5), make([1024] * count, seed=5)
    for picker in (bulk, single):
        picker.add_peer(b"partial", bits(count, *range(0, count, 3)))
    bulk.add_peer(b"seed", bits(count, *range(count)))
    single.add_peer(b"seed", bits(count))
    for i in range(count):
        single.peer_has(b"seed", i)
    assert [bulk.availability(i) for i in range(count)] == [
        single.availability(i) for i in range(count)
    ]
    for picker in (bulk, single):  # the seed is asked only for what the other lacks
        asked = picker.next_requests(b"seed", 0.0)
        assert asked and all(block.index % 3 for block in asked)
    bulk.remove_peer(b"seed")
    assert [bulk.availability(i) for i in range(count)] == [
        1 if i % 3 == 0 else 0 for i in range(count)
    ]
    asked = bulk.next_requests(b"partial", 0.0)
    assert asked and all(block.index % 3 == 0 for block in asked)
