"""A pure token bucket: how long to wait before sending ``n`` more bytes.

``consume`` reserves the bytes at once and says how long to wait; the bucket may
go into debt, so a burst larger than ``burst`` is allowed but paid for in time.
A rate of ``None`` or ``0`` means unlimited. Time is an argument (``now``). The
burst defaults to a quarter second of the rate, and never less than one block, so
a limited transfer still moves whole blocks.
"""

from __future__ import annotations

from dhtshare.wire import MAX_BLOCK

__all__ = ["TokenBucket"]


def _default_burst(rate: float) -> float:
    """The burst for a limit of ``rate`` bytes/s (see the module docstring); 1 byte
    when unlimited, where no burst is ever drawn on."""
    return max(float(MAX_BLOCK), rate / 4) if rate else 1.0


class TokenBucket:
    """Allows ``rate`` bytes per second on average and ``burst`` bytes at once."""

    def __init__(self, rate: float | None, burst: float | None = None, now: float = 0.0) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._last = now
        self.set_rate(rate, burst, now)

    @property
    def unlimited(self) -> bool:
        return self._rate <= 0

    @property
    def rate(self) -> float | None:
        """Bytes per second, or ``None`` when unlimited."""
        return None if self.unlimited else self._rate

    def set_rate(self, rate: float | None, burst: float | None = None, now: float = 0.0) -> None:
        """Change the limit; ``burst`` defaults to a quarter second's worth (at least a block).

        Coming from unlimited, the bucket starts full; otherwise it keeps its tokens
        (or its debt), capped at the new burst.
        """
        if rate is not None and rate < 0:
            raise ValueError(f"negative rate {rate}")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be positive, got {burst}")
        self._refill(now)
        was_unlimited = self.unlimited
        self._rate = float(rate or 0.0)
        self._burst = float(burst) if burst is not None else _default_burst(self._rate)
        self._tokens = self._burst if was_unlimited else min(self._tokens, self._burst)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._last)  # a clock going backwards adds nothing
        self._last = max(self._last, now)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)

    def consume(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth of tokens; return seconds to wait before sending (0: now)."""
        if n < 0:
            raise ValueError(f"negative byte count {n}")
        if self.unlimited:
            return 0.0
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate
