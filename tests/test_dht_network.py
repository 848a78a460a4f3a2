"""DhtNode on a real 20-node loopback network (dhtshare.sim)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from conftest import FakeClock, bodies_of_every_kind, peer_record
from kademlia.node import Node

from dhtshare.dht import DhtNode
from dhtshare.errors import DhtError, RecordError
from dhtshare.identity import Identity
from dhtshare.records import JoinRequest, SignedRecord, sign_record
from dhtshare.sim import Network

pytestmark = pytest.mark.timeout(30)


def holders(net: Network, rec: SignedRecord, now: float) -> list[DhtNode]:
    return [n for n in net.live if rec in n.storage.records(rec.dht_key, now)]


async def test_every_kind_put_and_got_from_random_nodes(net: Network, clock: FakeClock) -> None:
    rng = random.Random(1)
    owner = Identity.generate()
    for body in bodies_of_every_kind(owner, clock()):
        rec = sign_record(owner, body, seq=1, now=clock(), ttl=600)
        writer, reader = rng.sample(net.nodes, 2)
        assert await writer.put(rec) >= 10
        assert await reader.get(rec.dht_key) == [rec], rec.kind


async def test_lookup_gathers_from_k_closest_and_keeps_alpha_in_flight(net: Network) -> None:
    node = net.nodes[5]
    assert await node.get(bytes(20)) == []
    stats = node.lookups[-1]
    assert stats.rpcs == 19  # every other node is among the k=20 closest
    assert stats.answered == 19


async def test_forged_records_refused_by_every_node_and_never_returned(
    net: Network, clock: FakeClock
) -> None:
    alice = Identity.generate()
    v1, v2 = peer_record(alice, clock(), seq=1), peer_record(alice, clock(), seq=2)
    await net.nodes[1].put(v2)
    bad_sig = bytearray(peer_record(alice, clock(), seq=3).encode())
    bad_sig[-5] ^= 0xFF
    other = peer_record(Identity.generate(), clock())
    forgeries = [
        (v2.dht_key, bytes(bad_sig)),
        (other.dht_key, v2.encode()),
        (v2.dht_key, v1.encode()),
    ]
    attacker = net.nodes[2].protocol
    assert attacker is not None
    for target in net.nodes:
        for key, raw in forgeries:
            ok, kept = await attacker.call_store(Node(target.node.id, *target.address), key, raw)
            assert ok
            assert kept is (target is net.nodes[2] and False)
    for node in net.nodes:
        assert node.storage.records(v2.dht_key, clock()) == [v2]
        assert node.storage.count(other.dht_key) == 0
        refused = node.stats.snapshot()
        assert refused.get("refuse.bad_signature") == 1
        assert refused.get("refuse.wrong_key") == 1
        assert refused.get("refuse.stale") == 1
    for node in random.Random(2).sample(net.nodes, 5):
        assert await node.get(v2.dht_key) == [v2]
        assert await node.get(other.dht_key) == []


async def test_bad_records_in_replies_are_dropped_by_the_reader(
    net: Network, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = Identity.generate()
    good = peer_record(alice, clock(), seq=1)
    await net.nodes[1].put(good)
    forged = bytearray(peer_record(alice, clock(), seq=9).encode())
    forged[-1] ^= 1
    liar = net.nodes[3].storage
    real = liar.reply_records
    monkeypatch.setattr(liar, "reply_records", lambda k, b, n: [bytes(forged), *real(k, b, n)])
    reader = net.nodes[7]
    assert await reader.get(good.dht_key) == [good]
    assert reader.stats["lookup.bad_record"] == 1


async def test_ten_signers_under_one_key_all_returned(net: Network, clock: FakeClock) -> None:
    gid = bytes(range(32))
    recs = []
    for i in range(10):
        body = JoinRequest(gid, f"member{i}")
        rec = sign_record(Identity.generate(), body, seq=1, now=clock() - i, ttl=600)
        await net.nodes[1 + i].put(rec)
        recs.append(rec)
    for node in (net.nodes[0], net.nodes[13], net.nodes[19]):
        assert await node.get(recs[0].dht_key) == recs


async def test_lookups_survive_thirty_percent_dead(net: Network, clock: FakeClock) -> None:
    recs = [peer_record(Identity.generate(), clock()) for _ in range(5)]
    for i, rec in enumerate(recs):
        await net.nodes[i + 1].put(rec)
    net.stop_nodes(random.Random(3).sample(range(1, 20), 6))
    live = net.live
    for i, rec in enumerate(recs):
        assert await live[i % len(live)].get(rec.dht_key) == [rec]
    assert sum(s.failures for n in live for s in n.lookups) > 0


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
