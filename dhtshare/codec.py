"""Canonical bytes: a strict ``Reader`` and a ``Writer`` with ``pull_*`` / ``push_*``.

Integers are big-endian and fixed width; byte strings are length-prefixed. A short
read, an oversized length, or input left over after ``finish()`` raises the one
``errors.DecodeError``; callers turn it into their own typed error at a single boundary.
"""

from __future__ import annotations

import struct

from dhtshare.errors import DecodeError

__all__ = ["Reader", "Writer"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Reads fixed-width integers and byte strings from a buffer, strictly."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._data) - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise DecodeError(f"need {n} bytes, have {self.remaining}")
        view = self._data[self._pos : self._pos + n]
        self._pos += n
        return view

    def pull_u8(self) -> int:
        return self._take(1)[0]

    def pull_u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def pull_u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def pull_u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def pull_bytes(self, n: int) -> bytes:
        """Exactly ``n`` bytes."""
        return bytes(self._take(n))

    def pull_varbytes(self, max_len: int) -> bytes:
        """A u16 length, then that many bytes; a length over ``max_len`` is an error."""
        n = self.pull_u16()
        if n > max_len:
            raise DecodeError(f"length {n} exceeds maximum {max_len}")
        return self.pull_bytes(n)

    def pull_str(self, max_len: int) -> str:
        """UTF-8 text stored as varbytes; invalid UTF-8 is an error."""
        raw = self.pull_varbytes(max_len)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid UTF-8") from exc

    def finish(self) -> None:
        """Raise unless every byte was consumed."""
        if self.remaining:
            raise DecodeError(f"{self.remaining} trailing bytes")


class Writer:
    """Builds canonical bytes; the mirror image of ``Reader``."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def push_u8(self, value: int) -> Writer:
        self._parts.append(_check_range(value, 0xFF).to_bytes(1, "big"))
        return self

    def push_u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(_check_range(value, 0xFFFF)))
        return self

    def push_u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(_check_range(value, 0xFFFFFFFF)))
        return self

    def push_u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(_check_range(value, 0xFFFFFFFFFFFFFFFF)))
        return self

    def push_bytes(self, data: bytes) -> Writer:
        """Raw bytes, no length (the reader must know how many)."""
        self._parts.append(bytes(data))
        return self

    def push_varbytes(self, data: bytes, max_len: int) -> Writer:
        """A u16 length, then the bytes; longer than ``max_len`` is a ValueError."""
        if len(data) > max_len:
            raise ValueError(f"{len(data)} bytes exceeds maximum {max_len}")
        self.push_u16(len(data))
        self._parts.append(bytes(data))
        return self

    def push_str(self, text: str, max_len: int) -> Writer:
        return self.push_varbytes(text.encode("utf-8"), max_len)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def _check_range(value: int, maximum: int) -> int:
    if not 0 <= value <= maximum:
        raise ValueError(f"{value} out of range 0..{maximum}")
    return value
