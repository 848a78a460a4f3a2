"""The token bucket (transfer/ratelimit.py), with literal times."""

from __future__ import annotations

import pytest

from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.wire import MAX_BLOCK


@pytest.mark.parametrize("rate", [None, 0])
def test_unlimited(rate: float | None) -> None:
    bucket = TokenBucket(rate)
    assert bucket.unlimited
    assert bucket.rate is None
    assert bucket.consume(10**12, now=0.0) == 0.0
    assert bucket.consume(10**12, now=0.0) == 0.0


def test_burst_then_wait() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    assert bucket.consume(500, now=0.0) == 0.0
    assert bucket.consume(250, now=0.0) == pytest.approx(0.25)
    # 0.25 s later the debt is paid; another 100 bytes wait 0.1 s
    assert bucket.consume(100, now=0.25) == pytest.approx(0.1)


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(1000, burst=500, now=0.0)
    bucket.consume(500, now=0.0)
    assert bucket.consume(500, now=100.0) == 0.0  # long idle refills only to burst
    assert bucket.consume(1, now=100.0) == pytest.approx(0.001)


def test_request_larger_than_burst_waits_proportionally() -> None:
    bucket = TokenBucket(100, burst=100, now=0.0)
    assert bucket.consume(1100, now=0.0) == pytest.approx(10.0)


def test_average_rate_over_time() -> None:
    bucket = TokenBucket(1000, burst=1000, now=0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.consume(200, now)
    # 20 000 bytes at 1000 B/s with a 1000-byte head start: 19 s
    assert now == pytest.approx(19.0)


def test_clock_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(10, burst=10, now=5.0)
    bucket.consume(10, now=5.0)
    assert bucket.consume(10, now=1.0) == pytest.approx(1.0)


def test_default_burst_is_a_quarter_second() -> None:
    rate = 40 * MAX_BLOCK
    bucket = TokenBucket(rate, now=0.0)
    assert bucket.consume(10 * MAX_BLOCK, now=0.0) == 0.0
    assert bucket.consume(4 * MAX_BLOCK, now=0.0) == pytest.approx(0.1)


def test_default_burst_is_at_least_one_block() -> None:
    bucket = TokenBucket(300, now=0.0)
    assert bucket.consume(MAX_BLOCK, now=0.0) == 0.0
    assert bucket.consume(30, now=0.0) == pytest.approx(0.1)


def test_default_burst_follows_a_new_rate() -> None:
    bucket = TokenBucket(None, now=0.0)
    bucket.set_rate(40 * MAX_BLOCK, now=0.0)
    assert bucket.consume(10 * MAX_BLOCK, now=0.0) == 0.0
    assert bucket.consume(4 * MAX_BLOCK, now=0.0) == pytest.approx(0.1)


def test_set_rate() -> None:
    bucket = TokenBucket(None, now=0.0)
    bucket.set_rate(100, burst=100, now=1.0)
    assert bucket.rate == 100
    assert bucket.consume(100, now=1.0) == 0.0  # starts full after unlimited
    assert bucket.consume(100, now=1.0) == pytest.approx(1.0)
    bucket.set_rate(50, burst=50, now=1.0)  # keeps its debt
    assert bucket.consume(0, now=1.0) == pytest.approx(2.0)
    bucket.set_rate(None, now=1.0)
    assert bucket.consume(10**9, now=1.0) == 0.0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="negative rate"):
        TokenBucket(-1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, burst=0)
    with pytest.raises(ValueError, match="negative byte"):
        TokenBucket(10).consume(-1, now=0.0)
