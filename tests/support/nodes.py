"""Whole nodes in one process, on 127.0.0.1, around one bootstrap DHT node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

from dhtshare.dht.server import DhtNode
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.sim.network import loopback_host


class NodeCluster:
    """Starts nodes that bootstrap from ``boot``, each with its home under ``tmp``.
    ``settings`` are NodeConfig fields every node gets; with ``own_hosts`` each node
    listens on its own loopback address, as the DHT expects of distinct machines."""

    def __init__(
        self, tmp: Path, boot: DhtNode, *, own_hosts: bool = False, **settings: Any
    ) -> None:
        self.tmp, self.boot, self.nodes = tmp, boot, list[Node]()
        self.own_hosts, self.settings = own_hosts, settings

    async def node(self, name: str, **settings: Any) -> Node:
        """A started node at home ``name``; ``settings`` override the cluster's and these
        defaults: an identity called ``name``, no control socket."""
        config: dict[str, Any] = {"identity": Identity.generate(name), "control": False}
        if self.own_hosts:
            config["host"] = loopback_host(len(self.nodes) + 1)
        config |= self.settings | settings
        cfg = NodeConfig(home=self.tmp / name, bootstrap=(self.boot.address,), **config)
        node = await Node.start(cfg)
        self.nodes.append(node)
        return node

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, tmp: Path, **kwargs: Any) -> AsyncIterator[Self]:
        """A cluster around a new bootstrap node; every node is closed on the way out."""
        boot = DhtNode()
        await boot.listen(0)
        cluster = cls(tmp, boot, **kwargs)
        try:
            yield cluster
        finally:
            await asyncio.gather(*(n.close() for n in cluster.nodes if not n.stopped.is_set()))
            await boot.aclose()


async def admit(owner: Node, gid: bytes, member: Node) -> None:
    """``member`` asks to join ``owner``'s group ``gid`` with its invite, is accepted, reads
    its grant and the roster."""
    await member.groups.request_join(owner.groups.state.keys[gid].invite)
    for request in await owner.groups.requests(gid):
        await owner.groups.accept(gid, request.requester)
    assert await member.groups.status(gid) == ("accepted", "")
    await member.groups.refresh(gid)


async def form_group(owner: Node, members: list[Node]) -> bytes:
    """``owner``'s new group ``club`` with every one of ``members`` accepted; each node
    has run maintenance and read the roster since."""
    gid = await owner.groups.create("club")
    invite = owner.groups.state.keys[gid].invite
    for m in members:
        await m.groups.request_join(invite)
    for request in await owner.groups.requests(gid):
        await owner.groups.accept(gid, request.requester)
    for n in [owner, *members]:
        await n.groups.maintain()
        await n.groups.refresh(gid)
    return gid
