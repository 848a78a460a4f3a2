"""``simulations/bench_transfer.py``'s command line and targets, on literal figures."""

from __future__ import annotations

from typing import Any

import pytest
from support.scripts import load_script

bench = load_script("bench_transfer")

MiB = 1 << 20


def row(name: str, mb_s: float, shares: list[float], limit: float | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "mb_s": mb_s,
        "seconds": 256 * MiB / mb_s / 1e6,
        "seeders": len(shares),
        "limit_mb_s": limit,
        "seeder_share": {f"s{i}": s for i, s in enumerate(shares)},
        "peak_rss_mb": 40.0,
    }


def test_size_is_mib_unless_it_has_a_suffix() -> None:
    assert bench.parse_args(["--size", "128"]).size == 128 * MiB
    assert bench.parse_args(["--size", "64M"]).size == 64 * MiB
    assert bench.parse_args(["--size", "512K"]).size == 512 * 1024
    assert bench.parse_args([]).size == 256 * MiB


def test_a_size_that_is_no_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--size", "lots"])
    assert exit_.value.code == 2
    assert "not a size" in capsys.readouterr().err


def test_d_is_bound_by_the_smaller_of_its_limits_and_a() -> None:
    a = row("a: 1 seeder", 300.0, [1.0])
    near = row("d: 4 seeders @ (a)/3 each", 271.0, [0.25, 0.25, 0.25, 0.25], limit=100.0)
    assert bench.limited_target(near, min(4 * 100.0, a["mb_s"])).met  # 271 >= 0.9 x 300
    slow = {**near, "mb_s": 269.0}
    assert not bench.limited_target(slow, min(4 * 100.0, a["mb_s"])).met
    lopsided = row("d: 4 seeders @ (a)/3 each", 290.0, [0.45, 0.30, 0.14, 0.11], limit=100.0)
    assert not bench.limited_target(lopsided, 300.0).met  # two seeders gave under 15 %


def test_targets_table() -> None:
    runs_a = [row("a: 1 seeder", 300.0, [1.0]), row("a: 1 seeder", 200.0, [1.0])]
    runs_b = [row("b: 4 seeders", 250.0, [0.25] * 4), row("b: 4 seeders", 200.0, [0.25] * 4)]
    pooled = bench.pooled_ratio(runs_a, runs_b)
    assert pooled == pytest.approx((1 / 300 + 1 / 200) / (1 / 250 + 1 / 200))  # 0.926
    c = row("c: 4 seeders @ 4 MB/s each", 14.5, [0.25] * 4, limit=4.0)
    d = row("d: 4 seeders @ (a)/3 each", 190.0, [0.25] * 4, limit=66.7)
    goals = bench.targets(2000.0, runs_a[1], c, d, pooled, [*runs_a, *runs_b, c, d])
    assert [t.met for t in goals] == [True, True, True, True, True]
    assert goals[3].name == "(d) >= 90% of 200.0 MB/s, each seeder >= 15%"
    slow_d = {**d, "mb_s": 179.0}
    big = {**c, "peak_rss_mb": 151.0}
    goals = bench.targets(4000.0, runs_a[1], c, slow_d, 0.89, [*runs_a, *runs_b, big, d])
    assert [t.met for t in goals] == [False, False, True, False, False]
