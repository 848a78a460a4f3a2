"""Hole punching and relaying between two homes behind NAT (not a test; needs root).

    sudo python simulations/bench_nat.py [--attempts 20] [--size 128] [--repeat 3] [--json]

Builds the namespace topology of tests/support/netns.py and runs real ``dhtshare``
processes in it: a bootstrap node that relays (``bootstrap --relay``), a public node (a
relay too), and keep1 and keep2, each behind its own port-keeping router. keep1 founds a
group, keep2 joins, and:

- punch attempts: keep1 shares ``--attempts`` files of 256 KiB; keep2 downloads each
  one (each download dials keep1 anew: a circuit through one of keep1's relays, then a
  punch); the route each ended on (``downloads --json`` ``routes``) is counted;
- relayed vs direct: keep2 downloads one ``--size`` MiB file from keep1 over a punched
  connection; then keep2 drops its copy (``unshare``), its router is switched to
  ``masquerade random`` (ports differ per destination, so no punch works) and keep2
  downloads the same file again, through a relay; ``--repeat`` times each, alternating
  (direct relayed, relayed direct, ...), and the medians compared. The speed is the
  transfer's alone: bytes after the first one over the seconds from the first byte to
  the end (the node's download list polled on its control socket); the download's own
  ``seconds`` (dialling included) is shown too. MB = 10**6 bytes.

Also printed: seconds from ``node start`` until each node knew its reachability.
Targets (issue #16): punched in at least 19 of 20 attempts; relayed at least 50 % of the
direct speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.netns import Nodes, nodes, topology, unavailable

REACH_TIMEOUT = 30.0
GET_TIMEOUT = 120.0
PUNCH_FILE = 256 * 1024
MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attempts", type=int, default=20, help="punch attempts (default 20)")
    p.add_argument("--size", type=int, default=128, help="MiB of the timed file (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="timed downloads of each kind")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p.parse_args(argv)


def reachability(n: Nodes, role: str, since: float) -> dict[str, Any]:
    doc = n.wait_status(
        role, lambda d: d.get("reachability") in ("public", "private"), REACH_TIMEOUT
    )
    return {
        "role": role,
        "reachability": doc.get("reachability"),
        "seconds": round(time.monotonic() - since, 1),
        "public_address": doc.get("public_address"),
        "relays": doc.get("relays"),
    }


def share(n: Nodes, role: str, name: str, size: int) -> None:
    path = n.root / f"files-{role}" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(size))
    n.run(role, "share", "crag", str(path), timeout=GET_TIMEOUT)


def download(n: Nodes, role: str, name: str, out: Path) -> dict[str, Any]:
    """``role`` gets ``name`` into ``out`` (``get --no-wait``, then the node's download
    list polled every 20 ms on its control socket): the route(s), the seconds until done,
    the seconds from the first byte on (the transfer alone, without dialling), or the
    error."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    n.run(role, "get", "crag", name, "--out", str(out), "--no-wait", timeout=GET_TIMEOUT)
    first: tuple[float, int] | None = None
    while time.monotonic() - started < GET_TIMEOUT:
        rows = {d["name"]: d for d in n.call(role, "downloads")}
        row = rows[name]
        now = time.monotonic()
        if first is None and row["bytes_done"] > 0:
            first = (now, row["bytes_done"])
        if row["state"] != "downloading":
            break
        time.sleep(0.02)
    wall = time.monotonic() - started
    if row["state"] != "complete":
        return {"name": name, "ok": False, "error": row.get("error") or row["state"], "wall": wall}
    routes = sorted(set((row.get("routes") or {}).values())) or ["(no routes field)"]
    transfer = None
    if first is not None and now > first[0]:
        transfer = {"seconds": now - first[0], "bytes": row["size"] - first[1]}
    return {
        "name": name,
        "ok": True,
        "routes": routes,
        "seconds": row.get("seconds", wall),
        "wall": wall,
        "size": row["size"],
        "transfer": transfer,
    }


def speed(d: dict[str, Any]) -> float | None:
    """MB/s of a download's transfer (from its first byte), None if it failed."""
    if not d["ok"] or not d["transfer"]:
        return None
    return float(d["transfer"]["bytes"] / d["transfer"]["seconds"] / 1e6)


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-nat-"))
    with topology() as topo, nodes(topo, root) as n:
        n.start_bootstrap("--relay")
        starts = {}
        procs = {}
        for role in ("public", "keep1", "keep2"):
            n.run(role, "id", "create", "--name", role)
            starts[role] = time.monotonic()
            procs[role] = n.start(role)
        for role, proc in procs.items():
            n.started(role, proc)
        reach = [reachability(n, role, starts[role]) for role in procs]
        gid = n.run("keep1", "group", "create", "crag").stdout.strip()
        n.run("keep2", "group", "join", gid)
        n.run("keep1", "group", "accept", "crag", "keep2")
        for i in range(args.attempts):
            share(n, "keep1", f"punch-{i}.bin", PUNCH_FILE)
        share(n, "keep1", "big.bin", args.size * MiB)
        # relays: keep1's provider records must name them before a circuit can be asked
        n.wait_status("keep1", lambda d: bool(d.get("relays")), REACH_TIMEOUT)
        attempts = [
            download(n, "keep2", f"punch-{i}.bin", root / "out-punch") for i in range(args.attempts)
        ]
        timed: dict[str, list[dict[str, Any]]] = {"direct": [], "relayed": []}
        for i in range(args.repeat):  # direct, relayed, relayed, direct, ...
            for kind in ("direct", "relayed") if i % 2 == 0 else ("relayed", "direct"):
                nat = "masquerade random" if kind == "relayed" else "masquerade"
                topo.set_nat("keep2", nat)
                timed[kind].append(download(n, "keep2", "big.bin", root / f"out-{kind}-{i}"))
                n.run("keep2", "unshare", "crag", "big.bin", check=False)
                n.run("keep2", "downloads", "clear", check=False)
        topo.set_nat("keep2", "masquerade")
    routes = [a["routes"][0] if a["ok"] and len(a["routes"]) == 1 else "failed" for a in attempts]
    speeds = {kind: [speed(d) for d in runs] for kind, runs in timed.items()}
    medians: dict[str, float | None] = {}
    for kind, got in speeds.items():
        ok = [x for x in got if x is not None]
        medians[kind] = statistics.median(ok) if ok and len(ok) == len(got) else None
    ratio = (
        medians["relayed"] / medians["direct"] if medians["relayed"] and medians["direct"] else None
    )
    punched = routes.count("punched")
    return {
        "reachability": reach,
        "attempts": attempts,
        "punch": {r: routes.count(r) for r in sorted(set(routes))},
        "punch_seconds_p50": statistics.median(a["wall"] for a in attempts) if attempts else None,
        "timed": timed,
        "mb_s": speeds,
        "mb_s_median": medians,
        "relayed_over_direct": ratio,
        "targets": {
            "punched >= 19/20": punched * 20 >= 19 * len(attempts) if attempts else None,
            "relayed >= 50% of direct": ratio is not None and ratio >= 0.5,
        },
    }


def render(doc: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["reachability (seconds after node start):"]
    for r in doc["reachability"]:
        lines.append(
            f"  {r['role']:<7} {r['reachability']!s:<8} {r['seconds']:>5.1f} s"
            f"  public_address {r['public_address']}  relays {r['relays']}"
        )
    punch = ", ".join(f"{k} {v}" for k, v in doc["punch"].items())
    lines.append(f"punch attempts keep2 <- keep1: {len(doc['attempts'])}: {punch}")
    if doc["punch_seconds_p50"] is not None:
        lines.append(
            f"  median seconds from `get` to a complete 256 KiB: {doc['punch_seconds_p50']:.2f}"
        )
    for a in doc["attempts"]:
        if not a["ok"]:
            lines.append(f"  {a['name']}: {a['error']}")
    lines.append(f"{args.size} MiB keep2 <- keep1:")
    lines.append(f"  {'route':<18} {'seconds':>8} {'transfer MB/s':>14} {'wall s':>8}")
    for key, runs in doc["timed"].items():
        for d in runs:
            if d["ok"]:
                mb_s = speed(d)
                shown = "n/a" if mb_s is None else f"{mb_s:.1f}"
                lines.append(
                    f"  {key + ' (' + ','.join(d['routes']) + ')':<18} {d['seconds']:>8.2f}"
                    f" {shown:>14} {d['wall']:>8.2f}"
                )
            else:
                lines.append(f"  {key:<18} failed: {d['error']}")
    medians = doc["mb_s_median"]
    lines.append(
        "median MB/s: "
        + ", ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in medians.items())
    )
    ratio = doc["relayed_over_direct"]
    lines.append(f"relayed / direct: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    for target, met in doc["targets"].items():
        lines.append(f"target {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    doc = run(args)
    print(json.dumps(doc, indent=2) if args.json else render(doc, args))
    return 0 if all(doc["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
