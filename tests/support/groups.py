"""Group services on a sim network, for the group tests: a lying DHT, a stand-in node for
``Commands``, and growing a group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conftest import FakeClock

from dhtshare.dht.server import DhtNode
from dhtshare.errors import GroupError
from dhtshare.groups.service import GroupService
from dhtshare.identity import Identity
from dhtshare.node.commands import Commands
from dhtshare.records import SignedRecord

NODES = 8  # nodes of the sim network a group test runs on


class LyingDht:
    """A DHT whose ``get`` adds records a lying node injected, or returns only those."""

    def __init__(
        self,
        node: DhtNode,
        extra: Callable[[bytes], list[SignedRecord]],
        *,
        only_extra: bool = False,
    ) -> None:
        self.node = node
        self.extra = extra
        self.only_extra = only_extra
        self.put = node.put
        self.publish = node.publish
        self.withdraw = node.withdraw

    async def get(self, key: bytes) -> list[SignedRecord]:
        real = [] if self.only_extra else await self.node.get(key)
        return [*self.extra(key), *real]


class FakeNode:
    """What ``Commands`` needs of a node for group commands: its GroupService and identity."""

    def __init__(self, groups: GroupService, identity: Identity) -> None:
        self.groups = groups
        self.identity = identity
        self.saved = 0

    def save_state(self) -> None:
        self.saved += 1

    def require_member(self, group_id: bytes) -> None:
        if not self.groups.is_member(group_id, self.identity.public):
            raise GroupError("you are not a member of this group")


def commands(service: GroupService) -> Commands:
    return Commands(FakeNode(service, service._me))  # type: ignore[arg-type]


async def no_progress(_: Any) -> None:
    return None


def people(*names: str) -> list[Identity]:
    return [Identity.generate(n) for n in names]


async def grow(
    owner: GroupService, gid: bytes, joiners: list[GroupService], clock: FakeClock | None = None
) -> None:
    """Each joiner requests and the owner accepts it, in order (joins ``clock`` steps apart)."""
    for s in joiners:
        if clock is not None:
            clock.advance(10)
        await s.request_join(gid, "hello")
        await owner.accept(gid, s._me.public)
