"""Shared fixtures: a controllable clock, identities, signed records of every kind, a network,
and users of the installed executable (``users``)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.cli import Users, users_on_one_machine

from dhtshare import crypto
from dhtshare.groups.secrets import epoch_box, epoch_space, seal
from dhtshare.identity import Identity
from dhtshare.records import (
    Body,
    Decision,
    DirectoryEntry,
    EpochPage,
    FileEntry,
    Genesis,
    Grant,
    InviteInfo,
    JoinRequest,
    Leave,
    Member,
    PeerInfo,
    Provider,
    Roster,
    RosterPage,
    SignedRecord,
    sign_record,
)
from dhtshare.sim import Network

START = 1_800_000_000.0
SPARSE_K = 5  # k for ``sparse_net``: a record lives on 5 of the 20 nodes (plus its writer)


class FakeClock:
    """A wall clock that moves only when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def roster_body(owner: Identity, now: float) -> Roster:
    """A founding roster owned by ``owner`` (valid hand-over chain of length 0)."""
    genesis = Genesis(owner.public, "group", int(now), os.urandom(16))
    sig = crypto.sign(owner.signing_key, "genesis", genesis.encode())
    me = Member(owner.public, "owner", int(now))
    return Roster(genesis, sig, (), public=True, members=(me,), total_members=1)


def bodies_of_every_kind(owner: Identity, now: float) -> list[Body]:
    """One body of each record kind a storing node takes in the clear, all about one group
    that ``owner`` founded (the inner kinds: ``inner_bodies``; sealed: ``sealed_record``)."""
    roster = roster_body(owner, now)
    gid, cid = roster.group_id, os.urandom(32)
    return [
        roster,
        RosterPage(gid, 1, 0, (Member(os.urandom(32), "m", int(now)),)),
        JoinRequest(gid, "alice", "hi"),
        Decision(gid, os.urandom(32), accepted=True),
        Leave(gid),
        FileEntry(gid, cid, "a.bin", 1000, 256 * 1024),
        Provider(gid, cid, "127.0.0.1", 7000, complete=True),
        PeerInfo((("127.0.0.1", 7001),)),
        DirectoryEntry(gid, "group", 1),
    ]


def inner_bodies(owner: Identity, now: float) -> list[Body]:
    """One body of each kind that exists only inside a sealed record."""
    gid, secret = roster_body(owner, now).group_id, os.urandom(32)
    box = epoch_box(os.urandom(32), owner.public, os.urandom(32))
    return [
        Grant(gid, 1, secret, "group"),
        EpochPage(gid, 1, 0, 1, (box,)),
        InviteInfo(gid, "group"),
    ]


def sealed_record(author: Identity, now: float, *, ttl: float = 600) -> SignedRecord:
    """A join request of ``author``'s sealed into an epoch space, as storing nodes see it."""
    gid = roster_body(author, now).group_id
    inner = sign_record(author, JoinRequest(gid, "alice", "hi"), seq=1, now=now, ttl=ttl)
    return seal(epoch_space(os.urandom(32)), inner, author=author, seq=1, now=now)


def peer_record(ident: Identity, now: float, *, seq: int = 1, ttl: float = 600) -> SignedRecord:
    """A PEER record: the simplest kind, one per signer."""
    return sign_record(
        ident, PeerInfo((("127.0.0.1", 7000 + seq % 1000),)), seq=seq, now=now, ttl=ttl
    )


@pytest.fixture
async def net(clock: FakeClock) -> AsyncIterator[Network]:
    """20 real nodes on 127.0.0.1 sharing the fake clock."""
    async with Network.start(20, clock=clock) as network:
        yield network


@pytest.fixture
async def sparse_net(clock: FakeClock) -> AsyncIterator[Network]:
    """20 real nodes with k=5 and fixed ids: each key's storing set is a strict subset.

    With k=20 every put lands on every node, and a lookup merges the reader's own copy,
    so a get could be answered from local storage alone. Here most nodes hold nothing
    under a given key and can only answer a get from what other nodes send them.
    """
    async with Network.start(20, ksize=SPARSE_K, clock=clock, rng=random.Random(20)) as network:
        yield network


@pytest.fixture
def users(tmp_path: Path) -> Iterator[Users]:
    """A bootstrap node process and users with a ``--home`` each under ``tmp_path``; every
    node is stopped (or killed) on the way out."""
    with users_on_one_machine(tmp_path) as u:
        yield u
