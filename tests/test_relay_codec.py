"""The relay control codec (wire/relay.py): round trips, and bad input is a protocol error."""

from __future__ import annotations

import random

import pytest

from dhtshare.errors import RemoteProtocolError
from dhtshare.wire.frames import FRAME_HEADER_SIZE, FrameType
from dhtshare.wire.relay import (
    MAX_REFUSE_TEXT,
    MAX_RELAY_PAYLOAD,
    Accept,
    Connect,
    Incoming,
    Ready,
    RefuseCode,
    Refused,
    RelayMessage,
    Reserve,
    Reserved,
    decode_relay,
    encode_relay,
    relay_frame,
)

KEY = bytes(range(32))
CIRCUIT = bytes(range(100, 116))
MESSAGES: list[RelayMessage] = [
    Reserve(KEY, 1_700_000_000, "203.0.113.9", 4000, bytes(64)),
    Reserve(KEY, 0, "2001:db8::7", 1, bytes(64)),
    Reserved(600, "203.0.113.7", 40000),
    Reserved(0, "2001:db8::1", 65535),
    Refused(RefuseCode.NO_RESERVATION),
    Refused(RefuseCode.LIMIT, "é" * (MAX_REFUSE_TEXT // 2)),
    Connect(KEY),
    Incoming(CIRCUIT, "198.51.100.1", 1),
    Incoming(CIRCUIT, "::1", 0),
    Accept(CIRCUIT),
    Ready(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_bounded(msg: RelayMessage) -> None:
    payload = encode_relay(msg)
    assert len(payload) <= MAX_RELAY_PAYLOAD
    assert decode_relay(payload) == msg
    frame = relay_frame(msg)
    assert frame[4] == FrameType.RELAY
    assert frame[FRAME_HEADER_SIZE:] == payload


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_truncated_or_extended_is_an_error(msg: RelayMessage) -> None:
    payload = encode_relay(msg)
    for cut in range(len(payload)):
        with pytest.raises(RemoteProtocolError):
            decode_relay(payload[:cut])
    with pytest.raises(RemoteProtocolError):
        decode_relay(payload + b"\0")


def test_oversized_unknown_and_bad_fields() -> None:
    with pytest.raises(RemoteProtocolError, match="relay payload"):
        decode_relay(bytes([7]) + bytes(MAX_RELAY_PAYLOAD))
    for kind in (0, 8, 255):
        with pytest.raises(RemoteProtocolError, match="unknown"):
            decode_relay(bytes([kind]))
    bad_family = bytes([2]) + (600).to_bytes(4, "big") + bytes([5]) + bytes(5) + b"\0\1"
    with pytest.raises(RemoteProtocolError, match="address"):
        decode_relay(bad_family)
    bad_utf8 = bytes([3, 1, 0, 2]) + b"\xff\xfe"
    with pytest.raises(RemoteProtocolError):
        decode_relay(bad_utf8)
    with pytest.raises(ValueError, match="32 bytes"):
        Connect(b"short")
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6"):
        Reserved(1, "not-an-ip", 1)
    with pytest.raises(ValueError, match="longer than"):
        Refused(1, "x" * (MAX_REFUSE_TEXT + 1))


def test_garbage_never_escapes_as_another_error() -> None:
    rng = random.Random(16)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 130))
        if data:
            data = bytes([rng.randrange(1, 8)]) + data[1:]
        try:
            msg = decode_relay(data)
        except RemoteProtocolError:
            continue
        assert encode_relay(msg) == data  # whatever decodes is canonical
