"""Review of issue #13: a node restarted at the same address with a new id gets back in.

The routing table holds one id per ``(ip, port)``. When a node comes back at the same
address under a new id, its address keeps answering, so the old contact used to stay
(pings of it were answered, by the new node) and the new id was kept out for good. Now
an address that answers a ping with another id than the table holds for it hands its
place to that id. Real nodes on their own loopback addresses.
"""

from __future__ import annotations

import asyncio

import pytest
from kademlia.node import Node

from dhtshare.dht import DhtNode
from dhtshare.dht.protocol import DhtProtocol

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.13.2"


async def restarted(victim: DhtNode) -> tuple[bytes, DhtNode]:
    """A node that joined through ``victim`` and then restarted at the same address
    under a new id; returns its old id and the new node (listening, not yet joined)."""
    old = DhtNode()
    await old.listen(interface=HOST)
    await old.bootstrap([victim.address])
    await proto(victim).validations()
    port = old.address[1]
    assert old.node.id in {n.id for n in victim.contacts()}
    old_id = old.node.id
    await old.aclose()
    new = DhtNode()
    await new.listen(port=port, interface=HOST)
    assert new.node.id != old_id
    return old_id, new


def proto(node: DhtNode) -> DhtProtocol:
    assert node.protocol is not None
    return node.protocol


def table(node: DhtNode) -> dict[bytes, tuple[str, int]]:
    return {n.id: (n.ip, n.port) for n in node.contacts()}


async def test_a_node_restarted_with_a_new_id_replaces_its_old_contact_when_it_joins() -> None:
    victim = DhtNode()
    await victim.listen(interface="127.0.13.1")
    new: DhtNode | None = None
    try:
        async with asyncio.timeout(20):
            old_id, new = await restarted(victim)
            await new.bootstrap([victim.address])
            await proto(victim).validations()  # the ping-back of the new id
        contacts = table(victim)
        assert contacts.get(new.node.id) == new.address, "the new id was kept out"
        assert old_id not in contacts
    finally:
        if new is not None:
            await new.aclose()
        await victim.aclose()


async def test_a_ping_of_the_old_contact_answered_by_a_new_id_lets_the_new_id_in() -> None:
    victim = DhtNode()
    await victim.listen(interface="127.0.13.1")
    new: DhtNode | None = None
    try:
        async with asyncio.timeout(20):
            old_id, new = await restarted(victim)
            # what the table does to check a contact (a full bucket pings its head)
            result = await proto(victim).call_ping(Node(old_id, *new.address))
        assert result == (True, new.node.id)
        contacts = table(victim)
        assert old_id not in contacts, "the old id stays while its address answers"
        assert contacts.get(new.node.id) == new.address
    finally:
        if new is not None:
            await new.aclose()
        await victim.aclose()


async def test_a_ping_answered_with_the_same_id_changes_nothing() -> None:
    victim, peer = DhtNode(), DhtNode()
    await victim.listen(interface="127.0.13.1")
    await peer.listen(interface=HOST)
    try:
        async with asyncio.timeout(20):
            await peer.bootstrap([victim.address])
            await proto(victim).validations()
            before = table(victim)
            result = await proto(victim).call_ping(Node(peer.node.id, *peer.address))
        assert result == (True, peer.node.id)
        assert table(victim) == before and before.get(peer.node.id) == peer.address
    finally:
        await peer.aclose()
        await victim.aclose()
