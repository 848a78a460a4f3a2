"""Half-open TCP connections, as a flood of peers that never finish a handshake: for the
tests and ``simulations/bench_half_open.py``."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["HalfOpen"]


class HalfOpen:
    """Connections that each send a first chunk (maybe none) and then nothing; counts
    those the server ended. ``close`` ends the rest."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = 0  # connections the server ended
        self._changed = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    async def open(self, host: str, port: int, source: str, first: bytes = b"") -> None:
        """One connection to ``host:port`` from the address ``source`` that sends ``first``."""
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        if first:
            writer.write(first)
        self.writers.append(writer)
        self._watchers.append(asyncio.create_task(self._watch(reader)))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(4096):
                pass
        self.closed += 1
        self._changed.set()

    async def until_closed(self, count: int) -> None:
        """Return once the server has ended ``count`` connections."""
        while self.closed < count:
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
