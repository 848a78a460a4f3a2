"""Worker processes that each host a share of a DHT-only simulation's nodes.

One event loop runs out of CPU long before a thousand nodes, so ``dhtshare simulate
--procs P`` spreads the DHT-only nodes over processes (``multiprocessing``, spawn
context). A worker starts its nodes, joins them through the parent's bootstrap node,
and then obeys commands sent over a ``Pipe`` (each a tuple, each answered by one)::

    -> (worker starts)                 <- ("ready", {"nodes", "seconds", "contacts"})
    -> ("stop", fraction, seed)        <- ("stopped", count stopped now)
    -> ("rss",)                        <- ("rss", peak RSS in KiB)
    -> ("shutdown",)                   <- ("bye", None)

Everything is bounded in time: the parent waits for each answer under a timeout, and
a worker exits when the pipe closes or its parent process is gone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import resource
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from dhtshare.errors import WorkerError
from dhtshare.sim.network import ADDRESSES_PER_PROCESS, Network

__all__ = ["WorkerPool", "WorkerSpec", "peak_rss_kb"]

Address = tuple[str, int]
_PARENT_CHECK = 1.0  # seconds between checks that the parent is still there


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker hosts and where its nodes join."""

    index: int
    nodes: int
    bootstrap: Address
    seed: int
    ksize: int = 20
    alpha: int = 3
    join_concurrency: int = 8
    join_timeout: float = 120.0
    parent_pid: int = 0


def peak_rss_kb() -> int:
    """Peak resident memory of this process in KiB (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ---- the worker side ------------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    try:
        asyncio.run(_serve(conn, spec))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except Exception as exc:  # reported to the parent, which raises WorkerError
        reason = "joining took too long" if isinstance(exc, TimeoutError) else repr(exc)
        try:
            conn.send(("error", reason))
        except OSError:
            pass
    finally:
        conn.close()


async def _serve(conn: Connection, spec: WorkerSpec) -> None:
    rng = random.Random(spec.seed)
    first = spec.index * ADDRESSES_PER_PROCESS
    net = Network.build(spec.nodes, ksize=spec.ksize, alpha=spec.alpha, rng=rng, first=first)
    try:
        started = time.monotonic()
        async with asyncio.timeout(spec.join_timeout):
            await net.listen_all()
            await net.join_all(spec.join_concurrency, seeds=[spec.bootstrap])
        seconds = time.monotonic() - started
        contacts = sum(n.contact_count() for n in net.nodes)
        conn.send(("ready", {"nodes": spec.nodes, "seconds": seconds, "contacts": contacts}))
        while True:
            command = await _next_command(conn, spec.parent_pid)
            if command is None or command[0] == "shutdown":
                break
            conn.send(_obey(net, command))
    finally:
        await net.stop_all()
    conn.send(("bye", None))


def _obey(net: Network, command: tuple[Any, ...]) -> tuple[str, Any]:
    match command:
        case ("stop", float(fraction), int(seed)):
            return ("stopped", len(net.stop_fraction(fraction, random.Random(seed))))
        case ("rss",):
            return ("rss", peak_rss_kb())
    return ("error", f"unknown command {command!r}")


async def _next_command(conn: Connection, parent_pid: int) -> tuple[Any, ...] | None:
    """The next command, or None once the parent is gone (checked every second)."""
    while True:
        if await _readable(conn, _PARENT_CHECK):
            message = conn.recv()
            return message if isinstance(message, tuple) and message else ("?",)
        if parent_pid and os.getppid() != parent_pid:
            return None


async def _readable(conn: Connection, within: float) -> bool:
    """Wait until ``conn`` has data (or EOF) without blocking the event loop."""
    if conn.poll():
        return True
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, _set_once, ready)
    try:
        async with asyncio.timeout(within):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ---- the parent side ------------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    spec: WorkerSpec
    process: BaseProcess
    conn: Connection
    ready: dict[str, Any] | None = None


class WorkerPool:
    """The parent's handle on its worker processes."""

    def __init__(self, workers: list[_Worker], timeout: float) -> None:
        self._workers = workers
        self.timeout = timeout

    @classmethod
    def spawn(cls, specs: list[WorkerSpec], timeout: float = 60.0) -> WorkerPool:
        """Start one process per spec; they begin joining at once."""
        ctx = multiprocessing.get_context("spawn")
        workers = []
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            spec = replace(spec, parent_pid=os.getpid())
            name = f"dht-worker-{spec.index}"
            proc = ctx.Process(target=worker_main, args=(child_end, spec), name=name, daemon=True)
            proc.start()
            child_end.close()
            workers.append(_Worker(spec, proc, parent_end))
        return cls(workers, timeout)

    @property
    def nodes(self) -> int:
        """Nodes hosted by all workers."""
        return sum(w.spec.nodes for w in self._workers)

    async def wait_ready(self, within: float) -> list[dict[str, Any]]:
        """Wait until every worker has joined its nodes; their reports."""
        reports = []
        for worker in self._workers:
            reply = await self._receive(worker, "ready", within)
            worker.ready = reply
            reports.append(reply)
        return reports

    async def stop_fraction(self, fraction: float, seed: int) -> int:
        """Each worker stops ``fraction`` of its own nodes; how many were stopped now."""
        total = 0
        for worker in self._workers:
            worker.conn.send(("stop", float(fraction), seed + worker.spec.index))
        for worker in self._workers:
            total += int(await self._receive(worker, "stopped", self.timeout))
        return total

    async def peak_rss_kb(self) -> list[int]:
        """Peak RSS of each worker, in KiB."""
        for worker in self._workers:
            worker.conn.send(("rss",))
        return [int(await self._receive(worker, "rss", self.timeout)) for worker in self._workers]

    async def shutdown(self, within: float = 10.0) -> None:
        """Ask every worker to stop, then make sure it has exited (kill if need be)."""
        for worker in self._workers:
            try:
                worker.conn.send(("shutdown",))
            except OSError:
                pass
        for worker in self._workers:
            try:
                await self._receive(worker, "bye", within)
            except WorkerError:
                pass
        await asyncio.gather(*(asyncio.to_thread(_reap, w.process, within) for w in self._workers))
        for worker in self._workers:
            worker.conn.close()

    async def _receive(self, worker: _Worker, expected: str, within: float) -> Any:
        name = worker.process.name
        try:
            readable = await _readable(worker.conn, within)
            message = worker.conn.recv() if readable else None
        except (EOFError, OSError) as exc:
            raise WorkerError(f"{name} exited", hint="see its output above") from exc
        if message is None:
            raise WorkerError(
                f"{name} did not answer within {within:.0f} s", hint="use fewer nodes"
            )
        if isinstance(message, tuple) and len(message) == 2 and message[0] == "error":
            raise WorkerError(
                f"{name} failed: {message[1]}", hint="use fewer nodes or more --procs"
            )
        if not (isinstance(message, tuple) and len(message) == 2 and message[0] == expected):
            raise WorkerError(f"{name} answered {message!r}, expected {expected}")
        return message[1]


def _reap(process: BaseProcess, timeout: float) -> None:
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(timeout)
