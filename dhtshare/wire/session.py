"""``SessionCipher``: seals and opens the frames that follow the handshake (pure).

One key per direction, from the handshake (``wire/handshake.py``), turned into the chosen
suite's AEAD key (``suites.session_key``); the nonce is a frame counter per direction,
never sent. See docs/wire.md, "Session keys and sealed frames".
"""

from __future__ import annotations

import struct

import nacl.exceptions

from dhtshare.errors import LocalProtocolError, RemoteProtocolError
from dhtshare.wire.frames import FRAME_HEADER_SIZE, MAX_FRAME, FrameType, Reason, frame_header
from dhtshare.wire.suites import AEADS, Buffer, Suite, session_key

__all__ = ["SessionCipher"]

_COUNTER = struct.Struct(">Q")  # the AEAD nonce ends in a u64 frame counter; zeros before
_MAX_COUNTER = (1 << 64) - 1


class SessionCipher:
    """Seals outgoing and opens incoming ``SEALED`` frames, one counter per direction.

    The frame header is the associated data, so length and type are authenticated
    too. A tampered, replayed, reordered or dropped frame fails to open. ``rx_key``
    and ``tx_key`` are the handshake's session keys; each direction's AEAD key is
    derived from one of them and the suite.
    """

    __slots__ = ("_aead", "_nonce_pad", "_rx_count", "_rx_key", "_tx_count", "_tx_key", "suite")

    def __init__(
        self, rx_key: bytes, tx_key: bytes, suite: Suite = Suite.CHACHA20_POLY1305
    ) -> None:
        self.suite = suite
        self._aead = AEADS[suite]
        self._nonce_pad = bytes(self._aead.nonce_size - _COUNTER.size)
        self._rx_key = session_key(suite, rx_key)
        self._tx_key = session_key(suite, tx_key)
        self._rx_count = 0
        self._tx_count = 0

    @property
    def tag_size(self) -> int:
        """Bytes the AEAD adds to every message."""
        return self._aead.tag_size

    def seal(self, plaintext: Buffer) -> bytearray:
        """A complete ``SEALED`` frame carrying ``plaintext`` (sealed straight into it)."""
        if self._tx_count > _MAX_COUNTER:
            raise LocalProtocolError("send nonce exhausted; reconnect")
        size = len(plaintext) + self._aead.tag_size
        if size > MAX_FRAME:
            raise LocalProtocolError(f"message of {len(plaintext)} bytes does not fit a frame")
        header = frame_header(FrameType.SEALED, size)
        nonce = self._nonce_pad + _COUNTER.pack(self._tx_count)
        self._tx_count += 1
        frame = bytearray(FRAME_HEADER_SIZE + size)
        frame[:FRAME_HEADER_SIZE] = header
        with memoryview(frame) as view, view[FRAME_HEADER_SIZE:] as body:
            self._aead.seal_into(body, plaintext, header, nonce, self._tx_key)
        return frame

    def open(self, payload: Buffer) -> bytearray:
        """The plaintext of the next incoming ``SEALED`` frame's payload (which may be a
        view into the receive buffer: it is read, not kept)."""
        if len(payload) < self._aead.tag_size:
            raise RemoteProtocolError("sealed frame shorter than its tag", Reason.DECRYPT_FAILED)
        header = frame_header(FrameType.SEALED, len(payload))
        nonce = self._nonce_pad + _COUNTER.pack(self._rx_count)
        try:
            plaintext = self._aead.open_new(payload, header, nonce, self._rx_key)
        except nacl.exceptions.CryptoError as exc:
            raise RemoteProtocolError(
                f"frame {self._rx_count} failed authentication", Reason.DECRYPT_FAILED
            ) from exc
        self._rx_count += 1
        return plaintext
