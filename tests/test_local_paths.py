"""One owner per output path: downloads never share, truncate or rename away a file
they did not create (issue #13, item 7). Real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.nodes import NodeCluster, admit

from dhtshare.content import merkle_root
from dhtshare.node.downloads import Handle
from dhtshare.node.service import Node
from dhtshare.records import FileEntry

SIZE = 3 * 1024 * 1024 + 12_345


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NodeCluster]:
    async with NodeCluster.running(tmp_path, provider_timeout=20) as c:
        yield c


async def two_members(cluster: NodeCluster) -> tuple[Node, Node, bytes]:
    owner, fetcher = await cluster.node("owner"), await cluster.node("fetcher")
    gid = await owner.groups.create("club")
    await admit(owner, gid, fetcher)
    return owner, fetcher, gid


async def shared(owner: Node, gid: bytes, path: Path, data: bytes) -> FileEntry:
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(path.write_bytes, data)
    s = await owner.share(gid, path)
    return FileEntry(gid, s.content_id, s.name, s.size, s.piece_size)


def task(handle: Handle) -> asyncio.Task[Path]:
    assert handle.task is not None
    return handle.task


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def test_two_downloads_with_the_same_name_each_end_with_their_own_bytes(
    cluster: NodeCluster,
) -> None:
    owner, fetcher, gid = await two_members(cluster)
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    e1 = await shared(owner, gid, cluster.tmp / "a" / "x.bin", first)
    e2 = await shared(owner, gid, cluster.tmp / "b" / "x.bin", second)
    assert e1.name == e2.name and e1.content_id != e2.content_id
    out = cluster.tmp / "out"
    h1 = await fetcher.downloads.start(gid, e1, out)
    h2 = await fetcher.downloads.start(gid, e2, out)  # while the first one runs
    async with asyncio.timeout(60):
        paths = await asyncio.gather(task(h1), task(h2))
    assert paths[0] != paths[1]
    assert {p.name for p in paths} == {"x.bin", "x (1).bin"}
    assert sha(paths[0].read_bytes()) == sha(first)
    assert sha(paths[1].read_bytes()) == sha(second)
    # What the node now serves under each content id holds exactly that content.
    for entry, path in ((e1, paths[0]), (e2, paths[1])):
        share = fetcher.registry.get(gid, entry.content_id)
        assert share is not None and share.path == path
        assert merkle_root(share.hashes) == entry.content_id
    assert sorted(p.name for p in out.iterdir()) == ["x (1).bin", "x.bin"]


async def test_two_downloads_started_at_once_with_the_same_name_pick_two_names(
    cluster: NodeCluster,
) -> None:
    """Two ``get``s of different files with one name, started in the same instant."""
    owner, fetcher, gid = await two_members(cluster)
    first, second = os.urandom(SIZE), os.urandom(SIZE)
    e1 = await shared(owner, gid, cluster.tmp / "a" / "x.bin", first)
    e2 = await shared(owner, gid, cluster.tmp / "b" / "x.bin", second)
    out = cluster.tmp / "out"
    h1, h2 = await asyncio.gather(
        fetcher.downloads.start(gid, e1, out), fetcher.downloads.start(gid, e2, out)
    )
    async with asyncio.timeout(60):
        paths = await asyncio.gather(task(h1), task(h2))
    assert {p.name for p in paths} == {"x.bin", "x (1).bin"}
    assert sha(paths[0].read_bytes()) == sha(first)
    assert sha(paths[1].read_bytes()) == sha(second)


async def test_a_users_own_part_file_is_never_truncated_or_renamed(cluster: NodeCluster) -> None:
    owner, fetcher, gid = await two_members(cluster)
    data = os.urandom(SIZE)
    entry = await shared(owner, gid, cluster.tmp / "src" / "notes.txt", data)
    out = cluster.tmp / "out"
    out.mkdir()
    mine = out / "notes.txt.part"
    mine.write_bytes(b"my own draft, not a download")
    handle = await fetcher.downloads.start(gid, entry, out)
    async with asyncio.timeout(60):
        path = await task(handle)
    assert mine.read_bytes() == b"my own draft, not a download"
    assert path != out / "notes.txt" and path.parent == out
    assert path.read_bytes() == data


async def test_a_paused_download_resumes_its_own_part_and_no_other(cluster: NodeCluster) -> None:
    owner, fetcher, gid = await two_members(cluster)
    data = os.urandom(SIZE)
    entry = await shared(owner, gid, cluster.tmp / "src" / "r.bin", data)
    out = cluster.tmp / "out"
    handle = await fetcher.downloads.start(gid, entry, out)
    part = handle.download.part_path
    first_piece = asyncio.Event()
    announce = handle.download.on_first_piece  # the task has not run yet: no piece missed

    def seen(cid: bytes) -> None:
        first_piece.set()
        if announce is not None:
            announce(cid)

    handle.download.on_first_piece = seen
    async with asyncio.timeout(30):
        await first_piece.wait()
    await fetcher.downloads.pause_all()
    assert part.exists()
    again = await fetcher.downloads.start(gid, entry, out)
    assert again.download.part_path == part  # its own .part keeps its name
    async with asyncio.timeout(60):
        path = await task(again)
    assert path == out / "r.bin" and path.read_bytes() == data
