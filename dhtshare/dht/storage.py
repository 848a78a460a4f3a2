"""ValidatingStorage: kademlia's ``IStorage`` that keeps only records that prove themselves.

Pure: every logic method takes ``now``; the injected ``clock`` is read only by the
methods kademlia itself calls (``__setitem__``, ``get``, ``__iter__``,
``iter_older_than``).

What is kept, per DHT key, is a set of records merged by ``slot``: a record with a
higher ``seq`` in the same slot replaces the older one. A value is refused (and the
refusal counted as ``refuse.<reason>``) when it is oversized, malformed, filed under a
key other than its own ``dht_key``, expired, stale (not newer than what the slot
holds), dated too far ahead or badly signed (``verify_record``), or when a cap is hit.

Caps: at most ``max_per_key`` records per key; when full, the record that would
disappear soonest (earliest deadline) is evicted to make room, unless the newcomer
itself would disappear sooner, in which case it is refused. At most ``max_bytes`` of
encoded records per node; past that new records are refused (never evicting others,
so a flood cannot flush the table).

A record received from the network is held until ``min(expires, stored_at +
hold_for)``: its origin must republish it to keep it alive. A node's own records
(``own=True``) are held until they expire. ``iter_older_than`` yields only own,
unexpired records, so kademlia never re-stores other nodes' (possibly stale) values
(kademlia issue #107).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kademlia.storage import IStorage

from dhtshare.errors import RecordError
from dhtshare.records import MAX_RECORD_SIZE, SignedRecord, decode_record, verify_record
from dhtshare.stats import Counters

__all__ = ["DEFAULT_REPLY_BUDGET", "ValidatingStorage"]

#: Bytes of encoded records (plus 3 bytes of msgpack framing each) one reply may carry.
DEFAULT_REPLY_BUDGET = 8160
_FRAMING = 3

_REASON_WORDS = (
    ("signature", "bad_signature"),
    ("ahead", "too_far_ahead"),
    ("expire", "expired"),
)


@dataclass(slots=True)
class _Entry:
    """One stored record and when it must go."""

    record: SignedRecord
    raw: bytes
    stored_at: float
    deadline: float
    own: bool


def _newest_first(entries: list[_Entry]) -> list[_Entry]:
    return sorted(entries, key=lambda e: (e.record.issued, e.record.seq), reverse=True)


def _reason(exc: RecordError) -> str:
    text = str(exc).lower()
    return next((reason for word, reason in _REASON_WORDS if word in text), "invalid")


class ValidatingStorage(IStorage):  # type: ignore[misc]
    """Verified, merged, capped, expiring record storage for one DHT node."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        stats: Counters | None = None,
        max_per_key: int = 64,
        max_bytes: int = 16 * 1024 * 1024,
        hold_for: float = 3600.0,
    ) -> None:
        self.clock = clock
        self.stats = stats if stats is not None else Counters()
        self.max_per_key = max_per_key
        self.max_bytes = max_bytes
        self.hold_for = hold_for
        self._data: dict[bytes, dict[bytes, _Entry]] = {}
        self._bytes = 0

    # ---- logic (takes now) -------------------------------------------------------

    def add(self, key: bytes, raw: bytes, now: float, *, own: bool = False) -> str | None:
        """Store ``raw`` under ``key``; None if kept, else the reason it was refused."""
        reason = self._check(key, raw, now)
        if isinstance(reason, str):
            self.stats.incr(f"refuse.{reason}")
            return reason
        return self._keep(key, reason, raw, now, own)

    def offer(self, key: bytes, raw: bytes, now: float, *, own: bool = False) -> bool:
        """Like ``add``, as a yes/no answer (the reply to a store RPC)."""
        return self.add(key, raw, now, own=own) is None

    def _check(self, key: bytes, raw: object, now: float) -> SignedRecord | str:
        """The decoded, verified record, or why it is refused (before any cap)."""
        if not isinstance(raw, bytes) or not isinstance(key, bytes):
            return "malformed"
        if len(raw) > MAX_RECORD_SIZE:
            return "oversize"
        try:
            rec = decode_record(raw)
        except RecordError:
            return "malformed"
        if rec.dht_key != key:
            return "wrong_key"
        if rec.expires <= now:
            return "expired"
        if self._is_stale(key, rec, raw):
            return "stale"
        try:
            verify_record(rec, now)
        except RecordError as exc:
            return _reason(exc)
        return rec

    def _is_stale(self, key: bytes, rec: SignedRecord, raw: bytes) -> bool:
        held = self._data.get(key, {}).get(rec.slot)
        if held is None or rec.rank > held.record.rank:
            return False
        return not (rec.seq == held.record.seq and raw == held.raw)

    def _keep(self, key: bytes, rec: SignedRecord, raw: bytes, now: float, own: bool) -> str | None:
        self._expire_key(key, now)
        slots = self._data.setdefault(key, {})
        held = slots.get(rec.slot)
        own = own or (held is not None and held.own)
        deadline = rec.expires if own else min(rec.expires, now + self.hold_for)
        growth = len(raw) - (len(held.raw) if held else 0)
        if held is None and len(slots) >= self.max_per_key and not self._evict_for(slots, deadline):
            return self._refuse(key, "key_full")
        if self._bytes + growth > self.max_bytes:
            self.expire(now)
            if self._bytes + growth > self.max_bytes:
                return self._refuse(key, "node_full")
        slots[rec.slot] = _Entry(rec, raw, now, deadline, own)
        self._bytes += growth
        self.stats.incr("store.refreshed" if held and held.raw == raw else "store.accepted")
        return None

    def _refuse(self, key: bytes, reason: str) -> str:
        if not self._data.get(key):
            self._data.pop(key, None)
        self.stats.incr(f"refuse.{reason}")
        return reason

    def _evict_for(self, slots: dict[bytes, _Entry], deadline: float) -> bool:
        """Evict the entry that would go soonest, if it goes sooner than ``deadline``."""
        slot, victim = min(slots.items(), key=lambda item: item[1].deadline)
        if victim.deadline >= deadline:
            return False
        del slots[slot]
        self._bytes -= len(victim.raw)
        self.stats.incr("evict.key_full")
        return True

    def expire(self, now: float) -> int:
        """Remove every record past its deadline; return how many went."""
        return sum(self._expire_key(key, now) for key in list(self._data))

    def _expire_key(self, key: bytes, now: float) -> int:
        slots = self._data.get(key, {})
        gone = [slot for slot, e in slots.items() if e.deadline <= now]
        for slot in gone:
            self._bytes -= len(slots.pop(slot).raw)
        if not slots:
            self._data.pop(key, None)
        if gone:
            self.stats.incr("expired", len(gone))
        return len(gone)

    def remove(self, key: bytes, slot: bytes) -> bool:
        """Forget the record in ``slot`` under ``key``; True if there was one."""
        entry = self._data.get(key, {}).pop(slot, None)
        if entry is None:
            return False
        self._bytes -= len(entry.raw)
        if not self._data[key]:
            del self._data[key]
        return True

    def records(self, key: bytes, now: float) -> list[SignedRecord]:
        """Every live record under ``key``, newest first."""
        self._expire_key(key, now)
        return [e.record for e in _newest_first(list(self._data.get(key, {}).values()))]

    def reply_records(self, key: bytes, budget: int, now: float) -> list[bytes]:
        """Encoded records under ``key``, newest first, as many as fit ``budget`` bytes."""
        self._expire_key(key, now)
        chosen: list[bytes] = []
        for entry in _newest_first(list(self._data.get(key, {}).values())):
            if len(entry.raw) + _FRAMING <= budget:
                chosen.append(entry.raw)
                budget -= len(entry.raw) + _FRAMING
        return chosen

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
        return sum(len(slots) for slots in self._data.values())

    # ---- kademlia's IStorage (reads the clock) --------------------------------------

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.add(key, value, self.clock())

    def __getitem__(self, key: bytes) -> list[bytes]:
        found = self.reply_records(key, DEFAULT_REPLY_BUDGET, self.clock())
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: Any = None) -> Any:
        """Encoded records under ``key`` that fit one UDP reply, newest first; or ``default``."""
        found = self.reply_records(key, DEFAULT_REPLY_BUDGET, self.clock())
        return found if found else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Only this node's own records: holders never re-store others' values (#107)."""
        return self.own_older_than(seconds_old, self.clock())

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.items(self.clock()))
