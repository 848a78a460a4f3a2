"""The local user as an attacker (issue #13, item 11): the CLI talks only to a control
socket of its own user in a private place, and crash logs never follow a planted link.

Another local user is played by a socket file chowned to ``nobody`` (the tests run as
root in CI; elsewhere those tests are skipped) and by sockets planted where a predictable
name would put them. Each planted server records what the CLI sent it: a refused socket
must have received nothing (no ``share`` path, no ``get`` target).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dhtshare.cli import main as cli
from dhtshare.home import Home
from dhtshare.identity import Identity
from dhtshare.node import control
from dhtshare.node.service import Node, NodeConfig

NOBODY = 65534
FORGED = {"ok": True, "result": {"content_id": "f" * 64, "name": "x", "size": 1}}
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play another user")


class Planted:
    """A Unix socket server in a thread that answers every request with ``reply``."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.requests: list[bytes] = []
        planted = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                planted.requests.append(self.rfile.readline())
                self.wfile.write(reply)

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def planted(path: Path, reply: dict[str, Any] = FORGED) -> Iterator[Planted]:
    server = Planted(path, json.dumps(reply).encode() + b"\n")
    try:
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def share_cmd(home: Path, tmp: Path) -> list[str]:
    secret = tmp / "private-report.pdf"
    secret.write_bytes(b"x")
    return ["--home", str(home), "share", "g", str(secret)]


def assert_refused(result: Result, server: Planted) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2
    assert "f" * 64 not in result.output  # the forged reply was never read
    assert server.requests == []  # and nothing was sent: no path, no command


@as_root
def test_cli_refuses_a_control_socket_owned_by_another_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    sock = home / "control.sock"
    with planted(sock) as server:
        os.chown(sock, NOBODY, NOBODY)
        result = run(*share_cmd(home, tmp_path))
        assert_refused(result, server)
        assert "refusing the control socket" in result.output
        assert "another user" in result.output


def test_cli_refuses_a_control_socket_in_a_directory_others_can_write(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    sock = home / "control.sock"
    with planted(sock) as server:
        home.chmod(0o777)  # another user could have swapped the socket
        result = run(*share_cmd(home, tmp_path))
        assert_refused(result, server)
        assert "other users can write to" in result.output


def test_a_socket_planted_at_the_old_temp_name_of_a_deep_home_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    deep = tmp_path / ("d" * 120)
    deep.mkdir(mode=0o700)
    # The name anyone could compute from the home path (the old fallback).
    tag = hashlib.blake2b(os.fsencode(deep.resolve()), digest_size=8).hexdigest()
    guess = shared_tmp / f"dhtshare-{os.getuid()}-{tag}.sock"
    with planted(guess) as server:
        result = run(*share_cmd(deep, tmp_path))
        assert_refused(result, server)


async def test_a_node_with_a_deep_home_listens_in_a_private_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("h" * 120)
    me = Identity.generate("deep")
    node = await Node.start(NodeConfig(home=deep, identity=me, control=True))
    try:
        sock = control.socket_path(Home(deep))
        st = await asyncio.to_thread(os.lstat, sock)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid()
        parent = await asyncio.to_thread(os.lstat, sock.parent)
        assert parent.st_uid == os.geteuid()
        assert stat.S_IMODE(parent.st_mode) == 0o700  # private, not the shared temp dir
        result = await asyncio.to_thread(run, "--home", str(deep), "node", "status", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["id"] == me.id
    finally:
        await node.close()


@as_root
def test_cli_refuses_a_socket_answered_by_another_user(tmp_path: Path) -> None:
    # The socket file is ours, but the process behind it runs as someone else
    # (SO_PEERCRED): a stale name handed over, or a listener that dropped privileges.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    sock = home / "control.sock"
    script = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.bind({str(sock)!r}); os.chmod({str(sock)!r}, 0o600)\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY}); s.listen(1)\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept(); c.settimeout(10)\n"
        "got = c.recv(65536); print('got', len(got), flush=True)\n"
        "c.sendall(b'" + json.dumps(FORGED).replace("'", "\\'") + "\\n')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        result = run("--home", str(home), "node", "status")
        assert result.exit_code == 1, result.output
        assert "another user (uid 65534) answers on it" in result.output
        assert "f" * 64 not in result.output
        proc.wait(timeout=10)  # it saw the connection close
        assert proc.stdout.read().split() == ["got", "0"]  # with nothing sent on it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def test_a_planted_symlink_at_the_old_crash_log_path_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (shared_tmp / "dhtshare-crash.log").symlink_to(victim)

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(control, "call", crash)
    for home in (tmp_path / "not-created", tmp_path):
        result = run("--home", str(home), "downloads")
        assert result.exit_code == 2
        assert result.output.startswith("error: unexpected failure: boom")
        assert victim.read_text() == "precious\n"
        hint = result.output.splitlines()[1]
        log = Path(hint.removeprefix("hint: details in ").removesuffix("; please report it"))
        assert "RuntimeError: boom" in log.read_text()
        st = os.lstat(log)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert log != shared_tmp / "dhtshare-crash.log"
    assert (tmp_path / "crash.log").exists()  # an existing home keeps its own log
