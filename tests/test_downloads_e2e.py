"""Downloads as a user meets them (issue #14, items 1, 3 and the ``--out`` part of 9).

Real ``dhtshare`` processes, one per command and per node, and DEFAULT settings: no
``DHTSHARE_PROVIDER_TIMEOUT`` (60 s), no shortened timeout anywhere. Alice owns the
group ``crag`` and serves at most 1 MB/s (``--upload-limit``, a rate, not a timeout),
so a download of a few MiB from her is still running when a test interrupts or cancels
it; bob and dave hold one file each and then go away (a clean ``node stop``, a
``SIGKILL``), leaving provider records nobody answers behind.

The tests share one network (a module fixture) and run in file order.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import (
    DHTSHARE,
    TIMEOUT,
    Bootstrap,
    Cluster,
    LineWatcher,
    assert_clean_error,
    free_udp_port,
)

DEFAULT_PROVIDER_TIMEOUT = 60.0  # what docs/cli.md promises, and what users keep
GET_BOUND = 95.0  # a `get` with no live provider must end well within this
BIG = 6 * 1024 * 1024  # at alice's 1 MB/s: about 6 s, time to interrupt it
PROGRESS_LINE = r"^downloading: \d+%"

pytestmark = pytest.mark.skipif(not DHTSHARE.exists(), reason=f"{DHTSHARE} is not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("dl-e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSHARE_")}
    c = Cluster(root, env, Bootstrap(free_udp_port(), root / "boot"))
    (root / "pass").write_text("correct horse battery staple\n")
    try:
        c.facts["boot_id"] = c.boot.start(env)
        for user in ("alice", "bob", "carol", "dave"):
            c.run(user, "id", "create", "--name", user, *c.passphrase_args(user))
        procs = {
            "alice": c.start_node("alice", *c.passphrase_args("alice"), "--upload-limit", "1"),
            **{u: c.start_node(u) for u in ("bob", "carol", "dave")},
        }
        for user, proc in procs.items():
            c.facts[f"pid_{user}"] = started_pid(c, proc)
        invite, gid = c.create_group("alice", "crag")
        assert c.json("alice", "group", "list")[0]["group_id"] == gid
        for user in ("bob", "carol", "dave"):
            c.run(user, "group", "join", invite)
            c.run("alice", "group", "accept", "crag", user)
        c.facts["gid"] = gid
        # every file is shared while all holders are up: the tests are about getting them
        c.facts["big_cid"] = share(c, "alice", "big.bin", BIG)[1]
        c.facts["small"] = share(c, "alice", "small.bin", 100_000)
        c.facts["stopped_cid"] = share(c, "bob", "stopped.bin", 300_000)[1]
        c.facts["crashed_cid"] = share(c, "dave", "crashed.bin", 300_000)[1]
        yield c
    finally:
        c.teardown()


def started_pid(c: Cluster, proc: subprocess.Popen[str]) -> int:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    m = re.search(r"\(pid (\d+)\)", out)
    assert m is not None, out
    c.pids.add(int(m.group(1)))
    return int(m.group(1))


def share(c: Cluster, user: str, name: str, size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    (c.root / f"files-{user}").mkdir(exist_ok=True)
    path = c.root / f"files-{user}" / name
    path.write_bytes(data)
    cid = c.run(user, "share", "crag", str(path)).stdout.strip()
    return data, cid


def get_proc(c: Cluster, user: str, name: str, out: Path, **kw: Any) -> subprocess.Popen[str]:
    """A waiting ``get`` (stdin not a terminal unless ``stdin`` is given)."""
    cmd = [str(DHTSHARE), "--home", str(c.home(user)), "get", "crag", name, "--out", str(out)]
    return subprocess.Popen(
        cmd,
        stdin=kw.pop("stdin", subprocess.DEVNULL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=c.env,
        cwd=c.root,
        **kw,
    )


def rows(c: Cluster, user: str) -> dict[str, Any]:
    return {d["name"]: d for d in c.json(user, "downloads")}


def restart(c: Cluster, user: str) -> None:
    assert "node stopped" in c.run(user, "node", "stop").stdout
    c.facts[f"pid_{user}"] = started_pid(c, c.start_node(user))


def big_file(c: Cluster) -> str:
    """The content id of ``big.bin``, which alice serves at 1 MB/s."""
    return str(c.facts["big_cid"])


def leftovers(c: Cluster, user: str, cid: str) -> list[str]:
    """Resume state, hashes and owner record of the download of ``cid`` left in the home."""
    return sorted(p.name for p in (c.home(user) / "resume").glob(f"{cid}*"))


# ---------------------------------------------------------------------------------- tests


@pytest.mark.timeout(240)  # the module's setup, then two gets that wait the default 60 s
def test_get_from_holders_gone_ends_with_no_providers_at_the_default_timeout(
    cluster: Cluster,
) -> None:
    """Item 1: bob stops his node cleanly, dave's node dies; each held the only copy of
    a file. carol's ``get`` of each ends with docs/cli.md's error at the default 60 s,
    and ``downloads`` shows the failure with its group, error and hint."""
    c = cluster
    stopped_cid, crashed_cid = c.facts["stopped_cid"], c.facts["crashed_cid"]
    listed = {f["name"] for f in c.json("carol", "files", "crag")}
    assert {"stopped.bin", "crashed.bin"} <= listed
    assert "node stopped" in c.run("bob", "node", "stop").stdout
    os.kill(c.facts["pid_dave"], signal.SIGKILL)  # a crash: its records stay behind

    began = time.monotonic()
    gets = {
        name: get_proc(c, "carol", name, c.root / "carol-gone")
        for name in ("stopped.bin", "crashed.bin")
    }
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    seconds: dict[str, float] = {}
    try:
        for name, proc in gets.items():
            out, err = proc.communicate(timeout=max(1.0, GET_BOUND - (time.monotonic() - began)))
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            seconds[name] = time.monotonic() - began
    finally:
        for proc in gets.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for name, result in results.items():
        line = assert_clean_error(result)
        assert line == f"error: no providers for {name} (nobody served it for 60 s)", line
        assert result.returncode == 1
        print(f"{name}: get ended after {seconds[name]:.1f} s")
        assert seconds[name] >= DEFAULT_PROVIDER_TIMEOUT
    assert not (c.root / "carol-gone" / "stopped.bin").exists()

    # the failures, as `downloads` shows them: group, error and hint
    listed_rows = rows(c, "carol")
    for name, cid in (("stopped.bin", stopped_cid), ("crashed.bin", crashed_cid)):
        row = listed_rows[name]
        assert row["state"] == "failed"
        assert row["group"] == "crag" and row["group_id"] == c.facts["gid"]
        assert row["content_id"] == cid
        assert row["error"] == f"no providers for {name} (nobody served it for 60 s)"
        assert "try again later" in row["hint"]
    text = c.run("carol", "downloads").stdout
    assert re.search(r"^stopped\.bin\s+crag\s+failed\s", text, re.M), text
    assert "  error: no providers for stopped.bin (nobody served it for 60 s)" in text
    assert "  hint: try again later" in text


def test_ctrl_c_on_get_without_a_terminal_cancels_the_download(cluster: Cluster) -> None:
    """Item 1 (Ctrl-C) and 3: SIGINT to a real ``get`` whose stdin is not a terminal
    cancels its download: no ``.part``, no resume state, no row (and the last test
    restarts the node: it does not come back)."""
    c = cluster
    cid = big_file(c)
    out = c.root / "carol-int"
    proc = get_proc(c, "carol", "big.bin", out)
    watcher = LineWatcher(proc)
    try:
        watcher.wait_for(PROGRESS_LINE, timeout=2 * TIMEOUT)  # it runs: pieces arrive
        assert (out / "big.bin.part").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.join()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    lines = [x for x in watcher.lines if not re.match(PROGRESS_LINE, x)]
    assert lines == ["error: interrupted: the download of big.bin was cancelled"], lines
    assert list(out.iterdir()) == []  # neither big.bin nor big.bin.part
    assert leftovers(c, "carol", cid) == []
    assert "big.bin" not in rows(c, "carol")


def test_ctrl_c_on_a_terminal_can_keep_the_download_and_cancel_deletes_it(
    cluster: Cluster,
) -> None:
    """Item 3 and 9: on a terminal, Ctrl-C asks; "y" keeps the download running in the
    background. A ``get`` of it into another ``--out`` says where it goes instead of
    ignoring the option. ``downloads cancel`` stops it and deletes its ``.part`` and
    resume state (the last test restarts the node: it is not resumed)."""
    c = cluster
    cid = big_file(c)
    out = c.root / "carol-keep"
    master, slave = pty.openpty()
    try:
        proc = get_proc(c, "carol", "big.bin", out, stdin=slave)
        watcher = LineWatcher(proc)
        try:
            # stderr is no terminal: plain progress lines
            watcher.wait_for(PROGRESS_LINE, timeout=2 * TIMEOUT)
            os.write(master, b"y\n")  # the answer waits in the terminal's input
            proc.send_signal(signal.SIGINT)
            assert proc.wait(TIMEOUT) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
            watcher.join()
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
    finally:
        os.close(master)
        os.close(slave)
    text = "\n".join(watcher.lines)
    assert "keep downloading big.bin in the background?" in text, text
    assert "error: interrupted: big.bin goes on downloading in the background" in text, text
    assert rows(c, "carol")["big.bin"]["state"] == "downloading"

    # item 9: the same file into another --out is refused with where it goes
    other = c.run("carol", "get", "crag", "big.bin", "--out", str(c.root / "elsewhere"),
                  check=False)  # fmt: skip
    line = assert_clean_error(other, "already downloading into", str(out))
    assert str(c.root / "elsewhere") not in line
    assert not (c.root / "elsewhere" / "big.bin.part").exists()

    done = c.run("carol", "downloads", "cancel", "big.bin")
    assert done.stdout.strip() == "cancelled big.bin"
    assert list(out.iterdir()) == []
    assert leftovers(c, "carol", cid) == []
    assert "big.bin" not in rows(c, "carol")
    assert_clean_error(c.run("carol", "downloads", "cancel", "big.bin", check=False), "no download")


def test_downloads_clear_keeps_files_and_a_restart_brings_back_nothing_cancelled(
    cluster: Cluster,
) -> None:
    """Item 3: ``[C] [group] file`` rows, a completed download cannot be cancelled, and
    ``downloads clear`` forgets complete and failed rows without deleting a file. Then
    the node restarts (last, so no command needs the group's roster right after it): no
    download cancelled by Ctrl-C or ``downloads cancel`` comes back, nothing cleared
    either."""
    c = cluster
    data, _ = c.facts["small"]
    got = c.run("carol", "get", "crag", "small.bin", "--out", str(c.root / "carol-small"))
    assert "complete and verified" in got.stdout
    text = c.run("carol", "downloads").stdout
    assert re.search(r"^small\.bin\s+crag\s+complete\s+100%", text, re.M), text
    refused = c.run("carol", "downloads", "cancel", "small.bin", check=False)
    assert_clean_error(refused, "complete")
    assert {r["state"] for r in rows(c, "carol").values()} == {"complete", "failed"}

    assert c.run("carol", "downloads", "clear").stdout.strip() == "cleared 3 downloads"
    assert c.json("carol", "downloads") == []
    assert c.run("carol", "downloads").stdout.strip() == "no downloads"
    assert (c.root / "carol-small" / "small.bin").read_bytes() == data  # never deleted
    restart(c, "carol")
    assert c.json("carol", "downloads") == []
    assert (c.root / "carol-small" / "small.bin").read_bytes() == data
    assert json.loads((c.home("carol") / "downloads.json").read_text()) == []
    for cancelled in ("carol-int", "carol-keep"):  # no .part came back
        assert list((c.root / cancelled).iterdir()) == []
    assert leftovers(c, "carol", big_file(c)) == []
