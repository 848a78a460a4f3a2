"""Evidence for issue 17: nothing on the wire names a private group, its members or its files.

Every TCP and UDP payload on ``lo`` is captured (an ``AF_PACKET`` socket: root, as CI runs)
while real node processes (a bootstrap node; owner, alice and bob, each on a loopback
address of its own) live through a whole group: create, two joins by invite, two accepts,
a share, two downloads, bob's removal, a second share, and every node's stop. The capture
is then searched for the group's name, id and invite, the display names and join messages,
the members' keys (raw and as printed), the file names and content ids, and the files'
bytes: there must be none of them. Positive controls show the capture saw the whole life:
marker datagrams sent before the first node starts and after the last stops are found by
the same search, the two downloads' bytes went through it, the DHT's datagrams to the
bootstrap node too, and the kernel dropped nothing.

Every name is distinctive (``zq-...``) and every id random, so a hit is never chance. Waits
poll the CLI under a deadline.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.capture import (
    TCP,
    UDP,
    Flow,
    WireCapture,
    encodings,
    first_hits,
    hits,
    windows,
    wire_capture,
)
from support.cli import (
    DHTSHARE,
    POLL_WITHIN,
    Bootstrap,
    Cluster,
    default_env,
    free_udp_port,
    listing,
    poll,
)

from dhtshare.identity import fingerprint_of, format_id, parse_id

pytestmark = [
    pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed"),
    pytest.mark.timeout(300),
]


GROUP_NAME = "zq-private-climbers-4711"
ROLES = ("owner", "alice", "bob")
NAMES = {"owner": "zq-owner-7", "alice": "zq-alice-7", "bob": "zq-bob-7"}
MESSAGES = {"alice": "zq-knock-knock-alice-7", "bob": "zq-knock-knock-bob-7"}
HOSTS = {"owner": "127.71.1.1", "alice": "127.71.2.1", "bob": "127.71.3.1"}  # this test's own
FILE1, FILE2 = "zq-secret-route-plan.bin", "zq-second-route-plan.bin"
SIZE = 1024 * 1024 + 4711
INVITE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Life:
    """What the group's life made: the invite, ids and keys, content ids and contents."""

    invite: str = ""
    group_id: bytes = b""
    keys: dict[str, bytes] = field(default_factory=dict)  # role -> public key
    content: dict[str, bytes] = field(default_factory=dict)  # file name -> its bytes
    cids: dict[str, bytes] = field(default_factory=dict)  # file name -> content id


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Homes for ROLES, each on its own address in HOSTS; the bootstrap node is not started
    yet (the test starts it once its capture runs). Every node is stopped at the end."""
    c = Cluster(tmp_path, default_env(), Bootstrap(free_udp_port(), tmp_path / "boot"))
    c.hosts.update(HOSTS)
    try:
        yield c
    finally:
        for role in ROLES:
            c.run(role, "node", "stop", check=False)
        c.teardown()


def member_ids(c: Cluster, role: str, invite: str) -> set[str] | None:
    rows = listing(c, role, "group", "members", invite)
    return None if rows is None else {row["id"] for row in rows}


def file_named(c: Cluster, role: str, invite: str, name: str) -> dict[str, Any] | None:
    """The file ``name`` in ``role``'s listing once a provider of it is online."""
    rows = listing(c, role, "files", invite) or []
    return next((f for f in rows if f["name"] == name and f.get("online", 1) >= 1), None)


def first_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.splitlines()
    assert lines, f"{result.args[3:]} printed nothing"
    return lines[0].strip()


def closed_port(host: str) -> int:
    """A UDP port on ``host`` that nobody listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def send_marker(wire: WireCapture, marker: bytes) -> None:
    """``marker`` in a UDP datagram from owner's address to a closed port on alice's (plain
    text on purpose); returns once the capture has read it."""
    wire.mark(marker, HOSTS["owner"], (HOSTS["alice"], closed_port(HOSTS["alice"])))


def start_nodes(c: Cluster) -> dict[str, bytes]:
    """Each role's identity and running node; their public keys."""
    for role in ROLES:
        c.run(role, "id", "create", "--name", NAMES[role])
    procs = {role: c.start_node(role) for role in ROLES}
    for proc in procs.values():
        c.started(proc)
    return {role: parse_id(c.json(role, "id", "show")["id"]) for role in ROLES}


def found_group(c: Cluster, life: Life) -> None:
    """owner creates the group; alice and bob join by invite and are accepted."""
    life.invite = first_line(c.run("owner", "group", "create", GROUP_NAME))
    assert INVITE.fullmatch(life.invite), f"not an invite token: {life.invite!r}"
    [gid] = [g["group_id"] for g in c.json("owner", "group", "list") if g["name"] == GROUP_NAME]
    life.group_id = bytes.fromhex(gid)
    for role in ("alice", "bob"):
        c.run(role, "group", "join", life.invite, "--message", MESSAGES[role])
    poll(
        "owner sees both join requests",
        lambda: len(listing(c, "owner", "group", "requests", life.invite) or []) == 2,
    )
    printed = {role: format_id(key) for role, key in life.keys.items()}
    for role in ("alice", "bob"):
        c.run("owner", "group", "accept", life.invite, printed[role])
    everyone = set(printed.values())
    poll(
        "alice and bob see all three members",
        lambda: all(member_ids(c, r, life.invite) == everyone for r in ("alice", "bob")),
    )


def share(c: Cluster, life: Life, role: str, name: str) -> None:
    data = os.urandom(SIZE)
    (c.root / name).write_bytes(data)
    cid = first_line(c.run(role, "share", life.invite, str(c.root / name)))
    life.content[name], life.cids[name] = data, bytes.fromhex(cid)


def download(c: Cluster, life: Life, role: str, name: str) -> None:
    poll(
        f"{role} sees {name} with a provider online", lambda: file_named(c, role, life.invite, name)
    )
    out = c.root / f"{role}-dl"
    c.run(role, "get", life.invite, name, "--out", str(out), timeout=POLL_WITHIN)
    assert (out / name).read_bytes() == life.content[name]


def group_life(c: Cluster) -> Life:
    """The whole life, from the first node's start to the last node's stop."""
    life = Life()
    c.boot.start(c.env)
    life.keys = start_nodes(c)
    found_group(c, life)
    share(c, life, "owner", FILE1)
    download(c, life, "alice", FILE1)
    download(c, life, "bob", FILE1)
    bob = format_id(life.keys["bob"])
    c.run("owner", "group", "remove", life.invite, bob)
    poll(
        "alice sees bob removed", lambda: bob not in (member_ids(c, "alice", life.invite) or {bob})
    )
    share(c, life, "owner", FILE2)
    poll(f"alice sees {FILE2}", lambda: file_named(c, "alice", life.invite, FILE2))
    for role in ROLES:
        c.run(role, "node", "stop")
    return life


def secrets(life: Life) -> dict[str, bytes]:
    """Everything the wire must not show, keyed by what it is and in which form."""
    gid = life.group_id
    found: dict[str, bytes] = {
        "group name": GROUP_NAME.encode(),
        "invite": life.invite.encode(),
        **encodings("group id", gid),
        "group id (printed prefix)": gid.hex()[:12].encode(),
    }
    for role, key in life.keys.items():
        found[f"display name {NAMES[role]}"] = NAMES[role].encode()
        found |= encodings(f"{role}'s key", key)
        found[f"{role}'s key (fingerprint)"] = fingerprint_of(key).encode()
    for role, message in MESSAGES.items():
        found[f"{role}'s join message"] = message.encode()
    for name, cid in life.cids.items():
        found[f"file name {name}"] = name.encode()
        found |= encodings(f"content id of {name}", cid)
        found[f"content id of {name} (printed prefix)"] = cid.hex()[:12].encode()
    return found


def keep(boot_port: int) -> Callable[[Flow], bool]:
    """This test's flows: to or from its nodes' addresses, or the bootstrap node's."""
    ours = set(HOSTS.values())
    boot = ("127.0.0.1", boot_port)
    return lambda f: bool({f.src[0], f.dst[0]} & ours) or boot in (f.src, f.dst)


def test_the_wire_never_names_the_group_its_members_or_its_files(cluster: Cluster) -> None:
    c = cluster
    wire = wire_capture(keep(c.boot.port), (TCP, UDP))
    if wire is None and os.geteuid() != 0:  # CI runs as root: there it must capture
        pytest.skip("the wire capture needs root (AF_PACKET on lo)")
    assert wire is not None, "no AF_PACKET capture on lo, though root"
    before, after = (f"zq-capture-control-{os.urandom(8).hex()}".encode() for _ in range(2))
    try:
        send_marker(wire, before)
        life = group_life(c)
        send_marker(wire, after)
    finally:
        wire.close()

    places = {str(flow): bytes(data) for flow, data in wire.flows.items()}
    # positive controls: the capture ran from before the first node to after the last,
    # missed nothing, and holds the downloads and the DHT's datagrams
    assert wire.drops == 0 and wire.fragments == 0, (wire.drops, wire.fragments)
    assert set(first_hits(places, {"before": before, "after": after})) == {"before", "after"}
    assert wire.payload_bytes(TCP) >= 2 * SIZE, wire.payload_bytes(TCP)
    to_boot = [f for f in wire.flows if f.proto == UDP and f.dst == ("127.0.0.1", c.boot.port)]
    assert len(to_boot) >= len(ROLES), to_boot

    udp, tcp = (
        {str(f): bytes(d) for f, d in wire.flows.items() if f.proto == p} for p in (UDP, TCP)
    )
    report = leaks(udp, life) + leaks(tcp, life)  # each kind: where first in the DHT, in peers
    assert not report, (
        f"the wire named the private group {len(report)} times "
        f"({wire.packets} packets, {len(places)} flows):\n" + "\n".join(report)
    )


def leaks(places: dict[str, bytes], life: Life) -> list[str]:
    """One line per secret found in ``places``: where first, at which offset."""
    found = first_hits(places, secrets(life))
    report = [f"{what}: first in {place} at offset {at}" for what, (place, at) in found.items()]
    for name, data in life.content.items():
        runs = windows(data)
        assert hits(data[1000:5000], runs) > 0  # the search finds plaintext where there is some
        counts = {place: hits(d, runs) for place, d in places.items()}
        if total := sum(counts.values()):
            where = next(place for place, n in counts.items() if n)
            report.append(f"content of {name}: {total} runs of 64 bytes, first in {where}")
    return report
