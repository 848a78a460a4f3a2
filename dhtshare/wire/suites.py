"""The AEADs that seal frames, and which one two peers agree on (pure; no I/O).

Two suites, both from libsodium through PyNaCl:

- ``CHACHA20_POLY1305`` (IETF): every peer speaks it; fast without AES hardware.
- ``AEGIS_128L``: about five times faster where the CPU has AES instructions
  (x86 AES-NI, ARMv8 crypto extensions), and it has no practical limit on how much
  one key may seal, unlike AES-GCM. Without AES hardware libsodium falls back to
  a slow software version, so a peer only offers it when the hardware is there.

The client offers a bit mask of the suites it has; the server picks the first of
``PREFERENCE`` that both have. The pick is signed in the handshake transcript, so a
man in the middle cannot downgrade it. Each direction's key is derived from the
``crypto_kx`` session key *and* the suite, so one key never serves two algorithms.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

import nacl.bindings as sodium
import nacl.exceptions

__all__ = [
    "PREFERENCE",
    "Aead",
    "Suite",
    "choose",
    "local_suites",
    "mask_of",
    "session_key",
]


class Suite(IntEnum):
    """A suite's value is its bit in the ClientHello's offer mask."""

    CHACHA20_POLY1305 = 0x01
    AEGIS_128L = 0x02


PREFERENCE = (Suite.AEGIS_128L, Suite.CHACHA20_POLY1305)
"""The server's order of choice: the fastest suite both sides have."""

_Seal = Callable[[bytes, bytes, bytes, bytes], bytes]  # (message, ad, nonce, key)


@dataclass(frozen=True, slots=True)
class Aead:
    """Sizes and libsodium's combined-mode functions of one suite."""

    key_size: int
    nonce_size: int
    tag_size: int
    encrypt: _Seal
    decrypt: _Seal


AEADS: dict[Suite, Aead] = {
    Suite.CHACHA20_POLY1305: Aead(
        sodium.crypto_aead_chacha20poly1305_ietf_KEYBYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_NPUBBYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_ABYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
        sodium.crypto_aead_chacha20poly1305_ietf_decrypt,
    ),
    Suite.AEGIS_128L: Aead(
        sodium.crypto_aead_aegis128l_KEYBYTES,
        sodium.crypto_aead_aegis128l_NPUBBYTES,
        sodium.crypto_aead_aegis128l_ABYTES,
        sodium.crypto_aead_aegis128l_encrypt,
        sodium.crypto_aead_aegis128l_decrypt,
    ),
}


@functools.cache
def _has_aes_hardware() -> bool:
    """True when libsodium finds AES instructions (it refuses AES-GCM otherwise)."""
    try:
        sodium.crypto_aead_aes256gcm_encrypt(b"", None, bytes(12), bytes(32))
    except nacl.exceptions.UnavailableError:
        return False
    return True


def local_suites() -> frozenset[Suite]:
    """The suites this machine runs fast: ChaCha20 always, AEGIS with AES hardware."""
    if _has_aes_hardware():
        return frozenset(Suite)
    return frozenset({Suite.CHACHA20_POLY1305})


def mask_of(suites: Iterable[Suite]) -> int:
    """The offer mask of ``suites``."""
    mask = 0
    for suite in suites:
        mask |= suite
    return mask


def choose(offered: int, ours: Iterable[Suite]) -> Suite | None:
    """The first suite of ``PREFERENCE`` in both the ``offered`` mask and ``ours``."""
    mine = set(ours)
    for suite in PREFERENCE:
        if offered & suite and suite in mine:
            return suite
    return None


def session_key(suite: Suite, kx_key: bytes) -> bytes:
    """The AEAD key of one direction: keyed BLAKE2b of the suite's name."""
    label = b"dhtshare/v2/session/" + suite.name.encode("ascii")
    return hashlib.blake2b(label, key=kx_key, digest_size=AEADS[suite].key_size).digest()
