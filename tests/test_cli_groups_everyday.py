"""Groups and providers as people meet them (issue #14 items 2, 5, 6, 7 and 9), end to end.

The installed ``dhtshare`` executable, one process per command and per node, a bootstrap
node and three users, each on its own loopback address, every setting at its default (no
provider timeout lowered). The tests share one network and run in file order.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from support.cli import DHTSHARE, Bootstrap, Cluster, assert_clean_error, free_udp_port

from dhtshare.groups.secrets import Invite
from dhtshare.identity import Identity

pytestmark = pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed")

USERS = ("alice", "bob", "carol")
NO_GROUP = Invite.new(Identity.generate().public).token  # an invite nobody published


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("everyday")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSHARE_")}
    c = Cluster(root, env, Bootstrap(free_udp_port(), root / "boot"))
    try:
        c.boot.start(env)
        for user in USERS:
            c.run(user, "id", "create", "--name", user)
        procs = [c.start_node(u) for u in USERS]
        for proc in procs:
            c.started(proc)
        invite, gid = c.create_group("alice", "climbers")
        c.facts["gid"], c.facts["invite"] = gid, invite
        c.run("bob", "group", "join", invite)
        c.run("alice", "group", "accept", "climbers", "bob")
        yield c
    finally:
        c.teardown()


def test_join_of_a_group_that_does_not_exist_is_an_error_and_leaves_no_row(net: Cluster) -> None:
    refused = net.run("carol", "group", "join", NO_GROUP, check=False)
    assert_clean_error(refused, "no group", "found")
    assert net.json("carol", "group", "list") == []
    # the id of a group that is not listed publicly is not enough to ask
    by_id = net.run("carol", "group", "join", net.facts["gid"], check=False)
    assert_clean_error(by_id, "unknown group")
    assert "paste the invite" in by_id.stderr
    assert net.json("carol", "group", "list") == []

    # a real request can be cancelled with `group leave`, and dropped with `group forget`
    gid, invite = net.facts["gid"], net.facts["invite"]
    assert "pending" in net.run("carol", "group", "join", invite).stdout
    left = net.run("carol", "group", "leave", gid[:12]).stdout
    assert left.strip() == "cancelled your request to join"
    assert net.json("carol", "group", "list") == []
    assert net.json("alice", "group", "requests", "climbers") == []
    net.run("carol", "group", "join", invite)
    assert net.run("carol", "group", "forget", "climbers").stdout.strip() == "forgot climbers"
    assert net.json("carol", "group", "list") == []


def test_second_group_you_own_with_the_same_name_is_refused(net: Cluster) -> None:
    gid = net.facts["gid"]
    again = net.run("alice", "group", "create", "climbers", check=False)
    assert_clean_error(again, "already own a group named 'climbers'", gid[:12])
    assert "choose another name" in again.stderr
    assert [g["group_id"] for g in net.json("alice", "group", "list")] == [gid]

    # a name alice does not own can still collide: the error names both ids
    other_invite, other = net.create_group("bob", "climbers")
    net.run("alice", "group", "join", other_invite)
    net.run("bob", "group", "accept", other, "alice")
    listed = net.json("alice", "group", "list")
    assert sorted(g["group_id"] for g in listed) == sorted([gid, other])
    ambiguous = net.run("alice", "group", "members", "climbers", check=False)
    assert_clean_error(ambiguous, "ambiguous", gid[:12], other[:12])
    assert "hint: use the id" in ambiguous.stderr
    net.facts["other"] = other


def test_accept_messages_name_the_right_command_and_the_member(net: Cluster) -> None:
    gid = net.facts["gid"]
    unknown = net.run("alice", "group", "accept", gid, "zed", check=False)
    assert_clean_error(unknown, "unknown member")
    assert "group requests GROUP" in unknown.stderr
    twice = net.run("alice", "group", "accept", gid, "bob", check=False)
    assert_clean_error(twice, "bob is already a member")


def test_leave_is_strict_and_stops_your_shares_for_good(net: Cluster) -> None:
    gid = net.facts["gid"]
    never = net.run("carol", "group", "leave", gid, check=False)
    assert_clean_error(never, "not a member")

    (net.root / "topo.bin").write_bytes(os.urandom(300_000))
    net.run("bob", "share", gid, str(net.root / "topo.bin"))
    assert [f["name"] for f in net.json("alice", "files", gid)] == ["topo.bin"]
    out = net.run("bob", "group", "leave", gid).stdout
    assert out.splitlines() == ["left the group", "stopped sharing 1 file: topo.bin"]
    assert net.json("bob", "node", "status")["shares"] == 0
    assert net.json("alice", "files", gid) == []

    # rejoining does not bring the share back
    net.run("bob", "group", "join", net.facts["invite"])
    net.run("alice", "group", "accept", gid, "bob")
    assert net.json("bob", "node", "status")["shares"] == 0
    assert net.json("alice", "files", gid) == []

    # the owner's leave names the new owner
    other = net.facts["other"]
    assert net.run("bob", "group", "leave", other).stdout.startswith(
        "left the group; new owner alice ("
    )


def test_stopped_and_crashed_holders_are_not_counted_online(net: Cluster) -> None:
    gid = net.facts["gid"]
    net.run("carol", "group", "join", net.facts["invite"])
    net.run("alice", "group", "accept", gid, "carol")
    data = os.urandom(700_000)
    (net.root / "map.bin").write_bytes(data)
    net.run("alice", "share", gid, str(net.root / "map.bin"))
    net.run("carol", "get", gid, "map.bin", "--out", str(net.root / "carol-dl"))
    [row] = net.json("bob", "files", gid)
    assert row["providers"] == 2

    # a clean stop withdraws alice's provider record
    assert net.run("alice", "node", "stop").stdout.strip() == "node stopped"
    [row] = net.json("bob", "files", gid)
    assert (row["name"], row["providers"]) == ("map.bin", 1)
    assert row["online"] == 1

    # a crash cannot withdraw anything: carol's record stays, but she no longer answers
    os.kill(net.json("carol", "node", "status")["pid"], signal.SIGKILL)
    [row] = net.json("bob", "files", gid)
    assert (row["providers"], row["online"]) == (1, 0)
    assert "ONLINE" in net.run("bob", "files", gid).stdout
