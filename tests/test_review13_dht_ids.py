"""Review of issue #13, item 13: a hostile reply cannot bind an honest address to an id.

A find_node reply names contacts ``[id, host, port]``; the node then asks each of them,
and an address answers a find_node whatever id it is asked under. Before this fix the
node took the id the hostile reply named as that address's id; with one id per endpoint
in the routing table, the honest node's real id could then never join. Real nodes on
their own loopback addresses and a raw UDP socket as the hostile peer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import umsgpack
from kademlia.node import Node

from dhtshare.dht import DhtNode
from dhtshare.dht.server import _Candidates

pytestmark = pytest.mark.timeout(60)

Address = tuple[str, int]


class LyingPeer(asyncio.DatagramProtocol):
    """Answers pings with its own id and every find_node with ``contacts``."""

    def __init__(self, contacts: list[list[Any]]) -> None:
        self.id = os.urandom(20)
        self.contacts = contacts
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if data[:1] != b"\x00" or self.transport is None:
            return
        name = umsgpack.unpackb(data[21:])[0]
        reply: Any = self.id if name == "ping" else True if name == "store" else self.contacts
        self.transport.sendto(b"\x01" + data[1:21] + umsgpack.packb(reply), addr)


async def test_an_id_named_by_a_hostile_reply_does_not_take_an_honest_address() -> None:
    victim, honest = DhtNode(), DhtNode()
    await victim.listen(interface="127.0.0.1")
    await honest.listen(interface="127.0.0.2")
    fake = os.urandom(20)
    loop = asyncio.get_running_loop()
    transport, liar = await loop.create_datagram_endpoint(
        lambda: LyingPeer([[fake, *honest.address]]), local_addr=("127.0.0.3", 0)
    )
    try:
        async with asyncio.timeout(20):
            await victim.bootstrap([transport.get_extra_info("sockname")[:2]])
            await honest.bootstrap([victim.address])
            for _ in range(40):  # the victim's ping-back of the honest node, at most 4 s
                if honest.node.id in {n.id for n in victim.contacts()}:
                    break
                await asyncio.sleep(0.1)
        table = {n.id: (n.ip, n.port) for n in victim.contacts()}
        assert fake not in table
        assert table.get(honest.node.id) == honest.address
        assert table.get(liar.id) is not None
    finally:
        transport.close()
        await victim.aclose()
        await honest.aclose()


def test_a_far_id_named_first_does_not_hide_an_endpoint_from_a_lookup() -> None:
    """A reply that names an honest endpoint under a far id before anyone names its real
    (near) id must not keep the honest node out of the lookup's k nearest."""
    target = Node(bytes(20))
    candidates = _Candidates(target, k=3)
    endpoint = ("127.0.0.2", 4000)
    far, near = b"\xff" * 20, b"\x00" * 19 + b"\x01"
    others = [Node(bytes([0x80 + i]) + bytes(19), f"127.0.1.{i}", 4000) for i in range(1, 4)]
    candidates.push([Node(far, *endpoint), *others])
    candidates.push([Node(near, *endpoint)])
    nearest = candidates.nearest()
    assert nearest[0].id == near
    assert far not in {n.id for n in nearest}
    candidates.push([Node(b"\xfe" * 20, *endpoint)])  # a farther id again changes nothing
    assert candidates.nearest()[0].id == near
