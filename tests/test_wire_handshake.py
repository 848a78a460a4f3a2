"""The handshake: it authenticates both sides, and splices, replays and forgeries fail."""

from __future__ import annotations

import struct
from dataclasses import replace

import nacl.bindings
import nacl.exceptions
import pytest
from nacl.signing import SigningKey

from dhtshare import crypto
from dhtshare.errors import RemoteProtocolError
from dhtshare.wire import FrameDecoder, FrameType, PeerConnection, Reason, Role, State, suites
from dhtshare.wire.frames import encode_frame
from dhtshare.wire.handshake import (
    CLIENT_SIG_PURPOSE,
    MAGIC,
    SERVER_SIG_PURPOSE,
    ClientAuth,
    ClientHandshake,
    ClientHello,
    ServerHandshake,
    ServerHello,
    SessionCipher,
    transcript_hash,
)
from dhtshare.wire.messages import Piece
from dhtshare.wire.suites import Suite, choose, local_suites, mask_of

GROUP = bytes(range(32))
CONTENT = bytes(range(32, 64))
CLIENT_KEY = SigningKey(b"\x01" * 32)
SERVER_KEY = SigningKey(b"\x02" * 32)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame)
    assert dec.buffered == 0
    return out


def one_payload(data: bytes, frame_type: FrameType) -> bytes:
    [(got_type, payload)] = frames(data)
    assert got_type == frame_type
    return payload


def expect_error(conn: PeerConnection, data: bytes, reason: Reason) -> None:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == reason
    assert conn.state is State.ERROR


def test_handshake_halves_agree_on_keys() -> None:
    client = ClientHandshake(CLIENT_KEY, GROUP, CONTENT)
    server = ServerHandshake(SERVER_KEY)
    reply = server.on_client_hello(client.hello.encode())
    got_reply, client_cipher, auth = client.on_server_hello(reply.encode())
    assert got_reply.identity_key == bytes(SERVER_KEY.verify_key)
    hello = server.on_client_auth(auth.encode())
    assert hello.identity_key == bytes(CLIENT_KEY.verify_key)
    assert (hello.group_id, hello.content_id) == (GROUP, CONTENT)
    # one key per direction: what one side seals, only the other side opens
    sealed = client_cipher.seal(b"to server")
    assert server.cipher.open(one_payload(sealed, FrameType.SEALED)) == b"to server"
    sealed = server.cipher.seal(b"to client")
    assert client_cipher.open(one_payload(sealed, FrameType.SEALED)) == b"to client"


def test_client_hello_layout() -> None:
    client = ClientHandshake(CLIENT_KEY, GROUP, CONTENT)
    data = client.hello.encode()
    assert len(data) == 8 + 1 + 4 * 32 + 16 + 1
    assert data[:9] == MAGIC + b"\x02"
    assert data[9:41] == bytes(CLIENT_KEY.verify_key)
    assert data[73:105] == GROUP
    assert data[105:137] == CONTENT
    assert data[153] == mask_of(local_suites())
    assert ClientHello.decode(data) == client.hello


def test_each_session_uses_fresh_ephemeral_keys_and_nonce() -> None:
    a = ClientHandshake(CLIENT_KEY, GROUP, CONTENT).hello
    b = ClientHandshake(CLIENT_KEY, GROUP, CONTENT).hello
    assert a.ephemeral_key != b.ephemeral_key
    assert a.nonce != b.nonce


def test_transcript_binds_every_field() -> None:
    hello = ClientHandshake(CLIENT_KEY, GROUP, CONTENT).hello
    server_id, server_eph = b"\x05" * 32, b"\x06" * 32
    chacha = Suite.CHACHA20_POLY1305
    base = transcript_hash(hello, server_id, server_eph, chacha)
    variants = [
        transcript_hash(hello, b"\x07" * 32, server_eph, chacha),
        transcript_hash(hello, server_id, b"\x07" * 32, chacha),
        transcript_hash(hello, server_id, server_eph, Suite.AEGIS_128L),
    ]
    other = b"\x07" * 32
    variants += [
        transcript_hash(replace(hello, identity_key=other), server_id, server_eph, chacha),
        transcript_hash(replace(hello, ephemeral_key=other), server_id, server_eph, chacha),
        transcript_hash(replace(hello, group_id=other), server_id, server_eph, chacha),
        transcript_hash(replace(hello, content_id=other), server_id, server_eph, chacha),
        transcript_hash(replace(hello, nonce=other[:16]), server_id, server_eph, chacha),
        transcript_hash(replace(hello, suites=hello.suites ^ 0x80), server_id, server_eph, chacha),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


# -- through PeerConnection --------------------------------------------------------


def client_conn(key: SigningKey = CLIENT_KEY) -> PeerConnection:
    return PeerConnection(Role.CLIENT, key, group_id=GROUP, content_id=CONTENT)


def server_conn(key: SigningKey = SERVER_KEY) -> PeerConnection:
    return PeerConnection(Role.SERVER, key)


def server_hello_for(client: PeerConnection, server: PeerConnection) -> bytes:
    server.receive_data(client.initiate())
    assert server.next_event() is None
    return server.data_to_send()


def test_wrong_magic_is_refused() -> None:
    hello = client_conn().initiate()
    bad = hello[:5] + b"BITTORNT" + hello[13:]
    expect_error(server_conn(), bad, Reason.BAD_MAGIC)


def test_wrong_version_is_refused() -> None:
    hello = bytearray(client_conn().initiate())
    hello[5 + 8] = 1  # version 1 (ChaCha20 only, no suite byte) is no longer spoken
    expect_error(server_conn(), bytes(hello), Reason.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("delta", [-1, 1])
def test_client_hello_of_wrong_length_is_refused(delta: int) -> None:
    payload = one_payload(client_conn().initiate(), FrameType.CLIENT_HELLO)
    payload = payload + b"\x00" if delta > 0 else payload[:-1]
    expect_error(server_conn(), encode_frame(FrameType.CLIENT_HELLO, payload), Reason.PROTOCOL)


def test_tampered_server_signature_is_refused() -> None:
    client = client_conn()
    reply = bytearray(server_hello_for(client, server_conn()))
    reply[-1] ^= 0x01
    expect_error(client, bytes(reply), Reason.BAD_SIGNATURE)
    assert client.data_to_send() == b""  # no ClientAuth for a server we did not verify


def test_server_claiming_another_identity_is_refused() -> None:
    client = client_conn()
    reply = ServerHello.decode(
        one_payload(server_hello_for(client, server_conn()), FrameType.SERVER_HELLO)
    )
    forged = ServerHello(bytes(SigningKey(b"\x09" * 32).verify_key), *_rest(reply))
    expect_error(
        client, encode_frame(FrameType.SERVER_HELLO, forged.encode()), Reason.BAD_SIGNATURE
    )


def _rest(reply: ServerHello) -> tuple[bytes, int, bytes]:
    return reply.ephemeral_key, reply.suite, reply.signature


def test_mitm_swapping_the_server_ephemeral_key_is_refused() -> None:
    client = client_conn()
    reply = ServerHello.decode(
        one_payload(server_hello_for(client, server_conn()), FrameType.SERVER_HELLO)
    )
    attacker = ClientHandshake(SigningKey(b"\x09" * 32), GROUP, CONTENT).hello.ephemeral_key
    spliced = ServerHello(reply.identity_key, attacker, reply.suite, reply.signature)
    expect_error(
        client, encode_frame(FrameType.SERVER_HELLO, spliced.encode()), Reason.BAD_SIGNATURE
    )


def test_mitm_swapping_the_client_ephemeral_key_is_refused() -> None:
    # The attacker rewrites the ClientHello so the server keys with the attacker;
    # the server then signs a transcript the real client never saw.
    client = client_conn()
    hello = ClientHello.decode(one_payload(client.initiate(), FrameType.CLIENT_HELLO))
    attacker_eph = ClientHandshake(SigningKey(b"\x09" * 32), GROUP, CONTENT).hello.ephemeral_key
    spliced = replace(hello, ephemeral_key=attacker_eph)
    server = server_conn()
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, spliced.encode()))
    assert server.next_event() is None
    expect_error(client, server.data_to_send(), Reason.BAD_SIGNATURE)


def test_server_hello_replayed_into_another_session_is_refused() -> None:
    old_reply = server_hello_for(client_conn(), server_conn())
    fresh = client_conn()
    fresh.initiate()
    expect_error(fresh, old_reply, Reason.BAD_SIGNATURE)


def test_tampered_client_auth_is_refused() -> None:
    client, server = client_conn(), server_conn()
    client.receive_data(server_hello_for(client, server))
    client.next_event()
    auth = bytearray(client.data_to_send())
    auth[-1] ^= 0x80
    expect_error(server, bytes(auth), Reason.BAD_SIGNATURE)


def test_client_auth_replayed_into_another_session_is_refused() -> None:
    client, server = client_conn(), server_conn()
    hello_frame = client.initiate()
    server.receive_data(hello_frame)
    assert server.next_event() is None
    client.receive_data(server.data_to_send())
    client.next_event()
    old_auth = client.data_to_send()
    # The attacker replays the same ClientHello and ClientAuth to a new server session,
    # which answers with a fresh ephemeral key, so the old signature no longer fits.
    replay_server = server_conn()
    replay_server.receive_data(hello_frame)
    assert replay_server.next_event() is None
    expect_error(replay_server, old_auth, Reason.BAD_SIGNATURE)
    # the genuine session still completes
    server.receive_data(old_auth)
    assert server.next_event() is not None


def test_server_signature_cannot_be_reflected_as_client_auth() -> None:
    # Same identity on both ends: the server's signature must not pass as the client's.
    client, server = client_conn(SERVER_KEY), server_conn(SERVER_KEY)
    reply = ServerHello.decode(
        one_payload(server_hello_for(client, server), FrameType.SERVER_HELLO)
    )
    reflected = ClientAuth(reply.signature)
    expect_error(
        server, encode_frame(FrameType.CLIENT_AUTH, reflected.encode()), Reason.BAD_SIGNATURE
    )
    assert SERVER_SIG_PURPOSE != CLIENT_SIG_PURPOSE


def test_low_order_ephemeral_key_is_refused() -> None:
    hello = ClientHello.decode(one_payload(client_conn().initiate(), FrameType.CLIENT_HELLO))
    zero = replace(hello, ephemeral_key=bytes(32))
    expect_error(
        server_conn(), encode_frame(FrameType.CLIENT_HELLO, zero.encode()), Reason.PROTOCOL
    )


def test_malformed_server_hello_and_client_auth() -> None:
    client = client_conn()
    client.initiate()
    expect_error(client, encode_frame(FrameType.SERVER_HELLO, bytes(128)), Reason.PROTOCOL)
    client, server = client_conn(), server_conn()
    server_hello_for(client, server)
    expect_error(server, encode_frame(FrameType.CLIENT_AUTH, bytes(65)), Reason.PROTOCOL)


def test_garbage_instead_of_a_hello_is_refused() -> None:
    expect_error(server_conn(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Reason.FRAME_TOO_LARGE)
    expect_error(server_conn(), struct.pack(">IB", 3, 99) + b"abc", Reason.PROTOCOL)


# -- cipher suites -------------------------------------------------------------------

CHACHA_ONLY = frozenset({Suite.CHACHA20_POLY1305})
BOTH = frozenset(Suite)


def open_pair(
    client_suites: frozenset[Suite], server_suites: frozenset[Suite]
) -> tuple[PeerConnection, PeerConnection]:
    """A finished handshake between a client and a server offering the given suites."""
    client = PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, suites=client_suites
    )
    server = PeerConnection(Role.SERVER, SERVER_KEY, suites=server_suites)
    client.receive_data(server_hello_for(client, server))
    assert client.next_event() is not None
    server.receive_data(client.data_to_send())
    assert server.next_event() is not None
    return client, server


@pytest.mark.parametrize(
    ("client_suites", "server_suites", "expected"),
    [
        (BOTH, BOTH, Suite.AEGIS_128L),
        (CHACHA_ONLY, BOTH, Suite.CHACHA20_POLY1305),
        (BOTH, CHACHA_ONLY, Suite.CHACHA20_POLY1305),
        (CHACHA_ONLY, CHACHA_ONLY, Suite.CHACHA20_POLY1305),
    ],
)
def test_peers_agree_on_the_fastest_common_suite(
    client_suites: frozenset[Suite], server_suites: frozenset[Suite], expected: Suite
) -> None:
    client, server = open_pair(client_suites, server_suites)
    assert client.suite is server.suite is expected
    block = bytes(range(256)) * 1024
    server.receive_data(client.send(Piece(7, 0, block)))
    assert server.next_event() == Piece(7, 0, block)
    client.receive_data(server.send(Piece(8, 256 * 1024, block)))
    assert client.next_event() == Piece(8, 256 * 1024, block)


def test_suites_seal_differently_under_the_same_session_keys() -> None:
    rx, tx = bytes(range(32)), bytes(range(32, 64))
    frames_out = {
        suite: bytes(SessionCipher(rx, tx, suite).seal(b"same message")) for suite in Suite
    }
    assert len(set(frames_out.values())) == len(frames_out)
    for suite in Suite:  # and each opens only under its own suite
        sealed = one_payload(frames_out[suite], FrameType.SEALED)
        assert SessionCipher(tx, rx, suite).open(sealed) == b"same message"
        other = next(s for s in Suite if s is not suite)
        with pytest.raises(RemoteProtocolError) as info:
            SessionCipher(tx, rx, other).open(sealed)
        assert info.value.reason == Reason.DECRYPT_FAILED


def test_without_aes_hardware_only_chacha_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    # No CPU without AES instructions at hand: make libsodium's AES probe say so.
    def unavailable(*_args: object) -> bytes:
        raise nacl.exceptions.UnavailableError("no AES hardware")

    monkeypatch.setattr(nacl.bindings, "crypto_aead_aes256gcm_encrypt", unavailable)
    suites._has_aes_hardware.cache_clear()
    try:
        assert local_suites() == CHACHA_ONLY
        hello = ClientHandshake(CLIENT_KEY, GROUP, CONTENT).hello
        assert hello.suites == Suite.CHACHA20_POLY1305
    finally:
        suites._has_aes_hardware.cache_clear()
    assert Suite.CHACHA20_POLY1305 in local_suites()


def test_choose_prefers_aegis_and_needs_a_common_suite() -> None:
    assert choose(mask_of(BOTH), BOTH) is Suite.AEGIS_128L
    assert choose(mask_of(BOTH), CHACHA_ONLY) is Suite.CHACHA20_POLY1305
    assert choose(0, BOTH) is None
    assert choose(Suite.AEGIS_128L, CHACHA_ONLY) is None


def test_an_empty_offer_is_refused_locally() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ClientHandshake(CLIENT_KEY, GROUP, CONTENT, frozenset())


def test_client_offering_no_known_suite_is_refused() -> None:
    hello = ClientHello.decode(one_payload(client_conn().initiate(), FrameType.CLIENT_HELLO))
    for mask in (0x00, 0x80):
        unknown = replace(hello, suites=mask)
        expect_error(
            server_conn(),
            encode_frame(FrameType.CLIENT_HELLO, unknown.encode()),
            Reason.NO_COMMON_SUITE,
        )


def test_downgrading_the_suite_breaks_the_server_signature() -> None:
    client = PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, suites=BOTH
    )
    server = PeerConnection(Role.SERVER, SERVER_KEY, suites=BOTH)
    reply = ServerHello.decode(
        one_payload(server_hello_for(client, server), FrameType.SERVER_HELLO)
    )
    assert reply.suite == Suite.AEGIS_128L
    downgraded = replace(reply, suite=Suite.CHACHA20_POLY1305)
    expect_error(
        client, encode_frame(FrameType.SERVER_HELLO, downgraded.encode()), Reason.BAD_SIGNATURE
    )


@pytest.mark.parametrize("chosen", [Suite.AEGIS_128L, 0x00, 0x03, 0xFF])
def test_server_choosing_a_suite_we_did_not_offer_is_refused(chosen: int) -> None:
    # An authentic server that signs a suite outside our offer (or no suite at all):
    # the signature holds, the choice does not.
    client = PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, suites=CHACHA_ONLY
    )
    hello = ClientHello.decode(one_payload(client.initiate(), FrameType.CLIENT_HELLO))
    eph = ClientHandshake(SERVER_KEY, GROUP, CONTENT).hello.ephemeral_key
    server_id = bytes(SERVER_KEY.verify_key)
    th = transcript_hash(hello, server_id, eph, chosen)
    signature = crypto.sign(SERVER_KEY, SERVER_SIG_PURPOSE, th)
    rogue = ServerHello(server_id, eph, chosen, signature)
    expect_error(
        client, encode_frame(FrameType.SERVER_HELLO, rogue.encode()), Reason.NO_COMMON_SUITE
    )


def test_stripping_aegis_from_the_offer_breaks_the_server_signature() -> None:
    # A man in the middle rewrites the client's offer to ChaCha20 only; the server
    # signs what it saw, which is not what the client sent.
    client = PeerConnection(
        Role.CLIENT, CLIENT_KEY, group_id=GROUP, content_id=CONTENT, suites=BOTH
    )
    hello = ClientHello.decode(one_payload(client.initiate(), FrameType.CLIENT_HELLO))
    stripped = replace(hello, suites=Suite.CHACHA20_POLY1305)
    server = PeerConnection(Role.SERVER, SERVER_KEY, suites=BOTH)
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, stripped.encode()))
    assert server.next_event() is None
    expect_error(client, server.data_to_send(), Reason.BAD_SIGNATURE)
