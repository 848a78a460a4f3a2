"""The sans-I/O peer wire protocol: frames, handshake, messages, and PeerConnection.

Byte layouts, the handshake and the state table are described in docs/wire.md.
"""

from __future__ import annotations

from dhtshare.wire.connection import (
    TRANSITIONS,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    Input,
    PeerConnection,
    Role,
    State,
)
from dhtshare.wire.frames import (
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    FrameDecoder,
    FrameType,
    Reason,
    encode_frame,
)
from dhtshare.wire.handshake import ACCESS_KEY_SIZE, MAGIC, VERSION, AccessKeys
from dhtshare.wire.messages import (
    MAX_BLOCK,
    MAX_HASHES,
    MAX_PIECES,
    MAX_REJECT_TEXT,
    Bitfield,
    Cancel,
    GetHashes,
    HashList,
    Have,
    Keepalive,
    Message,
    MessageType,
    Piece,
    Reject,
    Request,
    decode_message,
    encode_message,
)

__all__ = [
    "ACCESS_KEY_SIZE",
    "MAGIC",
    "MAX_BLOCK",
    "MAX_FRAME",
    "MAX_HANDSHAKE_FRAME",
    "MAX_HASHES",
    "MAX_PIECES",
    "MAX_REJECT_TEXT",
    "TRANSITIONS",
    "VERSION",
    "AccessKeys",
    "Bitfield",
    "Cancel",
    "ConnectionClosed",
    "Event",
    "FrameDecoder",
    "FrameType",
    "GetHashes",
    "HandshakeComplete",
    "HashList",
    "Have",
    "Input",
    "Keepalive",
    "Message",
    "MessageType",
    "PeerConnection",
    "Piece",
    "Reason",
    "Reject",
    "Request",
    "Role",
    "State",
    "decode_message",
    "encode_frame",
    "encode_message",
]
