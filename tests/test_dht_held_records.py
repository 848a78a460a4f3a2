"""A node keeps the records it holds for others across a restart (``save_records`` /
``load_records``): where most nodes are behind NAT (DHT clients store nothing), the few
public nodes hold every record, and a restart of one must not lose a group."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import peer_record

from dhtshare.dht.server import DhtNode
from dhtshare.identity import Identity


async def test_records_held_for_others_come_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "records.bin"
    now = time.time()
    records = [peer_record(Identity.generate(), now, ttl=600) for _ in range(5)]
    expired = peer_record(Identity.generate(), now - 700, ttl=600)
    first = DhtNode()
    for rec in records:
        assert first.storage.offer(rec.dht_key, rec.encode(), now, source="127.0.0.9")
    assert first.save_records(path) == 5
    second = DhtNode()
    assert second.load_records(path) == 5
    for rec in records:
        assert second.storage.reply_records(rec.dht_key, 10_000, now) == [rec.encode()]
    # A damaged tail costs only what it damaged; a forged, misfiled or expired record is
    # refused as on a store.
    data = path.read_bytes()
    fresh = peer_record(Identity.generate(), now, ttl=600)
    forged = bytearray(fresh.encode())
    forged[-1] ^= 1  # the signature
    tails = [
        (fresh.dht_key, bytes(forged)),
        (records[0].dht_key, fresh.encode()),  # under another record's key
        (expired.dht_key, expired.encode()),
    ]
    tail = b"".join(len(raw).to_bytes(2, "big") + key + raw for key, raw in tails)
    path.write_bytes(data + tail + data[: len(data) // 7])
    third = DhtNode()
    assert third.load_records(path) == 5
    assert third.load_records(tmp_path / "missing.bin") == 0
