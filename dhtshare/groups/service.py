"""GroupService: create, join, decide, leave and read groups through the DHT.

The service publishes and fetches records; ``rules`` decides what they mean. Its state
(``GroupState``: my groups and requests, the highest roster seen per group, my roster
drafts as owner) is small, JSON-serializable, and persisted by the node.

DHT keys (``records.key_for``): roster ``(ROSTER, gid)``; roster page ``i``
``(ROSTER_PAGE, gid, owner, bytes([i]))`` under the key of the owner who signed the roster;
join requests ``(JOIN_REQUEST, gid)``, one slot per
requester; a rejection ``(DECISION, gid, requester)``; leaves ``(LEAVE, gid)``, one slot per
member; the public directory ``(DIRECTORY,)``, one slot per owner and group.

Membership fails closed: with ``max_age`` set (the node sets it from its maintenance
interval), a group whose roster and leaves were last read from the DHT more than
``max_age`` seconds ago answers ``is_member`` with no for everyone, until a refresh
succeeds again. A node whose DHT is down, or is fed only old or incomplete rosters, stops
serving the group instead of serving everyone it once knew.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from dhtshare.codec import Reader
from dhtshare.errors import DhtshareError, GroupError, StaleRosterError
from dhtshare.groups import rules
from dhtshare.groups.keyring import GroupKeys, Keyring, Where, keyring_from_json, keyring_to_json
from dhtshare.groups.rules import JoinStatus, Known, PendingRequest, RosterView
from dhtshare.groups.sealeddht import Dht, Renew, SealedDht
from dhtshare.groups.secrets import Invite, epoch_pages, epoch_space, my_box, new_secret
from dhtshare.identity import Identity
from dhtshare.records import (
    CLOCK_SKEW,
    MAX_PAGES,
    MAX_TTL,
    Body,
    Decision,
    DirectoryEntry,
    EpochPage,
    Grant,
    Handover,
    InviteInfo,
    JoinRequest,
    Kind,
    Leave,
    Member,
    Roster,
    SignedRecord,
    epoch_key_ids,
    key_for,
    page_key_ids,
    sign_record,
    time_seq,
)

__all__ = [
    "DIRECTORY_TTL",
    "ROSTER_TTL",
    "Departure",
    "Draft",
    "GroupService",
    "GroupState",
    "Listing",
    "MyGroup",
    "Role",
]

ROSTER_TTL = 24 * 3600  # rosters and their pages; re-signed by maintain() before expiry
RENEW_MARGIN = 6 * 3600  # maintain() re-signs a roster that would expire within this
DIRECTORY_TTL = 24 * 3600
NOTE_TTL = MAX_TTL  # join requests, rejections, leaves
RETIRED = 2  # rotated-away invites whose earlier requests the owner still reads
STATE_VERSION = 1

Role = Literal["owner", "member", "pending", "rejected", "removed"]


@dataclass(frozen=True, slots=True)
class MyGroup:
    """One of my groups, and my role in it."""

    group_id: bytes
    name: str
    role: Role
    members: int
    reason: str = ""  # the owner's reason, when my request was rejected


@dataclass(frozen=True, slots=True)
class Departure:
    """What ``leave`` did: ``left`` (with the heir, if I owned it) or ``cancelled`` (a
    request withdrawn)."""

    outcome: Literal["left", "cancelled"]
    heir: Member | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """A public directory entry that checked out against its group's roster."""

    group_id: bytes
    name: str
    members: int
    owner: bytes
    invite: str = ""


@dataclass(frozen=True, slots=True)
class Draft:
    """The roster I last signed as owner: the source of my next version."""

    seq: int
    roster: Roster
    members: tuple[Member, ...]


@dataclass
class GroupState:
    """What a node persists about groups (``to_json``/``from_json``; keys are hex)."""

    groups: dict[bytes, str] = field(default_factory=dict)  # gid -> name, member or owner
    requested: dict[bytes, int] = field(default_factory=dict)  # gid -> my request's time
    known: dict[bytes, Known] = field(default_factory=dict)  # gid -> highest verified roster
    drafts: dict[bytes, Draft] = field(default_factory=dict)  # gid -> my roster as owner
    request_names: dict[bytes, str] = field(default_factory=dict)  # gid -> name, requested
    keys: Keyring = field(default_factory=dict)  # gid -> the group's secrets I hold

    def name_of(self, group_id: bytes) -> str:
        """The name of one of my groups or requested groups ("" if not known yet)."""
        return self.groups.get(group_id) or self.request_names.get(group_id, "")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable document."""
        return {
            "version": STATE_VERSION,
            "groups": {g.hex(): n for g, n in self.groups.items()},
            "requested": {g.hex(): t for g, t in self.requested.items()},
            "known": {
                g.hex(): [k.seq, k.chain_length, k.chain.hex()] for g, k in self.known.items()
            },
            "drafts": {g.hex(): _draft_doc(d) for g, d in self.drafts.items()},
            "request_names": {g.hex(): n for g, n in self.request_names.items()},
            "keys": keyring_to_json(self.keys),
        }

    @classmethod
    def from_json(cls, doc: Any) -> GroupState:
        """Parse ``to_json`` output; ``GroupError`` if it is damaged."""
        try:
            if doc["version"] != STATE_VERSION:
                raise ValueError("unknown version")
            return cls(
                {bytes.fromhex(g): str(n) for g, n in doc["groups"].items()},
                {bytes.fromhex(g): int(t) for g, t in doc["requested"].items()},
                {bytes.fromhex(g): _known(k) for g, k in doc["known"].items()},
                {bytes.fromhex(g): _draft(d) for g, d in doc["drafts"].items()},
                {bytes.fromhex(g): str(n) for g, n in doc.get("request_names", {}).items()},
                keyring_from_json(doc.get("keys", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GroupError(
                "the saved group state is damaged", "restore it from a backup"
            ) from exc


def _draft_doc(d: Draft) -> dict[str, Any]:
    members = [[m.key.hex(), m.name, m.since] for m in d.members]
    return {"seq": d.seq, "roster": d.roster.encode().hex(), "members": members}


def _draft(doc: Any) -> Draft:
    r = Reader(bytes.fromhex(doc["roster"]))
    roster = Roster.decode(r)
    r.finish()
    members = tuple(Member(bytes.fromhex(k), str(n), int(s)) for k, n, s in doc["members"])
    return Draft(int(doc["seq"]), roster, members)


def _known(doc: Any) -> Known:
    seq, length, chain = doc
    return Known(int(seq), int(length), bytes.fromhex(chain))


def _page_key(group_id: bytes, owner: bytes, index: int) -> bytes:
    return key_for(Kind.ROSTER_PAGE, *page_key_ids(group_id, owner, index))


class GroupService:
    """Groups as seen from one identity on one DHT node."""

    def __init__(
        self,
        dht: Dht | SealedDht,
        identity: Identity,
        state: GroupState | None = None,
        *,
        clock: Callable[[], float] = time.time,
        max_age: float | None = None,
    ) -> None:
        self._me = identity
        self.state = state if state is not None else GroupState()
        self.sealed: SealedDht
        if isinstance(dht, SealedDht):
            dht.ring = self.state.keys
            self.sealed = dht
        else:
            self.sealed = SealedDht(dht, self.state.keys, identity, clock)
        self._dht = self.sealed
        self._clock = clock
        self.max_age = max_age  # None: a cached view never goes stale (tests, simulations)
        self._views: dict[bytes, RosterView] = {}
        self._fresh_at: dict[bytes, float] = {}  # gid -> when roster and leaves were last read
        self._leaves: dict[bytes, dict[bytes, SignedRecord]] = {}
        self._last_seq: dict[tuple[bytes, bytes], int] = {}
        self._taking_over = asyncio.Lock()  # one take-over at a time (maintain and commands)

    # ---- signing helpers ---------------------------------------------------------

    def _sign(self, body: Body, *, seq: int, ttl: float) -> SignedRecord:
        return sign_record(self._me, body, seq=seq, now=self._clock(), ttl=ttl)

    def _sign_note(self, body: Body, ttl: float, not_before: float = 0.0) -> SignedRecord:
        """Sign a record whose seq comes from the clock, always above my last one in its slot,
        issued no earlier than ``not_before`` (at most ``CLOCK_SKEW`` ahead of the clock),
        expiring when it would have if issued now (so it can be sealed: ``MAX_TTL`` from now)."""
        clock = self._clock()
        now = min(max(clock, not_before), clock + CLOCK_SKEW / 2)
        ttl -= now - clock
        draft = sign_record(self._me, body, seq=0, now=now, ttl=ttl)
        where = (draft.dht_key, draft.slot)
        seq = max(time_seq(now), self._last_seq.get(where, 0) + 1)
        self._last_seq[where] = seq
        return sign_record(self._me, body, seq=seq, now=now, ttl=ttl)

    def _renewer(self, ttl: float) -> Renew:
        def renew(old: SignedRecord) -> SignedRecord:
            seq = max(old.seq + 1, time_seq(self._clock()))
            return self._sign(old.payload(), seq=seq, ttl=ttl)

        return renew

    # ---- reading -------------------------------------------------------------------

    async def fetch_roster(self, group_id: bytes) -> RosterView:
        """The latest verified roster with all its pages; remembers its seq (no rollback)."""
        found = await self._dht.get(group_id, key_for(Kind.ROSTER, group_id))
        known = self.state.known.get(group_id)
        rec, roster = rules.pick_roster(found, group_id, self._clock(), known)
        pages = await self._fetch_pages(group_id, rec.signer, len(roster.page_digests))
        view = rules.resolve_pages(rec, roster, pages)
        self._remember(view)
        return view

    async def _fetch_pages(
        self, group_id: bytes, owner: bytes, count: int
    ) -> dict[int, list[SignedRecord]]:
        keys = [_page_key(group_id, owner, i) for i in range(count)]
        found = await asyncio.gather(*(self._dht.get(group_id, k) for k in keys))
        return dict(enumerate(found))

    def _remember(self, view: RosterView) -> None:
        known = self.state.known.get(view.group_id)
        if known is None or view.seq >= known.seq:
            self.state.known[view.group_id] = view.known
            keys = self.state.keys.get(view.group_id)
            if keys is not None:
                keys.owner = view.owner  # who may announce epochs, after a restart too
        self._views[view.group_id] = view

    async def _fetch_leaves(self, group_id: bytes) -> dict[bytes, SignedRecord]:
        found = await self._dht.get(group_id, key_for(Kind.LEAVE, group_id))
        leaves = rules.latest_leaves(found, group_id)
        self._leaves[group_id] = leaves
        return leaves

    def _leave_times(self, group_id: bytes) -> dict[bytes, int]:
        return {k: r.issued for k, r in self._leaves.get(group_id, {}).items()}

    async def refresh(self, group_id: bytes) -> RosterView:
        """Fetch the roster and the leaves again; ``member_since`` answers from them. Only a
        refresh that read both keeps the group's membership fresh (``stale_since``). A
        request of mine reads its mailbox first: an accepted one holds its grant there."""
        keys = self.state.keys.get(group_id)
        if group_id in self.state.requested and keys is not None and keys.epoch < 0:
            await self._answers(group_id, keys)
        # the roster and leaves of the epoch I hold, while I look for a newer epoch
        moved, view, _ = await asyncio.gather(
            self.catch_up(group_id), self.fetch_roster(group_id), self._fetch_leaves(group_id)
        )
        if moved:
            view, _ = await asyncio.gather(
                self.fetch_roster(group_id), self._fetch_leaves(group_id)
            )
        self._mark_fresh(group_id)
        if group_id in self.state.requested:
            if self.is_member(group_id, self._me.public):
                self._settle_request(group_id, view.name)  # my request was accepted
            else:
                self.state.request_names[group_id] = view.name
        return view

    def _settle_request(self, group_id: bytes, name: str) -> None:
        self.state.requested.pop(group_id, None)
        self.state.request_names.pop(group_id, None)
        self.state.groups[group_id] = name

    async def _try_refresh(self, group_id: bytes) -> RosterView | None:
        """``refresh``, or ``None`` without a readable roster (a rollback still raises)."""
        try:
            return await self.refresh(group_id)
        except StaleRosterError:
            raise
        except GroupError:
            return None

    def _mark_fresh(self, group_id: bytes) -> None:
        self._fresh_at[group_id] = self._clock()

    def age(self, group_id: bytes) -> float | None:
        """Seconds since the roster of ``group_id`` was last read (or published) in full."""
        at = self._fresh_at.get(group_id)
        return None if at is None else self._clock() - at

    def stale_since(self, group_id: bytes) -> float | None:
        """When the cached membership of ``group_id`` went stale (unix time), or ``None``
        while it is fresh (or never read). A stale group serves nobody."""
        at = self._fresh_at.get(group_id)
        if self.max_age is None or at is None:
            return None
        deadline = at + self.max_age
        return deadline if self._clock() > deadline else None

    def _current_view(self, group_id: bytes) -> RosterView | None:
        """The cached view, unless it is older than ``max_age`` (then nobody is a member)."""
        view = self._views.get(group_id)
        if view is None or self.stale_since(group_id) is not None:
            return None
        return view

    def member_since(self, group_id: bytes, key: bytes) -> int | None:
        """When ``key`` joined ``group_id``, if a member now (cached roster, leaves applied);
        ``None`` for everyone while the cached roster is stale (fail closed)."""
        view = self._current_view(group_id)
        if view is None:
            return None
        return rules.member_since(view.members, self._leave_times(group_id), key)

    def is_member(self, group_id: bytes, key: bytes) -> bool:
        """``member_since`` as a yes/no, the callable the transfer layer takes."""
        return self.member_since(group_id, key) is not None

    def members(self, group_id: bytes) -> tuple[Member, ...]:
        """Current members of a cached group (leaves applied); empty if never fetched."""
        view = self._views.get(group_id)
        if view is None:
            return ()
        return rules.apply_leaves(view.members, self._leave_times(group_id))

    # ---- access keys (the peer handshake) ------------------------------------------

    def access_key(self, group_id: bytes) -> bytes | None:
        """The current epoch's 32-byte access key of ``group_id`` (the peer handshake's
        proof of membership), or ``None`` when I hold no epoch secret of it."""
        keys = self.state.keys.get(group_id)
        if group_id not in self.state.groups or keys is None or keys.removed:
            return None
        return keys.access_key

    def access_keys(self) -> dict[bytes, bytes]:
        """Group id -> current access key, for every group I hold an epoch secret of."""
        out = {}
        for gid in self.state.groups:
            key = self.access_key(gid)
            if key is not None:
                out[gid] = key
        return out

    # ---- founding and publishing rosters -------------------------------------------

    async def create(self, name: str, *, public: bool = False) -> bytes:
        """Found a group owned by me; return its id (which never changes)."""
        now = self._clock()
        base, members = rules.found_group(
            self._me, name, now=now, nonce=os.urandom(16), public=public
        )
        owned = self.owned_named(base.genesis.name)
        if owned:
            raise GroupError(
                f"you already own a group named {base.genesis.name!r} ({owned[0].hex()[:12]})",
                "choose another name, or use that group by its name",
            )
        gid = base.group_id
        keys = self.state.keys[gid] = GroupKeys(invite=Invite.new(self._me.public).token)
        keys.install(0, new_secret())
        self.state.groups[gid] = base.genesis.name
        self._leaves[gid] = {}
        await self._publish_invite(gid, base.genesis.name)
        await self._publish_roster(base, members, 1)
        return gid

    def _invite_info(self, group_id: bytes, name: str, withdrawn: bool = False) -> InviteInfo:
        space = Invite.parse(self.state.keys[group_id].invite).space.writer.public
        return InviteInfo(group_id, name, withdrawn, space)

    async def _publish_invite(self, group_id: bytes, name: str) -> None:
        rec = self._sign_note(self._invite_info(group_id, name), NOTE_TTL)
        await self._dht.publish(Where("inbox", group_id), rec, self._renewer(NOTE_TTL))

    async def _retire_invite(self, group_id: bytes, name: str) -> None:
        """Mark the current invite replaced in its inbox (new requests there are not read)."""
        rec = self._sign_note(self._invite_info(group_id, name, withdrawn=True), NOTE_TTL)
        self._dht.withdraw(key_for(Kind.INVITE), self._me.public, group_id)
        try:
            await self._dht.put(Where("inbox", group_id), rec)
        except DhtshareError:
            pass  # the old record expires; its requests are not read either way

    async def invite(self, group_id: bytes, *, rotate: bool = False) -> str:
        """The group's invite (owner only); ``rotate`` replaces it, so the old one stops
        working for new requests."""
        draft = await self._as_owner(group_id)
        keys = self.state.keys[group_id]
        if rotate or not keys.invite or Invite.parse(keys.invite).owner != self._me.public:
            if keys.invite and Invite.parse(keys.invite).owner == self._me.public:
                # the requests pending now stay; later ones there (a leaked invite) do not
                carried = {p.requester: p.issued for p in await self._pending(group_id, draft)}
                keys.carried = carried
                keys.retired = [*keys.retired, keys.invite][-RETIRED:]
                await self._retire_invite(group_id, draft.roster.genesis.name)
            keys.invite = Invite.new(self._me.public).token
            await self._publish_invite(group_id, draft.roster.genesis.name)
            view = self._views.get(group_id)
            if view is not None:
                await self._publish_directory(view)
        return keys.invite

    def owned_named(self, name: str) -> list[bytes]:
        """My groups that I own (as far as my drafts say) and that are called ``name``."""
        state = self.state
        return sorted(g for g, n in state.groups.items() if n == name and g in state.drafts)

    async def _publish_roster(
        self, base: Roster, members: tuple[Member, ...], seq: int
    ) -> RosterView:
        """Sign and publish roster version ``seq`` (pages first), and the directory entry."""
        gid = base.group_id
        roster, pages = rules.layout(base, members, seq)
        page_recs = [self._sign(p, seq=seq, ttl=ROSTER_TTL) for p in pages]
        rec = self._sign(roster, seq=seq, ttl=ROSTER_TTL)
        here = Where("epoch", gid)
        await asyncio.gather(*(self._dht.publish(here, p) for p in page_recs))
        for index in range(len(pages), MAX_PAGES):
            self._dht.withdraw(_page_key(gid, self._me.public, index), self._me.public)
        await self._dht.publish(here, rec)
        self.state.drafts[gid] = Draft(seq, roster, members)
        view = RosterView(rec, roster, members)
        self._remember(view)
        if gid in self._leaves:
            self._mark_fresh(gid)  # I just published it, with leaves I read
        await self._publish_directory(view)
        return view

    async def _publish_directory(self, view: RosterView) -> None:
        keys = self.state.keys.get(view.group_id)
        if not view.roster.public or keys is None or not keys.invite:
            return
        entry = DirectoryEntry(view.group_id, view.name, len(view.members), invite=keys.invite)
        rec = self._sign_note(entry, DIRECTORY_TTL)
        await self.sealed.dht.publish(rec, self._renewer(DIRECTORY_TTL))  # public by choice

    def _withdraw_owned(self, group_id: bytes) -> None:
        """Stop republishing my roster, pages and directory entry of ``group_id``."""
        me = self._me.public
        self._dht.withdraw(key_for(Kind.ROSTER, group_id), b"")
        for index in range(MAX_PAGES):
            self._dht.withdraw(_page_key(group_id, me, index), me)
        self.sealed.dht.withdraw(key_for(Kind.DIRECTORY), me + group_id)
        self._dht.withdraw(key_for(Kind.INVITE), self._me.public, group_id)
        self.state.drafts.pop(group_id, None)

    async def _retire_directory(self, view: RosterView) -> None:
        """My listing of a public group I leave goes now, not when its entry expires."""
        if not view.roster.public:
            return
        self.sealed.dht.withdraw(key_for(Kind.DIRECTORY), self._me.public + view.group_id)
        entry = DirectoryEntry(view.group_id, view.name, 0, withdrawn=True)
        try:
            await self.sealed.dht.put(self._sign_note(entry, DIRECTORY_TTL))
        except DhtshareError:
            pass  # the entry expires within a day; the group is gone either way

    async def _as_owner(self, group_id: bytes) -> Draft:
        """My latest draft of a group I own (checked against the DHT), with fresh leaves.
        A hand-over to me that I have not acted on yet is taken over first."""
        view = await self.claim(group_id)
        if view.owner != self._me.public or self._left_out(group_id):
            raise GroupError("only the group's owner can do this", "ask the owner")
        draft = self.state.drafts.get(group_id)
        if draft is not None and draft.seq >= view.seq:
            return draft
        return Draft(view.seq, view.roster, view.members)

    async def _next_roster(
        self, draft: Draft, members: tuple[Member, ...], *, rekey: bool = False
    ) -> RosterView:
        """Publish the next roster version; ``rekey``: in a new epoch whose secret only
        ``members`` receive (a removal, a leave, a hand-over)."""
        gid = draft.roster.group_id
        known = self.state.known.get(gid)
        seq = max(draft.seq, known.seq if known else 0) + 1
        if rekey:
            await self._rekey(gid, [m.key for m in members])
        return await self._publish_roster(draft.roster, members, seq)

    async def _rekey(self, group_id: bytes, members: list[bytes]) -> None:
        """Start the next epoch: its secret boxed for each of ``members`` in pages sealed
        under the current epoch (where they look for it), then move my records over."""
        keys = self.state.keys[group_id]
        old = keys.secrets[keys.epoch]
        epoch, secret = keys.epoch + 1, new_secret()
        others = [m for m in members if m != self._me.public]
        keys.announced[epoch] = others  # to announce it again after a restart
        await self._announce(group_id, epoch, old, secret, others)
        keys.install(epoch, secret, at=self._clock())
        me = self._me.public
        self._dht.withdraw(key_for(Kind.ROSTER, group_id), b"")  # the next version follows
        for index in range(MAX_PAGES):
            self._dht.withdraw(_page_key(group_id, me, index), me)
        await self._dht.reseal(group_id)

    async def catch_up(self, group_id: bytes) -> int:
        """Follow the epoch changes I missed (each announced under the epoch before it);
        how many epochs I moved. An announcement without a box for me: I was removed."""
        keys = self.state.keys.get(group_id)
        moved = 0
        view = self._views.get(group_id)
        if view is not None and view.owner == self._me.public and group_id in self.state.groups:
            return 0  # the owner makes the epochs (until it leaves): nothing to follow
        while keys is not None and keys.epoch >= 0 and moved < 64:
            secret = await self._next_epoch(group_id, keys)
            if secret is None:
                break
            keys.install(keys.epoch + 1, secret, at=self._clock())
            moved += 1
        if moved:
            await self._dht.reseal(group_id)
        return moved

    async def _next_epoch(self, group_id: bytes, keys: GroupKeys) -> bytes | None:
        space = keys.space()
        assert space is not None
        nxt = keys.epoch + 1
        first = await self._dht.find([space], key_for(Kind.EPOCH, *epoch_key_ids(group_id, nxt, 0)))
        if first and self._announcer(group_id) is None:  # never read the roster: read it
            with contextlib.suppress(GroupError):
                await self.fetch_roster(group_id)
        if first and self._views.get(group_id) is not None:
            await self._fetch_leaves(group_id)  # a hand-over names who announces now
        for head in first:
            body = head.payload()
            if not isinstance(body, EpochPage) or body.epoch != keys.epoch + 1:
                continue
            if head.signer != self._announcer(group_id):
                continue  # a member's, or a former owner's: not worth a lookup per page
            keys_ = [
                key_for(Kind.EPOCH, *epoch_key_ids(group_id, nxt, i)) for i in range(1, body.count)
            ]
            rest = await asyncio.gather(*(self._dht.find([space], k) for k in keys_))
            pages = [body] + [
                r.payload()
                for recs in rest
                for r in recs
                if r.signer == head.signer and isinstance(r.payload(), EpochPage)
            ]
            typed = [p for p in pages if isinstance(p, EpochPage) and p.epoch == body.epoch]
            secret = my_box(self._me, keys.secrets[keys.epoch], typed)
            if secret is not None:
                if await self._verify_epoch(group_id, secret, head.signer):
                    return secret
                continue
            if len({p.index for p in typed}) == body.count:  # all read, from the announcer
                keys.removed = True  # my owner (or my heir) started an epoch without me
        return None

    def _left_out(self, group_id: bytes) -> bool:
        """The group moved to an epoch without me (I was removed, or handed it over): what I
        still read of it is its past."""
        keys = self.state.keys.get(group_id)
        return keys is not None and keys.removed

    def _announcer(self, group_id: bytes) -> bytes | None:
        """Who may announce the next epoch: the heir that my owner's own leave hands the
        group to (checked against my roster's chain), else my owner (of my last verified
        roster, remembered across restarts). Nobody else: a member's or a former owner's
        heads are not followed (the epoch's roster is checked after, ``_verify_epoch``)."""
        view = self._views.get(group_id)
        keys = self.state.keys.get(group_id)
        if view is None:
            return keys.owner if keys is not None and keys.owner else None
        rec = self._leaves.get(group_id, {}).get(view.owner)
        body = rec.payload() if rec is not None else None
        handover = body.handover if isinstance(body, Leave) else None
        if handover is not None and rules.valid_handover(view.roster, handover):
            return handover.new_owner
        return view.owner

    async def _verify_epoch(self, group_id: bytes, secret: bytes, signer: bytes) -> bool:
        """The epoch of ``secret`` holds a roster that extends the chain I know, signed by
        ``signer`` (who announced the epoch): a member cannot move me to an epoch of its own."""
        found = await self._dht.find([epoch_space(secret)], key_for(Kind.ROSTER, group_id))
        try:
            _rec, roster = rules.pick_roster(
                found, group_id, self._clock(), self.state.known.get(group_id)
            )
        except GroupError:
            return False
        return roster.owner == signer

    # ---- joining -------------------------------------------------------------------

    async def read_invite(self, invite: Invite) -> InviteInfo:
        """Which group ``invite`` opens (read in its inbox, signed by its owner)."""

        def genuine(rec: SignedRecord) -> bool:
            body = rec.payload()
            return (
                isinstance(body, InviteInfo)
                and rec.signer == invite.owner
                and body.space == invite.space.writer.public
            )

        found: list[SignedRecord] = []
        for _attempt in range(2):  # a lookup that lost its replies (a loaded host) asks again
            found = await self._dht.find([invite.space], key_for(Kind.INVITE), keep=genuine)
            if found:
                break
        for rec in found:
            body = rec.payload()
            if isinstance(body, InviteInfo) and not body.withdrawn:
                return body
        raise GroupError(
            "no group was found for this invite (or it was replaced by a new one)",
            "check the invite, or ask the owner for a new one (see also: dhtshare node status)",
        )

    async def request_join(self, invite_text: str, message: str = "") -> bytes:
        """Publish my signed join request into the inbox of the group ``invite_text`` opens
        (sealed to its owner); return the group id. The owner answers in my mailbox."""
        rules.check_text(message, "join message")
        invite = Invite.parse(invite_text)
        info = await self.read_invite(invite)
        gid = info.group_id
        if gid in self.state.groups and not self._left_out(gid):
            raise GroupError(f"you are already a member of {info.name!r}", "nothing to join")
        after = await self._decided_at(gid) + 1  # pending compares whole seconds
        if self._left_out(gid):  # removed, or I handed it over: ask as a newcomer
            self.sealed.forget_group(gid)
            self.state.groups.pop(gid, None)
            self.state.drafts.pop(gid, None)
        # fresh keys: a mailbox of its own per request, and no epoch until a grant
        self.state.keys[gid] = GroupKeys(invite=invite.token, reply=new_secret())
        keys = self.state.keys[gid]
        body = JoinRequest(gid, self._me.name, message, keys.reply)
        rec = self._sign_note(body, NOTE_TTL, not_before=after)
        self._dht.withdraw(key_for(Kind.LEAVE, gid), self._me.public)  # an earlier cancel
        await self._dht.publish(Where("inbox", gid), rec, to_owner=invite.owner)
        self.state.requested[gid] = rec.issued
        self.state.request_names[gid] = info.name
        return gid

    async def _decided_at(self, group_id: bytes) -> int:
        """When I last left ``group_id`` or its owner last rejected me (-1: never), as far as
        I know: a new request must be issued after it to count as pending."""
        left = self._leaves.get(group_id, {}).get(self._me.public)
        times = [left.issued] if left is not None else []
        for rec in await self._mailbox(group_id):
            body = rec.payload()
            if isinstance(body, Decision) and not body.accepted:
                times.append(rec.issued)
        return max(times, default=-1)

    async def requests(self, group_id: bytes) -> list[PendingRequest]:
        """Join requests the owner has not decided yet, oldest first."""
        draft = await self._as_owner(group_id)
        return await self._pending(group_id, draft)

    async def _pending(self, group_id: bytes, draft: Draft) -> list[PendingRequest]:
        keys = self.state.keys[group_id]
        inbox = Where("inbox", group_id).resolve(self.state.keys)
        # the inboxes of invites I rotated away: the requests pending at the rotation still
        # count (``carried``), nothing else there does (a leaked invite)
        old = [Invite.parse(token).space for token in keys.retired]

        def carried(rec: SignedRecord) -> bool:
            return keys.carried.get(rec.signer) == rec.issued

        found, cancels, kept = await asyncio.gather(
            self._dht.find([inbox], key_for(Kind.JOIN_REQUEST, group_id), to_me=True),
            self._dht.find([inbox, *old], key_for(Kind.LEAVE, group_id), to_me=True),
            self._dht.find(old, key_for(Kind.JOIN_REQUEST, group_id), to_me=True, keep=carried),
        )
        newest: dict[bytes, SignedRecord] = {}  # one request per requester: its latest
        for rec in [*kept, *found]:
            held = newest.get(rec.signer)
            if held is None or (rec.issued, rec.seq) > (held.issued, held.seq):
                newest[rec.signer] = rec
        found = list(newest.values())
        for rec in found:
            body = rec.payload()
            if isinstance(body, JoinRequest) and body.group_id == group_id:
                keys.replies[rec.signer] = body.reply
        leaves = dict(self._leave_times(group_id))
        for key, rec in rules.latest_leaves(cancels, group_id).items():
            leaves[key] = max(leaves.get(key, 0), rec.issued)
        # my own rejections, remembered: no lookup per requester (a flood of 60 requests
        # cost 66 lookups a listing when each requester's mailbox was read)
        pending = [
            p
            for p in rules.pending_requests(found, [], draft.roster, draft.members, leaves)
            if keys.rejected.get(p.requester, -1) < p.issued
        ]
        keep = {p.requester for p in pending} | {m.key for m in draft.members}
        keys.replies = {k: v for k, v in keys.replies.items() if k in keep}  # bounded
        asking = {r.signer for r in found}
        keys.rejected = {k: t for k, t in keys.rejected.items() if k in asking}  # bounded
        waiting = {p.requester for p in pending}
        keys.carried = {k: t for k, t in keys.carried.items() if k in waiting}
        return pending

    async def accept(self, group_id: bytes, requester: bytes) -> RosterView:
        """Add a pending requester to the roster (a new version, seq + 1) and give it the
        current epoch secret in its mailbox."""
        draft = await self._as_owner(group_id)
        pending = {p.requester: p for p in await self._pending(group_id, draft)}
        current = rules.apply_leaves(draft.members, self._leave_times(group_id))
        if requester not in pending:
            for m in current:
                if m.key == requester:
                    raise GroupError(
                        f"{m.name or 'that member'} is already a member", "nothing to accept"
                    )
            raise GroupError("no pending join request from that member", "list the requests")
        left = self._leave_times(group_id).get(requester)
        name, now = pending[requester].name, self._clock()
        members = rules.accept_member(current, requester, name, now, left)
        view = await self._next_roster(draft, members)
        await self._grant(group_id, requester, view.name)
        return view

    async def _grant(self, group_id: bytes, member: bytes, name: str) -> None:
        keys = self.state.keys[group_id]
        grant = Grant(group_id, keys.epoch, keys.secrets[keys.epoch], name)
        rec = self._sign_note(grant, NOTE_TTL)
        await self._dht.publish(Where("mailbox", group_id, requester=member), rec)

    async def reject(self, group_id: bytes, requester: bytes, reason: str = "") -> None:
        """Publish a rejection the requester can read (in its mailbox)."""
        rules.check_text(reason, "reason")
        await self._as_owner(group_id)
        if Where("mailbox", group_id, requester=requester).resolve(self.state.keys) is None:
            await self.requests(group_id)  # learn its mailbox from its request
        where = Where("mailbox", group_id, requester=requester)
        if where.resolve(self.state.keys) is None:
            raise GroupError("no join request from that member", "list the requests")
        body = Decision(group_id, requester, False, reason)
        rec = self._sign_note(body, NOTE_TTL)
        self.state.keys[group_id].rejected[requester] = rec.issued
        await self._dht.publish(where, rec)

    async def _mailbox(self, group_id: bytes) -> list[SignedRecord]:
        """What the owner put in my mailbox (grants and decisions), signed by the owner the
        invite names."""
        keys = self.state.keys.get(group_id)
        if keys is None or not keys.reply or not keys.invite:
            return []
        owner = Invite.parse(keys.invite).owner
        space = Where("mailbox", group_id).resolve(self.state.keys)
        me = self._me.public
        found = await asyncio.gather(
            self._dht.find([space], key_for(Kind.GRANT, group_id)),
            self._dht.find([space], key_for(Kind.DECISION, group_id, me)),
        )
        return [r for recs in found for r in recs if r.signer == owner]

    async def _answers(self, group_id: bytes, keys: GroupKeys) -> list[SignedRecord]:
        """The owner's answers in my mailbox; a grant gives me the epoch secret."""
        answers = await self._mailbox(group_id)
        for rec in answers:
            body = rec.payload()
            if isinstance(body, Grant) and body.group_id == group_id and keys.epoch < 0:
                keys.install(body.epoch, body.secret)
        return answers

    async def status(self, group_id: bytes) -> tuple[JoinStatus, str]:
        """My join status (none, pending, accepted, rejected) and a rejection's reason."""
        mine = self.state.requested.get(group_id)
        keys = self.state.keys.get(group_id)
        if group_id in self.state.groups and not self._left_out(group_id):
            return "accepted", ""
        if mine is None or keys is None:
            return "none", ""
        answers = await self._answers(group_id, keys)
        if keys.epoch >= 0:
            view = await self._try_refresh(group_id)
            if view is not None and self.is_member(group_id, self._me.public):
                return "accepted", ""
        for rec in answers:
            body = rec.payload()
            if isinstance(body, Decision) and not body.accepted and rec.issued >= mine:
                return "rejected", body.reason
        return "pending", ""

    # ---- leaving and removing ------------------------------------------------------

    async def leave(self, group_id: bytes) -> Departure:
        """Leave; an owner hands the group to its longest-standing other member. For a
        group I only asked to join, the request is withdrawn (``cancelled``), and a group
        the DHT has no roster for is just forgotten. ``GroupError`` if the group is not one
        of mine."""
        state = self.state
        if group_id not in state.groups and group_id not in state.requested:
            raise GroupError(
                "you are not a member of this group", "list yours with: dhtshare group list"
            )
        if group_id in state.requested:
            await self.status(group_id)  # an accepted request becomes a group
            if group_id in state.requested:
                await self._cancel_request(group_id)  # the owner stops seeing the request
                self.forget(group_id)
                return Departure("cancelled")
        view = await self._try_refresh(group_id)
        if view is None:
            raise GroupError(
                "no roster of this group can be read, so the group cannot be told you leave",
                "drop it from your list with: dhtshare group forget GROUP",
            )
        handover, heir = None, None
        if view.owner == self._me.public:
            heir = rules.heir_of(self.members(group_id), self._me.public)
            await self._retire_invite(group_id, view.name)  # requests are sealed to me
            await self._retire_directory(view)  # an heir lists it under an invite of its own
            if heir is None:
                self._withdraw_owned(group_id)  # the last member: the group ends
            else:
                handover = rules.sign_handover(self._me, view.roster, heir.key, self._clock())
        await self._publish_leave(group_id, handover)
        self.forget(group_id)
        return Departure("left", heir)

    async def _publish_leave(self, group_id: bytes, handover: Handover | None) -> None:
        rec = self._sign_note(Leave(group_id, handover), NOTE_TTL)
        await self._dht.publish(Where("epoch", group_id), rec)
        self._leaves.setdefault(group_id, {})[self._me.public] = rec

    async def _cancel_request(self, group_id: bytes) -> None:
        keys = self.state.keys.get(group_id)
        if keys is None or not keys.invite:
            return
        rec = self._sign_note(Leave(group_id, None), NOTE_TTL)
        owner = Invite.parse(keys.invite).owner
        try:
            await self._dht.put(Where("inbox", group_id), rec, to_owner=owner)
        except DhtshareError:
            pass  # the request expires by itself

    def forget(self, group_id: bytes) -> None:
        """Drop ``group_id`` from my groups and requests, and stop republishing my join
        request; nothing is published (``leave`` tells the group). A group I own keeps its
        drafts until its heir takes over (``maintain``)."""
        self._dht.withdraw(key_for(Kind.JOIN_REQUEST, group_id), self._me.public)
        if group_id not in self.state.drafts:
            # my leave (an epoch record) stays published until it expires: an owner that
            # is away for a while still sees it
            self._dht.forget_group(group_id, keep=[Where("epoch", group_id)])
            self.state.keys.pop(group_id, None)
        self.state.groups.pop(group_id, None)
        self.state.requested.pop(group_id, None)
        self.state.request_names.pop(group_id, None)

    async def remove(self, group_id: bytes, member: bytes) -> RosterView:
        """Publish a roster without ``member`` (revoked), and a rejection of its old request."""
        draft = await self._as_owner(group_id)
        current = rules.apply_leaves(draft.members, self._leave_times(group_id))
        members = rules.remove_member(current, member, self._me.public)
        view = await self._next_roster(draft, members, rekey=True)
        if Where("mailbox", group_id, requester=member).resolve(self.state.keys) is not None:
            await self.reject(group_id, member, "removed by the owner")  # closes its request
        return view

    # ---- maintenance ---------------------------------------------------------------

    async def maintain(self) -> list[bytes]:
        """Note accepted requests, apply leaves, take over groups handed to me, renew
        expiring rosters, stop republishing groups I handed away. Returns the groups whose
        roster I published."""
        published: list[bytes] = []
        groups = set(self.state.groups) | set(self.state.drafts) | set(self.state.requested)
        for group_id in sorted(groups):
            try:
                if await self._maintain_one(group_id):
                    published.append(group_id)
            except DhtshareError:
                continue  # unreachable, stale or DHT down for now: only this group waits
        return published

    async def _maintain_one(self, group_id: bytes) -> bool:
        if group_id in self.state.requested:
            await self.status(group_id)  # accepted: it becomes one of my groups
        if group_id not in self.state.groups and group_id not in self.state.drafts:
            return False
        view = await self.refresh(group_id)
        mine = view.owner == self._me.public
        if group_id not in self.state.groups:  # I left: wait until my heir has taken over
            if not mine or self._left_out(group_id):  # it has: the epoch moved on
                self._withdraw_owned(group_id)
            return False
        if not mine:
            return await self._maybe_take_over(view)
        draft = await self._as_owner(group_id)
        current = rules.apply_leaves(draft.members, self._leave_times(group_id))
        expiring = view.record.expires - self._clock() < RENEW_MARGIN
        if current != draft.members or expiring:
            await self._next_roster(draft, current, rekey=current != draft.members)
            return True
        await self._ensure_invite(group_id, view.name)
        await self._ensure_announcement(group_id)
        return False

    async def _announce(
        self, group_id: bytes, epoch: int, old: bytes, secret: bytes, members: list[bytes]
    ) -> None:
        """Publish the pages announcing ``epoch`` (its secret boxed for ``members``) under
        the epoch before it, where members look."""
        pages = epoch_pages(group_id, epoch, old, secret, members)
        here = Where("epoch", group_id, at=epoch - 1)
        recs = [self._sign_note(p, NOTE_TTL) for p in pages]
        await asyncio.gather(*(self._dht.publish(here, r) for r in recs))

    async def _ensure_announcement(self, group_id: bytes) -> None:
        """After a restart, announce again every epoch change whose secrets I still hold
        (pages are republished only while the node that made them runs), each to the
        members it was made for: one who was offline during several changes follows them
        all, and a removed member learns nothing of who joined since."""
        keys = self.state.keys.get(group_id)
        if keys is None:
            return
        for epoch, members in sorted(keys.announced.items()):
            page0 = key_for(Kind.EPOCH, *epoch_key_ids(group_id, epoch, 0))
            old, secret = keys.secrets.get(epoch - 1), keys.secrets.get(epoch)
            if old is None or secret is None:
                continue
            if self._dht.where_of(group_id, page0, self._me.public) is None:
                await self._announce(group_id, epoch, old, secret, members)

    async def _ensure_invite(self, group_id: bytes, name: str) -> None:
        """Keep the inbox's invite record published (after a restart too)."""
        if self._dht.where_of(group_id, key_for(Kind.INVITE), self._me.public) is None:
            keys = self.state.keys.get(group_id)
            if keys is not None and keys.invite:
                await self._publish_invite(group_id, name)

    async def claim(self, group_id: bytes) -> RosterView:
        """``refresh``, then take the group over if its owner left and handed it to me (what
        ``maintain()`` would do on its next round). Owner commands call this first, so the
        heir can act as owner right after the hand-over."""
        view = await self.refresh(group_id)
        if view.owner != self._me.public and group_id in self.state.groups:
            await self._maybe_take_over(view)
        return self._views.get(group_id, view)

    async def _maybe_take_over(self, view: RosterView) -> bool:
        """If the owner left and handed the group to me, publish the next roster as owner."""
        async with self._taking_over:
            view = self._views.get(view.group_id, view)  # another task may have done it
            if view.owner == self._me.public:
                return False
            return await self._take_over(view)

    async def _take_over(self, view: RosterView) -> bool:
        rec = self._leaves.get(view.group_id, {}).get(view.owner)
        body = rec.payload() if rec is not None else None
        if not isinstance(body, Leave) or body.handover is None:
            return False
        if body.handover.new_owner != self._me.public:
            return False
        base, members = rules.take_over(view.roster, view.members, body.handover)
        leaves = self._leave_times(view.group_id)
        draft = Draft(view.seq, base, members)
        self.state.groups[view.group_id] = view.name
        keys = self.state.keys[view.group_id]
        keys.invite = Invite.new(self._me.public).token  # requests are sealed to the owner
        await self._publish_invite(view.group_id, view.name)
        await self._next_roster(draft, rules.apply_leaves(members, leaves), rekey=True)
        return True

    # ---- listing -------------------------------------------------------------------

    async def my_groups(self) -> list[MyGroup]:
        """My groups and requests, with my role (a requester's is ``pending`` or ``rejected``,
        with the owner's reason), refreshed from the DHT where possible. A group handed to me
        is taken over first."""
        out: list[MyGroup] = []
        for group_id in sorted(set(self.state.groups) | set(self.state.requested)):
            role, reason = await self._role(group_id)
            view = self._views.get(group_id)
            if role is not None:
                name = view.name if view else self.state.name_of(group_id)
                size = len(self.members(group_id))
                out.append(MyGroup(group_id, name, role, size, reason))
        return out

    async def _role(self, group_id: bytes) -> tuple[Role | None, str]:
        if group_id in self.state.requested:
            status, reason = await self.status(group_id)
            if status == "pending" or status == "rejected":
                return status, reason
            if status != "accepted":
                return None, ""
        view: RosterView | None
        try:
            view = await self.claim(group_id)
        except GroupError:
            view = self._views.get(group_id)  # keep the last verified view when unreachable
        if view is None:
            return None, ""
        if self._left_out(group_id):
            return "removed", ""
        if view.owner == self._me.public:
            return "owner", ""
        # the last verified roster, even if stale: listing my groups is not serving anyone
        since = rules.member_since(view.members, self._leave_times(group_id), self._me.public)
        return ("member" if since is not None else None), ""

    async def directory(self) -> list[Listing]:
        """Publicly listed groups whose entry its invite's owner signed, one per group and
        owner: anyone can list any group id under an invite of its own, and nothing public
        tells which owner is the group's, so no listing may hide another."""
        found = await self.sealed.dht.get(key_for(Kind.DIRECTORY))
        out: dict[tuple[bytes, bytes], Listing] = {}
        for rec in found:
            listing = _check_listing(rec)
            if listing is not None:
                out[listing.group_id, listing.owner] = listing
        return sorted(out.values(), key=lambda g: (g.name, g.group_id, g.owner))


def _check_listing(rec: SignedRecord) -> Listing | None:
    """A listing from a directory entry its invite's owner signed (the roster is for
    members only, so the member count is as the owner claims it)."""
    entry = rec.payload()
    if not isinstance(entry, DirectoryEntry) or entry.withdrawn or not entry.invite:
        return None
    try:
        invite = Invite.parse(entry.invite)
    except GroupError:
        return None
    if invite.owner != rec.signer:
        return None
    return Listing(entry.group_id, entry.name, entry.member_count, rec.signer, entry.invite)
