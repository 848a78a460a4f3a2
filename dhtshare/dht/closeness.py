"""Which stored keys a newly met node should be given, decided in O(1) per key.

The Kademlia rule (section 2.5 of the paper): push the records under ``key`` to a new
node when we are closer to ``key`` than every contact we know, and the new node would be
among the ``k`` contacts closest to it. Finding the k nearest contacts for every stored
key costs O(contacts) per key. ``PushFilter`` does the same test with bit arithmetic,
after O(contacts log contacts) set-up per new node:

- Let ``b(c)`` be the highest bit in which contact ``c`` differs from us. ``c`` is closer
  to ``key`` than we are exactly when ``key`` differs from us in bit ``b(c)``. So we are
  the closest when ``(key ^ us) & mask == 0``, ``mask`` having bit ``b(c)`` set for every
  contact: one AND per key.
- If so, no contact has ``b(c)`` equal to ``t``, the highest bit of ``key ^ us``, and the
  highest bit of ``c ^ key`` is ``max(b(c), t)``. Contacts sorted by ``b(c)`` then give
  how many are closer to ``key`` than the new node with a bisection, comparing exact
  distances only within one such shell.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["PushFilter"]


class PushFilter:
    """``wants(new_id, key)``: push ``key``'s records to ``new_id``? (see the module doc)."""

    __slots__ = ("_bits", "_ids", "k", "mask", "me")

    def __init__(self, own_id: bytes, contact_ids: Iterable[bytes], k: int) -> None:
        self.me = int.from_bytes(own_id, "big")
        self.k = k
        shells = sorted(
            ((int.from_bytes(c, "big") ^ self.me).bit_length() - 1, int.from_bytes(c, "big"))
            for c in contact_ids
        )
        self._bits = [b for b, _c in shells if b >= 0]
        self._ids = [c for b, c in shells if b >= 0]
        self.mask = 0
        for b in self._bits:
            self.mask |= 1 << b

    def closest(self, keys: Iterable[bytes]) -> list[bytes]:
        """The ``keys`` we are closer to than every contact (the cheap first test)."""
        me, mask = self.me, self.mask
        return [k for k in keys if not (int.from_bytes(k, "big") ^ me) & mask]

    def wants(self, new_id: bytes, key: bytes) -> bool:
        """True if we are closer to ``key`` than every contact, and ``new_id`` is among
        the ``k`` closest to it (counting contacts only; ``new_id`` is not one)."""
        target = int.from_bytes(key, "big")
        ours = self.me ^ target
        if ours & self.mask:
            return False
        theirs = int.from_bytes(new_id, "big") ^ target
        t, s = ours.bit_length() - 1, theirs.bit_length() - 1
        if s < t:  # the new node is closer than we are, and so than every contact
            return True
        lo = bisect.bisect_left(self._bits, s)  # contacts whose shell is below s
        if s == t:
            if lo < self.k:
                return True
            return sum(1 for c in self._ids[:lo] if c ^ target < theirs) < self.k
        if lo >= self.k:
            return False
        hi = bisect.bisect_right(self._bits, s, lo)
        return lo + sum(1 for c in self._ids[lo:hi] if c ^ target < theirs) < self.k
