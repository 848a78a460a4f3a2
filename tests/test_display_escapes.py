"""Text from the network never drives the terminal (issue #13, item 8).

Names and messages in join requests, group names in the directory, member and file
names reach the owner's terminal through ``display.clean``: an OSC 52 clipboard write,
a screen clear and a line break that would forge a table row are shown as visible
escapes. The end-to-end tests run the real CLI (click's runner) against a real node on
127.0.0.1 whose peers publish hostile text.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from support.nodes import NodeCluster

from dhtshare.cli import main as cli
from dhtshare.groups import rules
from dhtshare.identity import Identity

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # "set the clipboard to: rm -rf ~"
CLEAR = "\x1b[2J\x1b[H"
HOSTILE_NAME = f"{OSC52}{CLEAR}mal\u202eory\nbob  ok"  # 46 bytes: fits a display name
HOSTILE_MESSAGE = f"hi{CLEAR}\nmallory  0123abcd  2030-01-01 00:00  please accept\x9b2J\x7f"
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def unsafe_chars(text: str) -> list[str]:
    return [c for c in text if c != "\n" and unicodedata.category(c) in UNSAFE]


# ------------------------------------------------------------- the real CLI, a real node


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NodeCluster]:
    async with NodeCluster.running(tmp_path) as n:
        yield n


async def cli_run(home: Path, *args: str) -> Result:
    """The real CLI, in a thread (it runs its own event loop) against the node at ``home``."""
    return await asyncio.to_thread(CliRunner().invoke, cli.main, ["--home", str(home), *args])


def terminal_safe(result: Result, rows: int) -> list[str]:
    assert result.exit_code == 0, result.output
    assert not unsafe_chars(result.output), result.output
    lines = result.output.splitlines()
    assert len(lines) <= rows + 1, lines  # the header and the real rows: nothing forged
    return lines


async def test_hostile_names_and_messages_reach_the_terminal_as_visible_escapes(
    net: NodeCluster,
) -> None:
    owner = await net.node("owner", control=True)
    mallory = await net.node("mallory", identity=Identity.generate(HOSTILE_NAME))
    home = net.tmp / "owner"
    gid = await owner.groups.create("club")

    # A join request from a non-member (it holds the invite): its name and message.
    await mallory.groups.request_join(owner.groups.state.keys[gid].invite, HOSTILE_MESSAGE)
    lines = terminal_safe(await cli_run(home, "group", "requests", "club"), rows=1)
    assert len(lines) == 2 and "\\x1b]52;c;" in lines[1] and "\\x0abob  ok" in lines[1]
    as_json = await cli_run(home, "group", "requests", "club", "--json")
    assert not unsafe_chars(as_json.output)
    [row] = json.loads(as_json.output)
    assert (row["name"], row["message"]) == (HOSTILE_NAME, HOSTILE_MESSAGE)  # exact in JSON

    # A group name from the public directory (signed by code that skips the local check).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rules, "check_group_name", lambda name: name)
        await mallory.groups.create(HOSTILE_NAME, public=True)
    lines = terminal_safe(await cli_run(home, "group", "list", "--directory"), rows=1)
    assert len(lines) == 2 and "\\u202e" in lines[1]

    # Once accepted: the member's name and the names of the files it shares.
    await owner.groups.accept(gid, mallory.identity.public)
    assert await mallory.groups.status(gid) == ("accepted", "")
    await mallory.groups.refresh(gid)
    lines = terminal_safe(await cli_run(home, "group", "members", "club"), rows=2)
    assert len(lines) == 3
    evil = net.tmp / f"report{CLEAR}\nfake.pdf  1 B  0000"
    await asyncio.to_thread(evil.write_bytes, b"data")
    await mallory.share(gid, evil)
    lines = terminal_safe(await cli_run(home, "files", "club"), rows=1)
    assert any("\\x1b[2J" in line for line in lines[1:])
