"""Relayed against direct throughput on loopback: one peer session fetching a whole file.

Three processes, as three hosts would be: a relay (``PeerServer`` + ``RelayServer``), a
provider (``PeerServer`` serving the file, ``RelayKeeper`` holding a reservation at the
relay, circuits handed to ``adopt``) and the downloader here, which fetches every piece
with ``WINDOW`` requests in flight, once over a direct connection and once over a circuit
(``open_circuit`` + ``open_peer_on``), alternating, ``--rounds`` times each. Also the raw
splice: bytes pushed through a circuit against a plain TCP connection (no peer protocol).

    python simulations/bench_relay.py --size-mib 256 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from nacl.signing import SigningKey

from dhtshare.content import FileLayout, hash_file, merkle_root
from dhtshare.identity import Identity
from dhtshare.reach.aio.relay import RelayKeeper, RelayServer, open_circuit
from dhtshare.transfer.aio.peer import PeerStream, open_peer, open_peer_on
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry
from dhtshare.wire import Bitfield, Piece, Request

PIECE = 1024 * 1024
BLOCK = 256 * 1024
WINDOW = 16
GROUP = bytes(range(32))
ACCESS_KEY = b"\x5a" * 32  # the benchmark group's access key, known to both ends
RELAY_HOST, PROVIDER_HOST, SINK_HOST = "127.0.21.1", "127.0.21.2", "127.0.21.3"


def run_relay(ready: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        server = PeerServer(
            Identity.generate(), RELAY_HOST, shares=ShareRegistry(lambda g, k: False)
        )
        server.relay_handler = RelayServer().handle
        await server.start()
        ready.put(server.address)
        await server.serve()

    asyncio.run(main())


def run_provider(seed: bytes, path: str, relay: tuple[str, int], ready: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        identity = Identity(SigningKey(seed))
        hashes = hash_file(Path(path), PIECE)
        size = Path(path).stat().st_size  # noqa: ASYNC240 (once, before serving)
        shares = ShareRegistry(lambda g, k: True, lambda: {GROUP: ACCESS_KEY})
        shares.add(Share(GROUP, merkle_root(hashes), Path(path), FileLayout(size, PIECE), hashes))
        server = PeerServer(identity, PROVIDER_HOST, shares=shares, superseed=False)
        await server.start()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.serve())
            changed = asyncio.Event()
            keeper = RelayKeeper(
                identity, lambda: [relay], server.adopt, on_change=changed.set, local=PROVIDER_HOST
            )
            tg.create_task(keeper.run())
            await changed.wait()
            ready.put((server.address, merkle_root(hashes)))

    asyncio.run(main())


def run_sink(seed: bytes, relay: tuple[str, int], ready: mp.Queue) -> None:  # type: ignore[type-arg]
    """A TCP sink, and (through the relay) a reservation whose circuits it drains."""

    async def main() -> None:
        tasks: set[asyncio.Task[None]] = set()

        async def drain(sock: socket.socket) -> None:
            loop = asyncio.get_running_loop()
            sock.setblocking(False)
            buf = bytearray(1 << 20)
            while await loop.sock_recv_into(sock, buf):
                pass
            sock.close()

        def on_circuit(sock: socket.socket, rest: bytes) -> None:
            task = asyncio.create_task(drain(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        listener = socket.create_server((SINK_HOST, 0))
        listener.setblocking(False)
        identity = Identity(SigningKey(seed))
        changed = asyncio.Event()
        keeper = RelayKeeper(
            identity, lambda: [relay], on_circuit, on_change=changed.set, local=SINK_HOST
        )
        keeping = asyncio.create_task(keeper.run())
        await changed.wait()
        ready.put(listener.getsockname())
        loop = asyncio.get_running_loop()
        while keeping:
            sock, _ = await loop.sock_accept(listener)
            on_circuit(sock, b"")

    asyncio.run(main())


async def fetch(stream: PeerStream, size: int) -> float:
    """Seconds to fetch every block of the file over ``stream``."""
    started = time.perf_counter()
    async with stream:
        bits = await anext(stream)
        assert isinstance(bits, Bitfield)
        blocks = [
            (off // PIECE, off % PIECE, min(BLOCK, size - off)) for off in range(0, size, BLOCK)
        ]
        sent, got = 0, 0
        while sent < min(WINDOW, len(blocks)):
            stream.send_nowait(Request(*blocks[sent]))
            sent += 1
        async for event in stream:
            if isinstance(event, Piece):
                got += 1
                if sent < len(blocks):
                    stream.send_nowait(Request(*blocks[sent]))
                    sent += 1
                if got == len(blocks):
                    break
        assert got == len(blocks)
    return time.perf_counter() - started


async def push(sock: socket.socket, total: int) -> float:
    loop = asyncio.get_running_loop()
    chunk = bytes(1 << 20)
    started = time.perf_counter()
    for _ in range(total // len(chunk)):
        await loop.sock_sendall(sock, chunk)
    sock.shutdown(socket.SHUT_WR)
    while await loop.sock_recv(sock, 1 << 16):  # the far end closes once it drained
        pass
    sock.close()
    return time.perf_counter() - started


async def raw(
    sink: tuple[str, int], relay: tuple[str, int], key: bytes, total: int, rounds: int
) -> None:
    loop = asyncio.get_running_loop()
    results: dict[str, list[float]] = {"direct": [], "relayed": []}
    for _ in range(rounds):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, sink)
        results["direct"].append(total / await push(sock, total) / 1e6)
        sock, _ = await open_circuit(relay, key)
        results["relayed"].append(total / await push(sock, total) / 1e6)
    for route, rates in results.items():
        runs = [round(r) for r in rates]
        median = statistics.median(rates)
        print(f"raw TCP      {route:8s}: median {median:7.0f} MB/s  runs {runs}")


async def bench(
    args: argparse.Namespace,
    relay: tuple[str, int],
    direct: tuple[str, int],
    cid: bytes,
    key: bytes,
) -> None:
    size = args.size_mib * 1024 * 1024
    me = Identity.generate()
    results: dict[str, list[float]] = {"direct": [], "relayed": []}
    for _ in range(args.rounds):
        stream = await open_peer(me, *direct, GROUP, cid, access_key=ACCESS_KEY)
        results["direct"].append(size / await fetch(stream, size) / 1e6)
        sock, _ = await open_circuit(relay, key)
        stream = await open_peer_on(sock, me, GROUP, cid, access_key=ACCESS_KEY)
        results["relayed"].append(size / await fetch(stream, size) / 1e6)
    for route, rates in results.items():
        runs = [round(r) for r in rates]
        median = statistics.median(rates)
        print(f"peer session {route:8s}: median {median:7.0f} MB/s  runs {runs}")
    ratio = statistics.median(results["relayed"]) / statistics.median(results["direct"])
    print(f"relayed / direct: {ratio:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.bin"
        with path.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        provider_key = Identity.generate()
        seed = bytes(provider_key.signing_key)
        ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        relay_proc = ctx.Process(target=run_relay, args=(ready,), daemon=True)
        relay_proc.start()
        relay = tuple(ready.get(timeout=30))
        prov = ctx.Process(target=run_provider, args=(seed, str(path), relay, ready), daemon=True)
        prov.start()
        direct, cid = ready.get(timeout=120)
        sink_key = Identity.generate()
        sink_proc = ctx.Process(
            target=run_sink, args=(bytes(sink_key.signing_key), relay, ready), daemon=True
        )
        sink_proc.start()
        sink = tuple(ready.get(timeout=30))
        try:
            asyncio.run(bench(args, relay, tuple(direct), cid, provider_key.public))
            total = 4 * args.size_mib * 1024 * 1024
            asyncio.run(raw(sink, relay, sink_key.public, total, args.rounds))
        finally:
            for proc in (sink_proc, prov, relay_proc):
                proc.terminate()
                proc.join(5)


if __name__ == "__main__":
    main()
