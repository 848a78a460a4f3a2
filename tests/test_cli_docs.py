"""docs/cli.md documents every command and every option that ``--help`` shows.

The click command tree is walked; each command must be named in the doc (``dhtshare
node start`` or, in a table, ``node start``), and each of its visible options must appear
in a paragraph or table row that names that command, so a new option cannot ship
undocumented.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from dhtshare.cli import main as cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        if command.hidden:
            continue
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def blocks(text: str) -> list[str]:
    """Paragraphs, with each table row a block of its own."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        rows = [line for line in para.splitlines() if line.startswith("|")]
        rest = "\n".join(line for line in para.splitlines() if not line.startswith("|"))
        out += rows + ([rest] if rest.strip() else [])
    return out


def visible_options(command: click.Command) -> list[str]:
    names = []
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            longs = [o for o in param.opts if o.startswith("--")]
            names.append(longs[0] if longs else param.opts[0])
    return [n for n in names if n != "--help"]


def mentions(block: str, path: tuple[str, ...]) -> bool:
    words = r"\s+".join(re.escape(p) for p in path)
    return re.search(rf"`(?:dhtshare\s+)?{words}(?=[\s`\]])", block) is not None


def test_every_command_and_option_is_in_docs_cli_md() -> None:
    text = DOC.read_text()
    parts = blocks(text)
    missing = []
    for path, command in commands(cli.main):
        about = [b for b in parts if mentions(b, path)]
        if not about:
            missing.append(" ".join(path))
            continue
        for option in visible_options(command):
            if not any(re.search(rf"{re.escape(option)}\b", b) for b in about):
                missing.append(f"{' '.join(path)} {option}")
    for option in visible_options(cli.main):
        if option not in text:
            missing.append(option)
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_the_check_finds_what_is_missing() -> None:
    parts = blocks("`dhtshare node start [--port P]`\n\n| `files GROUP` | x |\n")
    assert mentions(parts[0], ("node", "start")) and not mentions(parts[0], ("node", "stop"))
    assert mentions(parts[1], ("files",)) and not mentions(parts[1], ("share",))
    assert visible_options(cli.main.commands["ping"]) == ["--timeout"]
