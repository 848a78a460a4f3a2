"""Ctrl-C on a waiting ``get``: keep the download in the background, or cancel it.

``get_or_interrupt`` runs the ``get`` control call until it returns or SIGINT arrives.
On SIGINT the control connection stays open while the user is asked (the node sees its
client still there, so it does not cancel the download on its own), then the answer is
sent: keeping it is a ``get`` without waiting (the download goes on with nobody
waiting), cancelling it is ``downloads.cancel`` (its ``.part`` and resume state are
deleted). If the ``get`` was interrupted before the node named the download, closing
the connection is the cancel: a node whose waiting client went away without asking to
keep the download cancels it (``DownloadManager.wait``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhtshare.cli.replies import Reply
from dhtshare.errors import FileShareError
from dhtshare.node import control

__all__ = ["Interrupted", "get_or_interrupt"]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The ``get`` was interrupted; ``kept``: the download goes on in the background."""

    name: str
    kept: bool


async def get_or_interrupt(
    path: Path,
    args: dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None],
    keep: Callable[[str], bool],
) -> Any:
    """The ``get`` call's result, or ``Interrupted`` once SIGINT came and ``keep(name)``
    (called with the connection open; a second Ctrl-C in it means cancel) answered."""
    seen = {"name": str(args.get("file", "")), "content_id": ""}
    asked = False

    def progress(doc: dict[str, Any]) -> None:
        reply = Reply(doc, "get (progress)")
        seen["name"] = reply.text("name", seen["name"])
        seen["content_id"] = reply.text("content_id", seen["content_id"])
        if not asked:
            on_progress(doc)

    loop = asyncio.get_running_loop()
    hit = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, hit.set)
    call = asyncio.ensure_future(control.call(path, "get", args, progress))
    sigint = asyncio.ensure_future(hit.wait())
    try:
        await asyncio.wait([call, sigint], return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C: KeyboardInterrupt
        sigint.cancel()
    try:
        if call.done():
            return call.result()
        asked = True
        try:
            kept = keep(seen["name"])
        except KeyboardInterrupt:
            kept = False
        if call.done():  # it ended while we asked: that is the answer
            return call.result()
        if kept:
            await control.call(path, "get", {**args, "wait": False})
        elif seen["content_id"]:
            with contextlib.suppress(FileShareError):  # it ended meanwhile: nothing to cancel
                await control.call(path, "downloads.cancel", {"file": seen["content_id"]})
        return Interrupted(seen["name"], kept)
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
