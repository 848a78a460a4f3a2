"""The secrets of a private group, and sealing records with them (pure; no I/O).

A group's records never reach the DHT in the clear. Each is **sealed** into a ``Sealed``
record of a **space**: a 32-byte secret and a purpose (``epoch``: the members of one epoch;
``invite``: whoever holds the invite; ``mailbox``: the owner and one requester). From the
secret come, by keyed BLAKE2b (``crypto.digest``):

- the space's **write key**, an ed25519 key pair: it certifies each writer's **author**
  key (derived from the space's secret and the writer's identity), which signs the sealed
  record; a storing node keeps one record per author and tag, so no writer replaces
  another's;
- a **locator** per inner DHT key: the sealed record's DHT key is
  ``key_for(SEALED, write key, locator)``, so storing nodes accept a value there only when
  the write key signed it, and keys of different spaces cannot be linked;
- a **tag** per inner slot (the storing node's slot) and the **AEAD key**
  (XChaCha20-Poly1305, a random 24-byte nonce per seal).

Inner records are padded to a few sizes (``PAD_SIZES``) before encryption, so a file entry
does not give away the length of its name. Join requests are also sealed to the owner's
X25519 key (derived from its ed25519 key), so other invite holders cannot read them.

The **invite** token is ``base64url(1 ‖ invite secret (16) ‖ owner key (32))``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from dhtshare import crypto
from dhtshare.codec import Reader
from dhtshare.errors import DecodeError, GroupError, RecordError
from dhtshare.identity import Identity
from dhtshare.records import (
    AUTHOR_PURPOSE,
    BOX_SIZE,
    EPOCH_PAGE_BOXES,
    HINT_SIZE,
    MAX_EPOCH_PAGES,
    SECRET_SIZE,
    EpochBox,
    EpochPage,
    Kind,
    Sealed,
    SignedRecord,
    decode_record,
    key_for,
    sign_record,
    verify_record,
)

__all__ = [
    "INVITE_SECRET_SIZE",
    "PAD_SIZES",
    "Invite",
    "Space",
    "access_key",
    "epoch_box",
    "epoch_hint",
    "epoch_pages",
    "epoch_space",
    "mailbox",
    "my_box",
    "new_secret",
    "open_box",
    "open_sealed",
    "pad",
    "seal",
    "unpad",
]

INVITE_SECRET_SIZE = 16
_INVITE_VERSION = 1
_INVITE_BYTES = 1 + INVITE_SECRET_SIZE + crypto.PUBLIC_KEY_SIZE
_INVITE_CHARS = 66  # base64url of 49 bytes, no padding
_NONCE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
PAD_SIZES = (512, 1024, 2048, 4096, 7360)
"""Inner records (with a 2-byte length) are padded to the first of these that fits; the
largest keeps a sealed record within ``MAX_RECORD_SIZE`` (a record sealed to the owner as
well, 48 bytes more, is a join request: it pads to 512)."""


def new_secret() -> bytes:
    """A fresh 32-byte secret (an epoch's or a mailbox's)."""
    return os.urandom(SECRET_SIZE)


def access_key(epoch_secret: bytes) -> bytes:
    """The key the peer handshake proves knowledge of (``wire/handshake.py``)."""
    return crypto.digest("space/access", epoch_secret)


@dataclass(frozen=True)
class Space:
    """Where the holders of ``secret`` read and write (see the module docstring)."""

    secret: bytes
    purpose: str  # "epoch", "invite" or "mailbox"

    @cached_property
    def writer(self) -> Identity:
        seed = crypto.digest("space/write/" + self.purpose, self.secret)
        return Identity(SigningKey(seed))

    def author(self, identity: Identity) -> tuple[Identity, bytes]:
        """``identity``'s author key in this space and the space key's certificate of it:
        the same each time, unlinkable to ``identity`` without both secrets."""
        seed = crypto.digest(
            "space/author/" + self.purpose, self.secret, bytes(identity.signing_key)
        )
        author = Identity(SigningKey(seed))
        cert = crypto.sign(self.writer.signing_key, AUTHOR_PURPOSE, author.public)
        return author, cert

    @cached_property
    def aead_key(self) -> bytes:
        return crypto.digest("space/aead/" + self.purpose, self.secret)

    def locator(self, inner_key: bytes) -> bytes:
        """The locator of an inner DHT key in this space."""
        return crypto.digest("space/locate/" + self.purpose, self.secret, inner_key, size=20)

    def dht_key(self, inner_key: bytes) -> bytes:
        """The DHT key the sealed records of ``inner_key`` are stored under."""
        return key_for(Kind.SEALED, self.writer.public, self.locator(inner_key))

    def tag(self, inner_key: bytes, inner_slot: bytes) -> bytes:
        """The storing node's slot for the inner slot ``inner_slot`` of ``inner_key``."""
        return crypto.digest(
            "space/tag/" + self.purpose, self.secret, inner_key, inner_slot, size=16
        )


def pad(data: bytes) -> bytes:
    """``u16 length ‖ data ‖ zeros`` up to the first of ``PAD_SIZES`` that fits."""
    need = 2 + len(data)
    size = next((s for s in PAD_SIZES if s >= need), None)
    if size is None:
        raise RecordError(f"record of {len(data)} bytes too large to seal")
    return len(data).to_bytes(2, "big") + data + bytes(size - need)


def unpad(data: bytes) -> bytes:
    """The record ``pad`` wrapped; ``RecordError`` if the length does not fit."""
    if len(data) < 2:
        raise RecordError("sealed record too short")
    n = int.from_bytes(data[:2], "big")
    if 2 + n > len(data) or any(data[2 + n :]):
        raise RecordError("bad padding")
    return data[2 : 2 + n]


def _x25519_public(ed_public: bytes) -> PublicKey:
    try:
        return VerifyKey(ed_public).to_curve25519_public_key()
    except (CryptoError, ValueError) as exc:
        raise RecordError("not a usable public key") from exc


def _x25519_private(identity: Identity) -> PrivateKey:
    return identity.signing_key.to_curve25519_private_key()


def seal(
    space: Space,
    inner: SignedRecord,
    *,
    author: Identity,
    seq: int,
    now: float,
    to_owner: bytes | None = None,
) -> SignedRecord:
    """``inner`` as a sealed record of ``space`` written by ``author`` (its author key in
    the space signs it), valid as long as ``inner``; sealed to the X25519 key of
    ``to_owner`` as well when given (join requests)."""
    data = pad(inner.encode())
    if to_owner is not None:
        data = SealedBox(_x25519_public(to_owner)).encrypt(data)
    inner_key = inner.dht_key
    locator, tag = space.locator(inner_key), space.tag(inner_key, inner.slot)
    writer, cert = space.author(author)
    nonce = os.urandom(_NONCE)
    ad = space.writer.public + writer.public + locator + tag
    box = nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(data, ad, nonce, space.aead_key)
    ttl = max(1.0, inner.expires - now)
    body = Sealed(space.writer.public, cert, locator, tag, box)
    return sign_record(writer, body, seq=seq, now=now, ttl=ttl)


def open_sealed(
    space: Space,
    outer: SignedRecord,
    inner_key: bytes,
    now: float,
    *,
    owner: Identity | None = None,
) -> SignedRecord:
    """The verified inner record of ``outer`` filed under ``inner_key`` in ``space``;
    ``RecordError`` if anything does not check (wrong space, tampered, wrong key or slot).
    ``owner``: this space's records are also sealed to my X25519 key (the inbox)."""
    body = outer.payload()
    if not isinstance(body, Sealed) or body.space != space.writer.public:
        raise RecordError("not a sealed record of this space")
    if body.locator != space.locator(inner_key) or len(body.box) < _NONCE:
        raise RecordError("sealed record under another locator")
    nonce, ct = body.box[:_NONCE], body.box[_NONCE:]
    ad = space.writer.public + outer.signer + body.locator + body.tag
    try:
        data = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, ad, nonce, space.aead_key)
        if owner is not None:
            data = SealedBox(_x25519_private(owner)).decrypt(data)
    except CryptoError as exc:
        raise RecordError("sealed record does not open") from exc
    inner = decode_record(unpad(data))
    verify_record(inner, now)
    if inner.kind == Kind.SEALED or inner.dht_key != inner_key:
        raise RecordError("sealed record holds a record of another key")
    if body.tag != space.tag(inner_key, inner.slot):
        raise RecordError("sealed record in another slot")
    return inner


def epoch_hint(old_secret: bytes, member: bytes) -> bytes:
    """Which box of an epoch page is ``member``'s (only holders of the old epoch can tell)."""
    return crypto.digest("space/hint", old_secret, member, size=HINT_SIZE)


def epoch_box(old_secret: bytes, member: bytes, new_secret: bytes) -> EpochBox:
    """``new_secret`` sealed to ``member``'s X25519 key, with its hint."""
    box = SealedBox(_x25519_public(member)).encrypt(new_secret)
    assert len(box) == BOX_SIZE
    return EpochBox(epoch_hint(old_secret, member), bytes(box))


def open_box(identity: Identity, box: EpochBox) -> bytes | None:
    """The secret in ``box`` if it was sealed to ``identity``, else ``None``."""
    try:
        secret = SealedBox(_x25519_private(identity)).decrypt(box.box)
    except CryptoError:
        return None
    return bytes(secret) if len(secret) == SECRET_SIZE else None


@dataclass(frozen=True)
class Invite:
    """An invite: the secret of a group's inbox and the owner its requests are sealed to."""

    secret: bytes
    owner: bytes

    @classmethod
    def new(cls, owner: bytes) -> Invite:
        return cls(os.urandom(INVITE_SECRET_SIZE), owner)

    @property
    def token(self) -> str:
        raw = bytes([_INVITE_VERSION]) + self.secret + self.owner
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, text: str) -> Invite:
        """The invite ``text`` names; ``GroupError`` if it is not one."""
        text = text.strip()
        bad = GroupError("that is not an invite", "paste the whole invite the owner gave you")
        allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        if len(text) != _INVITE_CHARS or not set(text) <= allowed:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(text + "==")
        except (binascii.Error, ValueError) as exc:
            raise bad from exc
        if len(raw) != _INVITE_BYTES or raw[0] != _INVITE_VERSION:
            raise bad
        try:
            r = Reader(raw[1:])
            secret, owner = r.pull_bytes(INVITE_SECRET_SIZE), r.pull_bytes(crypto.PUBLIC_KEY_SIZE)
            r.finish()
            _x25519_public(owner)
        except (DecodeError, RecordError) as exc:
            raise bad from exc
        return cls(secret, owner)

    @property
    def space(self) -> Space:
        return Space(crypto.digest("space/invite", self.secret, self.owner), "invite")


def mailbox(reply: bytes) -> Space:
    """The space of one requester's mailbox (its reply secret, known to it and the owner)."""
    return Space(reply, "mailbox")


def epoch_space(secret: bytes) -> Space:
    return Space(secret, "epoch")


def epoch_pages(
    group_id: bytes, epoch: int, old_secret: bytes, new_secret: bytes, members: Iterable[bytes]
) -> list[EpochPage]:
    """The pages announcing ``epoch`` (its secret boxed for each of ``members``), ordered by
    hint so a member finds its box by hint alone."""
    boxes = sorted((epoch_box(old_secret, m, new_secret) for m in set(members)), key=_hint)
    chunks = [boxes[i : i + EPOCH_PAGE_BOXES] for i in range(0, len(boxes), EPOCH_PAGE_BOXES)]
    chunks = chunks or [[]]
    if len(chunks) > MAX_EPOCH_PAGES:
        raise RecordError("too many members for one epoch change")
    return [
        EpochPage(group_id, epoch, i, len(chunks), tuple(chunk)) for i, chunk in enumerate(chunks)
    ]


def _hint(box: EpochBox) -> bytes:
    return box.hint


def my_box(identity: Identity, old_secret: bytes, pages: Iterable[EpochPage]) -> bytes | None:
    """The new epoch secret boxed for ``identity`` in ``pages``, if any."""
    hint = epoch_hint(old_secret, identity.public)
    for page in pages:
        for box in page.boxes:
            if box.hint == hint:
                secret = open_box(identity, box)
                if secret is not None:
                    return secret
    return None
