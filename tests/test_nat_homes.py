"""Everybody at home (issue #16): the only public machine is the bootstrap node (``bootstrap
--relay``), as for a group of friends with one small server; every member is behind a
router (tests/support/netns.py): keep1 and its LAN-mate ``mate`` behind one router,
keep2 behind another that keeps ports, rand behind one that picks random ports.

Each finds itself private (whatever a LAN-mate sees of it across the LAN), holds a
reservation at the bootstrap node, and gets keep1's file by its own route: ``mate``
straight over the LAN, keep2 through a punched hole, rand through the relay."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.cli import DHTSHARE
from support.netns import Nodes, Topology, nodes, topology, unavailable

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
    pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed"),
]

ROLES = ("keep1", "mate", "keep2", "rand")
WITHIN = 30.0  # seconds after `node start` for a settled reachability
GET_TIMEOUT = 45.0


@dataclass
class Lan:
    topo: Topology
    n: Nodes
    data: bytes


def _known(doc: dict[str, Any]) -> bool:
    return doc.get("reachability") in ("public", "private")


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    root = tmp_path_factory.mktemp("lan")
    with topology() as topo, nodes(topo, root) as n:
        n.start_bootstrap("--relay")
        procs = {}
        for role in ROLES:
            n.run(role, "id", "create", "--name", role)
            procs[role] = n.start(role)
        for role, proc in procs.items():
            n.started(role, proc)
        deadline = time.monotonic() + WITHIN
        for role in ROLES:
            n.wait_status(role, _known, max(deadline - time.monotonic(), 0.0))
        # the invite (first line): every command takes it as GROUP
        gid = n.run("keep1", "group", "create", "home").stdout.splitlines()[0]
        for member in ROLES[1:]:
            n.run(member, "group", "join", gid)
            n.run("keep1", "group", "accept", "home", member)
        data = os.urandom(1024 * 1024)
        path = root / "shared.bin"
        path.write_bytes(data)
        n.run("keep1", "share", "home", str(path))
        yield Lan(topo, n, data)


def test_every_member_at_home_is_private_and_holds_the_bootstrap_relay(lan: Lan) -> None:
    """A LAN-mate dials keep1 back across the LAN: that says nothing about the outside."""
    boot = lan.topo.public_ip("boot")
    for role in ROLES:
        doc = lan.n.wait_status(role, lambda d: bool(d.get("relays")), WITHIN)
        assert doc["reachability"] == "private", f"{role}: {doc['reachability']}"
        assert {r.rsplit(":", 1)[0] for r in doc["relays"]} == {boot}, doc["relays"]
        public_address = doc["public_address"]
        assert public_address is None or public_address.startswith(lan.topo.public_ip(role))


@pytest.mark.parametrize(
    ("role", "route"), [("mate", "direct"), ("keep2", "punched"), ("rand", "relayed")]
)
def test_each_member_gets_the_file_by_its_route(lan: Lan, role: str, route: str) -> None:
    """From keep1 alone: each downloader unshares its copy before the next one starts."""
    out = lan.n.root / f"out-{role}"
    out.mkdir()
    lan.n.run(role, "get", "home", "shared.bin", "--out", str(out), timeout=GET_TIMEOUT)
    assert (out / "shared.bin").read_bytes() == lan.data
    row = {d["name"]: d for d in lan.n.json(role, "downloads")}["shared.bin"]
    keep1 = lan.n.status("keep1")["id"]
    assert row["routes"] == {keep1: route}, row["routes"]
    lan.n.run(role, "unshare", "home", "shared.bin")
