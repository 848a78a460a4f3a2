"""Sharing through the DHT: entries and provider records appear, filter by membership, withdraw."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.groups import epoch_ring, sealed_dht

from dhtshare.content import hash_file, merkle_root, piece_size_for
from dhtshare.errors import FileShareError
from dhtshare.files.service import FileService
from dhtshare.identity import Identity
from dhtshare.sim.network import Network

GID = os.urandom(32)


async def test_share_list_and_unshare(tmp_path: Path) -> None:
    data = os.urandom(3 * 256 * 1024 + 17)
    path = tmp_path / "song.ogg"
    path.write_bytes(data)
    alice, bob, eve = Identity.generate("alice"), Identity.generate("bob"), Identity.generate("eve")
    members = {alice.public, bob.public}

    def is_member(gid: bytes, key: bytes) -> bool:
        return gid == GID and key in members

    ring = epoch_ring(GID)  # the epoch secret members hold
    async with Network.start(8) as net:
        a = FileService(sealed_dht(net.nodes[1], alice, ring), alice, lambda: ("127.0.0.1", 5001))
        b = FileService(sealed_dht(net.nodes[2], bob, ring), bob, lambda: ("127.0.0.1", 5002))
        # eve holds the epoch secret but is not (or no longer) on the roster
        e = FileService(sealed_dht(net.nodes[3], eve, ring), eve, lambda: ("127.0.0.1", 5003))
        seen: list[tuple[int, int]] = []
        shared = await a.share(GID, path, lambda done, total: seen.append((done, total)))
        assert shared.content_id == merkle_root(hash_file(path, piece_size_for(len(data))))
        assert seen[-1] == (len(data), len(data))
        await b.announce(shared, complete=False)
        await e.share(GID, path)  # a non-member's entry and provider must not show up

        reader = FileService(sealed_dht(net.nodes[5], bob, ring), bob, lambda: ("h", 1))
        files = await reader.list_files(GID, is_member)
        assert [(f.entry.name, f.entry.size, f.providers) for f in files] == [
            ("song.ogg", len(data), 2)
        ]
        # without the epoch secret: nothing to find, and nothing to publish
        stranger = FileService(sealed_dht(net.nodes[6], eve, {}), eve, lambda: ("h", 1))
        assert await stranger.list_files(GID, lambda g, k: True) == []
        assert await stranger.providers(GID, shared.content_id, lambda g, k: True) == []
        with pytest.raises(FileShareError, match="holds no key of the group"):
            await stranger.share(GID, path)
        assert files[0].sharer == alice.public
        providers = await b.providers(GID, shared.content_id, is_member)
        assert {p.signer for p in providers} == members

        await a.unshare(GID, shared.content_id)
        providers = await b.providers(GID, shared.content_id, is_member)
        assert {p.signer for p in providers} == {bob.public}


async def test_sharing_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    async with Network.start(3) as net:
        me = Identity.generate()
        svc = FileService(sealed_dht(net.nodes[1], me, epoch_ring(GID)), me, lambda: ("h", 1))
        with pytest.raises(FileShareError, match="cannot share"):
            await svc.share(GID, tmp_path / "missing.bin")
        with pytest.raises(FileShareError, match="not a regular file"):
            await svc.share(GID, tmp_path)
