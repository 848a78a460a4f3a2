"""KademliaProtocol subclass: guarded datagram intake, owned tasks, adaptive RPC timeouts.

rpcudp 5.0.1 decodes msgpack unguarded, takes ``*args`` from the wire, runs every
request in a fire-and-forget task, calls ``set_result`` on futures a caller may have
cancelled, and waits 5 s for every reply. kademlia 2.2.3's ``welcome_if_new`` judges
closeness on a re-hashed key and re-pushes values to a node in a bucket's
replacement cache on every reply from it (a loop). This module closes all of that at
the library's seams: it overrides ``datagram_received``, defines the four RPC stubs
explicitly instead of relying on rpcudp's ``__getattr__`` closures, and overrides
``welcome_if_new``, ``handle_call_response``, ``rpc_store`` and ``rpc_find_value``.

Hostile input (issue #13): contacts in replies become typed ``Contact`` values where
they are decoded (``contacts.py``), so nothing unchecked reaches ``sendto``; a send that
fails anyway, and any error in an event-loop callback, is counted, never fatal. Replies
to an address that has not answered one of our requests stay within 3x the bytes it
sent (``antiamp.py``); such an address is pinged back before it may join the routing
table, and only addresses that answered are pushed records (``closeness.py`` decides
which, cheaply). See docs/dht.md.

Reachability (issue #16): RPC ``reach(nodeid, nonce)`` answers the address the request
came from, ``[ip, port, dialing]``; if that address is validated and ``DialBackLimit``
allows, the node also dials it back (``dialback.py``): a ``dialback(nodeid, nonce)``
request from a fresh UDP socket, which gets no reply and welcomes nobody, and a TCP
DIALBACK frame. A node in *client mode* (not publicly reachable) answers ``ping`` with
empty bytes; such an address is validated but marked a client for ``CLIENT_TTL``
seconds: never added to the routing table (removed if it was there), not pinged back.
A node that changes mode sends its contacts RPC ``mode(nodeid)``; each pings it back if
it is in its table or marked a client (at most ``RECHECKS`` per ``RECHECK_EVERY``
seconds per address) and so learns the new mode at once: a claim is never trusted, only
the answer of the address itself.
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
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from dhtshare.dht.antiamp import AntiAmplification, DialBackLimit
from dhtshare.dht.closeness import PushFilter
from dhtshare.dht.contacts import Contact, parse_contact, parse_host
from dhtshare.dht.dialback import dial_back
from dhtshare.dht.sources import UNVALIDATED
from dhtshare.dht.storage import DEFAULT_REPLY_BUDGET, ValidatingStorage
from dhtshare.errors import DhtError
from dhtshare.stats import Counters
from dhtshare.tasks import spawn_logged
from dhtshare.wire.dialback import NONCE_SIZE

__all__ = ["CLIENT_TTL", "MAX_DATAGRAM", "DhtProtocol", "ReachReply", "RpcTimeouts"]

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
_VALUE_KEYS = frozenset({"value", "nodes"})
_RECENT_PUSHES = 4096
_RTT_ENTRIES = 4096
#: Records pushed to one newly met node at most (its origin republishes the rest).
_MAX_PUSHES_PER_NODE = 64
#: Store pushes in flight to one node at a time.
_PUSH_CONCURRENCY = 8
#: Stored keys examined per event-loop step when choosing what to push, and how many
#: new nodes are being examined at once.
_PUSH_SCAN_CHUNK = 2048
_PUSH_SCANS = 4
#: Addresses remembered as already given records (a new node id there gets none).
_PUSHED_ADDRESSES = 4096
#: Ping-backs (validations of a new sender's address) in flight at most.
_MAX_VALIDATIONS = 256
_ANY_ID = bytes(ID_LEN)
#: Bytes of one ping request: what a ping-back costs in a new sender's budget.
PING_BYTES = 1 + MSG_ID_LEN + len(umsgpack.packb(["ping", [_ANY_ID]]))
#: Seconds an address that answered a ping as a DHT client stays out of the table.
CLIENT_TTL = 300.0
#: Ping-backs answering pings from one known address, at most, per ``RECHECK_EVERY`` s.
RECHECKS = 2
RECHECK_EVERY = 30.0
_RECHECKED = 4096

Reply = tuple[bool, Any]
DialBackSink = Callable[[bytes, tuple[str, int]], None]


class ReachReply(NamedTuple):
    """A ``reach`` answer: the address the responder saw us at, and whether it dials back."""

    host: str
    port: int
    dialing: bool


def _codec() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """msgpack's C codec when installed (byte-identical output, faster), else umsgpack.

    rpcudp encodes with umsgpack; ``msgpack.packb(use_bin_type=True)`` writes the same
    bytes and ``unpackb(raw=False)`` reads them back the same (str stays str, bin
    stays bytes, arrays are lists), so peers cannot tell which one a node uses. How much
    faster: docs/dht.md ("Codec").
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


@dataclass(frozen=True, slots=True)
class _Rpc:
    """One RPC a peer may call on us.

    ``arity`` arguments, all passing ``check``; ``handler`` answers them (it calls the
    protocol's ``rpc_<name>`` method, looked up on the instance at each call). A
    ``paddable`` request may end with one extra argument of zero bytes: padding, ignored,
    that buys a requester the reply budget (3x) of a full reply from a node that has not
    validated its address yet. Requests without it parse as before.
    """

    arity: int
    check: Callable[[list[Any]], bool]
    handler: Callable[[DhtProtocol, tuple[str, int], list[Any]], Any]
    paddable: bool = False


#: Every RPC a peer may call on us, by the name it sends.
_RPCS: Mapping[str, _Rpc] = MappingProxyType(
    {
        "ping": _Rpc(1, lambda a: _is_id(a[0]), lambda p, s, a: p.rpc_ping(s, *a)),
        "store": _Rpc(
            3,
            lambda a: _is_id(a[0]) and _is_id(a[1]) and isinstance(a[2], bytes),
            lambda p, s, a: p.rpc_store(s, *a),
        ),
        "find_node": _Rpc(
            2,
            lambda a: _is_id(a[0]) and _is_id(a[1]),
            lambda p, s, a: p.rpc_find_node(s, *a),
            paddable=True,
        ),
        "find_value": _Rpc(
            2,
            lambda a: _is_id(a[0]) and _is_id(a[1]),
            lambda p, s, a: p.rpc_find_value(s, *a),
            paddable=True,
        ),
        "mode": _Rpc(1, lambda a: _is_id(a[0]), lambda p, s, a: True),
        "reach": _Rpc(
            2,
            lambda a: _is_id(a[0]) and _is_nonce(a[1]),
            lambda p, s, a: p.rpc_reach(s, *a),
        ),
        # unanswered: handled by ``_on_dialback`` before any other request handling
        "dialback": _Rpc(2, lambda a: _is_id(a[0]) and _is_nonce(a[1]), lambda p, s, a: None),
    }
)


def _is_nonce(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == NONCE_SIZE


def _is_padding(value: object) -> bool:
    return isinstance(value, bytes) and value == bytes(len(value))


def parse_request(data: object) -> tuple[str, list[Any]] | None:
    """``(name, args)`` if ``data`` is a well-formed request for a known RPC, else None.

    ``args`` never includes the optional padding argument.
    """
    if not isinstance(data, list) or len(data) != 2:
        return None
    name, args = data
    if not isinstance(name, str) or not isinstance(args, list):
        return None
    rpc = _RPCS.get(name)
    if rpc is None:
        return None
    arity = rpc.arity
    if rpc.paddable and len(args) == arity + 1 and _is_padding(args[arity]):
        args = args[:arity]
    if len(args) != arity or not rpc.check(args):
        return None
    return name, args


def _address(address: object) -> tuple[str, int] | None:
    """``(host, port)`` if ``address`` names a canonical unicast IP and a valid port."""
    if not isinstance(address, tuple | list) or len(address) < 2:
        return None
    host, port = parse_host(address[0]), address[1]
    if host is None or not isinstance(port, int) or isinstance(port, bool):
        return None
    return (host, port) if 0 < port < 65536 else None


def _max_reply(name: str, ksize: int, family: int) -> int:
    """Bytes of the largest reply a dhtshare node sends to ``name``."""
    if name == "find_value":
        return MAX_DATAGRAM
    contact = 1 + (2 + ID_LEN) + (2 + (39 if family == 6 else 15)) + 3
    return 1 + MSG_ID_LEN + 3 + ksize * contact


def padded_size(name: str, ksize: int, family: int) -> int:
    """Bytes a request must have for its reply (and a ping-back) to fit 3x its size."""
    return -(-(_max_reply(name, ksize, family) + PING_BYTES) // 3)


def _most(fits: Callable[[int], bool], count: int) -> int:
    """The largest ``n <= count`` with ``fits(n)`` (``fits`` true up to some n), or 0."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _fit(head: bytes, reply: object, limit: int) -> tuple[bytes, bool] | None:
    """``head`` + the encoded ``reply`` cut to ``limit`` bytes, and whether it was cut.

    A ``find_value`` reply keeps its newest records that fit, then as many contacts as
    still fit; if not even one record fits it becomes a contact list. A contact list
    keeps its nearest contacts. A ping or store reply is never cut (None: nothing fits).
    """

    def fits(body: object) -> bool:
        return len(head) + len(packb(body)) <= limit

    full = head + packb(reply)
    if len(full) <= limit:
        return full, False
    if isinstance(reply, dict):
        values, nodes = reply["value"], reply.get("nodes", [])
        n = _most(lambda i: fits({"value": values[:i], "nodes": []}), len(values))
        if n:
            m = _most(lambda j: fits({"value": values[:n], "nodes": nodes[:j]}), len(nodes))
            return head + packb({"value": values[:n], "nodes": nodes[:m]}), True
        reply = nodes
    if isinstance(reply, list):
        items = reply
        m = _most(lambda j: fits(items[:j]), len(items))
        if fits(items[:m]):
            return head + packb(items[:m]), True
    return None


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
        self._amp = AntiAmplification()
        self._validating: dict[tuple[str, int], asyncio.Future[Reply]] = {}
        self._pushed_to: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._rechecked: OrderedDict[tuple[str, int], list[float]] = OrderedDict()
        self._push_scans = asyncio.Semaphore(_PUSH_SCANS)
        self._family: int | None = None
        self._own_address: tuple[str, int] | None = None
        self.client_mode = False
        #: Called with ``(nonce, source)`` for each ``dialback`` datagram received.
        self.dialback_sink: DialBackSink | None = None
        self.dialback_limit = DialBackLimit()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and learn our own address and its family."""
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            self._own_address = (str(sockname[0]), int(sockname[1]))
            self._family = 6 if ":" in self._own_address[0] else 4

    # ---- datagram intake -------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Decode and dispatch one datagram; anything malformed is dropped and counted.

        An event-loop callback: nothing raises out of it (an error is ``error.intake``).
        """
        try:
            self._intake(data, (str(addr[0]), int(addr[1])))
        except Exception:
            self.stats.incr("error.intake")
            log.debug("datagram from %s failed", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error or a failed send reported by the transport: count it, go on."""
        self.stats.incr("error.received")

    def _intake(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closed:
            return
        if _address(addr) is None:  # a spoofed broadcast, multicast or port-0 source
            self.stats.incr("drop.bad_source")
            return
        self._amp.received(addr, len(data))
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
        if name == "dialback":
            self._on_dialback(args[1], addr)
            return
        ping_back = self._welcome_sender(Node(args[0], addr[0], addr[1]))
        try:
            reply = _RPCS[name].handler(self, addr, args)
        except Exception:
            self.stats.incr("error.handler")
            log.debug("rpc_%s from %s failed", name, addr, exc_info=True)
            return
        self.stats.incr(f"rpc_in.{name}")
        self._amp.heard_request(addr)
        self._send_reply(msg_id, reply, addr, reserve=PING_BYTES if ping_back else 0)
        if ping_back:
            self._ping_back(Node(args[0], addr[0], addr[1]))
        elif name == "mode":
            self._recheck(Node(args[0], addr[0], addr[1]))

    def _on_response(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            self.stats.incr("drop.unexpected_reply")
            return
        if addr != pending.address:
            self.stats.incr("drop.wrong_sender")
            return
        # The reply carries our random message id: the address receives what we send.
        answered_as = body if pending.name == "ping" and isinstance(body, bytes) else None
        self._amp.validate(addr, answered_as if _is_id(answered_as) else None)
        if answered_as == b"":
            self._amp.mark_client(addr, time.monotonic() + CLIENT_TTL)
            self.stats.incr("client_seen")
        checked = self._check_reply(pending.name, body)
        if checked is None:
            self.stats.incr("drop.bad_reply")
            self._resolve(msg_id, (False, None))
            return
        self._observe_rtt(pending.address, time.monotonic() - pending.sent_at)
        self._resolve(msg_id, (True, checked))

    # ---- replies, checked and typed ------------------------------------------------

    def _check_reply(self, name: str, body: object) -> object | None:
        """The reply to ``name`` as typed values, or None if its shape is wrong.

        Contacts and values that fail their checks are dropped one by one (counted);
        only a reply whose outer shape is wrong fails as a whole.
        """
        if name == "ping":
            return body if _is_id(body) or body == b"" else None
        if name == "reach":
            return self._reach_reply(body)
        if name in ("store", "mode"):
            return body if isinstance(body, bool) else None
        if isinstance(body, list):
            return self._contacts(body)
        if name != "find_value" or not isinstance(body, dict) or not set(body) <= _VALUE_KEYS:
            return None
        values, nodes = body.get("value"), self._contacts(body.get("nodes", []))
        if not isinstance(values, list) or len(values) > _MAX_VALUES_IN_REPLY or nodes is None:
            return None
        kept = [v for v in values if isinstance(v, bytes)]
        if len(kept) < len(values):
            self.stats.incr("drop.bad_value", len(values) - len(kept))
        return {"value": kept, "nodes": nodes} if kept else nodes

    @staticmethod
    def _reach_reply(body: object) -> ReachReply | None:
        if not isinstance(body, list) or len(body) != 3 or not isinstance(body[2], bool):
            return None
        address = _address((body[0], body[1]))
        return None if address is None else ReachReply(address[0], address[1], body[2])

    def _contacts(self, value: object) -> list[Contact] | None:
        """Checked contacts: usable addresses of our family, not ours, one per address."""
        if not isinstance(value, list) or len(value) > _MAX_NODES_IN_REPLY:
            return None
        seen: set[tuple[str, int]] = set()
        kept: list[Contact] = []
        for item in value:
            contact = parse_contact(item)
            if contact is None:
                self.stats.incr("drop.bad_contact")
            elif self._unusable(contact.address) or contact.address in seen:
                self.stats.incr("drop.useless_contact")
            else:
                seen.add(contact.address)
                kept.append(contact)
        return kept

    def _unusable(self, address: tuple[str, int]) -> bool:
        """True for our own address, or one of the other address family."""
        if self._family is not None and (6 if ":" in address[0] else 4) != self._family:
            return True
        return address == self._own_address

    # ---- sending -----------------------------------------------------------------

    def _send_reply(
        self, msg_id: bytes, reply: object, addr: tuple[str, int], *, reserve: int = 0
    ) -> None:
        """Send ``reply``, cut down to what ``addr``'s anti-amplification budget allows.

        ``reserve`` bytes of that budget are kept for a ping-back sent after it.
        """
        allowance = self._amp.allowance(addr)
        limit = MAX_DATAGRAM if allowance is None else min(MAX_DATAGRAM, allowance - reserve)
        fitted = _fit(_RESPONSE + msg_id, reply, limit)
        if fitted is None:
            self.stats.incr("drop.amplification")
            return
        datagram, trimmed = fitted
        if trimmed:
            self.stats.incr("reply.trimmed")
        if allowance is not None:
            self._amp.spend(addr, len(datagram))
        self._send(datagram, addr)

    def _send(self, datagram: bytes, addr: tuple[str, int]) -> bool:
        """Send one datagram; a failure is counted and costs this datagram only."""
        if len(datagram) > MAX_DATAGRAM:
            self.stats.incr("drop.reply_too_big")
            return False
        if self.transport is None or self.transport.is_closing():
            return False
        try:
            self.transport.sendto(datagram, addr)
        except Exception:
            self.stats.incr("error.send")
            log.debug("sendto %s failed", addr, exc_info=True)
            return False
        return True

    # ---- outgoing RPCs ---------------------------------------------------------

    def ping(self, address: tuple[str, int], nodeid: bytes) -> asyncio.Future[Reply]:
        """Send ``ping``; the future gives ``(answered, their_id)`` (``b""``: a client)."""
        return self._call(address, "ping", nodeid)

    def reach(self, address: tuple[str, int], nodeid: bytes, nonce: bytes) -> asyncio.Future[Reply]:
        """Send ``reach``; the future gives ``(answered, ReachReply)``."""
        return self._call(address, "reach", nodeid, nonce)

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
        """Send request ``name`` to ``address``; the future never raises.

        An address that is not a canonical unicast IP and port fails at once
        (``drop.bad_address``): nothing is resolved and nothing odd reaches ``sendto``.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        checked = _address(address)
        if checked is None:
            self.stats.incr("drop.bad_address")
        if checked is None or self._closed or self.transport is None:
            future.set_result((False, None))
            return future
        body = self._request_body(checked, name, args)
        if len(body) > MAX_DATAGRAM - 1 - MSG_ID_LEN:
            raise DhtError(f"{name} request of {len(body)} bytes exceeds the datagram limit")
        msg_id = os.urandom(MSG_ID_LEN)
        pending = _Pending(name, checked, time.monotonic(), future)
        pending.timer = loop.call_later(self.rpc_timeout(checked), self._expire, msg_id)
        self._outstanding[msg_id] = pending
        future.add_done_callback(functools.partial(self._forget_quietly, msg_id))
        self.stats.incr(f"rpc_out.{name}")
        if not self._send(_REQUEST + msg_id + body, checked):
            self._resolve(msg_id, (False, None))
        return future

    def _request_body(self, address: tuple[str, int], name: str, args: tuple[Any, ...]) -> bytes:
        """The encoded request; padded unless ``address`` has most likely validated us.

        Padding lets a responder that has not validated our address yet send the full
        reply within its 3x budget, so first contact costs no extra round trip. A node in
        client mode (behind NAT) always pads: its router may map it to a new port at any
        time (an idle mapping expires; some routers pick a port per flow), and the
        responder then sees an address it has not validated.
        """
        body = packb([name, list(args)])
        rpc = _RPCS.get(name)
        if rpc is None or not rpc.paddable:
            return body
        if self._amp.has_heard(address) and not self.client_mode:
            return body
        want = padded_size(name, self.ksize, self._family or 4) - 1 - MSG_ID_LEN
        if len(body) >= want:
            return body
        return packb([name, [*args, bytes(want - len(body))]])

    def _expire(self, msg_id: bytes) -> None:
        """Timer callback: the request went unanswered."""
        try:
            self.stats.incr("rpc_timeout")
            self._resolve(msg_id, (False, None))
        except Exception:
            self.stats.incr("error.callback")
            log.debug("RPC timer failed", exc_info=True)

    def _forget_quietly(self, msg_id: bytes, _future: asyncio.Future[Reply]) -> None:
        """Done callback of every request future: ``_forget``, never raising."""
        try:
            self._forget(msg_id)
        except Exception:
            self.stats.incr("error.callback")
            log.debug("RPC cleanup failed", exc_info=True)

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
        """Welcome a node that answered; evict one after ``max_failures`` failures in a row.

        A ping that ``node``'s address answers with another id means a new node lives
        there (restarted with a new id): the new id, which just proved its address,
        replaces ``node`` in the table (``welcome_if_new``).
        """
        answered, body = result
        if answered and body == b"":  # a ping answered by a node in client mode
            self._failures.pop(node.id, None)
            if self.is_known(node):
                self.router.remove_contact(node)
                self.stats.incr("contact_client_removed")
            return result
        if answered and _is_id(body) and body != node.id:
            self._failures.pop(node.id, None)
            self.welcome_if_new(Node(body, node.ip, node.port))
            return result
        if answered:
            self._failures.pop(node.id, None)
            self._welcome_answered(node)
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

    def _welcome_sender(self, node: Node) -> bool:
        """A request came from ``node``: welcome it, or say it needs a ping-back first.

        The sender's address and id are only claims. A node joins the routing table
        (and may be pushed records) once its address answered a ping with that id;
        until then the caller pings it back (True), at most one ping per address in
        flight and ``_MAX_VALIDATIONS`` in all.
        """
        address = (node.ip, node.port)
        if node.id == self.source_node.id or self._unusable(address) or self.is_known(node):
            return False
        if self._amp.is_client(address, time.monotonic()):
            return False
        if self._amp.answered_as(address) == node.id:
            self.welcome_if_new(node)
            return False
        if address in self._validating or len(self._validating) >= _MAX_VALIDATIONS:
            self.stats.incr("validate.busy")
            return False
        return True

    def _recheck(self, node: Node) -> None:
        """A known contact or a marked client says its mode changed: ping it to learn it.

        Its answer goes through ``handle_call_response``: empty bytes remove it from the
        table, its id (re)admits it. At most ``RECHECKS`` per ``RECHECK_EVERY`` per address.
        """
        address = (node.ip, node.port)
        now = time.monotonic()
        if not (self.is_known(node) or self._amp.is_client(address, now)):
            return
        recent = [t for t in self._rechecked.get(address, []) if now - t < RECHECK_EVERY]
        if len(recent) >= RECHECKS:
            return
        if address in self._validating or len(self._validating) >= _MAX_VALIDATIONS:
            return
        self._rechecked[address] = [*recent, now]
        self._rechecked.move_to_end(address)
        if len(self._rechecked) > _RECHECKED:
            self._rechecked.popitem(last=False)
        self.stats.incr("recheck.ping")
        future = self.ping(address, self.source_node.id)
        self._validating[address] = future
        future.add_done_callback(functools.partial(self._rechecked_done, node))

    def _rechecked_done(self, node: Node, future: asyncio.Future[Reply]) -> None:
        """Done callback of a recheck ping: handled like any answer from a contact."""
        try:
            self._validating.pop((node.ip, node.port), None)
            if not future.cancelled() and not self._closed:
                self.handle_call_response(future.result(), node)
        except Exception:
            self.stats.incr("error.callback")
            log.debug("recheck of %s failed", node, exc_info=True)

    def set_client_mode(self, client: bool) -> None:
        """Enter or leave client mode; on a change, tell every contact (``mode``)."""
        if client == self.client_mode:
            return
        self.client_mode = client
        contacts = [n for b in self.router.buckets for n in b.get_nodes()]
        if contacts:
            self._spawn(self._tell_contacts(contacts))

    async def _tell_contacts(self, contacts: list[Node]) -> None:
        own = bytes(self.source_node.id)
        for start in range(0, len(contacts), _PUSH_CONCURRENCY):
            batch = contacts[start : start + _PUSH_CONCURRENCY]
            await asyncio.gather(*(self._call((n.ip, n.port), "mode", own) for n in batch))

    async def validations(self) -> None:
        """Wait for the ping-backs in flight (each ends within one RPC timeout)."""
        pending = list(self._validating.values())
        if pending:
            await asyncio.wait(pending)

    def _welcome_answered(self, node: Node) -> None:
        """``node``'s address answered one of our requests: welcome it under a vouched id.

        The id of a contact we asked came from a third party's reply, and a find_node or
        find_value answer does not say whose it is. Any address answers under any id
        it is asked by, so trusting that id would let one hostile reply bind an honest
        address to an id of its choosing, which then holds that address's place in the
        table (one id per endpoint) and keeps its real id out. So the id joins only
        if the address answered a ping with it; otherwise the address is pinged and the
        id it answers with is welcomed (``_pinged_back``).
        """
        address = (node.ip, node.port)
        if self._amp.is_client(address, time.monotonic()):
            return
        if self._amp.answered_as(address) == node.id:
            self.welcome_if_new(node)
        elif self._welcome_sender(node):
            self._ping_back(node)

    def _ping_back(self, node: Node) -> None:
        """Ping a new sender's address (charged to its budget); welcome whoever answers."""
        address = (node.ip, node.port)
        if not self._amp.spend(address, PING_BYTES):
            self.stats.incr("validate.no_budget")
            return
        self.stats.incr("validate.ping")
        future = self.ping(address, self.source_node.id)
        self._validating[address] = future
        future.add_done_callback(functools.partial(self._pinged_back, address))

    def _pinged_back(self, address: tuple[str, int], future: asyncio.Future[Reply]) -> None:
        """Done callback of a ping-back: the id that answered is the one welcomed."""
        try:
            self._validating.pop(address, None)
            if future.cancelled() or self._closed:
                return
            answered, their_id = future.result()
            if answered and _is_id(their_id):
                self.welcome_if_new(Node(their_id, address[0], address[1]))
        except Exception:
            self.stats.incr("error.callback")
            log.debug("ping-back to %s failed", address, exc_info=True)

    def welcome_if_new(self, node: Node) -> None:
        """Add a genuinely new node and push it the records it should hold.

        Callers vouch that ``node``'s address answered one of our requests. Unlike
        kademlia's version: a node waiting in a replacement cache is not new;
        closeness is judged on the real key (not ``digest(key)``); the node must be
        among the k closest known to the key and we the closest (``PushFilter``); an
        address is given records once (a new id there gets none), at most
        ``_MAX_PUSHES_PER_NODE``; and the same record is never pushed to the same node
        twice (bounded memory of recent pushes). If the address's latest ping answer
        was ``node.id``, a contact held there under another id is dropped first (a node
        restarted with a new id; the old id no longer answers there).
        """
        if node.id == self.source_node.id or self.is_known(node):
            return
        if self._unusable((node.ip, node.port)):
            return
        if self._amp.is_client((node.ip, node.port), time.monotonic()):
            return
        if self._amp.answered_as((node.ip, node.port)) == node.id and self.router.replace_at(node):
            self.stats.incr("contact_replaced")  # the address answers as a new id now
        self._push_records(node)
        self.router.add_contact(node)

    def _push_records(self, node: Node) -> None:
        """Start pushing ``node`` the records it should hold, if its address has none yet."""
        address = (node.ip, node.port)
        if not self._amp.is_validated(address) or address in self._pushed_to:
            return
        self._pushed_to[address] = None
        if len(self._pushed_to) > _PUSHED_ADDRESSES:
            self._pushed_to.popitem(last=False)
        # The contacts as they are now, before ``node`` joins them.
        contacts = (n.id for b in self.router.buckets for n in b.nodes.values())
        self._spawn(self._push_all(node, PushFilter(self.source_node.id, contacts, self.ksize)))

    async def _records_for(self, node: Node, wanted: PushFilter) -> list[tuple[bytes, bytes]]:
        """Up to ``_MAX_PUSHES_PER_NODE`` records ``node`` should hold and was not sent.

        Examines ``_PUSH_SCAN_CHUNK`` stored keys per event-loop step, so no single
        step stalls the loop however many records the node holds.
        """
        keys = self.storage.stored_keys()
        chosen: list[tuple[bytes, bytes]] = []
        for start in range(0, len(keys), _PUSH_SCAN_CHUNK):
            if start:
                await asyncio.sleep(0)
            for key in wanted.closest(keys[start : start + _PUSH_SCAN_CHUNK]):
                if wanted.wants(node.id, key):
                    chosen.extend(self._unsent(node, key, _MAX_PUSHES_PER_NODE - len(chosen)))
                if len(chosen) >= _MAX_PUSHES_PER_NODE:
                    return chosen
        return chosen

    def _unsent(self, node: Node, key: bytes, room: int) -> list[tuple[bytes, bytes]]:
        """Up to ``room`` records under ``key`` not pushed to ``node`` lately (now marked)."""
        chosen: list[tuple[bytes, bytes]] = []
        for raw in self.storage.reply_records(key, self.storage.max_bytes, self.clock()):
            marker = (node.id, key, raw[-16:])
            if len(chosen) >= room or marker in self._recent_pushes:
                continue
            self._recent_pushes[marker] = None
            if len(self._recent_pushes) > _RECENT_PUSHES:
                self._recent_pushes.popitem(last=False)
            chosen.append((key, raw))
        return chosen

    async def _push_all(self, node: Node, wanted: PushFilter) -> None:
        """Choose the records ``node`` should hold; store them, a few at a time."""
        async with self._push_scans:
            records = await self._records_for(node, wanted)
        for start in range(0, len(records), _PUSH_CONCURRENCY):
            batch = records[start : start + _PUSH_CONCURRENCY]
            self.stats.incr("push", len(batch))
            await asyncio.gather(*(self.call_store(node, key, raw) for key, raw in batch))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task this protocol owns (cancelled by ``close``)."""
        spawn_logged(
            coro,
            self._tasks,
            "background RPC task",
            logger=log,
            level=logging.DEBUG,
            on_error=lambda _exc: self.stats.incr("error.task"),
        )

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
        """Our k contacts nearest to ``key`` (never the asking node itself).

        The sender was already welcomed, or pinged back, by ``_on_request``.
        """
        source = Node(nodeid, sender[0], sender[1])
        return [tuple(n) for n in self.nearest(key, exclude=source)]

    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:
        """Our node id, or empty bytes in client mode (so the sender leaves us out of its
        routing table). The sender was welcomed or pinged back by ``_on_request``."""
        return b"" if self.client_mode else bytes(self.source_node.id)

    def rpc_reach(self, sender: tuple[str, int], nodeid: bytes, nonce: bytes) -> list[Any]:
        """``[ip, port, dialing]``: where the request came from, and whether we dial it back.

        Only ``sender`` is ever dialled, only if it is validated (it answered one of our
        requests, so it is not a spoofed third party) and ``dialback_limit`` allows (a
        contact in our routing table may use its reserve). The
        dial-back task starts after this reply is sent.
        """
        id_at = getattr(self.router, "id_at", None)  # a DiverseRoutingTable (server.py)
        known = id_at is not None and id_at(sender[0], sender[1]) is not None
        dialing = self._amp.is_validated(sender) and self.dialback_limit.allow(
            sender[0], time.monotonic(), known=known
        )
        if dialing:
            self.stats.incr("dialback.sent")
            body = packb(["dialback", [bytes(self.source_node.id), nonce]])
            datagram = _REQUEST + os.urandom(MSG_ID_LEN) + body
            self._spawn(dial_back(sender, nonce, datagram, self._local_host()))
        else:
            self.stats.incr("dialback.refused")
        return [sender[0], sender[1], dialing]

    def _local_host(self) -> str | None:
        """The address our socket is bound to, unless it is the unspecified one."""
        if self._own_address is None or self._own_address[0] in ("0.0.0.0", "::"):
            return None
        return self._own_address[0]

    def _on_dialback(self, nonce: bytes, source: tuple[str, int]) -> None:
        """A UDP dial-back arrived: hand it to ``dialback_sink``; never answered."""
        self.stats.incr("rpc_in.dialback")
        sink = self.dialback_sink
        if sink is not None:
            sink(nonce, source)

    def rpc_store(self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: bytes) -> bool:
        """Keep ``value`` only if it is a valid record for ``key``; reply whether it was kept."""
        source = sender[0] if self._amp.is_validated(sender) else UNVALIDATED
        return self.storage.offer(key, value, self.clock(), source=source)

    def rpc_find_value(
        self, sender: tuple[str, int], nodeid: bytes, key: bytes
    ) -> list[tuple[Any, ...]] | dict[str, Any]:
        """The records under ``key`` that fit one reply, plus contacts; or just contacts.

        ``_send_reply`` cuts the contacts (then the records) to one datagram and to the
        sender's anti-amplification budget.
        """
        contacts: list[tuple[Any, ...]] = self.rpc_find_node(sender, nodeid, key)
        values = self.storage.reply_records(key, REPLY_VALUE_BUDGET, self.clock())
        if not values:
            return contacts
        return {"value": values, "nodes": contacts}

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
