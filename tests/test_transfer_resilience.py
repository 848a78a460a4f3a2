"""A bug inside one peer session costs that connection only; the server keeps serving."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.transfer.aio import serve
from dhtshare.transfer.aio.peer import open_peer
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.wire import Bitfield

PIECE = 256 * 1024
GROUP = bytes(range(32))


async def test_a_crashing_session_does_not_stop_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(random.Random(1).randbytes(2 * PIECE))
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    registry = ShareRegistry(lambda g, k: True, access_keys(GROUP))
    registry.add(Share(GROUP, cid, path, FileLayout(2 * PIECE, PIECE), hashes))
    server = PeerServer(Identity.generate(), shares=registry)
    host, port = await server.start()
    real_run = serve._Session.run
    crashes = 0

    async def run_once_broken(self: serve._Session) -> None:
        nonlocal crashes
        if crashes == 0:
            crashes += 1
            raise RuntimeError("a bug in the session")
        await real_run(self)

    monkeypatch.setattr(serve._Session, "run", run_once_broken)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(server.serve())
        async with asyncio.timeout(5):
            await server.serving.wait()
        me = Identity.generate()
        first = await open_peer(me, host, port, GROUP, cid, access_key=access_key(GROUP))
        async with asyncio.timeout(5):
            events = [e async for e in first]  # the crashed session just closes
        assert not any(isinstance(e, Bitfield) for e in events)
        await first.aclose()
        second = await open_peer(me, host, port, GROUP, cid, access_key=access_key(GROUP))
        async with asyncio.timeout(5):
            event = await anext(second)
        assert isinstance(event, Bitfield)
        assert list(event.pieces()) == [0, 1]
        await second.aclose()
        assert crashes == 1
        assert server.stats["drop.bug"] == 1
        assert not task.done()
        task.cancel()
