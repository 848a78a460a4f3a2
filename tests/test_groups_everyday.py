"""Group messages and rules as people meet them (issue #14 items 5, 6, 7 and 9), on a real
loopback DHT, with a fixed clock so that things happen in the same second."""

from __future__ import annotations

import time

import pytest

from dhtshare.errors import GroupError
from dhtshare.groups.secrets import Invite
from dhtshare.groups.service import GroupService
from dhtshare.identity import Identity
from dhtshare.node.commands import Commands
from dhtshare.sim import Network


class FrozenClock:
    """Wall time that does not move: every step happens in the same second."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


class FakeNode:
    """What ``Commands`` needs for group commands (no shares on this node)."""

    def __init__(self, groups: GroupService) -> None:
        self.groups, self.identity, self.shares = groups, groups._me, {}

    def save_state(self) -> None:
        pass


def commands(service: GroupService) -> Commands:
    return Commands(FakeNode(service))  # type: ignore[arg-type]


async def test_accept_twice_says_already_a_member_and_unknown_name_hints_requests() -> None:
    owner, bob = Identity.generate("owner"), Identity.generate("bob")
    async with Network.start(6) as net:
        so, sb = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], bob)
        gid = await so.create("climbers")
        await sb.request_join(so.state.keys[gid].invite)
        await so.accept(gid, bob.public)
        with pytest.raises(GroupError, match=r"^bob is already a member$"):
            await so.accept(gid, bob.public)
        with pytest.raises(GroupError, match="unknown member: zed") as caught:
            await commands(so).member(gid, "zed", pending=True)
        assert "group requests" in caught.value.hint


async def test_rejoin_in_the_same_second_as_the_leave_is_pending_and_accepted() -> None:
    owner, bob = Identity.generate("owner"), Identity.generate("bob")
    clock = FrozenClock()
    async with Network.start(6) as net:
        so = GroupService(net.nodes[1], owner, clock=clock)
        sb = GroupService(net.nodes[2], bob, clock=clock)
        gid = await so.create("climbers")
        invite = so.state.keys[gid].invite
        await sb.request_join(invite)
        await so.accept(gid, bob.public)
        await sb.leave(gid)
        await sb.request_join(invite)  # same second as the leave
        assert [p.requester for p in await so.requests(gid)] == [bob.public]
        await so.accept(gid, bob.public)
        assert await sb.status(gid) == ("accepted", "")  # bob reads his grant
        await sb.refresh(gid)
        assert sb.is_member(gid, bob.public)


async def test_request_in_the_same_second_as_a_rejection_is_pending() -> None:
    owner, bob = Identity.generate("owner"), Identity.generate("bob")
    clock = FrozenClock()
    async with Network.start(6) as net:
        so = GroupService(net.nodes[1], owner, clock=clock)
        sb = GroupService(net.nodes[2], bob, clock=clock)
        gid = await so.create("climbers")
        invite = so.state.keys[gid].invite
        await sb.request_join(invite)
        await so.reject(gid, bob.public, "not yet")
        assert await sb.status(gid) == ("rejected", "not yet")
        await sb.request_join(invite, "now?")  # same second as the rejection
        assert [p.message for p in await so.requests(gid)] == ["now?"]
        assert await sb.status(gid) == ("pending", "")


async def test_join_unknown_group_leave_never_joined_and_duplicate_names() -> None:
    owner, carol = Identity.generate("owner"), Identity.generate("carol")
    async with Network.start(6) as net:
        so, sc = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], carol)
        nowhere = Invite.new(Identity.generate().public).token  # an invite nobody published
        with pytest.raises(GroupError, match="no group was found for this invite"):
            await sc.request_join(nowhere)
        with pytest.raises(GroupError, match="that is not an invite") as caught:
            await sc.request_join(bytes(32).hex())  # a group id is not enough any more
        assert "whole invite" in caught.value.hint
        assert sc.state.requested == {} and sc.state.request_names == {}
        assert sc.state.keys == {}
        gid = await so.create("climbers")
        with pytest.raises(GroupError, match="not a member"):
            await sc.leave(gid)
        assert not net.nodes[2].published  # no Leave record was published
        with pytest.raises(GroupError, match="already own a group named 'climbers'"):
            await so.create(" climbers ")
        assert list(so.state.groups) == [gid]
        other = await so.create("hikers")
        so.state.groups[other] = "climbers"  # e.g. two groups named alike before this check
        with pytest.raises(GroupError, match="ambiguous") as caught:
            commands(so)._lookup("climbers")
        assert gid.hex()[:12] in caught.value.message and other.hex()[:12] in caught.value.message
        await so.leave(other)
        assert commands(so)._lookup("climbers") == gid


class EmptyDht:
    """A DHT that has lost every record (e.g. a group whose roster expired)."""

    def __init__(self, node: object) -> None:
        self.node = node

    async def get(self, key: bytes) -> list[object]:
        return []

    def withdraw(self, key: bytes, slot: bytes) -> None:
        self.node.withdraw(key, slot)  # type: ignore[attr-defined]


async def test_a_group_without_roster_cannot_be_left_but_can_be_forgotten() -> None:
    owner, bob = Identity.generate("owner"), Identity.generate("bob")
    async with Network.start(6) as net:
        so, sb = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], bob)
        gid = await so.create("climbers")
        await sb.request_join(so.state.keys[gid].invite)
        await so.accept(gid, bob.public)
        assert await sb.status(gid) == ("accepted", "")  # bob reads his grant
        await sb.refresh(gid)
        assert [g.role for g in await sb.my_groups()] == ["member"]
        lost = GroupService(EmptyDht(net.nodes[2]), bob, sb.state)  # type: ignore[arg-type]
        with pytest.raises(GroupError, match="no roster") as caught:
            await lost.leave(gid)
        assert "group forget" in caught.value.hint
        done = await commands(lost).cmd_group_forget(None, "climbers")  # type: ignore[arg-type]
        assert done == {"group_id": gid.hex(), "name": "climbers", "stopped_shares": []}
        assert lost.state.groups == {} and await lost.my_groups() == []


async def test_an_accepted_request_is_a_group_on_the_next_refresh() -> None:
    """No maintenance round and no status call: a command's refresh reads the grant first
    (what ``group members GROUP`` right after the owner's accept does)."""
    owner, bob = Identity.generate("owner"), Identity.generate("bob")
    async with Network.start(6) as net:
        so, sb = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], bob)
        gid = await so.create("climbers")
        await sb.request_join(so.state.keys[gid].invite)
        await so.accept(gid, bob.public)
        view = await sb.refresh(gid)
        assert {m.key for m in view.members} == {owner.public, bob.public}
        assert sb.is_member(gid, bob.public)
        assert sb.state.groups == {gid: "climbers"} and sb.state.requested == {}
