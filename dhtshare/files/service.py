"""Sharing files with a group through the DHT: file entries and provider records.

``share`` hashes a file in a worker thread (hashlib releases the GIL) while reporting progress,
then publishes the group's file entry and this node's provider record; both are republished
while the node runs. Readers keep only entries and providers whose signer the caller says is
a current member (``is_member``): a storing node cannot know the roster, a reader can.

An entry keeps the ``issued`` time of this signer's first entry for the content id across
re-announcements (a restart) and renewals, so the listing's sharer, the first to share,
does not drift to whoever re-signed last. A clean stop withdraws every provider record of
the node (``withdraw_providers``); a restart announces them again.
"""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiofiles.os

from dhtshare.content import MAX_FILE_SIZE, FileLayout, hash_file, merkle_root
from dhtshare.errors import DhtError, FileShareError, RecordError
from dhtshare.groups.keyring import Where
from dhtshare.groups.sealeddht import SealedDht
from dhtshare.identity import Identity
from dhtshare.records import (
    MAX_ADDRESSES,
    MAX_TTL,
    AddressKind,
    FileEntry,
    Kind,
    PeerAddress,
    Provider,
    SignedRecord,
    key_for,
    sign_record,
    time_seq,
)
from dhtshare.transfer.share import MemberCheck, Share

__all__ = ["FileService", "ListedFile", "pick_entry", "shared_at", "signed_since"]

ENTRY_TTL = 24 * 3600.0
PROVIDER_TTL = 3600.0
Progress = Callable[[int, int], Awaitable[None] | None]


@dataclass(frozen=True)
class ListedFile:
    """A file listed in a group: its entry, who shared it, how many members hold it."""

    entry: FileEntry
    sharer: bytes
    shared_at: int
    providers: int
    addresses: tuple[tuple[str, int], ...] = ()  # where the providers say they serve it
    #: for each of ``addresses``: its provider names a relay (it is behind NAT, so a ping
    #: cannot reach it; a clean stop withdraws its record)
    relayed: tuple[bool, ...] = ()


class FileService:
    """Publishes and reads file entries and provider records of one node."""

    def __init__(
        self,
        dht: SealedDht,
        identity: Identity,
        address: Callable[[], tuple[str, int]],
        clock: Callable[[], float] = time.time,
        more_addresses: Callable[[], tuple[PeerAddress, ...]] = tuple,
    ) -> None:
        self.dht, self.identity, self.address, self.clock = dht, identity, address, clock
        self.more_addresses = more_addresses

    def _sign(
        self, body: FileEntry | Provider, ttl: float, since: float | None = None
    ) -> SignedRecord:
        """Sign ``body`` valid until now + ``ttl``; an entry may keep an earlier ``since``."""
        now = self.clock()
        return signed_since(self.identity, body, now=now, ttl=ttl, since=since)

    def _renew(self, ttl: float) -> Callable[[SignedRecord], SignedRecord]:
        def renew(old: SignedRecord) -> SignedRecord:
            body = old.payload()
            assert isinstance(body, FileEntry | Provider)
            return self._sign(body, ttl, old.issued if isinstance(body, FileEntry) else None)

        return renew

    async def hash(
        self, path: Path, progress: Progress | None = None
    ) -> tuple[FileLayout, list[bytes]]:
        """Piece hashes of ``path``, computed in a thread; ``progress(done, total)`` on the loop."""
        try:
            info = await aiofiles.os.stat(path)
        except OSError as exc:
            raise FileShareError(f"cannot share {path}: {exc.strerror}", "check the path") from exc
        if not stat.S_ISREG(info.st_mode):
            raise FileShareError(f"cannot share {path}: not a regular file", "give a file path")
        size = info.st_size
        if size > MAX_FILE_SIZE:
            raise FileShareError(
                f"cannot share {path}: larger than {MAX_FILE_SIZE >> 40} TiB", "split the file"
            )
        layout = FileLayout.for_size(size)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[None]] = set()

        def report(done: int) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(lambda: _schedule(progress, done, size, pending))

        hashes = await asyncio.to_thread(
            hash_file, path, layout.piece_size, report, expected_size=size
        )
        await asyncio.gather(*pending)
        return layout, hashes

    async def share(self, group_id: bytes, path: Path, progress: Progress | None = None) -> Share:
        """Hash ``path`` and announce it to the group; the file itself is never copied."""
        layout, hashes = await self.hash(path, progress)
        shared = Share(group_id, merkle_root(hashes), path, layout, hashes)
        await self.announce(shared)
        return shared

    async def announce(self, shared: Share, complete: bool = True) -> None:
        """Publish (and keep republishing) the file entry and our provider record."""
        entry = FileEntry(
            shared.group_id, shared.content_id, shared.name, shared.size, shared.piece_size
        )
        since = await self._first_issued(shared.group_id, shared.content_id)
        await self._publish(self._sign(entry, ENTRY_TTL, since), ENTRY_TTL)
        await self.announce_provider(shared.group_id, shared.content_id, complete)

    async def _first_issued(self, group_id: bytes, content_id: bytes) -> float | None:
        """When my live entry for ``content_id`` says it was shared, if the DHT still has
        one (kept across a restart); ``None`` when I have not shared it lately."""
        try:
            mine = [
                r.issued
                for r in await self._entries(group_id)
                if r.signer == self.identity.public
                and not _entry(r).withdrawn
                and _entry(r).content_id == content_id
            ]
        except DhtError:
            return None
        return min(mine, default=None)

    async def announce_provider(self, group_id: bytes, content_id: bytes, complete: bool) -> None:
        host, port = self.address()
        body = Provider(group_id, content_id, host, port, complete, addresses=self._more())
        await self._publish(self._sign(body, PROVIDER_TTL), PROVIDER_TTL)

    def _more(self) -> tuple[PeerAddress, ...]:
        return self.more_addresses()[:MAX_ADDRESSES]

    async def readdress(self) -> int:
        """Announce again each provider record of ours whose addresses are no longer ours
        (a relay gained or lost, a public address learnt); how many were announced."""
        host, port = self.address()
        more = self._more()
        stale = [
            body
            for rec in self.dht.published
            if isinstance(body := rec.payload(), Provider)
            and not body.withdrawn
            and (body.host, body.port, body.addresses) != (host, port, more)
        ]
        for body in stale:
            await self.announce_provider(body.group_id, body.content_id, body.complete)
        return len(stale)

    async def _publish(self, rec: SignedRecord, ttl: float) -> None:
        where = Where("epoch", _group_of(rec))
        try:
            await self.dht.publish(where, rec, self._renew(ttl))
        except DhtError as exc:
            raise DhtError(f"could not announce in the DHT: {exc.message}", exc.hint) from exc
        except RecordError as exc:
            raise FileShareError(
                "this node holds no key of the group", "check: dhtshare group list"
            ) from exc

    def _tombstone(self, group_id: bytes, content_id: bytes) -> SignedRecord:
        """A withdrawn provider record (higher seq than ours), no longer republished."""
        host, port = self.address()
        tombstone = self._sign(
            Provider(group_id, content_id, host, port, False, withdrawn=True), PROVIDER_TTL
        )
        self.dht.withdraw(tombstone.dht_key, tombstone.slot)
        return tombstone

    async def withdraw_providers(self) -> int:
        """Replace every provider record this node publishes (shares and partial downloads)
        with a tombstone, as a clean stop does; return how many. The entries stay: the
        file is still the group's, only nobody serves it from here until a restart."""
        mine = [
            _provider(r)
            for r in self.dht.published
            if r.kind == Kind.PROVIDER and r.signer == self.identity.public
        ]
        stones = [self._tombstone(p.group_id, p.content_id) for p in mine if not p.withdrawn]
        await asyncio.gather(*(_put_quietly(self.dht, rec) for rec in stones))
        return len(stones)

    async def unshare(self, group_id: bytes, content_id: bytes) -> None:
        """Withdraw our provider record (a signed tombstone) and, if we shared it, the entry."""
        tombstone = self._tombstone(group_id, content_id)
        for entry in await self._entries(group_id):
            if entry.signer == self.identity.public and _entry(entry).content_id == content_id:
                old = _entry(entry)
                gone = FileEntry(
                    group_id, content_id, old.name, old.size, old.piece_size, withdrawn=True
                )
                rec = self._sign(gone, ENTRY_TTL)
                self.dht.withdraw(rec.dht_key, rec.slot)
                await _put_quietly(self.dht, rec)
        await _put_quietly(self.dht, tombstone)

    async def _entries(self, group_id: bytes) -> list[SignedRecord]:
        return [
            r
            for r in await self.dht.get(group_id, key_for(Kind.FILE_ENTRY, group_id))
            if r.kind == Kind.FILE_ENTRY
        ]

    async def providers(
        self, group_id: bytes, content_id: bytes, is_member: MemberCheck
    ) -> list[SignedRecord]:
        """Current, non-withdrawn provider records of members, newest first."""
        records = await self.dht.get(group_id, key_for(Kind.PROVIDER, group_id, content_id))
        return [
            r for r in records if _serves(r, group_id, content_id) and is_member(group_id, r.signer)
        ]

    async def list_files(self, group_id: bytes, is_member: MemberCheck) -> list[ListedFile]:
        """Files shared in the group by current members, with their provider counts."""
        by_cid: dict[bytes, list[SignedRecord]] = {}
        for rec in await self._entries(group_id):
            entry = _entry(rec)
            if entry.withdrawn or entry.group_id != group_id or not is_member(group_id, rec.signer):
                continue
            by_cid.setdefault(entry.content_id, []).append(rec)
        live = {cid: pick_entry(recs) for cid, recs in by_cid.items()}
        counts = await asyncio.gather(*(self.providers(group_id, cid, is_member) for cid in live))
        infos = [
            ListedFile(
                _entry(rec),
                rec.signer,
                shared_at(rec),
                len(provs),
                _addresses(provs),
                _relayed(provs),
            )
            for rec, provs in zip(live.values(), counts, strict=True)
        ]
        return sorted(infos, key=lambda i: (i.entry.name, i.entry.content_id))


def shared_at(rec: SignedRecord) -> int:
    """When the entry says it was shared, but no earlier than its lifetime allows.

    ``issued`` is the signer's word and has no lower bound of its own; ``expires`` is
    later than now for any record a reader keeps, and no record lives longer than
    ``MAX_TTL``. So ``expires - MAX_TTL`` is the earliest time a live record can
    honestly have been signed: an entry that claims ``issued = 1`` counts as signed then.
    """
    return max(rec.issued, rec.expires - MAX_TTL)


def signed_since(
    identity: Identity, body: FileEntry | Provider, *, now: float, ttl: float, since: float | None
) -> SignedRecord:
    """Sign ``body`` to expire at ``now + ttl``, issued at ``since`` when given (an entry
    keeps its first sharing time), but no earlier than ``expires - MAX_TTL``: the earliest
    a reader counts anyway (``shared_at``), and the longest life ``sign_record`` allows."""
    seq = time_seq(now)
    if since is None or since >= now:
        return sign_record(identity, body, seq=seq, now=now, ttl=ttl)
    start = max(float(int(since)), now + ttl - MAX_TTL)
    return sign_record(identity, body, seq=seq, now=start, ttl=now + ttl - start)


def pick_entry(records: list[SignedRecord]) -> SignedRecord:
    """The entry a listing shows among current members' entries for one content id.

    Every candidate passed ``check_layout``, so they can disagree only about the size
    (within the last piece: the content id fixes the piece count), and a download of
    a wrong size fails at its last piece. The size is the one the most members vouch
    for (one entry per member and content id; a member that finished a download
    announces the size it verified), ties broken by the earliest ``shared_at``; among
    the entries with that size, the earliest ``_listing_rank`` is shown. So one
    member cannot outvote the sharer and the members who downloaded the file.
    """
    voters: dict[int, set[bytes]] = {}
    first: dict[int, tuple[int, int, bytes]] = {}
    for rec in records:
        size, rank = _entry(rec).size, _listing_rank(rec)
        voters.setdefault(size, set()).add(rec.signer)
        first[size] = min(first.get(size, rank), rank)
    size = min(voters, key=lambda n: (-len(voters[n]), first[n]))
    return min((r for r in records if _entry(r).size == size), key=_listing_rank)


def _listing_rank(rec: SignedRecord) -> tuple[int, int, bytes]:
    """Among entries of one content id and size, which one a listing shows: the first
    shared (``shared_at``), then the lower ``seq``, then the lower signer key (so every
    reader picks the same)."""
    return shared_at(rec), rec.seq, rec.signer


def _entry(rec: SignedRecord) -> FileEntry:
    body = rec.payload()
    assert isinstance(body, FileEntry)
    return body


def _provider(rec: SignedRecord) -> Provider:
    body = rec.payload()
    assert isinstance(body, Provider)
    return body


def _relayed(records: list[SignedRecord]) -> tuple[bool, ...]:
    return tuple(any(a.kind is AddressKind.RELAY for a in _provider(r).addresses) for r in records)


def _addresses(records: list[SignedRecord]) -> tuple[tuple[str, int], ...]:
    return tuple((_provider(r).host, _provider(r).port) for r in records)


def _serves(rec: SignedRecord, group_id: bytes, content_id: bytes) -> bool:
    body = rec.payload()
    return (
        isinstance(body, Provider)
        and not body.withdrawn
        and (body.group_id, body.content_id) == (group_id, content_id)
    )


def _schedule(
    progress: Progress, done: int, total: int, pending: set[asyncio.Future[None]]
) -> None:
    result = progress(done, total)
    if result is not None:
        fut = asyncio.ensure_future(result)
        pending.add(fut)


async def _put_quietly(dht: SealedDht, rec: SignedRecord) -> None:
    try:
        await dht.put(Where("epoch", _group_of(rec)), rec)
    except (DhtError, RecordError):
        pass  # a tombstone that nobody stores still stops our republishing


def _group_of(rec: SignedRecord) -> bytes:
    body = rec.payload()
    assert isinstance(body, FileEntry | Provider)
    return body.group_id
