"""What connections that never authenticate cost a serving node (not a test).

    python simulations/bench_half_open.py [--connections 1000] [--json]

A real ``PeerServer`` (sharing one small file, as a node does) runs in its own
process; this process opens ``--connections`` TCP connections to it from many source
addresses in 127.0.0.0/8 (at most ``--per-source`` each), and each connection then
does one of:

- ``silent``: nothing;
- ``partial-hello``: the first 50 bytes of a ClientHello, then nothing;
- ``big-header``: a frame header announcing a 1 MiB ClientHello, then 64 KiB of it.

For each, with the server's defaults and with its handshake caps lifted (so that
every connection is held, and what one costs shows), the table gives the server's
RSS (``VmRSS`` from /proc, read by this process) before the flood and one second
after the last connection was opened, its peak (``VmHWM``), and how many connections
were still open then. Every step is bounded in time; the server exits when this
process closes its stdin. ``PYTHONPATH=<other checkout>`` measures other code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dhtshare
from dhtshare.allocator import tune_allocator
from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.sim.halfopen import HalfOpen
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry

MB = 1_000_000
HELLO_HEADER = struct.pack(">IB", 154, 1)
BIG_HEADER = struct.pack(">IB", 1024 * 1024, 1)
MODES = {
    "silent": b"",
    "partial-hello": HELLO_HEADER + bytes(45),
    "big-header": BIG_HEADER + bytes(64 * 1024),
}


# -- the server process ----------------------------------------------------------------


def serve(lift_caps: bool) -> None:
    """Run one PeerServer until stdin closes (or 300 s pass); print its port first."""
    tune_allocator()  # as a node does before it starts

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "shared.bin"
            path.write_bytes(os.urandom(1024 * 1024))
            layout = FileLayout(1024 * 1024, 256 * 1024)
            hashes = hash_file(path, layout.piece_size)
            registry = ShareRegistry(lambda group, key: True, lambda: {bytes(32): bytes(32)})
            registry.add(Share(bytes(32), merkle_root(hashes), path, layout, hashes))
            kw: dict[str, Any] = {}
            if lift_caps and "max_handshakes" in inspect.signature(PeerServer).parameters:
                kw = {"max_handshakes": 100_000, "max_handshakes_per_ip": 100_000}
            server = PeerServer(Identity.generate(), shares=registry, **kw)
            _, port = await server.start()
            task = asyncio.create_task(server.serve())
            print(json.dumps({"port": port, "code": dhtshare.__file__}), flush=True)
            loop = asyncio.get_running_loop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(300):
                    await loop.run_in_executor(None, sys.stdin.read)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


# -- the flood ---------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def sources(count: int, per_source: int) -> list[str]:
    """``count`` source addresses in 127.0.0.0/8, each used ``per_source`` times."""
    addrs: list[str] = []
    i = 0
    while len(addrs) < count:
        i += 1
        addrs.extend([f"127.1.{i // 250}.{i % 250 + 2}"] * per_source)
    return addrs[:count]


async def flood(conns: HalfOpen, port: int, count: int, per_source: int, first: bytes) -> int:
    """Open ``count`` connections that each send ``first``, a hundred at a time; return how
    many could not be opened."""
    failed = 0

    async def one(source: str) -> None:
        nonlocal failed
        try:
            await conns.open("127.0.0.1", port, source, first)
        except OSError:
            failed += 1

    addrs = sources(count, per_source)
    async with asyncio.timeout(60):
        for start in range(0, count, 100):
            await asyncio.gather(*(one(a) for a in addrs[start : start + 100]))
    return failed


async def measure(mode: str, count: int, per_source: int, lift: bool) -> dict[str, Any]:
    args = [__file__, "--serve"] + (["--lift-caps"] if lift else [])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    conns = HalfOpen()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        async with asyncio.timeout(60):
            ready = json.loads(await proc.stdout.readline())
        await asyncio.sleep(0.5)  # let the server settle before the baseline
        before = proc_status(proc.pid)
        started = time.perf_counter()
        failed = await flood(conns, ready["port"], count, per_source, MODES[mode])
        opened = time.perf_counter() - started
        await asyncio.sleep(1.0)
        after = proc_status(proc.pid)
        return {
            "mode": mode,
            "caps": "lifted" if lift else "default",
            "connections": count,
            "not_opened": failed,
            "open_after_1s": len(conns.writers) - conns.closed,
            "open_seconds": round(opened, 2),
            "rss_before_mb": round(before["VmRSS"] / MB, 1),
            "rss_after_mb": round(after["VmRSS"] / MB, 1),
            "rss_delta_mb": round((after["VmRSS"] - before["VmRSS"]) / MB, 1),
            "peak_mb": round(after["VmHWM"] / MB, 1),
            "code": ready["code"],
        }
    finally:
        await conns.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for lift in (False, True):
        for mode in args.modes:
            rows.append(await measure(mode, args.connections, args.per_source, lift))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--per-source", type=int, default=8, help="connections per address")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lift-caps", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.lift_caps)
        return
    rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"server code: {rows[0]['code']}; {args.connections} connections, "
        f"{args.per_source} per source address (MB = 10^6 bytes)"
    )
    head = f"{'mode':<14} {'caps':<8} {'not opened':>10} {'open@1s':>8} {'RSS before':>10} "
    print(head + f"{'RSS after':>10} {'delta':>7} {'peak':>7}")
    for r in rows:
        print(
            f"{r['mode']:<14} {r['caps']:<8} {r['not_opened']:>10} {r['open_after_1s']:>8} "
            f"{r['rss_before_mb']:>10} {r['rss_after_mb']:>10} {r['rss_delta_mb']:>7} "
            f"{r['peak_mb']:>7}"
        )


if __name__ == "__main__":
    main()
