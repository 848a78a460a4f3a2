"""End to end: the installed ``dhtshare`` executable, one process per command and per node.

A bootstrap node and four users (each with its own ``--home`` and loopback address) go through the
whole product: identities, a group, three join requests (two accepted, one rejected), a
shared file downloaded twice (the second time from two peers at once), unsharing, a node
restart that resumes its share, a bootstrap restart that keeps its id, and every error a
user can cause, each of which must be one ``error:`` line (plus an optional ``hint:``), a
non-zero exit and no traceback.

Each test asks for what it needs from module fixtures, built once on first use: ``cluster``
(the bootstrap node and five identities), ``nodes`` (four running nodes), ``climbers`` (the
group and its decisions) and ``solo`` (a file only alice shares). So any one test passes
alone, and the module passes whole; a test may change that state only in ways no other test
relies on. Waits are on processes (``node start --detach`` returns once its node is up; a
``get`` returns when the file is verified) or on a log line; every process is stopped in
the ``cluster`` fixture's ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.cli import (
    DHTSHARE,
    USERS,
    Bootstrap,
    Cluster,
    assert_clean_error,
    free_udp_port,
)

PROVIDER_TIMEOUT = "2"  # seconds a download waits for a provider (DHTSHARE_PROVIDER_TIMEOUT)
# Lowered so the "nobody serves it" errors here come fast; the default 60 s path users keep
# is tested by test_downloads_e2e.py (no timeout lowered there).
PASSPHRASE = "correct horse battery staple"

pytestmark = pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The bootstrap node and the identities of USERS and of eve (who never runs a node)."""
    root = tmp_path_factory.mktemp("e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSHARE_")}
    env["DHTSHARE_PROVIDER_TIMEOUT"] = PROVIDER_TIMEOUT
    c = Cluster(root, env, Bootstrap(free_udp_port(), root / "boot"))
    (root / "pass").write_text(PASSPHRASE + "\n")
    try:
        c.facts["boot_id"] = c.boot.start(env)
        for user in USERS:
            c.run(user, "id", "create", "--name", user, *c.passphrase_args(user))
        c.run("eve", "id", "create", "--name", "eve", *c.passphrase_args("alice"))
        yield c
    finally:
        c.teardown()


@pytest.fixture(scope="module")
def nodes(cluster: Cluster) -> Cluster:
    """``cluster`` with the four USERS' nodes up and bootstrapped."""
    procs = {u: cluster.start_node(u, *cluster.passphrase_args(u)) for u in USERS}
    for proc in procs.values():
        cluster.started(proc)
    return cluster


@dataclass(frozen=True)
class Climbers:
    """alice's public group ``climbers``, and what each step of making it printed."""

    gid: str
    invite: str  # what `group create` printed first, given to bob, carol and dave
    joined: dict[str, str]  # user -> stdout of their `group join`
    requests: list[dict[str, Any]]  # alice's pending requests, before any decision
    accepted_bob: str  # stdout of `group accept climbers bob`


@pytest.fixture(scope="module")
def climbers(nodes: Cluster) -> Climbers:
    """bob, carol and dave ask to join; alice accepts bob and carol and rejects dave."""
    c = nodes
    invite, gid = c.create_group("alice", "climbers", "--public")
    joined = {
        user: c.run(user, "group", "join", invite, "--message", f"hi, {user} here").stdout
        for user in ("bob", "carol", "dave")
    }
    requests = c.json("alice", "group", "requests", "climbers")
    accepted_bob = c.run("alice", "group", "accept", "climbers", "bob").stdout
    c.run("alice", "group", "accept", "climbers", "carol")
    c.run("alice", "group", "reject", "climbers", "dave", "--reason", "not this time")
    return Climbers(gid, invite, joined, requests, accepted_bob)


@pytest.fixture(scope="module")
def solo(nodes: Cluster, climbers: Climbers) -> bytes:
    """``solo.bin``, shared in climbers by alice alone; its content."""
    data = os.urandom(1024 * 1024 + 7)
    (nodes.root / "solo.bin").write_bytes(data)
    nodes.run("alice", "share", "climbers", str(nodes.root / "solo.bin"))
    return data


# ---------------------------------------------------------------------------------- tests


def test_start_errors(cluster: Cluster) -> None:
    c = cluster
    # no identity
    assert_clean_error(c.start_node_result("nobody"), "no identity")
    # wrong passphrase
    (c.root / "wrong").write_text("not it\n")
    assert_clean_error(
        c.start_node_result("eve", "--passphrase-file", str(c.root / "wrong")), "passphrase"
    )
    # node not running
    assert_clean_error(c.run("eve", "node", "status", check=False), "no node is running")
    # port in use: the bootstrap node holds this UDP port on its address
    at_boot = ("--host", "127.0.0.1", "--port", str(c.boot.port))
    busy = c.start_node_result("eve", *c.passphrase_args("alice"), *at_boot)
    assert_clean_error(busy, "cannot listen", "in use")


def test_four_nodes_up_and_one_per_home(nodes: Cluster) -> None:
    c = nodes
    for user in USERS:
        status = c.json(user, "node", "status")
        assert status["name"] == user and status["dht_contacts"] >= 1
    # a second node for the same home is refused
    assert_clean_error(c.start_node_result("bob"), "already running")


def test_group_flow_share_download_unshare(nodes: Cluster, climbers: Climbers) -> None:
    c, gid = nodes, climbers.gid
    assert re.fullmatch(r"[0-9a-f]{64}", gid)
    assert re.fullmatch(r"[A-Za-z0-9_-]{66}", climbers.invite)
    assert all("pending" in out for out in climbers.joined.values()), climbers.joined
    assert sorted(r["name"] for r in climbers.requests) == ["bob", "carol", "dave"]
    assert climbers.accepted_bob.startswith("accepted bob")
    assert c.json("alice", "group", "requests", "climbers") == []
    members = c.json("bob", "group", "members", "climbers")
    assert sorted(m["name"] for m in members) == ["alice", "bob", "carol"]
    assert [g["role"] for g in c.json("carol", "group", "list")] == ["member"]
    listed = c.json("dave", "group", "list", "--directory")  # public: listed with its invite
    assert (gid, climbers.invite) in [(g["group_id"], g["invite"]) for g in listed]

    data = os.urandom(4 * 1024 * 1024 + 12345)
    (c.root / "route.bin").write_bytes(data)
    cid = c.run("alice", "share", "climbers", str(c.root / "route.bin")).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    listed = [f for f in c.json("bob", "files", "climbers") if f["name"] == "route.bin"]
    assert [(f["size"], f["content_id"]) for f in listed] == [(len(data), cid)]

    got = c.run("bob", "get", "climbers", "route.bin", "--out", str(c.root / "bob-dl"))
    assert "complete and verified" in got.stdout
    assert (c.root / "bob-dl" / "route.bin").read_bytes() == data
    c.run("carol", "get", "climbers", cid[:12], "--out", str(c.root / "carol-dl"))
    assert (c.root / "carol-dl" / "route.bin").read_bytes() == data
    [done] = [d for d in c.json("carol", "downloads") if d["name"] == "route.bin"]
    assert done["state"] == "complete" and done["bytes_done"] == len(data)
    assert done["path"] == str(c.root / "carol-dl" / "route.bin")
    assert len(done["sources"]) >= 2, done["sources"]  # alice and bob both served pieces

    # the rejected user cannot download, and is told why
    dave_dl = c.root / "dave-dl"
    refused = c.run("dave", "get", gid, "route.bin", "--out", str(dave_dl), check=False)
    assert_clean_error(refused, "rejected")
    assert not (dave_dl / "route.bin").exists()

    assert providers(c, "bob", "route.bin") == 3
    shares = c.json("alice", "node", "status")["shares"]
    assert "stopped sharing route.bin" in c.run("alice", "unshare", "climbers", cid).stdout
    assert c.json("alice", "node", "status")["shares"] == shares - 1
    assert providers(c, "bob", "route.bin") == 2  # bob and carol still do


def providers(c: Cluster, user: str, name: str) -> int:
    """How many providers ``user`` sees for the file ``name`` in climbers."""
    [entry] = [f for f in c.json(user, "files", "climbers") if f["name"] == name]
    return int(entry["providers"])


def test_every_group_and_file_error(nodes: Cluster, climbers: Climbers) -> None:
    c, gid = nodes, climbers.gid
    assert_clean_error(c.run("bob", "files", "no-such-group", check=False), "unknown group")
    assert_clean_error(c.run("bob", "get", "climbers", "nope.bin", check=False), "no file")
    assert_clean_error(c.run("dave", "files", gid, check=False), "rejected")
    c.run("dave", "group", "leave", gid)  # withdraw the request: now simply not a member
    assert_clean_error(c.run("dave", "get", gid, "route.bin", check=False), "not a member")
    assert_clean_error(
        c.run("bob", "group", "accept", "climbers", "dave", check=False), "only the group's owner"
    )
    missing = c.run("alice", "share", "climbers", str(c.root / "missing.bin"), check=False)
    assert_clean_error(missing, "missing.bin", "No such file")
    assert_clean_error(c.run("alice", "unshare", "climbers", "route.bin", check=False), "unknown")


def test_restart_resumes_share_and_no_providers_meanwhile(nodes: Cluster, solo: bytes) -> None:
    c = nodes
    shares = c.json("alice", "node", "status")["shares"]
    assert "node stopped" in c.run("alice", "node", "stop").stdout

    # alice held the only copy: the download fails after the provider timeout
    carol_solo = c.root / "carol-solo"
    gone = c.run("carol", "get", "climbers", "solo.bin", "--out", str(carol_solo), check=False)
    assert_clean_error(gone, "no providers")
    assert not (carol_solo / "solo.bin").exists()
    failed = [d for d in c.json("carol", "downloads") if d["name"] == "solo.bin"]
    assert failed[0]["state"] == "failed"

    c.started(c.start_node("alice", *c.passphrase_args("alice")))
    assert c.json("alice", "node", "status")["shares"] == shares  # resumed by itself
    c.run("bob", "get", "climbers", "solo.bin", "--out", str(c.root / "bob-solo"))
    assert (c.root / "bob-solo" / "solo.bin").read_bytes() == solo


def test_disk_full(nodes: Cluster, solo: bytes) -> None:
    c = nodes
    small = c.root / "small"
    small.mkdir()
    with tiny_place(c, small) as restore:
        full = c.run("carol", "get", "climbers", "solo.bin", "--out", str(small), check=False)
        restore()
    assert_clean_error(full, "disk full")
    assert not (small / "solo.bin").exists()  # never a half-written file under the final name


@contextlib.contextmanager
def tiny_place(c: Cluster, folder: Path) -> Iterator[Callable[[], None]]:
    """A 256 KiB tmpfs at ``folder`` (the tests run as root here). Where mounting is not
    allowed (or ``DHTSHARE_E2E_NO_MOUNT=1``), carol's node is restarted with RLIMIT_FSIZE
    instead: big writes then fail with EFBIG, which the store reports like ENOSPC. The
    callable it yields undoes the limit before the error is checked."""
    mounted = False
    if os.environ.get("DHTSHARE_E2E_NO_MOUNT") != "1":
        mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
        mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    if mounted:
        try:
            yield lambda: None
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
        return
    c.run("carol", "node", "stop")
    c.started(c.start_node_limited("carol", 256 * 1024))
    limited = True

    def restore() -> None:
        nonlocal limited
        if limited:
            limited = False
            c.run("carol", "node", "stop")
            c.started(c.start_node("carol"))

    try:
        yield restore
    finally:
        restore()


def test_listings_print_one_json_document(nodes: Cluster, climbers: Climbers) -> None:
    c = nodes
    assert c.json("alice", "id", "show")["name"] == "alice"
    for args in (
        ("node", "status"),
        ("group", "list"),
        ("group", "list", "--directory"),
        ("group", "requests", "climbers"),
        ("group", "members", "climbers"),
        ("files", "climbers"),
        ("downloads",),
    ):
        assert isinstance(c.json("alice", *args), dict | list), args


def test_bootstrap_restart_keeps_its_id(cluster: Cluster) -> None:
    c = cluster
    state = json.loads((c.boot.state / "bootstrap.json").read_text())
    assert state["id"] == c.facts["boot_id"]
    assert c.boot.stop() == 0  # SIGTERM: a clean exit with its state saved
    assert c.boot.watcher is not None
    c.boot.watcher.wait_for("state saved")
    assert c.boot.start(c.env) == c.facts["boot_id"]
    assert json.loads((c.boot.state / "bootstrap.json").read_text())["id"] == c.facts["boot_id"]
    c.run(None, "ping", f"127.0.0.1:{c.boot.port}")


# Last: the pinger becomes a (soon dead) contact of the bootstrap node, and lookups that
# ask it wait for that contact's timeout until it is evicted (docs/deploy.md).
def test_ping_answers_exit_0_or_1(cluster: Cluster) -> None:
    ok = cluster.run(None, "ping", f"127.0.0.1:{cluster.boot.port}")
    assert "answered" in ok.stdout
    silent_port = f"127.0.0.1:{free_udp_port()}"
    silent = cluster.run(None, "ping", silent_port, "--timeout", "0.3", check=False)
    assert silent.returncode == 1
    assert_clean_error(silent, "no answer")
