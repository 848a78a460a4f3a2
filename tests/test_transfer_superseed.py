"""Super-seeding: a seeder serving a complete file to several downloaders at once
offers each a different window of rare pieces, so the swarm carries the load."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

from support.access import access_key, access_keys

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.aio.peer import PeerStream, open_peer
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.transfer.superseed import SuperSeed
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import Bitfield, Event, GetHashes, HashList, Have, Piece, Request

PIECE = 256 * 1024
GROUP = bytes(range(32))

# -- the pure policy ------------------------------------------------------------------


def seed(count: int = 32, **kw: float) -> SuperSeed:
    return SuperSeed(count, PIECE, random.Random(1), **kw)  # type: ignore[arg-type]


def test_a_lone_session_is_offered_everything() -> None:
    s = seed(10)
    assert s.join("a", 0.0, full=True) == list(range(10))
    assert s.is_full("a") and s.idle_deadline("a") is None


def test_sessions_are_offered_disjoint_rare_windows() -> None:
    s = seed(32)
    s.join("full", 0.0, full=True)
    offers = [set(s.join(sid, 0.0, full=False)) for sid in "abcd"]
    assert all(len(o) == s.min_window for o in offers)
    assert len(set().union(*offers)) == 4 * s.min_window  # nobody got the same piece
    assert all(s.score(i) == 1 for i in set().union(*offers))


def test_requests_keep_the_window_full_with_the_least_copied_pieces() -> None:
    s = seed(32)
    first = s.join("a", 0.0, full=False)
    s.join("b", 0.0, full=False)
    more = s.requested("a", first[0], PIECE, 0.1)
    assert len(more) == 1 and more[0] not in s.offered("b")
    assert s.copies[first[0]] == 1 and s.open[first[0]] == 0
    # a fast session: its window grows with its request rate (1.5 s of it)
    t, asked = 0.2, {first[0]}
    for _ in range(12):
        piece = min(s.offered("a") - asked)
        asked.add(piece)
        s.requested("a", piece, PIECE, t)
        t += 0.05
    assert s.window("a", t) > s.min_window
    assert len(s.offered("a") - asked) == s.window("a", t)


def test_only_rare_pieces_are_offered_until_a_session_is_hungry() -> None:
    s = seed(8)
    s.join("a", 0.0, full=True)
    for i in range(8):  # the full session fetched every piece: none is rare now
        s.requested("a", i, PIECE, 0.0)
    got = s.join("b", 0.0, full=False)  # still started with min_window pieces
    assert len(got) == s.min_window
    for i in got:
        assert s.requested("b", i, PIECE, 0.1) == []  # nothing rare to add
    assert s.idle("b", 0.5) == []  # not idle long enough
    assert s.idle("b", 1.2, busy=True) == []  # we are busy elsewhere: wait (patience)
    hungry = s.idle("b", 1.2 + s.patience)
    assert hungry and not set(hungry) & set(got)
    s.reported("b", [hungry[0]], 5.5)  # it got a piece from elsewhere: not hungry any more
    assert s.requested("b", hungry[1], PIECE, 5.6) == []


def test_an_idle_session_is_eventually_offered_every_piece() -> None:
    s = seed(40)
    s.join("a", 0.0, full=False)
    s.join("b", 0.0, full=False)
    now = 0.0
    for _ in range(40):
        deadline = s.idle_deadline("b")
        if deadline is None:
            break
        now = deadline + s.patience
        s.idle("b", now, busy=True)
    assert s.offered("b") == set(range(40))


def test_reports_retire_offers_and_flush_offers_the_rest() -> None:
    s = seed(16)
    a = s.join("a", 0.0, full=False)
    s.join("b", 0.0, full=False)
    s.reported("a", [a[0]], 0.1)  # got it elsewhere: replaced by a new offer
    assert s.open[a[0]] == 0 and s.copies[a[0]] == 1
    assert len(s.offered("a")) == s.min_window + 1
    s.leave("b")
    assert sum(s.open) == s.min_window  # only a's open offers remain
    rest = s.flush("a")
    assert s.offered("a") == set(range(16)) and set(rest).isdisjoint(a) and s.is_full("a")
    assert sum(s.open) == 0


# -- over TCP -----------------------------------------------------------------------


@dataclass
class Peer:
    identity: Identity
    registry: ShareRegistry
    server: PeerServer

    @property
    def addr(self) -> ProviderAddr:
        host, port = self.server.address
        return ProviderAddr(self.identity.public, host, port)


async def start_peer(
    tg: asyncio.TaskGroup, members: set[bytes], **kw: float
) -> tuple[Peer, asyncio.Task[None]]:
    identity = Identity.generate()
    members.add(identity.public)
    registry = ShareRegistry(lambda g, k: g == GROUP and k in members, access_keys(GROUP))
    server = PeerServer(identity, shares=registry, superseed_idle=0.25, **kw)  # type: ignore[arg-type]
    await server.start()
    task = tg.create_task(server.serve())
    await asyncio.sleep(0)  # one turn of the loop: serve() starts listening
    return Peer(identity, registry, server), task


def source(tmp_path: Path, size: int) -> tuple[Path, bytes, FileLayout, list[bytes]]:
    data = random.Random(3).randbytes(size)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    layout = FileLayout(size, PIECE)
    return path, data, layout, hash_file(path, PIECE)


async def next_event(stream: PeerStream) -> Event:
    async with asyncio.timeout(5):
        return await anext(stream)


async def test_flash_crowd_seeder_uploads_about_twice_the_file(tmp_path: Path) -> None:
    path, data, layout, hashes = source(tmp_path, 6 * 1024 * 1024)  # 24 pieces
    cid = merkle_root(hashes)
    members: set[bytes] = set()
    async with asyncio.TaskGroup() as tg:
        seeder, seeder_task = await start_peer(tg, members)
        seeder.registry.add(Share(GROUP, cid, path, layout, hashes))
        published = [seeder.addr]
        tasks = [seeder_task]
        downloads: list[Download] = []
        for n in range(6):
            peer, task = await start_peer(tg, members)
            tasks.append(task)

            async def lookup() -> list[ProviderAddr]:
                return list(published)

            def publish(_cid: bytes, addr: ProviderAddr = peer.addr) -> None:
                published.append(addr)

            downloads.append(
                Download(
                    peer.identity,
                    FileInfo(GROUP, cid, "out.bin", layout.size, PIECE),
                    tmp_path / f"d{n}",
                    providers=lookup,
                    access_key=access_key,
                    is_member=lambda g, k: g == GROUP and k in members,
                    shares=peer.registry,
                    on_first_piece=publish,
                    # each downloader is slower than the seeder: the crowd needs the swarm
                    options=DownloadOptions(repoll_interval=0.2, retry_after=0.2, rate_limit=4e6),
                )
            )
        async with asyncio.timeout(9):
            paths = await asyncio.gather(*(d.run() for d in downloads))
        for task in tasks:
            task.cancel()
    assert all(p.read_bytes() == data for p in paths)
    uploaded = sum(seeder.server.uploaded.values())
    # Issue #7's target is at most 3 x. Measured 1.88-2.54 x over 20 runs with the
    # current code (1.96-2.25 x in 8 runs of the code before AEGIS-128L made peers
    # faster), and 3.83-4.38 x in 4 runs with super-seeding switched off.
    assert uploaded <= 3 * len(data), f"seeder uploaded {uploaded / len(data):.2f} x the file"
    from_swarm = sum(
        sum(d.swarm.sources.values()) - d.swarm.sources[seeder.identity.public] for d in downloads
    )
    assert from_swarm >= 3 * len(data)


async def test_a_single_downloader_gets_the_full_bitfield(tmp_path: Path) -> None:
    path, data, layout, hashes = source(tmp_path, 3 * 1024 * 1024)
    cid = merkle_root(hashes)
    members: set[bytes] = set()
    async with asyncio.TaskGroup() as tg:
        seeder, task = await start_peer(tg, members)
        seeder.registry.add(Share(GROUP, cid, path, layout, hashes))
        me = Identity.generate()
        members.add(me.public)
        host, port = seeder.server.address
        async with await open_peer(
            me, host, port, GROUP, cid, access_key=access_key(GROUP)
        ) as stream:
            first = await next_event(stream)
            assert isinstance(first, Bitfield)
            assert first.pieces() == list(range(layout.piece_count))
        d = Download(
            me,
            FileInfo(GROUP, cid, "out.bin", layout.size, PIECE),
            tmp_path / "d",
            providers=lambda: _const([seeder.addr]),
            access_key=access_key,
            is_member=lambda g, k: g == GROUP and k in members,
        )
        async with asyncio.timeout(5):
            out = await d.run()
        task.cancel()
    assert out.read_bytes() == data


async def _const(addrs: list[ProviderAddr]) -> list[ProviderAddr]:
    return addrs


async def test_a_second_session_gets_a_window_and_more_as_it_asks(tmp_path: Path) -> None:
    path, data, layout, hashes = source(tmp_path, 4 * 1024 * 1024)  # 16 pieces
    cid = merkle_root(hashes)
    members: set[bytes] = set()
    async with asyncio.TaskGroup() as tg:
        seeder, task = await start_peer(tg, members)
        seeder.registry.add(Share(GROUP, cid, path, layout, hashes))
        ids = [Identity.generate() for _ in range(3)]
        members.update(i.public for i in ids)
        host, port = seeder.server.address
        first = await open_peer(ids[0], host, port, GROUP, cid, access_key=access_key(GROUP))
        assert len(_bits(await next_event(first))) == 16  # alone: everything
        second = await open_peer(ids[1], host, port, GROUP, cid, access_key=access_key(GROUP))
        window = _bits(await next_event(second))
        assert len(window) == 4
        second.send_nowait(GetHashes(0, 16))
        assert isinstance(await next_event(second), HashList)
        second.send_nowait(Request(window[0], 0, PIECE))
        offered = set(window)
        got_piece = False
        while not got_piece or len(offered) < 5:
            event = await next_event(second)
            if isinstance(event, Have):
                assert event.index not in offered
                offered.add(event.index)
            else:
                assert isinstance(event, Piece) and event.index == window[0]
                assert event.data == data[window[0] * PIECE : (window[0] + 1) * PIECE]
                got_piece = True
        # the first session leaves: the second, now alone, is offered every piece
        await first.aclose()
        while len(offered) < 16:
            event = await next_event(second)
            assert isinstance(event, Have)
            offered.add(event.index)
        await second.aclose()
        task.cancel()


def _bits(event: Event) -> list[int]:
    assert isinstance(event, Bitfield)
    return event.pieces()
