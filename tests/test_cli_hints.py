"""Every command a hint names carries the ``--home`` the user gave (or ``DHTSHARE_HOME``).

Several people on one machine each use their own ``--home``; a hint such as ``start one
with: dhtshare node start --detach`` without it acts on the default node instead. The
end-to-end test walks the error paths a user meets, with real node processes and default
settings, once with ``--home`` and once with ``DHTSHARE_HOME``, and checks every
``dhtshare COMMAND`` printed. The other test collects every text in the code that names
a command and checks that the CLI's rewriting reaches each of them.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from support.cli import DHTSHARE, TIMEOUT, Users, default_env

from dhtshare.cli.hints import with_home
from dhtshare.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("id", "node", "group")  # commands with subcommands: prose may say "the dhtshare node"
COMMANDS = (
    *GROUPS,
    "share",
    "files",
    "get",
    "downloads",
    "unshare",
    "shares",
    "bootstrap",
    "ping",
    "simulate",
)
LEAVES = [c for c in COMMANDS if c not in GROUPS]
NAMED = re.compile(
    rf"\bdhtshare ((?:--home \S+ )?)(?:(?:{'|'.join(LEAVES)})\b|(?:{'|'.join(GROUPS)}) [a-z-])"
)


def commands_named(text: str) -> list[str]:
    """The ``--home ...`` part (maybe empty) of every command ``text`` names."""
    return [m.group(1) for m in NAMED.finditer(text)]


def assert_hints_carry(result: subprocess.CompletedProcess[str], home: Path) -> int:
    """Every command named on stderr carries ``--home home``; returns how many there were."""
    named = commands_named(result.stderr)
    assert named, f"no command named in: {result.stderr!r}"
    for part in named:
        assert part == f"--home {home} ", result.stderr
    return len(named)


def run_as(
    u: Users, home: Path, via_env: bool, *args: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """A command for the node at ``home``, named with ``--home`` or ``DHTSHARE_HOME``."""
    env = default_env()
    cmd = [str(DHTSHARE)]
    if via_env:
        env["DHTSHARE_HOME"] = str(home)
    else:
        cmd += ["--home", str(home)]
    u.homes.add(home)
    result = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=u.root,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    if m := re.search(r"\(pid (\d+)\)", result.stdout):
        u.pids.add(int(m.group(1)))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_every_hint_that_names_a_command_carries_the_users_home(users: Users) -> None:
    u = users
    boot = f"127.0.0.1:{u.boot.port}"
    seen = 0
    for via_env in (False, True):
        home = u.root / ("env-home" if via_env else "flag-home")

        def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
            return run_as(u, home, via_env, *args, check=check)  # noqa: B023

        seen += assert_hints_carry(run("node", "status"), home)  # no node is running
        seen += assert_hints_carry(run("node", "start", "--detach", "--bootstrap", boot), home)
        seen += assert_hints_carry(run("node", "start", "--port", "x"), home)  # usage
        run("id", "create", "--name", "someone", check=True)
        seen += assert_hints_carry(run("id", "create"), home)  # exists: `id show`
        run("node", "start", "--detach", "--bootstrap", boot, check=True)
        seen += assert_hints_carry(run("node", "start", "--detach"), home)  # already running
        seen += assert_hints_carry(run("files", "no-such-group"), home)
        run("group", "create", "mine", check=True)
        seen += assert_hints_carry(run("unshare", "mine", "nothing.bin"), home)
        seen += assert_hints_carry(run("get", "mine", "nothing.bin"), home)
        run("node", "stop", check=True)
    assert seen >= 16


def test_every_command_named_in_the_code_gets_the_home() -> None:
    """Collect every string (and f-string part) in dhtshare/ that names a command, and
    check that ``with_home`` gives each named command the ``--home``."""
    assert set(main.commands) == set(COMMANDS), "update COMMANDS"
    tree = {
        n: [] if getattr(c, "invoke_without_command", False) else list(getattr(c, "commands", {}))
        for n, c in main.commands.items()
    }
    assert {n for n, subs in tree.items() if subs} == set(GROUPS), "update GROUPS"
    texts: set[str] = set()
    for path in (ROOT / "dhtshare").rglob("*.py"):
        module = ast.parse(path.read_text(), str(path))
        docs = {id(n.body[0].value) for n in ast.walk(module) if _documented(n)}  # type: ignore[attr-defined]
        for node in ast.walk(module):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and id(node) not in docs and commands_named(text):
                texts.add(text)
    assert len(texts) >= 15, texts  # the hints are where they were looked for
    home = "/home/a/.dhtshare"
    for text in texts:
        done = with_home(text, home, tree)
        assert commands_named(done) == [f"--home {home} "] * len(commands_named(text)), done
        assert with_home(text, None, tree) == text
    assert with_home("the dhtshare node is up", home, tree) == "the dhtshare node is up"
    spaced = with_home("see: dhtshare node stop", "/a b", tree)
    assert spaced == "see: dhtshare --home '/a b' node stop"


def _documented(node: ast.AST) -> bool:
    """A module, class or function whose first statement is its docstring (help text)."""
    body = getattr(node, "body", None)
    return (
        isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and bool(body)
        and isinstance(body[0], ast.Expr)  # type: ignore[index]
        and isinstance(body[0].value, ast.Constant)  # type: ignore[index]
    )
