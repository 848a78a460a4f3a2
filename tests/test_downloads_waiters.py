"""Who a download runs for (issue #14, items 1 and 9): a waiting ``get`` that goes away
without asking to keep its download cancels it; a download kept in the background, or
waited for by another ``get``, goes on; a second ``--out`` is refused, not ignored.
Real nodes on 127.0.0.1; the owner serves at most 1 MB/s so a download is still running
when its waiter leaves."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from support.nodes import NodeCluster, admit

from dhtshare.errors import FileShareError
from dhtshare.node.downloads import Handle
from dhtshare.node.service import Node
from dhtshare.records import FileEntry

SIZE = 4 * 1024 * 1024


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, bytes, FileEntry]]:
    async with NodeCluster.running(tmp_path) as cluster:
        owner = await cluster.node("owner", upload_limit=1e6)
        fetcher = await cluster.node("fetcher")
        gid = await owner.groups.create("club")
        await admit(owner, gid, fetcher)
        path = tmp_path / "src" / "movie.bin"
        path.parent.mkdir()
        path.write_bytes(os.urandom(SIZE))
        s = await owner.share(gid, path)
        entry = FileEntry(gid, s.content_id, s.name, s.size, s.piece_size)
        yield owner, fetcher, gid, entry


def task(handle: Handle) -> asyncio.Task[Path]:
    assert handle.task is not None
    return handle.task


def leaving_after_first_piece(
    handle: Handle, left: asyncio.Event
) -> Callable[[Handle], Awaitable[None]]:
    """A ``get``'s progress callback whose client goes away once a piece is verified."""

    async def progress(_: object) -> None:
        if handle.status().bytes_done > 0:
            left.set()
            raise ConnectionResetError("the client went away")

    return progress


async def test_a_get_that_goes_away_cancels_its_download(
    pair: tuple[Node, Node, bytes, FileEntry], tmp_path: Path
) -> None:
    _, fetcher, gid, entry = pair
    handle = await fetcher.downloads.start(gid, entry, tmp_path / "out")
    part = handle.download.part_path
    left = asyncio.Event()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(30):
            await fetcher.downloads.wait(handle, leaving_after_first_piece(handle, left))
    assert left.is_set()
    assert not part.exists() and list((tmp_path / "out").iterdir()) == []
    assert handle.task is not None and handle.task.done()
    assert list(fetcher.home.resume_dir.glob(f"{entry.content_id.hex()}*")) == []
    assert entry.content_id not in fetcher.downloads.handles
    assert fetcher.registry.get(gid, entry.content_id) is None  # no longer served
    assert handle.cancelled
    saved = json.loads(fetcher.home.downloads.read_text())
    assert all(d["content_id"] != entry.content_id.hex() for d in saved)  # not resumed


async def test_a_kept_download_or_one_another_get_waits_for_goes_on(
    pair: tuple[Node, Node, bytes, FileEntry], tmp_path: Path
) -> None:
    _, fetcher, gid, entry = pair
    out = tmp_path / "out"
    handle = await fetcher.downloads.start(gid, entry, out)

    async def quiet(_: object) -> None:
        pass

    other = asyncio.ensure_future(fetcher.downloads.wait(handle, quiet))  # a second `get`
    left = asyncio.Event()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(30):
            await fetcher.downloads.wait(handle, leaving_after_first_piece(handle, left))
    assert not handle.cancelled and handle.running
    async with asyncio.timeout(30):
        await other
    assert (out / "movie.bin").stat().st_size == SIZE

    # kept (Ctrl-C, "keep"): the `get` without waiting marks it, its waiter may leave
    fetcher.downloads.clear()
    await fetcher.unshare(gid, entry.content_id)
    (out / "movie.bin").unlink()
    handle = await fetcher.downloads.start(gid, entry, out)
    assert await fetcher.downloads.start(gid, entry, out, keep=True) is handle
    left = asyncio.Event()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(30):
            await fetcher.downloads.wait(handle, leaving_after_first_piece(handle, left))
    assert handle.running and not handle.cancelled
    async with asyncio.timeout(30):
        await task(handle)
    assert handle.status().state == "complete"


async def test_a_second_out_is_refused_with_where_it_downloads(
    pair: tuple[Node, Node, bytes, FileEntry], tmp_path: Path
) -> None:
    _, fetcher, gid, entry = pair
    first = await fetcher.downloads.start(gid, entry, tmp_path / "a")
    with pytest.raises(FileShareError, match=r"already downloading into .*/a$") as caught:
        await fetcher.downloads.start(gid, entry, tmp_path / "b")
    assert "downloads cancel" in caught.value.hint
    assert not (tmp_path / "b").exists()
    assert await fetcher.downloads.start(gid, entry, tmp_path / "a") is first
    cancelled = await fetcher.downloads.cancel(entry.content_id)
    assert cancelled is first and not first.download.part_path.exists()
