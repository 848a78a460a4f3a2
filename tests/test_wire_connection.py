"""Two PeerConnections joined in memory: handshake, every message both ways, and failures."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey
from support.access import access_key, access_keys

from dhtshare.errors import LocalProtocolError, RemoteProtocolError
from dhtshare.wire import (
    MAX_BLOCK,
    TRANSITIONS,
    Bitfield,
    Cancel,
    ConnectionClosed,
    Event,
    FrameDecoder,
    FrameType,
    GetHashes,
    HandshakeComplete,
    HashList,
    Have,
    Input,
    Keepalive,
    Message,
    PeerConnection,
    Piece,
    Reason,
    Reject,
    Request,
    Role,
    State,
    encode_frame,
)
from dhtshare.wire.suites import AEADS

GROUP = b"\x11" * 32
CONTENT = b"\x22" * 32
CLIENT_KEY = SigningKey(b"\x01" * 32)
SERVER_KEY = SigningKey(b"\x02" * 32)

MESSAGES: list[Message] = [
    Keepalive(),
    Bitfield.from_pieces(20, [1, 2, 19]),
    Have(4),
    Request(4, 0, MAX_BLOCK),
    Piece(4, 0, bytes(range(256)) * 1024),
    Cancel(4, 0, MAX_BLOCK),
    GetHashes(0, 3),
    HashList(0, (b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32)),
]


class ConnectionPair:
    """A client and a server whose bytes are carried by hand, in either chunking."""

    def __init__(self, chunk: int = 0) -> None:
        self.client = PeerConnection(
            Role.CLIENT,
            CLIENT_KEY,
            group_id=GROUP,
            content_id=CONTENT,
            access_key=access_key(GROUP),
        )
        self.server = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=access_keys(GROUP))
        self.chunk = chunk

    def peer(self, conn: PeerConnection) -> PeerConnection:
        return self.server if conn is self.client else self.client

    def deliver(self, to: PeerConnection, data: bytes) -> list[Event]:
        """Feed ``data`` to ``to`` (whole, or ``chunk`` bytes at a time); return its events."""
        events: list[Event] = []
        step = self.chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            to.receive_data(data[i : i + step])
            while (event := to.next_event()) is not None:
                events.append(event)
        return events

    def handshake(self) -> tuple[list[Event], list[Event]]:
        server_events = self.deliver(self.server, self.client.initiate())
        client_events = self.deliver(self.client, self.server.data_to_send())
        server_events += self.deliver(self.server, self.client.data_to_send())
        return client_events, server_events

    def send(self, sender: PeerConnection, *msgs: Message) -> list[Event]:
        data = b"".join(sender.send(m) for m in msgs)
        return self.deliver(self.peer(sender), data)


@pytest.fixture(params=[0, 1, 7, 65536], ids=["whole", "bytewise", "chunk7", "chunk64k"])
def pair(request: pytest.FixtureRequest) -> ConnectionPair:
    return ConnectionPair(chunk=request.param)


def open_pair() -> ConnectionPair:
    p = ConnectionPair()
    p.handshake()
    return p


def test_handshake(pair: ConnectionPair) -> None:
    assert (pair.client.state, pair.server.state) == (State.IDLE, State.AWAIT_HELLO)
    client_events, server_events = pair.handshake()
    assert client_events == [HandshakeComplete(bytes(SERVER_KEY.verify_key), GROUP, CONTENT)]
    assert server_events == [HandshakeComplete(bytes(CLIENT_KEY.verify_key), GROUP, CONTENT)]
    assert pair.client.state is State.OPEN
    assert pair.server.state is State.OPEN
    assert pair.client.data_to_send() == b""
    assert pair.server.data_to_send() == b""


def test_every_message_both_directions(pair: ConnectionPair) -> None:
    pair.handshake()
    assert pair.send(pair.client, *MESSAGES) == MESSAGES
    assert pair.send(pair.server, *MESSAGES) == MESSAGES
    # and interleaved, many times, so the nonce counters keep in step
    for _ in range(3):
        assert pair.send(pair.client, Have(1)) == [Have(1)]
        assert pair.send(pair.server, Have(2), Have(3)) == [Have(2), Have(3)]


def test_client_may_pipeline_messages_behind_client_auth() -> None:
    p = ConnectionPair()
    p.deliver(p.server, p.client.initiate())
    [done] = p.deliver(p.client, p.server.data_to_send())
    assert isinstance(done, HandshakeComplete)
    # send() puts the queued ClientAuth in front of the message
    data = p.client.send(Request(0, 0, 16))
    assert p.client.data_to_send() == b""
    events = p.deliver(p.server, data)
    assert [type(e) for e in events] == [HandshakeComplete, Request]


def test_frames_are_encrypted() -> None:
    p = open_pair()
    secret = b"piece data that must not appear on the wire" * 10
    data = p.client.send(Piece(0, 0, secret))
    assert secret[:20] not in data
    assert data[4] == FrameType.SEALED


def test_sealed_frame_size() -> None:
    p = open_pair()
    data = p.server.send(Piece(0, 0, bytes(MAX_BLOCK)))
    suite = p.server.suite
    assert suite is not None and suite is p.client.suite
    assert len(data) == 5 + 1 + 4 + 4 + MAX_BLOCK + AEADS[suite].tag_size


# -- state rules -------------------------------------------------------------------


def test_send_before_handshake_is_a_local_error() -> None:
    p = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="SEND_MESSAGE not allowed"):
        p.client.send(Have(0))
    p.client.initiate()
    with pytest.raises(LocalProtocolError):
        p.client.send(Have(0))
    with pytest.raises(LocalProtocolError):
        p.client.initiate()
    with pytest.raises(LocalProtocolError):
        p.server.initiate()


def test_server_may_not_send_before_client_auth() -> None:
    p = ConnectionPair()
    p.deliver(p.server, p.client.initiate())
    assert p.server.state is State.AWAIT_AUTH
    with pytest.raises(LocalProtocolError):
        p.server.send(Have(0))


def test_constructor_checks_role_arguments() -> None:
    key = access_key(GROUP)
    with pytest.raises(ValueError, match="needs group_id"):
        PeerConnection(Role.CLIENT, CLIENT_KEY)
    with pytest.raises(ValueError, match="access_key"):
        PeerConnection(Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT)
    with pytest.raises(ValueError, match="32 bytes"):
        PeerConnection(Role.CLIENT, CLIENT_KEY, group_id=b"x", content_id=CONTENT, access_key=key)
    with pytest.raises(ValueError, match="access_key must be 32 bytes"):
        PeerConnection(
            Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, access_key=key[:31]
        )
    with pytest.raises(ValueError, match="learns group_id"):
        PeerConnection(Role.SERVER, SERVER_KEY, group_id=GROUP, access_keys=access_keys(GROUP))
    with pytest.raises(ValueError, match="needs access_keys"):
        PeerConnection(Role.SERVER, SERVER_KEY)


def test_sealed_frame_before_handshake_is_refused() -> None:
    p = open_pair()
    stray = p.client.send(Have(0))
    fresh = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=access_keys(GROUP))
    fresh.receive_data(stray)
    with pytest.raises(RemoteProtocolError, match="RECV_SEALED not allowed") as info:
        fresh.next_event()
    assert info.value.reason == Reason.PROTOCOL


def test_second_client_hello_is_refused() -> None:
    p = ConnectionPair()
    hello = p.client.initiate()
    p.deliver(p.server, hello)
    with pytest.raises(RemoteProtocolError, match="RECV_CLIENT_HELLO not allowed"):
        p.deliver(p.server, hello)


def test_unknown_frame_type_is_refused() -> None:
    p = open_pair()
    with pytest.raises(RemoteProtocolError, match="unknown frame type") as info:
        p.deliver(p.server, encode_frame(42, b""))
    assert info.value.reason == Reason.PROTOCOL


def test_plaintext_reject_after_handshake_is_refused() -> None:
    p = open_pair()
    plain = encode_frame(FrameType.REJECT, b"\x08\x00\x01\x00\x00")
    with pytest.raises(RemoteProtocolError, match="RECV_PLAIN_REJECT not allowed"):
        p.deliver(p.client, plain)


def test_table_names_every_role_and_state() -> None:
    for role in Role:
        for state in State:
            if (role, state) in TRANSITIONS:
                continue
            # states a role never reaches
            assert (role, state) in {
                (Role.CLIENT, State.AWAIT_HELLO),
                (Role.CLIENT, State.AWAIT_AUTH),
                (Role.SERVER, State.IDLE),
                (Role.SERVER, State.HELLO_SENT),
            }
    for row in TRANSITIONS.values():
        assert Input.SEND_MESSAGE not in row or row[Input.SEND_MESSAGE] is State.OPEN


# -- tampering, replay, reordering -------------------------------------------------


def sealed_frames(data: bytes) -> list[bytes]:
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(encode_frame(*frame))
    return out


def drain(conn: PeerConnection) -> list[Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def expect_remote_error(conn: PeerConnection, data: bytes, reason: Reason) -> None:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(conn)
    assert info.value.reason == reason
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):  # the error sticks
        conn.next_event()


@pytest.mark.parametrize("offset", [0, 3, 4, 5, 6, 15, -1])
def test_tampered_frame_is_refused(offset: int) -> None:
    p = open_pair()
    frame = bytearray(p.client.send(Request(1, 2, 3)))
    frame[offset] ^= 0x02
    reason = Reason.FRAME_TOO_LARGE if offset == 0 else Reason.DECRYPT_FAILED
    if offset == 4:
        reason = Reason.PROTOCOL  # the type byte now names an unknown frame type
    if offset == 3:
        # a longer announced length: the frame is incomplete until EOF
        p.server.receive_data(bytes(frame))
        assert p.server.next_event() is None
        expect_remote_error(p.server, b"", Reason.TRUNCATED)
        return
    expect_remote_error(p.server, bytes(frame), reason)


def test_replayed_frame_is_refused() -> None:
    p = open_pair()
    frame = p.client.send(Have(7))
    assert p.deliver(p.server, frame) == [Have(7)]
    expect_remote_error(p.server, frame, Reason.DECRYPT_FAILED)


def test_reordered_frames_are_refused() -> None:
    p = open_pair()
    first, second = p.client.send(Have(1)), p.client.send(Have(2))
    expect_remote_error(p.server, second + first, Reason.DECRYPT_FAILED)


def test_dropped_frame_is_refused() -> None:
    p = open_pair()
    p.client.send(Have(1))
    expect_remote_error(p.server, p.client.send(Have(2)), Reason.DECRYPT_FAILED)


def test_frame_reflected_back_to_its_sender_is_refused() -> None:
    p = open_pair()
    frame = p.client.send(Have(1))
    expect_remote_error(p.client, frame, Reason.DECRYPT_FAILED)


def test_frame_from_another_session_is_refused() -> None:
    a, b = open_pair(), open_pair()
    expect_remote_error(b.server, a.client.send(Have(1)), Reason.DECRYPT_FAILED)


def test_sealed_garbage_is_refused() -> None:
    p = open_pair()
    expect_remote_error(p.server, encode_frame(FrameType.SEALED, b"short"), Reason.DECRYPT_FAILED)


# -- reject, close, EOF --------------------------------------------------------------


def test_sealed_reject_after_handshake() -> None:
    p = open_pair()
    events = p.send(p.server, Reject(Reason.NOT_MEMBER, "not a member"))
    assert events == [Reject(Reason.NOT_MEMBER, "not a member")]
    assert p.server.state is State.CLOSED
    assert p.client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        p.server.send(Have(0))
    with pytest.raises(LocalProtocolError):
        p.client.send(Reject(1))
    # after CLOSED, bytes still in flight are discarded; EOF gives ConnectionClosed
    p.client.receive_data(b"\xff" * 100)
    assert p.client.next_event() is None
    p.client.receive_data(b"")
    assert p.client.next_event() == ConnectionClosed()
    assert p.client.next_event() == ConnectionClosed()


def test_reject_after_remote_error_is_plaintext_before_keys() -> None:
    p = ConnectionPair()
    p.client.initiate()
    p.client.receive_data(encode_frame(FrameType.SERVER_HELLO, bytes(128)))
    with pytest.raises(RemoteProtocolError) as info:
        p.client.next_event()
    reject = Reject(info.value.reason, str(info.value))
    data = p.client.send(reject)
    assert data[4] == FrameType.REJECT
    assert p.client.state is State.CLOSED
    # the server, which answered the hello, accepts the plaintext Reject
    server = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=access_keys(GROUP))
    client = PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, access_key=access_key(GROUP)
    )
    server.receive_data(client.initiate())
    assert server.next_event() is None
    server.receive_data(data)
    assert server.next_event() == reject
    assert server.state is State.CLOSED


def test_server_rejects_bad_hello_in_plaintext_and_client_reads_it() -> None:
    p = ConnectionPair()
    p.client.initiate()
    server = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=access_keys(GROUP))
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, b"NOTMAGIC" + bytes(145)))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    data = server.send(Reject(info.value.reason, str(info.value)))
    assert data[4] == FrameType.REJECT
    assert p.deliver(p.client, data) == [Reject(Reason.BAD_MAGIC, str(info.value))]
    assert p.client.state is State.CLOSED


def test_a_client_auth_that_does_not_open_is_answered_in_plaintext() -> None:
    # As to a prober that holds no access key: the server has no session keys yet, and
    # the client (already OPEN) takes no plaintext frame.
    p = ConnectionPair()
    p.deliver(p.server, p.client.initiate())
    p.deliver(p.client, p.server.data_to_send())
    auth = bytearray(p.client.data_to_send())
    auth[-1] ^= 1
    with pytest.raises(RemoteProtocolError) as info:
        p.deliver(p.server, bytes(auth))
    assert info.value.reason == Reason.DECRYPT_FAILED
    data = p.server.send(Reject(info.value.reason, str(info.value)))
    assert data[4] == FrameType.REJECT
    with pytest.raises(RemoteProtocolError):
        p.deliver(p.client, data)


def test_a_refused_client_auth_that_opened_is_rejected_sealed() -> None:
    # The client holds the access key of GROUP but names another group in its ClientAuth:
    # the server, which has the session keys once the ClientAuth opened, says why, sealed.
    p = ConnectionPair()
    p.client = PeerConnection(
        Role.CLIENT,
        CLIENT_KEY,
        group_id=bytes(32),
        content_id=CONTENT,
        access_key=access_key(GROUP),
    )
    p.deliver(p.server, p.client.initiate())
    p.deliver(p.client, p.server.data_to_send())
    with pytest.raises(RemoteProtocolError) as info:
        p.deliver(p.server, p.client.data_to_send())
    assert info.value.reason == Reason.NOT_MEMBER
    data = p.server.send(Reject(info.value.reason))
    assert data[4] == FrameType.SEALED
    assert p.deliver(p.client, data) == [Reject(Reason.NOT_MEMBER)]


def test_membership_reject_reaches_the_client() -> None:
    p = ConnectionPair()
    p.deliver(p.server, p.client.initiate())
    p.deliver(p.client, p.server.data_to_send())
    # the client pipelines a request right behind its ClientAuth
    [done, request] = p.deliver(p.server, p.client.send(Request(0, 0, 10)))
    assert isinstance(done, HandshakeComplete)
    assert request == Request(0, 0, 10)
    assert p.send(p.server, Reject(Reason.NOT_MEMBER)) == [Reject(Reason.NOT_MEMBER)]


def test_eof_at_frame_boundary(pair: ConnectionPair) -> None:
    pair.handshake()
    data = pair.client.send(Have(3))
    pair.server.receive_data(data)
    pair.server.receive_data(b"")
    assert pair.server.next_event() == Have(3)
    assert pair.server.next_event() == ConnectionClosed()
    assert pair.server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.server.receive_data(b"more")
    pair.server.receive_data(b"")  # a second EOF is harmless


def test_eof_inside_a_frame_is_truncation() -> None:
    p = open_pair()
    data = p.client.send(Have(3))
    p.server.receive_data(data[:-1])
    assert p.server.next_event() is None
    expect_remote_error(p.server, b"", Reason.TRUNCATED)


@pytest.mark.parametrize("role", list(Role))
def test_eof_during_handshake(role: Role) -> None:
    p = ConnectionPair()
    conn = p.client if role is Role.CLIENT else p.server
    if role is Role.CLIENT:
        conn.initiate()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.state is State.CLOSED


def test_close_discards_input_and_refuses_sends() -> None:
    p = open_pair()
    frame = p.client.send(Have(1))
    p.server.close()
    p.server.receive_data(frame)
    assert p.server.next_event() is None
    with pytest.raises(LocalProtocolError):
        p.server.send(Reject(Reason.SHUTDOWN))


def test_input_received_after_close_is_dropped() -> None:
    p = open_pair()
    p.client.close()
    room = p.client.get_buffer(1024)
    frame = p.server.send(Piece(0, 0, b"late"))
    room[: len(frame)] = frame
    p.client.buffer_updated(len(frame))
    assert p.client.buffered == 0
    assert p.client.next_event() is None
