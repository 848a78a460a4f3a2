"""One INFO line in the node's log for each thing a user did through the node.

``Commands.handle`` calls ``command_done`` after a control command succeeds and
``command_failed`` when it fails, so group creation, join requests, accepts, rejects,
removals, leaves, shares, unshares and downloads are each logged with their ids and
names, and errors with their message. Names come from other people's records: the
node's log formatter (``display.CleanFormatter``) escapes them. Read-only commands
(listings, status) are not logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["command_done", "command_failed"]

log = logging.getLogger("dhtshare.events")
QUIET = frozenset(
    {"status", "group.list", "group.members", "group.requests", "files", "downloads", "shares"}
)
"""Commands that only read: nothing to log when they succeed."""

GroupLabel = Callable[[bytes], str]


def _short(text: Any) -> str:
    return str(text)[:16]


def _group(args: dict[str, Any], result: Any, label: GroupLabel) -> str:
    """``name (id prefix)`` of the group a command acted on, or what the user typed."""
    gid = result.get("group_id") if isinstance(result, dict) else None
    if isinstance(gid, str):
        try:
            return label(bytes.fromhex(gid))
        except ValueError:
            pass
    return repr(args.get("group", "?"))


def _message(cmd: str, args: dict[str, Any], result: Any, label: GroupLabel) -> str | None:
    r = result if isinstance(result, dict) else {}
    group = _group(args, result, label)
    who = f"{r.get('name', '')} ({_short(r.get('id', ''))})"
    match cmd:
        case "group.create":
            return f"created group {group}"
        case "group.join":
            return f"asked to join group {group}: {r.get('status', '?')}"
        case "group.leave" | "group.forget":
            gid = str(r.get("group_id", ""))[:16]
            named = f"{r.get('name') or '?'} ({gid})" if gid else group
            verb = {"cancelled": "cancelled the request to join"}.get(
                str(r.get("outcome")), "left" if cmd == "group.leave" else "forgot"
            )
            heir = r.get("new_owner_name") or r.get("new_owner")
            stopped = r.get("stopped_shares") or []
            return (
                f"{verb} group {named}"
                + (f"; new owner {heir}" if heir else "")
                + (f"; stopped sharing {', '.join(map(str, stopped))}" if stopped else "")
            )
        case "group.accept":
            return f"accepted {who} into group {args.get('group', '?')!r}"
        case "group.reject":
            return f"rejected {who}'s request to join group {args.get('group', '?')!r}"
        case "group.remove":
            return f"removed {who} from group {args.get('group', '?')!r}"
        case "share" | "unshare":
            return None  # the node logs these itself, with the file's group and path
        case "get":
            name, path, state = r.get("name", "?"), r.get("path", "?"), r.get("state", "?")
            return f"download of {name} into {path}: {state}"
        case "stop":
            return "stopping on request"
    return None


def command_done(cmd: str, args: dict[str, Any], result: Any, label: GroupLabel) -> None:
    """Log a command that succeeded (read-only ones excepted)."""
    if cmd in QUIET:
        return
    text = _message(cmd, args, result, label)
    if text is not None:
        log.info("%s", text)


def command_failed(cmd: str, args: dict[str, Any], message: str) -> None:
    """Log a command that failed, with what the user asked and the error."""
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(args.items()) if k != "path") or "-"
    log.info("%s (%s) failed: %s", cmd, shown, message)
