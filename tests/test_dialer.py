"""The dialer's routes and the download's upgrade from relayed to punched (node/dialer.py).

Each test runs in a loopback-only namespace (``support/punchnet.py``, as root). A fake
relay stands for ``open_circuit``: a TCP listener whose accepted end is handed to the
provider's ``punch_as_listener``, exactly what the relay client does with a circuit.
nftables drops SYNs as the provider's NAT would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from support.access import access_key
from support.netns import unavailable
from support.punchnet import LOCAL, drop_syns, inside_netns, provider, syn_counter
from support.swarm import GROUP, Roster

from dhtshare.errors import ProtocolError
from dhtshare.identity import Identity
from dhtshare.node.dialer import DIRECT, PUNCHED, RELAYED, Dialer, circuit_handler
from dhtshare.records import AddressKind, PeerAddress
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.aio.peer import PeerStream
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.status import Complete
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire.relay import RelayKey

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


class FakeRelay:
    """``open_circuit`` through a local listener; the provider's end goes to its punch,
    with the dialer's address as a relay's ``Incoming`` reports it (``source_ip``: a
    relay that reports another IP). The provider's record names it with ``key``: a relay
    key, which the dialer must name in place of the provider's identity."""

    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.lst = socket.socket()
        self.lst.bind((LOCAL, 0))
        self.lst.listen(8)
        self.lst.setblocking(False)
        self.port = int(self.lst.getsockname()[1])
        self.outcomes: list[str] = []
        self.source_ip: str | None = None
        self.handler = circuit_handler(server.adopt, lambda: server.address, lambda: LOCAL)
        self.tasks: set[asyncio.Task[None]] = set()
        self.key = RelayKey.generate().public

    async def open_circuit(self, relay: tuple[str, int], key: bytes) -> tuple[socket.socket, bytes]:
        assert relay == (LOCAL, self.port)
        assert key == self.key  # the relay key, never the provider's identity
        loop = asyncio.get_running_loop()
        d = socket.socket()
        d.setblocking(False)
        _, (p, _) = await asyncio.gather(loop.sock_connect(d, relay), loop.sock_accept(self.lst))
        p.setblocking(False)
        host, port = p.getpeername()[:2]
        task = asyncio.create_task(self._provider_side(p, (self.source_ip or host, port)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return d, b""

    async def _provider_side(self, p: socket.socket, source: tuple[str, int]) -> None:
        """What the node's ``RelayKeeper`` does with a circuit: ``circuit_handler``'s."""
        await self.handler(p, b"", source)
        self.outcomes.append("done")

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.lst.close()


@asynccontextmanager
async def relayed_provider(
    tmp_path: Path, roster: Roster, **kw: float
) -> AsyncIterator[tuple[PeerServer, ProviderAddr, FakeRelay]]:
    async with provider(tmp_path, roster, **kw) as (server, identity):  # type: ignore[arg-type]
        relay = FakeRelay(server)
        port = server.address[1]
        addr = ProviderAddr(
            identity.public,
            LOCAL,
            port,
            (PeerAddress(AddressKind.RELAY, LOCAL, relay.port, relay.key),),
        )
        try:
            yield server, addr, relay
        finally:
            relay.close()


def member(roster: Roster) -> Identity:
    me = Identity.generate()
    roster.keys.add(me.public)
    return me


def dialer(me: Identity, relay: FakeRelay, *, private: bool = True) -> Dialer:
    return Dialer(
        me,
        access_key=access_key,
        open_circuit=relay.open_circuit,
        public_ip=lambda: LOCAL,
        is_private=lambda: private,
        relay_after=0.3,
    )


async def test_a_reachable_provider_is_dialled_directly(tmp_path: Path) -> None:
    roster = Roster()
    with inside_netns():
        async with relayed_provider(tmp_path, roster) as (server, addr, relay):
            d = dialer(member(roster), relay).for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            stream, route = await d.dial(addr)
            await stream.aclose()
            assert route == DIRECT and relay.outcomes == []


@pytest.mark.parametrize(("private", "expected"), [(True, PUNCHED), (False, DIRECT)])
async def test_a_provider_behind_nat_is_punched(
    tmp_path: Path, private: bool, expected: str
) -> None:
    """Its listener drops unsolicited SYNs: the direct try hangs, the relay's punch wins;
    a public dialer's punched connection is the reverse connection: route direct."""
    roster = Roster()
    with inside_netns():
        async with relayed_provider(tmp_path, roster) as (server, addr, relay):
            drop_syns(f"tcp dport {addr.port}")
            me = member(roster)
            d = dialer(me, relay, private=private).for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            async with asyncio.timeout(15):
                stream, route = await d.dial(addr)
            try:
                assert route == expected
                assert stream.peer_key == addr.peer_key
                assert stream.remote_address == (LOCAL, addr.port)  # not the relay's
            finally:
                await stream.aclose()


async def test_the_provider_punches_only_the_ip_the_relay_reports(tmp_path: Path) -> None:
    """The relay reports the dialer as another IP: the provider does not dial the
    dialer's offer, its listener drops the dialer's SYNs, so the session is relayed;
    the punch costs the dialer's address no SYN from the provider."""
    roster = Roster()
    with inside_netns():
        async with relayed_provider(tmp_path, roster) as (server, addr, relay):
            relay.source_ip = "127.0.0.9"
            drop_syns(f"tcp dport {addr.port}")
            to_dialer = syn_counter(f"tcp sport {addr.port}")
            d = dialer(member(roster), relay).for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            async with asyncio.timeout(15):
                stream, route = await d.dial(addr)
            try:
                assert route == RELAYED
                assert stream.peer_key == addr.peer_key
            finally:
                await stream.aclose()
            assert to_dialer() == 0


async def test_when_no_punch_works_the_circuit_carries_the_session(tmp_path: Path) -> None:
    roster = Roster()
    with inside_netns():
        async with relayed_provider(tmp_path, roster) as (server, addr, relay):
            drop_syns(f"tcp dport != {relay.port}")  # only the relay can be reached
            d = dialer(member(roster), relay).for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            async with asyncio.timeout(15):
                stream, route = await d.dial(addr)
            try:
                assert route == RELAYED
                assert stream.peer_key == addr.peer_key
                assert stream.remote_address == (LOCAL, relay.port)
            finally:
                await stream.aclose()
            assert await d.upgrade(addr) is None  # and no upgrade while nothing passes


async def test_a_relayed_download_upgrades_to_punched_and_completes(tmp_path: Path) -> None:
    """Relayed at first (every SYN but the relay's dropped); once the NAT lets punches
    through, the session is replaced by a punched one; the copy is identical."""
    roster = Roster()
    size = 4 * 1024 * 1024
    with inside_netns():
        async with relayed_provider(tmp_path, roster, size=size, upload_rate=500_000) as (
            server,
            addr,
            relay,
        ):
            drop_syns(f"tcp dport != {relay.port}")
            me = member(roster)
            src = server.source  # type: ignore[attr-defined]
            d = dialer(me, relay).for_file(GROUP, src.content_id)
            out = tmp_path / "out"
            out.mkdir()
            routes_seen: list[str] = []
            trying, upgraded = asyncio.Event(), asyncio.Event()
            may_pass = asyncio.Event()

            async def upgrade(a: ProviderAddr) -> tuple[PeerStream, str] | None:
                trying.set()
                got = await d.upgrade(a)
                routes_seen.append("none" if got is None else got[1])
                if got is None:
                    may_pass.set()  # the first try failed: now the NAT lets punches through
                else:
                    upgraded.set()
                return got

            download = Download(
                me,
                FileInfo(GROUP, src.content_id, "copy.bin", size, src.layout.piece_size),
                out,
                providers=lambda: _one(addr),
                access_key=access_key,
                is_member=roster,
                options=DownloadOptions(provider_timeout=30.0, retry_after=0.2),
                dial=d.dial,
                upgrade=upgrade,
                upgrade_delay=lambda n: 0.5,
            )
            task = asyncio.create_task(download.run())
            try:
                async with asyncio.timeout(30):
                    await trying.wait()
                    assert download.routes == {addr.peer_key: RELAYED}
                    assert download.status().to_json()["relayed"] == 1
                    await may_pass.wait()
                    _flush_rules()
                    await upgraded.wait()
                    assert download.swarm.bytes_done < size  # upgraded mid-transfer
                    path = await task
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            assert path.read_bytes() == src.data
            status = download.status()
            assert isinstance(status, Complete)
            assert list(status.to_json()["routes"].values()) == [PUNCHED]
            assert routes_seen[0] == "none" and routes_seen[-1] == PUNCHED


async def _one(addr: ProviderAddr) -> list[ProviderAddr]:
    return [addr]


def _flush_rules() -> None:
    subprocess.run(["nft", "flush", "ruleset"], check=True, capture_output=True, timeout=10)


async def test_a_provider_that_cannot_open_our_handshake_says_our_key_is_behind(
    tmp_path: Path,
) -> None:
    """A provider whose group moved to a new epoch fails our handshake (DECRYPT_FAILED):
    the dialer tells the node, which follows the epoch at once instead of at its next
    maintenance round; with the current key the same provider is dialled."""
    roster = Roster()
    refused: list[bytes] = []
    with inside_netns():
        async with relayed_provider(tmp_path, roster) as (server, addr, relay):
            me = member(roster)
            behind = Dialer(me, access_key=lambda g: b"\x01" * 32, key_refused=refused.append)
            d = behind.for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            with pytest.raises(ProtocolError):
                await d.dial(addr)
            assert refused == [GROUP]
            d = dialer(me, relay).for_file(GROUP, server.content_id)  # type: ignore[attr-defined]
            stream, route = await d.dial(addr)
            await stream.aclose()
            assert route == DIRECT and refused == [GROUP]
