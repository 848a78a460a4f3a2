"""Shares, sans I/O: the files a node serves, and who may fetch them.

A ``Share`` is one file in one group (where it is, its piece hashes, the pieces we
hold, what we uploaded of it). The ``ShareRegistry`` holds a node's shares by
``(group_id, content_id)`` with its ``MemberCheck``, the node's current view of each
group's roster, and its ``AccessKeys``, the current access key of each group it serves
(the peer handshake's proof of membership, docs/wire.md); ``transfer/aio/serve.py``
serves what the registry holds. A downloader's ``AccessKey`` gives the current access
key of one group, or ``None`` when the node holds none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from dhtshare.content import FileLayout, merkle_root
from dhtshare.wire import AccessKeys, Bitfield

__all__ = ["AccessKey", "AccessKeys", "MemberCheck", "Share", "ShareRegistry"]

MemberCheck = Callable[[bytes, bytes], bool]
"""``is_member(group_id, peer_key)``: the node's current roster view."""
AccessKey = Callable[[bytes], bytes | None]
"""``access_key(group_id)``: that group's current access key, or ``None`` (not held)."""


def _no_groups() -> Mapping[bytes, bytes]:
    return {}


class Share:
    """One file shared in one group: its name, path, layout, piece hashes, the pieces
    we hold, and what we uploaded of it.

    The one description of a share: the file service announces it, the peer server
    serves it, the node saves it. ``name`` is the file's name in the group (default:
    the path's). ``have=None`` means every piece (a finished file). For a download in
    progress ``path`` is the ``.part`` file and ``add_piece`` grows ``have`` as pieces
    are verified; listeners (connected peers) hear about each new piece.
    """

    def __init__(
        self,
        group_id: bytes,
        content_id: bytes,
        path: Path,
        layout: FileLayout,
        hashes: Sequence[bytes],
        have: Iterable[int] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if len(hashes) != layout.piece_count:
            raise ValueError(f"{len(hashes)} hashes for {layout.piece_count} pieces")
        if merkle_root(hashes) != content_id:
            raise ValueError("piece hashes do not match the content id")
        self.group_id = group_id
        self.content_id = content_id
        self.path = Path(path)
        self.name = self.path.name if name is None else name
        self.layout = layout
        self.hashes = tuple(hashes)
        count = layout.piece_count
        self.have: set[int] = set(range(count)) if have is None else set(have)
        if any(not 0 <= i < count for i in self.have):
            raise ValueError("have holds a piece index out of range")
        self._listeners: list[Callable[[int], None]] = []
        self.uploaded = 0  # bytes of this file sent to peers
        self.served_to: set[bytes] = set()  # the peers (keys) that got at least one block

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def piece_size(self) -> int:
        return self.layout.piece_size

    @property
    def complete(self) -> bool:
        return len(self.have) == self.layout.piece_count

    def bitfield(self) -> Bitfield:
        """The pieces we hold, as the wire's Bitfield."""
        return Bitfield.from_pieces(self.layout.piece_count, self.have)

    def add_piece(self, index: int) -> None:
        """Piece ``index`` is verified and on disk: serve it and tell connected peers."""
        if index in self.have:
            return
        self.layout.piece_length(index)  # IndexError if out of range
        self.have.add(index)
        for listener in list(self._listeners):
            listener(index)

    def listen(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(index)`` for every new piece; returns the unsubscribe function."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)


class ShareRegistry:
    """The shares a node serves, by ``(group_id, content_id)``, its membership check, and
    the access keys of the groups it serves (asked at every handshake: they change at
    every epoch). Without ``access_keys`` no client's handshake succeeds (a node that only
    relays)."""

    def __init__(self, is_member: MemberCheck, access_keys: AccessKeys = _no_groups) -> None:
        self.is_member = is_member
        self.access_keys = access_keys
        self._shares: dict[tuple[bytes, bytes], Share] = {}

    def add(self, share: Share) -> Share:
        """Serve ``share`` (replacing any share of the same file in the same group)."""
        self._shares[share.group_id, share.content_id] = share
        return share

    def get(self, group_id: bytes, content_id: bytes) -> Share | None:
        return self._shares.get((group_id, content_id))

    def remove(self, group_id: bytes, content_id: bytes) -> Share | None:
        """Stop serving; connected peers are refused at their next request."""
        return self._shares.pop((group_id, content_id), None)

    def __iter__(self) -> Iterator[Share]:
        return iter(list(self._shares.values()))

    def __len__(self) -> int:
        return len(self._shares)
