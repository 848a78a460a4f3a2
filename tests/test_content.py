"""Piece layout, piece hashes and the hash-tree root (content.py)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from dhtshare.content import (
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    FileLayout,
    content_id_hex,
    hash_file,
    is_valid_piece_size,
    match_content_id,
    merkle_root,
    parse_content_id,
    piece_size_for,
    verify_hash_list,
)
from dhtshare.errors import FileShareError

KiB = 1024
MiB = 1024 * KiB


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _leaf(h: bytes) -> bytes:
    return _sha(b"\x00" + h)


def _node(left: bytes, right: bytes) -> bytes:
    return _sha(b"\x01" + left + right)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, MIN_PIECE_SIZE),
        (1, MIN_PIECE_SIZE),
        (2048 * 256 * KiB, 256 * KiB),
        (2048 * 256 * KiB + 1, 512 * KiB),
        (2048 * 512 * KiB, 512 * KiB),
        (2048 * 512 * KiB + 1, 1 * MiB),
        (2048 * 16 * MiB, 16 * MiB),
        (10 * 2048 * 16 * MiB, MAX_PIECE_SIZE),
    ],
)
def test_piece_size_boundaries(size: int, expected: int) -> None:
    assert piece_size_for(size) == expected


def test_piece_size_keeps_piece_count_bounded() -> None:
    for size in (3 * MiB, 700 * MiB, 5000 * MiB, 20_000 * MiB):
        layout = FileLayout.for_size(size)
        assert layout.piece_count <= 2048
        assert is_valid_piece_size(layout.piece_size)


def test_piece_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        piece_size_for(-1)


def test_valid_piece_size() -> None:
    assert is_valid_piece_size(256 * KiB)
    assert not is_valid_piece_size(128 * KiB)
    assert not is_valid_piece_size(300 * KiB)
    assert not is_valid_piece_size(32 * MiB)


def test_layout_pieces() -> None:
    layout = FileLayout(size=10, piece_size=4)
    assert layout.piece_count == 3
    assert [layout.piece_offset(i) for i in range(3)] == [0, 4, 8]
    assert layout.piece_lengths() == [4, 4, 2]
    with pytest.raises(IndexError):
        layout.piece_length(3)


def test_layout_exact_multiple_and_empty() -> None:
    assert FileLayout(size=8, piece_size=4).piece_lengths() == [4, 4]
    assert FileLayout(size=0, piece_size=4).piece_count == 0


def test_merkle_root_known_inputs() -> None:
    a, b, c = _sha(b"a"), _sha(b"b"), _sha(b"c")
    assert merkle_root([]) == _sha(b"\x02")
    assert merkle_root([a]) == _leaf(a)
    assert merkle_root([a, b]) == _node(_leaf(a), _leaf(b))
    # odd node promoted: c's leaf goes up unchanged
    assert merkle_root([a, b, c]) == _node(_node(_leaf(a), _leaf(b)), _leaf(c))


def test_merkle_root_known_vector() -> None:
    # fixed vector, so the content id format cannot drift unnoticed
    hashes = [_sha(bytes([i])) for i in range(5)]
    expected = _node(
        _node(_node(_leaf(hashes[0]), _leaf(hashes[1])), _node(_leaf(hashes[2]), _leaf(hashes[3]))),
        _leaf(hashes[4]),
    )
    assert merkle_root(hashes) == expected


def test_merkle_root_order_and_domain_separation() -> None:
    a, b = _sha(b"a"), _sha(b"b")
    assert merkle_root([a, b]) != merkle_root([b, a])
    # a one-leaf tree over an inner node's value is not the two-leaf root
    inner = _node(_leaf(a), _leaf(b))
    assert merkle_root([inner]) != merkle_root([a, b])


def test_verify_hash_list() -> None:
    hashes = [_sha(bytes([i])) for i in range(7)]
    root = merkle_root(hashes)
    assert verify_hash_list(hashes, root)
    assert verify_hash_list(hashes, root, piece_count=7)
    assert not verify_hash_list(hashes, root, piece_count=6)
    assert not verify_hash_list(hashes[:-1], root)
    assert not verify_hash_list([*hashes[:-1], b"\x00" * 32], root)
    assert not verify_hash_list([*hashes, b"short"], merkle_root([*hashes, b"short"]))


def _write(path: Path, size: int) -> bytes:
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    return data


def test_hash_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = _write(path, 3 * 1000 + 17)
    hashes = hash_file(path, 1000)
    expected = [_sha(data[i : i + 1000]) for i in range(0, len(data), 1000)]
    assert hashes == expected
    assert len(hashes) == 4


def test_hash_file_piece_larger_than_chunk(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = _write(path, 3 * MiB + 5)
    hashes = hash_file(path, 2 * MiB)  # each piece needs two 1 MiB reads
    assert hashes == [_sha(data[: 2 * MiB]), _sha(data[2 * MiB :])]


def test_hash_file_progress_reaches_size(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    _write(path, 2 * MiB + 123)
    seen: list[int] = []
    hash_file(path, 256 * KiB, seen.append, expected_size=2 * MiB + 123)
    assert seen[-1] == 2 * MiB + 123
    assert seen == sorted(seen)
    assert len(seen) >= 9


def test_hash_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert hash_file(path, 4) == []


def test_hash_file_size_changed(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    _write(path, 100)
    with pytest.raises(FileShareError, match="changed"):
        hash_file(path, 64, expected_size=101)


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileShareError, match="cannot read") as info:
        hash_file(tmp_path / "nope", 64)
    assert info.value.hint


def test_content_id_printable() -> None:
    cid = _sha(b"x")
    text = content_id_hex(cid)
    assert text == text.lower()
    assert len(text) == 64
    assert parse_content_id(text.upper()) == cid
    with pytest.raises(FileShareError):
        parse_content_id(text[:-2])
    with pytest.raises(FileShareError):
        parse_content_id("zz" * 32)


def test_match_content_id_prefix() -> None:
    a = bytes.fromhex("ab" + "00" * 31)
    b = bytes.fromhex("ac" + "00" * 31)
    assert match_content_id("AB", [a, b]) == a
    assert match_content_id("a", [a, a]) == a
    with pytest.raises(FileShareError, match="2 files"):
        match_content_id("a", [a, b])
    with pytest.raises(FileShareError, match="no file"):
        match_content_id("ff", [a, b])
    with pytest.raises(FileShareError, match="empty"):
        match_content_id("", [a])
