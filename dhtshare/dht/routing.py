"""A routing table no single address can fill: kademlia's table with per-address limits.

A node id is free, so one host can claim any number of them; kademlia 2.2.3 takes
every new id as a new contact. ``DiverseRoutingTable`` keeps the library's buckets,
splitting and replacement caches, and adds, in the spirit of BEP 42:

- one node id per ``(ip, port)``: a new id from an address already in the table does
  not add a second contact (the first one stays until it stops answering, or until
  the address answers a ping with another id: ``replace_at``, a restarted node);
- at most ``MAX_PER_ADDRESS`` contacts per IP address in the table;
- at most ``MAX_PER_PREFIX_IN_BUCKET`` contacts per prefix (/24, /48; ``sources.py``)
  in one bucket and ``MAX_PER_PREFIX`` in the table.

The same limits are checked when a replacement-cache entry is promoted and when a
bucket splits, so no path around them exists. ``pick_diverse`` applies them to any
distance-ordered list (the k nearest of a lookup).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

from dhtshare.dht.sources import source_of

__all__ = [
    "MAX_PER_ADDRESS",
    "MAX_PER_PREFIX",
    "MAX_PER_PREFIX_IN_BUCKET",
    "DiverseRoutingTable",
    "pick_diverse",
]

#: Contacts one IP address may have in the table (several nodes behind one NAT).
MAX_PER_ADDRESS = 3
#: Contacts one prefix may have in one bucket (BEP 42 and libtorrent allow one).
MAX_PER_PREFIX_IN_BUCKET = 2
#: Contacts one prefix may have in the whole table.
MAX_PER_PREFIX = 8

Endpoint = tuple[str, int]


def _endpoint(node: Node) -> Endpoint:
    return (str(node.ip), int(node.port))


class _Index:
    """Who is in a table's buckets (not the replacement caches), by endpoint, address, prefix."""

    def __init__(self) -> None:
        self.endpoints: dict[Endpoint, bytes] = {}
        self.addresses: Counter[str] = Counter()
        self.prefixes: Counter[str] = Counter()

    def admits(self, node: Node) -> bool:
        """True if ``node`` may become a contact without passing a table-wide limit."""
        held = self.endpoints.get(_endpoint(node))
        if held is not None:
            return bool(held == node.id)
        src = source_of(str(node.ip))
        return (
            self.addresses[src.address] < MAX_PER_ADDRESS
            and self.prefixes[src.prefix] < MAX_PER_PREFIX
        )

    def add(self, node: Node) -> None:
        src = source_of(str(node.ip))
        self.endpoints[_endpoint(node)] = node.id
        self.addresses[src.address] += 1
        self.prefixes[src.prefix] += 1

    def remove(self, node: Node) -> None:
        src = source_of(str(node.ip))
        self.endpoints.pop(_endpoint(node), None)
        for counter, name in ((self.addresses, src.address), (self.prefixes, src.prefix)):
            counter[name] -= 1
            if counter[name] <= 0:
                del counter[name]


class DiverseBucket(KBucket):  # type: ignore[misc]
    """A k-bucket whose contacts obey the table's per-address and per-prefix limits."""

    def __init__(self, lower: int, upper: int, ksize: int, index: _Index) -> None:
        super().__init__(lower, upper, ksize)
        self.index = index

    def admits(self, node: Node) -> bool:
        """True if ``node`` may become a contact of this bucket now."""
        if node.id in self.nodes:
            return _endpoint(self.nodes[node.id]) == _endpoint(node)
        prefix = source_of(str(node.ip)).prefix
        in_bucket = sum(1 for n in self.nodes.values() if source_of(str(n.ip)).prefix == prefix)
        return in_bucket < MAX_PER_PREFIX_IN_BUCKET and self.index.admits(node)

    def add_node(self, node: Node) -> bool:
        """Add or refresh ``node``; False only if the bucket is full (as kademlia's).

        A node the limits refuse is dropped (True: nothing to split or ping for). A
        known id seen from another address keeps its first address.
        """
        if not self.admits(node):
            return True
        if node.id in self.nodes:
            self.nodes.move_to_end(node.id)
            return True
        if len(self) < self.ksize:
            self.nodes[node.id] = node
            self.index.add(node)
            return True
        self.replacement_nodes.pop(node.id, None)
        self.replacement_nodes[node.id] = node
        while len(self.replacement_nodes) > self.max_replacement_nodes:
            self.replacement_nodes.popitem(last=False)
        return False

    def remove_node(self, node: Node) -> None:
        """Drop ``node``; promote the newest replacement that the limits admit."""
        self.replacement_nodes.pop(node.id, None)
        held = self.nodes.pop(node.id, None)
        if held is None:
            return
        self.index.remove(held)
        while self.replacement_nodes:
            _id, candidate = self.replacement_nodes.popitem()
            if self.admits(candidate):
                self.nodes[candidate.id] = candidate
                self.index.add(candidate)
                return

    def split(self) -> tuple[DiverseBucket, DiverseBucket]:
        """Two halves sharing the index; contacts stay contacts, then the cache refills.

        An id is placed where ``RoutingTable.get_bucket_for`` will look for it (below
        the upper bound); kademlia's own split puts an id equal to the midpoint in
        the lower half, where it is never found again and can be added twice.
        """
        midpoint = (self.range[0] + self.range[1]) // 2
        one = DiverseBucket(self.range[0], midpoint, self.ksize, self.index)
        two = DiverseBucket(midpoint + 1, self.range[1], self.ksize, self.index)
        for node in self.nodes.values():
            (one if node.long_id < midpoint else two).nodes[node.id] = node
        for node in self.replacement_nodes.values():
            (one if node.long_id < midpoint else two).add_node(node)
        return one, two


class DiverseRoutingTable(RoutingTable):  # type: ignore[misc]
    """kademlia's routing table with ``DiverseBucket``s (see the module docstring)."""

    def flush(self) -> None:
        self.index = _Index()
        self.buckets = [DiverseBucket(0, 2**160, self.ksize, self.index)]

    def admits(self, node: Node) -> bool:
        """True if ``node`` is already a contact or may become one now."""
        return bool(self.buckets[self.get_bucket_for(node)].admits(node))

    def add_contact(self, node: Node) -> None:
        """Add ``node`` unless a limit refuses it (then nothing changes)."""
        if self.admits(node):
            super().add_contact(node)

    def id_at(self, ip: str, port: int) -> bytes | None:
        """The id of the contact at ``(ip, port)``, if one is in the table."""
        return self.index.endpoints.get((str(ip), int(port)))

    def replace_at(self, node: Node) -> bool:
        """``node``'s endpoint now answers as ``node.id``: drop the contact held there
        under another id (a node restarted with a new id; the old one is gone), so that
        ``node`` may take its place. True if a contact was dropped.

        Only for an id the endpoint itself proved (it answered a ping with it): a claim
        by anyone else must not push a contact out.
        """
        held = self.id_at(node.ip, node.port)
        if held is None or held == node.id:
            return False
        self.remove_contact(Node(held, node.ip, node.port))
        return True


def pick_diverse(nodes: Iterable[Node], k: int) -> list[Node]:
    """The first ``k`` of ``nodes`` (nearest first) within the table's limits.

    One id per endpoint, ``MAX_PER_ADDRESS`` per address and
    ``MAX_PER_PREFIX_IN_BUCKET`` per prefix: the k nearest are about one bucket's worth.
    """
    chosen: list[Node] = []
    endpoints: set[Endpoint] = set()
    addresses: Counter[str] = Counter()
    prefixes: Counter[str] = Counter()
    for node in nodes:
        src = source_of(str(node.ip))
        endpoint = _endpoint(node)
        if (
            endpoint in endpoints
            or addresses[src.address] >= MAX_PER_ADDRESS
            or prefixes[src.prefix] >= MAX_PER_PREFIX_IN_BUCKET
        ):
            continue
        chosen.append(node)
        endpoints.add(endpoint)
        addresses[src.address] += 1
        prefixes[src.prefix] += 1
        if len(chosen) == k:
            break
    return chosen
