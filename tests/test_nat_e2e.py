"""Sharing between homes behind NAT routers, with real ``dhtshare`` processes (issue #16).

The topology of tests/support/netns.py: a bootstrap node that relays (``bootstrap
--relay``) and a public member on the "internet"; the owner (keep1) and a member (keep2)
each behind a port-keeping router; a member (rand) behind a router that maps ports
randomly per destination, so no hole can be punched to it and only a relay carries its
traffic. Every node is started as README shows it: ``node start --bootstrap HOST:PORT
--detach``, no address option, all four at once. The private owner creates the group,
the others join, the owner shares a file of random bytes; each member downloads it by
the route the design gives (``downloads --json`` ``routes``), and every copy is
byte-identical.

The tests share one network (a module fixture) and run in file order: a member that has
downloaded a file serves it to the next ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from support.cli import DHTSHARE
from support.netns import Nodes, Topology, nodes, topology, unavailable

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
    pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed"),
]

OWNER, MEMBERS = "keep1", ("public", "keep2", "rand")
SIZE = 4 * 1024 * 1024
REACHABILITY_WITHIN = 30.0  # seconds after `node start` (the target)
GET_TIMEOUT = 45.0


@dataclass
class Lab:
    topo: Topology
    n: Nodes
    known_after: dict[str, float]  # seconds from `node start` until reachability was known
    gid: str
    data: dict[str, bytes] = field(default_factory=dict)  # file name -> its bytes


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("nat")
    with topology() as topo, nodes(topo, root) as n:
        n.start_bootstrap("--relay")
        for role in (OWNER, *MEMBERS):
            n.run(role, "id", "create", "--name", role)
        started_at, procs = {}, {}
        for role in (OWNER, *MEMBERS):  # all at once: each meets the others as they come
            started_at[role] = time.monotonic()
            procs[role] = n.start(role)
        for role, proc in procs.items():
            n.started(role, proc)
        known_after = {}
        for role in started_at:
            left = started_at[role] + REACHABILITY_WITHIN - time.monotonic()
            n.wait_status(role, known, max(left, 0.0))
            known_after[role] = time.monotonic() - started_at[role]
        deadline = time.monotonic() + REACHABILITY_WITHIN
        for role in (OWNER, "keep2", "rand"):  # a private provider names its relays
            left = deadline - time.monotonic()
            n.wait_status(role, lambda d: bool(d.get("relays")), max(left, 0.0))
        # the invite (first line): every command takes it as GROUP
        gid = n.run(OWNER, "group", "create", "crag").stdout.splitlines()[0]
        for member in MEMBERS:
            n.run(member, "group", "join", gid)
            n.run(OWNER, "group", "accept", "crag", member)
        lab = Lab(topo, n, known_after, gid)
        share(lab, OWNER, "big.bin", SIZE)
        yield lab


def share(lab: Lab, role: str, name: str, size: int) -> None:
    data = os.urandom(size)
    path = lab.n.root / f"files-{role}" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    lab.n.run(role, "share", "crag", str(path))
    lab.data[name] = data


def get(lab: Lab, role: str, name: str) -> dict[str, str]:
    """``role`` downloads ``name`` (it must arrive byte-identical); the download's routes."""
    out = lab.n.root / f"out-{role}"
    out.mkdir(exist_ok=True)
    lab.n.run(role, "get", "crag", name, "--out", str(out), timeout=GET_TIMEOUT)
    assert (out / name).read_bytes() == lab.data[name], f"{role}: {name} differs"
    return routes_of(lab, role, name)


def routes_of(lab: Lab, role: str, name: str) -> dict[str, str]:
    rows = {d["name"]: d for d in lab.n.json(role, "downloads")}
    assert rows[name]["state"] == "complete", rows[name]
    routes = rows[name].get("routes")
    assert isinstance(routes, dict) and routes, f"{role}: no routes in {rows[name]}"
    return routes


def test_every_node_knows_its_reachability_within_30_s(lab: Lab) -> None:
    for role in (OWNER, *MEMBERS):
        doc = lab.n.status(role)
        want = "public" if role == "public" else "private"
        assert doc.get("reachability") == want, f"{role}: {status_summary(doc)}"
        assert lab.known_after[role] <= REACHABILITY_WITHIN, lab.known_after
    public = lab.n.status("public")
    port = public["address"].rsplit(":", 1)[1]
    assert public["public_address"] == f"{lab.topo.public_ip('public')}:{port}", public


def test_every_private_node_holds_a_relay(lab: Lab) -> None:
    """Its reservations are at public nodes: the bootstrap node or the public member."""
    public = {lab.topo.public_ip(role) for role in ("boot", "public")}
    for role in (OWNER, "keep2", "rand"):
        doc = lab.n.status(role)
        relays = doc.get("relays")
        assert relays and {r.rsplit(":", 1)[0] for r in relays} <= public, status_summary(doc)


def known(doc: dict[str, Any]) -> bool:
    return doc.get("reachability") in ("public", "private")


def status_summary(doc: dict[str, Any]) -> dict[str, Any]:
    keys = ("reachability", "public_address", "relays", "advertised", "dht_contacts")
    return {k: doc.get(k, "(absent)") for k in keys}


def test_a_private_sharer_counts_as_online(lab: Lab) -> None:
    """keep1 is behind NAT: no ping reaches its address, but its record names a relay."""
    for role in MEMBERS:
        rows = {f["name"]: f for f in lab.n.json(role, "files", "crag")}
        assert rows["big.bin"]["online"] == 1, f"{role}: {rows['big.bin']}"


def test_a_private_member_downloads_over_a_punched_connection(lab: Lab) -> None:
    """keep2 -> keep1, both behind port-keeping routers: a hole is punched."""
    assert set(get(lab, "keep2", "big.bin").values()) == {"punched"}


def test_the_member_behind_the_random_nat_downloads_through_a_relay(lab: Lab) -> None:
    """rand's router maps ports per destination: punching cannot work, a relay carries it
    (from the owner and from keep2, who now has the file too)."""
    assert set(get(lab, "rand", "big.bin").values()) == {"relayed"}


def test_the_public_member_downloads_it_directly(lab: Lab) -> None:
    """A public downloader and private providers: each provider connects to it (reverse
    connection), no relay in the data path."""
    assert set(get(lab, "public", "big.bin").values()) == {"direct"}


def test_a_public_members_file_reaches_every_private_host_directly(lab: Lab) -> None:
    share(lab, "public", "public.bin", SIZE // 4)
    procs = {}
    for role in ("keep1", "keep2", "rand"):
        (out := lab.n.root / f"out-{role}").mkdir(exist_ok=True)
        procs[role] = lab.n.popen(role, "get", "crag", "public.bin", "--out", str(out))
    for role, proc in procs.items():
        _, err = proc.communicate(timeout=GET_TIMEOUT)
        assert proc.returncode == 0, f"{role}: {err.strip()}"
    for role in procs:
        path = lab.n.root / f"out-{role}" / "public.bin"
        assert path.read_bytes() == lab.data["public.bin"], f"{role}: public.bin differs"
        routes = routes_of(lab, role, "public.bin")
        # the public member is reached directly; a private member that already holds
        # pieces may be punched or relayed to
        assert "direct" in routes.values(), f"{role}: {routes}"


def expected_route(downloader: str, provider: str) -> str:
    """The route the design gives a download from ``provider`` to ``downloader``."""
    if "public" in (downloader, provider):
        return "direct"  # to a public provider, or its reverse connection to a public downloader
    if "rand" in (downloader, provider):
        return "relayed"  # a random-port router cannot be punched
    return "punched"


def test_every_host_downloads_from_every_other_by_its_route(lab: Lab) -> None:
    """All 12 ordered pairs of nodes: each shares a file and each other node downloads it
    from that node alone (a downloader unshares its copy before the next one starts), by
    the route the design gives the pair, byte-identical."""
    roles = (OWNER, *MEMBERS)
    ids = {role: lab.n.status(role)["id"] for role in roles}
    for provider in roles:
        name = f"from-{provider}.bin"
        share(lab, provider, name, 256 * 1024)
        for downloader in roles:
            if downloader == provider:
                continue
            routes = get(lab, downloader, name)
            row = {d["name"]: d for d in lab.n.json(downloader, "downloads")}[name]
            pair = f"{downloader} <- {provider}"
            assert set(row["sources"]) == {ids[provider]}, f"{pair}: {row['sources']}"
            assert routes.get(ids[provider]) == expected_route(downloader, provider), (
                f"{pair}: {routes}"
            )
            lab.n.run(downloader, "unshare", "crag", name)


def test_a_member_whose_router_forgot_its_mappings_still_finds_new_records(lab: Lab) -> None:
    """rand's router forgets idle UDP mappings after 1 s (home routers: 30 s and more) and
    maps each new flow to a new random port: the DHT nodes see rand at addresses they
    have not validated. Its next lookups must still find what is there: a new group to
    join, a new file to get."""
    port = int(lab.n.status("rand")["address"].rsplit(":", 1)[1])
    lab.topo.set_udp_timeout("rand", 1)
    before = lab.topo.udp_mappings("rand", port)
    assert before, "rand's DHT port has no mapping to forget"
    deadline = time.monotonic() + 30
    while before & lab.topo.udp_mappings("rand", port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not before & lab.topo.udp_mappings("rand", port), "the router kept its mappings"
    gid = lab.n.run(OWNER, "group", "create", "second").stdout.splitlines()[0]
    share(lab, OWNER, "late.bin", 64 * 1024)
    lab.n.run("rand", "group", "join", gid)
    get(lab, "rand", "late.bin")
