"""A member's identity: an ed25519 key pair, a printable id, a fingerprint, a key file.

The key file is JSON, written with mode 0600. With a passphrase, the 32-byte seed is sealed
in a libsodium secret box whose key comes from argon2id (``nacl.pwhash``); without one the
seed is stored base64-encoded. A wrong passphrase or a damaged file is an ``IdentityError``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
from nacl.signing import SigningKey

from dhtshare import crypto
from dhtshare.atomic import write_atomic
from dhtshare.errors import IdentityError

__all__ = [
    "Identity",
    "describe_key_file",
    "fingerprint_of",
    "format_id",
    "parse_id",
]

_FILE_VERSION = 1
_ID_LENGTH = 52  # base32 of 32 bytes, unpadded
MAX_NAME_BYTES = 64  # records.MAX_NAME: a display name travels in join requests and rosters


def format_id(public: bytes) -> str:
    """The printable id of a public key: lowercase base32, no padding (52 characters)."""
    return base64.b32encode(public).decode("ascii").rstrip("=").lower()


def parse_id(text: str) -> bytes:
    """The public key a printable id names; ``IdentityError`` if it is not one."""
    cleaned = text.strip().upper()
    if len(cleaned) != _ID_LENGTH:
        raise IdentityError(f"not a member id: {text!r}", "an id is 52 base32 characters")
    try:
        return base64.b32decode(cleaned + "====")
    except binascii.Error as exc:
        raise IdentityError(f"not a member id: {text!r}", "an id is 52 base32 characters") from exc


def fingerprint_of(public: bytes) -> str:
    """A short hash of a public key for people to compare: ``ab12-cd34-ef56-7890``."""
    hexed = crypto.digest("fingerprint", public, size=8).hex()
    return "-".join(hexed[i : i + 4] for i in range(0, 16, 4))


def describe_key_file(path: Path) -> dict[str, Any]:
    """Id, name, fingerprint and whether it is protected, without the passphrase."""
    try:
        doc = json.loads(path.read_bytes())
        public = parse_id(str(doc["id"]))
        if "seed" in doc and bytes(SigningKey(base64.b64decode(doc["seed"])).verify_key) != public:
            raise ValueError("the key does not match its id")
    except FileNotFoundError as exc:
        raise IdentityError(
            f"no identity at {path}", "create one with: dhtshare id create"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, IdentityError) as exc:
        raise IdentityError(f"key file {path} is damaged", "restore it from a backup") from exc
    return {
        "id": format_id(public),
        "name": str(doc.get("name", "")),
        "fingerprint": fingerprint_of(public),
        "protected": "sealed" in doc,
    }


@dataclass(frozen=True)
class Identity:
    """An ed25519 signing key and the display name its owner chose."""

    signing_key: SigningKey
    name: str = ""

    @classmethod
    def generate(cls, name: str = "") -> Identity:
        """A new key pair; the display name must fit in records (64 bytes of UTF-8)."""
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise IdentityError(
                f"name longer than {MAX_NAME_BYTES} bytes", "choose a shorter --name"
            )
        return cls(SigningKey.generate(), name)

    @property
    def public(self) -> bytes:
        """The 32-byte public key: the member id on the wire and in records."""
        return bytes(self.signing_key.verify_key)

    @property
    def id(self) -> str:
        return format_id(self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public)

    def save(self, path: Path, passphrase: bytes | None = None) -> None:
        """Write the key file atomically with mode 0600."""
        seed = bytes(self.signing_key)
        doc: dict[str, Any] = {"version": _FILE_VERSION, "name": self.name, "id": self.id}
        if passphrase:
            doc["sealed"] = _seal(seed, passphrase)
        else:
            doc["seed"] = base64.b64encode(seed).decode("ascii")
        _write_private(path, json.dumps(doc, indent=2).encode("utf-8"))

    @classmethod
    def load(cls, path: Path, passphrase: bytes | None = None) -> Identity:
        """Read a key file; ``IdentityError`` if missing, damaged or the passphrase is wrong."""
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise IdentityError(
                f"no identity at {path}", "create one with: dhtshare id create"
            ) from exc
        except (OSError, ValueError) as exc:
            raise IdentityError(f"key file {path} is damaged", "restore it from a backup") from exc
        return cls._from_doc(doc, path, passphrase)

    @classmethod
    def _from_doc(cls, doc: Any, path: Path, passphrase: bytes | None) -> Identity:
        damaged = IdentityError(f"key file {path} is damaged", "restore it from a backup")
        if not isinstance(doc, dict) or doc.get("version") != _FILE_VERSION:
            raise damaged
        try:
            if "sealed" in doc:
                if not passphrase:
                    raise IdentityError(
                        f"key file {path} is passphrase-protected",
                        "pass the passphrase with --passphrase-file",
                    )
                seed = _open_sealed(doc["sealed"], passphrase)
            else:
                seed = base64.b64decode(doc["seed"], validate=True)
            identity = cls(SigningKey(seed), str(doc.get("name", "")))
        except (KeyError, TypeError, ValueError, binascii.Error, nacl.exceptions.CryptoError) as e:
            raise damaged from e
        if doc.get("id") != identity.id:
            raise damaged
        return identity


def _seal(seed: bytes, passphrase: bytes) -> dict[str, Any]:
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    ops = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
    mem = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
    key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, ops, mem)
    box = nacl.secret.SecretBox(key).encrypt(seed)
    return {
        "kdf": "argon2id",
        "opslimit": ops,
        "memlimit": mem,
        "salt": base64.b64encode(salt).decode("ascii"),
        "box": base64.b64encode(bytes(box)).decode("ascii"),
    }


def _open_sealed(sealed: dict[str, Any], passphrase: bytes) -> bytes:
    if sealed.get("kdf") != "argon2id":
        raise ValueError("unknown kdf")
    salt = base64.b64decode(sealed["salt"], validate=True)
    key = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        passphrase,
        salt,
        int(sealed["opslimit"]),
        int(sealed["memlimit"]),
    )
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(base64.b64decode(sealed["box"])))
    except nacl.exceptions.CryptoError as exc:
        raise IdentityError("wrong passphrase", "check the passphrase file and try again") from exc


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a 0600 temp file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data)  # its temp file is created 0600, so the key is never readable
