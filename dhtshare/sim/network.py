"""N real DHT nodes on 127.0.0.1 (real UDP, port 0) in one event loop.

``Network.start`` is an async context manager: node 0 starts first and is the
bootstrap node, the others start and bootstrap through it concurrently (at most
``concurrency`` at a time), and the block is entered only when every bootstrap has
finished (bounded by ``join_timeout``). Every node is stopped on the way out, even on error.

The steps are public too (``build``, ``listen_all``, ``join_all``, ``stop_fraction``,
``stop_all``) so the DHT simulation can start worker processes between listening and
joining, and can join a network whose bootstrap node lives in another process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from dhtshare.dht.server import DhtNode

__all__ = ["Network"]

Address = tuple[str, int]


class Network:
    """A running set of DHT nodes; ``nodes[0]`` is the bootstrap node."""

    def __init__(self, nodes: list[DhtNode]) -> None:
        self.nodes = nodes
        self.join_seconds = 0.0

    @classmethod
    def build(
        cls,
        n: int,
        *,
        ksize: int = 20,
        alpha: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        **node_kwargs: Any,
    ) -> Network:
        """``n`` nodes, not yet listening; ids drawn from ``rng`` when given (reproducible)."""
        ids = [rng.randbytes(20) if rng is not None else None for _ in range(n)]
        return cls([DhtNode(ksize, alpha, i, clock=clock, **node_kwargs) for i in ids])

    @property
    def bootstrap_address(self) -> Address:
        """Where new nodes join."""
        return self.nodes[0].address

    @property
    def live(self) -> list[DhtNode]:
        """Nodes not stopped."""
        return [n for n in self.nodes if n.running]

    @classmethod
    @asynccontextmanager
    async def start(
        cls,
        n: int,
        *,
        ksize: int = 20,
        alpha: int = 3,
        concurrency: int = 32,
        join_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
        **node_kwargs: Any,
    ) -> AsyncIterator[Network]:
        """Start ``n`` nodes, wait until all joined, yield the network, stop them all."""
        net = cls.build(n, ksize=ksize, alpha=alpha, clock=clock, **node_kwargs)
        try:
            async with asyncio.timeout(join_timeout):
                started = time.monotonic()
                await net.listen_all()
                await net.join_all(concurrency)
                net.join_seconds = time.monotonic() - started
            yield net
        finally:
            await net.stop_all()

    async def listen_all(self) -> None:
        """Bind every node to a free UDP port on 127.0.0.1."""
        for node in self.nodes:
            await node.listen(0, "127.0.0.1")

    async def join_all(self, concurrency: int = 32, seeds: list[Address] | None = None) -> None:
        """Bootstrap the nodes, at most ``concurrency`` at a time.

        Without ``seeds`` every node but ``nodes[0]`` joins through ``nodes[0]``;
        with ``seeds`` (a bootstrap node elsewhere) every node joins through them.
        """
        joiners = self.nodes[1:] if seeds is None else self.nodes
        seeds = [self.bootstrap_address] if seeds is None else seeds
        gate = asyncio.Semaphore(concurrency)

        async def join(node: DhtNode) -> None:
            async with gate:
                await node.bootstrap(seeds)

        async with asyncio.TaskGroup() as tg:
            for node in joiners:
                tg.create_task(join(node))

    def stop_nodes(self, indices: Iterable[int]) -> None:
        """Stop the given nodes abruptly (churn): they stop answering at once."""
        for i in indices:
            self.nodes[i].stop()

    def stop_fraction(self, fraction: float, rng: random.Random, *, keep: int = 0) -> list[int]:
        """Stop random live nodes until ``fraction`` of all nodes is stopped.

        The first ``keep`` nodes (a bootstrap node) are never stopped. Returns the
        indices stopped now; the same ``rng`` state gives the same indices.
        """
        stopped = sum(1 for n in self.nodes if not n.running)
        want = min(round(fraction * len(self.nodes)), len(self.nodes) - keep) - stopped
        candidates = [i for i, n in enumerate(self.nodes) if i >= keep and n.running]
        chosen = sorted(rng.sample(candidates, max(0, min(want, len(candidates)))))
        self.stop_nodes(chosen)
        return chosen

    async def stop_all(self) -> None:
        """Stop every node and wait for their tasks to end."""
        await asyncio.gather(*(node.aclose() for node in self.nodes))
