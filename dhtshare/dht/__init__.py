"""The DHT adapter: kademlia extended at its seams to hold signed records.

``DhtNode`` (server.py) is the node; ``ValidatingStorage`` (storage.py) decides what a
node keeps; ``DhtProtocol`` (protocol.py) guards the wire. See docs/dht.md.
"""

from __future__ import annotations

from dhtshare.dht.protocol import DhtProtocol, RpcTimeouts
from dhtshare.dht.server import DhtNode, LookupStats
from dhtshare.dht.storage import ValidatingStorage

__all__ = ["DhtNode", "DhtProtocol", "LookupStats", "RpcTimeouts", "ValidatingStorage"]
