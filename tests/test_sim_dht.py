"""The DHT-only simulation (dhtshare.sim.dhtsim): shape of results, seeding, worker processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from typing import Any

import pytest

from dhtshare.sim.dhtsim import LookupReport, _publish, measure_lookups, run_dht_scenario
from dhtshare.sim.network import Network
from dhtshare.sim.scenario import Scenario

pytestmark = pytest.mark.timeout(60)

REPORT_KEYS = {"count", "success_rate", "p50_ms", "p95_ms", "rpcs_per_lookup"}


def small(**kw: Any) -> Scenario:
    base: dict[str, Any] = {
        "name": "t",
        "nodes": 40,
        "size": 0,
        "churn_levels": (0.3,),
        "lookups": 30,
        "records": 10,
        "seed": 7,
    }
    return Scenario(**(base | kw))


def check_report(report: dict[str, Any], count: int) -> None:
    assert set(report) >= REPORT_KEYS
    assert report["count"] == count
    assert 0.0 <= report["success_rate"] <= 1.0
    assert 0 < report["p50_ms"] <= report["p95_ms"] < 30_000
    assert 0 < report["rpcs_per_lookup"] <= 60


async def test_small_scenario_has_the_documented_shape() -> None:
    result = await run_dht_scenario(small())
    assert result["nodes"] == 40 and result["procs"] == 1
    assert 0 < result["startup_s"] < 20
    assert result["peak_rss_mb"] > 0 and result["rss_per_node_kb"] > 0
    lookups = result["lookups"]
    check_report(lookups, 60)
    levels = lookups["by_churn"]
    assert [b["churn"] for b in levels] == [0.0, 0.3]
    for level in levels:
        check_report(level, 30)
    assert levels[0]["success_rate"] == 1.0
    assert levels[1]["success_rate"] >= 0.9


async def test_same_seed_same_stop_sets_and_targets() -> None:
    async def plan(seed: int) -> tuple[list[bytes], list[int], list[bytes]]:
        rng = random.Random(seed)
        net = Network.build(16, rng=rng)
        try:
            await net.listen_all()
            await net.join_all(8)
            targets = await _publish(net.nodes, 4, rng)
            stopped = net.stop_fraction(0.25, random.Random(rng.randrange(1 << 32)), keep=1)
            return [n.node.id for n in net.nodes], stopped, [key for key, _ in targets]
        finally:
            await net.stop_all()

    first, again, other = await plan(3), await plan(3), await plan(4)
    assert first == again
    assert first != other
    ids, stopped, _keys = first
    assert len(stopped) == 4 and 0 not in stopped  # 25% of 16, never the bootstrap node
    assert len(set(ids)) == 16


async def test_stop_fraction_is_cumulative_and_spares_the_bootstrap() -> None:
    async with Network.start(10) as net:
        rng = random.Random(1)
        assert len(net.stop_fraction(0.2, rng, keep=1)) == 2
        assert len(net.stop_fraction(0.5, rng, keep=1)) == 3
        assert len(net.stop_fraction(0.5, rng, keep=1)) == 0
        assert net.nodes[0].running and len(net.live) == 5


async def test_measure_lookups_reports_each_lookups_own_stats() -> None:
    async with Network.start(12) as net:
        rng = random.Random(2)
        targets = await _publish(net.nodes, 3, rng)
        report = await measure_lookups(net.nodes, targets, 20, rng, concurrency=4)
        assert isinstance(report, LookupReport)
        assert report.count == 20 and report.success_rate == 1.0
        assert report.rpcs_per_lookup >= 1
        assert report.rpcs_per_lookup <= 11  # at most every other node
        missing = [(bytes(20), bytes(32))]
        assert (await measure_lookups(net.nodes, missing, 5, rng)).success_rate == 0.0


async def test_two_processes_run_and_tear_down_cleanly() -> None:
    before = set(multiprocessing.active_children())
    result = await run_dht_scenario(small(nodes=30, procs=2, lookups=20, records=6))
    assert result["procs"] == 2 and result["nodes"] == 30
    levels = result["lookups"]["by_churn"]
    assert [b["count"] for b in levels] == [20, 20]
    assert levels[0]["success_rate"] == 1.0
    await asyncio.sleep(0)
    assert set(multiprocessing.active_children()) == before
