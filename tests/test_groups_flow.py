"""Groups through a real DHT: each person's GroupService on its own node of a sim Network."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace

import pytest
from conftest import FakeClock
from support.groups import (
    NODES,
    LyingDht,
    commands,
    epoch_of,
    grow,
    invite_of,
    no_progress,
    people,
    sealed_lies,
)

from dhtshare import crypto
from dhtshare.errors import GroupError
from dhtshare.groups import rules
from dhtshare.groups.keyring import GroupKeys, Where
from dhtshare.groups.secrets import Invite, Space, seal
from dhtshare.groups.service import Draft, GroupService, GroupState
from dhtshare.identity import Identity, format_id
from dhtshare.records import (
    Handover,
    Kind,
    Member,
    SignedRecord,
    decode_record,
    key_for,
    sign_record,
)
from dhtshare.sim import Network


async def test_create_request_accept_reject_and_list() -> None:
    owner, alice, bob, carol = people("owner", "alice", "bob", "carol")
    async with Network.start(NODES) as net:
        so, sa, sb, sc = (
            GroupService(net.nodes[i + 1], p) for i, p in enumerate((owner, alice, bob, carol))
        )
        gid = await so.create("climbers", public=True)
        invite = invite_of(so, gid)
        for s in (sa, sb, sc):
            assert await s.request_join(invite, "let me in") == gid
        pending = await so.requests(gid)
        assert {(p.requester, p.name, p.message) for p in pending} == {
            (alice.public, "alice", "let me in"),
            (bob.public, "bob", "let me in"),
            (carol.public, "carol", "let me in"),
        }
        assert await sa.status(gid) == ("pending", "")
        await so.accept(gid, alice.public)
        view = await so.accept(gid, bob.public)
        await so.reject(gid, carol.public, "group is full")
        assert view.seq == 3 and view.group_id == gid
        assert await so.requests(gid) == []
        assert await sc.status(gid) == ("rejected", "group is full")
        assert await sa.status(gid) == ("accepted", "")
        with pytest.raises(GroupError, match="no pending join request"):
            await so.accept(gid, carol.public)
        with pytest.raises(GroupError, match="only the group's owner"):
            await sa.accept(gid, carol.public)

        assert [(g.group_id, g.role, g.members) for g in await so.my_groups()] == [
            (gid, "owner", 3)
        ]
        assert [(g.role, g.name) for g in await sb.my_groups()] == [("member", "climbers")]
        assert [(g.role, g.name, g.reason) for g in await sc.my_groups()] == [
            ("rejected", "climbers", "group is full")
        ]
        assert await GroupService(net.nodes[6], Identity.generate()).status(gid) == ("none", "")

        await sb.refresh(gid)  # a member reads the roster
        assert sb.member_since(gid, owner.public) == view.roster.genesis.created
        assert sb.member_since(gid, bob.public) is not None
        assert sb.member_since(gid, carol.public) is None
        # private groups: carol (rejected, holding the invite) and a stranger find no roster
        for outsider in (sc, GroupService(net.nodes[7], carol)):
            with pytest.raises(GroupError, match="no valid roster"):
                await outsider.refresh(gid)
        listed = await GroupService(net.nodes[7], carol).directory()  # public: anyone lists it
        assert [(g.group_id, g.name, g.members, g.owner, g.invite) for g in listed] == [
            (gid, "climbers", 3, owner.public, invite)
        ]


async def test_private_group_is_not_listed_and_pending_role_shows() -> None:
    owner, alice = people("owner", "alice")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        gid = await so.create("secret")
        await sa.request_join(invite_of(so, gid))
        assert [(g.group_id, g.role) for g in await sa.my_groups()] == [(gid, "pending")]
        assert await sa.directory() == []


def forged_rosters(owner: Identity, mallory: Identity, gid_roster: rules.RosterView) -> list[bytes]:
    """A roster signed by a non-owner, and one whose hand-over to mallory mallory signed."""
    roster = gid_roster.roster
    not_owner = sign_record(mallory, roster, seq=50, now=time.time(), ttl=3600)
    message = Handover.message(roster.group_id, 0, mallory.public, int(time.time()))
    fake = Handover(
        mallory.public, int(time.time()), crypto.sign(mallory.signing_key, "handover", message)
    )
    chained = replace(roster, handovers=(fake,))
    forged_chain = sign_record(mallory, chained, seq=60, now=time.time(), ttl=3600)
    return [not_owner.encode(), forged_chain.encode()]


async def test_forged_rosters_are_refused_by_storing_nodes_and_readers() -> None:
    """A throw-away key cannot write under the group's sealed roster key (storing nodes
    refuse it); a member, who holds the epoch secret and so can seal, still cannot forge
    the owner's roster: members refuse what is inside."""
    owner, mallory, alice = people("owner", "mallory", "alice")
    async with Network.start(NODES) as net:
        so, sm, sa = (
            GroupService(net.nodes[i + 1], p) for i, p in enumerate((owner, mallory, alice))
        )
        gid = await so.create("climbers")
        await grow(so, gid, [sm, sa])
        view = await sa.fetch_roster(gid)
        forged = [decode_record(raw) for raw in forged_rosters(owner, mallory, view)]
        sender = net.nodes[2]
        assert sender.protocol is not None
        clear, now = key_for(Kind.ROSTER, gid), time.time()
        for lie in forged:  # in the clear, under the old key: still refused
            for target in net.nodes[3:]:
                answered, kept = await sender.protocol.store(
                    target.address, sender.node.id, clear, lie.encode()
                )
                assert answered and kept is False

        space = epoch_of(sm, gid)
        key = space.dht_key(clear)
        # a throw-away key (of a space it made up) writing under the group's sealed key
        junk = seal(Space(os.urandom(32), "epoch"), forged[0], author=mallory, seq=9, now=now)
        raw = junk.encode()
        for target in net.nodes[3:]:
            answered, kept = await sender.protocol.store(target.address, sender.node.id, key, raw)
            assert answered and kept is False
            assert target.storage.add(key, raw, now) == "wrong_key"

        lies = sealed_lies(space, mallory, forged, now)  # a member can seal: it is opaque
        assert set(lies) == {key}

        def inject(k: bytes) -> list[SignedRecord]:
            return lies.get(k, [])

        reader = GroupService(LyingDht(net.nodes[4], inject), alice, sa.state)
        got = await reader.fetch_roster(gid)
        assert got.seq == view.seq and got.owner == owner.public
        only_lies = LyingDht(net.nodes[4], inject, only_extra=True)
        with pytest.raises(GroupError, match="no valid roster"):
            await GroupService(only_lies, alice, sa.state).fetch_roster(gid)


async def test_stale_roster_is_not_accepted() -> None:
    owner, alice, bob = people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        so, sa, sb = (GroupService(net.nodes[i + 1], p) for i, p in enumerate((owner, alice, bob)))
        gid = await so.create("climbers")
        await grow(so, gid, [sa])
        reader = sa  # a member reads the roster
        old = (await reader.fetch_roster(gid)).record
        key = epoch_of(sa, gid).dht_key(key_for(Kind.ROSTER, gid))
        olds = {r.encode() for n in net.nodes for r in n.storage.records(key, time.time())}
        assert len(olds) == 1  # version 2, sealed as storing nodes hold it
        [old_outer] = [decode_record(raw) for raw in olds]
        await grow(so, gid, [sb])
        assert (await reader.fetch_roster(gid)).seq == 3
        holders = [n for n in net.nodes if n.storage.count(key)]
        assert holders
        for node in holders:  # nodes holding version 3 refuse version 2
            assert node.storage.add(key, old_outer.encode(), time.time()) == "stale"

        # a node that only has version 2 (or lies) cannot roll the reader back
        stale = LyingDht(net.nodes[3], lambda k: [old_outer] if k == key else [], only_extra=True)
        rolled = GroupService(stale, alice, reader.state)
        with pytest.raises(rules.StaleRosterError):
            await rolled.fetch_roster(gid)
        # ...also after the reader's state was saved and loaded again
        saved = GroupState.from_json(json.loads(json.dumps(reader.state.to_json())))
        with pytest.raises(rules.StaleRosterError):
            await GroupService(stale, alice, saved).fetch_roster(gid)
        # a member that never saw version 3 takes version 2: that is all it can know
        keys = GroupKeys.from_json(reader.state.keys[gid].to_json())
        fresh = GroupService(stale, alice, GroupState(keys={gid: keys}))
        got = await fresh.fetch_roster(gid)
        assert got.seq == 2 and got.record == old


async def test_owner_leaves_and_longest_standing_member_takes_over() -> None:
    owner, alice, bob, dave = people("owner", "alice", "bob", "dave")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so, sa, sb, sd = (
            GroupService(net.nodes[i + 1], p, clock=clock)
            for i, p in enumerate((owner, alice, bob, dave))
        )
        gid = await so.create("climbers", public=True)
        old_invite = invite_of(so, gid)
        await grow(so, gid, [sa, sb], clock)  # alice joined first
        clock.advance(10)
        await so.leave(gid)
        await sb.refresh(gid)
        assert sb.member_since(gid, owner.public) is None  # gone at once for readers
        assert await sb.maintain() == []  # bob is not the heir
        assert await sa.maintain() == [gid]  # alice is: she publishes the next roster

        view = await sb.refresh(gid)
        assert view.group_id == gid and view.owner == alice.public
        assert len(view.roster.handovers) == 1
        assert {m.key for m in view.members} == {alice.public, bob.public}
        assert [(g.group_id, g.role) for g in await sa.my_groups()] == [(gid, "owner")]
        assert await so.my_groups() == []
        await so.maintain()  # the old owner sees the heir's roster and stops republishing it
        assert all(r.signer != owner.public for r in so.sealed.published if r.kind == Kind.ROSTER)
        with pytest.raises(GroupError, match="no group was found for this invite"):
            await sd.request_join(old_invite)  # the old owner's invite went with it
        await sd.request_join(invite_of(sa, gid))  # the heir's invite: requests are sealed to her
        assert [p.requester for p in await sa.requests(gid)] == [dave.public]
        after = await sa.accept(gid, dave.public)
        assert after.group_id == gid and after.owner == alice.public
        await sb.refresh(gid)
        assert sb.is_member(gid, dave.public)
        with pytest.raises(GroupError, match="only the group's owner"):
            await so.accept(gid, dave.public)


async def test_member_leave_then_owner_applies_it() -> None:
    owner, alice, bob = people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        so, sa, sb = (GroupService(net.nodes[i + 1], p) for i, p in enumerate((owner, alice, bob)))
        gid = await so.create("climbers")
        await grow(so, gid, [sa, sb])
        await sb.leave(gid)
        await sa.refresh(gid)
        assert not sa.is_member(gid, bob.public) and sa.is_member(gid, alice.public)
        before = (await so.fetch_roster(gid)).seq
        assert await so.maintain() == [gid]
        view = await sa.refresh(gid)
        assert view.seq == before + 1
        assert {m.key for m in view.members} == {owner.public, alice.public}
        assert await so.maintain() == []  # nothing left to apply
        assert await so.requests(gid) == []  # bob's old request is not pending again


async def test_removed_member_is_gone_for_every_member() -> None:
    ids = people("owner", "alice", "bob", "carol")
    async with Network.start(NODES) as net:
        services = [GroupService(net.nodes[i + 1], p) for i, p in enumerate(ids)]
        so, sa, sb, sc = services
        gid = await so.create("climbers")
        await grow(so, gid, [sa, sb, sc])
        for s in services:
            await s.refresh(gid)
            assert s.is_member(gid, ids[2].public)
        await so.remove(gid, ids[2].public)
        for s in (so, sa, sc):
            await s.refresh(gid)
            assert s.member_since(gid, ids[2].public) is None
            assert s.is_member(gid, ids[1].public)
        # bob's node sees an epoch change without a key for it: it reads nothing new
        await sb.refresh(gid)
        assert sb.state.keys[gid].removed and sb.access_key(gid) is None
        assert (await sb.fetch_roster(gid)).seq < (await so.fetch_roster(gid)).seq
        assert [(g.name, g.role) for g in await sb.my_groups()] == [("climbers", "removed")]
        assert await sb.status(gid) == ("none", "")  # no longer a member, no open request
        assert await so.requests(gid) == []  # its old request does not come back


async def test_thousand_member_roster_round_trips() -> None:
    owner, reader_id = people("owner", "reader")
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        gid = await so.create("big")
        first = await so.fetch_roster(gid)
        now = time.time()
        extra = tuple(Member(os.urandom(32), f"member{i}", int(now)) for i in range(999))
        members = first.members + extra
        roster, pages = rules.layout(first.roster, members, 2)
        here = Where("epoch", gid)
        for page in pages:
            await so.sealed.publish(here, sign_record(owner, page, seq=2, now=now, ttl=3600))
        await so.sealed.publish(here, sign_record(owner, roster, seq=2, now=now, ttl=3600))

        keys = GroupKeys.from_json(so.state.keys[gid].to_json())  # a member's secrets
        reader = GroupService(net.nodes[6], reader_id, GroupState(keys={gid: keys}))
        view = await reader.refresh(gid)
        assert view.seq == 2 and len(view.members) == 1000
        assert view.members == members
        assert reader.member_since(gid, extra[-1].key) == int(now)
        assert reader.member_since(gid, os.urandom(32)) is None


def test_state_round_trips_through_json() -> None:
    owner = Identity.generate("owner")
    base, members = rules.found_group(owner, "g", now=1_800_000_000, nonce=b"\x01" * 16)
    state = GroupState(
        {base.group_id: "g"},
        {os.urandom(32): 5},
        {base.group_id: rules.Known(3, 0, rules.chain_digest(()))},
        {base.group_id: Draft(3, base, members)},
    )
    assert GroupState.from_json(json.loads(json.dumps(state.to_json()))) == state
    with pytest.raises(GroupError, match="damaged"):
        GroupState.from_json({"version": 1, "groups": {"zz": "x"}})


async def test_requester_sees_pending_then_rejected_and_names_the_group() -> None:
    owner, dave = people("owner", "dave")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner, clock=clock)
        sd = GroupService(net.nodes[2], dave, clock=clock)
        gid = await so.create("climbers")  # private: dave has only the invite
        invite = invite_of(so, gid)
        assert await sd.request_join(invite, "hi") == gid
        assert sd.state.name_of(gid) == "climbers"  # learnt from the invite when requesting
        cmds = commands(sd)
        assert [(g.role, g.name, g.reason) for g in await sd.my_groups()] == [
            ("pending", "climbers", "")
        ]
        assert await cmds.group("climbers") == gid  # by name, though not a member
        with pytest.raises(GroupError, match="still pending"):
            await cmds.require_member(await cmds.group("climbers"))

        await so.reject(gid, dave.public, "not this time")
        assert [(g.role, g.name, g.reason) for g in await sd.my_groups()] == [
            ("rejected", "climbers", "not this time")
        ]
        rows = await cmds.cmd_group_list(no_progress)
        assert rows == [
            {
                "group_id": gid.hex(),
                "name": "climbers",
                "role": "rejected",
                "members": 0,  # a requester cannot read the roster (members only)
                "reason": "not this time",
            }
        ]
        assert await cmds.group("climbers") == gid
        with pytest.raises(GroupError, match="rejected your request to join: not this time"):
            await cmds.require_member(await cmds.group("climbers"))

        # the name survives a restart, and an older state file without names still loads
        doc = json.loads(json.dumps(sd.state.to_json()))
        restarted = GroupService(net.nodes[2], dave, GroupState.from_json(doc))
        assert await commands(restarted).group("climbers") == gid
        del doc["request_names"]
        assert GroupState.from_json(doc).name_of(gid) == ""

        # asking again after a rejection is pending again; leaving withdraws it entirely
        clock.advance(10)
        await sd.request_join(invite, "please")
        assert [g.role for g in await sd.my_groups()] == ["pending"]
        await sd.leave(gid)
        assert await sd.my_groups() == []
        with pytest.raises(GroupError, match="unknown group"):
            await commands(sd).group("climbers")


async def test_heir_acts_as_owner_right_after_the_hand_over() -> None:
    owner, alice, bob, dave, erin = people("owner", "alice", "bob", "dave", "erin")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so, sa, sb, sd, se = (
            GroupService(net.nodes[i + 1], p, clock=clock)
            for i, p in enumerate((owner, alice, bob, dave, erin))
        )
        gid = await so.create("climbers")
        await grow(so, gid, [sa, sb], clock)  # alice joined first: she is the heir
        old_invite = invite_of(so, gid)
        await sd.request_join(old_invite, "hi")
        clock.advance(10)
        before = (await so.fetch_roster(gid)).seq
        await so.leave(gid)

        # no maintenance round: alice's owner commands take the group over on demand; a
        # request sealed to the old owner is not hers to read: she has an invite of her own
        assert await sa.requests(gid) == []
        assert invite_of(sa, gid) != old_invite
        await sd.request_join(invite_of(sa, gid), "hi")
        assert [p.requester for p in await sa.requests(gid)] == [dave.public]
        view = await sa.fetch_roster(gid)
        assert view.owner == alice.public and view.seq == before + 1
        assert len(view.roster.handovers) == 1
        after = await sa.accept(gid, dave.public)
        assert after.owner == alice.public and after.seq == before + 2
        assert await sd.status(gid) == ("accepted", "")  # dave reads his grant
        assert await sa.maintain() == []  # nothing left to take over or apply
        await sb.refresh(gid)
        assert sb.is_member(gid, dave.public) and not sb.is_member(gid, owner.public)
        with pytest.raises(GroupError, match="only the group's owner"):
            await sb.requests(gid)  # bob is no heir: nothing to take over

        # the same through the commands, and for `group list`, with a second hand-over
        clock.advance(10)
        await sa.leave(gid)  # bob is the longest-standing member now
        cmds = commands(sb)
        members = await cmds.cmd_group_members(no_progress, "climbers")
        assert {(m["name"], m["role"]) for m in members} == {("bob", "owner"), ("dave", "member")}
        assert all(isinstance(m["since_ts"], int) and m["since"] for m in members)
        assert [(g.role, g.members) for g in await sb.my_groups()] == [("owner", 2)]
        await se.request_join(invite_of(sb, gid))
        assert [r["name"] for r in await cmds.cmd_group_requests(no_progress, "climbers")] == [
            "erin"
        ]
        assert await cmds.cmd_group_accept(no_progress, "climbers", "erin") == {
            "id": format_id(erin.public),
            "name": "erin",
        }
        assert cmds.node.saved >= 1  # the new owner's draft is saved
        final = await sd.refresh(gid)
        assert final.owner == bob.public and len(final.roster.handovers) == 2
        assert {m.key for m in final.members} == {bob.public, dave.public, erin.public}


async def test_concurrent_take_overs_publish_one_roster() -> None:
    owner, alice = people("owner", "alice")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so, sa = (
            GroupService(net.nodes[i + 1], p, clock=clock) for i, p in enumerate((owner, alice))
        )
        gid = await so.create("climbers")
        await grow(so, gid, [sa], clock)
        clock.advance(10)
        before = (await so.fetch_roster(gid)).seq
        await so.leave(gid)
        await asyncio.gather(sa.maintain(), sa.requests(gid), sa.my_groups(), sa.claim(gid))
        keys = GroupKeys.from_json(sa.state.keys[gid].to_json())  # read afresh, as alice
        reader = GroupService(net.nodes[5], alice, GroupState(keys={gid: keys}))
        view = await reader.fetch_roster(gid)
        assert view.owner == alice.public and view.seq == before + 1


async def test_bad_names_and_long_texts_are_refused_before_signing() -> None:
    owner, alice = people("owner", "alice")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        for name, match in [
            ("", "needs a name"),
            ("   ", "needs a name"),
            ("x" * 65, "at most 64 bytes"),
            ("é" * 33, "this one has 66"),
            ("two\nlines", "control characters"),
        ]:
            with pytest.raises(GroupError, match=match) as caught:
                await so.create(name)
            assert caught.value.hint and "\n" not in caught.value.message
        assert so.state.groups == {} and not net.nodes[1].published

        gid = await so.create("  climbers ")
        assert so.state.groups == {gid: "climbers"}
        assert (await so.fetch_roster(gid)).name == "climbers"
        invite = invite_of(so, gid)
        assert (await sa.read_invite(Invite.parse(invite))).name == "climbers"
        assert rules.check_group_name("é" * 32) == "é" * 32  # 64 bytes: just fits

        with pytest.raises(GroupError, match="join message is at most 280 bytes") as caught:
            await sa.request_join(invite, "m" * 281)
        assert caught.value.hint == "shorten the join message"
        assert sa.state.requested == {} and not net.nodes[2].published
        await sa.request_join(invite, "m" * 280)
        with pytest.raises(GroupError, match="reason is at most 280 bytes"):
            await so.reject(gid, alice.public, "r" * 281)
        assert [p.requester for p in await so.requests(gid)] == [alice.public]
