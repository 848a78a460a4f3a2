"""What transfer tests build on: a source file with its layout and hashes, and the
membership view that peers consult."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.transfer.aio.download import FileInfo
from dhtshare.transfer.share import Share

PIECE = 256 * 1024
GROUP = bytes(range(32))


@dataclass
class Roster:
    """Who is a member of GROUP, as every peer of a test sees it; tests change ``keys``."""

    keys: set[bytes] = field(default_factory=set)

    def __call__(self, group_id: bytes, peer_key: bytes) -> bool:
        return group_id == GROUP and peer_key in self.keys


@dataclass
class Source:
    """A file on disk with its layout and hashes."""

    path: Path
    data: bytes
    layout: FileLayout
    hashes: list[bytes]

    @property
    def content_id(self) -> bytes:
        return merkle_root(self.hashes)

    def info(self, name: str = "out.bin") -> FileInfo:
        return FileInfo(GROUP, self.content_id, name, self.layout.size, self.layout.piece_size)

    def share(self, path: Path | None = None) -> Share:
        """The share of this file in GROUP, read from ``path`` (default: the file itself)."""
        return Share(GROUP, self.content_id, path or self.path, self.layout, self.hashes)


def make_source(tmp_path: Path, size: int, seed: int = 1) -> Source:
    """``size`` bytes drawn from ``seed``, in PIECE-sized pieces, written under ``tmp_path``."""
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"src-{seed}.bin"
    path.write_bytes(data)
    return Source(path, data, FileLayout(size, PIECE), hash_file(path, PIECE))
