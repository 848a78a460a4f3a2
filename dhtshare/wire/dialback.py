"""The DIALBACK frame: the first and only frame of a reachability dial-back connection.

A node that asked a peer to test its reachability (the DHT RPC ``reach``) gives it a
random nonce; the peer opens a new TCP connection to the address it saw the request
come from and sends one frame of type ``FrameType.DIALBACK`` whose payload is exactly
that nonce (``NONCE_SIZE`` bytes), then closes. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from dhtshare.errors import RemoteProtocolError
from dhtshare.wire.frames import FrameType, Reason, encode_frame

__all__ = ["NONCE_SIZE", "decode_dialback", "dialback_frame", "encode_dialback"]

NONCE_SIZE = 16
"""Bytes of a dial-back nonce (and of a DIALBACK frame's payload)."""


def encode_dialback(nonce: bytes) -> bytes:
    """The payload of a DIALBACK frame carrying ``nonce``."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a dial-back nonce has {NONCE_SIZE} bytes, not {len(nonce)}")
    return bytes(nonce)


def dialback_frame(nonce: bytes) -> bytes:
    """The complete DIALBACK frame (header and payload) carrying ``nonce``."""
    return encode_frame(FrameType.DIALBACK, encode_dialback(nonce))


def decode_dialback(payload: bytes | bytearray | memoryview) -> bytes:
    """The nonce in a DIALBACK payload; ``RemoteProtocolError`` if its size is wrong."""
    if len(payload) != NONCE_SIZE:
        raise RemoteProtocolError(
            f"DIALBACK payload of {len(payload)} bytes, expected {NONCE_SIZE}", Reason.PROTOCOL
        )
    return bytes(payload)
