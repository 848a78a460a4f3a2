"""Length-prefixed frames with a hard maximum size, and the wire's reason codes.

A frame is ``u32 length`` (big-endian, the payload length), ``u8 type``, then
``length`` payload bytes. A header that announces more than ``MAX_FRAME`` is a
``RemoteProtocolError`` at once, before any of the payload arrives, so a peer can
never make us buffer more than one maximal frame.

Before the handshake is done a frame may carry at most ``MAX_HANDSHAKE_FRAME`` bytes
(``PeerConnection`` lowers the decoder's limit while it is in a handshake state): an
unauthenticated peer can make us hold a few hundred bytes, not a megabyte.

``FrameDecoder`` keeps unparsed input in one ``bytearray`` and a read offset, so
feeding data in small pieces costs linear, not quadratic, copying. It grows by what
arrives, never by what a header announces.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from dhtshare.errors import RemoteProtocolError

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_FRAME",
    "MAX_HANDSHAKE_FRAME",
    "FrameDecoder",
    "FrameType",
    "Reason",
    "encode_frame",
    "frame_header",
    "peek_header",
    "take_frame",
]

MAX_FRAME = 1024 * 1024 + 64
"""Largest payload a frame may carry: 1 MiB plus room for headers and the AEAD tag."""

MAX_HANDSHAKE_FRAME = 512
"""Largest payload a frame may carry before the session keys: the biggest handshake
frame is the 154-byte ClientHello, and a plaintext Reject is at most 260 bytes."""

_HEADER = struct.Struct(">IB")
FRAME_HEADER_SIZE = _HEADER.size


class FrameType(IntEnum):
    """The ``u8`` type of a frame. Only ``SEALED`` frames follow the handshake."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CLIENT_AUTH = 3
    SEALED = 4
    REJECT = 5  # a plaintext Reject, only while the sender has no session keys
    # The first frame of a connection that is not a peer session (docs/connectivity.md):
    DIALBACK = 6  # a reachability dial-back: one frame carrying the asker's nonce
    RELAY = 7  # relay control: a reservation, a circuit request or a circuit acceptance
    PUNCH = 8  # hole-punch coordination, sent inside a relayed circuit before the handshake


class Reason(IntEnum):
    """Why a connection ends: the ``reason`` of a RemoteProtocolError and of a Reject."""

    PROTOCOL = 1  # malformed frame or message, or a message not allowed in this state
    FRAME_TOO_LARGE = 2
    BAD_MAGIC = 3
    UNSUPPORTED_VERSION = 4
    BAD_SIGNATURE = 5
    DECRYPT_FAILED = 6  # tampered, replayed, reordered or dropped frame
    TRUNCATED = 7  # end of stream in the middle of a frame
    NOT_MEMBER = 8  # used by the adapter: the peer is not in the group
    UNKNOWN_CONTENT = 9  # used by the adapter: we do not serve this content id
    BUSY = 10  # used by the adapter: too many connections or requests
    TIMEOUT = 11  # used by the adapter: the peer was silent too long
    BAD_DATA = 12  # used by the transfer layer: a piece failed its hash check
    SHUTDOWN = 13  # used by the adapter: we are going away
    NO_COMMON_SUITE = 14  # the peers share no cipher suite (or one chose an unoffered one)


def frame_header(frame_type: int, length: int) -> bytes:
    """The five header bytes of a frame carrying ``length`` payload bytes."""
    if not 0 <= length <= MAX_FRAME:
        raise ValueError(f"frame payload of {length} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(length, frame_type)


def peek_header(data: bytes | bytearray) -> tuple[int, int] | None:
    """``(type, payload length)`` of the frame at the front of ``data``, or ``None`` while
    its header is not all there. For readers that decide by a frame's type before they
    take it (the first frame of a connection, frames before a circuit's handshake)."""
    if len(data) < FRAME_HEADER_SIZE:
        return None
    length, frame_type = _HEADER.unpack_from(data)
    return frame_type, length


def take_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Remove the first frame from ``buf``: ``(type, payload)``, or ``None`` (``buf``
    untouched) while it is not all there. The caller checks the length first
    (``peek_header``): this takes whatever the header announces."""
    head = peek_header(buf)
    if head is None or len(buf) < FRAME_HEADER_SIZE + head[1]:
        return None
    end = FRAME_HEADER_SIZE + head[1]
    payload = bytes(buf[FRAME_HEADER_SIZE:end])
    del buf[:end]
    return head[0], payload


def encode_frame(frame_type: int, payload: bytes) -> bytes:
    """One complete frame."""
    return frame_header(frame_type, len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into ``(type, payload)`` frames.

    Input arrives either by ``feed(data)`` or, without a copy, by receiving straight
    into ``get_buffer(n)`` and then calling ``buffer_updated(nbytes)`` (the pair
    asyncio's ``BufferedProtocol`` uses). ``next_frame`` returns one frame or
    ``None`` when more input is needed; ``next_frame_view`` the same without a copy.
    A header announcing more than ``max_frame`` bytes raises ``RemoteProtocolError``
    as soon as its five bytes are in.

    Unparsed bytes are ``_buf[_pos:_end]``. The buffer is never resized while a view
    of it may be out (a ``bytearray`` with exports cannot be): it is compacted in
    place, or replaced by a bigger one.
    """

    __slots__ = ("_buf", "_end", "_max_frame", "_pos")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._max_frame = max_frame

    @property
    def max_frame(self) -> int:
        """The largest payload the next frame header may announce."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, limit: int) -> None:
        self._max_frame = limit

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return self._end - self._pos

    def get_buffer(self, size: int) -> memoryview:
        """Writable room for at least ``size`` more bytes, to receive into."""
        size = max(1, size)
        live = self._end - self._pos
        if self._pos and (not live or len(self._buf) - self._end < size):
            # move the unparsed tail to the front only when room runs out (or it is
            # empty), so each byte moves at most once per buffer's worth of input
            self._buf[:live] = self._buf[self._pos : self._end]  # same length: no resize
            self._pos, self._end = 0, live
        if len(self._buf) - self._end < size:
            bigger = bytearray(max(self._end + size, 2 * len(self._buf)))
            bigger[: self._end] = self._buf[: self._end]
            self._buf = bigger
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` view."""
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"{nbytes} bytes do not fit the buffer handed out")
        self._end += nbytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (a copy)."""
        size = len(data)
        if size:
            with self.get_buffer(size) as room:
                room[:size] = data
            self.buffer_updated(size)

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next frame as ``(type, payload)``, or ``None`` until more input arrives."""
        frame = self.next_frame_view()
        if frame is None:
            return None
        with frame[1] as payload:
            return frame[0], bytes(payload)

    def next_frame_view(self) -> tuple[int, memoryview] | None:
        """``next_frame`` without copying: the payload is a view into the buffer, valid
        until the next ``get_buffer`` or ``feed`` (release it before either)."""
        avail = self._end - self._pos
        if avail < FRAME_HEADER_SIZE:
            return None
        length, frame_type = _HEADER.unpack_from(self._buf, self._pos)
        if length > self._max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds maximum {self._max_frame}",
                Reason.FRAME_TOO_LARGE,
            )
        if avail < FRAME_HEADER_SIZE + length:
            return None
        start = self._pos + FRAME_HEADER_SIZE
        with memoryview(self._buf) as view:
            payload = view[start : start + length]
        self._pos = start + length
        return int(frame_type), payload
