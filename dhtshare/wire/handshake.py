"""Mutual authentication and per-direction session keys (pure; see docs/wire.md).

Three messages::

    client -> server  ClientHello  magic, version, client identity key, client
                                   ephemeral X25519 key, group id, content id, nonce,
                                   the cipher suites it offers
    server -> client  ServerHello  server identity key, server ephemeral key, the
                                   suite it chose, server signature over the transcript
    client -> server  ClientAuth   client signature over the transcript

Both signatures cover the same transcript hash (``crypto.digest`` of the whole
ClientHello, the server's two keys and its chosen suite) under different purposes,
so each side's identity key vouches for both ephemeral keys and the suite, and a
spliced, replayed or downgraded handshake fails. Session keys come from
``crypto_kx`` on the ephemeral keys: one key per direction, and every later frame
is sealed with the chosen AEAD (``wire/suites.py``) under a nonce that counts
frames in that direction.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from dhtshare import crypto
from dhtshare.codec import Reader, Writer
from dhtshare.errors import LocalProtocolError, Malformed, RemoteProtocolError
from dhtshare.wire.frames import FRAME_HEADER_SIZE, MAX_FRAME, FrameType, Reason, frame_header
from dhtshare.wire.suites import AEADS, Buffer, Suite, choose, local_suites, mask_of, session_key

__all__ = [
    "CLIENT_SIG_PURPOSE",
    "MAGIC",
    "NONCE_SIZE",
    "SERVER_SIG_PURPOSE",
    "TRANSCRIPT_PURPOSE",
    "VERSION",
    "ClientAuth",
    "ClientHandshake",
    "ClientHello",
    "ServerHandshake",
    "ServerHello",
    "SessionCipher",
    "transcript_hash",
]

MAGIC = b"DHTSHARE"
VERSION = 2
NONCE_SIZE = 16
_EPHEMERAL_KEY_SIZE = sodium.crypto_kx_PUBLIC_KEY_BYTES
_FIELD_SIZES = {
    "identity_key": crypto.PUBLIC_KEY_SIZE,
    "ephemeral_key": _EPHEMERAL_KEY_SIZE,
    "group_id": crypto.HASH_SIZE,
    "content_id": crypto.HASH_SIZE,
}
# crypto.py prefixes each purpose with b"dhtshare/v1/" and ends it with a zero byte.
TRANSCRIPT_PURPOSE = "handshake/transcript"
SERVER_SIG_PURPOSE = "handshake/server"
CLIENT_SIG_PURPOSE = "handshake/client"

_SUITE_VALUES = frozenset(int(suite) for suite in Suite)
_COUNTER = struct.Struct(">Q")  # the AEAD nonce ends in a u64 frame counter; zeros before
_MAX_COUNTER = (1 << 64) - 1


def _fixed(value: bytes, size: int, name: str) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")


def _protocol_error(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, Reason.PROTOCOL)


_MALFORMED_CLIENT_HELLO = Malformed("ClientHello", _protocol_error)
_MALFORMED_SERVER_HELLO = Malformed("ServerHello", _protocol_error)


@dataclass(frozen=True, slots=True)
class ClientHello:
    identity_key: bytes
    ephemeral_key: bytes
    group_id: bytes
    content_id: bytes
    nonce: bytes
    suites: int
    """Bit mask of the offered ``Suite`` values."""
    version: int = VERSION

    def __post_init__(self) -> None:
        for name, size in _FIELD_SIZES.items():
            _fixed(getattr(self, name), size, name)
        _fixed(self.nonce, NONCE_SIZE, "nonce")
        if not 0 <= self.suites <= 0xFF:
            raise ValueError(f"suite mask {self.suites} does not fit a byte")

    def encode(self) -> bytes:
        w = Writer().push_bytes(MAGIC).push_u8(self.version)
        for part in (self.identity_key, self.ephemeral_key, self.group_id, self.content_id):
            w.push_bytes(part)
        return w.push_bytes(self.nonce).push_u8(self.suites).getvalue()

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
                identity_key=r.pull_bytes(crypto.PUBLIC_KEY_SIZE),
                ephemeral_key=r.pull_bytes(_EPHEMERAL_KEY_SIZE),
                group_id=r.pull_bytes(crypto.HASH_SIZE),
                content_id=r.pull_bytes(crypto.HASH_SIZE),
                nonce=r.pull_bytes(NONCE_SIZE),
                suites=r.pull_u8(),
                version=version,
            )
            r.finish()
        return hello


@dataclass(frozen=True, slots=True)
class ServerHello:
    identity_key: bytes
    ephemeral_key: bytes
    suite: int
    """The chosen ``Suite`` (the client checks that it offered it)."""
    signature: bytes

    def __post_init__(self) -> None:
        _fixed(self.identity_key, crypto.PUBLIC_KEY_SIZE, "identity_key")
        _fixed(self.ephemeral_key, _EPHEMERAL_KEY_SIZE, "ephemeral_key")
        _fixed(self.signature, crypto.SIGNATURE_SIZE, "signature")
        if not 0 <= self.suite <= 0xFF:
            raise ValueError(f"suite {self.suite} does not fit a byte")

    def encode(self) -> bytes:
        return self.identity_key + self.ephemeral_key + bytes([self.suite]) + self.signature

    @classmethod
    def decode(cls, data: bytes) -> ServerHello:
        with _MALFORMED_SERVER_HELLO:
            r = Reader(data)
            hello = cls(
                r.pull_bytes(crypto.PUBLIC_KEY_SIZE),
                r.pull_bytes(_EPHEMERAL_KEY_SIZE),
                r.pull_u8(),
                r.pull_bytes(crypto.SIGNATURE_SIZE),
            )
            r.finish()
        return hello


@dataclass(frozen=True, slots=True)
class ClientAuth:
    signature: bytes

    def __post_init__(self) -> None:
        _fixed(self.signature, crypto.SIGNATURE_SIZE, "signature")

    def encode(self) -> bytes:
        return self.signature

    @classmethod
    def decode(cls, data: bytes) -> ClientAuth:
        if len(data) != crypto.SIGNATURE_SIZE:
            raise RemoteProtocolError("malformed ClientAuth", Reason.PROTOCOL)
        return cls(bytes(data))


def transcript_hash(
    hello: ClientHello, server_identity: bytes, server_ephemeral: bytes, suite: int
) -> bytes:
    """The hash both signatures cover: the encoded ClientHello, the server's two keys
    and the suite it chose."""
    return crypto.digest(
        TRANSCRIPT_PURPOSE, hello.encode(), server_identity, server_ephemeral, bytes([suite])
    )


def _verify(public_key: bytes, purpose: str, transcript: bytes, signature: bytes) -> None:
    if not crypto.verify(public_key, purpose, transcript, signature):
        raise RemoteProtocolError("handshake signature does not verify", Reason.BAD_SIGNATURE)


class SessionCipher:
    """Seals outgoing and opens incoming ``SEALED`` frames, one counter per direction.

    The frame header is the associated data, so length and type are authenticated
    too. A tampered, replayed, reordered or dropped frame fails to open. ``rx_key``
    and ``tx_key`` are the ``crypto_kx`` session keys; each direction's AEAD key is
    derived from one of them and the suite.
    """

    __slots__ = ("_aead", "_nonce_pad", "_rx_count", "_rx_key", "_tx_count", "_tx_key", "suite")

    def __init__(
        self, rx_key: bytes, tx_key: bytes, suite: Suite = Suite.CHACHA20_POLY1305
    ) -> None:
        self.suite = suite
        self._aead = AEADS[suite]
        self._nonce_pad = bytes(self._aead.nonce_size - _COUNTER.size)
        self._rx_key = session_key(suite, rx_key)
        self._tx_key = session_key(suite, tx_key)
        self._rx_count = 0
        self._tx_count = 0

    @property
    def tag_size(self) -> int:
        """Bytes the AEAD adds to every message."""
        return self._aead.tag_size

    def seal(self, plaintext: Buffer) -> bytearray:
        """A complete ``SEALED`` frame carrying ``plaintext`` (sealed straight into it)."""
        if self._tx_count > _MAX_COUNTER:
            raise LocalProtocolError("send nonce exhausted; reconnect")
        size = len(plaintext) + self._aead.tag_size
        if size > MAX_FRAME:
            raise LocalProtocolError(f"message of {len(plaintext)} bytes does not fit a frame")
        header = frame_header(FrameType.SEALED, size)
        nonce = self._nonce_pad + _COUNTER.pack(self._tx_count)
        self._tx_count += 1
        frame = bytearray(FRAME_HEADER_SIZE + size)
        frame[:FRAME_HEADER_SIZE] = header
        with memoryview(frame) as view, view[FRAME_HEADER_SIZE:] as body:
            self._aead.seal_into(body, plaintext, header, nonce, self._tx_key)
        return frame

    def open(self, payload: Buffer) -> bytearray:
        """The plaintext of the next incoming ``SEALED`` frame's payload (which may be a
        view into the receive buffer: it is read, not kept)."""
        if len(payload) < self._aead.tag_size:
            raise RemoteProtocolError("sealed frame shorter than its tag", Reason.DECRYPT_FAILED)
        header = frame_header(FrameType.SEALED, len(payload))
        nonce = self._nonce_pad + _COUNTER.pack(self._rx_count)
        try:
            plaintext = self._aead.open_new(payload, header, nonce, self._rx_key)
        except nacl.exceptions.CryptoError as exc:
            raise RemoteProtocolError(
                f"frame {self._rx_count} failed authentication", Reason.DECRYPT_FAILED
            ) from exc
        self._rx_count += 1
        return plaintext


class ClientHandshake:
    """The client's half: makes the ClientHello, checks the ServerHello, signs ClientAuth.

    ``suites`` are the ones it offers (default: ``local_suites()``).
    """

    def __init__(
        self,
        identity: nacl.signing.SigningKey,
        group_id: bytes,
        content_id: bytes,
        suites: frozenset[Suite] | None = None,
    ) -> None:
        self._identity = identity
        self._eph_pk, self._eph_sk = sodium.crypto_kx_keypair()
        self.hello = ClientHello(
            identity_key=bytes(identity.verify_key),
            ephemeral_key=self._eph_pk,
            group_id=group_id,
            content_id=content_id,
            nonce=os.urandom(NONCE_SIZE),
            suites=mask_of(local_suites() if suites is None else suites),
        )
        if not self.hello.suites:
            raise ValueError("a client must offer at least one cipher suite")

    def on_server_hello(self, payload: bytes) -> tuple[ServerHello, SessionCipher, ClientAuth]:
        """Verify the ServerHello; return it, the session cipher and our ClientAuth."""
        server = ServerHello.decode(payload)
        th = transcript_hash(self.hello, server.identity_key, server.ephemeral_key, server.suite)
        _verify(server.identity_key, SERVER_SIG_PURPOSE, th, server.signature)
        if server.suite not in _SUITE_VALUES or not self.hello.suites & server.suite:
            raise RemoteProtocolError(
                f"server chose cipher suite {server.suite}, which we did not offer",
                Reason.NO_COMMON_SUITE,
            )
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(
                self._eph_pk, self._eph_sk, server.ephemeral_key
            )
        except nacl.exceptions.CryptoError as exc:
            raise RemoteProtocolError("unusable server ephemeral key", Reason.PROTOCOL) from exc
        auth = ClientAuth(crypto.sign(self._identity, CLIENT_SIG_PURPOSE, th))
        return server, SessionCipher(rx, tx, Suite(server.suite)), auth


class ServerHandshake:
    """The server's half: answers a ClientHello, then checks the ClientAuth.

    It picks the preferred suite among the client's offer and ``suites`` (default:
    ``local_suites()``).
    """

    def __init__(
        self, identity: nacl.signing.SigningKey, suites: frozenset[Suite] | None = None
    ) -> None:
        self._identity = identity
        self._suites = local_suites() if suites is None else suites
        self.client_hello: ClientHello | None = None
        self._transcript = b""
        self._cipher: SessionCipher | None = None

    def on_client_hello(self, payload: bytes) -> ServerHello:
        """Parse the ClientHello, derive session keys, and sign our ServerHello."""
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
        identity_key = bytes(self._identity.verify_key)
        self._transcript = transcript_hash(hello, identity_key, eph_pk, suite)
        self.client_hello = hello
        self._cipher = SessionCipher(rx, tx, suite)
        signature = crypto.sign(self._identity, SERVER_SIG_PURPOSE, self._transcript)
        return ServerHello(identity_key, eph_pk, suite, signature)

    @property
    def cipher(self) -> SessionCipher:
        """The session cipher, available once the ClientHello has been answered."""
        if self._cipher is None:
            raise LocalProtocolError("no ClientHello answered yet")
        return self._cipher

    def on_client_auth(self, payload: bytes) -> ClientHello:
        """Verify the client's signature; return the (now authenticated) ClientHello."""
        hello = self.client_hello
        if hello is None:
            raise LocalProtocolError("ClientAuth before ClientHello")
        auth = ClientAuth.decode(payload)
        _verify(hello.identity_key, CLIENT_SIG_PURPOSE, self._transcript, auth.signature)
        return hello
