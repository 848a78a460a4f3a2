"""A handshake that names nobody: mutual authentication behind a group's access key
(pure; byte layouts and the reasoning in docs/wire.md).

Three messages, shaped like Noise XXpsk0 (both identities travel encrypted, and the
client proves it holds the pre-shared key before the server says anything)::

    client -> server  ClientHello  magic, version, ephemeral X25519 key, nonce, offered
                                   suites, proof = BLAKE2b keyed with the access key
                                   over all of those
    server -> client  ServerHello  ephemeral key, then sealed: identity key, chosen suite,
                                   signature over the transcript
    client -> server  ClientAuth   sealed: identity key, group id, content id, signature

Every group has a current 32-byte access key that only its current members hold. The
server tries the proof against the access key of every group it serves
(``access_keys``, asked at each ClientHello). Matched or not, it answers in the same
way: a ServerHello of the same length sealed under a key derived from both ephemeral
keys, the ClientHello and the access key; with no match the access key is a random one,
so the reply is noise to everybody and the ClientAuth that follows cannot open. A
prober (or someone replaying a captured ClientHello) thus learns neither which groups
the server serves nor its identity key, and a passive observer sees no identity key,
group id or content id at all.

Both signatures cover the transcript hash (the whole ClientHello with its proof, the
server's ephemeral key, its identity key and the suite it chose) under different
purposes; the client's also covers the group and content it asks for. Session keys are
derived from the ephemeral key exchange, the access key and the transcript, one per
direction, and every later frame is sealed with the chosen AEAD (``wire/suites.py``)
under a nonce that counts frames in that direction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from dhtshare import crypto
from dhtshare.codec import Reader, Writer
from dhtshare.errors import LocalProtocolError, Malformed, RemoteProtocolError
from dhtshare.wire.frames import Reason
from dhtshare.wire.session import SessionCipher
from dhtshare.wire.suites import AEADS, Suite, choose, local_suites, mask_of

__all__ = [
    "ACCESS_KEY_SIZE",
    "AUTH_PURPOSE",
    "CLIENT_SIG_PURPOSE",
    "MAGIC",
    "NONCE_SIZE",
    "SERVER_SIG_PURPOSE",
    "TRANSCRIPT_PURPOSE",
    "VERSION",
    "AccessKeys",
    "Authenticated",
    "ClientAuth",
    "ClientAuthBody",
    "ClientHandshake",
    "ClientHello",
    "ServerHandshake",
    "ServerHello",
    "ServerHelloBody",
    "SessionCipher",
    "auth_hash",
    "hello_proof",
    "transcript_hash",
]

MAGIC = b"DHTSHARE"
VERSION = 3
NONCE_SIZE = 16
ACCESS_KEY_SIZE = 32
_KEY_SIZE = crypto.PUBLIC_KEY_SIZE
_EPHEMERAL_KEY_SIZE = sodium.crypto_kx_PUBLIC_KEY_BYTES
_PROOF_SIZE = 32
# crypto.py prefixes each purpose with b"dhtshare/v1/" and ends it with a zero byte.
TRANSCRIPT_PURPOSE = "handshake/transcript"
AUTH_PURPOSE = "handshake/auth"
SERVER_SIG_PURPOSE = "handshake/server"
CLIENT_SIG_PURPOSE = "handshake/client"
_LABEL = b"dhtshare/v3/handshake/"  # keyed BLAKE2b derivations: this, the use, a zero byte

_SEAL = AEADS[Suite.CHACHA20_POLY1305]  # the two sealed handshake messages: every peer has it
_SEAL_NONCE = bytes(_SEAL.nonce_size)  # each handshake key seals exactly one message
_SERVER_BODY_SIZE = _KEY_SIZE + 1 + crypto.SIGNATURE_SIZE
_CLIENT_BODY_SIZE = _KEY_SIZE + 2 * crypto.HASH_SIZE + crypto.SIGNATURE_SIZE
_SERVER_SEALED_SIZE = _SERVER_BODY_SIZE + _SEAL.tag_size
_CLIENT_SEALED_SIZE = _CLIENT_BODY_SIZE + _SEAL.tag_size

_SUITE_VALUES = frozenset(int(suite) for suite in Suite)

AccessKeys = Callable[[], Mapping[bytes, bytes]]
"""Group id -> that group's current access key, for every group a server serves; asked
once per ClientHello (keys change at every epoch)."""


def _fixed(value: bytes, size: int, name: str) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")


def _protocol_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, Reason.PROTOCOL)


_MALFORMED_CLIENT_HELLO = Malformed("ClientHello", _protocol_error)
_MALFORMED_SERVER_HELLO = Malformed("ServerHello", _protocol_error)
_MALFORMED_CLIENT_AUTH = Malformed("ClientAuth", _protocol_error)


def _derive(key: bytes, use: str, *parts: bytes) -> bytes:
    """32 bytes of BLAKE2b keyed with ``key`` over the label of ``use`` and the
    length-prefixed ``parts`` (a MAC, and the key derivation of every handshake key)."""
    h = hashlib.blake2b(key=key, digest_size=32)
    h.update(_LABEL + use.encode("ascii") + b"\x00")
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The only plaintext the client sends: nothing in it names anyone."""

    ephemeral_key: bytes
    nonce: bytes
    suites: int
    """Bit mask of the offered ``Suite`` values."""
    proof: bytes
    """``hello_proof(access key, ...)``: the client holds the group's access key."""
    version: int = VERSION

    def __post_init__(self) -> None:
        _fixed(self.ephemeral_key, _EPHEMERAL_KEY_SIZE, "ephemeral_key")
        _fixed(self.nonce, NONCE_SIZE, "nonce")
        _fixed(self.proof, _PROOF_SIZE, "proof")
        if not 0 <= self.suites <= 0xFF:
            raise ValueError(f"suite mask {self.suites} does not fit a byte")

    def signed_part(self) -> bytes:
        """Every byte before the proof: what the proof covers."""
        w = Writer().push_bytes(MAGIC).push_u8(self.version)
        return (
            w.push_bytes(self.ephemeral_key).push_bytes(self.nonce).push_u8(self.suites).getvalue()
        )

    def encode(self) -> bytes:
        return self.signed_part() + self.proof

    @classmethod
    def decode(cls, data: bytes) -> ClientHello:
        with _MALFORMED_CLIENT_HELLO:
            r = Reader(data)
            if r.pull_bytes(len(MAGIC)) != MAGIC:
                raise RemoteProtocolError("not a dhtshare peer (bad magic)", Reason.BAD_MAGIC)
            version = r.pull_u8()
            if version != VERSION:
                raise RemoteProtocolError(
                    f"unsupported protocol version {version}", Reason.UNSUPPORTED_VERSION
                )
            hello = cls(
                ephemeral_key=r.pull_bytes(_EPHEMERAL_KEY_SIZE),
                nonce=r.pull_bytes(NONCE_SIZE),
                suites=r.pull_u8(),
                proof=r.pull_bytes(_PROOF_SIZE),
                version=version,
            )
            r.finish()
        return hello


def hello_proof(access_key: bytes, hello: ClientHello) -> bytes:
    """The proof a ClientHello carries: its other bytes, MACed with the access key."""
    return _derive(access_key, "proof", hello.signed_part())


@dataclass(frozen=True, slots=True)
class ServerHello:
    """On the wire: the server's ephemeral key and its sealed ``ServerHelloBody``."""

    ephemeral_key: bytes
    sealed: bytes

    def __post_init__(self) -> None:
        _fixed(self.ephemeral_key, _EPHEMERAL_KEY_SIZE, "ephemeral_key")
        _fixed(self.sealed, _SERVER_SEALED_SIZE, "sealed")

    def encode(self) -> bytes:
        return self.ephemeral_key + self.sealed

    @classmethod
    def decode(cls, data: bytes) -> ServerHello:
        with _MALFORMED_SERVER_HELLO:
            r = Reader(data)
            hello = cls(r.pull_bytes(_EPHEMERAL_KEY_SIZE), r.pull_bytes(_SERVER_SEALED_SIZE))
            r.finish()
        return hello


@dataclass(frozen=True, slots=True)
class ServerHelloBody:
    """Inside the ServerHello: who the server is, and the suite it chose."""

    identity_key: bytes
    suite: int
    """The chosen ``Suite`` (the client checks that it offered it)."""
    signature: bytes

    def __post_init__(self) -> None:
        _fixed(self.identity_key, _KEY_SIZE, "identity_key")
        _fixed(self.signature, crypto.SIGNATURE_SIZE, "signature")
        if not 0 <= self.suite <= 0xFF:
            raise ValueError(f"suite {self.suite} does not fit a byte")

    def encode(self) -> bytes:
        return self.identity_key + bytes([self.suite]) + self.signature

    @classmethod
    def decode(cls, data: bytes) -> ServerHelloBody:
        with _MALFORMED_SERVER_HELLO:
            r = Reader(data)
            body = cls(r.pull_bytes(_KEY_SIZE), r.pull_u8(), r.pull_bytes(crypto.SIGNATURE_SIZE))
            r.finish()
        return body


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """On the wire: the sealed ``ClientAuthBody``."""

    sealed: bytes

    def __post_init__(self) -> None:
        _fixed(self.sealed, _CLIENT_SEALED_SIZE, "sealed")

    def encode(self) -> bytes:
        return self.sealed

    @classmethod
    def decode(cls, data: bytes) -> ClientAuth:
        with _MALFORMED_CLIENT_AUTH:
            return cls(bytes(data))


@dataclass(frozen=True, slots=True)
class ClientAuthBody:
    """Inside the ClientAuth: who the client is, and what it asks for."""

    identity_key: bytes
    group_id: bytes
    content_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _fixed(self.identity_key, _KEY_SIZE, "identity_key")
        _fixed(self.group_id, crypto.HASH_SIZE, "group_id")
        _fixed(self.content_id, crypto.HASH_SIZE, "content_id")
        _fixed(self.signature, crypto.SIGNATURE_SIZE, "signature")

    def encode(self) -> bytes:
        return self.identity_key + self.group_id + self.content_id + self.signature

    @classmethod
    def decode(cls, data: bytes) -> ClientAuthBody:
        with _MALFORMED_CLIENT_AUTH:
            r = Reader(data)
            body = cls(
                r.pull_bytes(_KEY_SIZE),
                r.pull_bytes(crypto.HASH_SIZE),
                r.pull_bytes(crypto.HASH_SIZE),
                r.pull_bytes(crypto.SIGNATURE_SIZE),
            )
            r.finish()
        return body


@dataclass(frozen=True, slots=True)
class Authenticated:
    """What a finished handshake established about the peer."""

    peer_key: bytes
    group_id: bytes
    content_id: bytes


def transcript_hash(
    hello: ClientHello, server_ephemeral: bytes, server_identity: bytes, suite: int
) -> bytes:
    """The hash both signatures cover: the whole ClientHello (proof included), the
    server's ephemeral key, its identity key and the suite it chose."""
    return crypto.digest(
        TRANSCRIPT_PURPOSE, hello.encode(), server_ephemeral, server_identity, bytes([suite])
    )


def auth_hash(
    transcript: bytes, client_identity: bytes, group_id: bytes, content_id: bytes
) -> bytes:
    """What the client signs: the transcript, its key, and the group and file it asks for."""
    return crypto.digest(AUTH_PURPOSE, transcript, client_identity, group_id, content_id)


def _verify(public_key: bytes, purpose: str, transcript: bytes, signature: bytes) -> None:
    if not crypto.verify(public_key, purpose, transcript, signature):
        raise RemoteProtocolError("handshake signature does not verify", Reason.BAD_SIGNATURE)


class _Schedule:
    """The keys of one handshake, from the ephemeral exchange (``crypto_kx``'s two keys,
    which already hash both public keys), the access key, the ClientHello and the
    server's ephemeral key: one key seals the ServerHello body, another the ClientAuth
    body, and the session keys also take the transcript hash."""

    __slots__ = ("client_auth", "secret", "server_hello")

    def __init__(
        self, access_key: bytes, c2s: bytes, s2c: bytes, hello: ClientHello, server_eph: bytes
    ) -> None:
        self.secret = _derive(access_key, "secret", c2s, s2c, hello.encode(), server_eph)
        self.server_hello = _derive(self.secret, "server-hello")
        self.client_auth = _derive(self.secret, "client-auth")

    def session(self, transcript: bytes) -> tuple[bytes, bytes]:
        """``(client to server, server to client)`` keys for ``SessionCipher``."""
        return (
            _derive(self.secret, "session/c2s", transcript),
            _derive(self.secret, "session/s2c", transcript),
        )


def _seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    out = bytearray(len(plaintext) + _SEAL.tag_size)
    _SEAL.seal_into(out, plaintext, ad, _SEAL_NONCE, key)
    return bytes(out)


def _open(key: bytes, sealed: bytes, ad: bytes, failure: str) -> bytes:
    try:
        return bytes(_SEAL.open_new(sealed, ad, _SEAL_NONCE, key))
    except nacl.exceptions.CryptoError as exc:
        raise RemoteProtocolError(failure, Reason.DECRYPT_FAILED) from exc


_NO_ACCESS = (
    "the peer's ServerHello does not open: it holds no current access key of this group"
    " (or the reply was tampered with)"
)
_AUTH_FAILED = "ClientAuth failed authentication"


class ClientHandshake:
    """The client's half: makes the ClientHello, opens and checks the ServerHello, seals
    the ClientAuth. ``access_key`` is the current access key of ``group_id``; ``suites``
    are the ones it offers (default: ``local_suites()``)."""

    def __init__(
        self,
        identity: nacl.signing.SigningKey,
        access_key: bytes,
        group_id: bytes,
        content_id: bytes,
        suites: frozenset[Suite] | None = None,
    ) -> None:
        _fixed(access_key, ACCESS_KEY_SIZE, "access_key")
        _fixed(group_id, crypto.HASH_SIZE, "group_id")
        _fixed(content_id, crypto.HASH_SIZE, "content_id")
        mask = mask_of(local_suites() if suites is None else suites)
        if not mask:
            raise ValueError("a client must offer at least one cipher suite")
        self._identity = identity
        self._access_key = access_key
        self.group_id, self.content_id = group_id, content_id
        self._eph_pk, self._eph_sk = sodium.crypto_kx_keypair()
        unproven = ClientHello(self._eph_pk, os.urandom(NONCE_SIZE), mask, bytes(_PROOF_SIZE))
        self.hello = ClientHello(
            unproven.ephemeral_key,
            unproven.nonce,
            mask,
            hello_proof(access_key, unproven),
        )

    def on_server_hello(self, payload: bytes) -> tuple[ServerHelloBody, SessionCipher, ClientAuth]:
        """Open and verify the ServerHello; return its body, the session cipher and our
        ClientAuth."""
        server = ServerHello.decode(payload)
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(
                self._eph_pk, self._eph_sk, server.ephemeral_key
            )
        except nacl.exceptions.CryptoError as exc:
            raise RemoteProtocolError("unusable server ephemeral key", Reason.PROTOCOL) from exc
        keys = _Schedule(self._access_key, tx, rx, self.hello, server.ephemeral_key)
        body = ServerHelloBody.decode(
            _open(keys.server_hello, server.sealed, server.ephemeral_key, _NO_ACCESS)
        )
        th = transcript_hash(self.hello, server.ephemeral_key, body.identity_key, body.suite)
        _verify(body.identity_key, SERVER_SIG_PURPOSE, th, body.signature)
        if body.suite not in _SUITE_VALUES or not self.hello.suites & body.suite:
            raise RemoteProtocolError(
                f"server chose cipher suite {body.suite}, which we did not offer",
                Reason.NO_COMMON_SUITE,
            )
        me = bytes(self._identity.verify_key)
        signed = auth_hash(th, me, self.group_id, self.content_id)
        signature = crypto.sign(self._identity, CLIENT_SIG_PURPOSE, signed)
        auth = ClientAuthBody(me, self.group_id, self.content_id, signature)
        sealed = ClientAuth(_seal(keys.client_auth, auth.encode(), th))
        c2s, s2c = keys.session(th)
        return body, SessionCipher(s2c, c2s, Suite(body.suite)), sealed


class ServerHandshake:
    """The server's half: answers any well-formed ClientHello, then opens and checks the
    ClientAuth.

    ``access_keys()`` (group id -> access key, asked once per ClientHello) are the groups
    it serves. It picks the preferred suite among the client's offer and ``suites``
    (default: ``local_suites()``).
    """

    def __init__(
        self,
        identity: nacl.signing.SigningKey,
        access_keys: AccessKeys,
        suites: frozenset[Suite] | None = None,
    ) -> None:
        self._identity = identity
        self._access_keys = access_keys
        self._suites = local_suites() if suites is None else suites
        self._group: bytes | None = None  # the group whose access key the proof matched
        self.client_hello: ClientHello | None = None
        self._transcript = b""
        self._keys: _Schedule | None = None
        self._suite = Suite.CHACHA20_POLY1305
        self.session: SessionCipher | None = None
        """The session cipher, once a ClientAuth opened (its checks may still fail)."""

    def _match(self, hello: ClientHello) -> tuple[bytes | None, bytes]:
        """The group whose access key made ``hello``'s proof and that key; else ``None``
        and a random key. Every key is tried (no early exit), each compare in constant
        time."""
        group, key = None, os.urandom(ACCESS_KEY_SIZE)
        for gid, access_key in self._access_keys().items():
            if len(access_key) != ACCESS_KEY_SIZE:
                continue
            if hmac.compare_digest(hello_proof(access_key, hello), hello.proof) and group is None:
                group, key = gid, access_key
        return group, key

    def on_client_hello(self, payload: bytes) -> ServerHello:
        """Parse the ClientHello and answer it: matched or not, the same work and a reply
        of the same shape (the module doc)."""
        hello = ClientHello.decode(payload)
        suite = choose(hello.suites, self._suites)
        if suite is None:
            raise RemoteProtocolError(
                f"no cipher suite in common (offered mask {hello.suites:#04x})",
                Reason.NO_COMMON_SUITE,
            )
        eph_pk, eph_sk = sodium.crypto_kx_keypair()
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(eph_pk, eph_sk, hello.ephemeral_key)
        except nacl.exceptions.CryptoError as exc:
            raise RemoteProtocolError("unusable client ephemeral key", Reason.PROTOCOL) from exc
        self._group, access_key = self._match(hello)
        keys = _Schedule(access_key, rx, tx, hello, eph_pk)
        identity_key = bytes(self._identity.verify_key)
        th = transcript_hash(hello, eph_pk, identity_key, suite)
        signature = crypto.sign(self._identity, SERVER_SIG_PURPOSE, th)
        body = ServerHelloBody(identity_key, suite, signature)
        self._keys, self._transcript, self._suite = keys, th, suite
        self.client_hello = hello
        return ServerHello(eph_pk, _seal(keys.server_hello, body.encode(), eph_pk))

    @property
    def cipher(self) -> SessionCipher:
        """The session cipher, available once a ClientAuth opened."""
        if self.session is None:
            raise LocalProtocolError("no ClientAuth opened yet")
        return self.session

    def on_client_auth(self, payload: bytes) -> Authenticated:
        """Open and verify the ClientAuth; return who the client is and what it asks for.

        Whatever an outsider sends here fails the same way, whether or not its hello
        matched a group: the AEAD does not open (``DECRYPT_FAILED``, one text). Once it
        opened, the session keys exist (``session``), so that a refusal of the client's
        signature or group reaches it sealed."""
        keys = self._keys
        if keys is None:
            raise LocalProtocolError("ClientAuth before ClientHello")
        sealed = ClientAuth.decode(payload).sealed
        plain = _open(keys.client_auth, sealed, self._transcript, _AUTH_FAILED)
        if self._group is None:  # unreachable: nobody holds the random key; stated anyway
            raise RemoteProtocolError(_AUTH_FAILED, Reason.DECRYPT_FAILED)
        c2s, s2c = keys.session(self._transcript)
        self.session = SessionCipher(c2s, s2c, self._suite)
        body = ClientAuthBody.decode(plain)
        signed = auth_hash(self._transcript, body.identity_key, body.group_id, body.content_id)
        _verify(body.identity_key, CLIENT_SIG_PURPOSE, signed, body.signature)
        if body.group_id != self._group:
            raise RemoteProtocolError(
                "the ClientAuth names another group than its access key", Reason.NOT_MEMBER
            )
        return Authenticated(body.identity_key, body.group_id, body.content_id)
