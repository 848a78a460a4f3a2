"""Whole nodes in one process: real DHT, real rosters, real transfers, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtshareError, FileShareError, NodeError
from dhtshare.identity import Identity
from dhtshare.node.downloads import Handle
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import FileEntry
from dhtshare.sim.network import loopback_host

SIZE = 6 * 1024 * 1024


class Cluster:
    def __init__(self, tmp: Path, boot: DhtNode) -> None:
        self.tmp, self.boot, self.nodes = tmp, boot, list[Node]()

    async def node(self, name: str, download_limit: float | None = None) -> Node:
        cfg = NodeConfig(
            home=self.tmp / name,
            host=loopback_host(len(self.nodes) + 1),  # one address each, as the DHT expects
            bootstrap=(self.boot.address,),
            identity=Identity.generate(name),
            control=False,
            download_limit=download_limit,
        )
        node = await Node.start(cfg)
        self.nodes.append(node)
        return node


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    boot = DhtNode()
    await boot.listen(0)
    c = Cluster(tmp_path, boot)
    try:
        yield c
    finally:
        await asyncio.gather(*(n.close() for n in c.nodes if not n.stopped.is_set()))
        await boot.aclose()


async def form_group(owner: Node, members: list[Node]) -> bytes:
    gid = await owner.groups.create("club")
    for m in members:
        await m.groups.request_join(gid)
    for request in await owner.groups.requests(gid):
        await owner.groups.accept(gid, request.requester)
    for m in members:
        await m.groups.maintain()
        await m.groups.refresh(gid)
    return gid


async def entry_of(node: Node, gid: bytes) -> FileEntry:
    files = await node.files.list_files(gid, node.groups.is_member)
    assert len(files) == 1
    return files[0].entry


def running(handle: Handle) -> asyncio.Task[Path]:
    assert handle.task is not None
    return handle.task


def digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


async def test_share_get_from_several_seeders_and_removed_member_refused(
    cluster: Cluster,
) -> None:
    owner = await cluster.node("owner")
    seeders = [await cluster.node(f"seeder{i}") for i in range(3)]
    fetcher, removed = await cluster.node("fetcher"), await cluster.node("removed")
    gid = await form_group(owner, [*seeders, fetcher, removed])
    source = cluster.tmp / "movie.bin"
    source.write_bytes(os.urandom(SIZE))
    for s in seeders:
        await s.share(gid, source)
    entry = await entry_of(fetcher, gid)
    handle = await fetcher.downloads.start(gid, entry, cluster.tmp / "got")
    async with asyncio.timeout(30):
        status = await running(handle)
    assert digest(status) == digest(source)
    assert len(handle.status().sources) >= 2  # pieces came from several seeders at once

    with pytest.raises(FileShareError, match="already have"):
        await fetcher.downloads.start(gid, entry, cluster.tmp / "again")

    await owner.groups.remove(gid, removed.identity.public)
    for n in [*seeders, fetcher]:
        await n.groups.refresh(gid)
        assert not n.groups.is_member(gid, removed.identity.public)
    refused = await removed.downloads.start(gid, entry, cluster.tmp / "nope")
    with pytest.raises(DhtshareError, match="not a member"):
        async with asyncio.timeout(30):
            await running(refused)
    assert not (cluster.tmp / "nope" / "movie.bin").exists()


async def test_download_limit_is_node_wide(cluster: Cluster) -> None:
    owner = await cluster.node("owner")
    limit = 2_000_000.0
    slow = await cluster.node("slow", download_limit=limit)
    gid = await form_group(owner, [slow])
    source = cluster.tmp / "a.bin"
    source.write_bytes(os.urandom(SIZE))
    await owner.share(gid, source)
    handle = await slow.downloads.start(gid, await entry_of(slow, gid), cluster.tmp / "out")
    assert handle.download.bucket is slow.downloads.bucket
    started = time.monotonic()
    async with asyncio.timeout(30):
        await running(handle)
    burst = limit / 4
    assert time.monotonic() - started >= 0.8 * (SIZE - burst) / limit  # never faster than the cap


async def test_a_bootstrap_nobody_answers_is_an_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        silent = sock.getsockname()  # bound, never answers
        config = NodeConfig(home=tmp_path / "n", bootstrap=(silent,), identity=Identity.generate(),
                            control=False)  # fmt: skip
        with pytest.raises(NodeError, match="no bootstrap node answered"):
            await Node.start(config)
