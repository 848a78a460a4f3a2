"""Hole punching on real sockets (reach/aio/punch.py).

Each test runs in a loopback-only network namespace it makes (``support/punchnet.py``,
as root), where nftables drops chosen SYNs as a NAT drops an unsolicited one: a SYN that
is dropped leaves its sender waiting in SYN_SENT, so the other side's SYN meets it (TCP
simultaneous open), and a punch whose every SYN is dropped never answers.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from support.netns import unavailable
from support.punchnet import (
    LOCAL,
    Adopter,
    circuit,
    drop_syns,
    free_port,
    inside_netns,
    provider,
    session_works,
    syn_counter,
)
from support.swarm import Roster

from dhtshare.reach.aio.punch import (
    RESET_TRIES,
    CircuitReader,
    bind_reusable,
    punch_as_dialer,
    punch_as_listener,
    simultaneous_open,
)
from dhtshare.reach.punch import PunchSchedule
from dhtshare.wire.punch import PunchConnect, PunchSync, punch_frame

VICTIM = "127.0.0.66"
VICTIMS = tuple((VICTIM, 9000 + i) for i in range(8))  # nothing listens: each answers a reset

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

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


# -------------------------------------------------- offers naming someone else's hosts


async def _hostile_dialer(d_end: socket.socket, offer: tuple[tuple[str, int], ...]) -> None:
    """A dialer (or the relay speaking for it) offering ``offer``, then the sync."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(d_end, punch_frame(PunchConnect(offer)))
    async with asyncio.timeout(5):
        assert isinstance(await CircuitReader(d_end).next_punch(), PunchConnect)
    await loop.sock_sendall(d_end, punch_frame(PunchSync()))


async def _listener_punch(offer: tuple[tuple[str, int], ...], source_ip: str | None = None) -> str:
    """The provider's whole punch against ``offer``; its outcome once it is over."""
    d_end, p_end = await circuit()
    try:
        listener = asyncio.create_task(
            punch_as_listener(
                p_end,
                b"",
                free_port(),
                LOCAL,
                lambda sock, initial: sock.close(),
                source_ip=source_ip,
                fallback_wait=0.0,
            )
        )
        await _hostile_dialer(d_end, offer)
        async with asyncio.timeout(10):
            return await listener
    finally:
        d_end.close()


async def test_the_provider_dials_two_offered_addresses_twice_each_when_they_reset() -> None:
    """Eight victims offered: two dialled, and a target that answered with a reset twice
    is not dialled again (it cost 32 SYNs: 4 attempts to each of the 8)."""
    with inside_netns():
        syns = syn_counter(f"ip daddr {VICTIM}")
        assert await _listener_punch(VICTIMS) == "closed"
        assert syns() == 2 * RESET_TRIES


async def test_the_provider_dials_two_offered_addresses_that_never_answer() -> None:
    with inside_netns():
        drop_syns(f"ip daddr {VICTIM}")
        syns = syn_counter(f"ip daddr {VICTIM}")
        assert await _listener_punch(VICTIMS) == "closed"
        assert syns() == 2 * 4  # 4 attempts each


async def test_the_provider_dials_only_the_ip_the_relay_saw_the_dialer_come_from() -> None:
    with inside_netns():
        syns = syn_counter(f"ip daddr {VICTIM}")
        own = syn_counter("ip daddr 127.0.0.61")
        offer = (*VICTIMS[:7], ("127.0.0.61", free_port()))
        assert await _listener_punch(offer, source_ip="127.0.0.61") == "closed"
        assert (syns(), own()) == (0, RESET_TRIES)


async def test_the_dialer_dials_two_of_the_addresses_its_relay_offers() -> None:
    """A hostile relay answers the dialer's PunchConnect with eight victims."""
    with inside_netns():
        syns = syn_counter(f"ip daddr {VICTIM}")
        d_end, p_end = await circuit()
        loop = asyncio.get_running_loop()

        async def relay() -> None:
            reader = CircuitReader(p_end)
            assert isinstance(await reader.next_punch(), PunchConnect)
            await loop.sock_sendall(p_end, punch_frame(PunchConnect(VICTIMS)))
            assert isinstance(await reader.next_punch(), PunchSync)

        try:
            async with asyncio.timeout(10):
                sock, _ = await asyncio.gather(punch_as_dialer(d_end, b"", LOCAL), relay())
            assert sock is None
            assert syns() == 2 * RESET_TRIES
        finally:
            d_end.close()
            p_end.close()
