"""Garbage in: any bytes give frames, events or RemoteProtocolError, and nothing else."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from support.access import access_key, access_keys

from dhtshare.errors import RemoteProtocolError
from dhtshare.wire import (
    MAX_FRAME,
    Bitfield,
    ConnectionClosed,
    Event,
    FrameDecoder,
    FrameType,
    HandshakeComplete,
    Have,
    Message,
    PeerConnection,
    Piece,
    Reject,
    Request,
    Role,
    State,
    decode_message,
    encode_frame,
    encode_message,
)
from dhtshare.wire.handshake import (
    MAGIC,
    VERSION,
    ClientAuth,
    ClientAuthBody,
    ClientHello,
    ServerHello,
    ServerHelloBody,
)

CLIENT_KEY = SigningKey(b"\x01" * 32)
SERVER_KEY = SigningKey(b"\x02" * 32)
GROUP, CONTENT = b"\x11" * 32, b"\x22" * 32

fuzz = settings(
    derandomize=True,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

chunks = st.lists(st.binary(max_size=300), max_size=12)
# Frames with a plausible header, so the fuzzer gets past the length check.
frames = st.builds(encode_frame, st.sampled_from([*FrameType, 0, 6, 255]), st.binary(max_size=300))
frame_streams = st.lists(st.one_of(frames, st.binary(max_size=40)), max_size=8)


def feed_all(conn: PeerConnection, pieces: list[bytes], eof: bool) -> list[Event]:
    """Feed every piece; return the events, stopping at the first RemoteProtocolError."""
    events: list[Event] = []
    try:
        # a b"" piece is an early EOF; both EOF outcomes below end the loop
        for piece in [*pieces, b""] if eof else pieces:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not None:
                events.append(event)
                if isinstance(event, ConnectionClosed):
                    return events
    except RemoteProtocolError as exc:
        error = exc
    else:
        return events
    assert isinstance(error.reason, int)
    # the adapter's answer to any remote error must always be possible
    assert states_around(conn, Reject(error.reason, str(error)[:200])) == (
        State.ERROR,
        State.CLOSED,
    )
    return events


def states_around(conn: PeerConnection, msg: Message) -> tuple[State, State]:
    """The state before and after sending ``msg``."""
    before = conn.state
    conn.send(msg)
    return before, conn.state


def client() -> PeerConnection:
    return PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, access_key=access_key(GROUP)
    )


def server() -> PeerConnection:
    return PeerConnection(Role.SERVER, SERVER_KEY, access_keys=access_keys(GROUP))


def open_pair() -> tuple[PeerConnection, PeerConnection]:
    c, s = client(), server()
    s.receive_data(c.initiate())
    assert s.next_event() is None
    c.receive_data(s.data_to_send())
    assert isinstance(c.next_event(), HandshakeComplete)
    s.receive_data(c.data_to_send())
    assert isinstance(s.next_event(), HandshakeComplete)
    return c, s


@fuzz
@given(chunks)
def test_frame_decoder_takes_any_bytes(pieces: list[bytes]) -> None:
    dec = FrameDecoder()
    try:
        for piece in pieces:
            dec.feed(piece)
            while (frame := dec.next_frame()) is not None:
                frame_type, payload = frame
                assert 0 <= frame_type <= 255
                assert len(payload) <= MAX_FRAME
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=2000))), st.data())
def test_frame_decoder_roundtrips_any_chunking(
    sent: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        dec.feed(stream[a:b])
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert got == sent
    assert dec.buffered == 0


@fuzz
@given(st.binary(max_size=400))
def test_decode_message_takes_any_bytes(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except RemoteProtocolError:
        return
    assert encode_message(msg) == data  # whatever decodes is canonical


HANDSHAKE_PARSERS = [ClientHello, ServerHello, ServerHelloBody, ClientAuth, ClientAuthBody]


@fuzz
@given(st.sampled_from(HANDSHAKE_PARSERS), st.binary(max_size=300), st.data())
def test_handshake_parsers_take_any_bytes(
    parser: type[ClientHello], data: bytes, draw: st.DataObject
) -> None:
    # Also bytes of the right length (with the right magic), so the fuzzer gets past it.
    size = {ClientHello: 90, ServerHello: 145, ServerHelloBody: 97, ClientAuth: 176}
    sized = draw.draw(st.binary(min_size=size.get(parser, 160), max_size=size.get(parser, 160)))
    if parser is ClientHello:
        sized = MAGIC + bytes([VERSION]) + sized[9:]
    for raw in (data, sized):
        try:
            msg = parser.decode(raw)
        except RemoteProtocolError:
            continue
        assert msg.encode() == raw  # whatever decodes is canonical


@fuzz
@given(st.binary(min_size=81, max_size=81), st.binary(max_size=400))
def test_a_server_answers_any_well_formed_hello_alike_and_never_completes(
    body: bytes, auth: bytes
) -> None:
    # Any ClientHello of valid shape: a ServerHello of one length (or a refusal that does
    # not depend on the groups served), and whatever follows gives no session.
    answers = []
    for served in (access_keys(GROUP), access_keys()):
        conn = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=served)
        hello = encode_frame(FrameType.CLIENT_HELLO, MAGIC + bytes([VERSION]) + body)
        conn.receive_data(hello)
        try:
            assert conn.next_event() is None
        except RemoteProtocolError as exc:
            answers.append(exc.reason)
            continue
        reply = conn.data_to_send()
        answers.append(len(reply))
        events = feed_all(conn, [encode_frame(FrameType.CLIENT_AUTH, auth)], eof=True)
        assert not any(isinstance(e, HandshakeComplete) for e in events)
    assert answers[0] == answers[1] and answers[0] in (150, 1, 14)


@fuzz
@given(st.one_of(chunks, frame_streams), st.booleans())
def test_server_before_handshake_takes_any_bytes(pieces: list[bytes], eof: bool) -> None:
    events = feed_all(server(), pieces, eof)
    # no hello was ever signed by a client key we hold, so no handshake completes
    assert not any(isinstance(e, HandshakeComplete) for e in events)


@fuzz
@given(st.one_of(chunks, frame_streams), st.booleans())
def test_client_awaiting_server_hello_takes_any_bytes(pieces: list[bytes], eof: bool) -> None:
    c = client()
    c.initiate()
    events = feed_all(c, pieces, eof)
    assert not any(isinstance(e, HandshakeComplete) for e in events)


@fuzz
@given(st.one_of(chunks, frame_streams), st.booleans())
def test_open_connection_takes_any_bytes(pieces: list[bytes], eof: bool) -> None:
    _, s = open_pair()
    events = feed_all(s, pieces, eof)
    assert all(isinstance(e, ConnectionClosed) for e in events)  # nothing forged gets in


@fuzz
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_open_connection_takes_any_authenticated_plaintext(plaintexts: list[bytes]) -> None:
    # Past the AEAD: arbitrary plaintexts sealed with the real session key.
    c, s = open_pair()
    seal: Callable[[bytes], bytes] = c._cipher.seal  # type: ignore[union-attr]
    events = feed_all(s, [seal(p) for p in plaintexts], eof=False)
    decoded: list[Message] = []
    for p in plaintexts:
        try:
            decoded.append(decode_message(p))
        except RemoteProtocolError:
            break
        if isinstance(decoded[-1], Reject):
            break
    assert events == decoded


@fuzz
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_any_flipped_byte_in_a_session_is_caught(position: int, flip: int) -> None:
    c, s = open_pair()
    stream = bytearray(b"".join(c.send(m) for m in _traffic()))
    position %= len(stream)
    stream[position] ^= flip
    events = feed_all(s, [bytes(stream)], eof=True)
    # Every event delivered is one the client really sent, in order, up to the damage.
    assert events == _traffic()[: len(events)]
    assert len(events) < len(_traffic())


def _traffic() -> list[Message]:
    return [Bitfield.from_pieces(9, [0, 8]), Have(1), Request(1, 0, 100), Piece(1, 0, b"x" * 300)]
