"""The control socket: JSON lines, progress, typed errors, permissions, long paths."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dhtshare.errors import GroupError, NodeError
from dhtshare.home import Home
from dhtshare.node import control


async def handler(cmd: str, args: dict[str, Any], progress: control.Progress) -> Any:
    if cmd == "echo":
        return args
    if cmd == "count":
        for i in range(3):
            await progress({"done": i})
        return "done"
    if cmd == "group":
        raise GroupError("unknown group: x", "list yours")
    raise RuntimeError("a bug")


@pytest.fixture
async def sock(tmp_path: Path) -> Any:
    path = control.socket_path(Home(tmp_path))
    server = await control.serve(path, handler)
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()


async def test_result_and_progress(sock: Path) -> None:
    assert await control.call(sock, "echo", {"a": [1, "b"]}) == {"a": [1, "b"]}
    seen: list[dict[str, Any]] = []
    assert await control.call(sock, "count", None, seen.append) == "done"
    assert seen == [{"done": 0}, {"done": 1}, {"done": 2}]


async def test_errors_keep_their_type_and_hint(sock: Path) -> None:
    with pytest.raises(GroupError) as info:
        await control.call(sock, "group")
    assert (info.value.message, info.value.hint) == ("unknown group: x", "list yours")


async def test_a_handler_bug_is_a_node_error_and_the_server_lives(sock: Path) -> None:
    with pytest.raises(NodeError, match="internal error: a bug"):
        await control.call(sock, "crash")
    assert await control.call(sock, "echo", {}) == {}


async def test_malformed_request_and_probe(sock: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(b"not json\n")
    reply = json.loads(await reader.readline())
    writer.close()
    assert reply["ok"] is False and reply["type"] == "NodeError"
    assert await control.answering(sock)
    assert await control.call(sock, "echo", {"x": 1}) == {"x": 1}


async def test_socket_is_private(sock: Path) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


async def test_no_node(tmp_path: Path) -> None:
    path = control.socket_path(Home(tmp_path))
    assert not await control.answering(path)
    with pytest.raises(NodeError, match="no node is running"):
        await control.call(path, "status")


def test_long_home_puts_the_socket_in_a_private_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    assert control.socket_path(Home(deep)) == deep / "control.sock"  # nothing prepared yet
    path = control.prepare_socket(Home(deep))
    assert len(os.fsencode(path)) < 100
    # the CLI finds it
    assert path == control.socket_path(Home(deep)) == control.prepare_socket(Home(deep))
    st = os.lstat(path.parent)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    other = tmp_path / ("e" * 120)
    other.mkdir()
    assert control.prepare_socket(Home(other)).parent != path.parent
    assert (
        control.socket_path(Home(tmp_path)) == tmp_path / "control.sock"
        or len(os.fsencode(tmp_path / "control.sock")) >= 100
    )
    for home in (deep, other):
        control.remove_socket(Home(home))  # the node's stop: the directory and its record go
        assert not (home / "control-dir").exists()
    assert not path.parent.exists()


def test_a_private_directory_that_is_no_longer_private_is_replaced(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    first = control.prepare_socket(Home(deep)).parent
    first.chmod(0o755)
    second = control.prepare_socket(Home(deep)).parent
    assert second != first and stat.S_IMODE(os.lstat(second).st_mode) == 0o700
    second.rmdir()
    second.symlink_to(first)  # e.g. recreated by someone else after a reboot
    third = control.prepare_socket(Home(deep)).parent
    assert third not in (first, second)
    for d in (first, third):
        d.rmdir()
    second.unlink()


async def test_long_home_serves(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    path = control.prepare_socket(Home(deep))
    server = await control.serve(path, handler)
    try:
        assert await control.call(control.socket_path(Home(deep)), "echo", {"ok": 1}) == {"ok": 1}
    finally:
        server.close()
        await server.wait_closed()
        control.remove_socket(Home(deep))
    assert not path.exists() and not path.parent.exists()


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(NodeError, match="other users can write") as info:
        control.prepare_socket(Home(home))
    assert "chmod 700" in info.value.hint
    home.chmod(0o700)
    assert control.prepare_socket(Home(home)) == home / "control.sock"


async def test_replies_nested_too_deep_or_not_objects_are_node_errors(sock: Path) -> None:
    deep: Any = "x"
    for _ in range(control.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(NodeError, match="nested more than"):
        await control.call(sock, "echo", {"a": deep})
    shallow: Any = "x"
    for _ in range(control.MAX_DEPTH - 3):
        shallow = [shallow]
    assert await control.call(sock, "echo", {"a": shallow}) == {"a": shallow}
