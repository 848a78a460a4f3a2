"""A former owner cannot overwrite its heir's roster at a storing node by raising ``seq``."""

from __future__ import annotations

from dhtshare import crypto
from dhtshare.dht.storage import ValidatingStorage
from dhtshare.identity import Identity
from dhtshare.records import Genesis, Handover, Member, Roster, sign_record
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
