"""Arbitrary, validly signed records of every kind read from the DHT (issue #13).

A lying DHT answers every key with the genuine records plus records of any kind, with
any field values, signed by a member, an outsider or a throw-away key (so they pass their
signature). The readers in ``groups/service.py`` and ``files/service.py`` raise nothing
but the project's typed errors, and never make a non-member a member.

Since issue 17 the genuine records are sealed, so the lies come sealed as whoever holds a
group secret can seal them (into the epoch, as a member; into the invite's inbox, to the
owner or not, as an invite holder), and also in the clear; they include the inner kinds
(grants, epoch pages, invite records) a reader now trusts for keys.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhtshare import crypto
from dhtshare.errors import DhtshareError, RecordError
from dhtshare.files.service import FileService
from dhtshare.groups import rules
from dhtshare.groups.keyring import GroupKeys
from dhtshare.groups.secrets import Invite, Space, epoch_box, epoch_space, seal
from dhtshare.groups.service import GroupService, GroupState
from dhtshare.identity import Identity
from dhtshare.records import (
    MAX_NAME,
    Body,
    Decision,
    DirectoryEntry,
    EpochPage,
    FileEntry,
    Genesis,
    Grant,
    Handover,
    InviteInfo,
    JoinRequest,
    Leave,
    Member,
    PeerInfo,
    Provider,
    Roster,
    RosterPage,
    SignedRecord,
    decode_record,
    sign_record,
)

NOW = time.time()
OWNER, MEMBER, OUTSIDER = (Identity.generate(n) for n in ("owner", "member", "outsider"))
THROWAWAY = Identity.generate("throwaway")
SIGNERS = (MEMBER, OUTSIDER, THROWAWAY)  # anyone but the owner, whose word is authority


SECRET = os.urandom(32)  # the epoch secret owner and member hold
EPOCH = epoch_space(SECRET)
INVITE = Invite.new(OWNER.public)


def _genuine() -> tuple[bytes, list[SignedRecord]]:
    base, members = rules.found_group(OWNER, "club", now=NOW - 100, nonce=b"\x07" * 16)
    members = (*members, Member(MEMBER.public, "member", int(NOW - 50)))
    roster, _pages = rules.layout(base, members, 2)
    rec = sign_record(OWNER, roster, seq=2, now=NOW - 10, ttl=3600)
    info_body = InviteInfo(base.group_id, "club", space=INVITE.space.writer.public)
    info = sign_record(OWNER, info_body, seq=1, now=NOW - 10, ttl=3600)
    return base.group_id, [rec, info]


GID, GENUINE = _genuine()
GENESIS = GENUINE[0].payload()
assert isinstance(GENESIS, Roster)
SEALED_GENUINE = [
    seal(EPOCH, GENUINE[0], author=OWNER, seq=1, now=NOW),
    seal(INVITE.space, GENUINE[1], author=OWNER, seq=1, now=NOW),
]


def keys_held() -> GroupKeys:
    """What owner and member hold of the group: the epoch secret and the invite."""
    keys = GroupKeys(invite=INVITE.token)
    keys.install(0, SECRET)
    return keys


ids = st.sampled_from([GID, OWNER.public, MEMBER.public, OUTSIDER.public, b"\x00" * 32]) | (
    st.binary(min_size=32, max_size=32)
)
keys = st.sampled_from([OWNER.public, MEMBER.public, OUTSIDER.public, THROWAWAY.public])
names = st.text(max_size=MAX_NAME // 4)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
hosts = st.sampled_from(["127.0.0.1", "::1", "10.0.0.1", "0.0.0.0", "bad\x00host", ""])
ports = st.integers(1, 65535)


@st.composite
def handovers(draw: Any) -> Handover:
    signer = draw(st.sampled_from(SIGNERS))
    new_owner, at, index = draw(keys), draw(u64), draw(st.integers(0, 3))
    sig = crypto.sign(signer.signing_key, "handover", Handover.message(GID, index, new_owner, at))
    return Handover(new_owner, at, draw(st.sampled_from([sig, bytes(64)])))


members = st.builds(Member, keys | ids, names, u64)


@st.composite
def rosters(draw: Any) -> Roster:
    if draw(st.booleans()):  # the genuine founding record, with a chain nobody valid signed
        genesis, gsig = GENESIS.genesis, GENESIS.genesis_sig
    else:
        owner = draw(st.sampled_from(SIGNERS))
        genesis = Genesis(
            owner.public, draw(names), draw(u64), draw(st.binary(min_size=16, max_size=16))
        )
        gsig = crypto.sign(owner.signing_key, "genesis", genesis.encode())
    return Roster(
        genesis,
        gsig,
        tuple(draw(st.lists(handovers(), max_size=3))),
        draw(st.booleans()),
        tuple(draw(st.lists(members, max_size=4))),
        draw(u32),
        tuple(draw(st.lists(st.binary(min_size=32, max_size=32), max_size=3))),
    )


def _try(build: Any, *args: Any) -> Body | None:
    try:
        body: Body = build(*args)
    except ValueError:
        return None  # a value no record can carry: nobody can sign it either
    return body


@st.composite
def bodies(draw: Any) -> Body | None:
    gid = draw(st.sampled_from([GID, GID, os.urandom(32)]))
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return draw(rosters())
    if kind == 1:
        page = (
            gid,
            draw(u64),
            draw(st.integers(0, 39)),
            tuple(draw(st.lists(members, max_size=4))),
        )
        return _try(RosterPage, *page)
    if kind == 2:
        return _try(JoinRequest, gid, draw(names), draw(names))
    if kind == 3:
        return _try(Decision, gid, draw(keys), draw(st.booleans()), draw(names))
    if kind == 4:
        return _try(Leave, gid, draw(st.none() | handovers()))
    if kind == 5:
        entry = (gid, draw(ids), draw(names), draw(u64), draw(u32), draw(st.booleans()))
        return _try(FileEntry, *entry)
    if kind == 6:
        prov = (gid, draw(ids), draw(hosts), draw(ports), draw(st.booleans()), draw(st.booleans()))
        return _try(Provider, *prov)
    if kind == 7:
        return _try(PeerInfo, tuple(draw(st.lists(st.tuples(hosts, ports), max_size=3))))
    if kind == 8:  # a grant: a secret of the lie's choosing, for any epoch
        return _try(Grant, gid, draw(u32), draw(st.binary(min_size=32, max_size=32)), draw(names))
    if kind == 9:  # the next epoch, with a box for the member or the owner (hint and all)
        whom = draw(st.sampled_from([MEMBER.public, OWNER.public]))
        box = epoch_box(SECRET, whom, draw(st.binary(min_size=32, max_size=32)))
        count = draw(st.integers(1, 3))
        page = (gid, draw(st.sampled_from([1, 2, 2**32 - 1])), draw(st.integers(0, count - 1)))
        return _try(EpochPage, *page, count, (box,))
    if kind == 10:
        return _try(InviteInfo, gid, draw(names))
    return _try(DirectoryEntry, gid, draw(names), draw(u32), draw(st.booleans()))


@st.composite
def hostile_records(draw: Any) -> SignedRecord | None:
    body = draw(bodies())
    if body is None:
        return None
    signer = draw(st.sampled_from(SIGNERS))
    seq = draw(u64)
    issued = NOW + draw(st.integers(-3600, 3600))
    try:
        rec = sign_record(signer, body, seq=seq, now=issued, ttl=draw(st.integers(1, 7200)))
    except RecordError:
        return None  # too large to sign
    space: Space | None = draw(st.sampled_from([EPOCH, INVITE.space, None]))
    if space is not None:  # sealed by a member (epoch) or an invite holder (inbox)
        to_owner = OWNER.public if space is INVITE.space and draw(st.booleans()) else None
        try:
            rec = seal(space, rec, author=signer, seq=draw(u32), now=NOW, to_owner=to_owner)
        except RecordError:
            return None  # too large to seal
    return decode_record(rec.encode())  # as it arrives from the network


class LyingDht:
    """Every key answers the genuine records under it plus every hostile record."""

    def __init__(self, hostile: list[SignedRecord]) -> None:
        self.hostile = hostile

    async def get(self, key: bytes) -> list[SignedRecord]:
        genuine = [r for r in SEALED_GENUINE if r.dht_key == key]
        return [*genuine, *self.hostile]

    async def put(self, record: SignedRecord) -> int:
        return 1

    async def publish(self, record: SignedRecord, renew: Any = None) -> int:
        return 1

    def withdraw(self, key: bytes, slot: bytes) -> None:
        return None


async def _read(call: Any) -> None:
    try:
        await call
    except DhtshareError:
        pass  # a typed refusal is a fine answer to lies


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(st.lists(hostile_records(), min_size=1, max_size=8))
async def test_arbitrary_signed_records_raise_only_typed_errors_and_admit_nobody(
    found: list[SignedRecord | None],
) -> None:
    hostile = [r for r in found if r is not None]
    dht = LyingDht(hostile)
    member = GroupService(dht, MEMBER, GroupState(keys={GID: keys_held()}), clock=lambda: NOW)
    owner = GroupService(dht, OWNER, GroupState(keys={GID: keys_held()}), clock=lambda: NOW)
    member.state.groups[GID] = "club"
    owner.state.groups[GID] = "club"
    for service in (member, owner):
        await _read(service.refresh(GID))
        await _read(service.status(GID))
        await _read(service.my_groups())
        await _read(service.directory())
        await _read(service.maintain())
    await _read(owner.requests(GID))
    files = FileService(member.sealed, MEMBER, lambda: ("127.0.0.1", 1), clock=lambda: NOW)
    listed = []
    try:
        listed = await files.list_files(GID, member.is_member)
        for info in listed:
            await files.providers(GID, info.entry.content_id, member.is_member)
    except DhtshareError:
        pass

    for service in (member, owner):
        for stranger in (OUTSIDER, THROWAWAY):
            assert not service.is_member(GID, stranger.public)

    assert all(info.sharer == MEMBER.public for info in listed)
    # no lie moves the member to an epoch (grants and epoch pages included); the owner only
    # to one it made itself (a leave the member signed starts a new epoch)
    assert member.state.keys[GID].secrets == {0: SECRET}
    assert set(owner.state.keys[GID].secrets) <= {0, 1}
