"""``dhtshare simulate``: a real network on this machine, measured and shown.

With ``size > 0`` (the default) the run is the product end to end: DHT-only nodes plus full
nodes (an owner, seeders and downloaders, each a real ``Node`` with UDP and TCP sockets on
its own loopback address, ``network.loopback_host``), a group formed by join requests the
owner accepts, seeders sharing one file, downloaders fetching it in parallel, one seeder
leaving half-way and optional churn of the DHT-only nodes. With ``size == 0`` only the
DHT is measured (``dhtsim``), at scale. Everything random comes from ``--seed``: the same
seed plays the same scenario.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from nacl.signing import SigningKey

from dhtshare.allocator import tune_allocator
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtshareError
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import Kind, key_for
from dhtshare.sim.dhtsim import LookupReport, measure_lookups, run_dht_scenario
from dhtshare.sim.network import Network, loopback_host
from dhtshare.sim.report import latency_summary, render_summary, write_plot
from dhtshare.sim.scenario import Scenario, load_scenario
from dhtshare.text import format_size, plural

__all__ = ["run_simulation", "run_transfer_scenario"]

SAMPLE_EVERY = 0.25
DHT_OK_RATE = 0.99  # a DHT-only run is ok when every churn level found at least this share
RUN_TIMEOUT = 600.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def run_simulation(
    scenario_file: str | None, options: dict[str, Any], as_json: bool, plot: str | None
) -> bool:
    """Run a scenario from the CLI; print the summary (table or JSON); True if it all verified."""
    scenario = load_scenario(scenario_file, options)
    tune_allocator()  # this process runs every full node of the scenario
    log = _Log(quiet=False)
    if scenario.size == 0:
        doc = asyncio.run(run_dht_scenario(scenario, log.line))
        doc.setdefault("downloads", [])
        doc.setdefault("seeders", {})
        levels = doc["lookups"].get("by_churn") or [doc["lookups"]]
        doc.setdefault("ok", min(lv["success_rate"] for lv in levels) >= DHT_OK_RATE)
        doc.setdefault("scenario", scenario.to_json())
    else:
        doc = asyncio.run(run_transfer_scenario(scenario, log))
    if plot:
        write_plot(doc, plot)
    doc.pop("timeline", None)
    doc.pop("lookup_samples_ms", None)
    click.echo(json.dumps(doc, indent=2) if as_json else render_summary(doc))
    return bool(doc["ok"])


class _Log:
    """Progress on stderr: redrawn in place on a terminal, sparse lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._drawn = 0
        self._last_plain = 0.0

    def line(self, text: str) -> None:
        if not self.quiet:
            self._drawn = 0
            print(text, file=sys.stderr, flush=True)

    def board(self, rows: list[str], now: float) -> None:
        if self.quiet:
            return
        if self.tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            sys.stderr.write(up + "".join(f"{r}\x1b[K\n" for r in rows))
            sys.stderr.flush()
            self._drawn = len(rows)
        elif now - self._last_plain >= 2.0:
            self._last_plain = now
            print(" | ".join(rows), file=sys.stderr, flush=True)


@dataclass
class _Run:
    scenario: Scenario
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str, log: Callable[[str], None]) -> None:
        self.events.append({"t": round(self.now(), 3), "event": text})
        log(f"[{self.now():6.2f}s] {text}")


def _identity(rng: random.Random, name: str) -> Identity:
    return Identity(SigningKey(rng.randbytes(32)), name)


def _write_file(path: Path, size: int, rng: random.Random) -> bytes:
    """Seeded random bytes; returns their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.digest()


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


async def run_transfer_scenario(sc: Scenario, log: _Log | None = None) -> dict[str, Any]:
    """The full product on loopback; returns the summary document."""
    log = log or _Log(quiet=True)
    async with asyncio.timeout(RUN_TIMEOUT):
        with tempfile.TemporaryDirectory(prefix="dhtshare-sim-") as tmp:
            return await _transfer(sc, Path(tmp), log)


async def _transfer(sc: Scenario, tmp: Path, log: _Log) -> dict[str, Any]:
    run = _Run(sc, random.Random(sc.seed))
    n_dht = sc.nodes - 1 - sc.seeders - sc.downloaders
    log.line(
        f"starting {sc.nodes} nodes ({n_dht} DHT-only, {1 + sc.seeders + sc.downloaders} full) ..."
    )
    async with Network.start(n_dht, ksize=sc.ksize, alpha=sc.alpha) as net:
        names = (
            ["owner"]
            + [f"seeder{i}" for i in range(sc.seeders)]
            + [f"downloader{i}" for i in range(sc.downloaders)]
        )
        limit = sc.upload_limit_mb_s * 1e6 or None
        configs = [
            NodeConfig(
                home=tmp / name,
                host=loopback_host(n_dht + i),  # each node on its own address, as DHT-only ones
                bootstrap=(net.bootstrap_address,),
                identity=_identity(run.rng, name),
                control=False,
                upload_limit=limit if name.startswith("seeder") else None,
                ksize=sc.ksize,
            )
            for i, name in enumerate(names)
        ]
        nodes = list(await asyncio.gather(*(Node.start(c) for c in configs)))
        startup = run.now()
        run.event(f"{sc.nodes} nodes up in {startup:.2f}s", log.line)
        try:
            return await _play(run, net, nodes, tmp, log, startup)
        finally:
            await asyncio.gather(*(n.close() for n in nodes if not n.stopped.is_set()))


async def _form_group(run: _Run, nodes: list[Node], log: _Log) -> bytes:
    owner, members = nodes[0], nodes[1:]
    gid = await owner.groups.create("simulated group")
    invite = await owner.groups.invite(gid)
    await asyncio.gather(*(m.groups.request_join(invite, "let me in") for m in members))
    pending = await owner.groups.requests(gid)
    for request in pending:
        await owner.groups.accept(gid, request.requester)
    await asyncio.gather(*(m.groups.maintain() for m in members))
    await asyncio.gather(*(m.groups.refresh(gid) for m in members))
    joined = sum(m.groups.is_member(gid, m.identity.public) for m in members)
    run.event(
        f"group formed: {plural(len(pending), 'request')}, {plural(joined, 'member')} accepted",
        log.line,
    )
    if joined != len(members):
        raise DhtshareError("not every member could join the simulated group", "see the log above")
    return gid


async def _play(
    run: _Run, net: Network, nodes: list[Node], tmp: Path, log: _Log, startup: float
) -> dict[str, Any]:
    sc = run.scenario
    gid = await _form_group(run, nodes, log)
    seeders, downloaders = nodes[1 : 1 + sc.seeders], nodes[1 + sc.seeders :]
    source = tmp / "shared-file.bin"
    expected = await asyncio.to_thread(
        _write_file, source, sc.size, random.Random(run.rng.random())
    )
    shared = await asyncio.gather(*(s.share(gid, source) for s in seeders))
    run.event(
        f"{plural(len(seeders), 'seeder')} share{'s' if len(seeders) == 1 else ''}"
        f" {format_size(sc.size)} ({plural(shared[0].layout.piece_count, 'piece')})",
        log.line,
    )
    files = await downloaders[0].files.list_files(gid, downloaders[0].groups.is_member)
    entry = next(f.entry for f in files if f.entry.content_id == shared[0].content_id)
    leaving = run.rng.choice(seeders) if sc.seeder_leaves and len(seeders) > 1 else None
    churned = sorted(run.rng.sample(range(1, len(net.nodes)), int(sc.churn * (len(net.nodes) - 1))))
    before_churn = await _measure(run, net, nodes, gid) if churned else None
    handles = [
        await d.downloads.start(gid, entry, tmp / f"out-{d.identity.name}") for d in downloaders
    ]
    begun = run.now()
    half_done = False
    while not all(h.task is not None and h.task.done() for h in handles):
        await asyncio.sleep(SAMPLE_EVERY)
        statuses = [h.status() for h in handles]
        for d, st in zip(downloaders, statuses, strict=True):
            run.timeline.setdefault(d.identity.name, []).append(
                (round(run.now(), 3), st.bytes_done)
            )
        log.board(_board(downloaders, statuses, log.tty), run.now())
        if not half_done and sum(st.bytes_done for st in statuses) >= sc.size * len(handles) / 2:
            half_done = True
            await _half_way(run, net, leaving, churned, log)
    results = [
        await _result(run, d, h, expected, begun) for d, h in zip(downloaders, handles, strict=True)
    ]
    lookups = await _lookups(run, net, nodes, gid)
    if before_churn is not None:
        stopped = len(churned) / max(1, len(net.nodes) - 1)
        lookups["summary"]["by_churn"] = [
            {"churn": 0.0, **before_churn.to_json()},
            {
                "churn": round(stopped, 3),
                **{k: v for k, v in lookups["summary"].items() if k != "during_run"},
            },
        ]
    uploaded = {
        n.identity.name: sum(n.server.uploaded.values())
        for n in nodes[1:]
        if sum(n.server.uploaded.values())
    }
    return {
        "scenario": sc.to_json(),
        "nodes": sc.nodes,
        "startup_s": round(startup, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "lookups": lookups.pop("summary"),
        "downloads": results,
        "seeders": {n.identity.name: sum(n.server.uploaded.values()) for n in seeders},
        "uploaders": uploaded,
        "churn_events": run.events,
        "plan": {
            "file_sha256": expected.hex(),
            "leaving_seeder": leaving.identity.name if leaving else None,
            "churned_nodes": churned,
            "members": [n.identity.id for n in nodes],
        },
        "ok": all(r["verified"] for r in results),
        "timeline": run.timeline,
        "lookup_samples_ms": lookups["samples_ms"],
    }


def _board(downloaders: list[Node], statuses: list[Any], tty: bool) -> list[str]:
    """One bar per download on a terminal (up to 8), else one aggregate line."""
    if tty and len(statuses) <= 8:
        return [_bar(d.identity.name, st) for d, st in zip(downloaders, statuses, strict=True)]
    done = sum(st.state == "complete" for st in statuses)
    got = sum(st.bytes_done for st in statuses)
    want = sum(st.size for st in statuses) or 1
    rate = sum(getattr(st, "rate", 0.0) for st in statuses) / 1e6
    pct = 100 * got // want
    return [f"downloads: {done}/{len(statuses)} complete, {pct}% of bytes, {rate:.1f} MB/s"]


def _bar(name: str, status: Any) -> str:
    pct = 100 * status.bytes_done // max(status.size, 1)
    filled = pct * 30 // 100
    rate = getattr(status, "rate", 0.0) / 1e6
    bar = "#" * filled + "-" * (30 - filled)
    return f"{name:>12} [{bar}] {pct:3d}% {rate:6.1f} MB/s {status.state}"


async def _half_way(
    run: _Run, net: Network, leaving: Node | None, churned: list[int], log: _Log
) -> None:
    if leaving is not None:
        await leaving.close()
        run.event(f"{leaving.identity.name} left half-way", log.line)
    if churned:
        net.stop_nodes(churned)
        run.event(f"churn: stopped {len(churned)} DHT-only nodes", log.line)


async def _result(
    run: _Run, node: Node, handle: Any, expected: bytes, begun: float
) -> dict[str, Any]:
    status = handle.status()
    verified = (
        status.state == "complete"
        and await asyncio.to_thread(_sha256, Path(status.path)) == expected
    )
    seconds = float(getattr(status, "seconds", 0.0)) or run.now() - begun
    return {
        "name": node.identity.name,
        "verified": verified,
        "state": status.state,
        "seconds": round(seconds, 3),
        "mb_s": round(status.size / max(seconds, 1e-6) / 1e6, 1),
        "sources": {k[:12]: v for k, v in status.sources.items()},
        "error": getattr(status, "error", ""),
    }


async def _measure(run: _Run, net: Network, nodes: list[Node], gid: bytes) -> LookupReport:
    """Lookups of the group's roster (sealed in the current epoch, signed by the owner's
    author key there) from random live nodes (at most 60, 12 in flight)."""
    space = nodes[0].groups.state.keys[gid].space()
    assert space is not None, "the owner holds the current epoch"
    author, _cert = space.author(nodes[0].identity)
    targets = [(space.dht_key(key_for(Kind.ROSTER, gid)), author.public)]
    live: list[DhtNode] = [*net.live, *(n.dht for n in nodes if not n.stopped.is_set())]
    return await measure_lookups(live, targets, min(run.scenario.lookups, 60), run.rng)


async def _lookups(run: _Run, net: Network, nodes: list[Node], gid: bytes) -> dict[str, Any]:
    """A measured pass from random live nodes, plus every lookup the run itself made."""
    measured = await _measure(run, net, nodes, gid)
    live: list[DhtNode] = [*net.live, *(n.dht for n in nodes if not n.stopped.is_set())]
    every = [s for n in live for s in n.lookups]
    during = latency_summary(
        [s.seconds for s in every], [s.rpcs for s in every], len(every), len(every)
    )
    summary = {**measured.to_json(), "during_run": during}
    return {"summary": summary, "samples_ms": [round(s.seconds * 1000, 2) for s in every]}
