"""A former owner cannot overwrite its heir's roster at a storing node, by raising ``seq`` or
by signing a second, longer hand-over chain from an earlier link (issue #13 item 12).

Since issue 17 storing nodes hold rosters sealed and cannot rank them; a former owner that
still holds the epoch secret seals under its own author key, so its fork lands beside the
heir's record, never over it, and readers rank what they open."""

from __future__ import annotations

import pytest

from dhtshare import crypto
from dhtshare.dht.storage import ValidatingStorage
from dhtshare.groups import rules
from dhtshare.groups.secrets import epoch_space, open_sealed, seal
from dhtshare.identity import Identity
from dhtshare.records import (
    CLOCK_SKEW,
    Genesis,
    Handover,
    JoinRequest,
    Member,
    Roster,
    max_seq,
    sign_record,
    time_seq,
)
from dhtshare.stats import Counters

NOW = 1_800_000_000.0


def test_longer_hand_over_chain_beats_higher_seq() -> None:
    founder, heir = Identity.generate("founder"), Identity.generate("heir")
    genesis = Genesis(founder.public, "g", int(NOW), b"\x00" * 16)
    gsig = crypto.sign(founder.signing_key, "genesis", genesis.encode())
    members = (Member(founder.public, "founder", int(NOW)), Member(heir.public, "heir", int(NOW)))
    old_chain = Roster(genesis, gsig, (), False, members, 2)
    msg = Handover.message(genesis.group_id, 0, heir.public, int(NOW))
    handover = Handover(heir.public, int(NOW), crypto.sign(founder.signing_key, "handover", msg))
    new_chain = Roster(genesis, gsig, (handover,), False, members[1:], 1)

    storage = ValidatingStorage(clock=lambda: NOW, stats=Counters())
    heirs = sign_record(heir, new_chain, seq=5, now=NOW, ttl=3600)
    key = heirs.dht_key
    assert storage.add(key, heirs.encode(), NOW) is None
    fork = sign_record(founder, old_chain, seq=99, now=NOW, ttl=3600)
    assert fork.dht_key == key
    assert storage.add(key, fork.encode(), NOW) == "stale"
    assert [r.signer for r in storage.records(key, NOW)] == [heir.public]


def _chain(gid: bytes, first: Identity, heirs: list[Identity]) -> tuple[Handover, ...]:
    out, signer = [], first
    for i, h in enumerate(heirs):
        msg = Handover.message(gid, i, h.public, int(NOW))
        out.append(Handover(h.public, int(NOW), crypto.sign(signer.signing_key, "handover", msg)))
        signer = h
    return tuple(out)


def test_fork_from_an_earlier_link_never_outranks_the_held_chain() -> None:
    founder, heir, next_heir = (Identity.generate(n) for n in ("founder", "heir", "next"))
    genesis = Genesis(founder.public, "g", int(NOW), b"\x01" * 16)
    gsig = crypto.sign(founder.signing_key, "genesis", genesis.encode())
    gid = genesis.group_id
    members = (Member(heir.public, "heir", int(NOW)), Member(next_heir.public, "n", int(NOW)))
    real = Roster(genesis, gsig, _chain(gid, founder, [heir]), False, members, 2)
    puppets = [Identity.generate(f"p{i}") for i in range(16)]
    forked = Roster(genesis, gsig, _chain(gid, founder, puppets), False, members, 2)

    storage = ValidatingStorage(clock=lambda: NOW, stats=Counters())
    held = sign_record(heir, real, seq=2, now=NOW, ttl=3600)
    assert storage.add(held.dht_key, held.encode(), NOW) is None
    for seq in (2**64 - 1, time_seq(NOW)):  # the top of u64 is refused outright, too
        fork = sign_record(puppets[-1], forked, seq=seq, now=NOW, ttl=3600)
        assert storage.add(held.dht_key, fork.encode(), NOW) is not None
        assert not fork.supersedes(held) and not held.supersedes(fork)
    # the real owner goes on: a higher seq on its chain, then a hand-over that extends it
    later = sign_record(heir, real, seq=3, now=NOW, ttl=3600)
    assert storage.add(held.dht_key, later.encode(), NOW) is None
    extended = Roster(genesis, gsig, _chain(gid, founder, [heir, next_heir]), False, members, 2)
    moved = sign_record(next_heir, extended, seq=4, now=NOW, ttl=3600)
    assert storage.add(held.dht_key, moved.encode(), NOW) is None
    assert storage.records(held.dht_key, NOW) == [moved]

    # readers: one that knows the real chain refuses the fork; one that knows nothing and
    # sees both cannot tell which the founder meant, and takes neither
    fork = sign_record(puppets[-1], forked, seq=time_seq(NOW), now=NOW, ttl=3600)
    known = rules.Known(3, 1, rules.chain_digest(real.handovers))
    rec, _body = rules.pick_roster([fork, later], gid, NOW, known)
    assert rec == later
    with pytest.raises(rules.OwnershipForkError):
        rules.pick_roster([fork, later], gid, NOW, None)


def test_a_slot_cannot_be_wedged_with_the_highest_seq() -> None:
    member = Identity.generate("member")
    storage = ValidatingStorage(clock=lambda: NOW, stats=Counters())
    body = JoinRequest(b"\x02" * 32, "me")
    top = sign_record(member, body, seq=2**64 - 1, now=NOW, ttl=3600)
    assert storage.add(top.dht_key, top.encode(), NOW) == "too_far_ahead"
    ahead = sign_record(member, body, seq=time_seq(NOW + CLOCK_SKEW + 5), now=NOW, ttl=3600)
    assert storage.add(ahead.dht_key, ahead.encode(), NOW) is not None
    now = sign_record(member, body, seq=time_seq(NOW), now=NOW, ttl=3600)
    assert storage.add(now.dht_key, now.encode(), NOW) is None
    assert max_seq(NOW) == time_seq(NOW + CLOCK_SKEW)


def test_a_sealed_fork_lands_beside_the_heirs_roster_never_over_it() -> None:
    founder, heir = Identity.generate("founder"), Identity.generate("heir")
    genesis = Genesis(founder.public, "g", int(NOW), b"\x03" * 16)
    gsig = crypto.sign(founder.signing_key, "genesis", genesis.encode())
    gid = genesis.group_id
    members = (Member(founder.public, "founder", int(NOW)), Member(heir.public, "heir", int(NOW)))
    old_chain = Roster(genesis, gsig, (), False, members, 2)
    new_chain = Roster(genesis, gsig, _chain(gid, founder, [heir]), False, members[1:], 1)
    space = epoch_space(b"\x04" * 32)  # the epoch both still hold (the heir has not re-keyed)

    storage = ValidatingStorage(clock=lambda: NOW, stats=Counters())
    inner = sign_record(heir, new_chain, seq=5, now=NOW, ttl=3600)
    heirs = seal(space, inner, author=heir, seq=time_seq(NOW), now=NOW)
    key = heirs.dht_key
    assert storage.add(key, heirs.encode(), NOW) is None
    forged = sign_record(founder, old_chain, seq=99, now=NOW, ttl=3600)
    for seq in (time_seq(NOW) + 1, max_seq(NOW)):  # whatever seq: its own slot
        fork = seal(space, forged, author=founder, seq=seq, now=NOW)
        assert fork.dht_key == key and fork.slot != heirs.slot
        assert storage.add(key, fork.encode(), NOW) is None
    held = storage.records(key, NOW)
    assert heirs in held and len(held) == 2
    opened = [open_sealed(space, r, inner.dht_key, NOW) for r in held]
    known = rules.Known(5, 1, rules.chain_digest(new_chain.handovers))
    rec, _body = rules.pick_roster(opened, gid, NOW, known)
    assert rec == inner
