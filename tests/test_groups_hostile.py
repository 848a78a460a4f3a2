"""Membership against a hostile DHT (issue #13, items 2, 3 and 12), on real nodes on loopback.

- A removed member is refused by a serving node within two maintenance intervals whatever
  that node's DHT returns (down, empty, or only other groups' rosters): membership fails
  closed instead of trusting a cached roster for ever.
- Roster pages signed by throw-away keys cannot crowd the owner's pages out: they land
  under other keys. Since issue 17 a throw-away key cannot even write under the sealed key
  of the owner's page (storing nodes refuse it), and pages a member seals for throw-away
  signers land under other sealed keys.
- A former owner keeps no power: its rejections veto nothing (even sealed into the
  requester's mailbox), and a second hand-over chain it signs, however long and whatever its
  seq, sealed into the epoch it still holds (the one members read as the previous epoch),
  neither locks the real owner out of the storing nodes nor misleads a new reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FakeClock
from support.groups import epoch_of, sealed_lies
from support.nodes import NodeCluster, form_group

from dhtshare import crypto
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtError, DhtshareError
from dhtshare.groups.keyring import GroupKeys
from dhtshare.groups.secrets import Space, mailbox, seal
from dhtshare.groups.service import Draft, GroupService, GroupState
from dhtshare.identity import Identity
from dhtshare.node.service import NodeConfig
from dhtshare.records import (
    PAGE_MEMBERS,
    Decision,
    Handover,
    Kind,
    Member,
    RosterPage,
    SignedRecord,
    key_for,
    sign_record,
)
from dhtshare.sim import Network

INTERVAL = NodeConfig(home=Path("unused")).maintenance_interval  # the default, 30 s


class BrokenDht:
    """What a node's group service sees when its DHT is cut off or lies."""

    def __init__(self, node: DhtNode, mode: str, decoys: list[SignedRecord]) -> None:
        self.node, self.mode, self.decoys = node, mode, decoys
        self.put, self.publish, self.withdraw = node.put, node.publish, node.withdraw

    async def get(self, key: bytes) -> list[SignedRecord]:
        if self.mode == "down":
            raise DhtError("DHT node is not listening")
        if self.mode == "empty":
            return []
        return list(self.decoys)  # valid rosters, of another group


class Cluster(NodeCluster):
    """Nodes whose group services read ``clock`` (``NodeConfig.clock``), which the test moves."""

    def __init__(self, tmp: Path, boot: DhtNode) -> None:
        self.clock = FakeClock(time.time())
        super().__init__(tmp, boot, clock=self.clock)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster.running(tmp_path) as c:
        yield c


# ------------------------------------------------------------------------- item 2


async def stay_behind(group_id: bytes) -> int:
    """``GroupService.catch_up`` of a node that never moves to a new epoch."""
    return 0


@pytest.mark.parametrize("mode", ["down", "empty", "other_groups"])
async def test_removed_member_refused_within_two_intervals_whatever_the_dht_returns(
    cluster: Cluster, mode: str
) -> None:
    owner, server = await cluster.node("owner"), await cluster.node("server")
    removed = await cluster.node("removed")
    gid = await form_group(owner, [server, removed])
    source = cluster.tmp / "notes.bin"
    source.write_bytes(os.urandom(256 * 1024))
    await server.share(gid, source)
    assert server.is_member(gid, removed.identity.public)

    other = await owner.groups.create("elsewhere")  # valid rosters, of the wrong group
    decoy_key = epoch_of(owner.groups, other).dht_key(key_for(Kind.ROSTER, other))
    decoys = await owner.dht.get(decoy_key)  # sealed, of another group
    assert decoys
    server.groups.sealed.dht = BrokenDht(server.dht, mode, decoys)
    # a removed member's node that does not follow the epoch change (hostile, or cut off)
    # keeps the old access key: it is the serving node that must refuse it
    removed.groups.catch_up = stay_behind  # type: ignore[method-assign]
    await owner.groups.remove(gid, removed.identity.public)

    for _ in range(2):  # two maintenance rounds, the clock moved by the default interval
        cluster.clock.advance(INTERVAL)
        await server.maintain()
    assert not server.is_member(gid, removed.identity.public)
    assert gid in server.stale_groups()

    # over TCP: the removed member's node asks the server for the file and is refused
    files = await removed.files.list_files(gid, lambda g, k: True)
    handle = await removed.downloads.start(gid, files[0].entry, cluster.tmp / "got")
    assert handle.task is not None
    with pytest.raises(DhtshareError, match="not a member"):
        async with asyncio.timeout(30):
            await handle.task
    assert not (cluster.tmp / "got" / "notes.bin").exists()


async def test_healthy_dht_keeps_serving_members_round_after_round(cluster: Cluster) -> None:
    owner, member = await cluster.node("owner"), await cluster.node("member")
    gid = await form_group(owner, [member])
    for _ in range(6):
        cluster.clock.advance(INTERVAL)
        await member.maintain()
        assert member.is_member(gid, owner.identity.public)
        assert member.stale_groups() == {}
    member.require_member(gid)  # sharing still works: my own membership is fresh


# ------------------------------------------------------------------------- item 3


async def test_throwaway_roster_pages_cannot_crowd_out_the_owners_page() -> None:
    owner_id, reader_id, leaving = (Identity.generate(n) for n in ("owner", "reader", "leaving"))
    async with Network.start(8) as net:
        owner = GroupService(net.nodes[1], owner_id)
        gid = await owner.create("big")
        first = await owner.fetch_roster(gid)
        now = time.time()
        # a full page 0 (long names): no junk page fits beside it in one DHT reply
        others = tuple(
            Member(Identity.generate().public, f"{i:03}" + "m" * 61, int(now)) for i in range(106)
        )
        members = (
            *first.members,
            Member(reader_id.public, "reader", int(now)),
            Member(leaving.public, "leaving", int(now)),
            *others,
        )
        draft = Draft(first.seq, first.roster, first.members)
        await owner._next_roster(draft, members)
        keys = GroupKeys.from_json(owner.state.keys[gid].to_json())  # the reader's secret
        reader = GroupService(net.nodes[5], reader_id, GroupState(keys={gid: keys}))
        assert reader.is_member(gid, leaving.public) is False
        await reader.refresh(gid)
        assert reader.is_member(gid, leaving.public)

        view = await owner.remove(gid, leaving.public)  # a new version and epoch, new page 0
        assert view.roster.page_digests
        space = epoch_of(owner, gid)
        owners_inner = key_for(Kind.ROSTER_PAGE, gid, owner_id.public, b"\x00")
        owners_key = space.dht_key(owners_inner)
        assert net.nodes[2].storage.count(owners_key)

        # 64 throw-away pages for index 0, full, dated ahead, bound to the new version:
        # sealed by throw-away keys (they hold no epoch secret) and filed under the owner's
        # sealed key, refused; sealed by a member for throw-away signers, under other keys
        fat = tuple(Member(os.urandom(32), "x" * 64, int(now)) for _ in range(PAGE_MEMBERS))
        attacker_node = net.nodes[7]
        for i in range(64):
            junk_id = Identity.generate("junk")
            junk = RosterPage(gid, view.seq, 0, fat)
            rec = sign_record(junk_id, junk, seq=view.seq, now=now + 500, ttl=3600)
            made_up = seal(Space(os.urandom(32), "epoch"), rec, author=junk_id, seq=i + 1, now=now)
            assert net.nodes[2].storage.add(owners_key, made_up.encode(), time.time()) == (
                "wrong_key"
            )
            [member_sealed] = sealed_lies(space, junk_id, [rec], now).values()
            assert member_sealed[0].dht_key != owners_key
            for outer in (made_up, member_sealed[0]):
                with contextlib.suppress(DhtshareError):
                    await attacker_node.put(outer)

        got = await reader.refresh(gid)
        assert got.seq == view.seq
        assert not reader.is_member(gid, leaving.public)
        assert reader.is_member(gid, others[-1].key)


# ------------------------------------------------------------------------ item 12


def _handover(signer: Identity, gid: bytes, index: int, to: bytes, at: int) -> Handover:
    message = Handover.message(gid, index, to, at)
    return Handover(to, at, crypto.sign(signer.signing_key, "handover", message))


async def handed_over(net: Network) -> tuple[GroupService, GroupService, Identity, bytes]:
    """A group founded by ``founder``, who left and handed it to ``heir`` (who took over)."""
    founder_id, heir_id = Identity.generate("founder"), Identity.generate("heir")
    founder = GroupService(net.nodes[1], founder_id)
    heir = GroupService(net.nodes[2], heir_id)
    gid = await founder.create("club")
    await heir.request_join(founder.state.keys[gid].invite)
    await founder.accept(gid, heir_id.public)
    await heir.maintain()
    await founder.leave(gid)
    await heir.maintain()
    assert (await heir.refresh(gid)).owner == heir_id.public
    return founder, heir, founder_id, gid


async def test_former_owner_rejection_vetoes_no_join() -> None:
    async with Network.start(8) as net:
        _founder, heir, founder_id, gid = await handed_over(net)
        joiner_id = Identity.generate("joiner")
        joiner = GroupService(net.nodes[3], joiner_id)
        await joiner.request_join(heir.state.keys[gid].invite, "hi")
        now = time.time()
        veto = Decision(gid, joiner_id.public, False, "no")
        rec = sign_record(founder_id, veto, seq=int(now * 1000), now=now, ttl=600)
        await net.nodes[1].put(rec)  # in the clear, where readers no longer look
        # ...and sealed into the joiner's mailbox, as if its secret had leaked to the founder
        box = mailbox(joiner.state.keys[gid].reply)
        for outers in sealed_lies(box, founder_id, [rec], now).values():
            for outer in outers:
                await net.nodes[1].put(outer)
        assert [p.requester for p in await heir.requests(gid)] == [joiner_id.public]
        assert await joiner.status(gid) == ("pending", "")


async def test_former_owners_forked_chain_neither_locks_out_owner_nor_misleads_reader() -> None:
    async with Network.start(8) as net:
        founder, heir, founder_id, gid = await handed_over(net)
        before = founder._views[gid]  # the founder's last roster, before the hand-over
        old_epoch = founder.state.keys[gid].space()  # the founder still holds that epoch
        assert old_epoch is not None and old_epoch in heir.sealed.spaces(gid)
        joiner_id = Identity.generate("joiner")
        joiner = GroupService(net.nodes[3], joiner_id)
        await joiner.request_join(heir.state.keys[gid].invite, "hi")

        # the former owner signs a second chain to keys it controls: 16 hand-overs, top seq,
        # sealed into the epoch it holds, which members read as the previous one
        now = time.time()
        puppets = [Identity.generate(f"p{i}") for i in range(16)]
        chain, signer = [], founder_id
        for i, p in enumerate(puppets):
            chain.append(_handover(signer, gid, i, p.public, int(now)))
            signer = p
        fork = replace(before.roster, handovers=tuple(chain))
        for seq in (2**64 - 1, int(now * 1000)):
            rec = sign_record(puppets[-1], fork, seq=seq, now=now, ttl=3600)
            for outers in sealed_lies(old_epoch, founder_id, [rec], now).values():
                for outer in outers:
                    for node in net.nodes:
                        with contextlib.suppress(DhtshareError):
                            await node.put(outer)

        # the real owner still publishes, and a new reader (a member) follows the real chain
        await heir.accept(gid, joiner_id.public)
        assert await joiner.status(gid) == ("accepted", "")
        keys = GroupKeys.from_json(joiner.state.keys[gid].to_json())
        fresh = GroupService(net.nodes[6], joiner_id, GroupState(keys={gid: keys}))
        view = await fresh.refresh(gid)
        assert view.owner == heir.state.drafts[gid].roster.owner
        assert fresh.is_member(gid, joiner_id.public)
