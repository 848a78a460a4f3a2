"""Group services on a sim network, for the group tests: a lying DHT (and lies sealed as a
member would seal them), a stand-in node for ``Commands``, and growing a group by invite."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from conftest import FakeClock

from dhtshare.dht.server import DhtNode
from dhtshare.errors import GroupError
from dhtshare.groups.keyring import GroupKeys, Keyring
from dhtshare.groups.sealeddht import SealedDht
from dhtshare.groups.secrets import Space, seal
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


def epoch_ring(gid: bytes, secret: bytes | None = None) -> Keyring:
    """A keyring holding epoch 0 of ``gid`` (a fresh secret unless given): what a member's
    node holds, for tests that use the file service without a group service."""
    keys = GroupKeys()
    keys.install(0, secret if secret is not None else os.urandom(32))
    return {gid: keys}


def sealed_dht(
    node: DhtNode, identity: Identity, ring: Keyring, clock: Callable[[], float] = time.time
) -> SealedDht:
    """``identity``'s sealed view of ``node`` with the secrets of ``ring`` (shared, not
    copied: members of one epoch hold the same secret)."""
    return SealedDht(node, ring, identity, clock)


def invite_of(owner: GroupService, gid: bytes) -> str:
    """The invite ``owner`` holds for ``gid`` (what it gives the people who should join)."""
    return owner.state.keys[gid].invite


def epoch_of(member: GroupService, gid: bytes) -> Space:
    """The current epoch's space of ``gid``, as ``member`` holds it."""
    space = member.state.keys[gid].space()
    assert space is not None, "not a member: no epoch secret"
    return space


def sealed_lies(
    space: Space, author: Identity, lies: list[SignedRecord], now: float
) -> dict[bytes, list[SignedRecord]]:
    """``lies`` (inner records) sealed into ``space`` by ``author``, as anyone holding its
    secret can seal them, by the DHT key a reader looks them up under."""
    out: dict[bytes, list[SignedRecord]] = {}
    for i, rec in enumerate(lies):
        outer = seal(space, rec, author=author, seq=1 + i, now=now)
        out.setdefault(outer.dht_key, []).append(outer)
    return out


async def grow(
    owner: GroupService, gid: bytes, joiners: list[GroupService], clock: FakeClock | None = None
) -> None:
    """Each joiner requests with the owner's invite, the owner accepts it, and the joiner
    reads its grant (the epoch secret) in its mailbox, in order (joins ``clock`` steps
    apart)."""
    for s in joiners:
        if clock is not None:
            clock.advance(10)
        await s.request_join(invite_of(owner, gid), "hello")
        await owner.accept(gid, s._me.public)
        assert await s.status(gid) == ("accepted", "")
