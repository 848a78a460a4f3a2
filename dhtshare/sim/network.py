"""N real DHT nodes on 127.0.0.1 (real UDP, port 0) in one event loop.

``Network.start`` is an async context manager: node 0 starts first and is the
bootstrap node, the others start and bootstrap through it concurrently (at most
``concurrency`` at a time), and the block is entered only when every bootstrap has
finished (bounded by ``join_timeout``). Every node is stopped on the way out, even on error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from dhtshare.dht.server import DhtNode

__all__ = ["Network"]


class Network:
    """A running set of DHT nodes; ``nodes[0]`` is the bootstrap node."""

    def __init__(self, nodes: list[DhtNode]) -> None:
        self.nodes = nodes
        self.join_seconds = 0.0

    @property
    def bootstrap_address(self) -> tuple[str, int]:
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
        net = cls([DhtNode(ksize, alpha, clock=clock, **node_kwargs) for _ in range(n)])
        try:
            async with asyncio.timeout(join_timeout):
                await net._start_all(concurrency)
            yield net
        finally:
            await net.stop_all()

    async def _start_all(self, concurrency: int) -> None:
        started = time.monotonic()
        for node in self.nodes:
            await node.listen(0, "127.0.0.1")
        gate = asyncio.Semaphore(concurrency)
        seed = [self.bootstrap_address]

        async def join(node: DhtNode) -> None:
            async with gate:
                await node.bootstrap(seed)

        async with asyncio.TaskGroup() as tg:
            for node in self.nodes[1:]:
                tg.create_task(join(node))
        self.join_seconds = time.monotonic() - started

    def stop_nodes(self, indices: Iterable[int]) -> None:
        """Stop the given nodes abruptly (churn): they stop answering at once."""
        for i in indices:
            self.nodes[i].stop()

    async def stop_all(self) -> None:
        """Stop every node and wait for their tasks to end."""
        await asyncio.gather(*(node.aclose() for node in self.nodes))
