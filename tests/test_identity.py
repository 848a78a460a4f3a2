"""Identities: key files are private, passphrases protect them, damage is reported clearly."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dhtshare.errors import IdentityError
from dhtshare.identity import Identity, describe_key_file, format_id, parse_id


def test_save_and_load_plain(tmp_path: Path) -> None:
    me = Identity.generate("alice")
    path = tmp_path / "identity.json"
    me.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = Identity.load(path)
    assert back.public == me.public and back.name == "alice"
    assert len(me.id) == 52 and parse_id(me.id) == me.public
    assert len(me.fingerprint) == 19 and me.fingerprint.count("-") == 3


def test_passphrase_protects_the_key(tmp_path: Path) -> None:
    me = Identity.generate("bob")
    path = tmp_path / "identity.json"
    me.save(path, passphrase=b"correct horse")
    assert me.id not in path.read_text().split('"seed"')[0] or "seed" not in path.read_text()
    assert Identity.load(path, b"correct horse").public == me.public
    with pytest.raises(IdentityError, match="wrong passphrase"):
        Identity.load(path, b"wrong")
    with pytest.raises(IdentityError, match="passphrase-protected"):
        Identity.load(path)


def test_missing_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="no identity"):
        Identity.load(tmp_path / "nope.json")
    path = tmp_path / "identity.json"
    Identity.generate().save(path)
    doc = json.loads(path.read_text())
    doc["seed"] = doc["seed"][:-4] + "AAAA"
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="damaged"):
        Identity.load(path)
    path.write_text("{not json")
    with pytest.raises(IdentityError, match="damaged"):
        Identity.load(path)


def test_parse_id_rejects_garbage() -> None:
    with pytest.raises(IdentityError):
        parse_id("hello")
    with pytest.raises(IdentityError):
        parse_id("1" * 52)
    assert parse_id(format_id(b"\x00" * 32)) == b"\x00" * 32


def test_names_must_fit_in_records() -> None:
    with pytest.raises(IdentityError, match="longer than 64 bytes"):
        Identity.generate("x" * 65)
    assert Identity.generate("é" * 32).name == "é" * 32


def test_key_file_is_private_and_describe_checks_the_key(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.json"
    me = Identity.generate("a")
    me.save(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert describe_key_file(path)["id"] == me.id
    doc = json.loads(path.read_text())
    doc["seed"] = json.loads(_other_key_file(tmp_path))["seed"]
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="damaged"):
        describe_key_file(path)


def _other_key_file(tmp_path: Path) -> str:
    other = tmp_path / "other.json"
    Identity.generate().save(other)
    return other.read_text()
