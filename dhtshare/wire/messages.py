"""Peer messages: one frozen dataclass each, validated on construction.

``encode_message(msg)`` gives the plaintext of a sealed frame: a ``u8`` message
type, then the body. ``decode_message(data)`` is strict (every byte must be
consumed) and is the single place where ``DecodeError`` and invalid field
values become ``RemoteProtocolError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias

from dhtshare.codec import Reader, Writer
from dhtshare.crypto import HASH_SIZE
from dhtshare.errors import DecodeError, Malformed, RemoteProtocolError
from dhtshare.wire.frames import Reason

__all__ = [
    "MAX_BLOCK",
    "MAX_HASHES",
    "MAX_PIECES",
    "MAX_REJECT_TEXT",
    "Bitfield",
    "Cancel",
    "GetHashes",
    "HashList",
    "Have",
    "Keepalive",
    "Message",
    "MessageType",
    "Piece",
    "Reject",
    "Request",
    "decode_message",
    "encode_message",
]

MAX_BLOCK = 256 * 1024
"""Largest block a Request may ask for and a Piece may carry."""
MAX_HASHES = 8192
"""Most piece hashes in one GetHashes / HashList (256 KiB of hashes)."""
MAX_PIECES = 1 << 23
"""Most pieces a Bitfield describes (a 1 MiB bitfield)."""
MAX_REJECT_TEXT = 256
"""Longest Reject text, in UTF-8 bytes."""

_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF
_PIECE_HEAD = struct.Struct(">BII")
_MALFORMED = Malformed("message", lambda text: RemoteProtocolError(text, Reason.PROTOCOL))


class MessageType(IntEnum):
    """The first plaintext byte of a sealed frame."""

    KEEPALIVE = 0
    BITFIELD = 1
    HAVE = 2
    REQUEST = 3
    PIECE = 4
    CANCEL = 5
    GET_HASHES = 6
    HASH_LIST = 7
    REJECT = 8


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _u32(value: int, name: str) -> None:
    _check(0 <= value <= _U32_MAX, f"{name} {value} out of range 0..{_U32_MAX}")


def _block(index: int, begin: int, length: int) -> None:
    _u32(index, "index")
    _u32(begin, "begin")
    _check(1 <= length <= MAX_BLOCK, f"block length {length} out of range 1..{MAX_BLOCK}")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Nothing; keeps an idle connection from timing out."""


@dataclass(frozen=True, slots=True)
class Bitfield:
    """Which of ``piece_count`` pieces the sender holds; bit 7 of byte 0 is piece 0.

    ``bits`` is exactly ``ceil(piece_count / 8)`` bytes; spare bits must be zero.
    """

    piece_count: int
    bits: bytes

    def __post_init__(self) -> None:
        _check(0 <= self.piece_count <= MAX_PIECES, f"piece_count {self.piece_count} too large")
        _check(len(self.bits) == (self.piece_count + 7) // 8, "bitfield length mismatch")
        spare = -self.piece_count % 8
        _check(not self.bits or self.bits[-1] & ((1 << spare) - 1) == 0, "spare bits set")

    @classmethod
    def from_pieces(cls, piece_count: int, pieces: Iterable[int]) -> Bitfield:
        """The bitfield with exactly ``pieces`` set."""
        bits = bytearray((piece_count + 7) // 8)
        for i in pieces:
            _check(0 <= i < piece_count, f"piece {i} out of range")
            bits[i >> 3] |= 0x80 >> (i & 7)
        return cls(piece_count, bytes(bits))

    def has(self, index: int) -> bool:
        return 0 <= index < self.piece_count and bool(self.bits[index >> 3] & (0x80 >> (index & 7)))

    def pieces(self) -> list[int]:
        """Indices of the pieces the sender holds, ascending."""
        return [i for i in range(self.piece_count) if self.bits[i >> 3] & (0x80 >> (i & 7))]


@dataclass(frozen=True, slots=True)
class Have:
    """The sender now holds piece ``index``."""

    index: int

    def __post_init__(self) -> None:
        _u32(self.index, "index")


@dataclass(frozen=True, slots=True)
class Request:
    """Please send ``length`` bytes of piece ``index`` starting at ``begin``."""

    index: int
    begin: int
    length: int

    def __post_init__(self) -> None:
        _block(self.index, self.begin, self.length)


@dataclass(frozen=True, slots=True)
class Piece:
    """A block of piece ``index`` at offset ``begin``.

    ``data`` may be ``bytes``, a ``bytearray`` or a ``memoryview``; decoded Pieces hold a read-only
    ``memoryview`` into the decrypted frame, so the block is not copied again.
    """

    index: int
    begin: int
    data: bytes | bytearray | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        _block(self.index, self.begin, len(self.data))


@dataclass(frozen=True, slots=True)
class Cancel:
    """Never mind an earlier Request with the same fields."""

    index: int
    begin: int
    length: int

    def __post_init__(self) -> None:
        _block(self.index, self.begin, self.length)


@dataclass(frozen=True, slots=True)
class GetHashes:
    """Please send piece hashes ``start`` .. ``start + count - 1`` (at most MAX_HASHES)."""

    start: int
    count: int

    def __post_init__(self) -> None:
        _u32(self.start, "start")
        _check(1 <= self.count <= MAX_HASHES, f"count {self.count} out of range 1..{MAX_HASHES}")
        _check(self.start + self.count - 1 <= _U32_MAX, "hash range past u32")


@dataclass(frozen=True, slots=True)
class HashList:
    """Piece hashes ``start`` .. ``start + len(hashes) - 1``, each 32 bytes."""

    start: int
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _u32(self.start, "start")
        _check(1 <= len(self.hashes) <= MAX_HASHES, f"1..{MAX_HASHES} hashes per HashList")
        _check(self.start + len(self.hashes) - 1 <= _U32_MAX, "hash range past u32")
        _check(all(len(h) == HASH_SIZE for h in self.hashes), "hashes must be 32 bytes")

    @classmethod
    def chunks(cls, start: int, hashes: Iterable[bytes]) -> list[HashList]:
        """Split a run of hashes beginning at ``start`` into frame-sized HashLists."""
        run = tuple(hashes)
        return [cls(start + i, run[i : i + MAX_HASHES]) for i in range(0, len(run), MAX_HASHES)]


@dataclass(frozen=True, slots=True)
class Reject:
    """The sender is ending the connection: a reason code and a short text."""

    reason: int
    text: str = ""

    def __post_init__(self) -> None:
        _check(0 <= self.reason <= _U16_MAX, f"reason {self.reason} out of range")
        _check(len(self.text.encode("utf-8")) <= MAX_REJECT_TEXT, "reject text too long")


Message: TypeAlias = (
    Keepalive | Bitfield | Have | Request | Piece | Cancel | GetHashes | HashList | Reject
)


def encode_message(msg: Message) -> bytes:
    """The plaintext of a sealed frame: ``u8`` message type, then the body."""
    match msg:
        case Piece(index, begin, data):
            return _PIECE_HEAD.pack(MessageType.PIECE, index, begin) + data
        case Keepalive():
            return bytes((MessageType.KEEPALIVE,))
        case Bitfield(piece_count, bits):
            w = Writer().push_u8(MessageType.BITFIELD).push_u32(piece_count).push_bytes(bits)
        case Have(index):
            w = Writer().push_u8(MessageType.HAVE).push_u32(index)
        case Request(index, begin, length):
            w = _push_block(MessageType.REQUEST, index, begin, length)
        case Cancel(index, begin, length):
            w = _push_block(MessageType.CANCEL, index, begin, length)
        case GetHashes(start, count):
            w = Writer().push_u8(MessageType.GET_HASHES).push_u32(start).push_u32(count)
        case HashList(start, hashes):
            w = Writer().push_u8(MessageType.HASH_LIST).push_u32(start).push_u32(len(hashes))
            w.push_bytes(b"".join(hashes))
        case Reject(reason, text):
            w = Writer().push_u8(MessageType.REJECT).push_u16(reason)
            w.push_str(text, MAX_REJECT_TEXT)
    return w.getvalue()


def _push_block(kind: MessageType, index: int, begin: int, length: int) -> Writer:
    return Writer().push_u8(kind).push_u32(index).push_u32(begin).push_u32(length)


def decode_message(data: bytes | bytearray) -> Message:
    """Parse one sealed-frame plaintext; anything malformed is a RemoteProtocolError."""
    with _MALFORMED:
        r = Reader(data)
        kind = r.pull_u8()
        if kind == MessageType.PIECE:
            index, begin = r.pull_u32(), r.pull_u32()
            # A read-only view, not a copy: the block stays inside the decrypted plaintext.
            return Piece(index, begin, memoryview(data).toreadonly()[_PIECE_HEAD.size :])
        msg = _decode_body(kind, r)
        r.finish()
        return msg


def _decode_body(kind: int, r: Reader) -> Message:
    match kind:
        case MessageType.KEEPALIVE:
            return Keepalive()
        case MessageType.BITFIELD:
            count = r.pull_u32()
            if count > MAX_PIECES:
                raise DecodeError(f"piece_count {count} too large")
            return Bitfield(count, r.pull_bytes((count + 7) // 8))
        case MessageType.HAVE:
            return Have(r.pull_u32())
        case MessageType.REQUEST:
            return Request(r.pull_u32(), r.pull_u32(), r.pull_u32())
        case MessageType.CANCEL:
            return Cancel(r.pull_u32(), r.pull_u32(), r.pull_u32())
        case MessageType.GET_HASHES:
            return GetHashes(r.pull_u32(), r.pull_u32())
        case MessageType.HASH_LIST:
            start, count = r.pull_u32(), r.pull_u32()
            if count > MAX_HASHES:
                raise DecodeError(f"{count} hashes exceeds {MAX_HASHES}")
            return HashList(start, tuple(r.pull_bytes(HASH_SIZE) for _ in range(count)))
        case MessageType.REJECT:
            return Reject(r.pull_u16(), r.pull_str(MAX_REJECT_TEXT))
    raise DecodeError(f"unknown message type {kind}")
