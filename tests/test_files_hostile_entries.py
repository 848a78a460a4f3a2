"""A member's file entry for someone else's file (issue #13, item 5).

An entry is the signer's word about a content id: its name, size and piece size,
and an ``issued`` time with no lower bound of its own. A hostile one must not take
over the listing, and must cost a reader O(1) before it is refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
from support.access import access_key
from support.groups import epoch_ring, sealed_dht, sealed_lies

from dhtshare import content, crypto
from dhtshare.codec import Writer
from dhtshare.content import piece_size_for
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtError, FileShareError, RecordError
from dhtshare.files.service import FileService, shared_at
from dhtshare.groups.keyring import Keyring
from dhtshare.identity import Identity
from dhtshare.records import (
    MAX_TTL,
    FileEntry,
    Kind,
    SignedRecord,
    decode_record,
    sign_record,
)
from dhtshare.sim.network import Network
from dhtshare.transfer.aio.download import Download, FileInfo

GID = os.urandom(32)


def forged_entry(
    signer: Identity, content_id: bytes, *, size: int, piece_size: int, issued: int, now: float
) -> SignedRecord:
    """A validly signed FILE_ENTRY record with whatever fields the signer likes (no checks:
    built field by field, as a hostile client would)."""
    w = Writer().push_bytes(GID).push_bytes(content_id)
    body = w.push_str("mine.bin", 255).push_u64(size).push_u32(piece_size).push_u8(0).getvalue()
    payload = object.__new__(FileEntry)
    fields = {
        "group_id": GID,
        "content_id": content_id,
        "name": "mine.bin",
        "size": size,
        "piece_size": piece_size,
        "withdrawn": False,
    }
    for name, value in fields.items():
        object.__setattr__(payload, name, value)
    expires = int(now + 3600)
    seq = int(now * 1000)
    unsigned = SignedRecord(
        Kind.FILE_ENTRY, signer.public, seq, issued, expires, body, b"", payload
    )
    sig = crypto.sign(signer.signing_key, "record/file_entry", unsigned.signed_part())
    return SignedRecord(Kind.FILE_ENTRY, signer.public, seq, issued, expires, body, sig, payload)


async def put_sealed(node: DhtNode, ring: Keyring, author: Identity, rec: SignedRecord) -> None:
    """``rec`` sealed into the group's epoch by ``author`` (a member: it holds the secret),
    stored through ``node``, unless storing nodes refuse it."""
    space = ring[GID].space()
    assert space is not None
    for outers in sealed_lies(space, author, [rec], time.time()).values():
        for outer in outers:
            with contextlib.suppress(DhtError, RecordError):  # storing nodes may refuse it
                await node.put(outer)


async def test_entry_with_tiny_piece_size_and_early_issued_does_not_take_over_listing(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * 256 * 1024 + 5)
    path = tmp_path / "holiday.mp4"
    path.write_bytes(data)
    alice, mallory, reader = Identity.generate(), Identity.generate(), Identity.generate()
    members = {alice.public, mallory.public, reader.public}

    def is_member(gid: bytes, key: bytes) -> bool:
        return gid == GID and key in members

    ring = epoch_ring(GID)  # members hold the epoch secret: mallory can seal
    async with Network.start(8) as net:
        a = FileService(sealed_dht(net.nodes[1], alice, ring), alice, lambda: ("127.0.0.1", 5001))
        shared = await a.share(GID, path)
        hostile = forged_entry(
            mallory, shared.content_id, size=20_000_000, piece_size=1, issued=1, now=time.time()
        )
        await put_sealed(net.nodes[2], ring, mallory, hostile)

        me = sealed_dht(net.nodes[5], reader, ring)
        files = await FileService(me, reader, lambda: ("127.0.0.1", 5005)).list_files(
            GID, is_member
        )
    assert [(f.entry.name, f.entry.size, f.entry.piece_size) for f in files] == [
        ("holiday.mp4", len(data), piece_size_for(len(data)))
    ]
    assert files[0].sharer == alice.public
    # refused by decoding alone: before anything is sized by it
    with pytest.raises(RecordError, match="piece size"):
        decode_record(hostile.encode())


async def test_backdated_entry_with_a_wrong_size_loses_to_the_size_members_vouch_for(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * 256 * 1024 + 5)
    path = tmp_path / "report.pdf"
    path.write_bytes(data)
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    members = {alice.public, bob.public, mallory.public}

    def is_member(gid: bytes, key: bytes) -> bool:
        return gid == GID and key in members

    ring = epoch_ring(GID)
    async with Network.start(8) as net:
        on_a = sealed_dht(net.nodes[1], alice, ring)
        shared = await FileService(on_a, alice, lambda: ("127.0.0.1", 5001)).share(GID, path)
        # bob downloaded it, verified every piece, and announces what he verified
        on_b = sealed_dht(net.nodes[2], bob, ring)
        await FileService(on_b, bob, lambda: ("127.0.0.1", 5002)).announce(shared)
        # mallory: a valid layout, one byte short (same piece count), dated a week back
        short = len(data) - 1
        hostile = forged_entry(
            mallory,
            shared.content_id,
            size=short,
            piece_size=piece_size_for(short),
            issued=1,
            now=time.time(),
        )
        await put_sealed(net.nodes[3], ring, mallory, hostile)
        someone = Identity.generate()
        on_r = sealed_dht(net.nodes[5], someone, ring)
        reader = FileService(on_r, someone, lambda: ("127.0.0.1", 5005))
        files = await reader.list_files(GID, is_member)
    assert [(f.entry.name, f.entry.size) for f in files] == [("report.pdf", len(data))]
    assert files[0].sharer in {alice.public, bob.public}


def test_shared_at_is_bounded_below_by_the_records_lifetime() -> None:
    ident = Identity.generate()
    now = 1_700_000_000.0
    cid = os.urandom(32)
    honest = sign_record(
        ident, FileEntry(GID, cid, "a", 10, piece_size_for(10)), seq=1, now=now, ttl=3600
    )
    assert shared_at(honest) == honest.issued
    early = forged_entry(ident, cid, size=10, piece_size=piece_size_for(10), issued=1, now=now)
    assert shared_at(early) == early.expires - MAX_TTL > now - MAX_TTL


@pytest.mark.parametrize(
    ("size", "piece_size"),
    [
        (20_000_000, 1),  # the entry: 20 million pieces
        (20_000_000, 512 * 1024),  # a valid power of two, but not the one 20 MB implies
        (
            2**40 + 1,
            16 * 1024 * 1024,
        ),  # more pieces than any file may have (1 TiB)  # more pieces than any file may have
        (2**64 - 1, 2**31),
    ],
)
def test_layout_a_size_does_not_imply_is_refused(size: int, piece_size: int) -> None:
    with pytest.raises(ValueError, match=r"file size|piece size"):
        FileEntry(GID, os.urandom(32), "x", size, piece_size)
    with pytest.raises(ValueError, match=r"file size|piece size"):
        content.check_layout(size, piece_size)


async def test_download_of_an_unaffordable_layout_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    info = FileInfo(GID, os.urandom(32), "big.bin", 200_000, 1)  # 200,000 one-byte pieces

    async def nobody() -> list[object]:
        return []

    me = Identity.generate()
    started = time.perf_counter()
    with pytest.raises(FileShareError, match="layout"):
        Download(
            me,
            info,
            tmp_path,
            providers=nobody,  # type: ignore[arg-type]
            access_key=access_key,
            is_member=lambda g, k: True,
        )
    assert time.perf_counter() - started < 0.5  # O(1): microseconds, with room for a busy machine


@pytest.mark.parametrize(
    "host", ["no\x00host", "files.example", "0.0.0.0", "::", "224.0.0.1", "255.255.255.255"]
)
def test_provider_record_with_non_address_host_is_refused_when_decoded(host: str) -> None:
    signer = Identity.generate()
    w = Writer().push_bytes(GID).push_bytes(os.urandom(32)).push_str(host, 255).push_u16(7000)
    body = w.push_u8(1).push_u8(0).push_u8(0).getvalue()  # complete, live, no more addresses
    now = time.time()
    seq, issued, expires = int(now * 1000), int(now), int(now + 600)
    unsigned = SignedRecord(Kind.PROVIDER, signer.public, seq, issued, expires, body, b"", None)  # type: ignore[arg-type]
    sig = crypto.sign(signer.signing_key, "record/provider", unsigned.signed_part())
    raw = SignedRecord(Kind.PROVIDER, signer.public, seq, issued, expires, body, sig, None)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="address"):
        decode_record(raw.encode())
