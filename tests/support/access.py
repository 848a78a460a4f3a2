"""Access keys for tests that build peer servers and clients directly (no group service):
each group's key is derived from its id here, as the group service derives it from the
group's epoch secret."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

__all__ = ["access_key", "access_keys"]


def access_key(group_id: bytes) -> bytes:
    """The test access key of ``group_id`` (the ``AccessKey`` a downloader takes)."""
    return hashlib.blake2b(group_id, digest_size=32, person=b"test-access").digest()


def access_keys(*groups: bytes) -> Callable[[], dict[bytes, bytes]]:
    """The ``AccessKeys`` of a server that serves ``groups``."""
    return lambda: {group: access_key(group) for group in groups}
