"""DHT-only simulation: many real nodes, signed records, lookups measured under churn.

``run_dht_scenario`` is what ``dhtshare simulate --size 0`` runs:

1. start ``scenario.nodes`` DhtNodes on loopback, each on its own 127.x.y.1
   (``sim.network.loopback_host``). With ``scenario.procs`` > 1 the nodes are split
   over that many processes: this one (bootstrap node and lookup origins) and
   ``procs - 1`` workers (``dhtshare.sim.workers``) joining through it;
2. publish ``scenario.records`` signed peer records of fresh identities, each from a
   random node of this process;
3. for each churn level (0 first, increasing) stop random nodes, in every process,
   until that fraction of all nodes is stopped, then measure ``scenario.lookups``
   lookups of random published keys from random live nodes of this process.

Lookups run at most ``concurrency`` at a time (``scenario.extra["lookup_concurrency"]``,
default 12), so the latency measured is the network's, not the queue in front of one
event loop. Everything random comes from ``scenario.seed``: node ids, the signing
keys, who publishes, which nodes stop and which keys are looked up.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

from nacl.signing import SigningKey

from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtshareError
from dhtshare.identity import Identity
from dhtshare.records import PeerInfo, SignedRecord, sign_record
from dhtshare.sim.network import Network
from dhtshare.sim.scenario import Scenario
from dhtshare.sim.workers import WorkerPool, WorkerSpec, peak_rss_kb
from dhtshare.text import plural

__all__ = ["LookupReport", "measure_lookups", "run_dht_scenario"]

Target = tuple[bytes, bytes]  # (DHT key, signer whose record must come back)

DEFAULT_CONCURRENCY = 12
LOOKUP_TIMEOUT = 30.0  # a lookup still running after this counts as failed
PUBLISH_CONCURRENCY = 8
JOIN_TIMEOUT = 300.0  # seconds for every node to join (scenario.extra["join_timeout"])
JOIN_CONCURRENCY = 8  # more joins at once only queue up in the event loop and time out
RECORD_TTL = 6 * 3600


@dataclass(frozen=True, slots=True)
class LookupReport:
    """Lookups measured at one moment: how many found their record, how fast, how costly."""

    count: int
    success_rate: float
    p50_ms: float
    p95_ms: float
    rpcs_per_lookup: float  # median RPCs sent by one lookup

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Outcome:
    found: bool
    seconds: float
    rpcs: int | None  # None when the lookup timed out


async def measure_lookups(
    nodes: Sequence[DhtNode],
    targets: Sequence[Target],
    count: int,
    rng: random.Random,
    concurrency: int = DEFAULT_CONCURRENCY,
    within: float = LOOKUP_TIMEOUT,
) -> LookupReport:
    """``count`` lookups of random ``targets`` from random running ``nodes``.

    A lookup succeeds if the record signed by the expected signer comes back within
    ``within`` seconds. At most ``concurrency`` run at once; latency and RPCs are
    each lookup's own ``LookupStats``. The plan (who looks up what) is drawn from
    ``rng`` first.
    """
    return _report(await _run_lookups(nodes, targets, count, rng, concurrency, within))


async def _run_lookups(
    nodes: Sequence[DhtNode],
    targets: Sequence[Target],
    count: int,
    rng: random.Random,
    concurrency: int,
    within: float,
) -> list[_Outcome]:
    live = [n for n in nodes if n.running]
    if not live or not targets or count <= 0:
        return []
    plan = [(rng.choice(live), rng.choice(targets)) for _ in range(count)]
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(node: DhtNode, target: Target) -> _Outcome:
        async with gate:
            return await _lookup_once(node, target, within)

    return list(await asyncio.gather(*(one(node, target) for node, target in plan)))


async def _lookup_once(node: DhtNode, target: Target, within: float) -> _Outcome:
    key, signer = target
    started = time.monotonic()
    try:
        async with asyncio.timeout(within):
            records, stats = await node.lookup(key)
    except TimeoutError:
        return _Outcome(False, time.monotonic() - started, None)
    return _Outcome(any(r.signer == signer for r in records), stats.seconds, stats.rpcs)


def _report(outcomes: Sequence[_Outcome]) -> LookupReport:
    if not outcomes:
        return LookupReport(0, 0.0, 0.0, 0.0, 0.0)
    latencies = sorted(o.seconds * 1000 for o in outcomes)
    rpcs = sorted(o.rpcs for o in outcomes if o.rpcs is not None)
    found = sum(1 for o in outcomes if o.found)
    return LookupReport(
        count=len(outcomes),
        success_rate=round(found / len(outcomes), 4),
        p50_ms=round(_percentile(latencies, 0.5), 1),
        p95_ms=round(_percentile(latencies, 0.95), 1),
        rpcs_per_lookup=float(_percentile([float(r) for r in rpcs], 0.5)),
    )


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


# ---- the scenario ---------------------------------------------------------------------


def _quiet(_line: str) -> None:
    pass


async def run_dht_scenario(
    scenario: Scenario, log: Callable[[str], None] = _quiet
) -> dict[str, Any]:
    """Run a DHT-only scenario; the JSON-ready results (see the module docstring)."""
    rng = random.Random(scenario.seed)
    concurrency = int(scenario.extra.get("lookup_concurrency", DEFAULT_CONCURRENCY))
    local_count, shares = _split(scenario.nodes, scenario.procs)
    net = Network.build(local_count, ksize=scenario.ksize, alpha=scenario.alpha, rng=rng)
    worker_seeds = [rng.randrange(1 << 32) for _ in shares]
    join_timeout = float(scenario.extra.get("join_timeout", JOIN_TIMEOUT))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(net.stop_all)
        started = time.monotonic()
        await net.listen_all()
        pool = None
        if shares:
            specs = [
                WorkerSpec(
                    i + 1,
                    n,
                    net.bootstrap_address,
                    s,
                    ksize=scenario.ksize,
                    alpha=scenario.alpha,
                    join_concurrency=JOIN_CONCURRENCY,
                )
                for i, (n, s) in enumerate(zip(shares, worker_seeds, strict=True))
            ]
            pool = WorkerPool.spawn(specs, timeout=60.0)
            stack.push_async_callback(pool.shutdown)
        log(f"starting {scenario.nodes} DHT nodes in {1 + len(shares)} process(es)")
        async with asyncio.timeout(join_timeout):
            await net.join_all(JOIN_CONCURRENCY)
        if pool is not None:
            await pool.wait_ready(within=join_timeout + 30.0)
        startup = time.monotonic() - started
        log(f"{scenario.nodes} nodes joined in {startup:.1f} s")
        targets = await _publish(net.nodes, scenario.records, rng)
        log(f"published {plural(len(targets), 'record')}")
        by_churn: list[dict[str, Any]] = []
        everything: list[_Outcome] = []
        stopped = 0
        for level in scenario.levels:
            step = await _churn(net, pool, level, rng)
            stopped += step
            outcomes = await _run_lookups(
                net.nodes, targets, scenario.lookups, rng, concurrency, LOOKUP_TIMEOUT
            )
            everything += outcomes
            report = _report(outcomes)
            log(
                f"churn {level:.0%} ({stopped} of {scenario.nodes} nodes stopped, {step} in"
                f" this step): {report.success_rate:.1%} found,"
                f" p50 {report.p50_ms:.0f} ms, p95 {report.p95_ms:.0f} ms,"
                f" {report.rpcs_per_lookup:.0f} RPCs"
            )
            by_churn.append({"churn": level, **report.to_json()})
        rss = [peak_rss_kb()] + (await pool.peak_rss_kb() if pool is not None else [])
    return _result(scenario, startup, rss, _report(everything), by_churn)


def _split(nodes: int, procs: int) -> tuple[int, list[int]]:
    """Nodes in this process and in each worker: an even split over ``procs`` processes."""
    procs = max(1, min(procs, nodes // 2 or 1))
    base, extra = divmod(nodes, procs)
    counts = [base + (1 if i < extra else 0) for i in range(procs)]
    return counts[0], counts[1:]


async def _publish(nodes: Sequence[DhtNode], count: int, rng: random.Random) -> list[Target]:
    """Put ``count`` peer records of fresh identities, each from a random node."""
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)
    plan = [(rng.choice(nodes), Identity(SigningKey(rng.randbytes(32)))) for _ in range(count)]

    async def one(node: DhtNode, who: Identity) -> Target | None:
        rec = _peer_record(who, node)
        async with gate:
            try:
                await node.put(rec)
            except DhtshareError:
                return None
        return (rec.dht_key, who.public)

    published = await asyncio.gather(*(one(node, who) for node, who in plan))
    return [t for t in published if t is not None]


def _peer_record(who: Identity, node: DhtNode) -> SignedRecord:
    body = PeerInfo((node.address,))
    return sign_record(who, body, seq=1, now=node.clock(), ttl=RECORD_TTL)


async def _churn(net: Network, pool: WorkerPool | None, level: float, rng: random.Random) -> int:
    """Stop nodes in every process until ``level`` of each process's nodes is stopped."""
    seed = rng.randrange(1 << 32)
    stopped = len(net.stop_fraction(level, random.Random(seed), keep=1))
    if pool is not None:
        stopped += await pool.stop_fraction(level, seed)
    return stopped


def _result(
    scenario: Scenario,
    startup: float,
    rss: list[int],
    overall: LookupReport,
    by_churn: list[dict[str, Any]],
) -> dict[str, Any]:
    total_kb = sum(rss)
    return {
        "nodes": scenario.nodes,
        "procs": len(rss),
        "startup_s": round(startup, 2),
        "peak_rss_mb": round(total_kb / 1024, 1),
        "rss_per_node_kb": round(total_kb / max(1, scenario.nodes), 1),
        "lookups": {**overall.to_json(), "by_churn": by_churn},
    }
