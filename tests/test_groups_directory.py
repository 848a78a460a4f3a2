"""The public directory under private groups: a listing is checked only against its own
invite (the roster is for members), so anyone can list any group id under an invite of its
own. Such a listing must not hide the owner's, and an owner that leaves takes its listing
down (its heir lists the group under its own invite)."""

from __future__ import annotations

import time

import pytest
from conftest import FakeClock
from support.groups import NODES, LyingDht, commands, grow, invite_of, no_progress, people

from dhtshare.errors import GroupError
from dhtshare.groups.secrets import Invite
from dhtshare.groups.service import GroupService
from dhtshare.records import DirectoryEntry, Kind, key_for, sign_record, time_seq
from dhtshare.sim import Network


async def test_a_listing_of_someone_elses_group_hides_nothing() -> None:
    owner, mallory, carol = people("owner", "mallory", "carol")
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        gid = await so.create("climbers", public=True)
        key = key_for(Kind.DIRECTORY)
        [real] = await net.nodes[3].get(key)
        # mallory lists the same id and name under an invite of her own (she needs no key)
        now = time.time()
        fake = DirectoryEntry(gid, "climbers", 99, invite=Invite.new(mallory.public).token)
        lie = sign_record(mallory, fake, seq=time_seq(now), now=now, ttl=3600)
        lying = LyingDht(net.nodes[3], lambda k: [real, lie] if k == key else [], only_extra=True)
        reader = GroupService(lying, carol)
        listed = await reader.directory()
        assert {(g.group_id, g.owner, g.invite) for g in listed} == {
            (gid, owner.public, invite_of(so, gid)),
            (gid, mallory.public, fake.invite),
        }
        # asking by name does not pick one of them silently: the invite settles it
        with pytest.raises(GroupError, match="ambiguous"):
            await commands(reader).cmd_group_join(no_progress, "climbers")


async def test_an_owner_that_hands_over_takes_its_listing_down() -> None:
    owner, alice, carol = people("owner", "alice", "carol")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so, sa = (
            GroupService(net.nodes[i + 1], p, clock=clock) for i, p in enumerate((owner, alice))
        )
        gid = await so.create("climbers", public=True)
        await grow(so, gid, [sa], clock)
        reader = GroupService(net.nodes[5], carol)
        assert [g.owner for g in await reader.directory()] == [owner.public]
        clock.advance(10)
        await so.leave(gid)
        assert await reader.directory() == []  # until the heir takes over
        assert await sa.maintain() == [gid]
        listed = await reader.directory()
        assert [(g.group_id, g.owner, g.invite) for g in listed] == [
            (gid, alice.public, invite_of(sa, gid))
        ]
