"""Loopback-only network namespaces for hole-punch tests, and a provider to punch to.

``inside_netns()`` makes a namespace with only ``lo`` and puts the calling thread in it
for the block, so every socket the event loop opens lives there; ``drop_syns`` drops
chosen TCP SYNs, as a NAT drops an unsolicited one. As root only (``unavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from dhtshare.identity import Identity
from dhtshare.transfer.aio.peer import open_peer_on
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import ShareRegistry
from dhtshare.wire import Bitfield
from support.access import access_key, access_keys
from support.netns import sh
from support.swarm import GROUP, Roster, make_source

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


def syn_counter(match: str) -> Callable[[], int]:
    """Count every TCP SYN (without ACK) this namespace sends that matches ``match`` (an
    nft expression), dropped or not: returns a function reading the count so far."""
    name = f"syns{secrets.token_hex(2)}"
    rules = f"""
table inet {name} {{
  counter seen {{ }}
  chain out {{
    type filter hook output priority raw; policy accept;
    tcp flags & (syn | ack) == syn {match} counter name seen
  }}
}}
"""
    subprocess.run(
        ["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True, timeout=10
    )

    def count() -> int:
        out = subprocess.run(
            ["nft", "list", "counter", "inet", name, "seen"],
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        ).stdout
        return int(out.split("packets")[1].split()[0])

    return count


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
async def provider(
    tmp_path: Path, roster: Roster, size: int = 300_000, upload_rate: float | None = None
) -> AsyncIterator[tuple[PeerServer, Identity]]:
    """A member's ``PeerServer`` on 127.0.0.1 sharing ``size`` random bytes (its
    ``content_id`` and ``source`` attributes say which)."""
    identity = Identity.generate()
    roster.keys.add(identity.public)
    src = make_source(tmp_path, size)
    registry = ShareRegistry(roster, access_keys(GROUP))
    registry.add(src.share())
    server = PeerServer(identity, LOCAL, 0, shares=registry, upload_rate=upload_rate)
    await server.start()
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        await server.serving.wait()
    server.content_id = src.content_id  # type: ignore[attr-defined]
    server.source = src  # type: ignore[attr-defined]
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
    stream = await open_peer_on(sock, me, GROUP, server.content_id, access_key=access_key(GROUP))  # type: ignore[attr-defined]
    try:
        assert stream.peer_key == want
        async with asyncio.timeout(5):
            async for event in stream:
                assert isinstance(event, Bitfield), event
                break
    finally:
        await stream.aclose()
