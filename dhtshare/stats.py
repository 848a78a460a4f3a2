"""Named event counters (dropped datagrams, refused records, RPCs) for status and the simulator."""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """A bag of named, monotonically increasing integer counters.

    Names are dotted strings such as ``"drop.bad_msgpack"`` or ``"refuse.stale"``.
    Reading a name that was never counted gives 0.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``."""
        self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def total(self, prefix: str) -> int:
        """Sum of every counter whose name starts with ``prefix``."""
        return sum(v for k, v in self._counts.items() if k.startswith(prefix))

    def snapshot(self) -> dict[str, int]:
        """A sorted copy of all counters, safe to serialize."""
        return dict(sorted(self._counts.items()))

    def __repr__(self) -> str:
        return f"Counters({self.snapshot()!r})"
