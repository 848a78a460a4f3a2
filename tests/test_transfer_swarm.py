"""Downloads over real TCP on 127.0.0.1: many seeders, vanishing and lying seeders,
refused members, resume after a stop, and swarming between two downloaders."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.access import access_key, access_keys
from support.swarm import GROUP, PIECE, Roster, Source, make_source

from dhtshare.errors import FileShareError, StoreError
from dhtshare.identity import Identity
from dhtshare.store.resume import read_state
from dhtshare.transfer.aio.download import Download, DownloadOptions
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.picker import Block
from dhtshare.transfer.share import ShareRegistry
from dhtshare.transfer.status import Complete, Downloading, Failed, Paused
from dhtshare.transfer.swarm import ProviderAddr, refill_due

MiB = 1024 * 1024
FAST = DownloadOptions(provider_timeout=5.0, repoll_interval=0.2, retry_after=0.2)


@dataclass
class Peer:
    """A seeder (or a downloader's server): identity, registry, running server."""

    identity: Identity
    registry: ShareRegistry
    server: PeerServer
    task: asyncio.Task[None]

    @property
    def addr(self) -> ProviderAddr:
        host, port = self.server.address
        return ProviderAddr(self.identity.public, host, port)


def corrupt_copy(src: Source, tmp_path: Path, bad: Callable[[int], bool]) -> Path:
    """A copy of ``src`` whose pieces ``i`` with ``bad(i)`` have one byte flipped."""
    raw = bytearray(src.data)
    for i in range(src.layout.piece_count):
        if bad(i):
            raw[i * PIECE + 7] ^= 0xFF
    path = tmp_path / "corrupt.bin"
    path.write_bytes(raw)
    return path


class Swarm:
    """Starts peers inside one TaskGroup; every server is cancelled on the way out."""

    def __init__(self, tg: asyncio.TaskGroup, roster: Roster) -> None:
        self.tg = tg
        self.roster = roster
        self.peers: list[Peer] = []

    async def peer(self, *, member: bool = True, upload_rate: float | None = None) -> Peer:
        identity = Identity.generate()
        if member:
            self.roster.keys.add(identity.public)
        registry = ShareRegistry(self.roster, access_keys(GROUP))
        server = PeerServer(identity, shares=registry, upload_rate=upload_rate)
        await server.start()
        peer = Peer(identity, registry, server, self.tg.create_task(server.serve()))
        self.peers.append(peer)
        return peer

    async def seeder(self, src: Source, path: Path | None = None, **kw: float | None) -> Peer:
        peer = await self.peer(**kw)  # type: ignore[arg-type]
        peer.registry.add(src.share(path))
        return peer

    def stop(self) -> None:
        for peer in self.peers:
            peer.task.cancel()


@asynccontextmanager
async def swarm() -> AsyncIterator[Swarm]:
    async with asyncio.TaskGroup() as tg:
        s = Swarm(tg, Roster())
        try:
            yield s
        finally:
            s.stop()


def providers_of(peers: Iterable[Peer]) -> Callable[[], asyncio.Future[list[ProviderAddr]]]:
    addrs = [p.addr for p in peers]

    async def lookup() -> list[ProviderAddr]:
        return list(addrs)

    return lookup  # type: ignore[return-value]


def downloader(
    sw: Swarm, src: Source, out: Path, peers: Iterable[Peer], **kw: object
) -> tuple[Identity, Download]:
    me = Identity.generate()
    sw.roster.keys.add(me.public)
    kw.setdefault("options", FAST)
    dl = Download(
        me,
        src.info(),
        out,
        providers=providers_of(peers),
        access_key=access_key,
        is_member=sw.roster,
        **kw,  # type: ignore[arg-type]
    )
    return me, dl


def at_fraction(
    fraction: float, count: int, action: Callable[[], None]
) -> Callable[[bytes, int], None]:
    """An ``on_have`` callback that runs ``action`` once, when ``fraction`` is verified."""
    fired = False

    def on_have(_cid: bytes, done: int) -> None:
        nonlocal fired
        if not fired and done >= fraction * count:
            fired = True
            action()

    return on_have


async def test_three_seeders_share_the_work(tmp_path: Path) -> None:
    src = make_source(tmp_path, 32 * MiB)
    async with swarm() as sw:
        seeders = [await sw.seeder(src) for _ in range(3)]
        _, dl = downloader(sw, src, tmp_path / "out", seeders)
        async with asyncio.timeout(20):
            path = await dl.run()
    assert path.read_bytes() == src.data
    assert not dl.part_path.exists() and not dl.state_path.exists()
    status = dl.status()
    assert isinstance(status, Complete) and status.bytes_done == src.layout.size
    for seeder in seeders:
        supplied = dl.swarm.sources[seeder.identity.public]
        assert supplied >= 0.15 * src.layout.size, (supplied, dict(dl.swarm.sources))
        assert seeder.server.uploaded[dl.identity.public] >= supplied


async def test_seeder_stopped_half_way(tmp_path: Path) -> None:
    src = make_source(tmp_path, 32 * MiB)
    async with swarm() as sw:
        seeders = [await sw.seeder(src) for _ in range(3)]
        victim = seeders[0]
        on_have = at_fraction(0.5, src.layout.piece_count, victim.task.cancel)
        _, dl = downloader(sw, src, tmp_path / "out", seeders, on_have=on_have)
        async with asyncio.timeout(20):
            path = await dl.run()
        assert victim.task.cancelled()
    assert path.read_bytes() == src.data
    others = sum(dl.swarm.sources[s.identity.public] for s in seeders[1:])
    assert 0 < dl.swarm.sources[victim.identity.public] < src.layout.size
    assert others >= src.layout.size // 2


async def test_corrupting_seeder_is_banned(tmp_path: Path) -> None:
    src = make_source(tmp_path, 32 * MiB)
    bad_path = corrupt_copy(src, tmp_path, lambda i: i % 4 == 0)
    async with swarm() as sw:
        good = [await sw.seeder(src) for _ in range(2)]
        liar = await sw.seeder(src, bad_path)
        _, dl = downloader(sw, src, tmp_path / "out", [*good, liar])
        async with asyncio.timeout(20):
            path = await dl.run()
    assert path.read_bytes() == src.data
    assert dl.swarm.banned == {liar.identity.public}
    # accepted bytes = the file plus the corrupt piece(s) fetched again elsewhere
    assert (
        sum(dl.swarm.sources[g.identity.public] for g in good)
        >= src.layout.size - dl.swarm.sources[liar.identity.public]
    )
    assert liar.server.uploaded[dl.identity.public] >= PIECE


async def test_bad_hash_list_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path, 4 * MiB)
    async with swarm() as sw:
        liar = await sw.seeder(src)
        share = liar.registry.get(GROUP, src.content_id)
        assert share is not None
        share.hashes = tuple(bytes(32) for _ in src.hashes)  # lies about the hashes
        good = await sw.seeder(src)
        _, dl = downloader(sw, src, tmp_path / "out", [liar, good])
        async with asyncio.timeout(10):
            path = await dl.run()
    assert path.read_bytes() == src.data
    assert liar.identity.public in dl.swarm.banned
    assert dl.swarm.sources[liar.identity.public] == 0


async def test_non_member_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path, 4 * MiB)
    async with swarm() as sw:
        seeder = await sw.seeder(src)
        _, dl = downloader(sw, src, tmp_path / "out", [seeder])
        sw.roster.keys.discard(dl.identity.public)
        with pytest.raises(FileShareError, match="not a member"):
            async with asyncio.timeout(10):
                await dl.run()
    assert sum(seeder.server.uploaded.values()) == 0
    assert seeder.server.stats["refuse.not_member"] >= 1
    assert isinstance(dl.status(), Failed) and "not a member" in dl.status().to_json()["error"]
    assert not dl.final_path.exists()


async def test_removed_member_is_cut_off(tmp_path: Path) -> None:
    src = make_source(tmp_path, 16 * MiB)
    uploaded_at_removal: list[int] = []
    async with swarm() as sw:
        seeders = [await sw.seeder(src) for _ in range(2)]
        me = Identity.generate()

        def remove_me() -> None:
            sw.roster.keys.discard(me.public)
            uploaded_at_removal.append(sum(sum(s.server.uploaded.values()) for s in seeders))

        slow = DownloadOptions(provider_timeout=5.0, repoll_interval=0.2, rate_limit=8 * MiB)
        sw.roster.keys.add(me.public)
        dl = Download(
            me,
            src.info(),
            tmp_path / "out",
            providers=providers_of(seeders),
            access_key=access_key,
            is_member=sw.roster,
            on_have=at_fraction(0.25, src.layout.piece_count, remove_me),
            options=slow,
        )
        with pytest.raises(FileShareError, match="not a member"):
            async with asyncio.timeout(10):
                await dl.run()
    served = sum(sum(s.server.uploaded.values()) for s in seeders)
    # at most the block each seeder was already sending when the roster changed
    assert served <= uploaded_at_removal[0] + 2 * PIECE
    assert dl.swarm.bytes_done < src.layout.size
    assert dl.part_path.exists() and not dl.final_path.exists()


async def test_stop_and_resume_fetches_only_missing_pieces(tmp_path: Path) -> None:
    src = make_source(tmp_path, 32 * MiB)
    out = tmp_path / "out"
    async with swarm() as sw:
        seeders = [await sw.seeder(src) for _ in range(2)]
        first: asyncio.Task[Path] | None = None

        def stop() -> None:
            assert first is not None
            first.cancel()

        _, dl1 = downloader(
            sw, src, out, seeders, on_have=at_fraction(0.5, src.layout.piece_count, stop)
        )
        first = asyncio.create_task(dl1.run())
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(20):
                await first
        paused = dl1.status()
        assert isinstance(paused, Paused)
        assert src.layout.size // 2 <= paused.bytes_done < src.layout.size
        assert dl1.part_path.exists() and dl1.state_path.exists()
        saved = read_state(dl1.state_path).verified
        assert sum(src.layout.piece_length(i) for i in saved) == paused.bytes_done
        sent_before = sum(sum(s.server.uploaded.values()) for s in seeders)

        _, dl2 = downloader(sw, src, out, seeders)
        requested: set[int] = set()
        pick = dl2.swarm.picker.next_requests

        def spy(peer: bytes, now: float) -> list[Block]:
            blocks = pick(peer, now)
            requested.update(b.index for b in blocks)
            return blocks

        dl2.swarm.picker.next_requests = spy  # type: ignore[method-assign]
        async with asyncio.timeout(20):
            path = await dl2.run()
    assert path.read_bytes() == src.data
    assert requested and requested.isdisjoint(saved)  # verified pieces never asked for
    missing = src.layout.size - paused.bytes_done
    assert sum(dl2.swarm.sources.values()) == missing  # each missing block accepted once
    # what arrived beyond that is endgame duplicates, far below re-fetching the saved half
    assert dl2.swarm.bytes_received < missing + paused.bytes_done // 4
    sent_after = sum(sum(s.server.uploaded.values()) for s in seeders) - sent_before
    assert sent_after < missing + paused.bytes_done // 4


async def test_second_downloader_swarms_from_the_first(tmp_path: Path) -> None:
    src = make_source(tmp_path, 8 * MiB)
    overlap: list[int] = []
    async with swarm() as sw:
        seeder = await sw.seeder(src, upload_rate=4 * MiB)
        d1_peer = await sw.peer()
        published: list[ProviderAddr] = [seeder.addr]

        async def lookup() -> list[ProviderAddr]:
            return list(published)

        def publish(_cid: bytes) -> None:  # the node publishes a provider record
            published.append(d1_peer.addr)

        d1 = Download(
            d1_peer.identity,
            src.info(),
            tmp_path / "d1",
            providers=lookup,
            access_key=access_key,
            is_member=sw.roster,
            shares=d1_peer.registry,
            on_first_piece=publish,
            options=DownloadOptions(repoll_interval=0.2, rate_limit=3 * MiB),
        )
        me2 = Identity.generate()
        sw.roster.keys.add(me2.public)

        def check_overlap(_cid: bytes, _done: int) -> None:
            from_d1 = d2.swarm.sources[d1_peer.identity.public]
            if from_d1 and isinstance(d1.status(), Downloading):
                overlap.append(from_d1)

        d2 = Download(
            me2,
            src.info(),
            tmp_path / "d2",
            providers=lookup,
            access_key=access_key,
            is_member=sw.roster,
            on_have=check_overlap,
            options=FAST,
        )
        async with asyncio.timeout(15):
            p1, p2 = await asyncio.gather(d1.run(), d2.run())
    assert p1.read_bytes() == src.data and p2.read_bytes() == src.data
    assert overlap, "the second downloader got nothing from the first while it downloaded"
    assert d1_peer.server.uploaded[me2.public] == d2.swarm.sources[d1_peer.identity.public] > 0


async def test_no_providers_fails_clearly(tmp_path: Path) -> None:
    src = make_source(tmp_path, 1 * MiB)
    async with swarm() as sw:
        options = DownloadOptions(provider_timeout=0.3, repoll_interval=0.05)
        _, dl = downloader(sw, src, tmp_path / "out", [], options=options)
        with pytest.raises(FileShareError, match="no providers"):
            async with asyncio.timeout(5):
                await dl.run()
    assert not dl.final_path.exists()


async def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    src = make_source(tmp_path, 1 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    (out / "out.bin").write_bytes(b"mine")
    async with swarm() as sw:
        seeder = await sw.seeder(src)
        _, dl = downloader(sw, src, out, [seeder])
        with pytest.raises(StoreError, match="already exists"):
            await dl.run()
    assert (out / "out.bin").read_bytes() == b"mine"
    assert sum(seeder.server.uploaded.values()) == 0


async def test_disk_full_keeps_the_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path, 2 * MiB)

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dhtshare.store.partial.os.pwrite", full)
    async with swarm() as sw:
        seeder = await sw.seeder(src)
        _, dl = downloader(sw, src, tmp_path / "out", [seeder])
        with pytest.raises(StoreError, match="disk full") as info:
            async with asyncio.timeout(10):
                await dl.run()
    assert "free some space" in info.value.hint
    assert dl.part_path.exists() and not dl.final_path.exists()
    assert isinstance(dl.status(), Failed)


def test_pipelines_refill_in_batches_of_several_requests() -> None:
    def first_due(asked: int) -> int:
        return next(n for n in range(asked + 1) if refill_due(n, asked))

    assert first_due(64) == 16  # deep: after a quarter, so it never runs low
    assert first_due(14) == 7  # a share of the budget: half, so a batch is not 3 requests
    assert first_due(40) == 10  # a quarter is already 8 or more
    assert first_due(2) == 1  # the least pipeline refills after each block
    assert refill_due(0, 0)  # nothing asked: fill it now


async def test_a_download_leaves_a_complete_share_of_its_file_in_place(tmp_path: Path) -> None:
    """A node that already serves the whole file (shared by its user) and resumes a download
    of the same file keeps serving every piece: the partial share does not replace it."""
    src = make_source(tmp_path, 4 * MiB)
    async with swarm() as sw:
        seeder = await sw.seeder(src)
        me = await sw.peer()
        whole = me.registry.add(src.share())
        dl = Download(
            me.identity,
            src.info(),
            tmp_path / "again",
            providers=providers_of([seeder]),
            access_key=access_key,
            is_member=sw.roster,
            shares=me.registry,
            options=FAST,
        )
        async with asyncio.timeout(15):
            path = await dl.run()
        assert me.registry.get(GROUP, src.content_id) is whole and whole.complete
        assert dl.share is None
    assert path.read_bytes() == src.data
