"""A handshake that names nobody (issue #17), against a real ``PeerServer`` over TCP on
127.0.0.1: a prober without the group's access key, a replayer of a captured exchange,
a wrong access key and a member of another group all fail, and learn nothing on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.access import access_key, access_keys
from support.swarm import GROUP, Roster, Source, make_source

from dhtshare.errors import FileShareError, ProtocolError
from dhtshare.identity import Identity
from dhtshare.transfer.aio.download import Download, DownloadOptions
from dhtshare.transfer.aio.peer import open_peer
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import ShareRegistry
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire import (
    Bitfield,
    FrameType,
    HandshakeComplete,
    PeerConnection,
    Role,
    encode_frame,
)

WAIT = 5.0
OTHER_GROUP = b"\x33" * 32
HEADER = 5
SERVER_HELLO = HEADER + 145


@dataclass
class Served:
    server: PeerServer
    identity: Identity
    source: Source
    roster: Roster

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[Served]:
    """A server sharing one file in GROUP with the roster's members."""
    source = make_source(tmp_path, 3 * 256 * 1024 + 5)
    roster = Roster()
    registry = ShareRegistry(roster, access_keys(GROUP))
    registry.add(source.share())
    identity = Identity.generate()
    roster.keys.add(identity.public)
    server = PeerServer(identity, shares=registry)
    await server.start()
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            await server.serving.wait()
        yield Served(server, identity, source, roster)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Exchange:
    """The bytes of one raw connection: what we sent, the ServerHello, and everything the
    server sent after it until it closed."""

    hello: bytes
    server_hello: bytes
    auth: bytes = b""
    after: bytes = b""


async def raw_exchange(
    served: Served, hello: bytes, auth: bytes | None = None, *, client: PeerConnection | None = None
) -> Exchange:
    """Send ``hello``; read the ServerHello; then send ``auth`` (or, given the ``client``
    that made ``hello``, its real ClientAuth) and read to the end of the stream."""
    reader, writer = await asyncio.open_connection(*served.address)
    try:
        async with asyncio.timeout(WAIT):
            writer.write(hello)
            reply = await reader.readexactly(SERVER_HELLO)
            if client is not None:
                client.receive_data(reply)
                assert isinstance(client.next_event(), HandshakeComplete)
                auth = client.data_to_send()
            assert auth is not None
            writer.write(auth)
            after = await reader.read(SERVER_HELLO) if client is not None else await reader.read()
        return Exchange(hello, reply, auth, after)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def member_client(
    served: Served, *, group: bytes = GROUP, key: bytes | None = None
) -> PeerConnection:
    me = Identity.generate()
    served.roster.keys.add(me.public)
    return PeerConnection(
        Role.CLIENT,
        me.signing_key,
        group_id=group,
        content_id=served.source.content_id,
        access_key=access_key(group) if key is None else key,
    )


def sessions(served: Served) -> int:
    """Sessions the server ever admitted. A connection that ended (we read its end) and
    was never admitted never will be: admission comes before anything sealed is sent."""
    return served.server._admitted


async def test_a_prober_gets_a_server_hello_like_a_members_and_learns_no_identity(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as served:
        member = member_client(served)
        real = await raw_exchange(served, member.initiate(), client=member)
        assert real.after  # a session: the server's sealed Bitfield follows
        prober = member_client(served, key=os.urandom(32))
        hello = prober.initiate()
        junk_auth = encode_frame(FrameType.CLIENT_AUTH, os.urandom(176))
        probe = await raw_exchange(served, hello, junk_auth)
        assert len(probe.server_hello) == len(real.server_hello) == SERVER_HELLO
        assert probe.server_hello[:HEADER] == real.server_hello[:HEADER]
        server_id = served.identity.public
        everything = probe.server_hello + probe.after
        for form in (server_id, server_id.hex().encode(), GROUP, served.source.content_id):
            assert form not in everything
        # the prober cannot read the ServerHello, and its ClientAuth ends the connection
        prober.receive_data(probe.server_hello)
        with pytest.raises(ProtocolError, match="access key"):
            prober.next_event()
        assert probe.after[HEADER - 1] == FrameType.REJECT  # plaintext: no keys exist
        assert sessions(served) == 1  # the member's


async def test_a_replayed_client_hello_gets_no_session_and_the_same_refusal(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as served:
        member = member_client(served)
        captured = await raw_exchange(served, member.initiate(), client=member)
        assert captured.after
        replay = await raw_exchange(served, captured.hello, captured.auth)
        assert len(replay.server_hello) == SERVER_HELLO
        assert replay.server_hello != captured.server_hello  # a fresh ephemeral key
        # the replayer's refusal is byte for byte a stranger's
        stranger = member_client(served, key=os.urandom(32))
        probe = await raw_exchange(served, stranger.initiate(), captured.auth)
        assert replay.after == probe.after != b""
        assert served.identity.public not in replay.server_hello + replay.after
        assert sessions(served) == 1  # the captured one


async def test_a_wrong_access_key_fails_the_connection(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        me = Identity.generate()
        served.roster.keys.add(me.public)
        host, port = served.address
        cid = served.source.content_id
        with pytest.raises(ProtocolError, match="access key"):
            await open_peer(me, host, port, GROUP, cid, access_key=os.urandom(32))
        async with await open_peer(me, host, port, GROUP, cid, access_key=access_key(GROUP)) as s:
            async with asyncio.timeout(WAIT):
                assert isinstance(await anext(s), Bitfield)
        assert sessions(served) == 1


async def test_a_member_of_another_group_cannot_connect(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        other = Identity.generate()
        served.roster.keys.add(other.public)  # even one on the roster: its key is not ours
        host, port = served.address
        cid = served.source.content_id
        with pytest.raises(ProtocolError, match="access key"):
            await open_peer(other, host, port, OTHER_GROUP, cid, access_key=access_key(OTHER_GROUP))
        # naming our group with the other group's key fails the same way
        with pytest.raises(ProtocolError, match="access key"):
            await open_peer(other, host, port, GROUP, cid, access_key=access_key(OTHER_GROUP))
        assert sessions(served) == 0


async def test_a_download_without_an_access_key_fails_clearly_and_makes_no_file(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as served:
        me = Identity.generate()
        served.roster.keys.add(me.public)
        host, port = served.address

        async def providers() -> list[ProviderAddr]:
            return [ProviderAddr(served.identity.public, host, port)]

        out = tmp_path / "out"
        out.mkdir()
        dl = Download(
            me,
            served.source.info(),
            out,
            providers=providers,
            is_member=served.roster,
            access_key=lambda group: None,
            options=DownloadOptions(),
        )
        with pytest.raises(FileShareError, match="no access key") as info:
            async with asyncio.timeout(WAIT):
                await dl.run()
        assert info.value.hint
        assert list(out.iterdir()) == []
        assert dl.status().state == "failed"


async def test_a_download_ends_when_the_group_key_goes_away(tmp_path: Path) -> None:
    """A new epoch without us: the next dial finds no key, and the download ends with the
    same clear error instead of retrying forever."""
    async with serving(tmp_path) as served:
        me = Identity.generate()
        served.roster.keys.add(me.public)
        host, port = served.address
        polled = asyncio.Event()
        keys = {GROUP: access_key(GROUP)}

        async def providers() -> list[ProviderAddr]:
            keys.clear()  # the key goes away between the start and the first dial
            polled.set()
            return [ProviderAddr(served.identity.public, host, port)]

        dl = Download(
            me,
            served.source.info(),
            tmp_path,
            providers=providers,
            is_member=served.roster,
            access_key=keys.get,
            options=DownloadOptions(),
        )
        with pytest.raises(FileShareError, match="no access key"):
            async with asyncio.timeout(WAIT):
                await dl.run()
        assert polled.is_set()
