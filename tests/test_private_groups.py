"""Private groups on a real DHT (sim network of real nodes on 127.0.0.1): what storing nodes
and outsiders see, who can write, and epochs (issue #17)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from conftest import FakeClock
from kademlia.node import Node as KNode

from dhtshare import crypto
from dhtshare.dht.server import DhtNode
from dhtshare.errors import GroupError, OwnershipForkError, RecordError
from dhtshare.files.service import FileService
from dhtshare.groups import rules, secrets
from dhtshare.groups.keyring import GroupKeys, Where
from dhtshare.groups.service import GroupService
from dhtshare.identity import Identity, format_id
from dhtshare.records import (
    MAX_BODY,
    MAX_EPOCH_PAGES,
    MAX_RECORD_SIZE,
    EpochPage,
    FileEntry,
    Genesis,
    Handover,
    JoinRequest,
    Kind,
    Member,
    Roster,
    Sealed,
    decode_record,
    epoch_key_ids,
    key_for,
    max_seq,
    sign_record,
    time_seq,
)
from dhtshare.sim import Network

pytestmark = pytest.mark.timeout(120)

NODES = 10


def _people(*names: str) -> list[Identity]:
    return [Identity.generate(n) for n in names]


async def _group(net: Network, *people: Identity) -> tuple[list[GroupService], bytes]:
    """The first person owns a group ``zq-climbers`` the others joined by invite."""
    services = [GroupService(net.nodes[i + 1], p) for i, p in enumerate(people)]
    owner = services[0]
    gid = await owner.create("zq-climbers")
    invite = await owner.invite(gid)
    for s in services[1:]:
        assert await s.request_join(invite, "zq-let-me-in") == gid
        await owner.accept(gid, s._me.public)
        assert await s.status(gid) == ("accepted", "")
    return services, gid


def _stored(net: Network) -> list[bytes]:
    now = time.time()
    return [raw for node in net.nodes for _key, raw in node.storage.items(now)]


async def test_storing_nodes_hold_only_opaque_sealed_records() -> None:
    owner, alice = _people("zq-owner-name", "zq-alice-name")
    async with Network.start(NODES) as net:
        (_so, sa), gid = await _group(net, owner, alice)
        files = FileService(sa.sealed, alice, lambda: ("127.0.0.1", 4242))
        cid = os.urandom(32)
        entry = FileEntry(gid, cid, "zq-secret-route.mp4", 5_000_000, 262144)
        await files._publish(files._sign(entry, 3600), 3600)
        stored = _stored(net)
        assert stored, "the group's records must be somewhere"
        kinds = {decode_record(raw).kind for raw in stored}
        assert kinds == {Kind.SEALED}
        secret_words = [
            gid,
            gid.hex().encode(),
            cid,
            cid.hex().encode(),
            owner.public,
            alice.public,
            format_id(owner.public).encode(),
            b"zq-climbers",
            b"zq-owner-name",
            b"zq-alice-name",
            b"zq-secret-route",
            b"zq-let-me-in",
            b"127.0.0.1",
        ]
        blob = b"\n".join(stored)
        assert [w for w in secret_words if w in blob] == []


async def test_an_outsider_who_knows_the_group_id_finds_nothing() -> None:
    owner, alice, eve = _people("owner", "alice", "eve")
    async with Network.start(NODES) as net:
        (_so, _sa), gid = await _group(net, owner, alice)
        outsider = GroupService(net.nodes[7], eve)
        with pytest.raises(GroupError):
            await outsider.fetch_roster(gid)
        for kind in (Kind.ROSTER, Kind.LEAVE, Kind.FILE_ENTRY, Kind.JOIN_REQUEST):
            assert await net.nodes[7].get(key_for(kind, gid)) == []
        # even with a keyring entry of its own making, it reads nothing of the group
        outsider.state.keys[gid] = GroupKeys()
        outsider.state.keys[gid].install(0, secrets.new_secret())
        with pytest.raises(GroupError):
            await outsider.fetch_roster(gid)


async def test_throwaway_keys_cannot_write_under_a_groups_keys() -> None:
    """1,000 values from 1,000 throw-away keys under each of the group's DHT keys: every one
    refused by the nodes that store the group's records; the group's records still read."""
    owner, alice = _people("owner", "alice")
    async with Network.start(NODES) as net:
        (so, sa), gid = await _group(net, owner, alice)
        fa = FileService(sa.sealed, alice, lambda: ("127.0.0.1", 4242))
        cid = os.urandom(32)
        await fa._publish(fa._sign(FileEntry(gid, cid, "zq-a.bin", 10, 262144), 600), 600)
        await fa.announce_provider(gid, cid, True)
        await sa._publish_leave(gid, None)  # a leave of alice's, too (read, not applied)
        eve = GroupService(net.nodes[6], Identity.generate("eve"))
        await eve.request_join(await so.invite(gid), "zq-waiting")
        published = [*so.sealed.dht.published, *sa.sealed.dht.published, *eve.sealed.dht.published]
        group_keys = sorted({rec.dht_key for rec in published})
        # invite, roster, grant, file entry, provider, leave, join request
        assert len(group_keys) >= 7
        now = time.time()
        holders = {k: [n for n in net.nodes if n.storage.records(k, now)] for k in group_keys}
        assert all(holders.values())
        refused: dict[str, int] = {}
        kept = 0
        for key in group_keys:
            real = holders[key][0].storage.records(key, now)[0].payload()
            assert isinstance(real, Sealed)
            for i in range(1000):
                junk = Identity.generate()
                if i % 2:  # claims the group's space key and locator, with a forged cert
                    body = Sealed(real.space, os.urandom(64), real.locator, os.urandom(16), b"x")
                else:  # its own space key (a throw-away key certifying itself)
                    body = Sealed(junk.public, os.urandom(64), os.urandom(20), os.urandom(16), b"x")
                rec = sign_record(junk, body, seq=i + 1, now=now, ttl=3600)
                raw = rec.encode()
                for node in holders[key]:
                    why = node.storage.add(key, raw, now, source="127.0.0.9")
                    if why is None:
                        kept += 1
                    else:
                        refused[why] = refused.get(why, 0) + 1
        assert kept == 0
        assert set(refused) == {"wrong_key", "not_certified"}
        # the same over real UDP store requests (a sample: 20 per key to each holder)
        proto = net.nodes[9].protocol
        replies = []
        for key in group_keys:
            for _ in range(20):
                real = holders[key][0].storage.records(key, now)[0].payload()
                assert isinstance(real, Sealed)
                body = Sealed(real.space, os.urandom(64), real.locator, os.urandom(16), b"x")
                raw = sign_record(Identity.generate(), body, seq=1, now=now, ttl=600).encode()
                for node in holders[key]:
                    peer = KNode(node.node.id, *node.address)
                    replies.append(await proto.call_store(peer, key, raw))
        assert replies and all(kept is not True for _ok, kept in replies)
        assert (await sa.fetch_roster(gid)).members[-1].key == alice.public
        assert [f.providers for f in await fa.list_files(gid, lambda g, k: True)] == [1]
        assert [p.message for p in await so.requests(gid)] == ["zq-waiting"]
        assert alice.public in await sa._fetch_leaves(gid)


async def test_a_throwaway_key_cannot_answer_for_the_owner_in_the_inbox() -> None:
    """An invite holder can write into the inbox, but cannot read other requests (they are
    sealed to the owner), and a fake invite record it signs is ignored."""
    owner, alice, mallory = _people("owner", "alice", "mallory")
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        sa, sm = GroupService(net.nodes[2], alice), GroupService(net.nodes[3], mallory)
        gid = await so.create("zq-climbers")
        invite = secrets.Invite.parse(await so.invite(gid))
        await sa.request_join(invite.token, "zq-alice-note")
        # mallory holds the invite: she finds alice's request but cannot open it
        for to_me in (True, False):  # sealed to the owner: not hers to open either way
            found = await sm.sealed.find(
                [invite.space], key_for(Kind.JOIN_REQUEST, gid), to_me=to_me
            )
            assert found == []
        # a fake invite record under the inbox, signed by mallory, is not believed
        from dhtshare.records import InviteInfo

        sm.state.keys[gid] = GroupKeys(invite=invite.token)
        fake = sign_record(
            mallory, InviteInfo(os.urandom(32), "zq-fake"), seq=2**40, now=time.time(), ttl=600
        )
        await sm.sealed.publish(Where("inbox", gid), fake)
        assert (await sa.read_invite(invite)).group_id == gid
        assert [p.message for p in await so.requests(gid)] == ["zq-alice-note"]


async def test_removal_starts_an_epoch_the_removed_member_cannot_read() -> None:
    owner, alice, bob = _people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        (so, sa, sb), gid = await _group(net, owner, alice, bob)
        old_access = sb.access_key(gid)
        assert old_access is not None and old_access == sa.access_key(gid)
        await so.remove(gid, bob.public)
        assert so.state.keys[gid].epoch == 1
        view = await sa.refresh(gid)
        assert [m.name for m in view.members] == ["owner", "alice"]
        assert sa.access_key(gid) == so.access_key(gid) != old_access
        await sb.refresh(gid)
        assert sb.state.keys[gid].removed and sb.state.keys[gid].epoch == 0
        assert sb.access_key(gid) is None
        # what alice shares now, bob never finds
        fa = FileService(sa.sealed, alice, lambda: ("127.0.0.1", 4242))
        fb = FileService(sb.sealed, bob, lambda: ("127.0.0.1", 4243))
        cid = os.urandom(32)
        await fa._publish(fa._sign(FileEntry(gid, cid, "zq-after.bin", 10, 262144), 600), 600)
        assert [f.entry.name for f in await fa.list_files(gid, sa.is_member)] == ["zq-after.bin"]
        assert await fb._entries(gid) == []
        # and what bob shares (in the old epoch) the members do not list
        await fb._publish(
            fb._sign(FileEntry(gid, os.urandom(32), "zq-bob.bin", 10, 262144), 600), 600
        )
        assert [f.entry.name for f in await fa.list_files(gid, sa.is_member)] == ["zq-after.bin"]


async def test_a_member_offline_for_several_epochs_catches_up() -> None:
    people = _people("owner", "alice", "b1", "b2", "b3")
    async with Network.start(NODES) as net:
        services, gid = await _group(net, *people)
        so, sa = services[0], services[1]
        for gone in people[2:]:
            await so.remove(gid, gone.public)
        assert so.state.keys[gid].epoch == 3
        assert sa.state.keys[gid].epoch == 0
        view = await sa.refresh(gid)  # one refresh follows the three changes
        assert sa.state.keys[gid].epoch == 3
        assert [m.name for m in view.members] == ["owner", "alice"]


async def test_leave_and_hand_over_start_epochs() -> None:
    owner, alice, bob = _people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        (so, sa, sb), gid = await _group(net, owner, alice, bob)
        await sb.leave(gid)
        await so.maintain()  # the owner sees the leave: a new epoch without bob
        assert so.state.keys[gid].epoch == 1
        await sa.refresh(gid)
        assert sa.state.keys[gid].epoch == 1
        await so.leave(gid)  # the owner hands the group to alice
        await sa.maintain()  # alice takes over: another epoch, without the old owner
        assert sa.state.keys[gid].epoch == 2
        view = await sa.refresh(gid)
        assert view.owner == alice.public and [m.name for m in view.members] == ["alice"]
        new_invite = secrets.Invite.parse(await sa.invite(gid))
        assert new_invite.owner == alice.public


async def test_a_rotated_invite_stops_working_for_new_requests() -> None:
    owner, alice = _people("owner", "alice")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        gid = await so.create("zq-climbers")
        old = await so.invite(gid)
        new = await so.invite(gid, rotate=True)
        assert new != old
        with pytest.raises(GroupError, match="no group was found for this invite"):
            await sa.request_join(old)
        assert await sa.request_join(new) == gid


def test_a_2000_member_epoch_change_reaches_every_remaining_member() -> None:
    """The pages of a 2,000-member re-key: each of the 1,999 remaining members finds its own
    box by hint and opens the new secret; the removed member finds none."""
    members = [Identity.generate() for _ in range(2000)]
    removed, remaining = members[0], members[1:]
    gid, old, new = os.urandom(32), secrets.new_secret(), secrets.new_secret()
    pages = secrets.epoch_pages(gid, 1, old, new, [m.public for m in remaining])
    assert len(pages) == 25
    owner = Identity.generate()
    for page in pages:  # each page fits one sealed record
        rec = sign_record(owner, page, seq=1, now=time.time(), ttl=600)
        sealed = secrets.seal(secrets.epoch_space(old), rec, author=owner, seq=1, now=time.time())
        assert len(sealed.encode()) <= 7680
        assert isinstance(decode_record(sealed.encode()).payload(), Sealed)
    assert all(secrets.my_box(m, old, pages) == new for m in remaining)
    assert secrets.my_box(removed, old, pages) is None
    assert isinstance(pages[0], EpochPage) and pages[0].count == 25


async def test_a_2000_member_group_re_keys_through_the_dht() -> None:
    """Removal in a 2,000-member group: the owner publishes the new epoch, and members
    (first, last and a sample) follow it and read the 1,999-member roster."""
    owner = Identity.generate("owner")
    people = [Identity.generate(f"m{i}") for i in range(1999)]
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        gid = await so.create("zq-big")
        draft = so.state.drafts[gid]
        members = draft.members + tuple(Member(p.public, p.name, 1) for p in people)
        await so._next_roster(draft, members)
        sample = [people[0], people[-1], *people[1:1999:400]]
        readers = []
        for i, p in enumerate(sample):
            r = GroupService(net.nodes[2 + i % 8], p)
            r.state.keys[gid] = GroupKeys()
            r.state.keys[gid].install(0, so.state.keys[gid].secrets[0])
            r.state.groups[gid] = "zq-big"
            readers.append(r)
        await asyncio.gather(*(r.refresh(gid) for r in readers))
        await so.remove(gid, people[0].public)
        views = await asyncio.gather(*(r.refresh(gid) for r in readers[1:]))
        assert all(len(v.members) == 1999 for v in views)
        assert all(r.state.keys[gid].epoch == 1 for r in readers[1:])
        await readers[0].refresh(gid)
        assert readers[0].state.keys[gid].removed


async def test_a_member_cannot_replace_another_members_sealed_record() -> None:
    """Mallory holds the epoch secret and writes junk into the slot of alice's file entry
    with the highest seq a storing node takes: her record lands in her own slot (one per
    author), and alice's entry is still listed."""
    owner, alice, mallory = _people("owner", "alice", "mallory")
    async with Network.start(NODES) as net:
        (_so, sa, sm), gid = await _group(net, owner, alice, mallory)
        fa = FileService(sa.sealed, alice, lambda: ("127.0.0.1", 4242))
        entry = fa._sign(FileEntry(gid, os.urandom(32), "zq-alice.bin", 10, 262144), 600)
        await fa._publish(entry, 600)
        space = sm.sealed.spaces(gid)[0]
        inner_key = key_for(Kind.FILE_ENTRY, gid)
        author, cert = space.author(mallory)
        junk = Sealed(
            space.writer.public,
            cert,
            space.locator(inner_key),
            space.tag(inner_key, entry.slot),  # alice's slot, as far as the tag goes
            os.urandom(700),
        )
        now = time.time()
        forged = sign_record(author, junk, seq=max_seq(now), now=now, ttl=600)
        assert await sm.sealed.dht.put(forged) > 0
        listed = await fa.list_files(gid, sa.is_member)
        assert [f.entry.name for f in listed] == ["zq-alice.bin"]
        held = [n.storage.records(space.dht_key(inner_key), now) for n in net.nodes]
        assert any(len(recs) == 2 for recs in held)  # both kept, side by side


async def test_a_restarted_owner_announces_every_epoch_change_again() -> None:
    """Epoch pages live while the node that made them runs: after the owner's restart, and
    once the DHT dropped them, its maintenance round announces each change whose secrets it
    holds again, to the members it was made for: a member offline during two changes
    follows both, and the removed one sees no box of anyone who joined after it left."""
    owner, alice, bob, carol, dave = _people("owner", "alice", "bob", "carol", "dave")
    async with Network.start(NODES) as net:
        (so, sa, sb, _sc), gid = await _group(net, owner, alice, bob, carol)
        await so.remove(gid, bob.public)
        sd = GroupService(net.nodes[5], dave)  # dave joins after bob's removal
        await sd.request_join(await so.invite(gid))
        await so.accept(gid, dave.public)
        await so.remove(gid, carol.public)
        secrets_held = dict(so.state.keys[gid].secrets)
        so.sealed.forget_group(gid)  # the owner's node stops ...
        now = time.time()
        for epoch in (1, 2):  # ... and the storing nodes' hold time ran out
            space = secrets.epoch_space(secrets_held[epoch - 1])
            page0 = space.dht_key(key_for(Kind.EPOCH, *epoch_key_ids(gid, epoch, 0)))
            for node in net.nodes:
                for rec in node.storage.records(page0, now):
                    node.storage.remove(page0, rec.slot)
        assert await sa.refresh(gid) and sa.state.keys[gid].epoch == 0
        restarted = GroupService(net.nodes[1], owner, so.state)
        await restarted.maintain()
        await sa.refresh(gid)
        assert sa.state.keys[gid].epoch == 2
        assert [m.name for m in sa.members(gid)] == ["owner", "alice", "dave"]
        # bob (removed at epoch 1) reads that announcement: boxes for alice and carol only
        found = await sb.sealed.find(
            [secrets.epoch_space(secrets_held[0])],
            key_for(Kind.EPOCH, *epoch_key_ids(gid, 1, 0)),
        )
        (page,) = [r.payload() for r in found]
        assert isinstance(page, EpochPage) and len(page.boxes) == 2


async def test_a_members_junk_epoch_announcement_costs_no_page_lookups() -> None:
    """Mallory (a member) announces a next epoch claiming the most pages a head may: alice
    reads that head and no page of it (only the owner or a named heir announces epochs),
    and a head claiming more pages does not even decode."""
    owner, alice, mallory = _people("owner", "alice", "mallory")
    async with Network.start(NODES) as net:
        (_so, sa, sm), gid = await _group(net, owner, alice, mallory)
        await sa.refresh(gid)
        head = EpochPage(gid, 1, 0, MAX_EPOCH_PAGES, ())
        now = time.time()
        rec = sign_record(mallory, head, seq=time_seq(now), now=now, ttl=600)
        await sm.sealed.publish(Where("epoch", gid), rec)
        node = net.nodes[2]  # alice's
        before = node.stats["lookup"]
        await sa.refresh(gid)
        # roster, its pages (none), leaves, page 0 of the next epoch, in two epoch spaces
        # at most; following the junk head would have cost 33 more
        assert node.stats["lookup"] - before <= 8
        assert sa.state.keys[gid].epoch == 0 and not sa.state.keys[gid].removed
        with pytest.raises(RecordError):
            EpochPage(gid, 1, 0, MAX_EPOCH_PAGES + 1, ())


def _drop_local(node: DhtNode) -> None:
    """The reader's node is not one of the storing nodes (as in any network larger than k)."""
    now = time.time()
    for key in list(node.storage.stored_keys()):
        for rec in node.storage.records(key, now):
            node.storage.remove(key, rec.slot)


async def test_one_reply_sized_record_dated_ahead_hides_no_key() -> None:
    """Mallory (a member, one address) stores one 7.6 KiB junk record dated 9 minutes ahead
    under the file-entry key and under the roster key: a reply holds about 8 KiB, and when
    the sender of the newest record came first in every reply, nobody else's record came
    back. Senders now take turns in a random order per reply."""
    owner, alice, mallory = _people("owner", "alice", "mallory")
    async with Network.start(16) as net:
        (_so, sa, sm), gid = await _group(net, owner, alice, mallory)
        fa = FileService(sa.sealed, alice, lambda: ("127.0.0.1", 4242))
        entry = fa._sign(FileEntry(gid, os.urandom(32), "zq-alice.bin", 10, 262144), 600)
        await fa._publish(entry, 600)
        space = sm.sealed.spaces(gid)[0]
        author, cert = space.author(mallory)
        ahead = time.time() + 540
        for inner_key in (key_for(Kind.FILE_ENTRY, gid), key_for(Kind.ROSTER, gid)):
            box = os.urandom(MAX_BODY - 32 - 64 - 20 - 16 - 2)
            junk = Sealed(space.writer.public, cert, space.locator(inner_key), os.urandom(16), box)
            rec = sign_record(author, junk, seq=time_seq(ahead), now=ahead, ttl=3600)
            assert len(rec.encode()) == MAX_RECORD_SIZE
            assert await sm.sealed.dht.put(rec) > 0
            # a storing node puts alice's (or the owner's) record in about half its replies
            holder = next(
                n for n in net.nodes if len(n.storage.records(space.dht_key(inner_key), ahead)) == 2
            )
            replies = [
                holder.storage.reply_records(space.dht_key(inner_key), 8160, time.time())
                for _ in range(200)
            ]
            assert 40 < sum(rec.encode() not in r for r in replies) < 160
        _drop_local(net.nodes[2])
        assert [f.entry.name for f in await fa.list_files(gid, sa.is_member)] == ["zq-alice.bin"]
        _drop_local(net.nodes[2])
        assert (await sa.refresh(gid)).members[-1].key == mallory.public


async def test_a_former_owner_cannot_take_members_into_an_epoch_of_its_own() -> None:
    """After handing the group to its heir, the former owner announces its own next epoch
    (dated ahead) with a roster on the old chain signed by itself: a member that has not
    read since follows the heir's epoch, and the former owner reads nothing it shares."""
    owner, alice, bob = _people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        (so, sa, sb), gid = await _group(net, owner, alice, bob)
        await sb.refresh(gid)
        old = so.state.keys[gid].secrets[0]
        draft = so.state.drafts[gid]
        gone = await so.leave(gid)
        assert gone.heir is not None
        if gone.heir.key == bob.public:  # joined the same second: the lower key is the heir
            sa, sb, alice, bob = sb, sa, bob, alice
        await sa.maintain()  # alice (the heir) takes over: epoch 1
        fake = secrets.new_secret()
        pages = secrets.epoch_pages(gid, 1, old, fake, [alice.public, bob.public])
        ahead = time.time() + 500
        lie = GroupService(net.nodes[9], owner)
        lie.state.keys[gid] = GroupKeys()
        lie.state.keys[gid].install(0, old)
        for page in pages:
            rec = sign_record(owner, page, seq=time_seq(ahead), now=ahead, ttl=3600)
            await lie.sealed.put(Where("epoch", gid, at=0), rec)
        roster, _ = rules.layout(draft.roster, draft.members, draft.seq + 1)
        forged = sign_record(owner, roster, seq=draft.seq + 1, now=time.time(), ttl=3600)
        lie.state.keys[gid].install(1, fake)
        await lie.sealed.put(Where("epoch", gid, at=1), forged)
        view = await sb.refresh(gid)
        assert sb.state.keys[gid].secrets[1] == sa.state.keys[gid].secrets[1] != fake
        assert view.owner == alice.public
        fb = FileService(sb.sealed, bob, lambda: ("127.0.0.1", 4242))
        entry = fb._sign(FileEntry(gid, os.urandom(32), "zq-bob-after.bin", 10, 262144), 600)
        await fb._publish(entry, 600)
        seen = await lie.sealed.find([secrets.epoch_space(fake)], key_for(Kind.FILE_ENTRY, gid))
        assert seen == []


async def test_an_invite_record_of_another_group_is_not_believed() -> None:
    """Eve holds the invites of two groups of one owner and re-seals the owner's invite
    record of the second into the first one's inbox: a newcomer with the first invite still
    asks to join the first group (the record names the invite it belongs to)."""
    owner, eve, newcomer = _people("owner", "eve", "newcomer")
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        first = await so.create("zq-first")
        second = await so.create("zq-second")
        one = secrets.Invite.parse(await so.invite(first))
        two = secrets.Invite.parse(await so.invite(second))
        se = GroupService(net.nodes[2], eve)
        (record,) = await se.sealed.find([two.space], key_for(Kind.INVITE))
        se.state.keys[first] = GroupKeys(invite=one.token)
        await se.sealed.put(Where("inbox", first), record)
        sn = GroupService(net.nodes[3], newcomer)
        assert await sn.request_join(one.token) == first
        assert (await sn.read_invite(one)).name == "zq-first"


async def test_a_removed_member_sees_it_and_can_join_again_with_a_new_invite() -> None:
    owner, alice, bob = _people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        (so, sa, sb), gid = await _group(net, owner, alice, bob)
        await so.remove(gid, bob.public)
        await sb.refresh(gid)
        assert [(g.name, g.role) for g in await sb.my_groups()] == [("zq-climbers", "removed")]
        assert await sb.request_join(await so.invite(gid, rotate=True), "again") == gid
        assert [(g.role) for g in await sb.my_groups()] == ["pending"]
        await so.accept(gid, bob.public)
        assert await sb.status(gid) == ("accepted", "")
        await sa.refresh(gid)
        assert sb.access_key(gid) == sa.access_key(gid) == so.access_key(gid)
        # and a former owner that handed the group over asks again the same way
        gone = await so.leave(gid)
        assert gone.heir is not None
        heir = sa if gone.heir.key == alice.public else sb
        assert (await heir.claim(gid)).owner == gone.heir.key  # takes over: a new epoch
        await so.refresh(gid)
        assert so.state.keys[gid].removed
        assert await so.request_join(await heir.invite(gid)) == gid
        await heir.accept(gid, owner.public)
        assert await so.status(gid) == ("accepted", "")
        assert so.access_key(gid) == heir.access_key(gid)


async def test_a_flood_of_join_requests_costs_the_owner_a_few_lookups() -> None:
    """60 requests from throw-away keys that hold the invite: the owner lists them (and the
    honest one) with a few lookups, not one per requester, and keeps a bounded state."""
    owner, alice = _people("owner", "alice")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        gid = await so.create("zq-climbers")
        invite = await so.invite(gid)
        await sa.request_join(invite, "zq-honest")
        flood = [GroupService(net.nodes[3 + i % 6], Identity.generate()) for i in range(60)]
        await asyncio.gather(*(s.request_join(invite, "junk") for s in flood))
        await so.reject(gid, flood[0]._me.public, "no")
        before = net.nodes[1].stats["lookup"]
        pending = await so.requests(gid)
        assert "zq-honest" in [p.message for p in pending]
        assert flood[0]._me.public not in [p.requester for p in pending]
        assert net.nodes[1].stats["lookup"] - before <= 8
        assert len(so.state.keys[gid].replies) <= 64


async def test_a_rotated_invite_keeps_the_requests_made_before_and_no_later_one() -> None:
    owner, alice, mallory = _people("owner", "alice", "mallory")
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner)
        sa, sm = GroupService(net.nodes[2], alice), GroupService(net.nodes[3], mallory)
        gid = await so.create("zq-climbers")
        leaked = await so.invite(gid)
        await sa.request_join(leaked, "zq-before")
        await so.invite(gid, rotate=True)
        # mallory holds the leaked invite: asking is refused, and a request she seals into
        # the old inbox anyway (dated before the rotation) is not listed
        with pytest.raises(GroupError, match="replaced"):
            await sm.request_join(leaked)
        sm.state.keys[gid] = GroupKeys(invite=leaked, reply=secrets.new_secret())
        body = JoinRequest(gid, "mallory", "zq-after", sm.state.keys[gid].reply)
        early = sign_record(mallory, body, seq=1, now=time.time() - 3600, ttl=7200)
        owner_key = secrets.Invite.parse(leaked).owner
        await sm.sealed.put(Where("inbox", gid), early, to_owner=owner_key)
        assert [p.message for p in await so.requests(gid)] == ["zq-before"]
        await so.accept(gid, alice.public)
        assert await sa.status(gid) == ("accepted", "")


async def test_a_member_that_never_read_the_roster_still_follows_an_epoch_change() -> None:
    """A member holding only the epoch secret (its first read failed, say) learns who may
    announce from the roster of its epoch, then follows the change (the benchmark's readers
    stayed behind: 0 of 52)."""
    owner, alice, bob = _people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        (so, _sa, _sb), gid = await _group(net, owner, alice, bob)
        fresh = GroupService(net.nodes[7], alice)  # alice's keys on a node that read nothing
        fresh.state.keys[gid] = GroupKeys()
        fresh.state.keys[gid].install(0, so.state.keys[gid].secrets[0])
        fresh.state.groups[gid] = "zq-climbers"
        await so.remove(gid, bob.public)
        assert await fresh.catch_up(gid) == 1
        assert [m.name for m in (await fresh.fetch_roster(gid)).members] == ["owner", "alice"]


async def test_asking_again_after_a_rotation_is_the_request_that_counts() -> None:
    """Alice asks with the old invite, the owner rotates it, alice asks again with the new
    one: the owner lists her newer request and answers in the mailbox she reads now (the
    request carried over from the old inbox won, and alice never got in)."""
    owner, alice = _people("owner", "alice")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        gid = await so.create("zq-climbers")
        await sa.request_join(await so.invite(gid), "zq-first")
        await so.invite(gid, rotate=True)  # alice's request is carried over
        await sa.request_join(await so.invite(gid), "zq-second")
        assert [p.message for p in await so.requests(gid)] == ["zq-second"]
        await so.accept(gid, alice.public)
        assert await sa.status(gid) == ("accepted", "")


async def test_a_reader_sees_both_forks_of_a_roster_and_takes_neither() -> None:
    """A former owner holding the epoch secret seals a roster on a second hand-over chain:
    a reader that knows no chain yet gets both forks from its lookup (a merge that kept one
    record per slot showed it whichever came first) and refuses to pick."""
    founder, heir, puppet = (Identity.generate(n) for n in ("founder", "heir", "puppet"))
    now = time.time()
    genesis = Genesis(founder.public, "zq-g", int(now), b"\x05" * 16)
    gsig = crypto.sign(founder.signing_key, "genesis", genesis.encode())
    gid = genesis.group_id

    def chain(to: Identity) -> tuple[Handover, ...]:
        msg = Handover.message(gid, 0, to.public, int(now))
        return (Handover(to.public, int(now), crypto.sign(founder.signing_key, "handover", msg)),)

    members = (Member(heir.public, "heir", int(now)), Member(puppet.public, "p", int(now)))
    real = sign_record(
        heir, Roster(genesis, gsig, chain(heir), False, members, 2), seq=3, now=now, ttl=600
    )
    fork = sign_record(
        puppet, Roster(genesis, gsig, chain(puppet), False, members, 2), seq=3, now=now, ttl=600
    )
    secret = secrets.new_secret()
    async with Network.start(NODES) as net:
        writers = [GroupService(net.nodes[1], heir), GroupService(net.nodes[2], puppet)]
        for w, rec in zip(writers, (real, fork), strict=True):
            w.state.keys[gid] = GroupKeys()
            w.state.keys[gid].install(0, secret)
            await w.sealed.put(Where("epoch", gid), rec)
        reader = GroupService(net.nodes[3], Identity.generate("reader"))
        reader.state.keys[gid] = GroupKeys()
        reader.state.keys[gid].install(0, secret)
        with pytest.raises(OwnershipForkError):
            await reader.fetch_roster(gid)


async def test_an_expired_publication_counts_as_unpublished() -> None:
    """An epoch announcement lives 7 days and is not renewed: once it expired, the owner's
    node must see it as gone and announce again (it kept it as published forever, so an
    owner up for more than 7 days never announced again)."""
    owner = Identity.generate("owner")
    clock = FakeClock(time.time())
    async with Network.start(NODES) as net:
        so = GroupService(net.nodes[1], owner, clock=clock)
        gid = await so.create("zq-climbers")
        assert so.sealed.where_of(gid, key_for(Kind.INVITE), owner.public) is not None
        page = EpochPage(gid, 1, 0, 1, ())
        rec = sign_record(owner, page, seq=time_seq(clock()), now=clock(), ttl=60)
        await so.sealed.publish(Where("epoch", gid), rec)
        inner_key = key_for(Kind.EPOCH, *epoch_key_ids(gid, 1, 0))
        assert so.sealed.where_of(gid, inner_key, owner.public) is not None
        clock.advance(61)
        assert so.sealed.where_of(gid, inner_key, owner.public) is None
