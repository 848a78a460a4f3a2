"""The PUNCH frame payloads (wire/punch.py): exact bytes, bounds, and strict decoding."""

from __future__ import annotations

import random

import pytest

from dhtshare.errors import RemoteProtocolError
from dhtshare.wire.frames import MAX_HANDSHAKE_FRAME, FrameDecoder, FrameType
from dhtshare.wire.punch import (
    MAX_PUNCH_ADDRESSES,
    PunchConnect,
    PunchSync,
    decode_punch,
    encode_punch,
    punch_frame,
)


def test_exact_bytes() -> None:
    assert encode_punch(PunchSync()) == b"\x01"
    msg = PunchConnect((("10.200.0.11", 4001),))
    assert encode_punch(msg) == b"\x00\x01\x04\x0a\xc8\x00\x0b\x0f\xa1"
    v6 = PunchConnect((("::1", 80),))
    assert encode_punch(v6) == b"\x00\x01\x10" + bytes(15) + b"\x01\x00\x50"


def test_round_trip_and_frame() -> None:
    msg = PunchConnect((("192.0.2.1", 1), ("2001:db8::7", 65535)))
    assert decode_punch(encode_punch(msg)) == msg
    assert decode_punch(encode_punch(PunchSync())) == PunchSync()
    decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)
    decoder.feed(punch_frame(msg))
    assert decoder.next_frame() == (FrameType.PUNCH, encode_punch(msg))


def test_the_biggest_message_fits_a_handshake_frame() -> None:
    biggest = PunchConnect(tuple((f"2001:db8::{i + 1}", 65535) for i in range(MAX_PUNCH_ADDRESSES)))
    assert len(encode_punch(biggest)) <= MAX_HANDSHAKE_FRAME


@pytest.mark.parametrize(
    "addresses",
    [
        (),
        tuple(("10.0.0.1", 1000 + i) for i in range(MAX_PUNCH_ADDRESSES + 1)),
        (("example.org", 80),),
        (("10.0.0.1", 0),),
        (("10.0.0.1", 65536),),
    ],
)
def test_bad_messages_are_not_built(addresses: tuple[tuple[str, int], ...]) -> None:
    with pytest.raises(ValueError, match=r"addresses|does not appear|port"):
        PunchConnect(addresses)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x02",  # unknown kind
        b"\x01\x00",  # a sync with trailing bytes
        b"\x00\x00",  # no address
        b"\x00" + bytes([MAX_PUNCH_ADDRESSES + 1]) + b"\x04\x0a\x00\x00\x01\x00\x50" * 9,
        b"\x00\x01\x05\x0a\x00\x00\x01\x00\x50",  # an address of 5 bytes
        b"\x00\x01\x04\x0a\x00\x00\x01\x00\x00",  # port 0
        b"\x00\x01\x04\x0a\x00\x00\x01\x00",  # short
        b"\x00\x01\x04\x0a\x00\x00\x01\x00\x50\x00",  # trailing
        b"\x01" * (MAX_HANDSHAKE_FRAME + 1),
    ],
)
def test_malformed_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_punch(payload)


def test_random_bytes_decode_or_fail_cleanly() -> None:
    rng = random.Random(16)
    for _ in range(5000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        if rng.random() < 0.5 and data:
            data = bytes([rng.randrange(2)]) + data[1:]
        try:
            msg = decode_punch(data)
        except RemoteProtocolError:
            continue
        assert encode_punch(msg) == data
