"""ValidatingStorage: kademlia's ``IStorage`` that keeps only records that prove themselves.

Pure: every logic method takes ``now``; the injected ``clock`` is read only by the
methods kademlia itself calls (``__setitem__``, ``get``, ``__iter__``,
``iter_older_than``).

What is kept, per DHT key, is a set of records merged by ``slot``: a record with a
higher ``seq`` in the same slot replaces the older one. A value is refused (and the
refusal counted as ``refuse.<reason>``) when it is oversized, malformed, filed under a
key other than its own ``dht_key``, expired, stale (not newer than what the slot
holds), over its sender's quota, dated too far ahead or badly signed
(``verify_record``), or when a cap is hit.

Quotas (``Quotas``) bound what one sender may hold, counted by the address a record
came from and by that address's prefix (``sources.py``), never by node id or signer,
which cost nothing: a share of the node's bytes and records per address and per
prefix, and a share of one key's slots per prefix. A record is charged to the first
address that delivered it; the same bytes sent again by anyone only refresh its hold
time, so replaying someone's record does not make it yours.

Caps: at most ``max_per_key`` records per key. When a key is full, the newcomer takes
the place of a record of the sender holding the most slots under that key, if that
sender would still hold at least as many as the newcomer's; between equals (or among
the newcomer's own sender's records) the record that would disappear soonest goes,
unless the newcomer would itself go sooner, in which case it is refused. At most
``max_bytes`` of encoded records and ``max_records`` records per node; past that new
records are refused (never evicting others, so a flood cannot flush the table).

A record received from the network is held until ``min(expires, stored_at +
hold_for)``: its origin must republish it to keep it alive. A node's own records
(``own=True``) are held until they expire, are charged to no sender and are never
evicted for another record. ``iter_older_than`` yields only own, unexpired records, so
kademlia never re-stores other nodes' (possibly stale) values (kademlia issue #107).

Replies (``reply_records``) take records round-robin over senders, each sender's
newest first, so one sender's records dated ahead cannot fill a reply.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kademlia.storage import IStorage

from dhtshare.dht.sources import Ledger, Source, Usage, source_of
from dhtshare.errors import RecordError
from dhtshare.records import (
    INNER_KINDS,
    MAX_RECORD_SIZE,
    SignedRecord,
    decode_record,
    verify_record,
)
from dhtshare.stats import Counters

__all__ = ["DEFAULT_REPLY_BUDGET", "Quotas", "ValidatingStorage"]

#: Bytes of encoded records (plus 3 bytes of msgpack framing each) one reply may carry.
DEFAULT_REPLY_BUDGET = 8160
_FRAMING = 3

_REASON_WORDS = (
    ("signature", "bad_signature"),
    ("certified", "not_certified"),
    ("ahead", "too_far_ahead"),
    ("expire", "expired"),
)

_SHUFFLE = random.SystemRandom()  # the senders' order in a reply (not predictable)

#: The group of records with no known sender (a local caller that is not ``own``).
_LOCAL = ""


@dataclass(frozen=True, slots=True)
class Quotas:
    """What one sender may hold at one storing node, as fractions of the node's caps.

    ``address`` and ``prefix``: of ``max_bytes`` and of ``max_records``, for one source
    address and for one prefix (/24, /48). ``key``: of ``max_per_key``, the slots one
    prefix may hold under one key once the key is full (free slots are for anyone).
    """

    address: float = 1 / 16
    prefix: float = 1 / 8
    key: float = 1 / 2


@dataclass(slots=True)
class _Entry:
    """One stored record, when it must go, and who it is charged to."""

    record: SignedRecord
    raw: bytes
    stored_at: float
    deadline: float
    own: bool
    source: Source | None

    @property
    def group(self) -> str | None:
        """The sender this record counts for under its key (None: our own record)."""
        if self.own:
            return None
        return self.source.prefix if self.source is not None else _LOCAL


def _newest_first(entries: list[_Entry]) -> list[_Entry]:
    return sorted(entries, key=lambda e: (e.record.issued, e.record.seq), reverse=True)


def _reason(exc: RecordError) -> str:
    text = str(exc).lower()
    return next((reason for word, reason in _REASON_WORDS if word in text), "invalid")


def _cap(total: int, share: float) -> int:
    return max(1, int(total * share))


class ValidatingStorage(IStorage):  # type: ignore[misc]
    """Verified, merged, capped, expiring, per-sender-quota'd record storage for one node."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        stats: Counters | None = None,
        max_per_key: int = 64,
        max_bytes: int = 16 * 1024 * 1024,
        max_records: int = 65_536,
        hold_for: float = 3600.0,
        quotas: Quotas | None = None,
    ) -> None:
        self.clock = clock
        self.stats = stats if stats is not None else Counters()
        self.max_per_key = max_per_key
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.hold_for = hold_for
        self.quotas = quotas or Quotas()
        q = self.quotas
        self.address_cap = Usage(_cap(max_bytes, q.address), _cap(max_records, q.address))
        self.prefix_cap = Usage(_cap(max_bytes, q.prefix), _cap(max_records, q.prefix))
        self.key_cap = _cap(max_per_key, q.key)
        self._data: dict[bytes, dict[bytes, _Entry]] = {}
        self._bytes = 0
        self._records = 0
        self._by_address = Ledger()
        self._by_prefix = Ledger()

    # ---- logic (takes now) -------------------------------------------------------

    def add(
        self, key: bytes, raw: bytes, now: float, *, own: bool = False, source: str | None = None
    ) -> str | None:
        """Store ``raw`` under ``key``; None if kept, else the reason it was refused.

        ``source`` is the host the value came from (None for a local caller); it is
        what the quotas count. ``own`` marks this node's own record.
        """
        checked = self._check(key, raw, now)
        if isinstance(checked, str):
            return self._refuse(key, checked)
        rec = checked
        self._expire_key(key, now)
        held = self._data.get(key, {}).get(rec.slot)
        if held is not None and held.raw == raw:
            self._refresh(key, held, now, own)
            return None
        src = None if own or source is None else source_of(source)
        over = self._over_quota(key, rec, raw, src, held)
        if over is not None:
            return self._refuse(key, over)
        try:
            verify_record(rec, now)
        except RecordError as exc:
            return self._refuse(key, _reason(exc))
        return self._keep(key, rec, raw, now, own or (held is not None and held.own), src)

    def offer(
        self, key: bytes, raw: bytes, now: float, *, own: bool = False, source: str | None = None
    ) -> bool:
        """Like ``add``, as a yes/no answer (the reply to a store RPC)."""
        return self.add(key, raw, now, own=own, source=source) is None

    def _check(self, key: bytes, raw: object, now: float) -> SignedRecord | str:
        """The decoded record, or why it is refused before any quota or signature check."""
        if not isinstance(raw, bytes) or not isinstance(key, bytes):
            return "malformed"
        if len(raw) > MAX_RECORD_SIZE:
            return "oversize"
        try:
            rec = decode_record(raw)
        except RecordError:
            return "malformed"
        if rec.kind in INNER_KINDS:
            return "inner_kind"  # a private group's secrets never travel in the clear
        if rec.dht_key != key:
            return "wrong_key"
        if rec.expires <= now:
            return "expired"
        if self._is_stale(key, rec, raw):
            return "stale"
        return rec

    def _is_stale(self, key: bytes, rec: SignedRecord, raw: bytes) -> bool:
        held = self._data.get(key, {}).get(rec.slot)
        if held is None or rec.rank > held.record.rank:
            return False
        return not (rec.seq == held.record.seq and raw == held.raw)

    def _over_quota(
        self, key: bytes, rec: SignedRecord, raw: bytes, src: Source | None, held: _Entry | None
    ) -> str | None:
        """Why storing ``rec`` would put ``src`` over a quota (None if it would not)."""
        if src is None:
            return None
        same_address = held is not None and not held.own and held.source == src
        same_prefix = held is not None and held.group == src.prefix
        if _exceeds(
            self._by_address[src.address], _extra(raw, held, same_address), self.address_cap
        ):
            return "address_quota"
        if _exceeds(self._by_prefix[src.prefix], _extra(raw, held, same_prefix), self.prefix_cap):
            return "prefix_quota"
        slots = self._data.get(key, {})
        full = len(slots) >= self.max_per_key
        if full and not same_prefix and _count(slots, src.prefix) >= self.key_cap:
            return "key_quota"
        return None

    def _refresh(self, key: bytes, held: _Entry, now: float, own: bool) -> None:
        """The same bytes again: hold them longer; the charge stays where it was."""
        own = own or held.own
        deadline = held.record.expires if own else min(held.record.expires, now + self.hold_for)
        source = None if own else held.source
        entry = _Entry(held.record, held.raw, now, max(deadline, held.deadline), own, source)
        self._replace(key, held, entry)
        self.stats.incr("store.refreshed")

    def _keep(
        self, key: bytes, rec: SignedRecord, raw: bytes, now: float, own: bool, src: Source | None
    ) -> str | None:
        slots = self._data.get(key, {})
        held = slots.get(rec.slot)
        deadline = rec.expires if own else min(rec.expires, now + self.hold_for)
        entry = _Entry(rec, raw, now, deadline, own, None if own else src)
        victim = None
        if held is None and len(slots) >= self.max_per_key:
            victim = self._victim(slots, entry)
            if victim is None:
                return self._refuse(key, "key_full")
        gone = [e for e in (held, victim) if e is not None]
        if self._over_node_caps(entry, gone, now):
            return self._refuse(key, "node_full")
        if victim is not None:
            self._remove_entry(key, victim)
            self.stats.incr("evict.key_full")
        self._replace(key, held, entry)
        self.stats.incr("store.accepted")
        return None

    def _over_node_caps(self, entry: _Entry, gone: list[_Entry], now: float) -> bool:
        """True if adding ``entry`` (and dropping ``gone``) passes a node cap, even after expiry."""
        grow_bytes = len(entry.raw) - sum(len(e.raw) for e in gone)
        grow_records = 1 - len(gone)

        def over() -> bool:
            return (
                self._bytes + grow_bytes > self.max_bytes
                or self._records + grow_records > self.max_records
            )

        if not over():
            return False
        self.expire(now)  # the entries in ``gone`` live under a key already expired
        return over()

    def _victim(self, slots: dict[bytes, _Entry], newcomer: _Entry) -> _Entry | None:
        """The record a newcomer to a full key displaces, or None if it is refused.

        Own records are never displaced. If another sender holds more than one slot
        more than the newcomer's sender will, its record that would go soonest goes.
        Otherwise, among the records of senders that would still hold as many as the
        newcomer's (and the newcomer's own sender's), the one that would go soonest
        goes, if it would go sooner than the newcomer.
        """
        counts: dict[str, int] = {}
        for e in slots.values():
            if e.group is not None:
                counts[e.group] = counts.get(e.group, 0) + 1
        mine = newcomer.group
        after = counts.get(mine, 0) + 1 if mine is not None else 1
        others = [n for g, n in counts.items() if g != mine]
        most = max(others, default=0)
        if most > after:
            pool = [
                e
                for e in slots.values()
                if e.group is not None and e.group != mine and counts[e.group] == most
            ]
            return min(pool, key=lambda e: e.deadline)
        pool = [
            e
            for e in slots.values()
            if e.group is not None and (e.group == mine or counts[e.group] >= after)
        ]
        if not pool:
            return None
        victim = min(pool, key=lambda e: e.deadline)
        return victim if victim.deadline < newcomer.deadline else None

    # ---- bookkeeping: every change to what is held goes through these two -------

    def _replace(self, key: bytes, old: _Entry | None, new: _Entry) -> None:
        """Put ``new`` in its slot under ``key`` in place of ``old`` (None: a new slot)."""
        if old is not None:
            self._uncharge(old)
        slots = self._data.setdefault(key, {})
        slots[new.record.slot] = new
        self._charge(new)

    def _remove_entry(self, key: bytes, entry: _Entry) -> None:
        slots = self._data.get(key, {})
        if slots.get(entry.record.slot) is entry:
            del slots[entry.record.slot]
            self._uncharge(entry)
        if not slots:
            self._data.pop(key, None)

    def _charge(self, entry: _Entry, sign: int = 1) -> None:
        self._bytes += sign * len(entry.raw)
        self._records += sign
        if entry.source is not None and not entry.own:
            self._by_address.charge(entry.source.address, sign * len(entry.raw), sign)
            self._by_prefix.charge(entry.source.prefix, sign * len(entry.raw), sign)

    def _uncharge(self, entry: _Entry) -> None:
        self._charge(entry, -1)

    def _refuse(self, key: bytes, reason: str) -> str:
        if not self._data.get(key):
            self._data.pop(key, None)
        self.stats.incr(f"refuse.{reason}")
        return reason

    def expire(self, now: float) -> int:
        """Remove every record past its deadline; return how many went."""
        return sum(self._expire_key(key, now) for key in list(self._data))

    def _expire_key(self, key: bytes, now: float) -> int:
        gone = [e for e in self._data.get(key, {}).values() if e.deadline <= now]
        for entry in gone:
            self._remove_entry(key, entry)
        if gone:
            self.stats.incr("expired", len(gone))
        return len(gone)

    def remove(self, key: bytes, slot: bytes) -> bool:
        """Forget the record in ``slot`` under ``key``; True if there was one."""
        entry = self._data.get(key, {}).get(slot)
        if entry is None:
            return False
        self._remove_entry(key, entry)
        return True

    # ---- reading ---------------------------------------------------------------

    def records(self, key: bytes, now: float) -> list[SignedRecord]:
        """Every live record under ``key``, newest first."""
        self._expire_key(key, now)
        return [e.record for e in _newest_first(list(self._data.get(key, {}).values()))]

    def reply_records(self, key: bytes, budget: int, now: float) -> list[bytes]:
        """Encoded records under ``key`` that fit ``budget`` bytes, fairly over senders.

        Round-robin over senders (each sender's newest first), the senders in a new random
        order for each reply: a sender that dates one record far ahead, as big as a reply,
        would otherwise come first in every reply and crowd out everyone else's; now it
        comes first in its share of them, and a lookup merges the replies of several nodes.
        """
        self._expire_key(key, now)
        by_sender: dict[str | None, list[_Entry]] = {}
        for entry in _newest_first(list(self._data.get(key, {}).values())):
            by_sender.setdefault(entry.group, []).append(entry)
        queues = list(by_sender.values())
        _SHUFFLE.shuffle(queues)
        chosen: list[bytes] = []
        for turn in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if turn < len(queue) and len(queue[turn].raw) + _FRAMING <= budget:
                    chosen.append(queue[turn].raw)
                    budget -= len(queue[turn].raw) + _FRAMING
        return chosen

    def stored_keys(self) -> list[bytes]:
        """Every key holding records, without expiring anything (O(keys), no copies).

        Some may have expired since: ``records``/``reply_records`` expire the key first.
        """
        return list(self._data)

    def items(self, now: float) -> list[tuple[bytes, bytes]]:
        """Every live ``(key, encoded record)`` pair."""
        self.expire(now)
        return [(key, e.raw) for key, slots in self._data.items() for e in slots.values()]

    def own_older_than(self, seconds_old: float, now: float) -> list[tuple[bytes, bytes]]:
        """Own, unexpired records stored more than ``seconds_old`` ago."""
        self.expire(now)
        return [
            (key, e.raw)
            for key, slots in self._data.items()
            for e in slots.values()
            if e.own and now - e.stored_at >= seconds_old
        ]

    @property
    def total_bytes(self) -> int:
        """Bytes of encoded records held."""
        return self._bytes

    def count(self, key: bytes | None = None) -> int:
        """Records held under ``key``, or in total."""
        if key is not None:
            return len(self._data.get(key, {}))
        return self._records

    def usage(self, host: str) -> tuple[Usage, Usage]:
        """What records sent from ``host`` hold: by its address, and by its prefix."""
        src = source_of(host)
        return self._by_address[src.address], self._by_prefix[src.prefix]

    @property
    def senders(self) -> int:
        """Entries in the per-sender ledgers (addresses plus prefixes)."""
        return len(self._by_address) + len(self._by_prefix)

    # ---- kademlia's IStorage (reads the clock) --------------------------------------

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.add(key, value, self.clock())

    def __getitem__(self, key: bytes) -> list[bytes]:
        found = self.reply_records(key, DEFAULT_REPLY_BUDGET, self.clock())
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: Any = None) -> Any:
        """Encoded records under ``key`` that fit one UDP reply; or ``default``."""
        found = self.reply_records(key, DEFAULT_REPLY_BUDGET, self.clock())
        return found if found else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Only this node's own records: holders never re-store others' values (#107)."""
        return self.own_older_than(seconds_old, self.clock())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.items(self.clock()))


def _exceeds(usage: Usage, extra: Usage, cap: Usage) -> bool:
    return usage.bytes + extra.bytes > cap.bytes or usage.records + extra.records > cap.records


def _extra(raw: bytes, held: _Entry | None, same: bool) -> Usage:
    """What storing ``raw`` adds to a sender: the growth if it already holds the slot."""
    if held is not None and same:
        return Usage(len(raw) - len(held.raw), 0)
    return Usage(len(raw), 1)


def _count(slots: dict[bytes, _Entry], group: str) -> int:
    return sum(1 for e in slots.values() if e.group == group)
