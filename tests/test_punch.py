"""Hole punching on real sockets (reach/aio/punch.py).

Each test runs in a network namespace it makes (only its loopback, as root): the test
thread enters it for the test, so every socket the loop opens lives there. ``netem``
delays loopback packets so that two SYNs really cross (TCP simultaneous open), and
nftables drops SYNs to chosen ports (a punch target that never answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from support.netns import sh, unavailable
from support.swarm import GROUP, Roster, make_source

from dhtshare.identity import Identity
from dhtshare.reach.aio.punch import (
    bind_reusable,
    punch_as_dialer,
    punch_as_listener,
    simultaneous_open,
)
from dhtshare.reach.punch import PunchSchedule
from dhtshare.transfer.aio.peer import open_peer_on
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import ShareRegistry
from dhtshare.wire import Bitfield

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
LOCAL = "127.0.0.1"


@contextlib.contextmanager
def inside_netns() -> Iterator[str]:
    """A fresh namespace (loopback only) that the calling thread is inside until the
    block ends; then it is deleted."""
    name = f"dhts-{os.getpid()}-{secrets.token_hex(2)}-punch"
    sh("ip", "netns", "add", name)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        there = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(there, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(there)
        try:
            yield name
        finally:
            if _libc.setns(here, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        sh("ip", "netns", "del", name, check=False)


def drop_syns(match: str) -> None:
    """Drop every TCP SYN (without ACK) that also matches ``match`` (an nft expression),
    in the namespace this thread is in, as a NAT drops an unsolicited SYN. (nft runs in
    a child process, which starts in this thread's namespace.)"""
    rules = f"""
table inet punchtest {{
  chain out {{
    type filter hook output priority filter; policy accept;
    tcp flags & (syn | ack) == syn {match} drop
  }}
}}
"""
    subprocess.run(
        ["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True, timeout=10
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


async def circuit() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair standing for a relayed circuit (D's end, P's end)."""
    with socket.socket() as lst:
        lst.bind((LOCAL, 0))
        lst.listen(1)
        lst.setblocking(False)
        d = socket.socket()
        d.setblocking(False)
        loop = asyncio.get_running_loop()
        _, (p, _) = await asyncio.gather(
            loop.sock_connect(d, lst.getsockname()), loop.sock_accept(lst)
        )
        p.setblocking(False)
        return d, p


class Adopter:
    """Records what ``punch_as_listener`` adopts and hands it to the real server."""

    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.got: list[tuple[tuple[str, int], bytes]] = []
        self.event = asyncio.Event()

    def __call__(self, sock: socket.socket, initial: bytes) -> None:
        self.got.append((sock.getpeername()[:2], initial))
        self.event.set()
        self.server.adopt(sock, initial)


@asynccontextmanager
async def provider(tmp_path: Path, roster: Roster) -> AsyncIterator[tuple[PeerServer, Identity]]:
    identity = Identity.generate()
    roster.keys.add(identity.public)
    src = make_source(tmp_path, 300_000)
    registry = ShareRegistry(roster)
    registry.add(src.share())
    server = PeerServer(identity, LOCAL, 0, shares=registry)
    await server.start()
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        await server.serving.wait()
    server.content_id = src.content_id  # type: ignore[attr-defined]
    try:
        yield server, identity
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def session_works(
    sock: socket.socket, server: PeerServer, want: bytes, roster: Roster
) -> None:
    """An authenticated session of a member on ``sock``: the handshake checks ``want``
    and the provider's Bitfield arrives."""
    me = Identity.generate()
    roster.keys.add(me.public)
    stream = await open_peer_on(sock, me, GROUP, server.content_id)  # type: ignore[attr-defined]
    try:
        assert stream.peer_key == want
        async with asyncio.timeout(5):
            async for event in stream:
                assert isinstance(event, Bitfield), event
                break
    finally:
        await stream.aclose()


# ------------------------------------------------------------------------------ tests


async def test_simultaneous_open_yields_one_connection_on_each_side() -> None:
    """a's SYN is dropped (as b's NAT would), so a waits in SYN_SENT; b's SYN then
    meets it: both connects succeed, each with the other as its peer."""
    with inside_netns():
        a = bind_reusable(LOCAL, 0)
        b = bind_reusable(LOCAL, 0)
        drop_syns(f"tcp sport {a.getsockname()[1]} tcp dport {b.getsockname()[1]}")
        try:
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(loop.sock_connect(a, b.getsockname()))
            await asyncio.sleep(0)  # a's SYN leaves first
            async with asyncio.timeout(5):
                await asyncio.gather(first, loop.sock_connect(b, a.getsockname()))
            assert a.getpeername() == b.getsockname() and b.getpeername() == a.getsockname()
            await loop.sock_sendall(a, b"ping")
            await loop.sock_sendall(b, b"pong")
            async with asyncio.timeout(5):
                assert await loop.sock_recv(b, 4) == b"ping"
                assert await loop.sock_recv(a, 4) == b"pong"
        finally:
            a.close()
            b.close()


async def test_both_schedules_meet_with_no_listener() -> None:
    """``simultaneous_open`` on both ends, no listener anywhere, the first SYN each way
    dropped: each end gets the one connection, to the other's bound port."""
    with inside_netns():
        ports = free_port(), free_port()
        drop_syns(f"tcp sport {ports[0]} tcp dport {ports[1]}")
        schedule = PunchSchedule(0.001)
        start = time.monotonic()
        async with asyncio.timeout(10):
            a, b = await asyncio.gather(
                simultaneous_open((LOCAL, ports[0]), ((LOCAL, ports[1]),), schedule, start),
                simultaneous_open((LOCAL, ports[1]), ((LOCAL, ports[0]),), schedule, start),
            )
        assert a is not None and b is not None
        try:
            assert a.getpeername() == b.getsockname() == (LOCAL, ports[1])
            assert b.getpeername() == a.getsockname() == (LOCAL, ports[0])
        finally:
            a.close()
            b.close()


async def test_the_punched_connection_carries_an_authenticated_session(tmp_path: Path) -> None:
    """The provider's listener drops unsolicited SYNs (its NAT): only the punch connects."""
    roster = Roster()
    with inside_netns():
        async with provider(tmp_path, roster) as (server, identity):
            port = server.address[1]
            drop_syns(f"tcp dport {port}")
            d_end, p_end = await circuit()
            adopter = Adopter(server)
            listener = asyncio.create_task(punch_as_listener(p_end, b"", port, LOCAL, adopter))
            try:
                async with asyncio.timeout(10):
                    sock = await punch_as_dialer(d_end, b"", LOCAL)
                assert sock is not None
                assert sock.getpeername() == (LOCAL, port)
                mine = sock.getsockname()
                await session_works(sock, server, identity.public, roster)
                d_end.close()  # the dialer's part once its handshake succeeded
                async with asyncio.timeout(10):
                    outcome = await listener
                assert outcome == "punched"
                # the provider adopted its punched socket, connected to the dialer's port
                assert [peer for peer, _ in adopter.got] == [mine]
            finally:
                listener.cancel()
                d_end.close()


async def test_a_punch_that_never_answers_falls_back_to_the_circuit(tmp_path: Path) -> None:
    """Every SYN is dropped: both ends give up within the schedule, the dialer runs its
    handshake over the circuit, and the provider adopts the circuit with those bytes."""
    roster = Roster()
    with inside_netns():
        async with provider(tmp_path, roster) as (server, identity):
            d_end, p_end = await circuit()
            drop_syns("")
            adopter = Adopter(server)
            listener = asyncio.create_task(
                punch_as_listener(p_end, b"", free_port(), LOCAL, adopter)
            )
            started = time.monotonic()
            try:
                async with asyncio.timeout(15):
                    sock = await punch_as_dialer(d_end, b"", LOCAL)
                assert sock is None
                punch_seconds = time.monotonic() - started
                assert punch_seconds < 2.0, punch_seconds  # 4 attempts 0.25 s apart
                assert adopter.got == []
                mine = d_end.getsockname()
                await session_works(d_end, server, identity.public, roster)  # over the circuit
                ((peer, initial),) = adopter.got
                assert peer == mine  # the circuit itself was adopted
                assert initial[4] == 1  # the CLIENT_HELLO frame, read past the PUNCH frames
                async with asyncio.timeout(5):
                    assert await listener == "relayed"
            finally:
                listener.cancel()
                d_end.close()


async def test_a_dialer_that_does_not_punch_is_served_over_the_circuit(tmp_path: Path) -> None:
    """No PUNCH frame at all (the dialer knows no public address): the circuit is
    adopted at once with the first frame."""
    roster = Roster()
    with inside_netns():
        async with provider(tmp_path, roster) as (server, identity):
            d_end, p_end = await circuit()
            adopter = Adopter(server)
            listener = asyncio.create_task(
                punch_as_listener(p_end, b"", free_port(), LOCAL, adopter)
            )
            try:
                await session_works(d_end, server, identity.public, roster)
                async with asyncio.timeout(5):
                    assert await listener == "relayed"
            finally:
                listener.cancel()
                d_end.close()
