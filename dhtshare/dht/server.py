"""DhtNode: kademlia's ``Server`` with typed records, a gather-from-k lookup and republishing.

kademlia's ``Server.get`` returns the first value any node offers (or the local copy),
``set_digest`` raises ``ValueError`` when every contact is dead, values are re-stored
by every holder, state is pickled, and background work is fire-and-forget. DhtNode
keeps the library's routing table and RPCs and replaces those parts:

- ``get`` asks the k closest nodes for the key, with ``alpha`` RPCs always in flight
  (a slow node never holds up the others), re-verifies every record it receives,
  and merges them by slot with the local copies;
- ``put`` stores at the k closest nodes and raises ``DhtError`` when none stored it;
- ``publish`` keeps the node's own records alive by republishing them; nothing else
  is ever re-stored;
- node id and contacts are saved as JSON for a fast rejoin;
- every task belongs to the node and ``stop`` cancels it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dhtshare.atomic import read_json, write_atomic, write_json
from dhtshare.crypto import DHT_KEY_SIZE
from dhtshare.dht.protocol import DhtProtocol, DialBackSink, ReachReply, Reply, RpcTimeouts
from dhtshare.dht.routing import DiverseRoutingTable, pick_diverse
from dhtshare.dht.sources import source_of
from dhtshare.dht.storage import ValidatingStorage
from dhtshare.errors import DhtError, RecordError
from dhtshare.records import MAX_RECORD_SIZE, SignedRecord, decode_record, verify_record
from dhtshare.stats import Counters

__all__ = ["DhtNode", "LookupStats"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_SAVED_CONTACTS = 200
_HELD = struct.Struct(">H")  # a saved record: u16 size, the 20-byte key, the record
_KEY_LEN = 20
_JOIN_ATTEMPTS = 3
_JOIN_BACKOFF = 0.5  # seconds, times the attempt number
Address = tuple[str, int]
Renew = Callable[[SignedRecord], SignedRecord]


@dataclass(frozen=True, slots=True)
class LookupStats:
    """What one lookup cost: RPCs sent, how many failed, nodes that answered, seconds."""

    rpcs: int
    failures: int
    answered: int
    seconds: float


@dataclass(slots=True)
class _Publication:
    """One of this node's own records that it keeps alive."""

    record: SignedRecord
    due: float
    renew: Renew | None


class _Candidates:
    """The nodes a lookup knows of, nearest to its target first.

    Only the k nearest count, chosen within the routing table's per-address limits
    (``routing.pick_diverse``): one id per endpoint (the nearest one heard of), a few
    per address and per prefix, so a reply naming many ids at one address cannot take
    the k places. A node that failed is dropped and never taken back, so a dead node
    another reply mentions again cannot hold one of the k places. (kademlia's
    ``NodeHeap`` scans every entry on each push and takes failed nodes back.)
    """

    __slots__ = ("_endpoints", "_nodes", "_order", "_prefix", "failed", "k", "target")

    def __init__(self, target: Node, k: int) -> None:
        self.target: int = target.long_id
        self.k = k
        self._order: list[tuple[int, bytes]] = []
        self._nodes: dict[bytes, Node] = {}
        self._prefix: dict[bytes, str] = {}
        self._endpoints: dict[Address, bytes] = {}
        self.failed: set[bytes] = set()

    def push(self, nodes: Iterable[Node]) -> None:
        """Add ``nodes``; an endpoint keeps the id nearest to the target it was named with.

        Not the first one: a reply could otherwise name an honest node's endpoint under
        a far id before anyone names its real one, and hide it from the lookup. (A
        nearer false id only gets the honest node asked; an endpoint that failed stays
        out.)
        """
        for node in nodes:
            if node.id in self._nodes or node.id in self.failed:
                continue
            endpoint = (str(node.ip), int(node.port))
            held_id = self._endpoints.get(endpoint)
            if held_id is not None:
                held = self._nodes.get(held_id)
                if held is None or held.long_id ^ self.target <= node.long_id ^ self.target:
                    continue
                self._remove(held)
            self._endpoints[endpoint] = node.id
            self._nodes[node.id] = node
            self._prefix[node.id] = source_of(endpoint[0]).prefix
            bisect.insort(self._order, (node.long_id ^ self.target, node.id))

    def drop(self, node: Node) -> None:
        self.failed.add(node.id)
        self._remove(node)

    def _remove(self, node: Node) -> None:
        self._prefix.pop(node.id, None)
        if self._nodes.pop(node.id, None) is not None:
            del self._order[bisect.bisect_left(self._order, (node.long_id ^ self.target, node.id))]

    def nearest(self) -> list[Node]:
        first = [node_id for _d, node_id in self._order[: self.k]]
        if len({self._prefix[node_id] for node_id in first}) == len(first):
            return [self._nodes[node_id] for node_id in first]  # one per prefix: within limits
        return pick_diverse((self._nodes[node_id] for _d, node_id in self._order), self.k)


@dataclass(slots=True)
class _Crawl:
    """State of one iterative lookup towards ``target``."""

    target: Node
    candidates: _Candidates
    self_id: bytes
    found: dict[bytes, SignedRecord] = field(default_factory=dict)
    answered: set[bytes] = field(default_factory=set)
    contacted: set[bytes] = field(default_factory=set)
    rpcs: int = 0
    failures: int = 0
    budget: int | None = None  # most RPCs this crawl may send (None: no limit)

    def next_peer(self) -> Node | None:
        """The closest of the k nearest nodes not yet asked (None when done or spent)."""
        if self.budget is not None and self.rpcs >= self.budget:
            return None
        for node in self.candidates.nearest():
            if node.id not in self.contacted:
                self.contacted.add(node.id)
                self.rpcs += 1
                return node
        return None

    def closest_answered(self) -> list[Node]:
        """The k nearest nodes that answered."""
        return [n for n in self.candidates.nearest() if n.id in self.answered]


class DhtNode(Server):  # type: ignore[misc]
    """One DHT node holding and finding signed records. See docs/dht.md.

    Without ``node_id`` the id is 20 bytes from ``os.urandom``: never derived from a
    member's identity (issue 17), and unlike kademlia's default (``random``), not repeated
    by a process that seeds the ``random`` module. A node keeps its id across restarts
    only through its saved state (``save_state``, ``load_state``)."""

    protocol_class = DhtProtocol

    def __init__(
        self,
        ksize: int = 20,
        alpha: int = 3,
        node_id: bytes | None = None,
        *,
        clock: Callable[[], float] = time.time,
        stats: Counters | None = None,
        storage: ValidatingStorage | None = None,
        timeouts: RpcTimeouts | None = None,
        republish_interval: float = 1800.0,
        maintenance_interval: float = 60.0,
        fill_rpcs: int = 6,
    ) -> None:
        if stats is None:
            stats = storage.stats if storage is not None else Counters()
        self.stats = stats
        storage = storage or ValidatingStorage(clock=clock, stats=stats)
        super().__init__(ksize, alpha, node_id or os.urandom(DHT_KEY_SIZE), storage)
        self.storage: ValidatingStorage = storage
        self.protocol: DhtProtocol | None = None
        self.clock = clock
        self.timeouts = timeouts or RpcTimeouts()
        self.republish_interval = republish_interval
        self.maintenance_interval = maintenance_interval
        self.fill_rpcs = fill_rpcs
        self.lookups: deque[LookupStats] = deque(maxlen=10_000)
        self._published: dict[tuple[bytes, bytes], _Publication] = {}
        self._maintenance: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------

    def _create_protocol(self) -> DhtProtocol:
        proto = DhtProtocol(
            self.node,
            self.storage,
            self.ksize,
            clock=self.clock,
            stats=self.stats,
            timeouts=self.timeouts,
        )
        proto.router = DiverseRoutingTable(proto, self.ksize, self.node)
        return proto

    async def listen(self, port: int = 0, interface: str = "127.0.0.1") -> None:
        """Bind the UDP socket (port 0 picks a free port) and start maintenance."""
        await super().listen(port, interface)

    def refresh_table(self, interval: float = 3600) -> None:
        """Start the owned maintenance task (kademlia would fire-and-forget here)."""
        if self._maintenance is None:
            loop = asyncio.get_running_loop()
            self._maintenance = loop.create_task(self._maintain(interval))

    async def _maintain(self, refresh_interval: float) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(self.maintenance_interval)
            refresh = time.monotonic() - last_refresh >= refresh_interval
            if refresh:
                last_refresh = time.monotonic()
            try:
                await self._maintain_once(refresh)
            except Exception:
                self.stats.incr("error.maintenance")
                log.exception("DHT maintenance failed")

    async def _maintain_once(self, refresh: bool) -> None:
        """Expire records, republish what is due and, when ``refresh``, lonely buckets."""
        self.storage.expire(self.clock())
        if refresh:
            await self._refresh_table()
        else:
            await self.republish()

    async def _refresh_table(self) -> None:
        """Look up a random id in every lonely bucket, then republish what is due.

        Replaces kademlia's version, which re-stores every value the node holds
        (including other nodes' stale ones, issue #107).
        """
        proto = self._proto()
        for node_id in proto.get_refresh_ids():
            await self._crawl(node_id, want_values=False)
        await self.republish()

    @property
    def address(self) -> Address:
        """``(host, port)`` this node listens on."""
        if self.transport is None:
            raise DhtError("DHT node is not listening", hint="call listen() first")
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    @property
    def running(self) -> bool:
        """True between ``listen`` and ``stop``."""
        return self.transport is not None and not self.transport.is_closing()

    def stop(self) -> None:
        """Cancel every task this node owns, fail pending RPCs, close the socket."""
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.protocol is not None:
            self.protocol.close()
        super().stop()

    async def aclose(self) -> None:
        """``stop`` and wait until the cancelled tasks have finished."""
        tasks = [t for t in self._owned_tasks() if not t.done()]
        self.stop()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _owned_tasks(self) -> list[asyncio.Task[Any]]:
        tasks = list(self.protocol.tasks) if self.protocol is not None else []
        return tasks + ([self._maintenance] if self._maintenance is not None else [])

    def _proto(self) -> DhtProtocol:
        if self.protocol is None:
            raise DhtError("DHT node is not listening", hint="call listen() first")
        return self.protocol

    # ---- joining ---------------------------------------------------------------

    async def bootstrap(self, addrs: list[Address]) -> int:
        """Join through ``addrs``; return how many contacts the node then knows.

        As in the Kademlia paper: look up our own id, then fill every bucket farther
        away than our closest neighbours (kademlia 2.2.3 skips this step, so in a
        young network a node knows almost nobody in the other half of the id space
        and lookups there converge on the wrong nodes). A join that reached nobody
        (a lost datagram, a busy bootstrap node) is retried twice, after 0.5 s and 1 s.
        """
        for attempt in range(_JOIN_ATTEMPTS):
            if attempt:
                self.stats.incr("join.retry")
                await asyncio.sleep(_JOIN_BACKOFF * attempt)
            seeds = await self._ping_all(addrs)
            crawl = await self._crawl(self.node.id, want_values=False, seeds=seeds)
            if crawl.answered:
                await self._fill_far_buckets(crawl)
                break
        # contacts found by the crawl join the table once they answer a ping with their id
        await self._proto().validations()
        return self.contact_count()

    async def _fill_far_buckets(self, own: _Crawl) -> None:
        """One budgeted lookup of a random id at each distance farther than our neighbours.

        The k closest nodes found by the own-id lookup share at least ``depth``
        leading bits with us; for each shorter shared prefix, look up a random id
        with exactly that prefix, asking at most ``fill_rpcs`` nodes. Every node that
        answers lands in the bucket for that distance.
        """
        closest = own.closest_answered()
        if not closest or self.fill_rpcs <= 0:
            return
        depth = min(_shared_bits(self.node.id, n.id) for n in closest)
        targets = [_random_id_at(self.node.id, bits) for bits in range(depth)]
        await asyncio.gather(
            *(self._crawl(t, want_values=False, budget=self.fill_rpcs) for t in targets)
        )

    async def _ping_all(self, addrs: list[Address]) -> list[Node]:
        proto = self._proto()
        replies = await asyncio.gather(
            *(proto.ping((str(a[0]), int(a[1])), self.node.id) for a in addrs)
        )
        return [
            Node(reply[1], str(a[0]), int(a[1]))
            for a, reply in zip(addrs, replies, strict=True)
            if reply[0] and len(reply[1]) == len(self.node.id) and reply[1] != self.node.id
        ]

    async def ping(self, address: Address) -> bool:
        """Whether ``address`` answers a DHT ping (the RPC timeout bounds the wait)."""
        answered, _ = await self._proto().ping(address, self.node.id)
        return bool(answered)

    async def reach(self, address: Address, nonce: bytes) -> ReachReply | None:
        """Ask ``address`` where it sees us and to dial us back with ``nonce`` (16 bytes).

        None if it did not answer (the RPC timeout bounds the wait). The dial-backs, if
        ``dialing``, arrive at the sink set by ``set_dialback_sink`` (UDP) and at the
        peer server on our TCP port (``DIALBACK`` frame).
        """
        answered, reply = await self._proto().reach(address, self.node.id, nonce)
        return reply if answered and isinstance(reply, ReachReply) else None

    async def find_more(self) -> int:
        """Look up our own id to meet more nodes; how many contacts the table then holds.

        The nodes that answer join the table once they answer a ping with their id
        (awaited here, each ping bounded by the RPC timeout).
        """
        await self._crawl(self.node.id, want_values=False)
        await self._proto().validations()
        return self.contact_count()

    def rpc_timeout(self, address: Address) -> float:
        """The timeout the next RPC to ``address`` gets (from its measured round trips)."""
        return self._proto().rpc_timeout(address)

    def set_dialback_sink(self, sink: DialBackSink | None) -> None:
        """Call ``sink(nonce, source)`` for each UDP dial-back datagram this node receives."""
        self._proto().dialback_sink = sink

    @property
    def client_mode(self) -> bool:
        """True while the node runs in DHT client mode (answers pings with empty bytes, so
        other nodes keep it out of their routing tables). Its own lookups work as before."""
        return self.protocol is not None and self.protocol.client_mode

    def set_client_mode(self, client: bool) -> None:
        """Enter (True) or leave (False) DHT client mode; on a change, tell the contacts
        (each pings the node and learns its mode)."""
        self._proto().set_client_mode(client)

    def contact_count(self) -> int:
        """Contacts in the routing table (not counting replacement caches)."""
        return sum(len(b) for b in self._proto().router.buckets)

    def contacts(self) -> list[Node]:
        """Every contact in the routing table."""
        return [n for b in self._proto().router.buckets for n in b.get_nodes()]

    # ---- the lookup ------------------------------------------------------------

    async def _crawl(
        self,
        target: bytes,
        *,
        want_values: bool,
        seeds: list[Node] | None = None,
        budget: int | None = None,
    ) -> _Crawl:
        """Ask the k nodes closest to ``target``, keeping ``alpha`` RPCs in flight."""
        crawl, _stats = await self._crawl_with_stats(
            target, want_values=want_values, seeds=seeds, budget=budget
        )
        return crawl

    async def _crawl_with_stats(
        self,
        target: bytes,
        *,
        want_values: bool,
        seeds: list[Node] | None = None,
        budget: int | None = None,
    ) -> tuple[_Crawl, LookupStats]:
        proto = self._proto()
        node = Node(target)
        crawl = _Crawl(node, _Candidates(node, self.ksize), self.node.id, budget=budget)
        crawl.candidates.push(seeds if seeds is not None else proto.nearest(target))
        call = proto.call_find_value if want_values else proto.call_find_node
        started = time.monotonic()
        pending: dict[asyncio.Task[Reply], Node] = {}
        try:
            while True:
                self._fill(crawl, pending, call)
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._absorb(crawl, pending.pop(task), task.result())
        finally:
            for task in pending:
                task.cancel()
        return crawl, self._record_lookup(crawl, time.monotonic() - started)

    def _fill(
        self,
        crawl: _Crawl,
        pending: dict[asyncio.Task[Reply], Node],
        call: Callable[[Node, Node], Any],
    ) -> None:
        loop = asyncio.get_running_loop()
        while len(pending) < self.alpha:
            peer = crawl.next_peer()
            if peer is None:
                return
            pending[loop.create_task(call(peer, crawl.target))] = peer

    def _absorb(self, crawl: _Crawl, peer: Node, reply: Reply) -> None:
        answered, body = reply
        if not answered:
            crawl.failures += 1
            crawl.candidates.drop(peer)
            return
        crawl.answered.add(peer.id)
        contacts = body.get("nodes", []) if isinstance(body, dict) else body
        fresh = [Node(*c) for c in contacts if c[0] != self.node.id]
        crawl.candidates.push(fresh)
        if isinstance(body, dict):
            for raw in body["value"]:
                self._merge(crawl.found, crawl.target.id, raw)

    def _merge(self, found: dict[bytes, SignedRecord], key: bytes, raw: bytes) -> None:
        """Verify ``raw`` as a record for ``key`` and keep it if newest in its slot."""
        try:
            rec = decode_record(raw)
            verify_record(rec, self.clock())
        except RecordError:
            self.stats.incr("lookup.bad_record")
            return
        if rec.dht_key != key:
            self.stats.incr("lookup.wrong_key")
            return
        held = found.get(rec.slot)
        if held is None or rec.rank > held.rank:
            found[rec.slot] = rec

    def _record_lookup(self, crawl: _Crawl, seconds: float) -> LookupStats:
        stats = LookupStats(crawl.rpcs, crawl.failures, len(crawl.answered), seconds)
        self.lookups.append(stats)
        self.stats.incr("lookup")
        self.stats.incr("lookup.rpcs", crawl.rpcs)
        return stats

    async def get(self, key: bytes) -> list[SignedRecord]:
        """Every valid record under ``key`` held by the k closest nodes or locally.

        Merged by slot (highest ``seq`` wins), newest first. An empty list means
        nobody reachable holds a record under ``key``.
        """
        records, _stats = await self.lookup(key)
        return records

    async def lookup(self, key: bytes) -> tuple[list[SignedRecord], LookupStats]:
        """``get``, plus what this one lookup cost (also appended to ``lookups``)."""
        crawl, stats = await self._crawl_with_stats(key, want_values=True)
        for rec in self.storage.records(key, self.clock()):
            held = crawl.found.get(rec.slot)
            if held is None or rec.rank > held.rank:
                crawl.found[rec.slot] = rec
        records = sorted(crawl.found.values(), key=lambda r: (r.issued, r.seq), reverse=True)
        return records, stats

    # ---- storing ---------------------------------------------------------------

    async def put(self, record: SignedRecord) -> int:
        """Store ``record`` at the k closest nodes; return how many kept it.

        The node also keeps its own copy. Raises ``RecordError`` if the record does
        not verify, ``DhtError`` if no other node stored it.
        """
        verify_record(record, self.clock())
        key, raw = record.dht_key, record.encode()
        self.storage.add(key, raw, self.clock(), own=True)
        crawl = await self._crawl(key, want_values=False)
        nodes = crawl.closest_answered()
        proto = self._proto()
        replies = await asyncio.gather(*(proto.call_store(n, key, raw) for n in nodes))
        stored = sum(1 for ok, kept in replies if ok and kept is True)
        self.stats.incr("put")
        if stored == 0 and self.contact_count() == 0:
            raise DhtError(
                "not connected to any node: this node knows no other DHT node",
                hint="a node started with --bootstrap joins again by itself once that node"
                " answers: retry then; else restart it with one: dhtshare node stop, then"
                " dhtshare node start --bootstrap HOST:PORT --detach",
            )
        if stored == 0:
            raise DhtError(
                "no DHT node stored the record",
                hint="check that other nodes are running and the bootstrap address is right",
            )
        return stored

    async def set_digest(self, dkey: bytes, value: bytes) -> bool:
        """kademlia's entry point: ``value`` must be an encoded record for ``dkey``."""
        rec = decode_record(value)
        if rec.dht_key != dkey:
            raise RecordError("record does not belong under this key")
        await self.put(rec)
        return True

    async def publish(self, record: SignedRecord, renew: Renew | None = None) -> int:
        """``put`` and keep republishing ``record`` while the node runs.

        The record stays registered even if this first ``put`` raises ``DhtError``,
        so the republish loop retries it. ``renew`` (old record -> newer one, higher
        seq) is called when the record would expire before the next republish.
        """
        now = self.clock()
        due = now + self.republish_interval
        self._published[(record.dht_key, record.slot)] = _Publication(record, due, renew)
        return await self.put(record)

    def withdraw(self, key: bytes, slot: bytes) -> None:
        """Stop republishing the record in ``slot`` under ``key`` and drop the local copy."""
        self._published.pop((key, slot), None)
        self.storage.remove(key, slot)

    @property
    def published(self) -> list[SignedRecord]:
        """The records this node keeps alive."""
        return [p.record for p in self._published.values()]

    async def republish(self, now: float | None = None) -> int:
        """Put every published record that is due; return how many were stored."""
        now = self.clock() if now is None else now
        done = 0
        for pub in [p for p in self._published.values() if p.due <= now]:
            if pub.due <= now:  # a republish running beside this one may have put it
                done += await self._republish_one(pub, now)
        return done

    async def republish_all(self) -> int:
        """Put every published record now, due or not (after a rejoin); how many."""
        now = self.clock()
        for pub in self._published.values():
            pub.due = min(pub.due, now)
        return await self.republish(now)

    async def _republish_one(self, pub: _Publication, now: float) -> int:
        if pub.renew is not None and pub.record.expires <= now + self.republish_interval:
            pub.record = pub.renew(pub.record)
        if pub.record.expires <= now:
            self.withdraw(pub.record.dht_key, pub.record.slot)
            return 0
        pub.due = now + self.republish_interval
        try:
            await self.put(pub.record)
        except DhtError:
            self.stats.incr("republish.failed")
            return 0
        self.stats.incr("republish")
        return 1

    # ---- state -----------------------------------------------------------------

    def save_state(self, fname: str | os.PathLike[str]) -> None:
        """Write id, parameters and contacts as JSON, atomically."""
        doc = {
            "version": STATE_VERSION,
            "id": self.node.id.hex(),
            "ksize": self.ksize,
            "alpha": self.alpha,
            "contacts": [[n.id.hex(), n.ip, n.port] for n in self.contacts()[:_MAX_SAVED_CONTACTS]],
        }
        write_json(Path(fname), doc)

    def save_records(self, fname: str | os.PathLike[str]) -> int:
        """Write every record this node holds to ``fname`` (atomically), so a restart keeps
        them: on a network where most nodes are behind NAT (DHT clients, which store
        nothing), the few public nodes hold every record. How many were written."""
        chunks = [
            _HELD.pack(len(raw)) + key + raw
            for key, raw in self.storage
            if len(key) == _KEY_LEN and len(raw) <= MAX_RECORD_SIZE
        ]
        write_atomic(Path(fname), b"".join(chunks))
        return len(chunks)

    def load_records(self, fname: str | os.PathLike[str]) -> int:
        """Store again the records ``save_records`` wrote (each checked as on a ``store``:
        signature, key and expiry; expired ones drop out); how many were kept. A missing
        or damaged file keeps what could be read."""
        try:
            data = Path(fname).read_bytes()
        except OSError:
            return 0
        now, kept, pos = self.storage.clock(), 0, 0
        while pos + _HELD.size + _KEY_LEN <= len(data):
            (size,) = _HELD.unpack_from(data, pos)
            start = pos + _HELD.size
            key = data[start : start + _KEY_LEN]
            raw = data[start + _KEY_LEN : start + _KEY_LEN + size]
            if size > MAX_RECORD_SIZE or len(raw) < size:
                break
            kept += self.storage.offer(key, raw, now)
            pos = start + _KEY_LEN + size
        return kept

    @classmethod
    async def load_state(
        cls,
        fname: str | os.PathLike[str],
        port: int = 0,
        interface: str = "127.0.0.1",
        **kwargs: Any,
    ) -> DhtNode:
        """Start a node with the saved id and rejoin by pinging its saved contacts.

        A rejoin costs one ping per saved contact (one round trip, in parallel)
        instead of a bootstrap crawl. Raises ``DhtError`` if the file is unusable.
        """
        doc = _read_state(Path(fname))
        node = cls(doc["ksize"], doc["alpha"], bytes.fromhex(doc["id"]), **kwargs)
        await node.listen(port, interface)
        addrs = [(str(ip), int(p)) for _id, ip, p in doc["contacts"]]
        for peer in await node._ping_all(addrs):
            node._proto().welcome_if_new(peer)
        return node


def _shared_bits(a: bytes, b: bytes) -> int:
    """Leading bits ``a`` and ``b`` have in common."""
    bits = len(a) * 8
    return bits - (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length()


def _random_id_at(own: bytes, shared: int) -> bytes:
    """A random id whose first ``shared`` bits equal ``own``'s and whose next bit differs."""
    bits = len(own) * 8
    flip = bits - 1 - shared
    mine = int.from_bytes(own, "big")
    prefix = ((mine >> flip) ^ 1) << flip
    rest = int.from_bytes(os.urandom(len(own)), "big") & ((1 << flip) - 1)
    return (prefix | rest).to_bytes(len(own), "big")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        doc = read_json(path)
        ok = doc["version"] == STATE_VERSION and len(bytes.fromhex(doc["id"])) == 20
        contacts_ok = all(len(c) == 3 for c in doc["contacts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DhtError(f"cannot read DHT state {path}: {exc}", hint="delete the file") from exc
    if not (ok and contacts_ok):
        raise DhtError(f"DHT state {path} has an unknown format", hint="delete the file")
    return dict(doc)
