"""``SealedDht``: the group and file services' view of the DHT, with every record sealed.

The services sign their records as before (``records.sign_record`` with the member's
identity); this adapter seals each into the space its ``Where`` names (``groups/secrets.py``)
before it reaches the DHT, and opens what a lookup returns, keeping only inner records that
verify and belong under the inner key asked for. Publications are kept by inner key and
slot: after an epoch change ``reseal`` moves a group's records to the new epoch's keys and
stops republishing the old ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dhtshare.errors import RecordError
from dhtshare.groups.keyring import Keyring, Where
from dhtshare.groups.secrets import Space, open_sealed, seal
from dhtshare.identity import Identity
from dhtshare.records import Sealed, SignedRecord, time_seq

__all__ = ["Dht", "SealedDht"]

Renew = Callable[[SignedRecord], SignedRecord]
SENDING = 4  # records stored at once
READING = 4  # lookups at once (a 2,000-member roster is 31 pages)


class Dht(Protocol):
    """What the adapter needs from the DHT (``dht.server.DhtNode`` provides it)."""

    async def put(self, record: SignedRecord) -> int: ...
    async def publish(self, record: SignedRecord, renew: Renew | None = None) -> int: ...
    def withdraw(self, key: bytes, slot: bytes) -> None: ...
    async def get(self, key: bytes) -> list[SignedRecord]: ...


@dataclass
class _Publication:
    where: Where
    inner: SignedRecord
    renew: Renew | None
    to_owner: bytes | None
    outer: SignedRecord | None = None  # what the DHT node republishes now


class SealedDht:
    """Seals on the way out, opens on the way in (see the module docstring)."""

    def __init__(
        self,
        dht: Dht,
        ring: Keyring,
        identity: Identity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht, self.ring, self.identity, self.clock = dht, ring, identity, clock
        self._pubs: dict[tuple[bytes, bytes, bytes], _Publication] = {}  # gid, key, slot
        self._last_seq = 0
        # a big roster or epoch change is dozens of 7 KiB records: sent all at once, k
        # copies each overflow the UDP buffers (the stores are lost and contacts evicted)
        self._sending = asyncio.Semaphore(SENDING)
        self._reading = asyncio.Semaphore(READING)  # replies are up to 8 KiB each, too

    # ---- reading -------------------------------------------------------------------

    def spaces(self, group_id: bytes) -> list[Space]:
        """Where members' records of ``group_id`` are read (current and previous epoch)."""
        keys = self.ring.get(group_id)
        return keys.read_spaces(self.clock()) if keys is not None else []

    async def find(
        self,
        spaces: Iterable[Space | None],
        inner_key: bytes,
        *,
        to_me: bool = False,
        keep: Callable[[SignedRecord], bool] | None = None,
    ) -> list[SignedRecord]:
        """Inner records under ``inner_key`` in any of ``spaces`` that ``keep`` accepts,
        merged by slot (the higher rank wins), newest first. ``to_me``: they are also sealed
        to my key (the inbox). A record ``keep`` refuses never displaces one it accepts."""
        chosen = [s for s in spaces if s is not None]
        found = await asyncio.gather(*(self._get(s.dht_key(inner_key)) for s in chosen))
        now, owner = self.clock(), (self.identity if to_me else None)
        # per slot, every record no other outranks (rank is a partial order: two rosters
        # whose chains fork both stay, and ``rules.pick_roster`` sees the fork)
        best: dict[bytes, list[SignedRecord]] = {}
        for space, outers in zip(chosen, found, strict=True):
            for outer in outers:
                try:
                    inner = open_sealed(space, outer, inner_key, now, owner=owner)
                except RecordError:
                    continue  # not ours to read, tampered, or junk from a throw-away key
                if keep is not None and not keep(inner):
                    continue
                held = best.setdefault(inner.slot, [])
                if inner in held or any(h.rank > inner.rank for h in held):
                    continue
                held[:] = [h for h in held if not inner.rank > h.rank] + [inner]
        kept = [rec for recs in best.values() for rec in recs]
        return sorted(kept, key=lambda r: (r.issued, r.seq), reverse=True)

    async def _get(self, key: bytes) -> list[SignedRecord]:
        async with self._reading:
            return await self.dht.get(key)

    async def get(self, group_id: bytes, inner_key: bytes) -> list[SignedRecord]:
        """``find`` in the group's epoch spaces."""
        return await self.find(self.spaces(group_id), inner_key)

    # ---- writing -------------------------------------------------------------------

    def _seq(self) -> int:
        self._last_seq = max(time_seq(self.clock()), self._last_seq + 1)
        return self._last_seq

    def _seal(self, pub: _Publication) -> SignedRecord | None:
        space = pub.where.resolve(self.ring)
        if space is None:
            return None
        return seal(
            space,
            pub.inner,
            author=self.identity,
            seq=self._seq(),
            now=self.clock(),
            to_owner=pub.to_owner,
        )

    def _renewer(self, pub: _Publication) -> Renew:
        def renew(old: SignedRecord) -> SignedRecord:
            if pub.renew is not None:
                pub.inner = pub.renew(pub.inner)
            new = self._seal(pub) if pub.inner.expires > self.clock() else None
            if new is None:  # its time is over, or its space's secret is gone: let it go
                self._drop(pub)
                return old  # the DHT node stops republishing it once it expires
            pub.outer = new
            return new

        return renew

    def _drop(self, pub: _Publication) -> None:
        for key, held in list(self._pubs.items()):
            if held is pub:
                del self._pubs[key]

    async def publish(
        self,
        where: Where,
        record: SignedRecord,
        renew: Renew | None = None,
        *,
        to_owner: bytes | None = None,
    ) -> int:
        """Seal ``record`` into ``where`` and keep it published (republished, renewed with
        ``renew``, moved by ``reseal``) while the node runs. ``RecordError`` if I hold no
        secret for ``where``."""
        where_key = (where.group_id, record.dht_key, record.slot)
        old = self._pubs.pop(where_key, None)
        if old is not None and old.outer is not None:
            self.dht.withdraw(old.outer.dht_key, old.outer.slot)
        pub = _Publication(where, record, renew, to_owner)
        outer = self._seal(pub)
        if outer is None:
            raise RecordError("no key to seal this record with")
        pub.outer = outer
        self._pubs[where_key] = pub
        async with self._sending:
            return await self.dht.publish(outer, self._renewer(pub))

    async def put(
        self, where: Where, record: SignedRecord, *, to_owner: bytes | None = None
    ) -> int:
        """Seal and store ``record`` once (not republished)."""
        space = where.resolve(self.ring)
        if space is None:
            raise RecordError("no key to seal this record with")
        outer = seal(
            space,
            record,
            author=self.identity,
            seq=self._seq(),
            now=self.clock(),
            to_owner=to_owner,
        )
        async with self._sending:
            return await self.dht.put(outer)

    def withdraw(self, inner_key: bytes, inner_slot: bytes, group_id: bytes | None = None) -> None:
        """Stop republishing my record in ``inner_slot`` under ``inner_key`` (of
        ``group_id`` only, when given: the one inner key without a group id, the invite's)."""
        for key in [k for k in self._pubs if k[1:] == (inner_key, inner_slot)]:
            if group_id is not None and key[0] != group_id:
                continue
            pub = self._pubs.pop(key)
            if pub.outer is not None:
                self.dht.withdraw(pub.outer.dht_key, pub.outer.slot)

    @property
    def published(self) -> list[SignedRecord]:
        """The inner records I keep published."""
        return [p.inner for p in self._pubs.values()]

    def where_of(self, group_id: bytes, inner_key: bytes, inner_slot: bytes) -> Where | None:
        """Where my publication in that slot is sealed, if I publish one."""
        pub = self._pubs.get((group_id, inner_key, inner_slot))
        if pub is None or pub.inner.expires <= self.clock():
            return None  # expired: publish it again
        return pub.where

    async def reseal(self, group_id: bytes) -> int:
        """Move my publications of ``group_id`` to the spaces their ``Where`` names now
        (after an epoch change, or an invite rotation); how many moved."""
        moved: list[_Publication] = []
        for pub in self._pubs.values():
            if pub.where.group_id != group_id or pub.outer is None:
                continue
            space = pub.where.resolve(self.ring)
            body = pub.outer.payload()
            if space is None or (isinstance(body, Sealed) and body.space == space.writer.public):
                continue
            self.dht.withdraw(pub.outer.dht_key, pub.outer.slot)
            new = self._seal(pub)
            pub.outer = new
            if new is not None:
                moved.append(pub)
        results = await asyncio.gather(
            *(self._publish_outer(p) for p in moved), return_exceptions=True
        )
        return sum(1 for r in results if r is True)

    async def _publish_outer(self, pub: _Publication) -> bool:
        assert pub.outer is not None
        async with self._sending:
            await self.dht.publish(pub.outer, self._renewer(pub))
        return True

    def forget_group(self, group_id: bytes, keep: Sequence[Where] = ()) -> None:
        """Stop republishing everything of ``group_id`` (but the roles in ``keep``)."""
        for key, pub in list(self._pubs.items()):
            if pub.where.group_id == group_id and pub.where not in keep:
                self.withdraw(key[1], key[2], group_id)
