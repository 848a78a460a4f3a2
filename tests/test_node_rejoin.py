"""A node that lost every DHT contact joins again through its bootstrap node at the next
maintenance round, and stores its own records again at once (the nodes that held them
may have restarted empty)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.nodes import NodeCluster


async def test_a_node_with_no_contact_left_joins_again_and_republishes(tmp_path: Path) -> None:
    async with NodeCluster.running(tmp_path) as cluster:
        node = await cluster.node("alone")
        await node.groups.create("climbers")  # something of ours to store again
        protocol = node.dht.protocol
        assert protocol is not None
        for contact in node.dht.contacts():
            protocol.router.remove_contact(contact)
        assert node.dht.contact_count() == 0
        before = node.dht.stats["republish"]
        await node.maintain()
        assert node.dht.contact_count() >= 1
        assert node.dht.stats["republish"] > before


async def test_two_republish_rounds_at_once_put_each_record_once(tmp_path: Path) -> None:
    """The DHT's own maintenance may republish while a rejoin does."""
    async with NodeCluster.running(tmp_path) as cluster:
        node = await cluster.node("busy")
        for name in ("climbers", "hikers", "runners"):
            await node.groups.create(name)
        published = len(node.dht.published)
        assert published >= 3
        before = node.dht.stats["republish"]
        await asyncio.gather(node.dht.republish_all(), node.dht.republish())
        assert node.dht.stats["republish"] - before == published
