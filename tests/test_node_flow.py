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
from support.nodes import NodeCluster, form_group

from dhtshare.errors import DhtshareError, FileShareError, NodeError
from dhtshare.identity import Identity
from dhtshare.node.downloads import Handle
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import FileEntry

SIZE = 6 * 1024 * 1024


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NodeCluster]:
    async with NodeCluster.running(tmp_path, own_hosts=True) as c:
        yield c


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
    cluster: NodeCluster,
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

    # refused by the providers (not a member), or at home once its node no longer holds
    # the group's access key (the handshake would fail anyway): never a download
    async def fetch_removed() -> None:
        refused = await removed.downloads.start(gid, entry, cluster.tmp / "nope")
        async with asyncio.timeout(30):
            await running(refused)

    with pytest.raises(DhtshareError, match=r"not a member|no access key"):
        await fetch_removed()
    assert not (cluster.tmp / "nope" / "movie.bin").exists()


async def test_download_limit_is_node_wide(cluster: NodeCluster) -> None:
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
        config = NodeConfig(
            home=tmp_path / "n", bootstrap=(silent,), identity=Identity.generate(), control=False
        )
        with pytest.raises(NodeError, match="no bootstrap node answered"):
            await Node.start(config)
