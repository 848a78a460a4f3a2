"""Hole-punch coordination: the payloads of ``PUNCH`` frames (sans-I/O).

Sent inside a fresh relayed circuit, before any peer handshake (docs/connectivity.md).
A payload is a ``u8`` kind, then its body:

- ``PunchConnect`` (kind 0): ``u8 count`` (1..``MAX_PUNCH_ADDRESSES``), then the
  addresses (``wire/address.py``; port 1..65535): where the sender will dial from (and
  accept on); the receiver dials at most two of them, by the rules of
  ``reach/punch.punch_targets`` (the frame may come from a hostile relay);
- ``PunchSync`` (kind 1): empty: the dialer starts its attempts (see ``reach/punch.py``).

Every payload fits ``MAX_HANDSHAKE_FRAME`` (512 bytes). ``decode_punch`` is strict (every
byte consumed) and the one place where malformed input becomes ``RemoteProtocolError``.
Nothing in these frames is trusted: the peer handshake that follows checks the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from dhtshare.codec import Reader, Writer
from dhtshare.errors import DecodeError, Malformed, RemoteProtocolError
from dhtshare.wire.address import check_address, pull_address, push_address
from dhtshare.wire.frames import MAX_HANDSHAKE_FRAME, FrameType, Reason, encode_frame

__all__ = [
    "MAX_PUNCH_ADDRESSES",
    "PunchConnect",
    "PunchKind",
    "PunchMessage",
    "PunchSync",
    "decode_punch",
    "encode_punch",
    "punch_frame",
]

MAX_PUNCH_ADDRESSES = 8
"""Most addresses one ``PunchConnect`` carries (8 IPv6 ones: 161 bytes)."""

_MALFORMED = Malformed("punch message", lambda text: RemoteProtocolError(text, Reason.PROTOCOL))


class PunchKind(IntEnum):
    """The first byte of a PUNCH payload."""

    CONNECT = 0
    SYNC = 1


@dataclass(frozen=True, slots=True)
class PunchConnect:
    """The sender's addresses for the punch: ``(host, port)`` with ``host`` an IP literal."""

    addresses: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.addresses) <= MAX_PUNCH_ADDRESSES:
            raise ValueError(f"1 to {MAX_PUNCH_ADDRESSES} addresses, not {len(self.addresses)}")
        for host, port in self.addresses:
            check_address(host, port, min_port=1)


@dataclass(frozen=True, slots=True)
class PunchSync:
    """The dialer's go: the receiver dials at once, the sender after half a round trip."""


PunchMessage: TypeAlias = PunchConnect | PunchSync


def encode_punch(msg: PunchMessage) -> bytes:
    """The payload of a PUNCH frame carrying ``msg``."""
    w = Writer()
    if isinstance(msg, PunchSync):
        return w.push_u8(PunchKind.SYNC).getvalue()
    w.push_u8(PunchKind.CONNECT).push_u8(len(msg.addresses))
    for host, port in msg.addresses:
        push_address(w, host, port)
    data = w.getvalue()
    assert len(data) <= MAX_HANDSHAKE_FRAME
    return data


def punch_frame(msg: PunchMessage) -> bytes:
    """A complete PUNCH frame (header and payload)."""
    return encode_frame(FrameType.PUNCH, encode_punch(msg))


def decode_punch(data: bytes | bytearray | memoryview) -> PunchMessage:
    """Parse a PUNCH payload; anything malformed is a ``RemoteProtocolError``."""
    with _MALFORMED:
        if len(data) > MAX_HANDSHAKE_FRAME:
            raise DecodeError(f"{len(data)} bytes exceeds {MAX_HANDSHAKE_FRAME}")
        r = Reader(data)
        kind = r.pull_u8()
        msg: PunchMessage
        if kind == PunchKind.SYNC:
            msg = PunchSync()
        elif kind == PunchKind.CONNECT:
            count = r.pull_u8()
            if not 1 <= count <= MAX_PUNCH_ADDRESSES:
                raise DecodeError(f"{count} addresses (1 to {MAX_PUNCH_ADDRESSES})")
            addresses = tuple(pull_address(r) for _ in range(count))
            msg = PunchConnect(addresses)  # its own checks: port 0 is a ValueError
        else:
            raise DecodeError(f"unknown punch message kind {kind}")
        r.finish()
        return msg
