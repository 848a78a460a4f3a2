"""A provider record whose holder is gone (item 1 of issue #14), below the node.

Every reconnect to a holder that refuses the connection must not restart the stall
clock: the download fails ``provider_timeout`` after it last received anything, not
never (each reconnect, every ``retry_after`` = 5 s, used to count as hope) and not
twice as late. The end-to-end test with the default 60 s is in test_downloads_e2e.py;
here the timeout is 10 s, still above the default 5 s reconnect gap that hid it, and
the holder is tried again (at 7.5 s, by the polling schedule) before the timeout:
a reconnect that counted as hope would move the failure to about 17.5 s.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
from support.access import access_key

from dhtshare.content import FileLayout
from dhtshare.errors import FileShareError
from dhtshare.identity import Identity
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo
from dhtshare.transfer.swarm import ProviderAddr

GROUP = b"\x07" * 32


def closed_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_offline_holder_does_not_keep_the_download_alive(tmp_path: Path) -> None:
    size = 300_000
    layout = FileLayout.for_size(size)
    cid = os.urandom(32)  # nobody ever sends its piece hashes
    holder = Identity.generate("bob")
    port = closed_port()
    polls = 0

    async def providers() -> list[ProviderAddr]:
        nonlocal polls
        polls += 1
        return [ProviderAddr(holder.public, "127.0.0.1", port)]

    options = DownloadOptions(provider_timeout=10.0)  # retry_after keeps its default 5 s
    assert options.retry_after == 5.0 and options.provider_timeout > options.retry_after
    info = FileInfo(GROUP, cid, "gone.bin", size, layout.piece_size)
    dl = Download(
        Identity.generate("carol"), info, tmp_path, providers=providers,
        access_key=access_key, is_member=lambda g, k: True, options=options,
    )  # fmt: skip
    began = time.monotonic()
    with pytest.raises(FileShareError, match=r"no providers for gone\.bin \(nobody served it"):
        async with asyncio.timeout(30):
            await dl.run()
    took = time.monotonic() - began
    print(f"failed after {took:.1f} s")
    # checked at each poll, at most ``repoll_interval`` apart
    assert options.provider_timeout <= took < options.provider_timeout + options.repoll_interval
    assert polls >= 2  # it did look again, and tried the holder more than once
    assert dl.status().state == "failed"
