"""DhtNode on a real 20-node loopback network (dhtshare.sim).

The evidence tests run on ``sparse_net`` (k=5): a record lives on its writer and the
5 nodes nearest its key, and every read is made from nodes that provably hold no copy,
so a correct answer can only have come over the wire from other nodes.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
import umsgpack
from conftest import SPARSE_K, FakeClock, bodies_of_every_kind, peer_record, sealed_record
from kademlia.node import Node

from dhtshare.dht import DhtNode
from dhtshare.dht.protocol import MAX_DATAGRAM
from dhtshare.errors import DhtError, RecordError
from dhtshare.identity import Identity
from dhtshare.records import JoinRequest, SignedRecord, sign_record
from dhtshare.sim import Network

pytestmark = pytest.mark.timeout(30)


def holders(net: Network, rec: SignedRecord, now: float) -> list[DhtNode]:
    return [n for n in net.live if rec in n.storage.records(rec.dht_key, now)]


def holding(net: Network, key: bytes) -> list[DhtNode]:
    """Live nodes with any record under ``key`` in their own storage."""
    return [n for n in net.live if n.storage.count(key) > 0]


def empty_handed(net: Network, key: bytes) -> list[DhtNode]:
    """Live nodes holding nothing under ``key``: a get there must be answered remotely."""
    readers = [n for n in net.live if n.storage.count(key) == 0]
    assert readers
    return readers


async def get_from(readers: list[DhtNode], key: bytes) -> list[list[SignedRecord]]:
    """``get(key)`` from every reader at once."""
    return list(await asyncio.gather(*(r.get(key) for r in readers)))


def nearest(nodes: list[DhtNode], key: bytes, k: int) -> set[DhtNode]:
    target = int.from_bytes(key, "big")
    return set(sorted(nodes, key=lambda n: int.from_bytes(n.node.id, "big") ^ target)[:k])


async def test_every_kind_put_and_got_from_random_nodes(
    sparse_net: Network, clock: FakeClock
) -> None:
    net, rng = sparse_net, random.Random(1)
    owner = Identity.generate()
    records = [
        sign_record(owner, b, seq=1, now=clock(), ttl=600)
        for b in bodies_of_every_kind(owner, clock())
    ]
    for rec in [*records, sealed_record(owner, clock())]:
        writer = rng.choice(net.nodes)
        assert await writer.put(rec) == SPARSE_K
        others = [n for n in net.nodes if n is not writer]
        assert set(holding(net, rec.dht_key)) == {writer} | nearest(others, rec.dht_key, SPARSE_K)
        readers = rng.sample(empty_handed(net, rec.dht_key), 3)
        assert await get_from(readers, rec.dht_key) == [[rec]] * 3, rec.kind


async def test_lookup_gathers_from_k_closest_and_keeps_alpha_in_flight(net: Network) -> None:
    node = net.nodes[5]
    assert await node.get(bytes(20)) == []
    stats = node.lookups[-1]
    assert stats.rpcs == 19  # every other node is among the k=20 closest
    assert stats.answered == 19


async def test_forged_records_refused_by_every_node_and_never_returned(
    sparse_net: Network, clock: FakeClock
) -> None:
    net = sparse_net
    alice = Identity.generate()
    v1, v2 = peer_record(alice, clock(), seq=1), peer_record(alice, clock(), seq=2)
    assert await net.nodes[1].put(v2) == SPARSE_K
    storing = holding(net, v2.dht_key)
    assert len(storing) == SPARSE_K + 1
    bad_sig = bytearray(peer_record(alice, clock(), seq=3).encode())
    bad_sig[-5] ^= 0xFF
    other = peer_record(Identity.generate(), clock())
    to_all = [(v2.dht_key, bytes(bad_sig)), (other.dht_key, v2.encode())]
    to_storing = [(v2.dht_key, v1.encode())]  # genuine but older: stale where v2 is held
    attacker = empty_handed(net, v2.dht_key)[0]
    assert attacker.protocol is not None
    for target in net.nodes:
        forgeries = to_all + (to_storing if target in storing else [])
        for key, raw in forgeries:
            ok, kept = await attacker.protocol.call_store(
                Node(target.node.id, *target.address), key, raw
            )
            assert ok
            assert kept is False
    assert set(holding(net, v2.dht_key)) == set(storing)
    for node in net.nodes:
        assert node.storage.count(other.dht_key) == 0
        assert node.stats["refuse.bad_signature"] == 1
        assert node.stats["refuse.wrong_key"] == 1
        assert node.stats["refuse.stale"] == (node in storing)
    for node in storing:
        assert node.storage.records(v2.dht_key, clock()) == [v2]
    readers = empty_handed(net, v2.dht_key)
    assert len(readers) == 20 - len(storing)
    assert await get_from(readers, v2.dht_key) == [[v2]] * len(readers)
    assert await get_from(readers, other.dht_key) == [[]] * len(readers)


async def test_bad_records_in_replies_are_dropped_by_the_reader(
    sparse_net: Network, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = sparse_net
    alice = Identity.generate()
    good = peer_record(alice, clock(), seq=1)
    writer = net.nodes[1]
    await writer.put(good)
    forged = bytearray(peer_record(alice, clock(), seq=9).encode())
    forged[-1] ^= 1
    reader = empty_handed(net, good.dht_key)[0]
    others = [n for n in net.nodes if n is not reader]
    asked = nearest(others, good.dht_key, SPARSE_K)  # the k nodes the reader's lookup asks
    liar = next(n for n in holding(net, good.dht_key) if n in asked and n is not writer).storage
    real = liar.reply_records
    monkeypatch.setattr(liar, "reply_records", lambda k, b, n: [bytes(forged), *real(k, b, n)])
    assert await reader.get(good.dht_key) == [good]
    assert reader.stats["lookup.bad_record"] == 1


async def test_ten_signers_under_one_key_all_returned(
    sparse_net: Network, clock: FakeClock
) -> None:
    net = sparse_net
    gid = bytes(range(32))
    recs = []
    for i, writer in enumerate(net.nodes[1:11]):  # ten signers, each on its own node
        body = JoinRequest(gid, f"member{i}")
        rec = sign_record(Identity.generate(), body, seq=1, now=clock() - i, ttl=600)
        assert await writer.put(rec) == SPARSE_K
        recs.append(rec)
    key = recs[0].dht_key
    assert all(r.dht_key == key for r in recs)
    counts = [n.storage.count(key) for n in net.nodes]
    assert counts.count(len(recs)) <= SPARSE_K + 1  # only the storing set holds all ten
    assert counts.count(0) >= 20 - 10 - SPARSE_K  # and most non-writers hold none
    assert await get_from(net.nodes, key) == [recs] * 20  # from every node, all ten


def plan_stops(
    net: Network, storing: list[set[DhtNode]], total: int, rng: random.Random
) -> list[int]:
    """``total`` nodes to stop: 1 or 2 of each storing set, then nodes that store none."""
    stopped: set[DhtNode] = set()
    for want in (1, 2):
        for held in storing:
            for node in sorted(held - stopped, key=net.nodes.index):
                if len(held & stopped) >= want or len(stopped) >= total - 2:
                    break
                if all(len(h & (stopped | {node})) <= 2 for h in storing):
                    stopped.add(node)
    bystanders = [n for n in net.nodes if n not in stopped and not any(n in h for h in storing)]
    stopped |= set(rng.sample(bystanders, total - len(stopped)))
    return sorted(net.nodes.index(n) for n in stopped)


async def test_lookups_survive_thirty_percent_dead(sparse_net: Network, clock: FakeClock) -> None:
    net, rng = sparse_net, random.Random(3)
    recs = [peer_record(Identity.generate(), clock()) for _ in range(3)]
    for i, rec in enumerate(recs):
        assert await net.nodes[i + 1].put(rec) == SPARSE_K
    storing = [set(holding(net, rec.dht_key)) for rec in recs]
    dead = plan_stops(net, storing, 6, rng)
    net.stop_nodes(dead)
    assert len(net.live) == 14  # 30 % of 20 stopped
    for held in storing:
        assert len(held - set(net.live)) in (1, 2)  # some of every storing set is gone
    assert any(not any(net.nodes[i] in h for h in storing) for i in dead)  # and bystanders
    for rec in recs:
        readers = empty_handed(net, rec.dht_key)
        assert len(readers) >= 8
        assert await get_from(readers, rec.dht_key) == [[rec]] * len(readers)
    assert sum(s.failures for n in net.live for s in n.lookups) > 0


async def test_garbage_datagrams_leave_a_holder_answering_lookups(
    sparse_net: Network, clock: FakeClock
) -> None:
    net, rng = sparse_net, random.Random(4)
    rec, rec2 = (peer_record(Identity.generate(), clock()) for _ in range(2))
    writer = net.nodes[1]
    await writer.put(rec)
    # the holder nearest the key: among the k nodes every other node's lookup asks
    (target,) = nearest([n for n in holding(net, rec.dht_key) if n is not writer], rec.dht_key, 1)
    await net.nodes[2].put(rec2)
    key, own = rec.dht_key, target.node.id
    random_bytes = [rng.randbytes(rng.randrange(1, 300)) for _ in range(20)] + [
        rng.choice([b"\x00", b"\x01"]) + rng.randbytes(20 + rng.randrange(1, 300))
        for _ in range(30)
    ]
    shapes: list[object] = [
        None,
        5,
        "find_value",
        {"find_value": [own, key]},
        ["find_value"],
        ["find_value", [own]],
        ["find_value", [own, key, key]],
        ["find_value", [own, key[:19]]],
        ["find_value", [own, key.hex()]],
        ["find_value", own + key],
        ["store", [own, key, 5]],
        ["store", [own, key, "text"]],
        ["find_node", [own, 7]],
        ["ping", []],
        ["ping", [b"short"]],
        ["__getattr__", [own]],
        ["rpc_find_value", [own, key]],
        [["find_value"], [own, key]],
        ["find_value", [own, key], "extra"],
    ]
    wrong_shapes = [b"\x00" + os.urandom(20) + umsgpack.packb(body) for body in shapes]
    store = umsgpack.packb(["store", [own, key, b"x" * MAX_DATAGRAM]])
    oversized = [b"\x00" + os.urandom(20) + store, rng.randbytes(MAX_DATAGRAM + 1)] + [
        rng.randbytes(rng.randrange(MAX_DATAGRAM + 1, 16_000)) for _ in range(6)
    ]
    garbage = random_bytes + wrong_shapes + oversized
    loop = asyncio.get_running_loop()
    sender, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    pinger = net.nodes[0] if target is not net.nodes[0] else net.nodes[3]
    assert pinger.protocol is not None
    drops_before = target.stats.total("drop.")
    try:
        for i in range(0, len(garbage), 4):  # small batches: the socket buffer never overflows
            for datagram in garbage[i : i + 4]:
                sender.sendto(datagram, target.address)
            ok, _ = await pinger.protocol.ping(target.address, pinger.node.id)  # queued behind
            assert ok
    finally:
        sender.close()
    assert target.stats.total("drop.") - drops_before == len(garbage)
    assert target.stats["drop.oversize"] == len(oversized)
    assert target.stats["error.handler"] == 0
    for node in holding(net, key):  # the target becomes the only holder of rec
        if node is not target:
            node.storage.remove(key, rec.slot)
    target.storage.remove(rec2.dht_key, rec2.slot)  # and must look rec2 up
    served_before = target.stats["rpc_in.find_value"]
    readers = empty_handed(net, key)
    assert readers == [n for n in net.live if n is not target]
    assert await get_from(readers, key) == [[rec]] * len(readers)  # only the target has it
    assert target.stats["rpc_in.find_value"] - served_before == len(readers)
    assert target.storage.count(rec2.dht_key) == 0
    assert await target.get(rec2.dht_key) == [rec2]


async def test_put_raises_dht_error_when_nobody_stores(clock: FakeClock) -> None:
    async with Network.start(2, clock=clock) as net:
        net.stop_nodes([0])
        with pytest.raises(DhtError):
            await net.nodes[1].put(peer_record(Identity.generate(), clock()))


async def test_put_refuses_an_invalid_record(net: Network, clock: FakeClock) -> None:
    expired = peer_record(Identity.generate(), clock() - 1000, ttl=10)
    with pytest.raises(RecordError):
        await net.nodes[1].put(expired)


async def test_records_expire_everywhere(net: Network, clock: FakeClock) -> None:
    rec = peer_record(Identity.generate(), clock(), ttl=60)
    await net.nodes[4].put(rec)
    assert len(holders(net, rec, clock())) == 20
    clock.advance(61)
    assert await net.nodes[9].get(rec.dht_key) == []
    assert holders(net, rec, clock()) == []


async def test_republish_keeps_a_record_alive_past_the_hold_time(clock: FakeClock) -> None:
    async with Network.start(8, clock=clock, republish_interval=600) as net:
        hold = net.nodes[0].storage.hold_for
        published = peer_record(Identity.generate(), clock(), ttl=3 * hold)
        plain = peer_record(Identity.generate(), clock(), ttl=3 * hold)
        await net.nodes[1].publish(published)
        await net.nodes[2].put(plain)
        net.nodes[2].storage.remove(plain.dht_key, plain.slot)  # only the network holds it
        for _ in range(int(1.5 * hold // 600)):
            clock.advance(600)
            assert await net.nodes[1].republish() == 1
        reader = net.nodes[5]
        assert await reader.get(published.dht_key) == [published]
        assert await reader.get(plain.dht_key) == []
        net.nodes[1].withdraw(published.dht_key, published.slot)
        clock.advance(hold + 1)
        assert await net.nodes[1].republish() == 0
        assert await reader.get(published.dht_key) == []


async def test_republish_renews_before_expiry(clock: FakeClock) -> None:
    alice = Identity.generate()
    async with Network.start(5, clock=clock, republish_interval=100) as net:
        first = peer_record(alice, clock(), seq=1, ttl=150)
        renewed: list[SignedRecord] = []

        def renew(old: SignedRecord) -> SignedRecord:
            renewed.append(peer_record(alice, clock(), seq=old.seq + 1, ttl=150))
            return renewed[-1]

        await net.nodes[1].publish(first, renew)
        clock.advance(100)
        assert await net.nodes[1].republish() == 1
        clock.advance(100)
        assert await net.nodes[3].get(first.dht_key) == [renewed[0]]


async def test_state_round_trip_rejoins_with_fewer_rpcs(
    net: Network, clock: FakeClock, tmp_path: Path
) -> None:
    rec = peer_record(Identity.generate(), clock())
    await net.nodes[3].put(rec)
    fresh = DhtNode(clock=clock)
    await fresh.listen()
    try:
        await fresh.bootstrap([net.bootstrap_address])
        cold_rpcs = fresh.stats.total("rpc_out.")
        fresh.save_state(tmp_path / "dht.json")
    finally:
        await fresh.aclose()
    again = await DhtNode.load_state(tmp_path / "dht.json", clock=clock)
    try:
        assert again.node.id == fresh.node.id
        assert again.contact_count() == 20
        assert again.stats.total("rpc_out.") < cold_rpcs
        assert await again.get(rec.dht_key) == [rec]
    finally:
        await again.aclose()


async def test_load_state_refuses_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "dht.json"
    path.write_text('{"version": 1, "id": "zz"}')
    with pytest.raises(DhtError):
        await DhtNode.load_state(path)


async def test_stop_leaves_no_tasks(clock: FakeClock) -> None:
    async with Network.start(5, clock=clock) as net:
        node = net.nodes[2]
        await node.put(peer_record(Identity.generate(), clock()))
    assert all(not n.running for n in net.nodes)
    assert all(t.done() for n in net.nodes for t in n._owned_tasks())


async def test_new_node_close_to_a_key_is_pushed_its_records_once(
    net: Network, clock: FakeClock
) -> None:
    rec = peer_record(Identity.generate(), clock())
    await net.nodes[1].put(rec)
    newcomer_id = rec.dht_key[:-1] + bytes([rec.dht_key[-1] ^ 1])
    newcomer = DhtNode(node_id=newcomer_id, clock=clock)
    await newcomer.listen()
    try:
        await newcomer.bootstrap([net.bootstrap_address])
        await newcomer.bootstrap([net.bootstrap_address])  # talks to everyone again
        await asyncio.gather(*(t for n in net.nodes if n.protocol for t in n.protocol.tasks))
        assert newcomer.storage.records(rec.dht_key, clock()) == [rec]
        assert sum(n.stats["push"] for n in net.nodes) == 1  # only the closest pushes, once
    finally:
        await newcomer.aclose()
