"""The long-running hostile-peer test of issue #13: one node under every attack at once.

It runs ``simulations/hostile.py`` (read its docstring for the scenario): a victim node
(a ``dhtshare node start`` process with its own home) takes garbage datagrams,
spoofed-source requests, a store flood from thousands of ids on one address, a DHT
"node" whose replies name hosts that are not addresses, slow-loris connections and
five crashing members, while it downloads 32 MiB and while the owner removes a member.
The scenario is bounded in count and in time and stops by itself; the whole test takes
about 40 s here (two busy cores).

The assertions are the targets of the issue that one run can check:

- the honest download completes and verifies;
- the removed member is refused within one maintenance interval at its default;
- no unvalidated address got back more than 3 bytes per byte it sent (anti-amplification);
- afterwards the victim still answers DHT pings, serves a member and can publish;
- its log has no asyncio "Task exception was never retrieved", fatal transport error or
  exception in a callback (remote input never raised out of the event loop), and no
  traceback at all; the last-resort guards of the DHT and the peer server counted nothing
  (every bad input was refused where it entered, as a typed error);
- its peak RSS stays under ``PEAK_RSS_MB`` (see there for why that bound);
- no attacker address holds more than ``PER_ADDRESS`` contacts of its routing table.
"""

from __future__ import annotations

from pathlib import Path

from support.scripts import load_script

hostile = load_script("hostile")

PEAK_RSS_MB = 96.0
"""The victim idles at about 32 MB (interpreter, node, one small share) and peaked at
39-43 MB in every run of this scenario on the fixed code (simulations/README.md, "Under
attack"). The bound, about twice that, leaves room for a slower machine (more in flight at
once) but not for a cost per attacker that grows: on the code before the fixes the same
run peaked at 143 MB (the slow-loris connections that announce a 1 MiB frame)."""

PER_ADDRESS = 3
"""At most a few node ids per address in the routing table (issue #13, item 13); the flood
alone sends a new node id in every datagram from one address."""


async def test_node_under_every_attack_downloads_refuses_removed_member_and_keeps_serving(
    tmp_path: Path,
) -> None:
    r = await hostile.run_soak(tmp_path, hostile.SoakOptions())
    print(hostile.render(r))  # shown with -s, and on failure

    download = r["download"]
    assert download["verified"], download

    removal = r["removal"]
    assert removal["refused_after_s"] is not None, removal
    assert removal["refused_after_s"] <= removal["maintenance_interval_s"], removal

    for name, attack in r["udp"].items():
        assert attack["bytes_to_victim"] > 0, name  # the attack ran
        if attack["validated"]:
            continue  # it answers the victim's requests: a validated address
        for address, sent, received in attack["per_address"]:
            assert received <= 3 * sent, (name, address, sent, received)
    assert r["tcp"]["slow_loris"]["opened"] > 0
    assert r["tcp"]["crash_client"]["opened"] > 0

    after = r["afterwards"]
    assert after["pings_answered"] == "3/3", after
    assert after["serves_member"] == "served", after
    assert after["share_exit"] == 0, after
    assert r["victim_alive"]

    assert r["log_problems"] == [], r["log_problems"]
    assert r["log_tracebacks"] == 0  # no remote input ended in an unexpected exception
    counters = after["status"]["counters"]
    caught = {k: v for k, v in counters["dht"].items() if k.startswith("error.")}
    assert caught == {}, caught  # the DHT's last-resort guards caught nothing
    assert counters["peers"].get("drop.bug", 0) == 0, counters["peers"]
    assert 0 < r["peak_rss_mb"] < PEAK_RSS_MB, r["peak_rss_mb"]

    table = r["routing_table"]
    assert table["saved"], table
    assert max(table["attacker_contacts"].values(), default=0) <= PER_ADDRESS, table
