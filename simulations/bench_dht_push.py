"""DHT port: event-loop stall per new node, and reply bytes per request byte (not a test).

    python simulations/bench_dht_push.py [--records 5000 20000] [--contacts 100] [--trials 5]

Two measurements on one real node on 127.0.0.1:

- **stall per new node.** The node holds N records of its own and ``--contacts``
  contacts. A raw UDP socket that answers pings and stores plays a new node: it
  pings the node from a fresh node id, answers whatever the node sends it, then pings
  again (that round trip is the barrier: the node has handled everything before it).
  A task that resumes on every event-loop iteration measures the longest gap between
  two iterations meanwhile (the stall every other timer and socket saw); the table
  shows the worst and the median over trials of that, and the pushes received.
- **reply bytes per request byte from an unvalidated address.** A raw UDP socket that
  never answers sends one request of each kind from a fresh node id (``find_value``
  for a key holding about 8 KB of records; the node also holds 500 records it could
  push), then a ping as a barrier. The ratio is every byte the node sent to that
  address over every byte it received from it, pushes and validation pings included.

Run it on the old code for the "before" numbers: ``PYTHONPATH=<old tree> python ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import umsgpack
from kademlia.node import Node

import dhtshare
from dhtshare.dht import DhtNode
from dhtshare.identity import Identity
from dhtshare.records import JoinRequest, PeerInfo, SignedRecord, sign_record

Address = tuple[str, int]
#: Padding that brings a find_value request to 2,755 bytes (a third of a full reply and
#: a ping-back), as dhtshare pads its first request to a node.
PADDED = 2755 - 86


class RawPeer(asyncio.DatagramProtocol):
    """A UDP socket speaking the DHT wire by hand; counts bytes both ways."""

    def __init__(self, node_id: bytes, *, answer: bool) -> None:
        self.id = node_id
        self.answer = answer
        self.sent = 0
        self.received = 0
        self.stores = 0
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += len(data)
        msg_id = data[1:21]
        if data[:1] == b"\x01":
            waiter = self.waiting.pop(msg_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if not self.answer:
            return
        name = umsgpack.unpackb(data[21:])[0]
        if name == "store":
            self.stores += 1
        reply = self.id if name == "ping" else True if name == "store" else []
        self.send(b"\x01" + msg_id + umsgpack.packb(reply), addr)

    def send(self, datagram: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.sent += len(datagram)
        self.transport.sendto(datagram, addr)

    def request(self, name: str, args: list[Any], addr: Address) -> asyncio.Future[None]:
        msg_id = os.urandom(20)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[msg_id] = waiter
        self.send(b"\x00" + msg_id + umsgpack.packb([name, args]), addr)
        return waiter


async def barrier(peer: RawPeer, node_id: bytes, addr: Address, tries: int = 10) -> bool:
    """A ping round trip; retried, since a flood of pushes can overflow the socket buffer."""
    for _ in range(tries):
        try:
            async with asyncio.timeout(3):
                await peer.request("ping", [node_id], addr)
            return True
        except TimeoutError:
            continue
    return False


async def raw_peer(node_id: bytes, *, answer: bool) -> tuple[asyncio.BaseTransport, RawPeer]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: RawPeer(node_id, answer=answer), local_addr=("127.0.0.1", 0)
    )
    return transport, peer


class Ticker:
    """Resumes on every event-loop iteration; ``worst`` is the longest gap between two.

    That gap is the longest the loop was busy with other callbacks: the stall any other
    connection or timer would have seen.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            last = now


def make_records(count: int, now: float) -> list[SignedRecord]:
    ident = [Identity.generate() for _ in range(min(count, 2000))]
    return [
        sign_record(
            ident[i % len(ident)],
            PeerInfo((("127.0.0.1", 1000 + i % 60000),)),
            seq=i + 1,
            now=now,
            ttl=3600,
        )
        if i < len(ident)
        else sign_record(
            ident[i % len(ident)],
            JoinRequest(os.urandom(32), f"n{i}", "x" * 40),
            seq=1,
            now=now,
            ttl=3600,
        )
        for i in range(count)
    ]


async def stall(records: list[SignedRecord], contacts: int, trials: int) -> dict[str, float]:
    node = DhtNode()
    await node.listen()
    ticker = Ticker()
    try:
        assert node.protocol is not None
        now = time.time()
        for rec in records:
            node.storage.add(rec.dht_key, rec.encode(), now, own=True)
        for i in range(contacts):
            host = f"127.{1 + i // 256}.{i % 256}.1"  # one address each (routing-table limits)
            node.protocol.router.add_contact(Node(os.urandom(20), host, 20000 + i))
        worst: list[float] = []
        pushes: list[int] = []
        for _ in range(trials):
            transport, peer = await raw_peer(os.urandom(20), answer=True)
            try:
                ticker.worst = 0.0
                await barrier(peer, peer.id, node.address)
                await barrier(peer, peer.id, node.address)
                for _ in range(50):  # until every push has been answered (or 50 rounds)
                    if not node.protocol.tasks or not await barrier(peer, peer.id, node.address, 2):
                        break
                worst.append(ticker.worst)
                pushes.append(peer.stores)
            finally:
                transport.close()
        return {
            "max_ms": 1000 * max(worst),
            "median_ms": 1000 * statistics.median(worst),
            "pushes": statistics.median(pushes),
        }
    finally:
        ticker.task.cancel()
        await node.aclose()


async def ratios() -> dict[str, tuple[int, int]]:
    node = DhtNode()
    await node.listen()
    try:
        now = time.time()
        group = os.urandom(32)
        crowd = [Identity.generate() for _ in range(64)]
        joins = [
            sign_record(i, JoinRequest(group, "x" * 16, "y" * 60), seq=1, now=now, ttl=3600)
            for i in crowd
        ]
        key = joins[0].dht_key
        for rec in joins + make_records(500, now):
            node.storage.add(rec.dht_key, rec.encode(), now, own=True)
        out: dict[str, tuple[int, int]] = {}
        store_rec = make_records(1, now)[0]
        requests: dict[str, Callable[[bytes], list[Any]]] = {
            "ping": lambda me: [me],
            "find_node": lambda me: [me, os.urandom(20)],
            "find_value": lambda me: [me, key],
            "store": lambda me: [me, store_rec.dht_key, store_rec.encode()],
            # what a dhtshare node sends on first contact: zero padding buys a full reply
            "find_value+pad": lambda me: [me, key, bytes(PADDED)],
        }
        for name, args in requests.items():
            transport, peer = await raw_peer(os.urandom(20), answer=False)
            try:
                peer.request(name.split("+")[0], args(peer.id), node.address)
                if not await barrier(peer, os.urandom(20), node.address):
                    print(f"  ({name}: the barrier ping got no answer; counted what arrived)")
                out[name] = (peer.sent, peer.received)
            finally:
                transport.close()
        return out
    finally:
        await node.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--contacts", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--trials", type=int, default=5)
    opts = parser.parse_args()
    print(f"code: {os.path.dirname(dhtshare.__file__)}")
    print("\nreply bytes to an unvalidated address (one request + one barrier ping)")
    print(f"{'rpc':<16}{'received':>10}{'sent':>10}{'ratio':>8}")
    for name, (got, sent) in (await ratios()).items():
        print(f"{name:<16}{got:>10}{sent:>10}{sent / got:>8.2f}")
    all_records = make_records(max(opts.records), time.time())
    print(f"\nstall per new node ({opts.trials} trials each)")
    print(f"{'records':>8}{'contacts':>10}{'max ms':>10}{'median ms':>11}{'pushes':>8}")
    for count in opts.records:
        for contacts in opts.contacts:
            row = await stall(all_records[:count], contacts, opts.trials)
            print(
                f"{count:>8}{contacts:>10}{row['max_ms']:>10.2f}{row['median_ms']:>11.2f}"
                f"{row['pushes']:>8.0f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
