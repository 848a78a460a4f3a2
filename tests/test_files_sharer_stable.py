"""The SHARER of a file stays the member who first shared it (issue #14 item 10), and a
clean stop withdraws the node's provider records (item 2), on a real loopback DHT."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from support.groups import epoch_ring, sealed_dht

from dhtshare.content import piece_size_for
from dhtshare.files.service import ENTRY_TTL, FileService, shared_at, signed_since
from dhtshare.groups.sealeddht import SealedDht
from dhtshare.identity import Identity
from dhtshare.records import MAX_TTL, FileEntry
from dhtshare.sim.network import Network

GID = os.urandom(32)


def address(host: str, port: int) -> Callable[[], tuple[str, int]]:
    return lambda: (host, port)


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def test_sharer_stays_the_first_sharer_after_restarts_and_renewals(tmp_path: Path) -> None:
    path = tmp_path / "route.bin"
    path.write_bytes(os.urandom(300_000))
    alice, bob, dave = (Identity.generate(n) for n in ("alice", "bob", "dave"))
    members = {alice.public, bob.public, dave.public}

    def is_member(gid: bytes, key: bytes) -> bool:
        return gid == GID and key in members

    clock = Clock(time.time() - 500)
    ring = epoch_ring(GID)

    def on(node_index: int, who: Identity) -> SealedDht:
        return sealed_dht(net.nodes[node_index], who, ring, clock)

    async with Network.start(8) as net:
        a = FileService(on(1, alice), alice, lambda: ("127.0.0.1", 5001), clock)
        shared = await a.share(GID, path)
        for port, who in ((5002, bob), (5003, dave)):  # they download it, later
            clock.now += 100
            svc = FileService(on(port - 5000, who), who, address("127.0.0.1", port), clock)
            await svc.announce(shared)
        reader = FileService(on(6, bob), bob, lambda: ("127.0.0.1", 6000), clock)
        [info] = await reader.list_files(GID, is_member)
        assert info.sharer == alice.public and info.providers == 3
        first = info.shared_at

        # alice's node restarts (a new service on the same DHT node announces it again)
        clock.now += 100
        restarted = FileService(on(1, alice), alice, lambda: ("127.0.0.1", 5001), clock)
        await restarted.announce(shared)
        [info] = await reader.list_files(GID, is_member)
        assert (info.sharer, info.shared_at) == (alice.public, first)

        # the republish loop renews alice's entry: the renewal keeps its first time too
        [pub] = [r for r in a.dht.published if isinstance(r.payload(), FileEntry)]
        clock.now += 100
        renewed = a._renew(ENTRY_TTL)(pub)
        assert renewed.seq > pub.seq and renewed.expires > pub.expires
        assert renewed.issued == pub.issued == first


def test_signed_since_never_claims_more_than_max_ttl() -> None:
    me, now = Identity.generate("alice"), 2_000_000_000.0
    body = FileEntry(GID, os.urandom(32), "a.bin", 10, piece_size_for(10))
    kept = signed_since(me, body, now=now, ttl=ENTRY_TTL, since=now - 3600)
    assert (kept.issued, kept.expires) == (now - 3600, now + ENTRY_TTL)
    old = signed_since(me, body, now=now, ttl=ENTRY_TTL, since=1)
    assert old.expires == now + ENTRY_TTL and old.expires - old.issued == MAX_TTL
    assert shared_at(old) == old.issued  # no earlier than a backdated entry can claim
    fresh = signed_since(me, body, now=now, ttl=ENTRY_TTL, since=None)
    assert fresh.issued == now


async def test_clean_stop_withdraws_every_provider_record(tmp_path: Path) -> None:
    path = tmp_path / "song.ogg"
    path.write_bytes(os.urandom(100_000))
    alice, bob = Identity.generate("alice"), Identity.generate("bob")

    def is_member(gid: bytes, key: bytes) -> bool:
        return gid == GID

    ring = epoch_ring(GID)
    async with Network.start(6) as net:
        a = FileService(sealed_dht(net.nodes[1], alice, ring), alice, lambda: ("127.0.0.1", 5001))
        shared = await a.share(GID, path)
        other = os.urandom(32)
        await a.announce_provider(GID, other, complete=False)  # a partial download
        b = FileService(sealed_dht(net.nodes[2], bob, ring), bob, lambda: ("127.0.0.1", 5002))
        assert len(await b.providers(GID, shared.content_id, is_member)) == 1
        assert await a.withdraw_providers() == 2
        assert await b.providers(GID, shared.content_id, is_member) == []
        assert await b.providers(GID, other, is_member) == []
        assert [f.providers for f in await b.list_files(GID, is_member)] == [0]  # still listed
        assert await a.withdraw_providers() == 0  # nothing left to withdraw
