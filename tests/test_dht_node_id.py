"""Issue 17: a member's DHT node id is random, never its identity key or derived from it.

Every DHT datagram names its sender's node id, so an id an observer could compute from a
member key would name the member on the wire. Real nodes on 127.0.0.1: two fresh homes
with one identity get unrelated ids, and a restart keeps its id (the saved DHT state).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dhtshare import crypto
from dhtshare.dht.server import DhtNode
from dhtshare.home import Home
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import Kind, key_for

pytestmark = pytest.mark.timeout(60)

PURPOSES = ("fingerprint", "group", "node", "node-id", "dht", "id", "identity", "member")


def derived_from(key: bytes) -> set[bytes]:
    """20-byte values one could compute from ``key``: hashes, keyed digests, DHT keys."""
    full = {
        hashlib.sha1(key).digest(),
        hashlib.sha256(key).digest(),
        hashlib.blake2b(key).digest(),
        *(crypto.digest(p, key) for p in PURPOSES),
        *(crypto.digest(p, key, size=20) for p in PURPOSES),
        *(key_for(kind, key) for kind in Kind),
        crypto.dht_key("node", key),
    }
    return {value[:20] for value in full} | {value[-20:] for value in full}


def make_home(home: Path, identity: Identity) -> Path:
    """A home holding ``identity``'s key file, as ``dhtshare id create`` writes it (so the
    node loads it and saves its state like a real one)."""
    home.mkdir(mode=0o700)
    identity.save(Home(home).identity)
    return home


async def node_id(home: Path, boot: DhtNode) -> bytes:
    """The DHT id of a node started at ``home``."""
    node = await Node.start(NodeConfig(home=home, control=False, bootstrap=(boot.address,)))
    try:
        return bytes(node.dht.node.id)
    finally:
        await node.close()


async def test_the_dht_node_id_is_random_and_not_the_identity(tmp_path: Path) -> None:
    identity = Identity.generate("alice")
    boot = DhtNode()
    await boot.listen(0)
    try:
        first = await node_id(make_home(tmp_path / "a", identity), boot)
        second = await node_id(make_home(tmp_path / "b", identity), boot)
        again = await node_id(tmp_path / "a", boot)
    finally:
        await boot.aclose()
    public = identity.public
    for nid in (first, second):
        assert len(nid) == 20
        assert nid not in public  # not the key, nor a prefix or any slice of it
        assert nid not in derived_from(public)
        assert nid not in derived_from(identity.fingerprint.encode())
    assert first != second  # one identity, two fresh homes: unrelated ids
    assert again == first  # a restart keeps its id (the saved DHT state)
