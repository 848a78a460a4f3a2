"""Hole punching through real NAT routers (the namespace topology of support/netns.py).

The downloader's side runs in one private host, the provider's in another, both driven
from this process (each socket is made in its host's namespace); the circuit between them
is a local socket pair, standing for the relay: what it carries is the same. A punch
counts as a success when bytes sent on the dialer's socket arrive on the provider's.

- keep1 -> keep2 (both routers keep ports): at least 19 punches of 20 succeed;
- keep2 -> keep1 likewise;
- rand -> keep2 (rand's router picks a random port per destination): punching cannot work;
  each try fails within its bounded time (the dialer then uses the relay);
- public -> rand: the provider's connection reaches the public dialer's listening port
  (the reverse connection), whatever port rand's router picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from support.netns import Topology, sh, topology, unavailable

from dhtshare.reach.aio.punch import NewSocket, bind_reusable, punch_as_dialer, punch_as_listener

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

LISTEN_PORT = 4100  # the provider's peer port, a listener beside which it punches


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t


def maker(topo: Topology, role: str) -> NewSocket:
    def new_socket(family: socket.AddressFamily) -> socket.socket:
        return topo.socket(role, socket.SOCK_STREAM)

    return new_socket


async def punch_once(topo: Topology, dialer: str, provider: str, listener: socket.socket) -> bool:
    """One punch from ``dialer``'s host to ``provider``'s: True if bytes got through."""
    loop = asyncio.get_running_loop()
    d_end, p_end = socket.socketpair()
    d_end.setblocking(False)
    p_end.setblocking(False)
    adopted: list[socket.socket] = []
    side = asyncio.create_task(
        punch_as_listener(
            p_end,
            b"",
            LISTEN_PORT,
            topo.public_ip(provider),
            lambda sock, initial: adopted.append(sock),
            new_socket=maker(topo, provider),
            fallback_wait=1.0,
        )
    )
    sock = None
    try:
        async with asyncio.timeout(15):
            sock = await punch_as_dialer(
                d_end, b"", topo.public_ip(dialer), new_socket=maker(topo, dialer)
            )
        if sock is None:
            return False
        d_end.close()  # done with the circuit, as after a good handshake
        async with asyncio.timeout(10):
            await side
        if not adopted:  # the dialer's SYN reached the provider's listener
            conn, _ = await loop.sock_accept(listener)
            adopted.append(conn)
        await loop.sock_sendall(sock, b"through the NAT")
        async with asyncio.timeout(5):
            return await loop.sock_recv(adopted[0], 64) == b"through the NAT"
    finally:
        side.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await side
        for s in (sock, d_end, *adopted):
            if s is not None:
                s.close()


async def punches(topo: Topology, dialer: str, provider: str, tries: int) -> tuple[int, float]:
    """(successes, the longest try in seconds) over ``tries`` punches."""
    listener = bind_reusable("0.0.0.0", LISTEN_PORT, new_socket=maker(topo, provider))
    listener.listen(16)
    ok, longest = 0, 0.0
    try:
        for _ in range(tries):
            started = time.monotonic()
            ok += await punch_once(topo, dialer, provider, listener)
            longest = max(longest, time.monotonic() - started)
    finally:
        listener.close()
    return ok, longest


async def test_port_keeping_nats_punch_19_of_20(topo: Topology) -> None:
    ok, longest = await punches(topo, "keep1", "keep2", 20)
    print(f"keep1 -> keep2: {ok}/20 punched, longest try {longest:.2f} s")
    assert ok >= 19
    assert longest < 5.0


async def test_a_random_port_nat_cannot_be_punched_and_gives_up_in_bounded_time(
    topo: Topology,
) -> None:
    ok, longest = await punches(topo, "rand", "keep2", 3)
    print(f"rand -> keep2: {ok}/3 punched, longest try {longest:.2f} s")
    assert ok == 0
    assert longest < 5.0  # the schedule's 4 attempts, 0.25 s apart, and the exchange


async def test_the_other_way_round(topo: Topology) -> None:
    ok, _ = await punches(topo, "keep2", "keep1", 10)
    print(f"keep2 -> keep1: {ok}/10 punched")
    assert ok >= 9


async def test_a_public_dialer_gets_a_reverse_connection_even_from_a_random_port_nat(
    topo: Topology,
) -> None:
    """The provider's connection reaches the public dialer's listening port directly."""
    ok, _ = await punches(topo, "public", "rand", 10)
    print(f"public -> rand: {ok}/10 connected")
    assert ok >= 9


async def test_routers_that_reset_unsolicited_syns_are_punched_too(topo: Topology) -> None:
    """Some routers answer an unsolicited SYN with a reset instead of dropping it: the
    first SYN to cross may meet one before the other side's SYN went out; the second
    try gets through."""
    rule = 'iifname "wan" tcp flags syn reject with tcp reset'
    for router in ("r-keep1", "r-keep2"):
        topo_nft(topo, router, f"add rule inet filter forward {rule}")
    try:
        ok, _ = await punches(topo, "keep1", "keep2", 10)
    finally:
        for router in ("r-keep1", "r-keep2"):
            topo.set_nat(router[2:], "masquerade")  # the rules as they were
    print(f"keep1 -> keep2 through resetting routers: {ok}/10 punched")
    assert ok >= 9


def topo_nft(topo: Topology, router: str, command: str) -> None:
    sh("ip", "netns", "exec", topo.ns(router), "nft", *command.split())
