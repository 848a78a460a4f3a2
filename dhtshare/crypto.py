"""Signing with a purpose, and the hashes that name things.

Every signature covers ``b"dhtshare/v1/" + purpose + b"\\x00" + message``, so a signature made
for one record kind (or for the handshake) can never be replayed as another. Hashes are
BLAKE2b with a personalisation per use; DHT keys are 20 bytes, like kademlia's digests.
"""

from __future__ import annotations

import hashlib

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "DHT_KEY_SIZE",
    "HASH_SIZE",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "dht_key",
    "digest",
    "sign",
    "verify",
]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
DHT_KEY_SIZE = 20
HASH_SIZE = 32
"""A SHA-256 hash: a piece hash, and a content id (the root of a file's hash tree)."""
_PREFIX = b"dhtshare/v1/"


def _domain(purpose: str, message: bytes) -> bytes:
    return _PREFIX + purpose.encode("ascii") + b"\x00" + message


def sign(key: SigningKey, purpose: str, message: bytes) -> bytes:
    """An ed25519 signature over ``message`` for ``purpose`` only."""
    return bytes(key.sign(_domain(purpose, message)).signature)


def verify(public: bytes, purpose: str, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``message`` for ``purpose``."""
    if len(public) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        VerifyKey(public).verify(_domain(purpose, message), signature)
    except (BadSignatureError, CryptoError, ValueError):
        return False
    return True


def digest(purpose: str, *parts: bytes, size: int = 32) -> bytes:
    """BLAKE2b of length-prefixed ``parts``, personalised by ``purpose``."""
    h = hashlib.blake2b(digest_size=size)
    h.update(_domain(purpose, b""))
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def dht_key(kind: str, *ids: bytes) -> bytes:
    """The 20-byte DHT key for a record ``kind`` about the given content ids."""
    return digest("key/" + kind, *ids, size=DHT_KEY_SIZE)
