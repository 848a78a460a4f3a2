"""The handshake: it names nobody in the clear, it tells a prober nothing, it
authenticates both sides, and splices, replays, downgrades and forgeries fail."""

from __future__ import annotations

import struct
from dataclasses import replace

import nacl.bindings
import nacl.exceptions
import pytest
from nacl.signing import SigningKey
from support.access import access_key, access_keys

from dhtshare import crypto
from dhtshare.errors import RemoteProtocolError
from dhtshare.wire import (
    FrameDecoder,
    FrameType,
    HandshakeComplete,
    PeerConnection,
    Reason,
    Reject,
    Role,
    State,
    suites,
)
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
    ServerHelloBody,
    SessionCipher,
    _Schedule,
    _seal,
    auth_hash,
    hello_proof,
    transcript_hash,
)
from dhtshare.wire.messages import Piece
from dhtshare.wire.suites import Suite, choose, local_suites, mask_of

GROUP = bytes(range(32))
OTHER_GROUP = bytes(range(100, 132))
CONTENT = bytes(range(32, 64))
KEY = access_key(GROUP)
CLIENT_KEY = SigningKey(b"\x01" * 32)
SERVER_KEY = SigningKey(b"\x02" * 32)
CHACHA_ONLY = frozenset({Suite.CHACHA20_POLY1305})
BOTH = frozenset(Suite)


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


def expect_error(conn: PeerConnection, data: bytes, reason: Reason) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reason == reason
    assert conn.state is State.ERROR
    return info.value


def client_conn(
    key: SigningKey = CLIENT_KEY,
    *,
    group: bytes = GROUP,
    access: bytes = KEY,
    offer: frozenset[Suite] | None = None,
) -> PeerConnection:
    return PeerConnection(
        Role.CLIENT, key, group_id=group, content_id=CONTENT, access_key=access, suites=offer
    )


def server_conn(
    key: SigningKey = SERVER_KEY, *groups: bytes, offer: frozenset[Suite] | None = None
) -> PeerConnection:
    return PeerConnection(
        Role.SERVER, key, access_keys=access_keys(*(groups or (GROUP,))), suites=offer
    )


def server_hello_for(client: PeerConnection, server: PeerConnection) -> bytes:
    server.receive_data(client.initiate())
    assert server.next_event() is None
    return server.data_to_send()


def handshake(
    client: PeerConnection, server: PeerConnection
) -> tuple[list[bytes], HandshakeComplete, HandshakeComplete]:
    """Run a whole handshake; return its three frames and both sides' events."""
    hello = client.initiate()
    server.receive_data(hello)
    assert server.next_event() is None
    reply = server.data_to_send()
    client.receive_data(reply)
    at_client = client.next_event()
    auth = client.data_to_send()
    server.receive_data(auth)
    at_server = server.next_event()
    assert isinstance(at_client, HandshakeComplete) and isinstance(at_server, HandshakeComplete)
    return [hello, reply, auth], at_client, at_server


def forged_reply(
    hello: ClientHello,
    *,
    access: bytes = KEY,
    claimed: bytes = bytes(SERVER_KEY.verify_key),
    signer: SigningKey = SERVER_KEY,
    suite: int = Suite.CHACHA20_POLY1305,
    signed_suite: int | None = None,
) -> bytes:
    """A ServerHello made by someone holding ``access``: sealed as a server would, with
    whatever identity, suite and signature the test wants."""
    eph_pk, eph_sk = nacl.bindings.crypto_kx_keypair()
    rx, tx = nacl.bindings.crypto_kx_server_session_keys(eph_pk, eph_sk, hello.ephemeral_key)
    keys = _Schedule(access, rx, tx, hello, eph_pk)
    signed = suite if signed_suite is None else signed_suite
    th = transcript_hash(hello, eph_pk, claimed, signed)
    body = ServerHelloBody(claimed, suite, crypto.sign(signer, SERVER_SIG_PURPOSE, th))
    sealed = _seal(keys.server_hello, body.encode(), eph_pk)
    return encode_frame(FrameType.SERVER_HELLO, ServerHello(eph_pk, sealed).encode())


def hello_of(client: PeerConnection) -> ClientHello:
    return ClientHello.decode(one_payload(client.initiate(), FrameType.CLIENT_HELLO))


# -- the halves, pure ------------------------------------------------------------------


def test_handshake_halves_agree_on_keys() -> None:
    client = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT)
    server = ServerHandshake(SERVER_KEY, access_keys(OTHER_GROUP, GROUP))
    reply = server.on_client_hello(client.hello.encode())
    body, client_cipher, auth = client.on_server_hello(reply.encode())
    assert body.identity_key == bytes(SERVER_KEY.verify_key)
    peer = server.on_client_auth(auth.encode())
    assert peer.peer_key == bytes(CLIENT_KEY.verify_key)
    assert (peer.group_id, peer.content_id) == (GROUP, CONTENT)
    # one key per direction: what one side seals, only the other side opens
    sealed = client_cipher.seal(b"to server")
    assert server.cipher.open(one_payload(sealed, FrameType.SEALED)) == b"to server"
    sealed = server.cipher.seal(b"to client")
    assert client_cipher.open(one_payload(sealed, FrameType.SEALED)) == b"to client"


def test_message_layouts() -> None:
    client = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT)
    data = client.hello.encode()
    assert len(data) == 8 + 1 + 32 + 16 + 1 + 32
    assert data[:9] == MAGIC + b"\x03"
    assert data[9:41] == client.hello.ephemeral_key
    assert data[41:57] == client.hello.nonce
    assert data[57] == mask_of(local_suites())
    assert data[58:] == hello_proof(KEY, client.hello) == client.hello.proof
    assert ClientHello.decode(data) == client.hello
    reply = ServerHandshake(SERVER_KEY, access_keys(GROUP)).on_client_hello(data).encode()
    assert len(reply) == 32 + (32 + 1 + 64) + 16
    _, _, auth = client.on_server_hello(reply)
    assert len(auth.encode()) == 32 + 32 + 32 + 64 + 16


def test_the_handshake_names_nobody() -> None:
    """A passive observer of all three messages sees no identity key, group id or content
    id: not raw, not in hex."""
    sent, at_client, at_server = handshake(client_conn(), server_conn(SERVER_KEY, GROUP))
    assert at_server.group_id == GROUP and at_server.content_id == CONTENT
    wire = b"".join(sent)
    assert len(sent) == 3 and len(wire) == 3 * 5 + 90 + 145 + 176
    secrets = [bytes(CLIENT_KEY.verify_key), bytes(SERVER_KEY.verify_key), GROUP, CONTENT, KEY]
    for secret in secrets:
        for form in (secret, secret.hex().encode(), secret.hex().upper().encode()):
            assert form not in wire
        assert secret[:8] not in wire  # not even a prefix
    assert at_client.peer_key == bytes(SERVER_KEY.verify_key)


def test_each_session_uses_fresh_ephemeral_keys_nonce_and_proof() -> None:
    a = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT).hello
    b = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT).hello
    assert a.ephemeral_key != b.ephemeral_key
    assert a.nonce != b.nonce
    assert a.proof != b.proof  # two hellos of one member cannot be linked by their proof


def test_the_proof_binds_every_field_and_the_key() -> None:
    hello = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT).hello
    variants = [
        replace(hello, ephemeral_key=bytes(32)),
        replace(hello, nonce=bytes(16)),
        replace(hello, suites=hello.suites ^ 0x80),
        replace(hello, version=2),
    ]
    proofs = {hello_proof(KEY, v) for v in variants} | {hello_proof(access_key(OTHER_GROUP), hello)}
    assert hello.proof not in proofs and len(proofs) == len(variants) + 1


def test_transcript_binds_every_field() -> None:
    hello = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT).hello
    server_eph, server_id = b"\x05" * 32, b"\x06" * 32
    chacha = Suite.CHACHA20_POLY1305
    base = transcript_hash(hello, server_eph, server_id, chacha)
    other = b"\x07" * 32
    variants = [
        transcript_hash(hello, other, server_id, chacha),
        transcript_hash(hello, server_eph, other, chacha),
        transcript_hash(hello, server_eph, server_id, Suite.AEGIS_128L),
        transcript_hash(replace(hello, ephemeral_key=other), server_eph, server_id, chacha),
        transcript_hash(replace(hello, nonce=other[:16]), server_eph, server_id, chacha),
        transcript_hash(replace(hello, suites=hello.suites ^ 0x80), server_eph, server_id, chacha),
        transcript_hash(replace(hello, proof=other), server_eph, server_id, chacha),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)
    signed = auth_hash(base, server_id, GROUP, CONTENT)
    assert signed != auth_hash(base, server_id, OTHER_GROUP, CONTENT)
    assert signed != auth_hash(base, server_id, GROUP, other)


# -- probers, replays, other groups -----------------------------------------------------


def test_a_prober_gets_an_answer_like_a_members_and_learns_nothing() -> None:
    server_id = bytes(SERVER_KEY.verify_key)
    real = server_hello_for(client_conn(), server_conn())
    prober = client_conn(access=b"\x99" * 32)
    probed = server_conn()
    noise = server_hello_for(prober, probed)
    assert len(noise) == len(real)
    assert noise[:5] == real[:5]  # the same frame header: same type, same length
    assert server_id not in noise and server_id.hex().encode() not in noise
    err = expect_error(prober, noise, Reason.DECRYPT_FAILED)
    assert "access key" in str(err)
    assert prober.data_to_send() == b""  # no ClientAuth for a server we could not read


def test_a_server_refuses_every_client_auth_alike_matched_or_not() -> None:
    """What a prober sends after the ServerHello gets the same refusal, byte for byte,
    from a server its hello matched (a replay) and one it did not."""
    replies = []
    for access in (KEY, b"\x99" * 32):
        server = server_conn()
        server_hello_for(client_conn(access=access), server)
        err = expect_error(
            server, encode_frame(FrameType.CLIENT_AUTH, bytes(176)), Reason.DECRYPT_FAILED
        )
        replies.append(server.send(Reject(err.reason, str(err))))
    assert replies[0] == replies[1]
    assert replies[0][4] == FrameType.REJECT  # plaintext: no session keys exist


def test_a_replayed_client_hello_gets_no_session() -> None:
    client, server = client_conn(), server_conn()
    hello = client.initiate()
    server.receive_data(hello)
    assert server.next_event() is None
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), HandshakeComplete)
    auth = client.data_to_send()
    # The replayer sends the captured hello and ClientAuth to a new server session, which
    # answers with a fresh ephemeral key: the old ClientAuth no longer opens.
    again = server_conn()
    again.receive_data(hello)
    assert again.next_event() is None
    assert again.data_to_send() != b""
    expect_error(again, auth, Reason.DECRYPT_FAILED)
    # the genuine session still completes
    server.receive_data(auth)
    assert isinstance(server.next_event(), HandshakeComplete)


def test_a_server_hello_replayed_into_another_session_does_not_open() -> None:
    old_reply = server_hello_for(client_conn(), server_conn())
    fresh = client_conn()
    fresh.initiate()
    expect_error(fresh, old_reply, Reason.DECRYPT_FAILED)


def test_a_member_of_another_group_cannot_connect() -> None:
    outsider = client_conn(group=OTHER_GROUP, access=access_key(OTHER_GROUP))
    server = server_conn(SERVER_KEY, GROUP)
    expect_error(outsider, server_hello_for(outsider, server), Reason.DECRYPT_FAILED)


def test_a_member_naming_another_group_than_its_key_is_refused() -> None:
    client = client_conn(group=OTHER_GROUP, access=KEY)
    server = server_conn(SERVER_KEY, GROUP, OTHER_GROUP)
    client.receive_data(server_hello_for(client, server))
    assert isinstance(client.next_event(), HandshakeComplete)
    expect_error(server, client.data_to_send(), Reason.NOT_MEMBER)


def test_the_server_finds_the_group_among_many_and_asks_for_keys_at_every_hello() -> None:
    groups = [bytes([i]) * 32 for i in range(100)]
    keys = {g: access_key(g) for g in groups}
    asked = 0

    def current() -> dict[bytes, bytes]:
        nonlocal asked
        asked += 1
        return keys

    server = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=current)
    _, _, at_server = handshake(client_conn(group=groups[57], access=keys[groups[57]]), server)
    assert at_server.group_id == groups[57] and asked == 1
    # a new epoch: the old key stops working at the next handshake
    old = keys[groups[57]]
    keys[groups[57]] = b"\x42" * 32
    client = client_conn(group=groups[57], access=old)
    server = PeerConnection(Role.SERVER, SERVER_KEY, access_keys=current)
    expect_error(client, server_hello_for(client, server), Reason.DECRYPT_FAILED)
    assert asked == 2


# -- tampering and forgery --------------------------------------------------------------


@pytest.mark.parametrize("position", [5, 5 + 31, 5 + 32, 5 + 100, -1])
def test_a_tampered_server_hello_does_not_open(position: int) -> None:
    client = client_conn()
    reply = bytearray(server_hello_for(client, server_conn()))
    reply[position] ^= 0x01
    expect_error(client, bytes(reply), Reason.DECRYPT_FAILED)
    assert client.data_to_send() == b""


def test_a_server_claiming_another_identity_is_refused() -> None:
    client = client_conn()
    forged = forged_reply(hello_of(client), claimed=bytes(SigningKey(b"\x09" * 32).verify_key))
    expect_error(client, forged, Reason.BAD_SIGNATURE)


def test_a_well_forged_server_hello_is_accepted() -> None:
    # the forging helper itself is right: with a true identity it passes
    client = client_conn()
    client.receive_data(forged_reply(hello_of(client)))
    assert isinstance(client.next_event(), HandshakeComplete)


def test_mitm_swapping_the_client_ephemeral_key_is_refused() -> None:
    # Without the access key the proof no longer fits: the server answers noise.
    client = client_conn()
    hello = hello_of(client)
    attacker_eph = ClientHandshake(SigningKey(b"\x09" * 32), KEY, GROUP, CONTENT).hello
    spliced = replace(hello, ephemeral_key=attacker_eph.ephemeral_key)
    server = server_conn()
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, spliced.encode()))
    assert server.next_event() is None
    expect_error(client, server.data_to_send(), Reason.DECRYPT_FAILED)


def test_mitm_holding_the_access_key_cannot_splice_either() -> None:
    # A member in the middle re-proves a hello with its own ephemeral key: the server's
    # reply is keyed to that hello, not the client's.
    client = client_conn()
    hello = hello_of(client)
    theirs = ClientHandshake(SigningKey(b"\x09" * 32), KEY, GROUP, CONTENT).hello
    spliced = replace(hello, ephemeral_key=theirs.ephemeral_key)
    spliced = replace(spliced, proof=hello_proof(KEY, spliced))
    server = server_conn()
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, spliced.encode()))
    assert server.next_event() is None
    expect_error(client, server.data_to_send(), Reason.DECRYPT_FAILED)


def test_a_tampered_client_auth_is_refused() -> None:
    client, server = client_conn(), server_conn()
    client.receive_data(server_hello_for(client, server))
    client.next_event()
    auth = bytearray(client.data_to_send())
    auth[-1] ^= 0x80
    expect_error(server, bytes(auth), Reason.DECRYPT_FAILED)


def test_a_server_signature_cannot_pass_as_a_client_signature() -> None:
    # Same identity on both ends: what the server signed is not what a client signs.
    client = ClientHandshake(SERVER_KEY, KEY, GROUP, CONTENT)
    server = ServerHandshake(SERVER_KEY, access_keys(GROUP))
    reply = server.on_client_hello(client.hello.encode())
    body, _, _ = client.on_server_hello(reply.encode())
    th = transcript_hash(client.hello, reply.ephemeral_key, body.identity_key, body.suite)
    me = bytes(SERVER_KEY.verify_key)
    assert crypto.verify(me, SERVER_SIG_PURPOSE, th, body.signature)
    for purpose in (CLIENT_SIG_PURPOSE, SERVER_SIG_PURPOSE):
        signed = auth_hash(th, me, GROUP, CONTENT)
        assert not crypto.verify(me, purpose, signed, body.signature)
    assert not crypto.verify(me, CLIENT_SIG_PURPOSE, th, body.signature)
    assert SERVER_SIG_PURPOSE != CLIENT_SIG_PURPOSE


def test_low_order_ephemeral_keys_are_refused() -> None:
    hello = hello_of(client_conn())
    zero = replace(hello, ephemeral_key=bytes(32))
    zero = replace(zero, proof=hello_proof(KEY, zero))
    expect_error(
        server_conn(), encode_frame(FrameType.CLIENT_HELLO, zero.encode()), Reason.PROTOCOL
    )
    client = client_conn()
    client.initiate()
    reply = encode_frame(FrameType.SERVER_HELLO, bytes(145))
    expect_error(client, reply, Reason.PROTOCOL)


def test_wrong_magic_is_refused() -> None:
    hello = client_conn().initiate()
    bad = hello[:5] + b"BITTORNT" + hello[13:]
    expect_error(server_conn(), bad, Reason.BAD_MAGIC)


@pytest.mark.parametrize("version", [1, 2, 4])
def test_other_versions_are_refused(version: int) -> None:
    hello = bytearray(client_conn().initiate())
    hello[5 + 8] = version  # version 2 sent identities in the clear
    expect_error(server_conn(), bytes(hello), Reason.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("delta", [-1, 1])
def test_client_hello_of_wrong_length_is_refused(delta: int) -> None:
    payload = one_payload(client_conn().initiate(), FrameType.CLIENT_HELLO)
    payload = payload + b"\x00" if delta > 0 else payload[:-1]
    expect_error(server_conn(), encode_frame(FrameType.CLIENT_HELLO, payload), Reason.PROTOCOL)


def test_malformed_server_hello_and_client_auth() -> None:
    client = client_conn()
    client.initiate()
    expect_error(client, encode_frame(FrameType.SERVER_HELLO, bytes(144)), Reason.PROTOCOL)
    client, server = client_conn(), server_conn()
    server_hello_for(client, server)
    expect_error(server, encode_frame(FrameType.CLIENT_AUTH, bytes(177)), Reason.PROTOCOL)
    with pytest.raises(ValueError, match="176"):
        ClientAuth(bytes(175))


def test_garbage_instead_of_a_hello_is_refused() -> None:
    expect_error(server_conn(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Reason.FRAME_TOO_LARGE)
    expect_error(server_conn(), struct.pack(">IB", 3, 99) + b"abc", Reason.PROTOCOL)


# -- cipher suites -------------------------------------------------------------------


def open_pair(
    client_suites: frozenset[Suite], server_suites: frozenset[Suite]
) -> tuple[PeerConnection, PeerConnection]:
    """A finished handshake between a client and a server offering the given suites."""
    client = client_conn(offer=client_suites)
    server = server_conn(offer=server_suites)
    handshake(client, server)
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
        hello = ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT).hello
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
        ClientHandshake(CLIENT_KEY, KEY, GROUP, CONTENT, frozenset())


def test_client_offering_no_known_suite_is_refused() -> None:
    # before any key is tried: the answer says nothing about the groups served
    hello = hello_of(client_conn())
    for mask in (0x00, 0x80):
        unknown = replace(hello, suites=mask)
        unknown = replace(unknown, proof=hello_proof(KEY, unknown))
        expect_error(
            server_conn(),
            encode_frame(FrameType.CLIENT_HELLO, unknown.encode()),
            Reason.NO_COMMON_SUITE,
        )


def test_downgrading_the_suite_breaks_the_server_signature() -> None:
    # Someone holding the access key re-seals the server's answer with ChaCha20 chosen;
    # the server signed AEGIS-128L.
    client = client_conn(offer=BOTH)
    forged = forged_reply(
        hello_of(client), suite=Suite.CHACHA20_POLY1305, signed_suite=Suite.AEGIS_128L
    )
    expect_error(client, forged, Reason.BAD_SIGNATURE)


@pytest.mark.parametrize("chosen", [Suite.AEGIS_128L, 0x00, 0x03, 0xFF])
def test_server_choosing_a_suite_we_did_not_offer_is_refused(chosen: int) -> None:
    # An authentic server that signs a suite outside our offer (or no suite at all):
    # the signature holds, the choice does not.
    client = client_conn(offer=CHACHA_ONLY)
    expect_error(client, forged_reply(hello_of(client), suite=chosen), Reason.NO_COMMON_SUITE)


def test_stripping_aegis_from_the_offer_breaks_the_proof() -> None:
    # A man in the middle without the access key rewrites the offer to ChaCha20 only:
    # the proof no longer fits, and the server's answer is noise to the client.
    client = client_conn(offer=BOTH)
    stripped = replace(hello_of(client), suites=Suite.CHACHA20_POLY1305)
    server = server_conn(offer=BOTH)
    server.receive_data(encode_frame(FrameType.CLIENT_HELLO, stripped.encode()))
    assert server.next_event() is None
    expect_error(client, server.data_to_send(), Reason.DECRYPT_FAILED)
