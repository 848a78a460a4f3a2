"""Pure file layout and content ids: piece sizes, piece hashes, the hash-tree root.

A file is cut into pieces of one power-of-two size (the last piece may be
shorter). Each piece is hashed with SHA-256; the piece hashes are the leaves of a
binary hash tree whose root is the file's 32-byte content id::

    leaf(h)    = SHA-256(0x00 || h)          h: a piece hash
    node(l, r) = SHA-256(0x01 || l || r)
    odd node   : promoted unchanged to the next level
    empty file : SHA-256(0x02)               (no pieces)

The prefixes keep a leaf from ever being mistaken for an inner node.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dhtshare.crypto import HASH_SIZE
from dhtshare.errors import FileShareError

__all__ = [
    "CHUNK_SIZE",
    "MAX_FILE_PIECES",
    "MAX_FILE_SIZE",
    "MAX_PIECE_SIZE",
    "MIN_PIECE_SIZE",
    "TARGET_PIECES",
    "FileLayout",
    "check_layout",
    "content_id_hex",
    "hash_file",
    "hash_piece",
    "is_valid_piece_size",
    "match_content_id",
    "merkle_root",
    "parse_content_id",
    "piece_size_for",
    "verify_hash_list",
    "verify_piece",
]

MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 16 * 1024 * 1024
TARGET_PIECES = 2048
MAX_FILE_PIECES = 1 << 16
"""Most pieces a file may have: 65,536 pieces of 16 MiB (1 TiB). A layout from the
network is checked against it before anything proportional to it is allocated."""
MAX_FILE_SIZE = MAX_FILE_PIECES * MAX_PIECE_SIZE
CHUNK_SIZE = 1024 * 1024  # read size while hashing: memory stays bounded

_LEAF = b"\x00"
_NODE = b"\x01"
_EMPTY = b"\x02"


def piece_size_for(size: int) -> int:
    """The piece size for a file of ``size`` bytes: at most ~2048 pieces, 256 KiB..16 MiB."""
    if size < 0:
        raise ValueError(f"negative file size {size}")
    piece = MIN_PIECE_SIZE
    while piece < MAX_PIECE_SIZE and piece * TARGET_PIECES < size:
        piece *= 2
    return piece


def is_valid_piece_size(piece_size: int) -> bool:
    """True for a power of two within ``MIN_PIECE_SIZE..MAX_PIECE_SIZE`` (for network input)."""
    in_range = MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE
    return in_range and piece_size & (piece_size - 1) == 0


def check_layout(size: int, piece_size: int) -> None:
    """``ValueError`` unless ``piece_size`` is the one ``piece_size_for(size)`` gives and
    ``size`` is at most ``MAX_FILE_SIZE`` (so at most ``MAX_FILE_PIECES`` pieces).

    A file entry from the network passes this before its layout is used: its cost is
    two comparisons, whatever the sizes claim. The piece size is a function of the
    size, so two entries for one content id can disagree only about the size, and a
    content id's hash tree fixes the piece count (``verify_hash_list``).
    """
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ValueError(f"file size {size} out of range 0..{MAX_FILE_SIZE}")
    if piece_size != piece_size_for(size):
        raise ValueError(f"piece size {piece_size} does not fit a file of {size} bytes")


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How a file of ``size`` bytes splits into pieces of ``piece_size`` bytes."""

    size: int
    piece_size: int

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"negative file size {self.size}")
        if self.piece_size <= 0:
            raise ValueError(f"piece size must be positive, got {self.piece_size}")

    @classmethod
    def for_size(cls, size: int) -> FileLayout:
        """The layout with the default piece size for ``size``."""
        return cls(size, piece_size_for(size))

    @property
    def piece_count(self) -> int:
        return -(-self.size // self.piece_size)

    def piece_offset(self, index: int) -> int:
        """Byte offset of piece ``index`` in the file."""
        self._check(index)
        return index * self.piece_size

    def piece_length(self, index: int) -> int:
        """Length of piece ``index``; only the last piece may be shorter."""
        self._check(index)
        return min(self.piece_size, self.size - index * self.piece_size)

    def piece_lengths(self) -> list[int]:
        """Every piece's length, in order."""
        return [self.piece_length(i) for i in range(self.piece_count)]

    def _check(self, index: int) -> None:
        if not 0 <= index < self.piece_count:
            raise IndexError(f"piece {index} out of range 0..{self.piece_count - 1}")


def hash_piece(data: bytes | bytearray | memoryview) -> bytes:
    """The SHA-256 hash of one piece."""
    return hashlib.sha256(data).digest()


def verify_piece(data: bytes | bytearray | memoryview, expected: bytes) -> bool:
    """True if ``data`` hashes to ``expected``."""
    return hash_piece(data) == expected


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """The root of the hash tree over ``hashes`` (the content id); see the module doc."""
    if not hashes:
        return hashlib.sha256(_EMPTY).digest()
    level = [hashlib.sha256(_LEAF + h).digest() for h in hashes]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def _next_level(level: list[bytes]) -> list[bytes]:
    pairs = [
        hashlib.sha256(_NODE + level[i] + level[i + 1]).digest()
        for i in range(0, len(level) - 1, 2)
    ]
    if len(level) % 2:
        pairs.append(level[-1])
    return pairs


def verify_hash_list(hashes: Sequence[bytes], root: bytes, piece_count: int | None = None) -> bool:
    """True if every hash is 32 bytes, the count matches (if given) and the root is ``root``."""
    if piece_count is not None and len(hashes) != piece_count:
        return False
    if any(len(h) != HASH_SIZE for h in hashes):
        return False
    return merkle_root(hashes) == root


def hash_file(
    path: Path,
    piece_size: int,
    progress: Callable[[int], None] | None = None,
    *,
    expected_size: int | None = None,
) -> list[bytes]:
    """Hash ``path`` piece by piece; blocking, so run it in a thread.

    Reads at most ``CHUNK_SIZE`` bytes at a time and calls ``progress(bytes_done)``
    after each read. If ``expected_size`` is given and the file holds a different
    number of bytes (it changed while hashing), raises ``FileShareError``.
    """
    if piece_size <= 0:
        raise ValueError(f"piece size must be positive, got {piece_size}")
    try:
        with path.open("rb") as stream:
            hashes, done = _hash_stream(stream, piece_size, progress)
    except OSError as exc:
        raise FileShareError(
            f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions"
        ) from exc
    if expected_size is not None and done != expected_size:
        raise FileShareError(
            f"{path} changed while it was being hashed", "share it again once it stops changing"
        )
    return hashes


def _hash_stream(
    stream: io.BufferedReader, piece_size: int, progress: Callable[[int], None] | None
) -> tuple[list[bytes], int]:
    buffer = memoryview(bytearray(min(piece_size, CHUNK_SIZE)))
    hashes: list[bytes] = []
    done = 0
    while True:
        digest, got = _hash_one_piece(stream, piece_size, buffer, done, progress)
        if got == 0:
            return hashes, done
        hashes.append(digest)
        done += got
        if got < piece_size:
            return hashes, done


def _hash_one_piece(
    stream: io.BufferedReader,
    piece_size: int,
    buffer: memoryview,
    done: int,
    progress: Callable[[int], None] | None,
) -> tuple[bytes, int]:
    hasher = hashlib.sha256()
    got = 0
    while got < piece_size:
        n = stream.readinto(buffer[: min(len(buffer), piece_size - got)])
        if not n:
            break
        hasher.update(buffer[:n])
        got += n
        if progress is not None:
            progress(done + got)
    return hasher.digest(), got


def content_id_hex(content_id: bytes) -> str:
    """The printable form of a content id: lowercase hex."""
    return content_id.hex()


def parse_content_id(text: str) -> bytes:
    """A full 64-digit hex content id back to bytes; ``FileShareError`` otherwise."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != HASH_SIZE:
        raise FileShareError(
            f"not a content id: {text!r}", f"give the {2 * HASH_SIZE}-digit hex id of a file"
        )
    return raw


def match_content_id(prefix: str, candidates: Iterable[bytes]) -> bytes:
    """The one candidate whose hex form starts with ``prefix``; ``FileShareError`` if 0 or 2+."""
    wanted = prefix.strip().lower()
    if not wanted:
        raise FileShareError("empty file id", "give the file's id or a unique prefix of it")
    matches = sorted({c for c in candidates if c.hex().startswith(wanted)})
    if not matches:
        raise FileShareError(f"no file with id {wanted}", "list the group's files to see their ids")
    if len(matches) > 1:
        raise FileShareError(
            f"{len(matches)} files have ids starting with {wanted}", "give more digits of the id"
        )
    return matches[0]
