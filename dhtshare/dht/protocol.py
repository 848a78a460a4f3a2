"""KademliaProtocol subclass: guarded datagram intake, owned tasks, adaptive RPC timeouts.

rpcudp 5.0.1 decodes msgpack unguarded, takes ``*args`` from the wire, runs every
request in a fire-and-forget task, calls ``set_result`` on futures a caller may have
cancelled, and waits 5 s for every reply. kademlia 2.2.3's ``welcome_if_new`` judges
closeness on a re-hashed key and re-pushes values to a node in a bucket's
replacement cache on every reply from it (a loop). This module closes all of that at
the library's seams: it overrides ``datagram_received``, defines the four RPC stubs
explicitly instead of relying on rpcudp's ``__getattr__`` closures, and overrides
``welcome_if_new``, ``handle_call_response``, ``rpc_store`` and ``rpc_find_value``.
See docs/dht.md.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import importlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from dhtshare.dht.storage import DEFAULT_REPLY_BUDGET, ValidatingStorage
from dhtshare.errors import DhtError
from dhtshare.stats import Counters

__all__ = ["MAX_DATAGRAM", "DhtProtocol", "RpcTimeouts"]

log = logging.getLogger(__name__)

MSG_ID_LEN = 20
ID_LEN = 20
#: rpcudp refuses requests whose msgpack body exceeds 8192 bytes; plus type byte and msg id.
MAX_DATAGRAM = 8192 + 1 + MSG_ID_LEN
#: Bytes of encoded records a find_value reply may carry (the rest is for contacts).
REPLY_VALUE_BUDGET = DEFAULT_REPLY_BUDGET
_REQUEST = b"\x00"
_RESPONSE = b"\x01"
_MAX_NODES_IN_REPLY = 64
_MAX_VALUES_IN_REPLY = 256
_RECENT_PUSHES = 4096
_RTT_ENTRIES = 4096

Reply = tuple[bool, Any]


def _codec() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """msgpack's C codec when installed (byte-identical output, ~25x faster), else umsgpack.

    rpcudp encodes with umsgpack; ``msgpack.packb(use_bin_type=True)`` writes the same
    bytes and ``unpackb(raw=False)`` reads them back the same (str stays str, bin
    stays bytes, arrays are lists), so peers cannot tell which one a node uses.
    """
    try:
        fast = importlib.import_module("msgpack")
    except ImportError:
        return umsgpack.packb, umsgpack.unpackb
    pack = functools.partial(fast.packb, use_bin_type=True)
    unpack = functools.partial(fast.unpackb, raw=False)
    return pack, unpack


packb, unpackb = _codec()


@dataclass(frozen=True, slots=True)
class RpcTimeouts:
    """Per-RPC timeout bounds; the timeout is ``clamp(max(4*srtt, srtt+4*rttvar))``."""

    minimum: float = 0.2
    maximum: float = 2.0
    initial: float = 1.0


@dataclass(slots=True)
class _Rtt:
    """Smoothed round-trip estimate for one address (RFC 6298 weights)."""

    srtt: float
    rttvar: float

    def update(self, sample: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
        self.srtt = 0.875 * self.srtt + 0.125 * sample


@dataclass(slots=True)
class _Pending:
    """One request waiting for its reply."""

    name: str
    address: tuple[str, int]
    sent_at: float
    future: asyncio.Future[Reply]
    timer: asyncio.TimerHandle | None = field(default=None)


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == ID_LEN


def _is_contact(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and _is_id(value[0])
        and isinstance(value[1], str)
        and isinstance(value[2], int)
        and 0 < value[2] < 65536
    )


def _is_contacts(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= _MAX_NODES_IN_REPLY
        and all(_is_contact(c) for c in value)
    )


def _is_values(value: object) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= _MAX_VALUES_IN_REPLY
        and all(isinstance(v, bytes) for v in value)
    )


def _is_value_reply(value: object) -> bool:
    if not isinstance(value, dict) or not _is_values(value.get("value")):
        return False
    return set(value) <= {"value", "nodes"} and _is_contacts(value.get("nodes", []))


#: Argument checks for each RPC a peer may call on us (arity and types).
_REQUEST_SHAPES: dict[str, Callable[[list[Any]], bool]] = {
    "ping": lambda a: len(a) == 1 and _is_id(a[0]),
    "store": lambda a: len(a) == 3 and _is_id(a[0]) and _is_id(a[1]) and isinstance(a[2], bytes),
    "find_node": lambda a: len(a) == 2 and _is_id(a[0]) and _is_id(a[1]),
    "find_value": lambda a: len(a) == 2 and _is_id(a[0]) and _is_id(a[1]),
}

#: Checks for each reply, by the RPC we sent.
_REPLY_SHAPES: dict[str, Callable[[object], bool]] = {
    "ping": _is_id,
    "store": lambda r: isinstance(r, bool),
    "find_node": _is_contacts,
    "find_value": lambda r: _is_contacts(r) or _is_value_reply(r),
}


def parse_request(data: object) -> tuple[str, list[Any]] | None:
    """``(name, args)`` if ``data`` is a well-formed request for a known RPC, else None."""
    if not isinstance(data, list) or len(data) != 2:
        return None
    name, args = data
    if not isinstance(name, str) or not isinstance(args, list):
        return None
    check = _REQUEST_SHAPES.get(name)
    if check is None or not check(args):
        return None
    return name, args


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """Kademlia's protocol with every network input checked and every task owned."""

    def __init__(
        self,
        source_node: Node,
        storage: ValidatingStorage,
        ksize: int,
        *,
        clock: Callable[[], float] = time.time,
        stats: Counters | None = None,
        timeouts: RpcTimeouts | None = None,
        max_failures: int = 2,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.storage: ValidatingStorage = storage
        self.ksize = ksize
        self.clock = clock
        self.stats = stats if stats is not None else Counters()
        self.timeouts = timeouts or RpcTimeouts()
        self.max_failures = max_failures
        self._outstanding: dict[bytes, _Pending] = {}
        self._rtt: OrderedDict[tuple[str, int], _Rtt] = OrderedDict()
        self._all_rtt: _Rtt | None = None
        self._failures: dict[bytes, int] = {}
        self._recent_pushes: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ---- datagram intake -------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """Decode and dispatch one datagram; anything malformed is dropped and counted."""
        if self._closed:
            return
        if len(data) < 1 + MSG_ID_LEN + 1:
            self.stats.incr("drop.short")
            return
        if len(data) > MAX_DATAGRAM:
            self.stats.incr("drop.oversize")
            return
        kind, msg_id = data[:1], data[1 : 1 + MSG_ID_LEN]
        if kind not in (_REQUEST, _RESPONSE):
            self.stats.incr("drop.unknown_type")
            return
        try:
            body = unpackb(data[1 + MSG_ID_LEN :])
        except Exception:
            self.stats.incr("drop.bad_msgpack")
            return
        if kind == _REQUEST:
            self._on_request(msg_id, body, addr)
        else:
            self._on_response(msg_id, body, addr)

    def _on_request(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        parsed = parse_request(body)
        if parsed is None:
            self.stats.incr("drop.bad_request")
            return
        name, args = parsed
        try:
            reply = getattr(self, f"rpc_{name}")(addr, *args)
        except Exception:
            self.stats.incr("error.handler")
            log.debug("rpc_%s from %s failed", name, addr, exc_info=True)
            return
        self.stats.incr(f"rpc_in.{name}")
        self._send(_RESPONSE + msg_id + packb(reply), addr)

    def _on_response(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            self.stats.incr("drop.unexpected_reply")
            return
        if tuple(addr[:2]) != pending.address:
            self.stats.incr("drop.wrong_sender")
            return
        if not _REPLY_SHAPES[pending.name](body):
            self.stats.incr("drop.bad_reply")
            self._resolve(msg_id, (False, None))
            return
        self._observe_rtt(pending.address, time.monotonic() - pending.sent_at)
        self._resolve(msg_id, (True, body))

    def _send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if len(datagram) > MAX_DATAGRAM:
            self.stats.incr("drop.reply_too_big")
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(datagram, addr)

    # ---- outgoing RPCs ---------------------------------------------------------

    def ping(self, address: tuple[str, int], nodeid: bytes) -> asyncio.Future[Reply]:
        """Send ``ping``; the future gives ``(answered, their_id)``."""
        return self._call(address, "ping", nodeid)

    def store(
        self, address: tuple[str, int], nodeid: bytes, key: bytes, value: bytes
    ) -> asyncio.Future[Reply]:
        """Send ``store``; the future gives ``(answered, accepted)``."""
        return self._call(address, "store", nodeid, key, value)

    def find_node(
        self, address: tuple[str, int], nodeid: bytes, key: bytes
    ) -> asyncio.Future[Reply]:
        """Send ``find_node``; the future gives ``(answered, contacts)``."""
        return self._call(address, "find_node", nodeid, key)

    def find_value(
        self, address: tuple[str, int], nodeid: bytes, key: bytes
    ) -> asyncio.Future[Reply]:
        """Send ``find_value``; the future gives ``(answered, contacts or {"value": ...})``."""
        return self._call(address, "find_value", nodeid, key)

    def _call(self, address: tuple[str, int], name: str, *args: Any) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        address = (str(address[0]), int(address[1]))
        body = packb([name, list(args)])
        if len(body) > MAX_DATAGRAM - 1 - MSG_ID_LEN:
            raise DhtError(f"{name} request of {len(body)} bytes exceeds the datagram limit")
        if self._closed or self.transport is None:
            future.set_result((False, None))
            return future
        msg_id = os.urandom(MSG_ID_LEN)
        pending = _Pending(name, address, time.monotonic(), future)
        pending.timer = loop.call_later(self.rpc_timeout(address), self._expire, msg_id)
        self._outstanding[msg_id] = pending
        future.add_done_callback(lambda _f: self._forget(msg_id))
        self.stats.incr(f"rpc_out.{name}")
        self.transport.sendto(_REQUEST + msg_id + body, address)
        return future

    def _expire(self, msg_id: bytes) -> None:
        self.stats.incr("rpc_timeout")
        self._resolve(msg_id, (False, None))

    def _resolve(self, msg_id: bytes, reply: Reply) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(reply)
        self._forget(msg_id)

    def _forget(self, msg_id: bytes) -> None:
        """Drop the entry and its timer; also runs when a caller cancels the future."""
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and pending.timer is not None:
            pending.timer.cancel()

    # ---- timeouts and contact health --------------------------------------------

    def rpc_timeout(self, address: tuple[str, int]) -> float:
        """Timeout for the next RPC to ``address``, from its measured round trips.

        An address never measured gets the estimate over all peers (the network is
        usually alike), and only with no sample at all ``timeouts.initial``.
        """
        bounds = self.timeouts
        rtt = self._rtt.get(address, self._all_rtt)
        if rtt is None:
            return min(max(bounds.initial, bounds.minimum), bounds.maximum)
        estimate = max(4 * rtt.srtt, rtt.srtt + 4 * rtt.rttvar)
        return min(max(estimate, bounds.minimum), bounds.maximum)

    def _observe_rtt(self, address: tuple[str, int], sample: float) -> None:
        if self._all_rtt is None:
            self._all_rtt = _Rtt(sample, sample / 2)
        else:
            self._all_rtt.update(sample)
        rtt = self._rtt.get(address)
        if rtt is None:
            self._rtt[address] = _Rtt(sample, sample / 2)
            if len(self._rtt) > _RTT_ENTRIES:
                self._rtt.popitem(last=False)
        else:
            rtt.update(sample)

    def handle_call_response(self, result: Reply, node: Node) -> Reply:
        """Welcome a node that answered; evict one after ``max_failures`` failures in a row."""
        if result[0]:
            self._failures.pop(node.id, None)
            self.welcome_if_new(node)
            return result
        failures = self._failures.get(node.id, 0) + 1
        if failures >= self.max_failures:
            self._failures.pop(node.id, None)
            self.router.remove_contact(node)
            self.stats.incr("contact_evicted")
        else:
            self._failures[node.id] = failures
        return result

    # ---- store push to new nodes (welcome_if_new) ---------------------------------

    def is_known(self, node: Node) -> bool:
        """True if ``node`` is in its bucket or waiting in that bucket's replacement cache."""
        bucket = self.router.buckets[self.router.get_bucket_for(node)]
        return node.id in bucket.nodes or node.id in bucket.replacement_nodes

    def welcome_if_new(self, node: Node) -> None:
        """Add a genuinely new node and push it the records it should hold.

        Unlike kademlia's version: a node waiting in a replacement cache is not new;
        closeness is judged on the real key (not ``digest(key)``); the node must be
        among the k closest known to the key and we the closest; and the same record
        is never pushed to the same node twice (bounded memory of recent pushes).
        """
        if node.id == self.source_node.id or self.is_known(node):
            return
        for key, raw in self.storage.items(self.clock()):
            if self._should_push(node, key, raw):
                self._spawn(self._push(node, key, raw))
        self.router.add_contact(node)

    def _should_push(self, node: Node, key: bytes, raw: bytes) -> bool:
        marker = (node.id, key, raw[-16:])
        if marker in self._recent_pushes:
            return False
        keynode = Node(key)
        neighbors = self.nearest(key)
        if neighbors:
            full = len(neighbors) >= self.ksize
            if full and node.distance_to(keynode) >= neighbors[-1].distance_to(keynode):
                return False
            if self.source_node.distance_to(keynode) >= neighbors[0].distance_to(keynode):
                return False
        self._recent_pushes[marker] = None
        if len(self._recent_pushes) > _RECENT_PUSHES:
            self._recent_pushes.popitem(last=False)
        return True

    async def _push(self, node: Node, key: bytes, raw: bytes) -> None:
        self.stats.incr("push")
        await self.call_store(node, key, raw)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task this protocol owns (cancelled by ``close``)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats.incr("error.task")
            log.debug("background RPC task failed", exc_info=task.exception())

    # ---- request handlers -------------------------------------------------------

    def nearest(self, key: bytes, k: int | None = None, exclude: Node | None = None) -> list[Node]:
        """The ``k`` contacts nearest to ``key`` by XOR distance.

        kademlia's ``find_neighbors`` walks buckets outwards from the key's bucket and
        stops at the first k nodes it meets, which need not be the nearest; this
        looks at every contact (a table holds a few hundred at most).
        """
        target = int.from_bytes(key, "big")
        buckets = self.router.buckets
        buckets[self.router.get_bucket_for(Node(key))].touch_last_updated()
        candidates = [
            n
            for b in buckets
            for n in b.nodes.values()
            if n.id != key and (exclude is None or not n.same_home_as(exclude))
        ]
        return heapq.nsmallest(k or self.ksize, candidates, key=lambda n: n.long_id ^ target)

    def rpc_find_node(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes
    ) -> list[tuple[Any, ...]]:
        """Our k contacts nearest to ``key`` (never the asking node itself)."""
        source = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(source)
        return [tuple(n) for n in self.nearest(key, exclude=source)]

    def rpc_store(self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: bytes) -> bool:
        """Keep ``value`` only if it is a valid record for ``key``; reply whether it was kept."""
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self.storage.offer(key, value, self.clock(), source=sender[0])

    def rpc_find_value(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes
    ) -> list[tuple[Any, ...]] | dict[str, Any]:
        """The records under ``key`` that fit one reply, plus contacts; or just contacts."""
        contacts: list[tuple[Any, ...]] = self.rpc_find_node(sender, nodeid, key)
        values = self.storage.reply_records(key, REPLY_VALUE_BUDGET, self.clock())
        if not values:
            return contacts
        reply: dict[str, Any] = {"value": values, "nodes": contacts}
        overhead = 1 + MSG_ID_LEN
        while contacts and len(packb(reply)) + overhead > MAX_DATAGRAM:
            contacts.pop()
        return reply

    # ---- lifecycle -------------------------------------------------------------

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """Background tasks still running (store pushes, pings from the routing table)."""
        return frozenset(self._tasks)

    def close(self) -> None:
        """Fail every outstanding RPC, cancel every owned task, stop accepting input."""
        self._closed = True
        for msg_id in list(self._outstanding):
            self._resolve(msg_id, (False, None))
        for task in list(self._tasks):
            task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport closed: nothing may wait on it any more."""
        self.close()
