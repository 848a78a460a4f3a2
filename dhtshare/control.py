"""The control socket: JSON lines between the CLI and the running node.

A request is one line ``{"cmd": "...", "args": {...}}``. The node answers with zero or more
progress lines ``{"progress": {...}}`` and then one final line, either
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", "hint": "...", "type": "..."}``.
The socket lives in the node's state directory with mode 0600, so only its user can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import errors
from .errors import DhtshareError, NodeError

__all__ = ["Progress", "answering", "call", "serve", "socket_path"]

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20
Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[str, dict[str, Any], Progress], Awaitable[Any]]


def _error_line(exc: DhtshareError) -> dict[str, Any]:
    return {"ok": False, "error": exc.message, "hint": exc.hint, "type": type(exc).__name__}


def _raise_from(reply: dict[str, Any]) -> None:
    cls = getattr(errors, str(reply.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, DhtshareError)):
        cls = NodeError
    raise cls(str(reply.get("error", "the node reported an error")), str(reply.get("hint", "")))


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


def socket_path(home: Path) -> Path:
    """Where the control socket of the node with state directory ``home`` lives.

    Unix socket paths are limited to about 100 bytes; for a deep ``home`` the socket goes to
    the temp directory under a name derived from ``home``, so the CLI finds it the same way.
    """
    path = home / "control.sock"
    if len(os.fsencode(path)) < 100:
        return path
    tag = hashlib.blake2b(os.fsencode(home.resolve()), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"dhtshare-{os.getuid()}-{tag}.sock"


async def answering(path: Path) -> bool:
    """Whether a node already listens on the control socket ``path``."""
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
    """Send one command to the node at ``path``; return its result or raise its error."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NodeError(
            "no node is running", "start one with: dhtshare node start --detach"
        ) from exc
    try:
        await _write(writer, {"cmd": cmd, "args": args or {}})
        while True:
            line = await reader.readline()
            if not line:
                raise NodeError("the node closed the control connection", "see node.log")
            reply = json.loads(line)
            if "progress" in reply:
                if on_progress is not None:
                    on_progress(reply["progress"])
                continue
            if reply.get("ok"):
                return reply.get("result")
            _raise_from(reply)
    finally:
        writer.close()
