"""Small files replaced atomically: JSON state files, and piece-hash lists kept beside state.

``write_atomic`` writes a temp file (mode 0600) in the target's directory, fsyncs it,
``os.replace``s it over the target and fsyncs the directory: a crash leaves the old
file or the new one, never half of one. Every state file dhtshare keeps goes through it;
the JSON ones through ``write_json``, and they are read back with ``read_json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dhtshare.crypto import HASH_SIZE

__all__ = [
    "fsync_dir",
    "read_hashes",
    "read_json",
    "write_atomic",
    "write_hashes",
    "write_json",
]


def fsync_dir(path: Path) -> None:
    """Best effort: make a rename in directory ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still done
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0600); ``OSError`` leaves the old file as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, doc: Any) -> None:
    """Replace ``path`` with ``doc`` as indented UTF-8 JSON (through ``write_atomic``)."""
    write_atomic(path, json.dumps(doc, indent=1).encode("utf-8"))


def read_json(path: Path) -> Any:
    """The JSON document in ``path``. Raises ``OSError`` (``FileNotFoundError`` if it is
    missing) or ``ValueError`` if it does not read or parse; each caller decides what that means."""
    return json.loads(path.read_text(encoding="utf-8"))


def write_hashes(path: Path, hashes: Sequence[bytes]) -> None:
    """Save a piece-hash list as its 32-byte hashes back to back."""
    write_atomic(path, b"".join(hashes))


def read_hashes(path: Path, count: int | None = None) -> tuple[bytes, ...] | None:
    """A saved piece-hash list, or ``None`` if it is missing, damaged or not ``count`` long."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) % HASH_SIZE or (count is not None and len(raw) != HASH_SIZE * count):
        return None
    return tuple(raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE))
