"""Group rules without a network: founding, paging, freshness, hand-over, leaves, requests."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from dhtshare import crypto
from dhtshare.errors import GroupError, RecordError
from dhtshare.groups import rules
from dhtshare.identity import Identity
from dhtshare.records import (
    INLINE_MEMBERS,
    PAGE_MEMBERS,
    Decision,
    DirectoryEntry,
    Handover,
    JoinRequest,
    Leave,
    Member,
    Roster,
    RosterPage,
    SignedRecord,
    sign_record,
    verify_record,
)

NOW = 1_800_000_000.0
OWNER = Identity.generate("owner")
ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")


def founded(public: bool = False) -> tuple[Roster, tuple[Member, ...]]:
    return rules.found_group(OWNER, "climbers", now=NOW, nonce=b"\x07" * 16, public=public)


def signed(who: Identity, body: object, seq: int = 1, at: float = NOW) -> SignedRecord:
    return sign_record(who, body, seq=seq, now=at, ttl=3600)  # type: ignore[arg-type]


def people(n: int, start: int = 1) -> tuple[Member, ...]:
    return tuple(Member(os.urandom(32), f"m{i}", int(NOW) + start + i) for i in range(n))


def view_of(
    base: Roster, members: tuple[Member, ...], seq: int = 1, signer: Identity = OWNER
) -> rules.RosterView:
    roster, pages = rules.layout(base, members, seq)
    rec = signed(signer, roster, seq)
    page_recs = {p.index: [signed(signer, p, seq)] for p in pages}
    return rules.resolve_pages(rec, roster, page_recs)


def test_founding_roster_verifies_and_owner_is_member_since_creation() -> None:
    roster, members = founded()
    rec = signed(OWNER, roster)
    assert verify_record(rec, NOW) == roster
    assert roster.owner == OWNER.public
    assert rules.member_since(members, {}, OWNER.public) == int(NOW)
    other, _ = rules.found_group(OWNER, "climbers", now=NOW, nonce=b"\x08" * 16)
    assert other.group_id != roster.group_id  # the nonce makes every group distinct


def test_small_group_needs_no_pages() -> None:
    base, owner = founded()
    roster, pages = rules.layout(base, owner + people(INLINE_MEMBERS - 1), 3)
    assert pages == () and roster.page_digests == ()
    assert roster.total_members == INLINE_MEMBERS


def test_thousand_members_page_and_resolve() -> None:
    base, owner = founded()
    everyone = owner + people(999)
    view = view_of(base, everyone, seq=9)
    expected_pages = -(-(1000 - INLINE_MEMBERS) // PAGE_MEMBERS)
    assert len(view.roster.page_digests) == expected_pages
    assert view.members == everyone


def test_pages_must_match_digest_seq_and_signer() -> None:
    base, owner = founded()
    everyone = owner + people(INLINE_MEMBERS + 5)
    roster, pages = rules.layout(base, everyone, 4)
    rec = signed(OWNER, roster, 4)
    page = pages[0]
    tampered = replace(page, members=(*page.members[:-1], Member(os.urandom(32), "x", 1)))
    old_seq = replace(page, roster_seq=3)
    for bad in (
        signed(OWNER, tampered, 4),  # digest differs
        signed(OWNER, old_seq, 3),  # bound to another roster version
        signed(ALICE, page, 4),  # right bytes, wrong signer
    ):
        with pytest.raises(GroupError, match="page 0 is missing"):
            rules.resolve_pages(rec, roster, {0: [bad]})
    good = rules.resolve_pages(rec, roster, {0: [signed(ALICE, page, 4), signed(OWNER, page, 4)]})
    assert good.members == everyone


def test_layout_refuses_more_than_the_limit() -> None:
    base, _ = founded()
    fake = [Member(i.to_bytes(32, "big"), "", 1) for i in range(rules.MAX_MEMBERS + 1)]
    with pytest.raises(GroupError, match="at most"):
        rules.layout(base, fake, 1)


def test_pick_roster_prefers_highest_seq_and_refuses_rollback() -> None:
    base, owner = founded()
    r1, _ = rules.layout(base, owner, 1)
    r2, _ = rules.layout(base, owner + people(1), 2)
    recs = [signed(OWNER, r1, 1), signed(OWNER, r2, 2)]
    rec, body = rules.pick_roster(recs, base.group_id, NOW, None)
    assert rec.seq == 2 and body == r2
    known = rules.Known(2, 0, rules.chain_digest(()))
    with pytest.raises(rules.StaleRosterError):
        rules.pick_roster(recs[:1], base.group_id, NOW, known)
    assert rules.pick_roster(recs, base.group_id, NOW, known)[0].seq == 2


def test_pick_roster_ignores_forged_and_foreign_rosters() -> None:
    base, owner = founded()
    roster, _ = rules.layout(base, owner, 5)
    other, _ = rules.found_group(OWNER, "other", now=NOW, nonce=b"\x09" * 16)
    forged = signed(ALICE, roster, 50)  # not the owner
    foreign = signed(OWNER, other, 60)  # another group
    with pytest.raises(GroupError, match="no valid roster"):
        rules.pick_roster([forged, foreign], base.group_id, NOW, None)
    assert rules.pick_roster([forged, foreign, signed(OWNER, roster, 5)], base.group_id, NOW, None)


def handed_over() -> tuple[Roster, tuple[Member, ...], rules.RosterView]:
    base, owner = founded()
    alice = Member(ALICE.public, "alice", int(NOW) + 5)
    members = (*owner, alice, Member(BOB.public, "bob", int(NOW) + 9))
    view = view_of(base, members, seq=3)
    h = rules.sign_handover(OWNER, view.roster, ALICE.public, NOW + 20)
    nxt, rest = rules.take_over(view.roster, view.members, h)
    return nxt, rest, view


def test_heir_is_longest_standing_other_member_tie_by_key() -> None:
    _, owner = founded()
    a = Member(b"\x02" * 32, "a", 10)
    b = Member(b"\x01" * 32, "b", 10)
    c = Member(b"\x00" * 32, "c", 11)
    assert rules.heir_of((*owner, a, b, c), OWNER.public) == b
    assert rules.heir_of(owner, OWNER.public) is None


def test_take_over_extends_chain_and_removes_old_owner() -> None:
    nxt, rest, _ = handed_over()
    assert nxt.owner == ALICE.public
    assert OWNER.public not in {m.key for m in rest}
    roster, _ = rules.layout(nxt, rest, 4)
    rec = signed(ALICE, roster, 4)
    assert verify_record(rec, NOW) == roster  # the heir may now sign
    with pytest.raises(RecordError, match="owner"):
        verify_record(signed(OWNER, roster, 5), NOW)  # the old owner may not


def test_forged_handover_is_refused() -> None:
    base, owner = founded()
    members = (*owner, Member(ALICE.public, "alice", 5))
    view = view_of(base, members)
    message = Handover.message(base.group_id, 0, ALICE.public, int(NOW))
    forged = Handover(ALICE.public, int(NOW), crypto.sign(ALICE.signing_key, "handover", message))
    assert not rules.valid_handover(view.roster, forged)
    with pytest.raises(GroupError, match="not signed by the current owner"):
        rules.take_over(view.roster, view.members, forged)
    with pytest.raises(GroupError, match="only the owner"):
        rules.sign_handover(ALICE, view.roster, ALICE.public, NOW)


def test_reader_refuses_a_chain_that_does_not_extend_the_known_one() -> None:
    nxt, rest, old_view = handed_over()
    new_roster, _ = rules.layout(nxt, rest, 4)
    new_rec = signed(ALICE, new_roster, 4)
    known = rules.pick_roster([new_rec], nxt.group_id, NOW, None)
    assert known[0].seq == 4
    k = rules.Known(4, 1, rules.chain_digest(nxt.handovers))
    # the former owner signs a higher version with the old chain: a fork, refused
    fork = signed(OWNER, old_view.roster, 99)
    with pytest.raises(GroupError, match="no valid roster"):
        rules.pick_roster([fork], nxt.group_id, NOW, k)
    assert rules.pick_roster([fork, new_rec], nxt.group_id, NOW, k)[0] == new_rec


def test_leave_after_join_removes_member_and_rejoin_is_later() -> None:
    members = people(3)
    leaver = members[1]
    leaves = {leaver.key: leaver.since}
    assert rules.member_since(members, leaves, leaver.key) is None
    assert rules.member_since(members, leaves, members[0].key) == members[0].since
    assert rules.apply_leaves(members, leaves) == (members[0], members[2])
    old_leave = {leaver.key: leaver.since - 1}  # a leave from an earlier membership
    assert rules.member_since(members, old_leave, leaver.key) == leaver.since
    rest = rules.apply_leaves(members, leaves)
    back = rules.accept_member(rest, leaver.key, "again", NOW, left_at=int(NOW) + 100)
    assert back[-1].since == int(NOW) + 101
    assert rules.member_since(back, {leaver.key: int(NOW) + 100}, leaver.key) == int(NOW) + 101


def test_accept_and_remove_refuse_nonsense() -> None:
    _, owner = founded()
    with pytest.raises(GroupError, match="already"):
        rules.accept_member(owner, OWNER.public, "me", NOW)
    with pytest.raises(GroupError, match="owner cannot remove"):
        rules.remove_member(owner, OWNER.public, OWNER.public)
    with pytest.raises(GroupError, match="not a member"):
        rules.remove_member(owner, ALICE.public, OWNER.public)


def test_latest_leaves_keeps_newest_per_signer() -> None:
    gid = founded()[0].group_id
    a1 = signed(ALICE, Leave(gid), 1, NOW)
    a2 = signed(ALICE, Leave(gid), 2, NOW + 50)
    other = signed(BOB, Leave(os.urandom(32)), 1)
    out = rules.latest_leaves([a2, a1, other], gid)
    assert out == {ALICE.public: a2}


def test_pending_requests_and_status() -> None:
    base, owner = founded()
    view = view_of(base, owner)
    gid = base.group_id
    ra = signed(ALICE, JoinRequest(gid, "alice", "hi"), at=NOW)
    rb = signed(BOB, JoinRequest(gid, "bob"), at=NOW + 1)
    mine = signed(OWNER, JoinRequest(gid, "me"))
    rejected_b = signed(OWNER, Decision(gid, BOB.public, False, "no"), at=NOW + 2)
    forged = signed(ALICE, Decision(gid, ALICE.public, False, "fake"), at=NOW + 2)
    pending = rules.pending_requests(
        [ra, rb, mine], [rejected_b, forged], view.roster, view.members, {}
    )
    assert [(p.requester, p.name, p.message) for p in pending] == [(ALICE.public, "alice", "hi")]
    # a request made again after the rejection is pending again
    rb2 = signed(BOB, JoinRequest(gid, "bob"), seq=2, at=NOW + 3)
    assert len(rules.pending_requests([ra, rb2], [rejected_b], view.roster, view.members, {})) == 2
    decisions = [rejected_b, forged]
    assert rules.join_status(BOB.public, int(NOW) + 1, view, {}, decisions) == ("rejected", "no")
    assert rules.join_status(ALICE.public, int(NOW), view, {}, decisions) == ("pending", "")
    assert rules.join_status(ALICE.public, None, view, {}, decisions) == ("none", "")
    assert rules.join_status(OWNER.public, None, view, {}, decisions) == ("accepted", "")


def test_directory_entry_checks() -> None:
    base, owner = founded(public=True)
    members = owner + people(20)
    view = view_of(base, members)
    gid = base.group_id
    good = DirectoryEntry(gid, "climbers", 21)
    assert rules.directory_entry_is_plausible(good, OWNER.public, view, {})
    assert not rules.directory_entry_is_plausible(good, ALICE.public, view, {})
    assert not rules.directory_entry_is_plausible(
        replace(good, member_count=500), OWNER.public, view, {}
    )
    assert not rules.directory_entry_is_plausible(
        replace(good, name="other"), OWNER.public, view, {}
    )
    assert not rules.directory_entry_is_plausible(
        replace(good, withdrawn=True), OWNER.public, view, {}
    )
    private = view_of(replace(base, public=False), members)
    assert not rules.directory_entry_is_plausible(good, OWNER.public, private, {})


def test_roster_page_record_keys_differ_per_index() -> None:
    gid = founded()[0].group_id
    a = signed(OWNER, RosterPage(gid, 1, 0, ()))
    b = signed(OWNER, RosterPage(gid, 1, 1, ()))
    assert a.dht_key != b.dht_key


def test_request_older_than_its_leave_is_not_pending() -> None:
    base, owner = founded()
    view = view_of(base, owner)
    ra = signed(ALICE, JoinRequest(base.group_id, "alice"), at=NOW)
    left = {ALICE.public: int(NOW) + 5}
    assert rules.pending_requests([ra], [], view.roster, view.members, left) == []
    again = signed(ALICE, JoinRequest(base.group_id, "alice"), seq=2, at=NOW + 6)
    assert len(rules.pending_requests([again], [], view.roster, view.members, left)) == 1


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "needs a name"),
        (" \t ", "needs a name"),
        ("a\tb", "control characters"),
        ("a\x85b", "control characters"),
        ("x" * 65, "at most 64 bytes of UTF-8 \\(this one has 65\\)"),
    ],
)
def test_bad_group_names_are_refused_with_a_hint(name: str, match: str) -> None:
    with pytest.raises(GroupError, match=match) as caught:
        rules.found_group(OWNER, name, now=NOW, nonce=b"\x07" * 16)
    assert caught.value.hint


def test_group_names_are_stripped_and_may_use_the_whole_limit() -> None:
    roster, _ = rules.found_group(OWNER, "  climbers\n", now=NOW, nonce=b"\x07" * 16)
    assert roster.genesis.name == "climbers"
    assert rules.check_group_name("ü" * 32) == "ü" * 32  # 64 bytes
    assert rules.check_group_name("grimpeurs 🧗") == "grimpeurs 🧗"


def test_long_texts_are_refused_with_a_hint() -> None:
    rules.check_text("m" * 280, "join message")
    with pytest.raises(GroupError, match="reason is at most 280 bytes") as caught:
        rules.check_text("€" * 94, "reason")  # 282 bytes
    assert caught.value.hint == "shorten the reason"
