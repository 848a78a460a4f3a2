"""The AEADs that seal frames, and which one two peers agree on (pure; no I/O).

Two suites, both from libsodium through PyNaCl:

- ``CHACHA20_POLY1305`` (IETF): every peer speaks it; fast without AES hardware.
- ``AEGIS_128L``: several times faster where the CPU has AES instructions
  (x86 AES-NI, ARMv8 crypto extensions; figures in docs/performance-history.md,
  round 4), and it has no practical limit on how much
  one key may seal, unlike AES-GCM. Without AES hardware libsodium falls back to
  a slow software version, so a peer only offers it when the hardware is there.

The client offers a bit mask of the suites it has; the server picks the first of
``PREFERENCE`` that both have. The pick is signed in the handshake transcript, so a
man in the middle cannot downgrade it. Each direction's key is derived from the
``crypto_kx`` session key *and* the suite, so one key never serves two algorithms.

Frames are sealed into and opened from caller-owned buffers. PyNaCl's public AEAD
functions take only ``bytes`` and return new ``bytes``: per block that is a copy in, a
zero-fill and a copy out, as costly as the cipher itself with AEGIS (measured in
docs/performance-history.md, round 5). libsodium's C functions write where they are
told; we call them through the cffi module PyNaCl itself uses (``nacl._sodium``). If that
module is missing or changed, the public functions serve instead (same bytes,
slower); ``FAST_AEAD`` says which path is in use.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

import nacl.bindings as sodium
import nacl.exceptions

_ffi: Any = None
_lib: Any = None
try:  # PyNaCl's own cffi binding of libsodium: see the module docstring
    import nacl._sodium as _c_sodium  # type: ignore[import-not-found]

    _ffi, _lib = _c_sodium.ffi, _c_sodium.lib
except (ImportError, AttributeError):  # pragma: no cover - then the public API serves
    pass

__all__ = [
    "FAST_AEAD",
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

Buffer: TypeAlias = bytes | bytearray | memoryview
_Seal = Callable[[bytes, bytes | None, bytes, bytes], bytes]  # PyNaCl: (message, ad, nonce, key)


@dataclass(frozen=True, slots=True)
class Aead:
    """One suite's sizes and its libsodium combined-mode functions.

    ``name`` is the libsodium prefix (``crypto_aead_<name>_encrypt``); ``encrypt`` and
    ``decrypt`` are PyNaCl's public functions, used when the C ones are not at hand.
    """

    name: str
    key_size: int
    nonce_size: int
    tag_size: int
    encrypt: _Seal
    decrypt: _Seal

    def seal_into(self, out: Buffer, message: Buffer, ad: bytes, nonce: bytes, key: bytes) -> None:
        """Write ``message`` sealed (ciphertext, then tag) into ``out``, which must be
        exactly ``tag_size`` bytes longer than it."""
        self._check_key(nonce, key)
        with memoryview(message) as m, memoryview(out) as o, m.cast("B") as src, o.cast("B") as dst:
            if len(dst) != len(src) + self.tag_size:
                raise ValueError("output buffer must be the message plus the tag")
            c_encrypt = _c_function(self.name, "encrypt")
            if c_encrypt is None:
                dst[:] = self.encrypt(bytes(src), ad, nonce, key)
                return
            written = _ffi.new("unsigned long long *")
            rc = c_encrypt(
                _ffi.from_buffer(dst, require_writable=True),
                written,
                _ffi.from_buffer(src),
                len(src),
                ad,
                len(ad),
                _ffi.NULL,
                nonce,
                key,
            )
        if rc != 0:
            raise ValueError("libsodium refused to seal the message")

    def open_new(self, sealed: Buffer, ad: bytes, nonce: bytes, key: bytes) -> bytearray:
        """The plaintext of ``sealed`` in a new ``bytearray``; ``nacl.exceptions.CryptoError``
        if it does not authenticate."""
        self._check_key(nonce, key)
        with memoryview(sealed) as view, view.cast("B") as src:
            if len(src) < self.tag_size:
                raise nacl.exceptions.CryptoError("shorter than its tag")
            c_decrypt = _c_function(self.name, "decrypt")
            if c_decrypt is None:
                return bytearray(self.decrypt(bytes(src), ad, nonce, key))
            out = bytearray(len(src) - self.tag_size)
            written = _ffi.new("unsigned long long *")
            rc = c_decrypt(
                _ffi.from_buffer(out, require_writable=True),
                written,
                _ffi.NULL,
                _ffi.from_buffer(src),
                len(src),
                ad,
                len(ad),
                nonce,
                key,
            )
        if rc != 0:
            raise nacl.exceptions.CryptoError("Decryption failed.")
        return out

    def _check_key(self, nonce: bytes, key: bytes) -> None:
        # libsodium's C functions read exactly this many bytes through the pointers
        if len(nonce) != self.nonce_size or len(key) != self.key_size:
            raise ValueError(
                f"{self.name} wants a {self.nonce_size}-byte nonce and a {self.key_size}-byte key"
            )


@functools.cache
def _c_function(name: str, op: str) -> Any:
    """libsodium's ``crypto_aead_<name>_<op>`` from PyNaCl's cffi module, or None."""
    return None if _ffi is None else getattr(_lib, f"crypto_aead_{name}_{op}", None)


AEADS: dict[Suite, Aead] = {
    Suite.CHACHA20_POLY1305: Aead(
        "chacha20poly1305_ietf",
        sodium.crypto_aead_chacha20poly1305_ietf_KEYBYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_NPUBBYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_ABYTES,
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
        sodium.crypto_aead_chacha20poly1305_ietf_decrypt,
    ),
    Suite.AEGIS_128L: Aead(
        "aegis128l",
        sodium.crypto_aead_aegis128l_KEYBYTES,
        sodium.crypto_aead_aegis128l_NPUBBYTES,
        sodium.crypto_aead_aegis128l_ABYTES,
        sodium.crypto_aead_aegis128l_encrypt,
        sodium.crypto_aead_aegis128l_decrypt,
    ),
}

FAST_AEAD = all(
    _c_function(aead.name, op) is not None
    for aead in AEADS.values()
    for op in ("encrypt", "decrypt")
)
"""True when frames are sealed and opened in place through libsodium's C functions."""


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
