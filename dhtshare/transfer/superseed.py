"""Super-seeding, sans I/O: which pieces of a complete share each session is offered.

A seeder that advertises every piece to every downloader ends up sending each piece
to many of them; one that offers each newcomer a window of *rare* pieces hands each
piece out about once and lets the swarm copy it onwards. ``SuperSeed`` decides the
offers for one complete share; ``transfer/aio/serve.py`` turns them into ``Bitfield``
and ``Have`` messages and reports what each session asks for and says it holds.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["SuperSeed"]


@dataclass(slots=True)
class _Offer:
    """What one session of a complete share was offered, and what we know it holds."""

    full: bool  # sent the whole bitfield: nothing more to decide
    offered: set[int] = field(default_factory=set)
    unrequested: set[int] = field(default_factory=set)  # offered, neither asked for nor held
    remaining: set[int] = field(default_factory=set)  # neither offered nor known to be held
    known: set[int] = field(default_factory=set)  # asked us for it, or said it has it
    asked: set[int] = field(default_factory=set)  # asked us for it
    requests: deque[tuple[float, int]] = field(default_factory=deque)  # (time, bytes)
    active_at: float = 0.0  # last request, foreign Have or block served
    check_at: float = 0.0  # not hungry before this (postponed while the seeder is busy)
    hungry: bool = False  # idle with nothing from elsewhere: offer popular pieces too


class SuperSeed:
    """Which pieces of one *complete* share each of its sessions is offered.

    Pure (no I/O, no clock: every call that needs time takes ``now``). A session is
    either ``full`` (offered every piece: the share had no other session when it
    arrived) or super-seeded: offered a window of pieces, chosen by the lowest
    *score* = copies (sessions that asked us for the piece or told us, by ``Have``
    or ``Bitfield``, that they hold it) + open offers (offered to a session that has
    neither asked for nor reported it), random among ties. Normally only *rare*
    pieces (score < ``spread``) are offered, so the seeder hands each piece out
    about once and the swarm copies it onwards. The window is topped up whenever
    the session asks for an offered piece or reports one, to
    ``max(min_window, pieces covering window_seconds of its recent request rate)``.

    A session that for ``idle_after`` seconds asked us for nothing, was sent nothing
    and reported no piece from elsewhere is *hungry* if the seeder is otherwise
    idle (``busy=False``: no other session has requests queued), or after
    ``patience`` seconds of that in any case: it is offered ``min_window`` more
    pieces (the least-scored, popular or not) at once, and its window is then
    filled from every piece, until it reports a piece it got elsewhere. So a
    session is always offered every piece eventually, one that only we can feed
    is fed at full speed, and while we are busy handing out rare pieces nobody
    is fed popular ones. Offers are never withdrawn (a ``Have`` cannot be).
    """

    def __init__(
        self,
        piece_count: int,
        piece_size: int,
        rng: random.Random,
        *,
        min_window: int = 4,
        window_seconds: float = 1.5,
        rate_window: float = 2.0,
        spread: int = 1,
        idle_after: float = 1.0,
        patience: float = 4.0,
    ) -> None:
        if piece_count < 0 or piece_size <= 0 or min_window < 1:
            raise ValueError("need piece_count >= 0, piece_size > 0 and min_window >= 1")
        self.piece_count = piece_count
        self.piece_size = piece_size
        self.min_window = min_window
        self.window_seconds = window_seconds
        self.rate_window = rate_window
        self.spread = spread
        self.idle_after = idle_after
        self.patience = patience
        self.copies = [0] * piece_count
        self.open = [0] * piece_count
        self._rng = rng
        self._sessions: dict[object, _Offer] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def score(self, index: int) -> int:
        return self.copies[index] + self.open[index]

    def is_full(self, sid: object) -> bool:
        """True if ``sid`` has been offered every piece."""
        offer = self._sessions.get(sid)
        return offer is not None and (offer.full or len(offer.offered) == self.piece_count)

    def offered(self, sid: object) -> set[int]:
        offer = self._sessions.get(sid)
        if offer is None:
            return set()
        return set(range(self.piece_count)) if offer.full else set(offer.offered)

    def join(self, sid: object, now: float, *, full: bool) -> list[int]:
        """A session starts; returns the pieces for its first ``Bitfield``."""
        offer = _Offer(full=full, active_at=now)
        self._sessions[sid] = offer
        if full:
            return list(range(self.piece_count))
        offer.remaining = set(range(self.piece_count))
        fresh = self._fill(offer, now)
        if not fresh:  # nothing rare left: start it with the least-copied pieces anyway
            fresh = self._offer(offer, self._pick(offer, self.min_window, rare_only=False))
        return sorted(fresh)

    def leave(self, sid: object) -> None:
        """The session ended: its open offers are open no more (copies stay)."""
        offer = self._sessions.pop(sid, None)
        if offer is not None:
            for i in offer.unrequested:
                self.open[i] -= 1

    def requested(self, sid: object, index: int, nbytes: int, now: float) -> list[int]:
        """The session asked for ``nbytes`` of piece ``index``; returns new offers."""
        offer = self._sessions.get(sid)
        if offer is None:
            return []
        offer.requests.append((now, nbytes))
        offer.active_at = now
        offer.asked.add(index)
        self._learn(offer, index)
        return self._fill(offer, now)

    def reported(self, sid: object, indices: Iterable[int], now: float) -> list[int]:
        """The session says it holds ``indices`` (``Have``/``Bitfield``); returns new offers."""
        offer = self._sessions.get(sid)
        if offer is None:
            return []
        for index in indices:
            if not 0 <= index < self.piece_count or index in offer.known:
                continue
            self._learn(offer, index)
            if index not in offer.asked:  # it gets pieces elsewhere: not hungry
                offer.hungry = False
                offer.active_at = now
        return self._fill(offer, now)

    def served(self, sid: object, now: float) -> None:
        """A block was sent to the session (it is being fed)."""
        offer = self._sessions.get(sid)
        if offer is not None:
            offer.active_at = now

    def idle_deadline(self, sid: object) -> float | None:
        """When to call ``idle`` if the session stays quiet; ``None``: nothing left to offer."""
        offer = self._sessions.get(sid)
        if offer is None or offer.full or not offer.remaining:
            return None
        return max(offer.active_at + self.idle_after, offer.check_at)

    def idle(self, sid: object, now: float, *, busy: bool = False) -> list[int]:
        """Past ``idle_deadline``: the session is hungry (unless we are ``busy`` with
        other sessions and it has not waited ``patience`` yet); returns new offers."""
        deadline = self.idle_deadline(sid)
        if deadline is None or now < deadline:
            return []
        offer = self._sessions[sid]
        if busy and now - offer.active_at < self.patience:
            offer.check_at = now + self.idle_after / 4
            return []
        offer.hungry = True
        offer.active_at = now
        fresh = self._offer(offer, self._pick(offer, self.min_window, rare_only=False))
        return fresh + self._fill(offer, now)

    def flush(self, sid: object) -> list[int]:
        """Offer the session every piece it was not offered yet (it is now alone)."""
        offer = self._sessions.get(sid)
        if offer is None or offer.full:
            return []
        rest = sorted(set(range(self.piece_count)) - offer.offered)
        for i in offer.unrequested:
            self.open[i] -= 1
        offer.unrequested.clear()
        offer.remaining.clear()
        offer.offered.update(rest)
        offer.full = True
        return rest

    def window(self, sid: object, now: float) -> int:
        """Open offers to keep for the session: ``min_window`` or its request rate's worth."""
        offer = self._sessions.get(sid)
        return 0 if offer is None else self._window(offer, now)

    def _learn(self, offer: _Offer, index: int) -> None:
        """The session holds (or is getting) ``index``."""
        if index in offer.known:
            return
        offer.known.add(index)
        self.copies[index] += 1
        offer.remaining.discard(index)
        if index in offer.unrequested:
            offer.unrequested.discard(index)
            self.open[index] -= 1

    def _fill(self, offer: _Offer, now: float) -> list[int]:
        if offer.full:
            return []
        need = self._window(offer, now) - len(offer.unrequested)
        if need <= 0 or not offer.remaining:
            return []
        return self._offer(offer, self._pick(offer, need, rare_only=not offer.hungry))

    def _window(self, offer: _Offer, now: float) -> int:
        while offer.requests and offer.requests[0][0] < now - self.rate_window:
            offer.requests.popleft()
        rate = sum(n for _, n in offer.requests) / self.rate_window
        return max(self.min_window, math.ceil(rate * self.window_seconds / self.piece_size))

    def _pick(self, offer: _Offer, count: int, *, rare_only: bool) -> list[int]:
        """Up to ``count`` of the session's remaining pieces, lowest score first, random ties."""
        rand = self._rng.random
        scored = [
            (self.copies[i] + self.open[i] + rand(), i)
            for i in offer.remaining
            if not rare_only or self.copies[i] + self.open[i] < self.spread
        ]
        return [i for _, i in heapq.nsmallest(count, scored)]

    def _offer(self, offer: _Offer, indices: list[int]) -> list[int]:
        for i in indices:
            offer.remaining.discard(i)
            offer.offered.add(i)
            offer.unrequested.add(i)
            self.open[i] += 1
        return indices
