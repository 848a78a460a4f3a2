"""Group rules, pure: founding, roster layout and paging, hand-over, leaves, freshness.

Nothing here reads a clock or touches the network: every function takes ``now`` (unix
seconds) or the records it judges. ``service.py`` fetches and publishes; this module decides.

A group's truth is its latest roster record (``records.Roster`` in a ``SignedRecord``): the
envelope's ``seq`` is the roster version, the signer is the owner at the end of the hand-over
chain, and members beyond ``INLINE_MEMBERS`` live in ``RosterPage`` records bound to that
version by digest. A ``RosterView`` is one such roster with its pages resolved and checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from dhtshare import crypto
from dhtshare.errors import GroupError, OwnershipForkError, RecordError, StaleRosterError
from dhtshare.identity import Identity
from dhtshare.records import (
    INLINE_MEMBERS,
    MAX_HANDOVERS,
    MAX_NAME,
    MAX_PAGES,
    MAX_TEXT,
    PAGE_MEMBERS,
    Decision,
    DirectoryEntry,
    Genesis,
    Handover,
    JoinRequest,
    Leave,
    Member,
    Roster,
    RosterPage,
    SignedRecord,
    verify_record,
)

__all__ = [
    "MAX_MEMBERS",
    "JoinStatus",
    "Known",
    "PendingRequest",
    "RosterView",
    "accept_member",
    "apply_leaves",
    "chain_digest",
    "check_fresh",
    "check_group_name",
    "check_text",
    "directory_entry_is_plausible",
    "found_group",
    "heir_of",
    "join_status",
    "latest_leaves",
    "layout",
    "member_since",
    "pending_requests",
    "pick_roster",
    "remove_member",
    "resolve_pages",
    "sign_handover",
    "take_over",
    "valid_handover",
]

MAX_MEMBERS = INLINE_MEMBERS + MAX_PAGES * PAGE_MEMBERS
JoinStatus = Literal["none", "pending", "accepted", "rejected"]


@dataclass(frozen=True, slots=True)
class Known:
    """What a reader remembers of a group: the highest roster seq and its hand-over chain."""

    seq: int
    chain_length: int
    chain: bytes  # chain_digest of the first chain_length hand-overs


@dataclass(frozen=True, slots=True)
class RosterView:
    """A verified roster record with every member, its pages resolved and checked."""

    record: SignedRecord
    roster: Roster
    members: tuple[Member, ...]

    @property
    def group_id(self) -> bytes:
        return self.roster.group_id

    @property
    def name(self) -> str:
        return self.roster.genesis.name

    @property
    def owner(self) -> bytes:
        return self.roster.owner

    @property
    def seq(self) -> int:
        return self.record.seq

    @property
    def known(self) -> Known:
        """What a reader should remember after verifying this view."""
        hs = self.roster.handovers
        return Known(self.seq, len(hs), chain_digest(hs))


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A join request the owner has not decided yet."""

    requester: bytes
    name: str
    message: str
    issued: int


# ------------------------------------------------------------------------------ founding


def check_group_name(name: str) -> str:
    """``name`` without surrounding whitespace; ``GroupError`` if that is empty, holds a
    control character (a line break, a tab) or is longer than ``MAX_NAME`` bytes of UTF-8."""
    name = name.strip()
    if not name:
        raise GroupError("a group needs a name", "give one, e.g.: dhtshare group create climbers")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise GroupError(
            "a group name cannot contain line breaks, tabs or other control characters",
            "choose a name on one line",
        )
    size = len(name.encode("utf-8"))
    if size > MAX_NAME:
        raise GroupError(
            f"a group name is at most {MAX_NAME} bytes of UTF-8 (this one has {size})",
            "choose a shorter name",
        )
    return name


def check_text(text: str, what: str) -> None:
    """``GroupError`` if ``text`` (a join message, a rejection reason) exceeds ``MAX_TEXT``
    bytes of UTF-8, the most a record carries."""
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT:
        raise GroupError(
            f"the {what} is at most {MAX_TEXT} bytes of UTF-8 (this one has {size})",
            f"shorten the {what}",
        )


def found_group(
    owner: Identity, name: str, *, now: float, nonce: bytes, public: bool = False
) -> tuple[Roster, tuple[Member, ...]]:
    """The founding roster body (no pages) and member list: the owner alone, since ``now``.
    The name is checked (``check_group_name``) and stripped before anything is signed."""
    genesis = Genesis(owner.public, check_group_name(name), int(now), nonce)
    sig = crypto.sign(owner.signing_key, "genesis", genesis.encode())
    me = Member(owner.public, owner.name, genesis.created)
    return Roster(genesis, sig, (), public, (me,), 1), (me,)


# -------------------------------------------------------------------------------- paging


def layout(
    base: Roster, members: Sequence[Member], seq: int
) -> tuple[Roster, tuple[RosterPage, ...]]:
    """Spread ``members`` over the roster (first ``INLINE_MEMBERS``) and pages bound to ``seq``."""
    if len(members) > MAX_MEMBERS:
        raise GroupError(f"a group holds at most {MAX_MEMBERS} members", "remove someone first")
    rest = members[INLINE_MEMBERS:]
    pages = tuple(
        RosterPage(base.group_id, seq, i, tuple(rest[at : at + PAGE_MEMBERS]))
        for i, at in enumerate(range(0, len(rest), PAGE_MEMBERS))
    )
    roster = replace(
        base,
        members=tuple(members[:INLINE_MEMBERS]),
        total_members=len(members),
        page_digests=tuple(p.digest for p in pages),
    )
    return roster, pages


def resolve_pages(
    record: SignedRecord, roster: Roster, candidates: Mapping[int, Iterable[SignedRecord]]
) -> RosterView:
    """Join a verified roster with its pages: each owner-signed, bound to its seq and digest."""
    members = list(roster.members)
    for index, want in enumerate(roster.page_digests):
        page = _matching_page(record, want, candidates.get(index, ()))
        if page is None:
            raise GroupError(f"roster page {index} is missing", "try again in a moment")
        members.extend(page.members)
    if len(members) != roster.total_members:
        raise GroupError("roster member count does not match its pages")
    if len({m.key for m in members}) != len(members):
        raise GroupError("roster lists a member twice")
    return RosterView(record, roster, tuple(members))


def _matching_page(
    record: SignedRecord, digest: bytes, candidates: Iterable[SignedRecord]
) -> RosterPage | None:
    for rec in candidates:
        body = rec.payload()
        if (
            rec.signer == record.signer
            and isinstance(body, RosterPage)
            and body.roster_seq == record.seq
            and body.digest == digest
        ):
            return body
    return None


# ------------------------------------------------------------------------ roster choice


def chain_digest(handovers: Sequence[Handover]) -> bytes:
    """A digest naming a hand-over chain (to check that a later one extends it)."""
    parts = [h.new_owner + h.at.to_bytes(8, "big") + h.signature for h in handovers]
    return crypto.digest("handover-chain", *parts)


def _verified_roster(rec: SignedRecord, group_id: bytes, now: float) -> Roster | None:
    try:
        body = verify_record(rec, now)
    except RecordError:
        return None
    if not isinstance(body, Roster) or body.group_id != group_id:
        return None
    return body


def _extends(roster: Roster, known: Known | None) -> bool:
    if known is None:
        return True
    hs = roster.handovers
    return len(hs) >= known.chain_length and chain_digest(hs[: known.chain_length]) == known.chain


def pick_roster(
    records: Iterable[SignedRecord], group_id: bytes, now: float, known: Known | None
) -> tuple[SignedRecord, Roster]:
    """The best roster of ``group_id`` among ``records``: verified, extending the chain we
    know, and outranking every other candidate (``SignedRecord.rank``: a longer chain that
    extends the other's, or the same chain and a higher seq). ``StaleRosterError`` if only
    older ones; ``OwnershipForkError`` if two candidates' chains fork after the chain we
    know (the reader cannot tell which one the owner at the fork meant, so it takes none)."""
    good = [
        (rec, body)
        for rec in records
        if (body := _verified_roster(rec, group_id, now)) is not None and _extends(body, known)
    ]
    if not good:
        raise GroupError("no valid roster found for this group", "check the group id")
    best_rec, best = good[0]
    for rec, body in good[1:]:
        if rec.supersedes(best_rec):
            best_rec, best = rec, body
    for rec, _body in good:
        if not (best_rec.rank.extends(rec.rank)):
            raise OwnershipForkError(
                "two hand-over chains of this group fork after the one this node knows",
                "a former owner signed two hand-overs; ask the current owner",
            )
    check_fresh(best_rec.seq, known)
    return best_rec, best


def check_fresh(seq: int, known: Known | None) -> None:
    """Refuse a roster older than the highest one already verified (a rollback)."""
    if known is not None and seq < known.seq:
        raise StaleRosterError(
            f"the DHT only offers roster version {seq}, older than version {known.seq}",
            "the newer roster may still be propagating; try again later",
        )


# --------------------------------------------------------------------------- membership


def latest_leaves(records: Iterable[SignedRecord], group_id: bytes) -> dict[bytes, SignedRecord]:
    """The latest Leave record per signer for ``group_id`` (records already verified)."""
    out: dict[bytes, SignedRecord] = {}
    for rec in records:
        body = rec.payload()
        if not isinstance(body, Leave) or body.group_id != group_id:
            continue
        old = out.get(rec.signer)
        if old is None or (rec.issued, rec.seq) > (old.issued, old.seq):
            out[rec.signer] = rec
    return out


def _has_left(member: Member, leaves: Mapping[bytes, int]) -> bool:
    left = leaves.get(member.key)
    return left is not None and left >= member.since


def apply_leaves(members: Iterable[Member], leaves: Mapping[bytes, int]) -> tuple[Member, ...]:
    """Members without those whose Leave (signer -> issued) is no earlier than their join."""
    return tuple(m for m in members if not _has_left(m, leaves))


def member_since(members: Iterable[Member], leaves: Mapping[bytes, int], key: bytes) -> int | None:
    """When ``key`` joined, if it is a member now (leaves applied); else ``None``."""
    for m in members:
        if m.key == key:
            return None if _has_left(m, leaves) else m.since
    return None


def accept_member(
    members: Sequence[Member], key: bytes, name: str, now: float, left_at: int | None = None
) -> tuple[Member, ...]:
    """Members plus ``key`` joining at ``now`` (after any earlier Leave of its own)."""
    if any(m.key == key for m in members):
        raise GroupError("already a member of this group")
    if len(members) >= MAX_MEMBERS:
        raise GroupError(f"a group holds at most {MAX_MEMBERS} members", "remove someone first")
    since = int(now) if left_at is None else max(int(now), left_at + 1)
    return (*members, Member(key, name, since))


def remove_member(members: Sequence[Member], key: bytes, owner: bytes) -> tuple[Member, ...]:
    """Members without ``key``; the owner cannot remove itself (it leaves instead)."""
    if key == owner:
        raise GroupError("the owner cannot remove itself", "leave the group to hand it over")
    if not any(m.key == key for m in members):
        raise GroupError("not a member of this group")
    return tuple(m for m in members if m.key != key)


# ----------------------------------------------------------------------------- hand-over


def heir_of(members: Iterable[Member], owner: bytes) -> Member | None:
    """The longest-standing member other than ``owner`` (earliest since, then lowest key)."""
    others = [m for m in members if m.key != owner]
    return min(others, key=lambda m: (m.since, m.key), default=None)


def sign_handover(owner: Identity, roster: Roster, heir: bytes, at: float) -> Handover:
    """The owner's signed hand-over of ``roster``'s group to ``heir``."""
    if owner.public != roster.owner:
        raise GroupError("only the owner can hand the group over")
    if len(roster.handovers) >= MAX_HANDOVERS:
        raise GroupError(f"this group has been handed over {MAX_HANDOVERS} times, the limit")
    index = len(roster.handovers)
    message = Handover.message(roster.group_id, index, heir, int(at))
    return Handover(heir, int(at), crypto.sign(owner.signing_key, "handover", message))


def valid_handover(roster: Roster, handover: Handover) -> bool:
    """True when ``handover`` is the current owner's signed next link of the chain."""
    index = len(roster.handovers)
    if index >= MAX_HANDOVERS:
        return False
    message = Handover.message(roster.group_id, index, handover.new_owner, handover.at)
    return crypto.verify(roster.owner, "handover", message, handover.signature)


def take_over(
    roster: Roster, members: Sequence[Member], handover: Handover
) -> tuple[Roster, tuple[Member, ...]]:
    """The heir's next roster base and members: chain extended, the old owner removed."""
    if not valid_handover(roster, handover):
        raise GroupError("the hand-over is not signed by the current owner")
    if not any(m.key == handover.new_owner for m in members):
        raise GroupError("the heir is not a member of the group")
    rest = tuple(m for m in members if m.key != roster.owner)
    return replace(roster, handovers=(*roster.handovers, handover)), rest


# ------------------------------------------------------------------------------ requests


def _rejections(
    decisions: Iterable[SignedRecord], group_id: bytes, owner: bytes
) -> dict[bytes, tuple[int, str]]:
    """requester -> (issued, reason) of the latest rejection signed by the current owner.

    A former owner's keys carry no authority once the chain has moved past them: its
    rejections (whatever their ``issued``, which it could backdate) are ignored."""
    out: dict[bytes, tuple[int, str]] = {}
    for rec in decisions:
        body = rec.payload()
        if (
            isinstance(body, Decision)
            and body.group_id == group_id
            and not body.accepted
            and rec.signer == owner
            and rec.issued >= out.get(body.requester, (-1, ""))[0]
        ):
            out[body.requester] = (rec.issued, body.reason)
    return out


def pending_requests(
    requests: Iterable[SignedRecord],
    decisions: Iterable[SignedRecord],
    roster: Roster,
    members: Iterable[Member],
    leaves: Mapping[bytes, int],
) -> list[PendingRequest]:
    """Join requests from non-members with no rejection (or leave) issued since, oldest first."""
    current = {m.key for m in apply_leaves(members, leaves)}
    rejected = _rejections(decisions, roster.group_id, roster.owner)
    out: dict[bytes, PendingRequest] = {}
    for rec in requests:
        body = rec.payload()
        if not isinstance(body, JoinRequest) or body.group_id != roster.group_id:
            continue
        if rec.signer in current or _decided(rec.signer, rejected, leaves) >= rec.issued:
            continue
        out[rec.signer] = PendingRequest(rec.signer, body.name, body.message, rec.issued)
    return sorted(out.values(), key=lambda p: (p.issued, p.requester))


def _decided(
    key: bytes, rejected: Mapping[bytes, tuple[int, str]], leaves: Mapping[bytes, int]
) -> int:
    return max(rejected.get(key, (-1, ""))[0], leaves.get(key, -1))


def request_not_before(
    me: bytes, roster: Roster, decisions: Iterable[SignedRecord], leaves: Mapping[bytes, int]
) -> int:
    """The earliest ``issued`` my next join request may carry to count as pending: one
    second after the owner's last rejection of me and my last leave (``pending_requests``
    compares whole seconds, so a request in the same second would count as decided)."""
    rejected = _rejections(decisions, roster.group_id, roster.owner)
    return _decided(me, rejected, leaves) + 1


def join_status(
    me: bytes,
    requested_at: int | None,
    view: RosterView | None,
    leaves: Mapping[bytes, int],
    decisions: Iterable[SignedRecord],
) -> tuple[JoinStatus, str]:
    """My status in a group and, if rejected, the owner's reason."""
    if view is not None and member_since(view.members, leaves, me) is not None:
        return "accepted", ""
    if requested_at is None:
        return "none", ""
    if view is not None:
        issued, reason = _rejections(decisions, view.group_id, view.owner).get(me, (-1, ""))
        if issued >= requested_at:
            return "rejected", reason
    return "pending", ""


# ----------------------------------------------------------------------------- directory


def directory_entry_is_plausible(
    entry: DirectoryEntry, signer: bytes, view: RosterView, leaves: Mapping[bytes, int]
) -> bool:
    """A listing is shown only if the group's owner signed it for a public roster, with the
    group's name, and a member count within 10% (at least 2) of what the roster says."""
    if entry.withdrawn or not view.roster.public or signer != view.owner:
        return False
    if entry.group_id != view.group_id or entry.name != view.name:
        return False
    actual = len(apply_leaves(view.members, leaves))
    return abs(entry.member_count - actual) <= max(2, actual // 10)
