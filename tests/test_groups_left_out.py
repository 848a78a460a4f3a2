"""A node the group's epoch moved on without: a removed member, and an owner that handed
the group over. Neither can read the new epoch, so neither can learn from the roster that
it is out; what it knows is that the epoch changed without a key for it."""

from __future__ import annotations

import time

import pytest
from conftest import FakeClock
from support.groups import NODES, grow, people

from dhtshare.errors import GroupError
from dhtshare.groups.service import GroupService
from dhtshare.records import Kind
from dhtshare.sim import Network


async def test_a_removed_member_no_longer_lists_the_group_nor_acts_in_it() -> None:
    owner, alice, bob = people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        so, sa, sb = (GroupService(net.nodes[i + 1], p) for i, p in enumerate((owner, alice, bob)))
        gid = await so.create("climbers")
        await grow(so, gid, [sa, sb])
        assert [g.role for g in await sb.my_groups()] == ["member"]
        await so.remove(gid, bob.public)
        await sb.refresh(gid)
        assert sb.state.keys[gid].removed
        assert [g.role for g in await sb.my_groups()] == ["removed"]
        assert await sb.status(gid) == ("none", "")
        assert [g.role for g in await sa.my_groups()] == ["member"]


async def test_an_owner_that_handed_over_stops_publishing_once_the_heir_took_over() -> None:
    owner, alice = people("owner", "alice")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so, sa = (
            GroupService(net.nodes[i + 1], p, clock=clock) for i, p in enumerate((owner, alice))
        )
        gid = await so.create("climbers")
        await grow(so, gid, [sa], clock)
        clock.advance(10)
        await so.leave(gid)
        await so.maintain()  # the heir has not taken over: the old roster stays up
        assert any(r.kind == Kind.ROSTER for r in so.sealed.published)
        assert await sa.maintain() == [gid]  # the heir takes over, in a new epoch
        await so.maintain()
        assert so.state.keys[gid].removed
        assert not any(r.kind in (Kind.ROSTER, Kind.ROSTER_PAGE) for r in so.sealed.published)
        assert gid not in so.state.drafts
        with pytest.raises(GroupError, match="only the group's owner"):
            await so.requests(gid)
