"""``dhtshare shares``: what my node serves, to how many peers, how much it uploaded.

End to end with the installed executable: a bootstrap node and two users, each its own
node process with DEFAULT settings (no timeout lowered). Alice shares a file; Bob
downloads it; Alice's ``shares`` then counts one peer and the whole file uploaded, in the
table and in ``--json``, for one group or all, and still after her node restarts.
``unshare`` of a name she does not share points at ``shares`` (with her ``--home``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_cli_e2e import (
    DHTSHARE,
    TIMEOUT,
    Bootstrap,
    assert_clean_error,
    free_udp_port,
    kill_all,
)

pytestmark = pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed")


def default_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DHTSHARE")}


@dataclass
class Users:
    """Users on one machine, each with a ``--home`` under ``root``, and one bootstrap node.

    The environment carries no ``DHTSHARE_*`` variable: every setting is the default."""

    root: Path
    boot: Bootstrap
    env: dict[str, str] = field(default_factory=lambda: default_env())
    pids: set[int] = field(default_factory=set)
    homes: set[Path] = field(default_factory=set)

    def home(self, user: str) -> Path:
        return self.root / user

    def run(
        self, user: str | None, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(DHTSHARE), *(["--home", str(self.home(user))] if user else [])]
        if user:
            self.homes.add(self.home(user))
        result = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=env or self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
        )
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        if check:
            assert result.returncode == 0, f"{args}: {result.stderr}"
        if m := re.search(r"\(pid (\d+)\)", result.stdout):
            self.pids.add(int(m.group(1)))
        return result

    def json(self, user: str, *args: str) -> Any:
        return json.loads(self.run(user, *args, "--json").stdout)

    def start(self, user: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``node start --detach`` through the bootstrap node (unless ``extra`` says)."""
        boot = ("--bootstrap", f"127.0.0.1:{self.boot.port}") if "--alone" not in extra else ()
        args = [a for a in extra if a != "--alone"]
        return self.run(user, "node", "start", "--detach", *boot, *args, check=check)

    def new_user(self, user: str) -> None:
        self.run(user, "id", "create", "--name", user)

    def group_of(self, owner: str, name: str, *members: str) -> str:
        """``owner`` founds group ``name``; each of ``members`` asks and is accepted."""
        gid = self.run(owner, "group", "create", name).stdout.strip()
        for member in members:
            self.run(member, "group", "join", gid)
            self.run(owner, "group", "accept", name, member)
        return gid

    def teardown(self) -> None:
        for home in self.homes:
            with contextlib.suppress(Exception):
                stop = [str(DHTSHARE), "--home", str(home), "node", "stop"]
                subprocess.run(stop, capture_output=True, timeout=TIMEOUT, env=self.env)
        kill_all(self.pids, self.boot)


@contextlib.contextmanager
def users_on_one_machine(root: Path) -> Iterator[Users]:
    u = Users(root, Bootstrap(free_udp_port(), root / "boot"))
    try:
        u.boot.start(u.env)
        yield u
    finally:
        u.teardown()


@pytest.fixture
def users(tmp_path: Path) -> Iterator[Users]:
    with users_on_one_machine(tmp_path) as u:
        yield u


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
