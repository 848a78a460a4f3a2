"""In-process multi-node networks on 127.0.0.1, for ``dhtshare simulate`` and the tests."""

from __future__ import annotations

from dhtshare.sim.network import Network

__all__ = ["Network"]
