"""The asyncio edge of the transfer core: sockets, disk and tasks around the pure swarm logic."""

from __future__ import annotations
