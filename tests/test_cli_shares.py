"""``dhtshare shares``: what my node serves, to how many peers, how much it uploaded.

End to end with the installed executable: a bootstrap node and two users, each its own
node process with DEFAULT settings (no timeout lowered). Alice shares a file; Bob
downloads it; Alice's ``shares`` then counts one peer and the whole file uploaded, in the
table and in ``--json``, for one group or all, and still after her node restarts.
``unshare`` of a name she does not share points at ``shares`` (with her ``--home``).
"""

from __future__ import annotations

import os

import pytest
from support.cli import DHTSHARE, Users, assert_clean_error

pytestmark = pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed")


def test_shares_lists_my_files_with_peers_served_and_bytes_uploaded(users: Users) -> None:
    u = users
    for name in ("alice", "bob"):
        u.new_user(name)
        u.start(name)
    gid = u.group_of("alice", "climbers", "bob")
    u.group_of("alice", "hikers")
    data = os.urandom(3 * 1024 * 1024 + 99)
    (u.root / "route.bin").write_bytes(data)
    (u.root / "map.bin").write_bytes(b"m" * 1000)
    cid = u.run("alice", "share", "climbers", str(u.root / "route.bin")).stdout.strip()
    u.run("alice", "share", "hikers", str(u.root / "map.bin"))

    before = {s["name"]: s for s in u.json("alice", "shares")}
    assert set(before) == {"route.bin", "map.bin"}
    route = before["route.bin"]
    assert route["group"] == "climbers" and route["group_id"] == gid
    assert route["size"] == len(data) and route["content_id"] == cid
    assert route["peers"] == 0 and route["uploaded"] == 0

    u.run("bob", "get", "climbers", "route.bin", "--out", str(u.root / "bob-dl"))
    assert (u.root / "bob-dl" / "route.bin").read_bytes() == data

    [route] = u.json("alice", "shares", "climbers")  # one group: map.bin is in hikers
    assert route["name"] == "route.bin"
    assert route["peers"] == 1 and route["uploaded"] >= len(data)
    table = u.run("alice", "shares").stdout.splitlines()
    assert table[0].split() == ["NAME", "GROUP", "SIZE", "CONTENT", "PEERS", "UPLOADED"]
    row = next(line.split() for line in table if line.startswith("route.bin"))
    assert row[1] == "climbers" and row[4] == cid[:16] and row[5] == "1"

    # the counts survive a restart
    u.run("alice", "node", "stop")
    u.start("alice")
    [route] = u.json("alice", "shares", gid[:12])
    assert route["peers"] == 1 and route["uploaded"] >= len(data)

    # unshare of a name alice does not share points at `shares`, with her --home
    wrong = u.run("alice", "unshare", "climbers", "nope.bin", check=False)
    assert_clean_error(wrong, "nope.bin")
    assert f"dhtshare --home {u.home('alice')} shares" in wrong.stderr
    u.run("alice", "unshare", "climbers", "route.bin")
    assert [s["name"] for s in u.json("alice", "shares")] == ["map.bin"]
    assert u.run("alice", "shares", "climbers").stdout.strip() == "no shares"
