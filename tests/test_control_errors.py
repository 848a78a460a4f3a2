"""Errors cross the control socket as themselves, and commands are found in one table.

The node sends an error's class name; the CLI raises the class ``errors.BY_NAME`` gives for
it, so a ``StaleRosterError`` (a rollback of a group's roster) reaches the user as such,
with its message and hint, not as a generic ``NodeError``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.groups import NODES, FakeNode, LyingDht, epoch_of, grow, people

from dhtshare import errors
from dhtshare.errors import BY_NAME, DhtshareError, NodeError, StaleRosterError
from dhtshare.groups.service import GroupService
from dhtshare.home import Home
from dhtshare.node import control, eventlog
from dhtshare.node.commands import COMMANDS, Commands
from dhtshare.records import Kind, key_for
from dhtshare.sim import Network


async def raising(cmd: str, args: dict[str, Any], progress: control.Progress) -> Any:
    """Raises the error class named ``cmd`` with the message and hint in ``args``."""
    exc = BY_NAME[cmd](args["message"])
    exc.hint = args["hint"]
    raise exc


@pytest.fixture
async def sock(tmp_path: Path) -> AsyncIterator[Path]:
    path = control.socket_path(Home(tmp_path))
    server = await control.serve(path, raising)
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()


async def test_a_stale_roster_reaches_the_client_as_itself(sock: Path) -> None:
    args = {"message": "the DHT offered an older roster", "hint": "retry later"}
    with pytest.raises(StaleRosterError) as info:
        await control.call(sock, "StaleRosterError", args)
    assert type(info.value) is StaleRosterError
    assert info.value.message == "the DHT offered an older roster"
    assert info.value.hint == "retry later"


async def test_a_rolled_back_roster_met_by_a_command_reaches_the_cli_as_stale(
    tmp_path: Path,
) -> None:
    """A member whose DHT offers only an older roster of the group (it verified a newer one):
    ``group members`` fails with ``StaleRosterError`` at the client, message and hint kept."""
    owner, alice, bob = people("owner", "alice", "bob")
    async with Network.start(NODES) as net:
        so, sa = GroupService(net.nodes[1], owner), GroupService(net.nodes[2], alice)
        gid = await so.create("climbers")
        await grow(so, gid, [sa])
        assert (await sa.fetch_roster(gid)).seq == 2
        key = epoch_of(sa, gid).dht_key(key_for(Kind.ROSTER, gid))
        old = await net.nodes[2].get(key)  # version 2, sealed, as the DHT holds it
        assert old
        await grow(so, gid, [GroupService(net.nodes[3], bob)])
        assert (await sa.fetch_roster(gid)).seq == 3
        stale = LyingDht(net.nodes[2], lambda k: old if k == key else [], only_extra=True)
        rolled = GroupService(stale, alice, sa.state)  # type: ignore[arg-type]
        commands = Commands(FakeNode(rolled, alice))  # type: ignore[arg-type]
        path = control.socket_path(Home(tmp_path))
        server = await control.serve(path, commands.handle)
        try:
            with pytest.raises(DhtshareError) as info:
                await control.call(path, "group.members", {"group": "climbers"})
        finally:
            server.close()
            await server.wait_closed()
        sent = await _raised_by(rolled, gid)
    assert type(info.value) is StaleRosterError
    assert (info.value.message, info.value.hint) == (sent.message, sent.hint)
    assert info.value.message


async def _raised_by(service: GroupService, gid: bytes) -> StaleRosterError:
    """The error the node raised for the same request, to compare with what crossed."""
    with pytest.raises(StaleRosterError) as info:
        await service.claim(gid)
    return info.value


async def test_every_error_of_the_tree_crosses_as_itself(sock: Path) -> None:
    for name, cls in BY_NAME.items():
        args = {"message": f"{name} happened", "hint": f"fix {name}"}
        with pytest.raises(DhtshareError) as info:
            await control.call(sock, name, args)
        assert type(info.value) is cls
        assert (info.value.message, info.value.hint) == (f"{name} happened", f"fix {name}")


def test_the_tree_holds_every_error_class_of_the_errors_module() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, DhtshareError)
    }
    assert defined == set(BY_NAME)
    assert {"StaleRosterError", "OwnershipForkError", "MalformedReply"} <= set(BY_NAME)


async def test_an_unknown_command_is_a_node_error() -> None:
    async def progress(doc: dict[str, Any]) -> None:
        raise AssertionError("no progress for an unknown command")

    commands = Commands(None)  # type: ignore[arg-type]  # never reached: no such command
    for name in ("no.such", "group_create", "handle"):
        with pytest.raises(NodeError, match="unknown command"):
            await commands.handle(name, {}, progress)


def test_every_command_is_a_method_of_commands() -> None:
    for name, handler in COMMANDS.items():
        assert getattr(Commands, handler.__name__) is handler, name
    assert set(COMMANDS) >= eventlog.QUIET
