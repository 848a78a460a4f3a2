"""The control socket: JSON lines between the CLI and the running node.

A request is one line ``{"cmd": "...", "args": {...}}``. The node answers with zero or more
progress lines ``{"progress": {...}}`` and then one final line, either
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "hint": "...", "type": "..."}``.

Where the socket lives. In the node's state directory (``home/control.sock``, mode 0600).
When that path is too long for a Unix socket (about 100 bytes), the node makes a private
directory with a random name (``mkdtemp``: mode 0700, in the temp directory) and records
its path in ``home/control-dir``; the socket goes in there. Nobody else can create,
replace or read anything in either place.

What the CLI checks (``call``). Before it sends anything: the socket is a socket owned by
this user and writable by nobody else, in a directory owned by this user that nobody else
can write to; after connecting, where the system says (``SO_PEERCRED``), that the process
answering runs as this user. Otherwise it refuses with one line. Every reply line is
bounded (``MAX_LINE``), must be a JSON object (no NaN or Infinity), and an error reply
must carry text: anything else is a ``NodeError``, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dhtshare.atomic import write_atomic
from dhtshare.errors import BY_NAME, DhtshareError, MalformedReply, NodeError
from dhtshare.home import Home

__all__ = [
    "Progress",
    "answering",
    "call",
    "check_socket",
    "prepare_socket",
    "remove_socket",
    "serve",
    "socket_path",
]

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20
MAX_SOCKET_PATH = 100
"""Bytes; ``sun_path`` holds 108 on Linux and 104 on macOS, terminator included."""
MAX_DEPTH = 32
"""Most nesting of lists and objects in a reply (the CLI's are two or three deep)."""
Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[str, dict[str, Any], Progress], Awaitable[Any]]


def _error_line(exc: DhtshareError) -> dict[str, Any]:
    return {"ok": False, "error": exc.message, "hint": exc.hint, "type": type(exc).__name__}


def _raise_from(reply: dict[str, Any]) -> None:
    name, message, hint = reply.get("type"), reply.get("error"), reply.get("hint", "")
    if not isinstance(message, str) or not isinstance(hint, str):
        raise _malformed("an error without a message")
    cls = BY_NAME.get(name, NodeError) if isinstance(name, str) else NodeError
    exc = cls(message)
    exc.hint = hint
    raise exc


def _malformed(what: str) -> MalformedReply:
    return MalformedReply(f"malformed reply from the node: {what}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number as a float, refused if it does not fit one (``1e999`` is infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} does not fit a float")
    return value


async def _write(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    writer.write(json.dumps(doc).encode("utf-8") + b"\n")
    await writer.drain()


async def _handle(
    handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        line = await reader.readline()
        if not line:  # a probe (``answering``) or a client that gave up
            writer.close()
            return
        request = json.loads(line)
        cmd, args = str(request["cmd"]), dict(request.get("args") or {})
    except (ValueError, KeyError, TypeError):
        with contextlib.suppress(ConnectionError):
            await _write(writer, _error_line(NodeError("malformed control request")))
        writer.close()
        return
    except ConnectionError:
        writer.close()
        return

    async def progress(doc: dict[str, Any]) -> None:
        await _write(writer, {"progress": doc})

    try:
        result = await handler(cmd, args, progress)
        await _write(writer, {"ok": True, "result": result})
    except DhtshareError as exc:
        await _write(writer, _error_line(exc))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception as exc:  # a bug in a handler must not take the node down
        log.exception("control command %s failed", cmd)
        with contextlib.suppress(ConnectionError):
            await _write(writer, _error_line(NodeError(f"internal error: {exc}", "see node.log")))
    finally:
        writer.close()


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) < MAX_SOCKET_PATH


def socket_path(home: Home) -> Path:
    """Where the control socket of the node with state directory ``home`` is (no I/O for a
    short ``home``; for a deep one, in the directory ``home/control-dir`` names, which may
    not exist: then connecting says that no node is running)."""
    path = home.control_socket
    if _fits(path):
        return path
    private = _read_pointer(home)
    return (private if private is not None else home.root) / path.name


def _read_pointer(home: Home) -> Path | None:
    try:
        text = home.control_pointer.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text or "\0" in text or not os.path.isabs(text):
        return None
    return Path(text)


def _private_dir(path: Path) -> bool:
    """A real directory (not a link) of ours that nobody else can enter or write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def prepare_socket(home: Home) -> Path:
    """The node's side of ``socket_path``: where to listen, making the private directory
    (``mkdtemp``, 0700, random name) for a deep ``home`` unless the one recorded is still
    ours and private. ``NodeError`` if other users can write to ``home``: they could
    replace the socket, and the CLI would refuse it."""
    path, root = home.control_socket, home.root
    try:
        st = os.stat(root)
    except OSError as exc:
        raise NodeError(f"cannot use the state directory {root}: {exc.strerror}") from exc
    if st.st_mode & 0o022 or st.st_uid != os.geteuid():
        raise NodeError(
            f"the state directory {root} is not yours alone: other users can write to it",
            f"make it private: chmod 700 {root}",
        )
    if _fits(path):
        return path
    private = _read_pointer(home)
    if private is not None and _private_dir(private) and _fits(private / path.name):
        return private / path.name
    base = tempfile.gettempdir()
    if not _fits(Path(base) / "dhtshare-xxxxxxxx" / path.name):
        base = "/tmp"
    private = Path(tempfile.mkdtemp(prefix="dhtshare-", dir=base))
    write_atomic(home.control_pointer, os.fsencode(private))
    return private / path.name


def remove_socket(home: Home) -> None:
    """The node stops: remove its socket and, for a deep ``home``, its private directory."""
    path = socket_path(home)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if path.parent != home.root and _private_dir(path.parent):
        with contextlib.suppress(OSError):
            os.rmdir(path.parent)
            os.unlink(home.control_pointer)


def no_node() -> NodeError:
    """The error for a state directory whose node is not running."""
    return NodeError("no node is running", "start one with: dhtshare node start --detach")


def check_socket(path: Path) -> None:
    """``NodeError`` unless ``path`` is a socket of ours, writable by us only, in a
    directory of ours that nobody else can write to (a socket another user planted,
    or could replace, is never used)."""
    uid = os.geteuid()
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise no_node() from exc
    except OSError as exc:
        raise NodeError(f"cannot use the control socket {path}: {exc.strerror}") from exc
    problem = ""
    if not stat.S_ISSOCK(st.st_mode):
        problem = "is not a socket"
    elif st.st_uid != uid:
        problem = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        problem = "is writable by other users"
    else:
        try:
            dst = os.stat(path.parent)  # a link to it is as safe as the place of the link
        except OSError as exc:
            raise NodeError(f"cannot use the control socket {path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != uid:
            problem = f"is in {path.parent}, which belongs to another user"
        elif dst.st_mode & 0o022:
            problem = f"is in {path.parent}, which other users can write to"
    if problem:
        raise NodeError(
            f"refusing the control socket {path}: it {problem}",
            "someone else may be impersonating your node; remove it and restart your node",
        )


def _check_peer(writer: asyncio.StreamWriter, path: Path) -> None:
    """Where the system tells (``SO_PEERCRED``), the process answering must be ours."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return
    size = struct.calcsize("3i")
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    except (OSError, struct.error):
        return
    if uid != os.geteuid():
        raise NodeError(
            f"refusing the control socket {path}: another user (uid {uid}) answers on it",
            "someone else may be impersonating your node; restart your node",
        )


async def answering(path: Path) -> bool:
    """Whether a node of ours already listens on the control socket ``path``."""
    try:
        check_socket(path)
    except NodeError:
        return False
    try:
        _reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


def _remove_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def serve(path: Path, handler: Handler) -> asyncio.Server:
    """Listen on the Unix socket ``path`` (mode 0600) and answer with ``handler``."""
    _remove_stale(path)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _handle(handler, r, w), path=str(path), limit=MAX_LINE
        )
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


async def call(
    path: Path,
    cmd: str,
    args: dict[str, Any] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Send one command to the node at ``path``; return its result or raise its error.

    The socket is checked first (``check_socket``) and the peer after connecting; each
    reply line must be a JSON object of at most ``MAX_LINE`` bytes. Every failure is a
    ``DhtshareError``; ``on_progress`` gets each progress value as it came.
    """
    check_socket(path)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise no_node() from exc
    except OSError as exc:
        raise NodeError(f"cannot reach the node at {path}: {exc.strerror or exc}") from exc
    try:
        _check_peer(writer, path)
        await _write(writer, {"cmd": cmd, "args": args or {}})
        while True:
            reply = await _read_reply(reader)
            if "progress" in reply:
                if on_progress is not None:
                    on_progress(reply["progress"])
                continue
            ok = reply.get("ok")
            if ok is True:
                return reply.get("result")
            if ok is False:
                _raise_from(reply)
            raise _malformed("neither a result nor an error")
    except (ConnectionError, BrokenPipeError) as exc:
        raise NodeError("the node closed the control connection", "see node.log") from exc
    finally:
        writer.close()


async def _read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readline()
    except ValueError as exc:  # longer than MAX_LINE
        raise _malformed(f"a line longer than {MAX_LINE} bytes") from exc
    if not line:
        raise NodeError("the node closed the control connection", "see node.log")
    try:
        reply = json.loads(line, parse_constant=_no_constants, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise _malformed("not JSON") from exc
    if not isinstance(reply, dict):
        raise _malformed("not a JSON object")
    if not _shallow(reply):
        raise _malformed(f"nested more than {MAX_DEPTH} deep")
    return reply


def _shallow(doc: Any) -> bool:
    """Whether ``doc`` nests lists and objects at most ``MAX_DEPTH`` deep (no recursion)."""
    level: list[Any] = [doc]
    for _ in range(MAX_DEPTH + 1):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not any(isinstance(item, dict | list) for item in level):
            return True
    return False
