"""Frames and messages: the parsers three ways, strictness, limits."""

from __future__ import annotations

import struct

import pytest

from dhtshare.errors import RemoteProtocolError
from dhtshare.wire import (
    MAX_BLOCK,
    MAX_FRAME,
    MAX_HASHES,
    MAX_PIECES,
    Bitfield,
    Cancel,
    FrameDecoder,
    GetHashes,
    HashList,
    Have,
    Keepalive,
    Message,
    MessageType,
    Piece,
    Reason,
    Reject,
    Request,
    decode_message,
    encode_frame,
    encode_message,
)
from dhtshare.wire.frames import FrameType, peek_header, take_frame
from dhtshare.wire.suites import AEADS

FRAMES = [(1, b""), (4, b"hello"), (2, bytes(range(256)) * 3), (5, b"\x00" * 70000)]
STREAM = b"".join(encode_frame(t, p) for t, p in FRAMES)


def drain(dec: FrameDecoder) -> list[tuple[int, bytes]]:
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame)
    return out


def test_frames_whole_input() -> None:
    dec = FrameDecoder()
    dec.feed(STREAM)
    assert drain(dec) == FRAMES
    assert dec.buffered == 0


def test_frames_one_byte_at_a_time() -> None:
    dec = FrameDecoder()
    got = []
    for i in range(len(STREAM)):
        dec.feed(STREAM[i : i + 1])
        got += drain(dec)
    assert got == FRAMES
    assert dec.buffered == 0


def test_frames_with_trailing_bytes() -> None:
    tail = encode_frame(4, b"next frame")[:-3]
    dec = FrameDecoder()
    dec.feed(STREAM + tail)
    assert drain(dec) == FRAMES
    assert dec.buffered == len(tail)
    dec.feed(b"ame")
    assert dec.next_frame() == (4, b"next frame")


def test_frames_in_uneven_chunks_compact_the_buffer() -> None:
    stream = STREAM * 5
    dec = FrameDecoder()
    got = []
    for i in range(0, len(stream), 9999):
        dec.feed(memoryview(stream)[i : i + 9999])
        got += drain(dec)
    assert got == FRAMES * 5


def test_frame_header_over_maximum_fails_before_payload_arrives() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">IB", MAX_FRAME + 1, 4))
    with pytest.raises(RemoteProtocolError) as info:
        dec.next_frame()
    assert info.value.reason == Reason.FRAME_TOO_LARGE


def test_frame_of_exactly_maximum_is_accepted() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(4, bytes(MAX_FRAME)))
    frame = dec.next_frame()
    assert frame is not None
    assert len(frame[1]) == MAX_FRAME


def test_encode_frame_refuses_oversize() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(4, bytes(MAX_FRAME + 1))


# -- messages --------------------------------------------------------------------

MESSAGES: list[Message] = [
    Keepalive(),
    Bitfield(0, b""),
    Bitfield(10, b"\xff\xc0"),
    Bitfield.from_pieces(17, [0, 5, 16]),
    Have(0),
    Have(0xFFFFFFFF),
    Request(3, 16384, MAX_BLOCK),
    Piece(7, 0, b"x"),
    Piece(7, 16384, memoryview(b"a view is sent without a copy")),
    Piece(7, 262144, bytes(range(256)) * 1024),
    Cancel(3, 16384, 1),
    GetHashes(0, MAX_HASHES),
    HashList(5, (b"\x01" * 32, b"\x02" * 32)),
    Reject(Reason.NOT_MEMBER, "not a member of this group: ünïcode"),
    Reject(0),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_roundtrip(msg: Message) -> None:
    data = encode_message(msg)
    assert data[0] == MessageType[_type_name(msg)]
    assert decode_message(data) == msg


def _type_name(msg: Message) -> str:
    return {"GetHashes": "GET_HASHES", "HashList": "HASH_LIST"}.get(
        type(msg).__name__, type(msg).__name__.upper()
    )


@pytest.mark.parametrize("msg", [m for m in MESSAGES if not isinstance(m, Piece)])
def test_message_with_trailing_byte_is_refused(msg: Message) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(encode_message(msg) + b"\x00")
    assert info.value.reason == Reason.PROTOCOL


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused(msg: Message) -> None:
    data = encode_message(msg)
    # A shorter Piece is still a Piece (with less data), so cut only its header.
    cuts = range(10) if isinstance(msg, Piece) else range(len(data))
    for cut in cuts:
        with pytest.raises(RemoteProtocolError):
            decode_message(data[:cut])


def test_piece_data_is_a_view_not_a_copy() -> None:
    data = encode_message(Piece(1, 2, b"abc" * 1000))
    msg = decode_message(data)
    assert isinstance(msg, Piece)
    assert isinstance(msg.data, memoryview)
    assert msg.data.obj is data
    assert "data" not in repr(msg)


def test_bitfield_helpers() -> None:
    bf = Bitfield.from_pieces(12, [0, 3, 11])
    assert bf.bits == b"\x90\x10"
    assert bf.pieces() == [0, 3, 11]
    assert bf.has(3)
    assert not bf.has(4)
    assert not bf.has(12)
    assert not bf.has(-1)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (struct.pack(">BI", MessageType.BITFIELD, 9) + b"\xff\x80", None),  # valid
        (struct.pack(">BI", MessageType.BITFIELD, 9) + b"\xff\x40", "spare"),
        (struct.pack(">BI", MessageType.BITFIELD, 9) + b"\xff", "short"),
        (struct.pack(">BI", MessageType.BITFIELD, MAX_PIECES + 1), "too large"),
        (struct.pack(">BIII", MessageType.REQUEST, 0, 0, 0), "zero length"),
        (struct.pack(">BIII", MessageType.REQUEST, 0, 0, MAX_BLOCK + 1), "too long"),
        (struct.pack(">BII", MessageType.GET_HASHES, 0, 0), "zero"),
        (struct.pack(">BII", MessageType.GET_HASHES, 0, MAX_HASHES + 1), "too many"),
        (struct.pack(">BII", MessageType.GET_HASHES, 0xFFFFFFFF, 2), "wraps"),
        (struct.pack(">BII", MessageType.HASH_LIST, 0, 0), "empty"),
        (struct.pack(">BII", MessageType.HASH_LIST, 0, 2) + b"\x00" * 63, "short"),
        (struct.pack(">BII", MessageType.PIECE, 0, 0), "empty piece"),
        (struct.pack(">BII", MessageType.PIECE, 0, 0) + bytes(MAX_BLOCK + 1), "big piece"),
        (struct.pack(">BHH", MessageType.REJECT, 1, 2) + b"\xff\xfe", "bad utf-8"),
        (bytes([99]), "unknown type"),
        (b"", "empty"),
    ],
)
def test_malformed_messages(body: bytes, why: str | None) -> None:
    if why is None:
        assert decode_message(body) == Bitfield(9, b"\xff\x80")
        return
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(body)
    assert info.value.reason == Reason.PROTOCOL


@pytest.mark.parametrize(
    "make",
    [
        lambda: Bitfield(9, b"\xff"),
        lambda: Bitfield(9, b"\xff\x01"),
        lambda: Have(-1),
        lambda: Have(1 << 32),
        lambda: Request(0, 0, MAX_BLOCK + 1),
        lambda: Cancel(0, 0, 0),
        lambda: Piece(0, 0, b""),
        lambda: GetHashes(0, 0),
        lambda: HashList(0, ()),
        lambda: HashList(0, (b"short",)),
        lambda: HashList(0, (bytes(32),) * (MAX_HASHES + 1)),
        lambda: Reject(70000),
        lambda: Reject(1, "x" * 257),
    ],
)
def test_invalid_messages_cannot_be_built(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        make()


def test_hashlist_chunks_fit_a_frame() -> None:
    hashes = [i.to_bytes(32, "big") for i in range(MAX_HASHES * 2 + 5)]
    chunks = HashList.chunks(100, hashes)
    assert [(c.start, len(c.hashes)) for c in chunks] == [
        (100, MAX_HASHES),
        (100 + MAX_HASHES, MAX_HASHES),
        (100 + 2 * MAX_HASHES, 5),
    ]
    assert [h for c in chunks for h in c.hashes] == hashes
    assert all(len(encode_message(c)) < MAX_FRAME for c in chunks)


def test_largest_messages_fit_a_sealed_frame() -> None:
    tag = max(aead.tag_size for aead in AEADS.values())  # AEGIS-128L: 32
    biggest: list[Message] = [
        Bitfield(MAX_PIECES, bytes(MAX_PIECES // 8)),
        Piece(0, 0, bytes(MAX_BLOCK)),
        HashList(0, (bytes(32),) * MAX_HASHES),
    ]
    assert all(len(encode_message(m)) + tag <= MAX_FRAME for m in biggest)


def test_receiving_into_the_decoder_gives_the_same_frames() -> None:
    stream = STREAM * 3
    dec = FrameDecoder()
    got = []
    pos = 0
    while pos < len(stream):
        room = dec.get_buffer(7777)
        n = min(len(room), 7777, len(stream) - pos)
        room[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        got += drain(dec)
    assert got == FRAMES * 3
    assert dec.buffered == 0


def test_a_view_still_out_never_blocks_the_buffer() -> None:
    # asyncio holds the view while it calls buffer_updated; growing or compacting
    # must not resize a bytearray that has exports (that raises BufferError).
    dec = FrameDecoder()
    held = dec.get_buffer(10)
    held[:5] = encode_frame(4, b"")[:5]
    dec.buffer_updated(5)
    big = encode_frame(4, bytes(300_000))
    dec.feed(big)  # grows while `held` is alive
    assert dec.next_frame() == (4, b"")
    assert dec.next_frame() == (4, bytes(300_000))
    dec.feed(b"\x00")  # compacts while `held` is alive
    assert dec.buffered == 1
    held.release()


def test_buffer_updated_beyond_the_room_is_refused() -> None:
    dec = FrameDecoder()
    room = len(dec.get_buffer(16))
    with pytest.raises(ValueError, match="do not fit"):
        dec.buffer_updated(room + 1)


def test_peek_header_and_take_frame() -> None:
    """A reader that decides by a frame's type before taking it (first frames, punch
    frames): nothing is taken until the frame is all there."""
    frame = encode_frame(FrameType.PUNCH, b"abc")
    buf = bytearray(frame[:4])
    assert peek_header(buf) is None and take_frame(buf) is None
    buf = bytearray(frame[:6])
    assert peek_header(buf) == (FrameType.PUNCH, 3)
    assert take_frame(buf) is None and buf == frame[:6]
    buf = bytearray(frame + b"rest")
    assert take_frame(buf) == (FrameType.PUNCH, b"abc")
    assert buf == b"rest"
