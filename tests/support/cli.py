"""The installed ``dhtshare`` executable, driven from the end-to-end tests: a bootstrap
node process, users each with a ``--home`` (``Users``, or the ``Cluster`` of ``USERS``),
and what a clean error looks like."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

DHTSHARE = Path(sys.executable).parent / "dhtshare"
TIMEOUT = 30.0  # seconds for any one command
USERS = ("alice", "bob", "carol", "dave")  # the four with a running node
PROGRESS = re.compile(r"^(downloading|hashing): \d+%")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LineWatcher:
    """Collects a process's stderr lines in a thread; ``wait_for`` blocks until one matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._proc = proc
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, start: int = 0, timeout: float = TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.lines[start:]:
                if m := regex.search(line):
                    return m
            return None

        with self._cond:
            if not self._cond.wait_for(
                lambda: found() is not None or not self._thread.is_alive(), timeout
            ):
                raise AssertionError(f"no line matching {pattern!r} in {self.lines}")
            m = found()
        assert m is not None, f"process ended without {pattern!r}: {self.lines}"
        return m

    def join(self) -> None:
        self._thread.join(TIMEOUT)


@dataclass
class Bootstrap:
    port: int
    state: Path
    proc: subprocess.Popen[str] | None = None
    watcher: LineWatcher | None = None

    def start(self, env: dict[str, str]) -> str:
        """Start the bootstrap node; return its id once it logs that it listens."""
        cmd = [str(DHTSHARE), "bootstrap", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--state", str(self.state)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.watcher = LineWatcher(self.proc)
        return self.watcher.wait_for(r"bootstrap node ([0-9a-f]{40}) listening").group(1)

    def stop(self) -> int:
        """SIGTERM, as systemd and container runtimes send it; return the exit code."""
        assert self.proc is not None and self.watcher is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.watcher.join()
        self.close()
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL if it still runs; then release its stderr."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        if self.watcher is not None:
            self.watcher.join()
        self.close()


def kill_all(pids: Iterable[int], boot: Bootstrap) -> None:
    """SIGKILL the nodes ``node stop`` could not stop, and the bootstrap node."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    boot.kill()


def assert_clean_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit != 0; stderr is one ``error:`` line, maybe a ``hint:`` line, maybe progress lines."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not PROGRESS.match(line)]
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_cli(
    argv: list[str], env: dict[str, str], cwd: Path, *, check: bool, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run one CLI command: never a traceback, and exit 0 when ``check``."""
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    if check:
        assert result.returncode == 0, f"{argv[1:]}: {result.stderr.strip()}"
    return result


def created(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The invite and the group id ``group create`` printed: the invite on the first line,
    then ``group id: <hex>``."""
    invite, id_line = result.stdout.strip().splitlines()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", invite), result.stdout
    assert id_line.startswith("group id: "), result.stdout
    return invite, id_line.removeprefix("group id: ")


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

    def create_group(self, owner: str, name: str, *extra: str) -> tuple[str, str]:
        """``owner`` founds group ``name``: its invite and id."""
        return created(self.run(owner, "group", "create", name, *extra))

    def group_of(self, owner: str, name: str, *members: str) -> str:
        """``owner`` founds group ``name``; each of ``members`` asks with the invite and is
        accepted. Returns the group id."""
        invite, gid = self.create_group(owner, name)
        for member in members:
            self.run(member, "group", "join", invite)
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


@dataclass
class Cluster:
    """The bootstrap node and the homes of ``USERS`` under ``root``, one process per command
    (the end-to-end modules' cluster)."""

    root: Path
    env: dict[str, str]
    boot: Bootstrap
    pids: set[int] = field(default_factory=set)
    facts: dict[str, Any] = field(default_factory=dict)  # what the module fixture made
    hosts: dict[str, str] = field(default_factory=dict)  # user -> loopback address

    def home(self, user: str) -> Path:
        return self.root / user

    def run(
        self, user: str | None, *args: str, check: bool = True, timeout: float = TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(DHTSHARE)]
        if user is not None:
            cmd += ["--home", str(self.home(user))]
        return run_cli([*cmd, *args], self.env, self.root, check=check, timeout=timeout)

    def json(self, user: str, *args: str) -> Any:
        """Run a listing with ``--json``: stdout must be exactly one JSON document."""
        out = self.run(user, *args, "--json").stdout
        return json.loads(out)  # json.loads refuses trailing data: one document only

    def create_group(self, owner: str, name: str, *extra: str) -> tuple[str, str]:
        """``owner`` founds group ``name``: its invite and id."""
        return created(self.run(owner, "group", "create", name, *extra))

    def host(self, user: str) -> str:
        """The user's own loopback address, in a /24 of its own (127.0.N.1): the users stand
        for separate hosts, as the DHT's per-address and per-/24 limits expect (on one
        address, each node would keep only a few of the others in its routing table)."""
        return self.hosts.setdefault(user, f"127.0.{len(self.hosts) + 2}.1")

    def start_node(
        self, user: str, *extra: str, preexec_fn: Callable[[], None] | None = None
    ) -> subprocess.Popen[str]:
        """``node start --detach`` on the user's own address (unless ``extra`` names a
        ``--host``); it exits once the node is up and bootstrapped."""
        cmd = [str(DHTSHARE), "--home", str(self.home(user)), "node", "start", "--detach"]
        host = [] if "--host" in extra else ["--host", self.host(user)]
        return subprocess.Popen(
            [*cmd, "--bootstrap", f"127.0.0.1:{self.boot.port}", *host, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )

    def start_node_result(self, user: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """``node start --detach`` run to its end, for the attempts meant to fail."""
        proc = self.start_node(user, *extra)
        out, err = proc.communicate(timeout=TIMEOUT)
        if m := re.search(r"\(pid (\d+)\)", out):
            self.pids.add(int(m.group(1)))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def start_node_limited(self, user: str, max_file: int) -> subprocess.Popen[str]:
        """``start_node`` whose node may write no file beyond ``max_file`` bytes."""

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

        return self.start_node(user, preexec_fn=limit)

    def started(self, proc: subprocess.Popen[str]) -> None:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        self.pids.add(int(re.search(r"\(pid (\d+)\)", out).group(1)))  # type: ignore[union-attr]

    def passphrase_args(self, user: str) -> tuple[str, ...]:
        return ("--passphrase-file", str(self.root / "pass")) if user == "alice" else ()

    def teardown(self) -> None:
        for user in USERS:
            with contextlib.suppress(Exception):
                self.run(user, "node", "stop", check=False)
        kill_all(self.pids, self.boot)


T = TypeVar("T")
POLL_WITHIN = 60.0  # seconds for one node to see what another published
POLL_EVERY = 0.2  # seconds between two polls of the CLI (a node's state has no event to await)


def poll(what: str, check: Callable[[], T | None], within: float = POLL_WITHIN) -> T:
    """``check()`` again every ``POLL_EVERY`` s until it gives something, for at most
    ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        time.sleep(POLL_EVERY)


def listing(c: Cluster, role: str, *args: str) -> list[dict[str, Any]] | None:
    """A ``--json`` listing, or None while the command fails (e.g. not a member yet)."""
    result = c.run(role, *args, "--json", check=False)
    if result.returncode != 0:
        return None
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows
