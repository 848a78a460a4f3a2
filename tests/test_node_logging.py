"""The node's log says what happened, at the level asked, and the settings are kept.

``node.log`` used to hold the DHT's "listening" lines only. Now each event a user causes
(group created, join request, accept, share, download complete, unshare, a failed command)
is one INFO line with ids and names, names cleaned of control characters;
``--log-level`` chooses what is kept, ``-v`` reaches a ``--detach`` node, and the log level
and the rate limits given to ``node start`` are kept for the next start. Real node
processes, default settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from support.cli import Users

from dhtshare.home import Home
from dhtshare.node import settings


def log_of(u: Users, user: str) -> str:
    return (u.home(user) / "node.log").read_text()


def test_node_log_names_each_event_with_ids_and_cleaned_names(users: Users) -> None:
    u = users
    for name in ("alice", "bob"):
        u.new_user(name)
        u.start(name)
    invite, gid = u.create_group("alice", "climbers")
    u.run("bob", "group", "join", invite)
    u.run("alice", "group", "accept", gid[:12], "bob")
    data = os.urandom(1024 * 1024 + 3)
    evil = "route\x1b[2J.bin"  # a file name may hold an escape sequence
    (u.root / evil).write_bytes(data)
    cid = u.run("alice", "share", gid[:12], str(u.root / evil)).stdout.strip()
    u.run("bob", "get", gid[:12], cid, "--out", str(u.root / "dl"))
    u.run("alice", "unshare", gid[:12], "nope.bin", check=False)
    u.run("alice", "unshare", gid[:12], cid)
    u.run("bob", "group", "leave", gid[:12])
    u.run("bob", "node", "stop")

    alice, bob = log_of(u, "alice"), log_of(u, "bob")
    label = f"climbers ({gid[:16]})"
    shown = "route\\x1b[2J.bin"
    assert "\x1b" not in alice + bob
    assert f"created group {label}" in alice
    assert "accepted bob (" in alice
    assert f"sharing {shown} ({cid[:16]}, {len(data)} bytes) in group {label}" in alice
    assert "failed: unknown shared file: nope.bin" in alice
    assert f"stopped sharing {shown} ({cid[:16]}) in group {label}" in alice
    assert f"asked to join group {label}: pending" in bob
    assert f"download of {shown} ({cid[:16]}) in group {label} complete and verified" in bob
    assert " started: listening on 0.0.0.0:" in bob
    assert f"left group {label}; stopped sharing {shown}" in bob
    assert "stopped; state saved" in bob
    assert " DEBUG " not in alice  # the default level is info


def test_log_level_and_rate_limits_are_kept_across_restarts(users: Users) -> None:
    u = users
    u.new_user("carol")
    u.start("carol", "--upload-limit", "2", "--download-limit", "3.5", "--log-level", "debug")
    status = u.json("carol", "node", "status")
    assert (status["upload_limit"], status["download_limit"]) == (2e6, 3.5e6)
    assert status["log_level"] == "debug"
    u.run("carol", "node", "stop")
    assert " DEBUG " in log_of(u, "carol")

    u.start("carol")  # nothing given: the last start's settings
    status = u.json("carol", "node", "status")
    assert (status["upload_limit"], status["download_limit"]) == (2e6, 3.5e6)
    assert status["log_level"] == "debug"
    u.run("carol", "node", "stop")

    u.start("carol", "--upload-limit", "0", "--log-level", "warning")  # 0: no limit
    status = u.json("carol", "node", "status")
    assert (status["upload_limit"], status["download_limit"]) == (None, 3.5e6)
    assert status["log_level"] == "warning"
    u.run("carol", "node", "stop")
    saved = json.loads((u.home("carol") / "settings.json").read_text())
    assert saved == {
        "upload_limit": None,
        "download_limit": 3.5e6,
        "log_level": "warning",
        "bootstrap": [["127.0.0.1", u.boot.port]],
    }

    u.start("carol", "--alone")  # no --bootstrap: the last one given
    assert u.json("carol", "node", "status")["dht_contacts"] >= 1
    u.run("carol", "node", "stop")


def test_verbose_reaches_a_detached_node(users: Users) -> None:
    u = users
    u.new_user("dave")
    u.run("dave", "-v", "node", "start", "--detach", "--bootstrap", f"127.0.0.1:{u.boot.port}")
    out = (u.home("dave") / "node.out").read_text()
    assert " INFO dhtshare.node.service: node " in out and " started: " in out, out


def test_damaged_settings_give_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text('{"upload_limit": "fast", "log_level": "loud"')
    assert settings.load(Home(tmp_path)) == {
        "upload_limit": None,
        "download_limit": None,
        "log_level": "info",
        "bootstrap": (),
    }
    (tmp_path / "settings.json").write_text('{"upload_limit": -5, "download_limit": 1e6}')
    loaded = settings.load(Home(tmp_path))
    assert (loaded["upload_limit"], loaded["download_limit"]) == (None, 1e6)
    merged = settings.merge(loaded, upload_limit=0.0, download_limit=None, log_level="debug")
    assert merged == {
        "upload_limit": None,
        "download_limit": 1e6,
        "log_level": "debug",
        "bootstrap": (),
    }
    doc = '{"bootstrap": [["203.0.113.7", 4000], ["name.example", 1], ["::1", 0], "x", [1, 2]]}'
    (tmp_path / "settings.json").write_text(doc)
    assert settings.load(Home(tmp_path))["bootstrap"] == (("203.0.113.7", 4000),)
