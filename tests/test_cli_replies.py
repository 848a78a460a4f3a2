"""Whatever comes back on the control socket, every CLI command prints one error line or a
correct rendering: never a traceback, never a raw control character (issue #13, item 11).

A fake node (a thread serving a real Unix socket in the state directory) answers every
request with bytes hypothesis chose: arbitrary JSON, replies of the right shape with
hostile values, progress lines, arbitrary bytes, a line longer than the CLI accepts, or
nothing at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socketserver
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhtshare.cli import main as cli
from dhtshare.home import Home
from dhtshare.node import control

UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
PROGRESS = re.compile(r"^(downloading|hashing): \d+% ")
FIELDS = [
    "invite",
    "name",
    "id",
    "time",
    "message",
    "group_id",
    "role",
    "members",
    "since",
    "size",
    "content_id",
    "sharer",
    "sharer_name",
    "providers",
    "state",
    "bytes_done",
    "sources",
    "path",
    "status",
    "new_owner",
    "pid",
    "done",
    "total",
    "rate",
    "peers",
]


class FakeNode:
    """Answers every control request with ``self.reply`` (bytes), then closes."""

    def __init__(self, path: Path) -> None:
        self.reply = b""
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    self.rfile.readline()
                    self.wfile.write(fake.reply)

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the CLI hung up on a reply it refused: expected here

        self.server = Server(str(path), Handler)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def fake_node(home: Path) -> Iterator[FakeNode]:
    node = FakeNode(control.socket_path(Home(home)))
    try:
        yield node
    finally:
        node.close()


def commands(tmp: Path) -> list[list[str]]:
    shared = tmp / "a.bin"
    shared.write_bytes(b"x")
    out = str(tmp / "out")
    return [
        ["node", "status"],
        ["node", "status", "--json"],
        ["node", "stop"],
        ["group", "create", "g"],
        ["group", "create", "g", "--json"],
        ["group", "invite", "g"],
        ["group", "invite", "g", "--rotate"],
        ["group", "join", "g"],
        ["group", "leave", "g"],
        ["group", "requests", "g"],
        ["group", "requests", "g", "--json"],
        ["group", "accept", "g", "m"],
        ["group", "reject", "g", "m"],
        ["group", "remove", "g", "m"],
        ["group", "list"],
        ["group", "list", "--directory"],
        ["group", "list", "--json"],
        ["group", "members", "g"],
        ["share", "g", str(shared)],
        ["files", "g"],
        ["files", "g", "--json"],
        ["get", "g", "f", "--out", out],
        ["get", "g", "f", "--out", out, "--no-wait"],
        ["downloads"],
        ["downloads", "--json"],
        ["unshare", "g", "f"],
        ["shares"],
        ["shares", "g", "--json"],
    ]


hostile_text = st.lists(
    st.characters()
    | st.sampled_from(["\x1b", "\x1b]52;c;", "\x07", "\n", "\r", "\x9b", "\u202e", "\ud800"]),
    max_size=12,
).map("".join)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | hostile_text
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | hostile_text, inner, max_size=6)
    ),
    max_leaves=20,
)
rowlike = st.dictionaries(st.sampled_from(FIELDS), scalars | json_values, max_size=len(FIELDS))
results = json_values | rowlike | st.lists(rowlike, max_size=3)


def line(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8", "surrogatepass") + b"\n"


replies = st.one_of(
    results.map(lambda r: line({"ok": True, "result": r})),
    st.tuples(json_values, json_values, json_values).map(
        lambda t: line({"ok": False, "error": t[0], "hint": t[1], "type": t[2]})
    ),
    st.tuples(hostile_text, hostile_text, st.sampled_from(["GroupError", "x", "__class__"])).map(
        lambda t: line({"ok": False, "error": t[0], "hint": t[1], "type": t[2]})
    ),
    st.tuples(st.lists(json_values | rowlike, max_size=3), results).map(
        lambda t: b"".join(line({"progress": p}) for p in t[0]) + line({"ok": True, "result": t[1]})
    ),
    json_values.map(line),
    st.binary(max_size=200).map(lambda b: b + b"\n"),
    st.binary(max_size=50),  # no newline: the node hangs up mid-line
    st.sampled_from(
        [
            b"",
            b"[" * 100_000 + b"\n",
            b'{"ok": true, "result": "' + b"a" * (control.MAX_LINE + 16) + b'"}\n',
            b'{"ok": true, "result": NaN}\n',
            b'{"ok": true, "result": {"group_id": "' + b"9" * 5000 + b'"}}\n',
        ]
    ),
)


def check(output: str, exit_code: int, args: list[str]) -> None:
    assert "Traceback" not in output
    bad = [c for c in output if c != "\n" and unicodedata.category(c) in UNSAFE]
    assert not bad, (args, output)
    assert exit_code in (0, 1), (args, exit_code, output)
    lines = output.splitlines()
    if exit_code == 1:
        rest = [ln for ln in lines if not PROGRESS.match(ln)]
        assert rest and rest[0].startswith("error: "), (args, output)
        assert len(rest) == 1 or (len(rest) == 2 and rest[1].startswith("hint: ")), output
        assert "unexpected failure" not in output
    elif "--json" in args:
        json.loads(output)  # exactly one JSON document


def test_any_control_reply_gives_one_error_line_or_a_clean_rendering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "STOP_TIMEOUT", 0.05)  # a forged pid must not hold the test
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    cmds = commands(tmp_path)
    runner = CliRunner()
    with fake_node(home) as node:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.sampled_from(cmds), replies)
        def run(args: list[str], reply: bytes) -> None:
            node.reply = reply
            result = runner.invoke(cli.main, ["--home", str(home), *args])
            check(result.output, result.exit_code, args)

        run()


def test_each_command_renders_a_well_formed_reply(tmp_path: Path) -> None:
    # The other half of "correct rendering": a well-formed reply is shown, exit 0.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    row = {
        "invite": "AbC-_9",
        "name": "n\x1b",
        "id": "i",
        "time": "t",
        "message": "m",
        "group_id": "g",
        "role": "owner",
        "members": 2,
        "since": "s",
        "size": 10,
        "content_id": "c" * 64,
        "sharer": "s" * 20,
        "sharer_name": "",
        "providers": 1,
        "state": "complete",
        "bytes_done": 10,
        "sources": {"a": 1},
        "path": "/p",
        "status": "pending",
        "new_owner": "",
        "pid": 0,
        "group": "g",
        "peers": 1,
        "uploaded": 5,
    }
    with fake_node(home) as node:
        for args in commands(tmp_path):
            lists = ("requests", "list", "members")
            listing = args[0] in ("files", "downloads", "shares") or args[1] in lists
            node.reply = line({"ok": True, "result": [row] if listing else row})
            result = CliRunner().invoke(cli.main, ["--home", str(home), *args])
            assert result.exit_code == 0, (args, result.output)
            check(result.output, 0, args)
            if args[-1] != "--json" and listing:
                assert "n\\x1b" in result.output


def test_a_number_too_big_for_a_float_is_a_malformed_reply(tmp_path: Path) -> None:
    """``1e999`` is valid JSON but parses to infinity, which ``--json`` cannot print: the
    reply is refused where it enters, like the ``NaN`` and ``Infinity`` literals."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    runner = CliRunner()
    huge = [
        b'{"ok": true, "result": 1e999}\n',
        b'{"ok": true, "result": {"uptime_s": 1e999, "rate": -1e999}}\n',
    ]
    with fake_node(home) as node:
        for args in commands(tmp_path):
            for reply in huge:
                node.reply = reply
                result = runner.invoke(cli.main, ["--home", str(home), *args])
                check(result.output, result.exit_code, args)
                assert result.exit_code == 1 and "malformed reply" in result.output, args
