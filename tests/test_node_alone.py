"""A node started with no bootstrap node and no saved contacts says so at once.

Before, ``node start`` said ``node running`` with 0 contacts and the next command failed
with "no DHT node stored the record". Now the start warns (with what to do, naming the
user's ``--home``), and a command that must publish says "not connected to any node".
Real node processes, default settings.
"""

from __future__ import annotations

from support.cli import Users, assert_clean_error


def test_start_without_any_contact_warns_and_publishing_says_not_connected(
    users: Users,
) -> None:
    u = users
    u.new_user("solo")
    started = u.start("solo", "--alone")
    assert started.stdout.startswith("node running at "), started.stdout
    assert "warning: not connected to any node" in started.stderr, started.stderr
    home = u.home("solo")
    assert f"dhtshare --home {home} node start --bootstrap HOST:PORT" in started.stderr
    assert u.json("solo", "node", "status")["dht_contacts"] == 0

    failed = u.run("solo", "group", "create", "climbers", check=False)
    line = assert_clean_error(failed, "not connected to any node")
    assert "no DHT node stored" not in line
    assert f"dhtshare --home {home} node start --bootstrap" in failed.stderr


def test_start_through_a_bootstrap_node_does_not_warn(users: Users) -> None:
    u = users
    u.new_user("joined")
    started = u.start("joined")
    assert "warning" not in started.stderr, started.stderr
    u.run("joined", "group", "create", "climbers")
