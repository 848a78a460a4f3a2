"""Running a node as a process: foreground with signals, detached, bootstrap-only, ping.

This is the asyncio edge for ``cli``: it builds a ``Node`` (or a bare ``DhtNode`` for a
bootstrap server), runs it until SIGINT/SIGTERM, and reports readiness to a parent process
through a pipe when started with ``--detach``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dhtshare.allocator import tune_allocator
from dhtshare.cli.display import LOG_FORMAT, CleanFormatter
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtshareError, NodeError
from dhtshare.home import Home
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.reach.aio.relay import RelayServer
from dhtshare.reach.autonat import MIN_NETWORKS, network_of
from dhtshare.text import plural
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import ShareRegistry

__all__ = ["NodeConfig", "ping_node", "run_bootstrap", "run_detached", "run_foreground"]

log = logging.getLogger(__name__)
READY_TIMEOUT = 90.0
PING_ID = hashlib.sha1(b"dhtshare/v1/ping").digest()  # 20 bytes, like every DHT node id


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def _write_ready(fd: int | None, doc: dict[str, Any]) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(doc).encode() + b"\n")
        os.close(fd)


def _log_to(home: Home, level: str = "info") -> None:
    """``level`` and up into ``home.node_log`` (names and messages cleaned); the terminal
    keeps the level the CLI chose. Below debug, kademlia's line per lookup stays out."""
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    root = logging.getLogger()
    for existing in root.handlers:
        if existing.level == logging.NOTSET:
            existing.setLevel(root.level)
    handler = logging.FileHandler(home.node_log)
    handler.setFormatter(CleanFormatter(LOG_FORMAT))
    number = logging.getLevelName(level.upper())
    handler.setLevel(number)
    root.addHandler(handler)
    root.setLevel(min(number, root.level))
    if number > logging.DEBUG:
        logging.getLogger("kademlia").setLevel(logging.WARNING)


def run_foreground(config: NodeConfig, ready_fd: int | None = None) -> None:
    """Run the node until SIGINT or SIGTERM; report readiness on ``ready_fd`` if given."""
    _log_to(Home(config.home), config.log_level)
    tune_allocator()

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        node = await Node.start(config)
        try:
            info = node.address_info()
            _write_ready(ready_fd, {"ok": True, **info, "pid": os.getpid()})
            if ready_fd is None:
                print(
                    f"node {node.identity.id} running at {info['advertised']}"
                    f" (listening on {info['host']}:{info['port']})",
                    flush=True,
                )
            stopped = asyncio.ensure_future(node.stopped.wait())
            signalled = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stopped, signalled], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            signalled.cancel()
        finally:
            await node.close()

    try:
        asyncio.run(main())
    except DhtshareError as exc:
        _write_ready(
            ready_fd,
            {"ok": False, "error": exc.message, "hint": exc.hint, "type": type(exc).__name__},
        )
        raise


def run_detached(
    config: NodeConfig, argv0: str, passphrase_file: str | None, verbose: bool = False
) -> dict[str, Any]:
    """Start ``dhtshare node start`` in the background; return once it is up and bootstrapped.

    Every setting goes to the child explicitly (``-v`` too), so it runs as this command
    was told, whatever its environment."""
    home = Home(config.home)
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "dhtshare", *(["-v"] if verbose else [])]
    cmd += ["--home", str(config.home.resolve()), "node", "start"]
    cmd += ["--host", config.host, "--port", str(config.port), "--ready-fd", str(write_fd)]
    for host, port in config.bootstrap:
        cmd += ["--bootstrap", f"{host}:{port}"]
    if passphrase_file:
        cmd += ["--passphrase-file", str(Path(passphrase_file).resolve())]
    cmd += ["--provider-timeout", repr(config.provider_timeout)]
    if config.advertise:
        cmd += ["--advertise", config.advertise]
    cmd += ["--upload-limit", repr((config.upload_limit or 0) / 1e6)]
    cmd += ["--download-limit", repr((config.download_limit or 0) / 1e6)]
    cmd += ["--log-level", config.log_level]
    if not config.relay:
        cmd += ["--no-relay"]
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(home.node_out, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    line = _read_line(read_fd, READY_TIMEOUT)
    if not line:
        proc.poll()
        raise NodeError("the node did not start", f"see {home.node_log}")
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise NodeError("the node did not report its start", f"see {home.node_log}")
    if doc.get("ok") is not True:
        raise NodeError(str(doc.get("error")), str(doc.get("hint", "")))
    return doc


def _read_line(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as sel, os.fdopen(fd, "rb", buffering=0) as stream:
        sel.register(stream, selectors.EVENT_READ)
        while b"\n" not in data and time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            chunk = stream.read(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0]


def run_bootstrap(
    state: Home,
    host: str,
    port: int,
    peers: tuple[tuple[str, int], ...],
    *,
    relay: bool = False,
    advertise: str | None = None,
) -> None:
    """A DHT-only node with a stable id and routing table (in ``state.bootstrap``);
    foreground; logs to stderr. ``relay``: also a circuit relay, on TCP (same port number);
    ``advertise``: our public IP, if not on our interface (Reserves may name it)."""
    if advertise is not None:
        try:
            advertise = str(ipaddress.ip_address(advertise))
        except ValueError:
            raise NodeError(
                f"--advertise {advertise[:64]!r} is not an IP address",
                "give the server's public IP",
            ) from None
    handler = logging.StreamHandler()
    handler.setFormatter(CleanFormatter(LOG_FORMAT))
    # force: the CLI already configured WARNING; a server logs INFO
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("kademlia").setLevel(logging.WARNING)  # a line per lookup is noise
    state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state.bootstrap

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        node = await _open_bootstrap(path, host, port)
        held = node.load_records(state.held_records)
        relaying: asyncio.Task[None] | None = None
        seen: set[tuple[str, int]] = set()  # where our contacts see us: what Reserves name
        if advertise is not None:
            seen.add((advertise, port))
        told = set(seen)
        try:
            if relay:
                relaying = await _start_relay(host, node.address[1], seen.copy)
            if peers:
                await node.bootstrap(list(peers))
            log.info(
                "bootstrap node %s listening on %s:%d; %s kept from the last run",
                node.node.id.hex(),
                host,
                port,
                plural(held, "record"),
            )
            while not stop.is_set():
                if relay and (found := await _seen_at(node, port)):
                    seen.clear()  # the last answers only: a liar cannot pile addresses up
                    seen.update(told | found)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(60):
                        await stop.wait()
                node.save_state(path)
                with contextlib.suppress(OSError):
                    node.save_records(state.held_records)
        finally:
            if relaying is not None:
                relaying.cancel()
                await asyncio.gather(relaying, return_exceptions=True)
            node.save_state(path)
            with contextlib.suppress(OSError):
                node.save_records(state.held_records)
            await node.aclose()
            log.info("bootstrap node stopped; state saved to %s", path)

    asyncio.run(main())


async def _seen_at(node: DhtNode, port: int, asked: int = 4) -> set[tuple[str, int]]:
    """Where a few contacts, picked at random, see us (``reach``): behind a router that
    forwards the port (a cloud server's 1:1 NAT), a Reserve names that, not our socket's
    address. Only an address at our port that peers in ``MIN_NETWORKS`` networks agree on
    counts (one liar cannot make us accept Reserves naming its own relay)."""
    contacts = node.contacts()
    picked = random.sample(contacts, min(asked, len(contacts)))
    replies = await asyncio.gather(
        *(node.reach((str(c.ip), int(c.port)), os.urandom(16)) for c in picked)
    )
    networks: dict[tuple[str, int], set[str]] = {}
    for contact, reply in zip(picked, replies, strict=True):
        if reply is not None and reply.port == port:
            networks.setdefault((reply.host, reply.port), set()).add(network_of(str(contact.ip)))
    return {address for address, nets in networks.items() if len(nets) >= MIN_NETWORKS}


async def _start_relay(
    host: str, port: int, own: Callable[[], Iterable[tuple[str, int]]]
) -> asyncio.Task[None]:
    """A relay on TCP ``host:port``: a peer server sharing nothing, whose RELAY connections
    go to a ``RelayServer`` (the task serving it); ``own``: where others see us."""
    server = PeerServer(Identity.generate(), host, port, shares=ShareRegistry(lambda g, k: False))
    server.relay_handler = RelayServer(own_addresses=own).handle
    await server.start()
    log.info("relaying for private nodes on TCP %s:%d", *server.address)
    return asyncio.create_task(server.serve())


async def _open_bootstrap(path: Path, host: str, port: int) -> DhtNode:
    try:
        if await asyncio.to_thread(path.exists):
            return await DhtNode.load_state(path, port, host)
        node = DhtNode()
        await node.listen(port, host)
    except OSError as exc:
        raise NodeError(
            f"cannot listen on {host}:{port}: {exc.strerror}", "pick another --port"
        ) from exc
    node.save_state(path)
    return node


async def ping_node(host: str, port: int, wait: float) -> float | None:
    """Round-trip seconds of a DHT ping to host:port, or None if nothing answered.

    The pinged node adds the pinger to its routing table like any node that contacts it.
    A fixed pinger id keeps that to one (soon dead) contact however often a health check
    runs, instead of one more per check.
    """
    node = DhtNode(node_id=PING_ID)
    await node.listen(
        0, "127.0.0.1" if host.startswith("127.") or host == "localhost" else "0.0.0.0"
    )
    try:
        started = time.monotonic()
        async with asyncio.timeout(wait):
            ok = await node.ping((host, port))
        return time.monotonic() - started if ok else None
    except (TimeoutError, OSError):
        return None
    finally:
        await node.aclose()
