"""A member accepted a moment ago downloads at once, although a provider's cached roster
does not list it yet: a refusal is tried again once, ``retry_after`` later, by which time
the provider has read the new roster (the refused check started that read). Real nodes on
127.0.0.1, default download options."""

from __future__ import annotations

import asyncio
import os

from support.nodes import NodeCluster, admit

from tests.test_local_paths import SIZE, cluster, sha, shared, task

__all__ = ["cluster"]


async def test_a_member_accepted_a_moment_ago_downloads_from_a_provider_with_an_older_roster(
    cluster: NodeCluster,
) -> None:
    owner, seeder = await cluster.node("owner"), await cluster.node("seeder")
    gid = await owner.groups.create("club")
    await admit(owner, gid, seeder)
    data = os.urandom(SIZE)
    entry = await shared(seeder, gid, cluster.tmp / "src" / "f.bin", data)

    newcomer = await cluster.node("newcomer")
    await admit(owner, gid, newcomer)
    # The seeder has not read the roster that lists the newcomer.
    assert not seeder.groups.is_member(gid, newcomer.identity.public)

    handle = await newcomer.downloads.start(gid, entry, cluster.tmp / "out")
    async with asyncio.timeout(30):
        path = await task(handle)
    assert sha(path.read_bytes()) == sha(data)
