"""The two ends of a relayed transfer, as processes run in a namespace (tests/test_relay_netns.py).

python relay_roles.py provide '{"seed": HEX, "path": FILE, "relay": [HOST, PORT]}'
    serves FILE (any member) as a peer server on 0.0.0.0, reachable only through a
    reservation at the relay if "relay" is given; prints (on stderr) one JSON line once ready
    ({"address": [...], "observed": [...] or null, "relay_key": HEX or null,
    "content_id": HEX}), then runs.
python relay_roles.py fetch '{"key": HEX, "content_id": HEX, "size": N,
                              "relay": [HOST, PORT] or null, "relay_key": HEX,
                              "direct": [HOST, PORT]}'
    fetches the whole file once (through a circuit at "relay" to "relay_key", else from
    "direct"), checks the far end's identity is "key", and prints
    {"sha256": HEX, "seconds": S}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.reach.aio.relay import RelayKeeper, RelayKey, open_circuit
from dhtshare.transfer.aio.peer import open_peer, open_peer_on
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.wire import Bitfield, Piece, Request

PIECE = 1024 * 1024
BLOCK = 256 * 1024
WINDOW = 16
GROUP = bytes(range(32))
ACCESS_KEY = b"\x5a" * 32  # GROUP's access key: both roles run this script


def say(doc: dict[str, Any]) -> None:
    """One JSON line on stderr (where the test's ``LineWatcher`` reads)."""
    print(json.dumps(doc), file=sys.stderr, flush=True)


async def provide(args: dict[str, Any]) -> None:
    identity = Identity(SigningKey(bytes.fromhex(args["seed"])))
    path = Path(args["path"])
    hashes = hash_file(path, PIECE)
    cid = merkle_root(hashes)
    size = path.stat().st_size  # noqa: ASYNC240 (once, before serving)
    shares = ShareRegistry(lambda g, k: g == GROUP, lambda: {GROUP: ACCESS_KEY})
    shares.add(Share(GROUP, cid, path, FileLayout(size, PIECE), hashes))
    server = PeerServer(identity, "0.0.0.0", int(args.get("port", 0)), shares=shares)
    await server.start()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.serve())
        observed, relay_key = None, None
        if args.get("relay"):
            relay = (str(args["relay"][0]), int(args["relay"][1]))
            changed = asyncio.Event()
            key = RelayKey.generate()
            keeper = RelayKeeper(key, lambda: [relay], server.adopt, on_change=changed.set)
            tg.create_task(keeper.run())
            await changed.wait()
            observed, relay_key = keeper.observed[relay], key.public.hex()
        say(
            {
                "address": server.address,
                "observed": observed,
                "relay_key": relay_key,
                "content_id": cid.hex(),
            }
        )


async def fetch(args: dict[str, Any]) -> None:
    me = Identity.generate()
    key, cid, size = bytes.fromhex(args["key"]), bytes.fromhex(args["content_id"]), args["size"]
    started = time.perf_counter()
    if args.get("relay"):
        relay_key = bytes.fromhex(args["relay_key"])
        sock, _ = await open_circuit((args["relay"][0], int(args["relay"][1])), relay_key)
        stream = await open_peer_on(sock, me, GROUP, cid, access_key=ACCESS_KEY)
    else:
        host, port = args["direct"][0], int(args["direct"][1])
        stream = await open_peer(me, host, port, GROUP, cid, access_key=ACCESS_KEY)
    assert stream.peer_key == key
    got = bytearray(size)
    blocks = [(off // PIECE, off % PIECE, min(BLOCK, size - off)) for off in range(0, size, BLOCK)]
    async with stream:
        assert isinstance(await anext(stream), Bitfield)
        sent = 0
        for block in blocks[:WINDOW]:
            stream.send_nowait(Request(*block))
            sent += 1
        done = 0
        async for event in stream:
            if isinstance(event, Piece):
                start = event.index * PIECE + event.begin
                got[start : start + len(event.data)] = event.data
                done += 1
                if sent < len(blocks):
                    stream.send_nowait(Request(*blocks[sent]))
                    sent += 1
                if done == len(blocks):
                    break
    say({"sha256": hashlib.sha256(got).hexdigest(), "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    role, doc = sys.argv[1], json.loads(sys.argv[2])
    asyncio.run({"provide": provide, "fetch": fetch}[role](doc))
