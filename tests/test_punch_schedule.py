"""The punch schedule and the upgrade backoff (reach/punch.py), with literal times."""

from __future__ import annotations

import pytest

from dhtshare.reach.punch import (
    ATTEMPTS,
    MAX_INTERVAL,
    MIN_INTERVAL,
    PunchSchedule,
    upgrade_delay,
)


def test_a_wan_round_trip_times_the_attempts() -> None:
    s = PunchSchedule(0.2)  # 200 ms: attempts 0.45 s apart
    assert s.interval == pytest.approx(0.45)
    start = s.dialer_start(100.0)
    assert start == pytest.approx(100.1)  # half a round trip after the sync
    assert PunchSchedule.listener_start(100.1) == 100.1  # the provider dials on reading it
    assert [round(s.attempt_start(start, k), 3) for k in range(ATTEMPTS)] == [
        100.1,
        100.55,
        101.0,
        101.45,
    ]
    assert s.attempt_deadline(start, 0) == pytest.approx(100.55)
    assert s.deadline(start) == pytest.approx(101.9)


def test_a_tiny_round_trip_keeps_the_least_interval() -> None:
    s = PunchSchedule(0.0002)
    assert s.interval == MIN_INTERVAL == 0.25
    assert s.deadline(10.0) == 11.0
    assert s.dialer_start(10.0) == pytest.approx(10.0001)


def test_a_long_round_trip_is_capped_or_not_worth_it() -> None:
    assert PunchSchedule(2.0).interval == MAX_INTERVAL == 3.0
    assert PunchSchedule(2.0).worth_trying
    assert not PunchSchedule(3.5).worth_trying


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not negative"):
        PunchSchedule(-0.1)
    with pytest.raises(ValueError, match="at least one"):
        PunchSchedule(0.1, attempts=0)
    with pytest.raises(ValueError, match="attempt 4 of 4"):
        PunchSchedule(0.1).attempt_start(0.0, ATTEMPTS)
    with pytest.raises(ValueError, match="not negative"):
        upgrade_delay(-1)


def test_upgrade_backoff_doubles_up_to_five_minutes() -> None:
    assert [upgrade_delay(n) for n in range(7)] == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert upgrade_delay(10_000) == 300.0
