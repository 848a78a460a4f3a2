"""N real DHT nodes on loopback (real UDP, port 0) in one event loop.

Each node listens on its own loopback address, in its own /24 (``loopback_host``:
node ``i`` of a network whose first address index is ``first`` gets
``127.<a>.<b>.1``), because the routing table and the storage quotas limit what one
address and one prefix may hold (docs/dht.md); Linux answers on all of 127.0.0.0/8
without set-up.

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

__all__ = ["ADDRESSES_PER_PROCESS", "Network", "loopback_host"]

Address = tuple[str, int]

#: Distinct /24s in 127.0.0.0/8 that ``loopback_host`` hands out (127.1.0.x to 127.255.255.x).
_LOOPBACK_SUBNETS = 255 * 256
#: Address indices reserved for each process of a simulation (``first = process * this``).
ADDRESSES_PER_PROCESS = 4096


def loopback_host(index: int) -> str:
    """The loopback address of node ``index``: ``127.<a>.<b>.1``, one /24 per index.

    Indices wrap after 65,280 (so more nodes than that share /24s).
    """
    a, b = divmod(index % _LOOPBACK_SUBNETS, 256)
    return f"127.{a + 1}.{b}.1"


class Network:
    """A running set of DHT nodes; ``nodes[0]`` is the bootstrap node."""

    def __init__(self, nodes: list[DhtNode], first: int = 0) -> None:
        self.nodes = nodes
        self.first = first
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
        first: int = 0,
        **node_kwargs: Any,
    ) -> Network:
        """``n`` nodes, not yet listening; ids drawn from ``rng`` when given (reproducible).

        Node ``i`` will listen on ``loopback_host(first + i)``.
        """
        ids = [rng.randbytes(20) if rng is not None else None for _ in range(n)]
        nodes = [DhtNode(ksize, alpha, i, clock=clock, **node_kwargs) for i in ids]
        return cls(nodes, first)

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
        """Bind every node to a free UDP port on its own loopback address."""
        for i, node in enumerate(self.nodes):
            await node.listen(0, loopback_host(self.first + i))

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
