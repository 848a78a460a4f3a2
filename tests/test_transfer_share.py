"""Share and ShareRegistry, pure: one description of a shared file, checked on construction."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dhtshare.content import FileLayout, merkle_root
from dhtshare.transfer.share import Share, ShareRegistry

GROUP = bytes(32)
LAYOUT = FileLayout(3 * 1024 + 5, 1024)  # four pieces, the last one 5 bytes
HASHES = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
CID = merkle_root(HASHES)


def test_a_share_describes_the_file_once() -> None:
    share = Share(GROUP, CID, Path("/data/report.pdf"), LAYOUT, HASHES)
    assert (share.name, share.size, share.piece_size) == ("report.pdf", 3 * 1024 + 5, 1024)
    assert share.complete and share.bitfield().pieces() == [0, 1, 2, 3]
    renamed = Share(GROUP, CID, Path("/data/x.part"), LAYOUT, HASHES, [1], name="report.pdf")
    assert renamed.name == "report.pdf" and not renamed.complete


@pytest.mark.parametrize(
    ("hashes", "have", "error"),
    [
        (HASHES[:3], None, "3 hashes for 4 pieces"),
        (HASHES[::-1], None, "do not match the content id"),
        (HASHES, [4], "out of range"),
    ],
)
def test_a_share_that_contradicts_itself_is_refused(
    hashes: list[bytes], have: list[int] | None, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        Share(GROUP, CID, Path("f"), LAYOUT, hashes, have)


def test_listeners_hear_each_new_piece_once_until_they_leave() -> None:
    share = Share(GROUP, CID, Path("f.part"), LAYOUT, HASHES, [])
    heard: list[int] = []
    stop = share.listen(heard.append)
    share.add_piece(2)
    share.add_piece(2)
    stop()
    share.add_piece(0)
    assert heard == [2] and share.have == {0, 2}
    with pytest.raises(IndexError):
        share.add_piece(4)


def test_the_registry_holds_one_share_per_group_and_file() -> None:
    registry = ShareRegistry(lambda group, key: key == b"member")
    first = registry.add(Share(GROUP, CID, Path("a.part"), LAYOUT, HASHES, []))
    second = registry.add(Share(GROUP, CID, Path("a"), LAYOUT, HASHES))
    assert registry.get(GROUP, CID) is second and list(registry) == [second] and first is not second
    assert registry.is_member(GROUP, b"member") and not registry.is_member(GROUP, b"other")
    assert registry.remove(GROUP, CID) is second and len(registry) == 0
    assert registry.get(GROUP, CID) is None and registry.remove(GROUP, CID) is None
