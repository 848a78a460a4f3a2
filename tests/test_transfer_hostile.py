"""A hostile member against real downloads on 127.0.0.1 (issue #13, item 4).

Each test runs a real download from an honest seeder (a ``PeerServer``) while one
member misbehaves: a provider address that is no address, a peer that answers with
messages that break the download's state (a scripted server speaking the real wire
protocol after a real handshake), arbitrary message sequences (hypothesis). The
download must finish from the honest seeder, cost the hostile peer only its own
session, and write nothing but its own file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.access import access_key, access_keys
from support.swarm import GROUP, PIECE, Roster, Source, make_source

from dhtshare.errors import FileShareError, ProtocolError
from dhtshare.identity import Identity
from dhtshare.transfer.aio.download import Download, DownloadOptions
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.picker import PickerConfig
from dhtshare.transfer.share import ShareRegistry
from dhtshare.transfer.status import Complete, Failed
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import (
    MAX_BLOCK,
    Bitfield,
    Cancel,
    ConnectionClosed,
    GetHashes,
    HandshakeComplete,
    HashList,
    Have,
    Keepalive,
    Message,
    PeerConnection,
    Piece,
    Reject,
    Request,
    Role,
)

FAST = DownloadOptions(provider_timeout=10.0, repoll_interval=0.2, retry_after=0.2)


@asynccontextmanager
async def seeder(
    src: Source, members: Roster, *, upload_rate: float | None = None
) -> AsyncIterator[tuple[PeerServer, ProviderAddr, asyncio.Task[None]]]:
    """An honest member serving ``src`` with the real ``PeerServer``."""
    identity = Identity.generate()
    members.keys.add(identity.public)
    registry = ShareRegistry(members, access_keys(GROUP))
    registry.add(src.share())
    server = PeerServer(identity, shares=registry, upload_rate=upload_rate)
    host, port = await server.start()
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        await server.serving.wait()
    try:
        yield server, ProviderAddr(identity.public, host, port), task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ScriptedPeer:
    """A member's peer server that speaks the real protocol but sends what it is told.

    After the handshake it sends ``first``; it answers ``GetHashes`` with the true
    hashes if ``hashes`` is set; on the first ``Request`` (or after ``patience``
    seconds without one) it sends ``then`` and closes.
    """

    def __init__(
        self,
        src: Source,
        members: Roster,
        first: Sequence[Message],
        then: Sequence[Message],
        *,
        hashes: bool = True,
        patience: float = 1.0,
        stall: bool = False,
    ) -> None:
        self.identity = Identity.generate()
        members.keys.add(self.identity.public)
        self.src, self.first, self.then = src, list(first), list(then)
        self.hashes, self.patience, self.stall = hashes, patience, stall
        self.requests = 0
        self.sent_then = False
        self._server: asyncio.Server | None = None

    async def start(self) -> ProviderAddr:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return ProviderAddr(self.identity.public, "127.0.0.1", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = PeerConnection(
            Role.SERVER, self.identity.signing_key, access_keys=access_keys(GROUP)
        )
        try:
            async with asyncio.timeout(self.patience + 5):
                await self._converse(conn, reader, writer)
        except (ProtocolError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _converse(
        self, conn: PeerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(65536)
            except TimeoutError:
                if self.stall:  # answer nothing, but keep the connection alive
                    self._send(conn, writer, [Keepalive()])
                    deadline = loop.time() + 0.5
                    continue
                data = None
            if data is None or (self.requests and not self.sent_then and not self.stall):
                self._send(conn, writer, self.then)
                self.sent_then = True
                return
            conn.receive_data(data)
            while (event := conn.next_event()) is not None:
                writer.write(conn.data_to_send())
                if isinstance(event, HandshakeComplete):
                    self._send(conn, writer, self.first)
                    deadline = loop.time() + self.patience
                elif isinstance(event, GetHashes) and self.hashes:
                    chunk = self.src.hashes[event.start : event.start + event.count]
                    self._send(conn, writer, HashList.chunks(event.start, chunk))
                elif isinstance(event, Request):
                    self.requests += 1
                elif isinstance(event, ConnectionClosed | Reject):
                    return
            writer.write(conn.data_to_send())
            if not data:
                return

    @staticmethod
    def _send(conn: PeerConnection, writer: asyncio.StreamWriter, msgs: Sequence[Message]) -> None:
        for msg in msgs:
            with contextlib.suppress(ProtocolError):
                writer.write(conn.send(msg))


def new_download(
    src: Source, out: Path, members: Roster, providers: list[ProviderAddr]
) -> Download:
    me = Identity.generate()
    members.keys.add(me.public)

    async def lookup() -> list[ProviderAddr]:
        return list(providers)

    return Download(
        me,
        src.info(),
        out,
        providers=lookup,
        access_key=access_key,
        is_member=members,
        options=FAST,
    )


async def finish(dl: Download, src: Source, out: Path) -> None:
    """The download completes with the source's bytes and leaves only its file."""
    async with asyncio.timeout(30):
        path = await dl.run()
    assert path.read_bytes() == src.data
    assert isinstance(dl.status(), Complete)
    assert sorted(os.listdir(out)) == ["out.bin"]


async def test_provider_with_non_address_host_costs_that_provider_only(tmp_path: Path) -> None:
    src = make_source(tmp_path, 2 * 1024 * 1024)
    members = Roster()
    bad = Identity.generate()
    members.keys.add(bad.public)
    out = tmp_path / "out"
    async with seeder(src, members) as (_, honest, serving):
        # a provider record's host reaches the download only as this address
        hostile = ProviderAddr(bad.public, "no\x00host", 7000)
        dl = new_download(src, out, members, [hostile, honest])
        await finish(dl, src, out)
        assert not serving.done()
    assert dl.swarm.sources[honest.peer_key] == src.layout.size
    assert dl.peer_crashes >= 1  # the bad address ended its own session, and was counted


async def test_piece_with_out_of_range_index_bans_only_that_peer(tmp_path: Path) -> None:
    src = make_source(tmp_path, 4 * 1024 * 1024)
    members = Roster()
    count = src.layout.piece_count
    everything = Bitfield.from_pieces(count, range(count))
    out = tmp_path / "out"
    # the honest seeder is slowed down so that the hostile peer is asked for blocks
    async with seeder(src, members, upload_rate=2 * 1024 * 1024) as (_, honest, serving):
        liar = ScriptedPeer(src, members, [everything], [Piece(count + 5, 0, b"x" * 1024)])
        hostile = await liar.start()
        try:
            dl = new_download(src, out, members, [hostile, honest])
            await finish(dl, src, out)
        finally:
            liar.close()
        assert not serving.done()
    assert liar.requests > 0 and liar.sent_then  # the bad Piece was sent, and survived
    assert hostile.peer_key in dl.swarm.banned
    assert dl.swarm.sources[honest.peer_key] == src.layout.size


async def test_download_that_every_peer_fails_ends_failed(tmp_path: Path) -> None:
    src = make_source(tmp_path, 1024 * 1024)
    members = Roster()
    count = src.layout.piece_count
    everything = Bitfield.from_pieces(count, range(count))
    liar = ScriptedPeer(src, members, [everything], [Have(count)])
    addr = await liar.start()
    try:
        me = Identity.generate()
        members.keys.add(me.public)

        async def lookup() -> list[ProviderAddr]:
            return [addr]

        opts = DownloadOptions(provider_timeout=2.0, repoll_interval=0.2, retry_after=0.2)
        dl = Download(
            me,
            src.info(),
            tmp_path,
            providers=lookup,
            access_key=access_key,
            is_member=members,
            options=opts,
        )
        with pytest.raises(FileShareError, match="no providers"):
            async with asyncio.timeout(20):
                await dl.run()
    finally:
        liar.close()
    assert isinstance(dl.status(), Failed)
    assert addr.peer_key in dl.swarm.banned


async def test_member_that_claims_every_piece_and_sends_none_ends_the_download(
    tmp_path: Path,
) -> None:
    src = make_source(tmp_path, 1024 * 1024)
    members = Roster()
    count = src.layout.piece_count
    everything = Bitfield.from_pieces(count, range(count))
    liar = ScriptedPeer(src, members, [everything], [], patience=30.0, stall=True)
    addr = await liar.start()
    try:
        me = Identity.generate()
        members.keys.add(me.public)

        async def lookup() -> list[ProviderAddr]:
            return [addr]

        opts = DownloadOptions(
            provider_timeout=2.0,
            repoll_interval=0.2,
            retry_after=0.2,
            picker=PickerConfig(block_size=MAX_BLOCK, min_timeout=0.5),
        )
        dl = Download(
            me,
            src.info(),
            tmp_path,
            providers=lookup,
            access_key=access_key,
            is_member=members,
            options=opts,
        )
        with pytest.raises(FileShareError, match="no providers"):
            async with asyncio.timeout(20):  # it kept the download "downloading" for good
                await dl.run()
    finally:
        liar.close()
    assert liar.requests > 0
    assert isinstance(dl.status(), Failed)


# -- arbitrary messages from an authenticated member ----------------------------------

COUNT = 4  # pieces of the file in the property test (1 MiB)

indices = st.one_of(st.integers(0, COUNT + 2), st.just(2**32 - 1))
begins = st.one_of(st.sampled_from([0, 1, 16384, PIECE - 1, PIECE]), st.integers(0, 2**32 - 1))
hashes32 = st.binary(min_size=32, max_size=32)
messages: st.SearchStrategy[Message] = st.one_of(
    st.just(Keepalive()),
    st.integers(0, COUNT + 3).flatmap(
        lambda n: st.sets(st.integers(0, max(0, n - 1)), max_size=n).map(
            lambda s, n=n: Bitfield.from_pieces(n, s if n else ())
        )
    ),
    st.builds(Have, indices),
    st.builds(Piece, indices, begins, st.binary(min_size=1, max_size=2048)),
    st.builds(Request, indices, begins, st.integers(1, 16384)),
    st.builds(Cancel, indices, begins, st.integers(1, 16384)),
    st.builds(GetHashes, st.integers(0, 8), st.integers(1, 8)),
    st.builds(HashList, st.integers(0, COUNT + 1), st.lists(hashes32, min_size=1, max_size=6)),
    st.builds(Reject, st.integers(0, 255), st.text(max_size=20)),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.lists(messages, max_size=6),
    then=st.lists(messages, max_size=6),
    hashes=st.booleans(),
    lead=st.booleans(),
    to_seeder=st.lists(messages, max_size=8),
)
async def test_arbitrary_messages_from_a_member_cost_that_member_only(
    tmp_path_factory: pytest.TempPathFactory,
    first: list[Message],
    then: list[Message],
    hashes: bool,
    lead: bool,
    to_seeder: list[Message],
) -> None:
    tmp = tmp_path_factory.mktemp("hostile")
    src = make_source(tmp, COUNT * PIECE)
    members = Roster()
    out = tmp / "out"
    # the honest seeder is slowed down so that the hostile peer is asked for blocks
    async with seeder(src, members, upload_rate=1024 * 1024) as (server, honest, serving):
        # the same member also sends arbitrary messages to the honest seeder
        await hostile_client(src, members, honest, to_seeder)
        if lead:  # claim every piece first, so that the downloader asks it for blocks
            first = [Bitfield.from_pieces(COUNT, range(COUNT)), *first]
        liar = ScriptedPeer(src, members, first, then, hashes=hashes, patience=0.3)
        hostile = await liar.start()
        try:
            dl = new_download(src, out, members, [hostile, honest])
            await finish(dl, src, out)
        finally:
            liar.close()
        assert not serving.done()
        assert server.stats["drop.bug"] == 0
    assert dl.peer_crashes == 0  # every message was checked where it entered


async def hostile_client(
    src: Source, members: Roster, addr: ProviderAddr, msgs: Sequence[Message]
) -> None:
    """A member connects to ``addr``, finishes the handshake, sends ``msgs`` and leaves."""
    me = Identity.generate()
    members.keys.add(me.public)
    conn = PeerConnection(
        Role.CLIENT,
        me.signing_key,
        group_id=GROUP,
        content_id=src.content_id,
        access_key=access_key(GROUP),
    )
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        async with asyncio.timeout(5):
            writer.write(conn.initiate())
            while not isinstance(conn.next_event(), HandshakeComplete):
                data = await reader.read(4096)
                if not data:
                    return
                conn.receive_data(data)
            for msg in msgs:
                writer.write(conn.send(msg))
            writer.write(conn.data_to_send())
            await writer.drain()
    except (ProtocolError, OSError):
        pass  # the seeder may refuse and close at once: that is its right
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
