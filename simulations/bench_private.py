"""Private groups (issue 17): the three performance targets, measured (not a test).

    python simulations/bench_private.py [--nodes 1000] [--procs 2] [--lookups 200]
        [--members 2000] [--readers 1] [--trials 5] [--before OLD_TREE [--rounds 4]]
        [--only lookups rekey invite] [--json]
    python simulations/bench_private.py --quick      # a small smoke run, a few seconds

Everything runs on real nodes on 127.0.0.1 (``dhtshare.sim.Network``: real UDP, each
node on its own loopback address), and prints one table per part and a table of targets.

1. **Lookups.** ``--nodes`` DHT nodes (``--procs`` processes, as ``dhtshare simulate``
   spreads them; lookups start from nodes of this process). ``--records`` file entries,
   one per group, each put three ways: plain (the signed ``FileEntry``, ``DhtNode.put``),
   sealed into its group's epoch 0 (``secrets.seal``), and sealed into epoch 1 (where a
   re-key moves it). Then ``--lookups`` lookups each way of the same records from the same
   nodes, interleaved in one queue (each way going first in turn; ``--concurrency`` in
   flight) so every way sees the same load: plain is ``DhtNode.lookup``, sealed is
   ``SealedDht.get`` (which finds, opens and verifies) with epoch 0 held, and "after a
   re-key" is the same with epochs 1 and 0 held (members read both: two lookups at once).
   Latency is each call's wall time. Target: sealed p50 at most 10 % above plain.
2. **Re-key.** An owner's ``GroupService`` on a ``--rekey-nodes`` network with a roster of
   ``--members`` members (real identities; the roster is laid out and published directly,
   not through join flows), then ``GroupService.remove`` of one random member, timed: epoch
   pages for everyone left, the roster and its pages, the reseal. Target: under 10 s. Then
   ``--sample`` random remaining members, plus the first and last by key, each with a
   ``GroupService`` holding only the old epoch secret, call ``catch_up`` and
   ``fetch_roster`` (``--readers`` members at a time; a member that fails tries once more,
   as its next maintenance round would) and must get the new roster; the removed member
   must not.
3. **Invite to first piece.** Real ``Node``s (as ``dhtshare simulate`` starts them) on a
   small DHT: the owner shares a ``--file-size`` file; a new node joins by the invite
   (``request_join``), the owner lists requests and accepts, the new member polls
   ``status`` until accepted, lists files and starts the download; timed to the first
   verified piece, ``--trials`` times with a new node each; the DHT lookups and puts both
   nodes made in each step are counted. With ``--before OLD_TREE`` this part runs in
   subprocesses, ``--rounds`` times on this code and on an older checkout
   (``PYTHONPATH=OLD_TREE``; before issue 17 a join named the group id, not an invite),
   taking turns. Target: no slower.

An editable install of dhtshare wins over ``PYTHONPATH``; to measure another checkout, use
an interpreter without it (a venv whose ``.pth`` names the project venv's site-packages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dhtshare
from dhtshare.dht.server import DhtNode, LookupStats
from dhtshare.groups.service import GroupService, GroupState
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import FileEntry, Member, SignedRecord, sign_record
from dhtshare.sim.network import Network, loopback_host
from dhtshare.sim.workers import WorkerPool, WorkerSpec

PARTS = ("lookups", "rekey", "invite")
AFTER = "sealed, after a re-key"  # the record in epoch 1; members read epochs 1 and 0
WAYS = ("plain", "sealed", AFTER)
LOOKUP_TARGET = 0.10  # sealed p50 at most 10 % above plain
REKEY_TARGET = 10.0  # seconds
JOIN_CONCURRENCY = 8
STEP_TIMEOUT = 60.0  # any one step of part 3 (a poll until it happens)


# ---- numbers ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """Columns two spaces apart; ``align`` has one ``l`` or ``r`` per column (default: the
    first left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        padded = [
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def code_version() -> str:
    """Where ``dhtshare`` was imported from, and its git revision when it has one."""
    where = Path(dhtshare.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "no git"
    return f"{where} ({rev})"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- part 1: lookups, plain and sealed -----------------------------------------------------


class TimedDht:
    """A ``DhtNode`` as ``SealedDht`` sees it, keeping each lookup's stats."""

    def __init__(self, node: DhtNode) -> None:
        self.node = node
        self.stats: list[LookupStats] = []

    async def get(self, key: bytes) -> list[SignedRecord]:
        records, stats = await self.node.lookup(key)
        self.stats.append(stats)
        return records

    async def put(self, record: SignedRecord) -> int:
        return await self.node.put(record)

    async def publish(self, record: SignedRecord, renew: Any = None) -> int:
        return await self.node.publish(record, renew)

    def withdraw(self, key: bytes, slot: bytes) -> None:
        self.node.withdraw(key, slot)


@dataclass(frozen=True)
class Entry:
    """One file entry of one group: plain, sealed into the group's epoch 0, and sealed into
    its epoch 1 (as a re-key moves it; members then read epochs 1 and 0)."""

    group_id: bytes
    secrets: tuple[bytes, bytes]
    plain: SignedRecord
    sealed: SignedRecord
    moved: SignedRecord


@dataclass
class Sample:
    way: str
    seconds: float
    found: bool
    rpcs: int


def make_entries(count: int, rng: random.Random, now: float) -> list[Entry]:
    from dhtshare.content import piece_size_for
    from dhtshare.groups.secrets import epoch_space, seal

    sharers = [Identity.generate(f"sharer{i}") for i in range(min(count, 20))]
    out = []
    for i in range(count):
        gid, size = rng.randbytes(32), rng.randrange(1, 1 << 30)
        old, new = rng.randbytes(32), rng.randbytes(32)
        name = f"holiday-{i:04d}-{rng.randrange(10**6)}.mkv"
        body = FileEntry(gid, rng.randbytes(32), name, size, piece_size_for(size))
        author = sharers[i % len(sharers)]
        plain = sign_record(author, body, seq=1, now=now, ttl=6 * 3600)
        sealed = seal(epoch_space(old), plain, author=author, seq=1, now=now)
        moved = seal(epoch_space(new), plain, author=author, seq=2, now=now)
        out.append(Entry(gid, (old, new), plain, sealed, moved))
    return out


async def put_all(nodes: Sequence[DhtNode], entries: list[Entry], rng: random.Random) -> int:
    """Each entry, its three ways, put from one random node; how many puts failed."""
    gate = asyncio.Semaphore(8)
    failed = 0

    async def put(node: DhtNode, rec: SignedRecord) -> None:
        nonlocal failed
        async with gate:
            try:
                await node.put(rec)
            except dhtshare.DhtshareError:
                failed += 1

    plan = [(rng.choice(nodes), e) for e in entries]
    await asyncio.gather(*(put(n, r) for n, e in plan for r in (e.plain, e.sealed, e.moved)))
    return failed


async def start_dht(
    nodes: int, procs: int, rng: random.Random
) -> tuple[Network, WorkerPool | None, float]:
    """``nodes`` DHT nodes over ``procs`` processes (this one first); and the join time."""
    procs = max(1, min(procs, nodes // 2 or 1))
    share, extra = divmod(nodes, procs)
    counts = [share + (1 if i < extra else 0) for i in range(procs)]
    net = Network.build(counts[0], rng=rng)
    started = time.monotonic()
    await net.listen_all()
    pool = None
    if procs > 1:
        specs = [
            WorkerSpec(i, n, net.bootstrap_address, rng.randrange(1 << 32), join_timeout=600.0)
            for i, n in enumerate(counts[1:], start=1)
        ]
        pool = WorkerPool.spawn(specs, timeout=60.0)
    try:
        async with asyncio.timeout(600.0):
            await net.join_all(JOIN_CONCURRENCY)
        if pool is not None:
            await pool.wait_ready(within=630.0)
    except BaseException:
        if pool is not None:
            await pool.shutdown()
        await net.stop_all()
        raise
    return net, pool, time.monotonic() - started


async def lookups(opts: argparse.Namespace) -> dict[str, Any]:
    from dhtshare.groups.keyring import GroupKeys
    from dhtshare.groups.sealeddht import SealedDht

    rng = random.Random(opts.seed)
    log(f"lookups: starting {opts.nodes} DHT nodes in {opts.procs} process(es) ...")
    net, pool, joined = await start_dht(opts.nodes, opts.procs, rng)
    try:
        log(f"lookups: {opts.nodes} nodes joined in {joined:.1f} s; putting records ...")
        entries = make_entries(opts.records, rng, time.time())
        failed = await put_all(net.nodes, entries, rng)
        ring = {e.group_id: GroupKeys(0, {0: e.secrets[0]}) for e in entries}
        # a re-key just now: within ``keyring.GRACE`` members read both epochs
        ring_after = {
            e.group_id: GroupKeys(1, dict(enumerate(e.secrets)), changed_at=time.time())
            for e in entries
        }
        reader = Identity.generate("reader")
        gate = asyncio.Semaphore(opts.concurrency)

        async def plain(node: DhtNode, e: Entry) -> Sample:
            async with gate:
                t = time.perf_counter()
                records, stats = await node.lookup(e.plain.dht_key)
                took = time.perf_counter() - t
            return Sample("plain", took, e.plain in records, stats.rpcs)

        async def sealed(node: DhtNode, e: Entry, way: str = "sealed") -> Sample:
            dht = TimedDht(node)
            view = SealedDht(dht, ring if way == "sealed" else ring_after, reader)
            async with gate:
                t = time.perf_counter()
                records = await view.get(e.group_id, e.plain.dht_key)
                took = time.perf_counter() - t
            return Sample(way, took, e.plain in records, sum(s.rpcs for s in dht.stats))

        plan = [(rng.choice(net.nodes), rng.choice(entries)) for _ in range(opts.lookups)]
        calls: list[Awaitable[Sample]] = []
        for i, (node, e) in enumerate(plan):  # the same load each way: take turns going first
            three = [plain(node, e), sealed(node, e), sealed(node, e, AFTER)]
            calls += three[i % 3 :] + three[: i % 3]
        log(f"lookups: {len(calls)} lookups, {opts.concurrency} in flight ...")
        samples = await asyncio.gather(*calls)
    finally:
        if pool is not None:
            await pool.shutdown()
        await net.stop_all()
    return {
        "nodes": opts.nodes,
        "procs": opts.procs,
        "join_s": round(joined, 1),
        "records": len(entries),
        "put_failed": failed,
        "concurrency": opts.concurrency,
        "ways": {way: summary([s for s in samples if s.way == way]) for way in WAYS},
        "open_us": open_cost(entries),
    }


def summary(samples: list[Sample]) -> dict[str, Any]:
    seconds = [s.seconds for s in samples]
    return {
        "count": len(samples),
        "found": sum(s.found for s in samples),
        "p50_ms": round(1000 * percentile(seconds, 0.5), 1),
        "p90_ms": round(1000 * percentile(seconds, 0.9), 1),
        "mean_ms": round(1000 * statistics.fmean(seconds), 1) if seconds else 0.0,
        "rpcs_p50": percentile([float(s.rpcs) for s in samples], 0.5),
    }


def open_cost(entries: list[Entry]) -> dict[str, float]:
    """CPU per record on the reading side, in µs: decode and verify the plain record, and
    decode, verify, open and verify the sealed one (what a lookup adds per record)."""
    from dhtshare.groups.secrets import epoch_space, open_sealed
    from dhtshare.records import decode_record, verify_record

    now, reps = time.time(), max(1, 2000 // max(1, len(entries)))
    raws = [(e, e.plain.encode(), e.sealed.encode()) for e in entries] * reps
    t = time.perf_counter()
    for _e, raw, _s in raws:
        verify_record(decode_record(raw), now)
    plain = time.perf_counter() - t
    spaces = {e.group_id: epoch_space(e.secrets[0]) for e in entries}
    t = time.perf_counter()
    for e, _r, raw in raws:
        outer = decode_record(raw)
        verify_record(outer, now)
        open_sealed(spaces[e.group_id], outer, e.plain.dht_key, now)
    sealed = time.perf_counter() - t
    return {"plain": 1e6 * plain / len(raws), "sealed": 1e6 * sealed / len(raws)}


def show_lookups(r: dict[str, Any]) -> str:
    ways, p = r["ways"], r["ways"]["plain"]
    rows: list[Sequence[object]] = [
        [way, f"{w['found']}/{w['count']}", w["p50_ms"], w["p90_ms"], w["mean_ms"], w["rpcs_p50"]]
        for way, w in ways.items()
    ]
    for way in WAYS[1:]:
        w = ways[way]
        rows.append(
            [
                f"{way} vs plain",
                "",
                pct(w["p50_ms"], p["p50_ms"]),
                pct(w["p90_ms"], p["p90_ms"]),
                pct(w["mean_ms"], p["mean_ms"]),
                "",
            ]
        )
    head = (
        f"1. lookups at {r['nodes']:,} DHT nodes ({r['procs']} process(es), joined in"
        f" {r['join_s']} s), {r['records']} file entries in {r['records']} groups"
        f" ({r['put_failed']} puts failed), {r['concurrency']} lookups in flight"
    )
    cpu = r["open_us"]
    foot = (
        f"   reading one record costs {cpu['plain']:.0f} µs plain, {cpu['sealed']:.0f} µs"
        " sealed (decode, verify, open, verify the inner record)"
    )
    return "\n".join(
        [head, table(["way", "found", "p50 ms", "p90 ms", "mean ms", "RPCs"], rows), foot]
    )


def pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f} %" if old else "-"


# ---- part 2: re-key of a big group --------------------------------------------------------


class CountingDht(TimedDht):
    """Counts what reaches the DHT node (sealed records stored, lookups)."""

    def __init__(self, node: DhtNode) -> None:
        super().__init__(node)
        self.counts: Counter[str] = Counter()

    async def get(self, key: bytes) -> list[SignedRecord]:
        self.counts["lookups"] += 1
        return await super().get(key)

    async def put(self, record: SignedRecord) -> int:
        self.counts["records stored"] += 1
        return await super().put(record)

    async def publish(self, record: SignedRecord, renew: Any = None) -> int:
        self.counts["records stored"] += 1
        return await super().publish(record, renew)


def counting_sealed(node: DhtNode, owner: Identity) -> Any:
    """A ``SealedDht`` that counts publications by inner kind and times ``reseal``."""
    from dhtshare.groups.sealeddht import SealedDht

    class Counting(SealedDht):
        def __init__(self, dht: CountingDht) -> None:
            super().__init__(dht, {}, owner)
            self.counts = dht.counts
            self.reseal_s = 0.0

        async def publish(
            self, where: Any, record: SignedRecord, renew: Any = None, *, to_owner: Any = None
        ) -> int:
            self.counts[f"publish {record.kind.name.lower()}"] += 1
            return await super().publish(where, record, renew, to_owner=to_owner)

        async def reseal(self, group_id: bytes) -> int:
            t = time.perf_counter()
            moved = await super().reseal(group_id)
            self.counts["resealed"] += moved
            self.reseal_s += time.perf_counter() - t
            return moved

    return Counting(CountingDht(node))


async def big_roster(so: GroupService, size: int, now: float) -> tuple[bytes, list[Identity]]:
    """A group owned by ``so`` with ``size`` members (the owner and ``size - 1`` others)."""
    gid = await so.create("big group")
    draft = so.state.drafts[gid]
    people = [Identity.generate(f"member{i}") for i in range(size - 1)]
    members = draft.members + tuple(Member(p.public, p.name, int(now)) for p in people)
    await so._publish_roster(draft.roster, members, draft.seq + 1)
    return gid, people


def reader(node: DhtNode, who: Identity, gid: bytes, name: str, keys: Any) -> GroupService:
    """A member's service holding only what the owner's keyring held before the removal."""
    from dhtshare.groups.keyring import GroupKeys

    mine = GroupKeys(keys.epoch, dict(keys.secrets))  # no invite, no replies
    return GroupService(node, who, GroupState(groups={gid: name}, keys={gid: mine}))


async def rekey(opts: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(opts.seed + 1)
    owner = Identity.generate("owner")
    async with Network.start(opts.rekey_nodes, join_timeout=300.0) as net:
        sealed = counting_sealed(net.nodes[1], owner)
        so = GroupService(sealed, owner)
        t = time.perf_counter()
        gid, people = await big_roster(so, opts.members, time.time())
        setup = time.perf_counter() - t
        log(f"rekey: {opts.members}-member roster published in {setup:.1f} s")
        keys = so.state.keys[gid]
        before = reader(net.nodes[2], owner, gid, "big group", keys).state.keys[gid]
        victim = rng.choice(people)
        gone = reader(net.nodes[3], victim, gid, "big group", before)
        await gone.fetch_roster(gid)  # the removed member knew the group
        sealed.counts.clear()
        t = time.perf_counter()
        view = await so.remove(gid, victim.public)
        took = time.perf_counter() - t
        counts, reseal_s = dict(sealed.counts), sealed.reseal_s
        log(f"rekey: remove took {took:.2f} s; {len(people)} members read the new epoch ...")
        left = sorted((p for p in people if p is not victim), key=lambda p: p.public)
        middle = rng.sample(left[1:-1], min(opts.sample, max(0, len(left) - 2)))
        sample = [left[0], *middle, left[-1]] if len(left) > 1 else left
        got = await read_new_epoch(
            net, sample, gid, before, view.seq, len(view.members), opts.readers
        )
        removed = await removed_view(gone, gid)
    return {
        "nodes": opts.rekey_nodes,
        "members": opts.members,
        "setup_s": round(setup, 2),
        "remove_s": round(took, 2),
        "reseal_s": round(reseal_s, 2),
        "after": len(view.members),
        "seq": view.seq,
        "counts": counts,
        "epoch_pages": math.ceil((len(view.members) - 1) / 80),
        **got,
        "removed": removed,
    }


async def read_new_epoch(
    net: Network, sample: list[Identity], gid: bytes, keys: Any, seq: int, size: int, at_once: int
) -> dict[str, Any]:
    """Each of ``sample`` catches up from the old epoch and reads the new roster, ``at_once``
    of them at a time."""
    gate = asyncio.Semaphore(at_once)

    async def attempt(s: GroupService) -> tuple[bool, float, str]:
        t = time.perf_counter()
        try:
            moved = await s.catch_up(gid)
            view = await s.fetch_roster(gid)
        except dhtshare.DhtshareError as exc:
            return False, time.perf_counter() - t, str(exc)
        took = time.perf_counter() - t
        ok = s.state.keys[gid].epoch == keys.epoch + 1 and view.seq == seq
        ok = ok and len(view.members) == size
        return ok, took, "" if ok else f"moved {moved} epochs, read seq {view.seq}"

    async def one(i: int, who: Identity) -> list[tuple[bool, float, str]]:
        s = reader(net.nodes[i % len(net.nodes)], who, gid, "big group", keys)
        async with gate:
            tries = [await attempt(s)]
            if not tries[0][0]:  # what the next maintenance round would do
                tries.append(await attempt(s))
        return tries

    results = await asyncio.gather(*(one(i, w) for i, w in enumerate(sample)))
    times = [r[0][1] for r in results]
    return {
        "sample": len(sample),
        "readers": at_once,
        "read_ok": sum(r[0][0] for r in results),
        "read_ok_retry": sum(r[-1][0] for r in results),
        "read_p50_s": round(percentile(times, 0.5), 2),
        "read_max_s": round(max(times, default=0.0), 2),
        "errors": sorted({e for r in results for _ok, _t, e in r if e})[:3],
    }


async def removed_view(gone: GroupService, gid: bytes) -> dict[str, Any]:
    """What the removed member's service learns from the same calls."""
    moved = await gone.catch_up(gid)
    keys = gone.state.keys[gid]
    try:
        seen = (await gone.fetch_roster(gid)).seq
    except dhtshare.DhtshareError:
        seen = 0
    return {"moved": moved, "epoch": keys.epoch, "flagged_removed": keys.removed, "seq": seen}


def show_rekey(r: dict[str, Any]) -> str:
    c = r["counts"]
    rows = [
        ["publish the roster (setup, not timed)", f"{r['setup_s']:.2f} s"],
        [f"remove one member (target < {REKEY_TARGET:.0f} s)", f"{r['remove_s']:.2f} s"],
        ["  of which reseal (moving the owner's records)", f"{r['reseal_s']:.2f} s"],
        ["  epoch pages published", c.get("publish epoch", 0)],
        ["  roster pages published", c.get("publish roster_page", 0)],
        ["  rosters published", c.get("publish roster", 0)],
        ["  records moved by reseal", c.get("resealed", 0)],
        ["  sealed records stored in all", c.get("records stored", 0)],
        ["  lookups", c.get("lookups", 0)],
        ["members after, roster seq", f"{r['after']:,}, seq {r['seq']}"],
        [
            f"sample that caught up and read it ({r['readers']} at a time)",
            f"{r['read_ok']}/{r['sample']} (p50 {r['read_p50_s']} s, max {r['read_max_s']} s)",
        ],
        *([["  what the others got", "; ".join(r["errors"])]] if r["errors"] else []),
        ["  read after one more try", f"{r['read_ok_retry']}/{r['sample']}"],
        [
            "removed member",
            "moved {moved} epochs, at epoch {epoch}, removed flag {flagged_removed},"
            " newest roster it reads: seq {seq}".format(**r["removed"]),
        ],
    ]
    head = f"2. re-key of a {r['members']:,}-member group on {r['nodes']} DHT nodes (one process)"
    return "\n".join([head, table(["step", "result"], rows, "ll")])


# ---- part 3: invite to first piece -------------------------------------------------------


async def until(what: str, check: Callable[[], Awaitable[Any]], every: float = 0.05) -> Any:
    """Call ``check`` until it returns something true (for ``STEP_TIMEOUT`` at most)."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(every)
    raise TimeoutError(f"{what}: nothing within {STEP_TIMEOUT:.0f} s")


async def one_join(
    owner: Node, joiner: Node, gid: bytes, invite: Any, cid: bytes, out: Path
) -> dict[str, dict[str, float]]:
    """Invite to first piece for one new node: at the end of each step, the seconds since
    the start and the DHT lookups and puts both nodes made since (maintenance included)."""
    me, t0 = joiner.identity.public, time.perf_counter()
    marks: dict[str, dict[str, float]] = {"seconds": {}, "lookups": {}, "puts": {}}

    def ops(kind: str) -> int:
        return owner.dht.stats[kind] + joiner.dht.stats[kind]

    first = {"lookups": ops("lookup"), "puts": ops("put")}

    def mark(step: str) -> None:
        marks["seconds"][step] = time.perf_counter() - t0
        marks["lookups"][step] = ops("lookup") - first["lookups"]
        marks["puts"][step] = ops("put") - first["puts"]

    await joiner.groups.request_join(invite, "let me in")
    mark("join request published")

    async def asked() -> bool:
        return any(p.requester == me for p in await owner.groups.requests(gid))

    await until("the owner sees the request", asked)
    await owner.groups.accept(gid, me)
    mark("owner sees it, accepts")

    async def accepted() -> bool:
        return (await joiner.groups.status(gid))[0] == "accepted"

    await until("the member learns it is accepted", accepted)
    mark("member learns it is accepted")

    async def listed() -> Any:
        files = await joiner.files.list_files(gid, joiner.groups.is_member)
        return next((f.entry for f in files if f.entry.content_id == cid), None)

    entry = await until("the member lists the file", listed)
    mark("member lists the file")
    handle = await joiner.downloads.start(gid, entry, out)

    async def arrived() -> bool:
        status = handle.status()
        if status.state == "failed":
            raise RuntimeError(f"download failed: {getattr(status, 'error', '')}")
        return bool(status.bytes_done > 0)

    await until("the first piece arrives", arrived, every=0.002)
    mark("first piece")
    await until("the download completes", lambda: _done(handle))
    mark("rest of the file (not in the total)")
    return marks


async def _done(handle: Any) -> bool:
    return handle.task is not None and handle.task.done()


def node_config(tmp: Path, name: str, index: int, bootstrap: Any) -> NodeConfig:
    return NodeConfig(
        home=tmp / name,
        host=loopback_host(index),
        bootstrap=(bootstrap,),
        identity=Identity.generate(name),
        control=False,
    )


async def invite(opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-private-") as name:
        tmp = Path(name)
        source = tmp / "shared.bin"
        source.write_bytes(random.Random(opts.seed).randbytes(opts.file_size))
        async with Network.start(opts.invite_nodes) as net:
            n = opts.invite_nodes
            configs = [
                node_config(tmp, nm, n + i, net.bootstrap_address)
                for i, nm in enumerate(["owner"] + [f"joiner{j}" for j in range(opts.trials)])
            ]
            nodes = list(await asyncio.gather(*(Node.start(c) for c in configs)))
            try:
                owner = nodes[0]
                gid = await owner.groups.create("bench group")
                has_invites = hasattr(owner.groups, "read_invite")
                token = await owner.groups.invite(gid) if has_invites else gid
                shared = await owner.share(gid, source)
                runs = []
                for j, joiner in enumerate(nodes[1:]):
                    out = tmp / f"out{j}"
                    runs.append(await one_join(owner, joiner, gid, token, shared.content_id, out))
                    took = runs[-1]["seconds"]["first piece"]
                    log(f"invite: trial {j + 1}: first piece at {took:.2f} s")
            finally:
                await asyncio.gather(*(nd.close() for nd in nodes))
    return {
        "code": code_version(),
        "by": "invite" if has_invites else "group id",
        "nodes": opts.invite_nodes,
        "trials": runs,
        "file_size": opts.file_size,
    }


def steps(run: dict[str, Any], what: str = "seconds") -> dict[str, float]:
    """Median over trials of each step's own share of ``what`` (seconds, lookups, puts)."""
    names = list(run["trials"][0][what])
    out = {}
    for i, step in enumerate(names):
        prev = names[i - 1] if i else None
        out[step] = statistics.median(
            t[what][step] - (t[what][prev] if prev else 0) for t in run["trials"]
        )
    return out


def first_pieces(run: dict[str, Any]) -> list[float]:
    return [float(t["seconds"]["first piece"]) for t in run["trials"]]


def first_piece(run: dict[str, Any]) -> float:
    return float(statistics.median(first_pieces(run)))


def show_invite(now: dict[str, Any], before: dict[str, Any] | None) -> str:
    runs = [("now", now)] + ([("before", before)] if before else [])
    cols = {label: steps(r) for label, r in runs}
    looks = {label: steps(r, "lookups") for label, r in runs}
    puts = {label: steps(r, "puts") for label, r in runs}
    rows: list[Sequence[object]] = [
        [
            step,
            *(ms(cols[label][step]) for label, _r in runs),
            *(f"{looks[label][step]:g} / {puts[label][step]:g}" for label, _r in runs),
        ]
        for step in cols["now"]
    ]
    rows.append(
        ["invite to first piece (median)", *(ms(first_piece(r)) for _label, r in runs)]
        + [""] * len(runs)
    )
    for name, q in (("p10", 0.1), ("p90", 0.9)):
        rows.append(
            [f"  {name}", *(ms(percentile(first_pieces(r), q)) for _label, r in runs)]
            + [""] * len(runs)
        )
    head = (
        f"3. invite to first piece: {len(now['trials'])} trials, a new node each, owner sharing"
        f" {now['file_size'] // 1024:,} KiB, {now['nodes']} DHT-only nodes; ms per step"
        " (median)"
    )
    header = ["step", *(f"{label} ms" for label, _r in runs)]
    header += [f"{label} lookups / puts" for label, _r in runs]
    lines = [head, table(header, rows)]
    lines += [f"   {label}: {r['code']} (joins by {r['by']})" for label, r in runs]
    return "\n".join(lines)


def compare(opts: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Part 3 on this code and on ``opts.before``, each in ``opts.rounds`` subprocesses,
    taking turns (so a change in the machine's load falls on both); the trials pooled."""
    here = str(Path(dhtshare.__file__).resolve().parents[1])
    runs: dict[str, list[dict[str, Any]]] = {here: [], opts.before: []}
    for i in range(opts.rounds):
        order = [here, opts.before] if i % 2 == 0 else [opts.before, here]
        for tree in order:
            log(f"invite: round {i + 1} of {opts.rounds} on {tree} ...")
            runs[tree].append(run_tree(tree, opts))
    now, before = ({**r[0], "trials": [t for x in r for t in x["trials"]]} for r in runs.values())
    log(
        f"invite: first piece, median of {len(now['trials'])}: {first_piece(now):.3f} s now,"
        f" {first_piece(before):.3f} s before"
    )
    return now, before


def run_tree(tree: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Part 3 on the code in ``tree``, in a subprocess; its JSON result."""
    args = [sys.executable, __file__, "--only", "invite", "--json", "--seed", str(opts.seed)]
    args += ["--trials", str(opts.trials), "--invite-nodes", str(opts.invite_nodes)]
    args += ["--file-size", str(opts.file_size)]
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the run on {tree} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)["invite"]
    return result


# ---- targets and the command line --------------------------------------------------------


def targets(results: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    if "lookups" in results:
        ways, n = results["lookups"]["ways"], results["lookups"]["nodes"]
        p = ways["plain"]
        for way, label in (("sealed", "sealed lookup"), (AFTER, "  after a re-key (2 epochs)")):
            over = ways[way]["p50_ms"] / p["p50_ms"] - 1 if p["p50_ms"] else math.inf
            rows.append(
                [
                    f"{label} p50 <= plain + 10 % ({n:,} nodes)",
                    pct(ways[way]["p50_ms"], p["p50_ms"]),
                    yes(over <= LOOKUP_TARGET),
                ]
            )
    if "rekey" in results:
        r = results["rekey"]
        rows.append(
            [
                f"remove from {r['members']:,} members (re-key) < 10 s",
                f"{r['remove_s']:.2f} s",
                yes(r["remove_s"] < REKEY_TARGET),
            ]
        )
        rows.append(
            [
                "sampled remaining members read the new epoch",
                f"{r['read_ok']}/{r['sample']}, {r['read_ok_retry']} with a retry",
                yes(r["read_ok_retry"] == r["sample"]),
            ]
        )
        gone = r["removed"]
        rows.append(
            [
                "the removed member does not",
                f"epoch {gone['epoch']}, seq {gone['seq']}",
                yes(gone["moved"] == 0 and gone["seq"] < r["seq"]),
            ]
        )
    if "invite" in results:
        now, before = results["invite"], results.get("invite_before")
        was = first_piece(before) if before else None
        rows.append(
            [
                "invite to first piece, no slower than before",
                ms(first_piece(now)) + " ms" + (f" (before {ms(was)} ms)" if was else ""),
                yes(first_piece(now) <= was) if was else "no baseline",
            ]
        )
    return "targets\n" + table(["target", "measured", "met"], rows)


def yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (a few seconds)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--nodes", type=int, default=1000, help="DHT nodes for the lookups")
    p.add_argument("--procs", type=int, default=2, help="processes the lookup nodes run in")
    p.add_argument("--records", type=int, default=100, help="file entries (one group each)")
    p.add_argument("--lookups", type=int, default=200, help="lookups each way")
    p.add_argument("--concurrency", type=int, default=12, help="lookups in flight")
    p.add_argument("--members", type=int, default=2000)
    p.add_argument("--rekey-nodes", type=int, default=60)
    p.add_argument("--sample", type=int, default=50, help="random members that read the epoch")
    p.add_argument("--readers", type=int, default=1, help="members reading at once")
    p.add_argument("--invite-nodes", type=int, default=20, help="DHT-only nodes for part 3")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--file-size", type=int, default=4 << 20, help="bytes")
    p.add_argument("--before", metavar="OLD_TREE", help="run part 3 on this checkout too")
    p.add_argument("--rounds", type=int, default=4, help="with --before: turns each")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.nodes, opts.procs, opts.records, opts.lookups = 24, 1, 8, 12
        opts.members, opts.rekey_nodes, opts.sample = 120, 8, 3
        opts.invite_nodes, opts.trials, opts.file_size = 6, 1, 64 << 10
    return opts


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    parts: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
        "lookups": lookups,
        "rekey": rekey,
        "invite": invite,
    }
    results: dict[str, Any] = {"code": code_version(), "load_before": load()}
    for name in opts.only:  # one part at a time: each has the machine to itself
        if name == "invite" and opts.before:
            both = await asyncio.to_thread(compare, opts)
            results["invite"], results["invite_before"] = both
        else:
            results[name] = await parts[name](opts)
    results["load_after"] = load()
    return results


def render(results: dict[str, Any]) -> str:
    out = [
        f"code: {results['code']}",
        f"load average before: {results['load_before']}; after: {results['load_after']}",
    ]
    if "lookups" in results:
        out.append(show_lookups(results["lookups"]))
    if "rekey" in results:
        out.append(show_rekey(results["rekey"]))
    if "invite" in results:
        out.append(show_invite(results["invite"], results.get("invite_before")))
    out.append(targets(results))
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    results = asyncio.run(run(opts))
    print(json.dumps(results) if opts.json else render(results))


if __name__ == "__main__":
    main()
