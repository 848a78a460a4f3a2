"""Evidence for issue 17: a removed member's node, left running, learns nothing shared after
its removal, cannot download it, and what it publishes afterwards is not taken.

Real node processes (a bootstrap node; owner, alice and bob) on loopback: owner creates a
group, alice and bob join by invite and are accepted, owner shares a first file and bob
downloads it. owner removes bob; bob (still running, still holding the invite) shares a
file of his own; owner shares a second file, and alice sees it. Then bob's node:

- does not list the second file (``files`` either refuses cleanly or leaves it out);
- holds its name and content id nowhere: not in any file under its home (its state, its
  log, and the records it held for others in the DHT, which its stop writes there), not
  even inside a base64 or hex string there. The first file's name and content id, which
  bob did learn, are found by the same search (the positive control);
- started again, cannot ``get`` it, by name or by content id: one ``error:`` line,
  non-zero exit, no file.

And neither alice nor owner lists bob's post-removal file. Waits poll the CLI under a
deadline.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.capture import encodings, first_hits
from support.cli import (
    DHTSHARE,
    POLL_WITHIN,
    Bootstrap,
    Cluster,
    assert_clean_error,
    default_env,
    free_udp_port,
    listing,
    poll,
)

from dhtshare.identity import format_id, parse_id

pytestmark = [
    pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed"),
    pytest.mark.timeout(300),
]


GROUP_NAME = "zq-removal-climbers-4712"
ROLES = ("owner", "alice", "bob")
NAMES = {"owner": "zq-owner-8", "alice": "zq-alice-8", "bob": "zq-bob-8"}
HOSTS = {"owner": "127.72.1.1", "alice": "127.72.2.1", "bob": "127.72.3.1"}
BEFORE = "zq-shared-before-removal.bin"  # bob downloads it while a member
AFTER = "zq-shared-after-removal.bin"  # owner shares it once bob is out
BOBS = "zq-bob-shares-after-removal.bin"  # bob shares it once out
SIZE = 256 * 1024 + 4712
INVITE = re.compile(r"[A-Za-z0-9_-]+")
B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}")
HEX_RUN = re.compile(rb"(?:[0-9a-fA-F]{2}){16,}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The bootstrap node and ROLES' nodes, each on its own address; all stopped at the end."""
    env = default_env()  # the default provider timeout, as users run it
    c = Cluster(tmp_path, env, Bootstrap(free_udp_port(), tmp_path / "boot"))
    c.hosts.update(HOSTS)
    try:
        c.facts["boot_id"] = c.boot.start(env)
        for role in ROLES:
            c.run(role, "id", "create", "--name", NAMES[role])
        procs = [c.start_node(role) for role in ROLES]
        for proc in procs:
            c.started(proc)
        yield c
    finally:
        for role in ROLES:
            c.run(role, "node", "stop", check=False)
        c.teardown()


def member_ids(c: Cluster, role: str, invite: str) -> set[str]:
    return {row["id"] for row in listing(c, role, "group", "members", invite) or []}


def file_named(c: Cluster, role: str, invite: str, name: str) -> dict[str, Any] | None:
    """The file ``name`` in ``role``'s listing once a provider of it is online."""
    rows = listing(c, role, "files", invite) or []
    return next((f for f in rows if f["name"] == name and f.get("online", 1) >= 1), None)


def first_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.splitlines()
    assert lines, f"{result.args[3:]} printed nothing"
    return lines[0].strip()


def printed_ids(c: Cluster) -> dict[str, str]:
    return {role: format_id(parse_id(c.json(role, "id", "show")["id"])) for role in ROLES}


def found_group(c: Cluster, ids: dict[str, str]) -> str:
    """owner's group, alice and bob accepted (each sees all three); its invite."""
    invite = first_line(c.run("owner", "group", "create", GROUP_NAME))
    assert INVITE.fullmatch(invite), f"not an invite token: {invite!r}"
    for role in ("alice", "bob"):
        c.run(role, "group", "join", invite)
    poll(
        "owner sees both join requests",
        lambda: len(listing(c, "owner", "group", "requests", invite) or []) == 2,
    )
    for role in ("alice", "bob"):
        c.run("owner", "group", "accept", invite, ids[role])
    everyone = set(ids.values())
    poll(
        "alice and bob see all three members",
        lambda: all(member_ids(c, r, invite) == everyone for r in ("alice", "bob")),
    )
    return invite


def new_file(c: Cluster, name: str) -> Path:
    path = c.root / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(SIZE))
    return path


def state_of(home: Path) -> dict[str, bytes]:
    """Every file under ``home``, and what every base64 or hex string in one decodes to."""
    places: dict[str, bytes] = {}
    for path in sorted(p for p in home.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        places[str(path)] = data
        for run in {*B64_RUN.findall(data), *HEX_RUN.findall(data)}:
            for decoded in decodings(run):
                places[f"{path} (decoded from {run[:16]!r}...)"] = decoded
    return places


def decodings(run: bytes) -> list[bytes]:
    """``run`` decoded as hex, base64 and base64url, where it is one."""
    out = []
    if HEX_RUN.fullmatch(run):
        out.append(bytes.fromhex(run.decode()))
    padded = run + b"=" * (-len(run) % 4)
    for altchars in (b"+/", b"-_"):
        try:
            out.append(base64.b64decode(padded, altchars=altchars))
        except (binascii.Error, ValueError):
            pass
    return out


def test_a_removed_member_learns_nothing_shared_after_and_its_records_are_refused(
    cluster: Cluster,
) -> None:
    c = cluster
    ids = printed_ids(c)
    invite = found_group(c, ids)
    before = first_line(c.run("owner", "share", invite, str(new_file(c, BEFORE))))
    poll(f"bob sees {BEFORE}", lambda: file_named(c, "bob", invite, BEFORE))
    c.run("bob", "get", invite, BEFORE, "--out", str(c.root / "bob-dl"), timeout=POLL_WITHIN)

    c.run("owner", "group", "remove", invite, ids["bob"])
    poll(
        "alice sees bob removed",
        lambda: member_ids(c, "alice", invite) == {ids["owner"], ids["alice"]},
    )
    bobs = c.run("bob", "share", invite, str(new_file(c, BOBS)), check=False)
    if bobs.returncode != 0:  # his node may know he is out; then it says so in one line
        assert_clean_error(bobs)
    after = first_line(c.run("owner", "share", invite, str(new_file(c, AFTER))))
    poll(f"alice sees {AFTER}", lambda: file_named(c, "alice", invite, AFTER))

    # what bob published after his removal: alice and owner list it nowhere (they list what
    # came after it: the share above)
    for role in ("alice", "owner"):
        names = [f["name"] for f in listing(c, role, "files", invite) or []]
        assert AFTER in names, (role, names)
        assert BOBS not in names, f"{role} lists {BOBS}, shared by bob after his removal"

    # bob's node, asked to list the group, does not show the file shared after his removal
    bob_files = c.run("bob", "files", invite, "--json", check=False)
    if bob_files.returncode != 0:
        assert_clean_error(bob_files)
    else:
        rows = json.loads(bob_files.stdout)
        leaked = [f for f in rows if f["name"] == AFTER or f["content_id"] == after]
        assert not leaked, f"bob, removed, lists {leaked}"

    # ...nor holds its name or content id anywhere in his home (state, log, and the records
    # it held for the DHT, which a stop writes there); the same search finds what it learnt
    # while a member
    c.run("bob", "node", "stop")
    home = c.home("bob")
    assert (home / "node.log").stat().st_size > 0
    state = state_of(home)
    learnt = first_hits(state, {"name": BEFORE.encode(), "id": before.encode()})
    assert set(learnt) == {"name", "id"}, f"the search misses what bob learnt: {learnt}"
    secret = {f"name {AFTER}": AFTER.encode(), **encodings("content id", bytes.fromhex(after))}
    secret["content id (printed prefix)"] = after[:12].encode()
    found = first_hits(state, secret)
    report = [f"{what}: first in {place} at offset {at}" for what, (place, at) in found.items()]
    assert not found, f"bob's node, removed, learnt {len(found)} ways:\n" + "\n".join(report)

    # ...and cannot download it, by name or by content id: one clean error line
    c.started(c.start_node("bob"))
    out = c.root / "bob-after"
    for ref in (AFTER, after):
        assert_clean_error(c.run("bob", "get", invite, ref, "--out", str(out), check=False))
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
