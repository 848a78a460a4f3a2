"""The CLI alone: option parsing, help texts, error mapping, no node and no network.

Whole commands run through click's ``CliRunner``; the control socket is replaced where a
command would talk to a node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from dhtshare.cli import main as cli
from dhtshare.errors import FileShareError
from dhtshare.node import control


def all_commands(
    group: click.Group = cli.main, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))


# a group that also runs alone (``downloads``) is a command too
LEAVES = [
    p for p, c in all_commands() if not isinstance(c, click.Group) or c.invoke_without_command
]


@pytest.mark.parametrize("path", LEAVES, ids=[" ".join(p) for p in LEAVES])
def test_every_command_help_shows_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.main, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"dhtshare {' '.join(path)}" in result.output


def test_issue_command_table_is_covered() -> None:
    expected = {
        "id create",
        "id show",
        "node start",
        "node stop",
        "node status",
        "group create",
        "group join",
        "group leave",
        "group requests",
        "group accept",
        "group reject",
        "group remove",
        "group list",
        "group members",
        "share",
        "files",
        "get",
        "downloads",
        "unshare",
        "bootstrap",
        "ping",
    }
    assert expected <= {" ".join(p) for p in LEAVES}


LISTINGS = [
    ("id", "show"),
    ("node", "status"),
    ("group", "requests", "G"),
    ("group", "list"),
    ("group", "members", "G"),
    ("files", "G"),
    ("downloads",),
]


@pytest.mark.parametrize("path", LISTINGS, ids=[" ".join(p) for p in LISTINGS])
def test_every_listing_takes_json(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.main, [*path, "--help"])
    assert "--json" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4000", ("127.0.0.1", 4000)),
        ("boot.example.org:1", ("boot.example.org", 1)),
        ("[::1]:4000", ("::1", 4000)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert cli.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["4000", "host:", ":4000", "host:0", "host:70000", "host:x"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(click.BadParameter):
        cli.parse_hostport(text)


def test_bad_bootstrap_address_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli.main, ["--home", str(tmp_path), "node", "start", "--bootstrap", "nope"]
    )
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_home_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DHTSHARE_HOME", str(tmp_path / "h"))
    result = CliRunner().invoke(cli.main, ["id", "create", "--name", "zed"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h" / "identity.json").exists()
    again = CliRunner().invoke(cli.main, ["id", "create"])
    assert again.exit_code == 1
    assert again.output.startswith("error: an identity already exists")


def test_id_show_json(tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(cli.main, ["--home", str(tmp_path), "id", "create", "--name", "ann"])
    result = runner.invoke(cli.main, ["--home", str(tmp_path), "id", "show", "--json"])
    assert json.loads(result.output)["name"] == "ann"


def test_no_node_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path), "files", "g"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: no node is running",
        f"hint: start one with: dhtshare --home {tmp_path} node start --detach",
    ]


def fake_node(monkeypatch: pytest.MonkeyPatch, reply: Any) -> list[tuple[str, dict[str, Any]]]:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def call(path: Path, cmd: str, args: Any = None, on_progress: Any = None) -> Any:
        calls.append((cmd, dict(args or {})))
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(control, "call", call)
    return calls


def test_get_sends_an_absolute_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_node(monkeypatch, {"name": "a.bin", "path": "/x/a.bin", "size": 3})
    result = CliRunner().invoke(cli.main, ["get", "g", "a.bin", "--out", "rel", "--no-wait"])
    assert result.exit_code == 0, result.output
    [(cmd, args)] = calls
    assert cmd == "get" and args["wait"] is False and Path(args["out"]).is_absolute()


def test_node_errors_become_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_node(monkeypatch, FileShareError("no file 'x' in this group", "list them"))
    result = CliRunner().invoke(cli.main, ["get", "g", "x"])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: no file 'x' in this group", "hint: list them"]


def test_unexpected_failure_is_one_line_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_node(monkeypatch, RuntimeError("boom"))
    result = CliRunner().invoke(cli.main, ["--home", str(tmp_path), "downloads"])
    assert result.exit_code == 2
    assert result.output.startswith("error: unexpected failure: boom")
    assert f"hint: details in {tmp_path / 'crash.log'}" in result.output
    assert "Traceback" not in result.output
    assert "RuntimeError: boom" in (tmp_path / "crash.log").read_text()


def test_listing_json_is_one_document(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {
            "state": "complete",
            "name": "a",
            "size": 1,
            "bytes_done": 1,
            "path": "/a",
            "sources": {"p": 1},
        }
    ]
    fake_node(monkeypatch, rows)
    result = CliRunner().invoke(cli.main, ["downloads", "--json"])
    assert json.loads(result.output) == rows
    table = CliRunner().invoke(cli.main, ["downloads"])
    header = ["NAME", "GROUP", "STATE", "DONE", "SIZE", "PEERS", "PATH"]
    assert table.output.splitlines()[0].split() == header
