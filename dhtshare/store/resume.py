"""Resume state: which pieces of a download are verified, saved atomically as JSON.

The file looks like::

    {"version": 1, "content_id": "<64 hex digits>", "piece_count": 2048,
     "verified": [[0, 100], [120, 121]]}

``verified`` lists half-open index ranges ``[start, end)``, sorted and disjoint,
so a mostly contiguous download stays a few bytes long.

Saving writes a temporary file in the same directory, fsyncs it, and
``os.replace``s it over the old one, so a crash leaves either the old or the new
state, never half of one.

Loading has two flavours. ``read_state`` is strict: a missing or damaged file
raises ``StoreError``. ``load_or_new`` is what a resuming download uses: a
missing, damaged, or foreign file (another content id or piece count) gives a
fresh state with nothing verified. That is always safe, because a piece is
trusted only after its hash checks out: the cost is downloading it again.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhtshare.atomic import write_atomic
from dhtshare.crypto import HASH_SIZE
from dhtshare.errors import StoreError

__all__ = ["STATE_VERSION", "ResumeState", "load_or_new", "read_state"]

STATE_VERSION = 1


@dataclass(slots=True)
class ResumeState:
    """The verified pieces of one download."""

    content_id: bytes
    piece_count: int
    verified: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if len(self.content_id) != HASH_SIZE:
            raise ValueError(f"content id must be {HASH_SIZE} bytes")
        if self.piece_count < 0:
            raise ValueError(f"negative piece count {self.piece_count}")
        if any(not 0 <= i < self.piece_count for i in self.verified):
            raise ValueError("verified piece index out of range")

    def mark(self, index: int) -> None:
        """Record that piece ``index`` is verified and written."""
        if not 0 <= index < self.piece_count:
            raise IndexError(f"piece {index} out of range 0..{self.piece_count - 1}")
        self.verified.add(index)

    @property
    def complete(self) -> bool:
        return len(self.verified) == self.piece_count

    def missing(self) -> list[int]:
        """Indices not yet verified, in order."""
        return [i for i in range(self.piece_count) if i not in self.verified]

    def to_json(self) -> str:
        doc = {
            "version": STATE_VERSION,
            "content_id": self.content_id.hex(),
            "piece_count": self.piece_count,
            "verified": _to_ranges(self.verified),
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ResumeState:
        """Parse strictly; any damage raises ``StoreError``."""
        try:
            return _parse(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(
                f"damaged resume state: {exc}", "delete it to download the file again"
            ) from exc

    def save(self, path: Path) -> None:
        """Write atomically: temp file in the same directory, fsync, ``os.replace``."""
        _atomic_write(Path(path), self.to_json().encode("utf-8"))


def _to_ranges(indices: Iterable[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def _from_ranges(ranges: Any, piece_count: int) -> set[int]:
    if not isinstance(ranges, list):
        raise TypeError("verified is not a list")
    out: set[int] = set()
    previous_end = 0
    for item in ranges:
        start, end = _int_pair(item)
        if not previous_end <= start < end <= piece_count:
            raise ValueError(f"bad range {item!r}")
        out.update(range(start, end))
        previous_end = end
    return out


def _int_pair(item: Any) -> tuple[int, int]:
    if not (isinstance(item, list) and len(item) == 2 and all(_is_int(x) for x in item)):
        raise TypeError(f"bad range {item!r}")
    return item[0], item[1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse(doc: Any) -> ResumeState:
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError("unknown format or version")
    count = doc["piece_count"]
    if not _is_int(count) or count < 0:
        raise ValueError("bad piece_count")
    content_id = bytes.fromhex(doc["content_id"])
    return ResumeState(content_id, count, _from_ranges(doc["verified"], count))


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise _save_error(path, exc) from exc


def _save_error(path: Path, exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"disk full while saving {path}", "free some space, then resume")
    return StoreError(
        f"cannot save {path}: {exc.strerror or exc}", "check the directory's permissions"
    )


def read_state(path: Path) -> ResumeState:
    """Load strictly: a missing or damaged file raises ``StoreError``."""
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"cannot read resume state {path}", "delete it to start the download over"
        ) from exc
    return ResumeState.from_json(text)


def load_or_new(path: Path, content_id: bytes, piece_count: int) -> ResumeState:
    """The saved state if it is intact and for this file; otherwise a fresh, empty one."""
    try:
        state = read_state(path)
    except StoreError:
        return ResumeState(content_id, piece_count)
    if state.content_id != content_id or state.piece_count != piece_count:
        return ResumeState(content_id, piece_count)
    return state
