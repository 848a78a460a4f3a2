"""Control-socket replies as typed values, checked where they enter the CLI.

The node's answer is JSON, and the CLI trusts nothing about its shape: every field a
command prints is read through ``Reply`` with the type that use needs (text, a bounded
integer, a finite number, a flag, a count). A reply of the wrong shape is a
``MalformedReply``, a ``NodeError`` the CLI prints as one line like any other, never a
``KeyError`` or a traceback. Values are returned raw; ``display.clean`` makes text safe
for a terminal when it is printed.
"""

from __future__ import annotations

import math
from typing import Any

from dhtshare.errors import MalformedReply

__all__ = ["MAX_INT", "Reply", "malformed", "rows"]

MAX_INT = 2**63 - 1
"""Integers in a reply (sizes, counts, pids) lie in 0..MAX_INT."""

_MISSING = object()


def malformed(what: str, detail: str) -> MalformedReply:
    """The error for a reply to command ``what`` that is wrong as ``detail`` says."""
    return MalformedReply(f"malformed reply from the node to {what}: {detail}")


class Reply:
    """One JSON object from the node, read field by field (``what``: the command)."""

    def __init__(self, doc: Any, what: str) -> None:
        if not isinstance(doc, dict):
            raise malformed(what, f"expected an object, got {_kind(doc)}")
        self.doc: dict[str, Any] = doc
        self.what = what

    def _get(self, key: str, default: Any) -> Any:
        value = self.doc.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise malformed(self.what, f"field {key!r} is missing")
            return default
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise malformed(self.what, f"field {key!r} is {_kind(value)}, not text")
        return value

    def integer(self, key: str, default: Any = _MISSING) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise malformed(self.what, f"field {key!r} is {_kind(value)}, not an integer")
        if not 0 <= value <= MAX_INT:
            raise malformed(self.what, f"field {key!r} is out of range")
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise malformed(self.what, f"field {key!r} is {_kind(value)}, not a number")
        if isinstance(value, int) and not 0 <= value <= MAX_INT:
            raise malformed(self.what, f"field {key!r} is out of range")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise malformed(self.what, f"field {key!r} is out of range")
        return number

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise malformed(self.what, f"field {key!r} is {_kind(value)}, not true/false")
        return value

    def count(self, key: str, default: Any = _MISSING) -> int:
        """The number of entries of an object or list field."""
        value = self._get(key, default)
        if not isinstance(value, dict | list):
            raise malformed(self.what, f"field {key!r} is {_kind(value)}, not a collection")
        return len(value)


def rows(doc: Any, what: str) -> list[Reply]:
    """A listing: a JSON list of objects."""
    if not isinstance(doc, list):
        raise malformed(what, f"expected a list, got {_kind(doc)}")
    return [Reply(item, what) for item in doc]


def _kind(value: Any) -> str:
    """A JSON value's kind, for an error message (never the value: it is untrusted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
