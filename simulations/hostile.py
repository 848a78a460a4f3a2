"""Hostile-peer soak: one node under attack while it downloads, serves and sees a removal.

    python simulations/hostile.py [--size 32M] [--seed 13] [--json]

Evidence for issue #13 (docs/security.md); ``tests/test_hostile_soak.py`` runs the same
scenario and asserts its targets. Everything is real and on loopback: the *victim* is a
``dhtshare node start`` process with its own ``--home`` (so its peak RSS is its own);
the honest parties (a bootstrap node, DHT-only nodes, the group's owner, a seeder and a
member who will be removed) are real ``Node``s in this process, each on its own
127.0.x.1 address; the attackers are raw sockets in this process:

- **garbage**: random bytes, truncated headers, broken msgpack, wrong shapes, unknown
  RPCs, deep nesting, oversize datagrams, unexpected replies (one address);
- **spoofed**: pings, ``find_node`` and ``find_value`` (of the keys holding the most
  records) from a fresh node id each time, from sockets that never answer, as if the
  source address had been forged: whatever arrives there is reflected traffic;
- **flood**: ``store`` of valid signed records (peer records, join requests for the
  group) from thousands of throw-away keys and node ids, all from one IP:port;
- **responder**: a "node" that answers every RPC of the victim with contacts whose host
  is not an address (a NUL byte, a name, IPv6 on an IPv4 socket, 300 characters) and
  values that are not records (issue #13, item 1);
- **slow-loris**: TCP connections to the peer port that send nothing, a ClientHello one
  byte at a time, or a frame header announcing 1 MiB and then stall;
- **crashing member**: a group member whose provider record points at a server that
  completes the handshake and then sends out-of-range pieces, wrong hashes, garbage and
  half a frame before it vanishes; the same member also connects to the victim as a
  client and sends out-of-range requests, garbage and half frames; a second member
  publishes a provider record whose host is not an address (item 4).

Meanwhile the victim downloads a 32 MiB file (``dhtshare get``), the owner removes a
member, and that member asks the victim for a block until it is refused. Afterwards the
victim must still answer a DHT ping, serve a member, and publish (``share``). Reported:
the victim's peak RSS, bytes received from each attacker address vs bytes the victim
sent back to it, the download's time and rate, the time from the removal to the first
refusal, the TCP outcomes, and problems in the victim's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from nacl.signing import SigningKey

import dhtshare
from dhtshare import crypto
from dhtshare.codec import Writer
from dhtshare.content import FileLayout
from dhtshare.dht.protocol import packb, unpackb
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtshareError
from dhtshare.groups.keyring import Where
from dhtshare.groups.sealeddht import SealedDht
from dhtshare.groups.secrets import Invite
from dhtshare.groups.service import GroupService, GroupState
from dhtshare.identity import Identity
from dhtshare.node.service import Node, NodeConfig
from dhtshare.records import (
    MAX_BODY,
    VERSION,
    JoinRequest,
    Kind,
    PeerInfo,
    Provider,
    key_for,
    sign_record,
    time_seq,
)
from dhtshare.transfer.aio.peer import PeerProtocol, PeerStream, accept_peer, server_protocol
from dhtshare.wire import (
    Bitfield,
    ConnectionClosed,
    GetHashes,
    HandshakeComplete,
    HashList,
    Have,
    PeerConnection,
    Piece,
    Reason,
    Reject,
    Request,
    Role,
)

__all__ = ["SoakOptions", "render", "run_soak"]

MiB = 1024 * 1024
MAINTENANCE_DEFAULT = NodeConfig.maintenance_interval  # the node's default, in seconds
BLOCK = 16 * 1024

# Every party on its own loopback address (any 127.0.0.0/8 address is local on Linux).
BOOT = "127.0.1.1"
DHT_ONLY = ("127.0.2.1", "127.0.3.1", "127.0.4.1")
VICTIM = "127.0.9.1"
OWNER, SEEDER, DAVE = "127.0.10.1", "127.0.11.1", "127.0.12.1"
CRASH, MALLORY = "127.0.13.1", "127.0.14.1"
PROBE = "127.0.20.1"
GARBAGE = "127.55.0.1"
SPOOFED = tuple(f"127.66.0.{i}" for i in range(1, 9))
FLOOD = "127.77.0.1"
RESPONDER = "127.88.0.1"
LORIS = tuple(f"127.99.{i}.1" for i in range(10))  # slow-loris sources, one per /24

CODE_ROOT = str(Path(dhtshare.__file__).resolve().parent.parent)
LOG_PROBLEMS = (
    "Task exception was never retrieved",
    "Fatal error on",
    "Fatal write error",
    "Fatal read error",
    "Exception in callback",
    "Unhandled error",
)


ATTACKS = frozenset({"garbage", "spoofed", "flood", "responder", "loris", "crash", "providers"})


@dataclass(frozen=True)
class SoakOptions:
    """The scenario's sizes and bounds. Every loop below is bounded by one of these."""

    size: int = 32 * MiB
    seed: int = 13
    garbage_rate: float = 150.0  # datagrams per second, from one address
    garbage_max: int = 8000
    spoof_rate: float = 150.0  # datagrams per second over all spoofed addresses
    spoof_max: int = 8000
    flood_rate: float = 150.0  # store requests per second, one IP:port
    flood_records: int = 3000  # distinct signed records (and signer keys) in the flood
    flood_max: int = 8000
    loris: int = 150  # slow-loris connections
    crash_sessions: int = 24  # hostile client sessions of the crashing member
    warmup: float = 3.0  # seconds of attack before the download and the removal start
    removal_limit: float = MAINTENANCE_DEFAULT + 10.0  # stop polling after this long
    download_limit: float = 75.0  # seconds the victim's ``get`` may take
    poll_every: float = 0.5  # seconds between the removed member's attempts
    attacks: frozenset[str] = ATTACKS


# ------------------------------------------------------------------------------ accounting


@dataclass
class Tally:
    """Datagrams and bytes one attacker address sent to the victim and got back from it."""

    address: tuple[str, int]
    sent: int = 0
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    from_others: int = 0  # bytes from anyone else (other nodes told about this address)

    @property
    def ratio(self) -> float:
        return self.received_bytes / self.sent_bytes if self.sent_bytes else 0.0


class _Udp(asyncio.DatagramProtocol):
    """An attacker socket that counts what it sends to the victim and what comes back."""

    def __init__(
        self,
        victim: tuple[str, int],
        on_datagram: Callable[[_Udp, bytes, tuple[str, int]], None] | None = None,
    ) -> None:
        self.victim = victim
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.tally = Tally(("", 0))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self.tally.address = (host, port)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if tuple(addr[:2]) == self.victim:
            self.tally.received += 1
            self.tally.received_bytes += len(data)
            if self.on_datagram is not None:
                self.on_datagram(self, data, addr)
        else:
            self.tally.from_others += len(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable and the like: the attacker does not care

    def send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.tally.sent += 1
        self.tally.sent_bytes += len(data)
        self.transport.sendto(data, addr or self.victim)


async def _udp(
    host: str,
    victim: tuple[str, int],
    on_datagram: Callable[[_Udp, bytes, tuple[str, int]], None] | None = None,
) -> _Udp:
    loop = asyncio.get_running_loop()
    _t, proto = await loop.create_datagram_endpoint(
        lambda: _Udp(victim, on_datagram), local_addr=(host, 0)
    )
    return proto


async def _paced(rate: float, count: int, stop: asyncio.Event, send: Callable[[int], None]) -> int:
    """Call ``send(i)`` ``count`` times at about ``rate`` per second, until ``stop``."""
    tick = 0.05
    per_tick = max(1, round(rate * tick))
    i = 0
    while i < count and not stop.is_set():
        for _ in range(min(per_tick, count - i)):
            send(i)
            i += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(tick):
                await stop.wait()
    return i


# ------------------------------------------------------------------------ DHT datagrams


def _request(name: str, *args: Any) -> bytes:
    return b"\x00" + os.urandom(20) + packb([name, list(args)])


def garbage_datagram(rng: random.Random, i: int) -> bytes:
    """One of 15 kinds of malformed datagram, chosen by ``i``."""
    mid = rng.randbytes(20)
    nid = rng.randbytes(20)
    kinds: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randrange(0, 64)),
        lambda: rng.randbytes(rng.randrange(64, 9000)),
        lambda: rng.randbytes(rng.randrange(9000, 20000)),  # beyond any reply we accept
        lambda: b"\x00" + mid + rng.randbytes(rng.randrange(1, 200)),  # bad msgpack
        lambda: b"\x01" + mid + packb([1, 2, {"value": [b"x"]}]),  # reply nobody asked for
        lambda: b"\x00" + mid + packb(["ping", [b"short"]]),
        lambda: b"\x00" + mid + packb(["no_such_rpc", [nid]]),
        lambda: b"\x00" + mid + b"\x91" * 3000 + b"\xc0",  # 3000 nested arrays
        lambda: b"\x00" + mid + b"\xdf\xff\xff\xff\xff",  # a map of 4 G entries, no data
        lambda: b"\x00" + mid + b"\x92\xa4\xff\xfe\xfd\xfc\x90",  # name not UTF-8
        lambda: b"\x00" + mid + packb(["find_value", [nid, nid, "x" * 1000]]),
        lambda: b"\x02" + mid + packb(["ping", [nid]]),
        lambda: b"\x00" + mid + packb(["store", [nid, nid, rng.randbytes(300)]]),
        lambda: b"\x00" + mid + packb(["store", [nid, rng.randbytes(7), b"v"]]),
        lambda: b"\x00" + mid + packb(["find_node", [nid, 12345]]),
    ]
    return kinds[i % len(kinds)]()


def spoofed_datagram(rng: random.Random, i: int, hot_keys: list[bytes]) -> bytes:
    """A well-formed request from a node id never seen before."""
    nid = rng.randbytes(20)
    match i % 4:
        case 0:
            return _request("ping", nid)
        case 1:
            return _request("find_node", nid, rng.randbytes(20))
        case _:
            return _request("find_value", nid, hot_keys[i % len(hot_keys)])


BAD_HOSTS = ("127.0.0.1\x00evil", "not-an-address", "", "::1", "999.1.1.1", "h" * 300)


def _responder_reply(rng: random.Random, name: str) -> Any:
    contacts = [[rng.randbytes(20), host, 4000 + n] for n, host in enumerate(BAD_HOSTS)]
    if name == "ping":
        return None  # filled with the responder's id by the caller
    if name == "store":
        return True
    if name == "find_value" and rng.random() < 0.5:
        return {"value": [rng.randbytes(40), b"", b"\x01" * 200], "nodes": contacts}
    return contacts


# ------------------------------------------------------------------------ raw records


def raw_record(ident: Identity, kind: Kind, body: bytes, *, now: float, ttl: float = 3600) -> bytes:
    """A validly signed record around ``body`` bytes encoded by hand (no body checks)."""
    w = Writer().push_u8(VERSION).push_u8(kind).push_bytes(ident.public)
    w.push_u64(time_seq(now)).push_u64(int(now)).push_u64(int(now + ttl))
    signed = w.push_varbytes(body, MAX_BODY).getvalue()
    return signed + crypto.sign(ident.signing_key, "record/" + kind.label, signed)


def provider_body(gid: bytes, cid: bytes, host: str, port: int) -> bytes:
    """A ``Provider`` body as its signer encodes it, whatever ``host`` is."""
    w = Writer().push_bytes(gid).push_bytes(cid).push_str(host, 255).push_u16(port)
    return w.push_u8(1).push_u8(0).getvalue()


def flood_records(
    rng: random.Random, count: int, gid: bytes, now: float
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of ``count`` valid records, each from a new throw-away key."""
    out = []
    for i in range(count):
        ident = Identity(SigningKey(rng.randbytes(32)), f"f{i}")
        body: JoinRequest | PeerInfo
        if i % 4 == 0:
            body = JoinRequest(gid, f"flood{i}", "let me in")
        else:
            body = PeerInfo(((FLOOD, 4000 + i % 1000),))
        rec = sign_record(ident, body, seq=time_seq(now) + i, now=now, ttl=3600)
        out.append((rec.dht_key, rec.encode()))
    return out


# ------------------------------------------------------------------------------- TCP


@dataclass
class TcpTally:
    opened: int = 0
    refused: int = 0  # could not connect at all
    closed_by_victim: int = 0
    sessions: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.sessions[what] = self.sessions.get(what, 0) + 1


async def _loris(
    victim: tuple[str, int], i: int, hello: bytes, stop: asyncio.Event, tally: TcpTally
) -> None:
    """One slow-loris connection: silent, a hello byte every 0.5 s, or a ClientHello frame
    header announcing 1 MiB followed by all of it but the last byte."""
    try:
        source = LORIS[i % len(LORIS)]
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(*victim, local_addr=(source, 0))
    except (OSError, TimeoutError):
        tally.refused += 1
        return
    tally.opened += 1
    mode = i % 3
    try:
        if mode == 2:
            writer.write(struct.pack(">IB", MiB, 1) + bytes(MiB - 1))
        sent = 0
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.5):
                    if not await reader.read(4096):
                        tally.closed_by_victim += 1
                        return
            except TimeoutError:
                pass
            if mode == 1 and sent < len(hello):
                writer.write(hello[sent : sent + 1])
                sent += 1
    except OSError:
        tally.closed_by_victim += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


PROVIDER_MODES = (
    "out-of-range piece",
    "piece past its end",
    "half a frame",
    "wrong hashes",
    "bad data then vanish",
)
"""What each crashing member's server does after the handshake (one member per mode)."""
CRASHERS = tuple(f"crash{i}" for i in range(len(PROVIDER_MODES)))


async def _provider_session(
    proto: PeerProtocol, mode: str, layout: FileLayout, tally: TcpTally
) -> None:
    """A crashing member's server side: a handshake, then its kind of misbehaviour."""
    try:
        stream = await accept_peer(proto, handshake_timeout=5, read_timeout=5)
    except (DhtshareError, OSError):
        tally.count("handshake failed")
        return
    tally.count(mode)
    pc = layout.piece_count
    transport = proto.transport
    assert transport is not None
    try:
        stream.send_nowait(Bitfield.from_pieces(pc, range(pc)))
        stream.send_nowait(Have(0xFFFFFFFF))
        async with asyncio.timeout(10):
            async for ev in stream:
                if isinstance(ev, GetHashes):
                    junk = tuple(os.urandom(32) for _ in range(ev.count))
                    stream.send_nowait(HashList(ev.start, junk))
                    if mode == "wrong hashes":
                        break
                elif isinstance(ev, Request):
                    if mode == "out-of-range piece":
                        stream.send_nowait(Piece(pc + 7, 0, b"\x00" * ev.length))
                    elif mode == "piece past its end":
                        stream.send_nowait(Piece(ev.index, ev.begin + 64 * MiB, b"\x00" * 64))
                    elif mode == "half a frame":
                        frame = stream.conn.send(Piece(ev.index, ev.begin, b"\x00" * ev.length))
                        transport.write(bytes(frame[: len(frame) // 2]))
                    else:
                        stream.send_nowait(Piece(ev.index, ev.begin, os.urandom(ev.length)))
                        transport.write(os.urandom(100))
                    break
    except (DhtshareError, OSError, TimeoutError, ValueError):
        pass
    finally:
        transport.abort()  # vanish: no Reject, no FIN


ACCESS_KEYS: dict[bytes, bytes] = {}
"""Group id -> the access key the soak's own clients and hostile providers hold (a member's:
filled when the group is formed; a removed member keeps the one it had)."""


def access_key(gid: bytes) -> bytes:
    return ACCESS_KEYS.get(gid) or bytes(32)


async def _crash_client(
    victim: tuple[str, int], ident: Identity, gid: bytes, cid: bytes, n: int, tally: TcpTally
) -> None:
    """The crashing member as a client of the victim: out-of-range asks, garbage, half frames."""
    loop = asyncio.get_running_loop()
    conn = PeerConnection(
        Role.CLIENT, ident.signing_key, group_id=gid, content_id=cid, access_key=access_key(gid)
    )
    try:
        async with asyncio.timeout(10):
            _t, proto = await loop.create_connection(
                lambda: PeerProtocol(conn), *victim, local_addr=(CRASH, 0)
            )
    except (OSError, TimeoutError):
        tally.refused += 1
        return
    tally.opened += 1
    transport = proto.transport
    assert transport is not None
    stream = PeerStream(proto, read_timeout=3)
    try:
        await stream.handshake(5)
        mode = n % 4
        if mode == 0:
            tally.count("out-of-range requests")
            stream.send_many_nowait(
                [
                    Request(1_000_000, 0, BLOCK),
                    Request(0, 1 << 31, BLOCK),
                    Have(0xFFFFFFFF),
                    GetHashes(1_000_000, 8192),
                    Bitfield(8, b"\xff"),
                ]
            )
        elif mode == 1:
            tally.count("garbage after handshake")
            transport.write(os.urandom(300))
        elif mode == 2:
            tally.count("1 MiB frame header, 999 bytes, silence")
            transport.write(struct.pack(">IB", 1 << 20, 4) + b"\0" * 999)
        else:
            tally.count("request, then vanish mid-piece")
            stream.send_nowait(Request(0, 0, BLOCK))
        if mode != 3:
            async with asyncio.timeout(3):
                async for ev in stream:
                    if isinstance(ev, ConnectionClosed | Reject):
                        tally.closed_by_victim += 1
                        break
    except (DhtshareError, OSError, TimeoutError):
        pass
    finally:
        transport.abort()


async def fetch_block(
    ident: Identity,
    victim: tuple[str, int],
    gid: bytes,
    cid: bytes,
    local: str,
    key: bytes | None = None,
) -> str:
    """What the victim does when ``ident`` asks for a block: ``"served"``, ``"not member"``
    (a Reject with NOT_MEMBER, in the handshake or later), ``"refused: <reason>"`` for any
    other Reject or end, or ``"unreachable"`` (no connection, or silence). ``key``: the
    access key ``ident`` holds (default: the members' current one)."""
    loop = asyncio.get_running_loop()
    held = key if key is not None else access_key(gid)
    conn = PeerConnection(
        Role.CLIENT, ident.signing_key, group_id=gid, content_id=cid, access_key=held
    )
    try:
        async with asyncio.timeout(10):
            _t, proto = await loop.create_connection(
                lambda: PeerProtocol(conn), *victim, local_addr=(local, 0)
            )
    except (OSError, TimeoutError):
        return "unreachable"
    assert proto.transport is not None
    stream = PeerStream(proto, read_timeout=5)
    try:
        async with asyncio.timeout(10):
            proto.transport.write(conn.initiate())
            asked = False
            async for ev in stream:
                if isinstance(ev, HandshakeComplete) and not asked:
                    stream.send_nowait(Request(0, 0, BLOCK))
                    asked = True
                elif isinstance(ev, Piece):
                    return "served"
                elif isinstance(ev, Reject):
                    if ev.reason == Reason.NOT_MEMBER:
                        return "not member"
                    return (
                        f"refused: {Reason(ev.reason).name if ev.reason in _REASONS else ev.reason}"
                    )
                elif isinstance(ev, ConnectionClosed):
                    return "refused: closed"
            return "refused: closed"
    except (DhtshareError, OSError) as exc:
        return f"refused: {type(exc).__name__}"
    except TimeoutError:
        return "unreachable"
    finally:
        await stream.aclose()


_REASONS = {int(r) for r in Reason}


# ------------------------------------------------------------------------ the victim


class Victim:
    """The ``dhtshare`` process under attack, driven through its CLI."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env = home, env
        self.pid: int | None = None
        self.port = 0
        self.peak_sampled_kb = 0

    async def cli(self, *args: str, limit: float = 30.0) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dhtshare",
            "--home",
            str(self.home),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            async with asyncio.timeout(limit):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            return -1, "", f"timed out after {limit:g} s"
        return proc.returncode or 0, out.decode(), err.decode()

    async def must(self, *args: str, limit: float = 30.0) -> str:
        code, out, err = await self.cli(*args, limit=limit)
        if code != 0:
            raise RuntimeError(f"victim: dhtshare {' '.join(args)} failed ({code}): {err}")
        return out

    async def start(self, boot: tuple[str, int]) -> None:
        await self.must("id", "create", "--name", "victim")
        out = await self.must(
            "node", "start", "--detach", "--host", VICTIM, "--bootstrap", f"{boot[0]}:{boot[1]}"
        )
        m = re.search(r"at [^:]+:(\d+) \(pid (\d+)\)", out)
        if m is None:
            raise RuntimeError(f"victim: unexpected output {out!r}")
        self.port, self.pid = int(m.group(1)), int(m.group(2))

    @property
    def address(self) -> tuple[str, int]:
        return VICTIM, self.port

    def alive(self) -> bool:
        return self.pid is not None and Path(f"/proc/{self.pid}").exists()

    def memory_kb(self) -> tuple[int, int]:
        """``(VmRSS, VmHWM)`` of the victim in KiB; (0, 0) once it is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0, 0
        fields = dict(re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M))
        return int(fields.get("VmRSS", 0)), int(fields.get("VmHWM", 0))

    async def sample_memory(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.alive():
            rss, hwm = self.memory_kb()
            self.peak_sampled_kb = max(self.peak_sampled_kb, rss, hwm)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await stop.wait()

    async def stop(self) -> None:
        """``node stop`` (it waits for the node to exit), then SIGKILL if it is still there.
        Asked even without a pid: a ``node start`` that timed out may have left a node."""
        if (self.home / "identity.json").exists():
            await self.cli("node", "stop", limit=20)
        self.kill()

    def kill(self) -> None:
        if self.alive() and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def log_problems(self) -> tuple[list[str], int]:
        """Lines of the victim's logs naming an asyncio failure, and its traceback count."""
        lines: list[str] = []
        tracebacks = 0
        for name in ("node.log", "node.out"):
            with contextlib.suppress(OSError):
                text = (self.home / name).read_text(errors="replace")
                tracebacks += text.count("Traceback (most recent call last)")
                lines += [ln for ln in text.splitlines() if any(p in ln for p in LOG_PROBLEMS)]
        return lines, tracebacks


# ------------------------------------------------------------------------------ scenario


@dataclass
class _World:
    opts: SoakOptions
    work: Path
    rng: random.Random
    say: Callable[[str], None]
    t0: float = field(default_factory=time.monotonic)
    dht: list[DhtNode] = field(default_factory=list)
    nodes: dict[str, Node] = field(default_factory=dict)
    idents: dict[str, Identity] = field(default_factory=dict)
    gid: bytes = b""
    big_cid: bytes = b""
    small_cid: bytes = b""
    big_sha: bytes = b""
    layout: FileLayout | None = None
    victim_key: bytes = b""
    victim_asked_seeder: asyncio.Event = field(default_factory=asyncio.Event)

    def watch_seeder(self) -> None:
        """Set ``victim_asked_seeder`` when the seeder checks the victim's membership (its
        handshake and every block it asks for)."""
        registry = self.nodes["seeder"].registry
        check = registry.is_member

        def watched(group_id: bytes, key: bytes) -> bool:
            if key == self.victim_key:
                self.victim_asked_seeder.set()
            return check(group_id, key)

        registry.is_member = watched

    def event(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.2f}s] {text}")


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.digest()


def _write_random(path: Path, size: int, rng: random.Random) -> bytes:
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(left, MiB))
            h.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return h.digest()


async def _honest_network(w: _World) -> tuple[str, int]:
    """Bootstrap and DHT-only nodes, then owner, seeder and the member to be removed."""
    boot = DhtNode()
    await boot.listen(0, BOOT)
    w.dht.append(boot)
    for host in DHT_ONLY:
        node = DhtNode()
        await node.listen(0, host)
        w.dht.append(node)
    await asyncio.gather(*(n.bootstrap([boot.address]) for n in w.dht[1:]))
    for name in ("owner", "seeder", "dave", "mallory", *CRASHERS):
        w.idents[name] = Identity(SigningKey(w.rng.randbytes(32)), name)
    hosts = {"owner": OWNER, "seeder": SEEDER, "dave": DAVE}
    configs = [
        NodeConfig(
            home=w.work / name,
            host=host,
            bootstrap=(boot.address,),
            identity=w.idents[name],
            control=False,
        )
        for name, host in hosts.items()
    ]
    started = await asyncio.gather(*(Node.start(c) for c in configs))
    w.nodes = dict(zip(hosts, started, strict=True))
    return boot.address


async def _form_group(w: _World) -> None:
    owner = w.nodes["owner"]
    w.gid = await owner.groups.create("soak", public=True)
    invite = owner.groups.state.keys[w.gid].invite
    joiners = [w.nodes["seeder"].groups, w.nodes["dave"].groups] + [
        GroupService(owner.dht, w.idents[n], GroupState()) for n in ("mallory", *CRASHERS)
    ]
    for g in joiners:
        await g.request_join(invite, "member")
    for request in await owner.groups.requests(w.gid):
        await owner.groups.accept(w.gid, request.requester)
    for name in ("seeder", "dave"):
        await w.nodes[name].groups.maintain()
        await w.nodes[name].groups.refresh(w.gid)
    key = owner.groups.access_key(w.gid)
    if key is not None:
        ACCESS_KEYS[w.gid] = key


async def _victim_joins(w: _World, victim: Victim) -> None:
    owner = w.nodes["owner"]
    invite = owner.groups.state.keys[w.gid].invite
    await victim.must("group", "join", invite, "--message", "victim here")
    mine = [r for r in await owner.groups.requests(w.gid) if r.name == "victim"]
    if len(mine) != 1:
        raise RuntimeError(f"the owner sees {len(mine)} join requests from the victim")
    w.victim_key = mine[0].requester
    await owner.groups.accept(w.gid, w.victim_key)
    for node in w.nodes.values():
        await node.groups.refresh(w.gid)


async def _setup(w: _World, victim: Victim) -> None:
    boot = await _honest_network(w)
    w.event(f"honest network up: {len(w.dht)} DHT nodes, {len(w.nodes)} full nodes")
    await victim.start(boot)
    w.event(f"victim running at {VICTIM}:{victim.port} (pid {victim.pid})")
    await _form_group(w)
    await _victim_joins(w, victim)
    w.event(f"group formed: owner, seeder, dave, mallory, {len(CRASHERS)} crashers, victim")
    big, small = w.work / "big.bin", w.work / "small.bin"
    w.big_sha = await asyncio.to_thread(_write_random, big, w.opts.size, w.rng)
    await asyncio.to_thread(_write_random, small, MiB, w.rng)
    w.watch_seeder()
    shared = await w.nodes["seeder"].share(w.gid, big)
    w.big_cid, w.layout = shared.content_id, shared.layout
    out = await victim.must("share", w.gid.hex(), str(small))
    w.small_cid = bytes.fromhex(out.strip().split()[-1])
    w.event(f"seeder shares {w.opts.size // MiB} MiB; victim shares 1 MiB")
    served = await fetch_block(w.idents["dave"], victim.address, w.gid, w.small_cid, DAVE)
    if served != "served":
        raise RuntimeError(f"the victim does not serve dave before the removal: {served}")


class HostileProviders:
    """The crashing members' peer servers (one per mode), all on the CRASH address."""

    def __init__(self, layout: FileLayout, tally: TcpTally) -> None:
        self.layout, self.tally = layout, tally
        self.tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.Server] = []

    def _on_connect(self, mode: str, proto: PeerProtocol) -> None:
        self.tally.opened += 1
        task = asyncio.ensure_future(_provider_session(proto, mode, self.layout, self.tally))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, ident: Identity, mode: str) -> int:
        """Serve as ``ident`` with misbehaviour ``mode``; returns the port."""
        loop = asyncio.get_running_loop()

        def factory() -> PeerProtocol:
            return server_protocol(
                ident, lambda proto: self._on_connect(mode, proto), lambda: dict(ACCESS_KEYS)
            )

        server = await loop.create_server(factory, CRASH, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _hostile_providers(w: _World, victim: Victim, tally: TcpTally) -> HostileProviders:
    """The crashing members' provider records, and mallory's whose host is not an address."""
    assert w.layout is not None
    hostile = HostileProviders(w.layout, tally)
    if "providers" not in w.opts.attacks:
        return hostile
    now = time.time()
    for i, mode in enumerate(PROVIDER_MODES):
        ident = w.idents[f"crash{i}"]
        port = await hostile.start(ident, mode)
        body = Provider(w.gid, w.big_cid, CRASH, port, True)
        rec = sign_record(ident, body, seq=time_seq(now), now=now, ttl=3600)
        # members hold the epoch secret: the crasher seals its record as any member does
        sealed = SealedDht(w.nodes["owner"].dht, w.nodes["owner"].groups.state.keys, ident)
        await sealed.put(Where("epoch", w.gid), rec)
    bad = raw_record(
        w.idents["mallory"],
        Kind.PROVIDER,
        provider_body(w.gid, w.big_cid, BAD_HOSTS[0], 4000),
        now=now,
    )
    key = key_for(Kind.PROVIDER, w.gid, w.big_cid)
    sock = await _udp(MALLORY, victim.address)
    nodes = [n.address for n in w.dht] + [n.dht.address for n in w.nodes.values()]
    for addr in [victim.address, *nodes]:
        sock.send(_request("store", w.rng.randbytes(20), key, bad), addr)
    if sock.transport is not None:
        sock.transport.close()
    return hostile


@dataclass
class _Attack:
    name: str
    sockets: list[_Udp]
    task: asyncio.Task[Any]


async def _start_udp_attacks(w: _World, victim: Victim, stop: asyncio.Event) -> list[_Attack]:
    o, rng, va = w.opts, random.Random(w.rng.random()), victim.address
    attacks: list[_Attack] = []

    def paced(
        name: str, socks: list[_Udp], rate: float, count: int, send: Callable[[int], None]
    ) -> None:
        attacks.append(_Attack(name, socks, asyncio.ensure_future(_paced(rate, count, stop, send))))

    if "garbage" in o.attacks:
        garbage = await _udp(GARBAGE, va)
        paced(
            "garbage",
            [garbage],
            o.garbage_rate,
            o.garbage_max,
            lambda i: garbage.send(garbage_datagram(rng, i)),
        )
    if "spoofed" in o.attacks:
        keys = w.nodes["owner"].groups.state.keys[w.gid]
        epoch, inbox = keys.space(), Invite.parse(keys.invite).space
        assert epoch is not None
        hot = [  # keys the victim holds records under: the group's sealed keys
            inbox.dht_key(key_for(Kind.JOIN_REQUEST, w.gid)),
            epoch.dht_key(key_for(Kind.FILE_ENTRY, w.gid)),
            epoch.dht_key(key_for(Kind.PROVIDER, w.gid, w.big_cid)),
            epoch.dht_key(key_for(Kind.ROSTER, w.gid)),
        ]
        spoofs = [await _udp(host, va) for host in SPOOFED]
        paced(
            "spoofed",
            spoofs,
            o.spoof_rate,
            o.spoof_max,
            lambda i: spoofs[i % len(spoofs)].send(spoofed_datagram(rng, i, hot)),
        )
    if "flood" in o.attacks:
        records = await asyncio.to_thread(flood_records, rng, o.flood_records, w.gid, time.time())
        flood = await _udp(FLOOD, va)

        def store(i: int) -> None:
            key, value = records[i % len(records)]
            flood.send(_request("store", rng.randbytes(20), key, value))

        paced("flood", [flood], o.flood_rate, o.flood_max, store)
    if "responder" in o.attacks:
        rid = rng.randbytes(20)

        def answer(sock: _Udp, data: bytes, addr: tuple[str, int]) -> None:
            if data[:1] != b"\x00" or len(data) < 22:
                return
            try:
                name = str(unpackb(data[21:])[0])
            except Exception:
                return
            reply = _responder_reply(rng, name)
            sock.send(b"\x01" + data[1:21] + packb(rid if reply is None else reply), addr)

        responder = await _udp(RESPONDER, va, answer)
        paced("responder", [responder], 1.0, 120, lambda i: responder.send(_request("ping", rid)))
    return attacks


async def _tcp_attacks(
    w: _World, victim: Victim, stop: asyncio.Event, loris: TcpTally, crash: TcpTally
) -> None:
    hello = PeerConnection(
        Role.CLIENT,
        SigningKey(os.urandom(32)),
        group_id=w.gid,
        content_id=w.small_cid,
        access_key=os.urandom(32),  # a stranger's: it never gets past the hello anyway
    ).initiate()
    async with asyncio.TaskGroup() as tg:
        for i in range(w.opts.loris if "loris" in w.opts.attacks else 0):
            tg.create_task(_loris(victim.address, i, hello, stop, loris))
        n = 0
        sessions = w.opts.crash_sessions if "crash" in w.opts.attacks else 0
        while n < sessions and not stop.is_set():
            cid = w.small_cid if n % 2 else w.big_cid
            await _crash_client(victim.address, w.idents["crash0"], w.gid, cid, n, crash)
            n += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()


async def _removal(
    w: _World, victim: Victim, download: asyncio.Task[dict[str, Any]]
) -> dict[str, Any]:
    """Once the victim's download is under way (its ``get`` has read the roster) or over,
    the owner removes dave; dave then asks the victim for a block until it is refused."""
    asked = asyncio.ensure_future(w.victim_asked_seeder.wait())
    try:
        await asyncio.wait([asked, download], return_when=asyncio.FIRST_COMPLETED)
    finally:
        asked.cancel()
    daves = access_key(w.gid)  # what dave keeps: the key of the epoch he was removed from
    owner = w.nodes["owner"].groups
    await owner.remove(w.gid, w.idents["dave"].public)
    ACCESS_KEYS[w.gid] = owner.access_key(w.gid) or bytes(32)  # the members' new epoch
    removed_at = time.monotonic()
    w.event("owner removed dave")
    polls, outcomes = 0, Counter[str]()
    while time.monotonic() - removed_at < w.opts.removal_limit:
        polls += 1
        got = await fetch_block(w.idents["dave"], victim.address, w.gid, w.small_cid, DAVE, daves)
        outcomes[got] += 1
        # refused as a non-member, or (once the victim is in the new epoch) at the handshake:
        # dave's key is no longer one the victim accepts
        if got in ("not member", "refused: RemoteProtocolError"):
            seconds = time.monotonic() - removed_at
            w.event(f"victim refused dave {seconds:.1f} s after the removal")
            return {
                "refused_after_s": round(seconds, 2),
                "polls": polls,
                "outcomes": dict(outcomes),
            }
        await asyncio.sleep(w.opts.poll_every)  # pacing of the member's retries
    w.event(f"victim still served dave {w.opts.removal_limit:g} s after the removal")
    return {"refused_after_s": None, "polls": polls, "outcomes": dict(outcomes)}


async def _download(w: _World, victim: Victim) -> dict[str, Any]:
    out_dir = w.work / "victim-dl"
    started = time.monotonic()
    code, _out, err = await victim.cli(
        "get", w.gid.hex(), "big.bin", "--out", str(out_dir), limit=w.opts.download_limit
    )
    seconds = time.monotonic() - started
    path = out_dir / "big.bin"
    verified = code == 0 and path.exists() and await asyncio.to_thread(_sha256, path) == w.big_sha
    w.event(
        f"victim's download: exit {code}, {'verified' if verified else 'NOT verified'}"
        f" in {seconds:.1f} s"
    )
    return {
        "exit": code,
        "verified": verified,
        "seconds": round(seconds, 2),
        "mb_s": round(w.opts.size / seconds / 1e6, 1) if verified else 0.0,
        "error": "" if code == 0 else (err.strip().splitlines() or ["?"])[0],
    }


async def _afterwards(w: _World, victim: Victim) -> dict[str, Any]:
    """Once the attacks stopped: DHT ping, serving a member, publishing, the control socket."""
    probe = DhtNode()
    await probe.listen(0, PROBE)
    try:
        pings = 0
        for _ in range(3):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    pings += await probe.ping(victim.address)
    finally:
        await probe.aclose()
    served = await fetch_block(w.idents["seeder"], victim.address, w.gid, w.big_cid, SEEDER)
    after = w.work / "after.bin"
    after.write_bytes(os.urandom(64 * 1024))
    code, _out, err = await victim.cli("share", w.gid.hex(), str(after), limit=30)
    status_code, status, _ = await victim.cli("node", "status", "--json", limit=15)
    return {
        "pings_answered": f"{pings}/3",
        "serves_member": served,
        "share_exit": code,
        "share_error": "" if code == 0 else (err.strip().splitlines() or ["?"])[0],
        "status": json.loads(status) if status_code == 0 else None,
    }


def _routing_table(home: Path) -> dict[str, Any]:
    """The victim's saved routing table (``dht.json``, written when it stops): how many
    contacts, and how many of them at each attacker address."""
    try:
        doc = json.loads((home / "dht.json").read_text())
        contacts = [str(row[1]) for row in doc["contacts"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {"saved": False}
    attackers = {GARBAGE, FLOOD, RESPONDER, *SPOOFED}
    by_address = Counter(ip for ip in contacts if ip in attackers)
    return {"saved": True, "contacts": len(contacts), "attacker_contacts": dict(by_address)}


def _summarise(attacks: list[_Attack]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in attacks:
        t = [s.tally for s in a.sockets]
        sent = sum(x.sent_bytes for x in t)
        got = sum(x.received_bytes for x in t)
        out[a.name] = {
            "addresses": len(t),
            "datagrams": sum(x.sent for x in t),
            "bytes_to_victim": sent,
            "bytes_from_victim": got,
            "ratio": round(got / sent, 3) if sent else 0.0,
            "max_ratio_per_address": round(max((x.ratio for x in t), default=0.0), 3),
            "bytes_from_others": sum(x.from_others for x in t),
            "validated": a.name == "responder",  # it answers the victim's requests
            "per_address": [
                (f"{x.address[0]}:{x.address[1]}", x.sent_bytes, x.received_bytes) for x in t
            ],
        }
    return out


async def run_soak(
    work: Path, opts: SoakOptions | None = None, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the whole scenario in ``work`` (a fresh directory); return the report."""
    opts = opts or SoakOptions()
    w = _World(opts, work, random.Random(opts.seed), say or (lambda _s: None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSHARE_")}
    env["PYTHONPATH"] = CODE_ROOT  # the victim runs the same code as this process
    victim = Victim(work / "victim", env)
    stop, stop_memory = asyncio.Event(), asyncio.Event()
    attacks: list[_Attack] = []
    background: list[asyncio.Task[Any]] = []
    hostile: HostileProviders | None = None
    loris, crash, providers = TcpTally(), TcpTally(), TcpTally()
    report: dict[str, Any] = {
        "options": {"size": opts.size, "seed": opts.seed, "attacks": sorted(opts.attacks)}
    }
    try:
        await _setup(w, victim)
        memory = asyncio.ensure_future(victim.sample_memory(stop_memory))
        background.append(memory)
        report["rss_before_attacks_mb"] = round(victim.memory_kb()[0] / 1024, 1)
        hostile = await _hostile_providers(w, victim, providers)
        attacks = await _start_udp_attacks(w, victim, stop)
        tcp = asyncio.ensure_future(_tcp_attacks(w, victim, stop, loris, crash))
        background.append(tcp)
        w.event("attacks started")
        attack_t0 = time.monotonic()
        await asyncio.sleep(opts.warmup)  # the attacks build up before the download starts
        fetching = asyncio.ensure_future(_download(w, victim))
        background.append(fetching)
        removal = await _removal(w, victim, fetching)
        download = await fetching
        stop.set()
        report["attack_seconds"] = round(time.monotonic() - attack_t0, 2)
        await asyncio.gather(*(a.task for a in attacks), tcp)
        w.event("attacks stopped")
        report["download"] = download
        report["removal"] = {**removal, "maintenance_interval_s": MAINTENANCE_DEFAULT}
        report["afterwards"] = await _afterwards(w, victim)
        report["udp"] = _summarise(attacks)
        report["tcp"] = {
            "slow_loris": vars(loris),
            "crash_client": vars(crash),
            "crash_providers": vars(providers),
        }
        rss, hwm = victim.memory_kb()
        report["victim_alive"] = victim.alive()
        report["peak_rss_mb"] = round(max(hwm, victim.peak_sampled_kb) / 1024, 1)
        report["rss_end_mb"] = round(rss / 1024, 1)
    finally:
        stop.set()
        stop_memory.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for a in attacks:
            a.task.cancel()
            for s in a.sockets:
                if s.transport is not None:
                    s.transport.close()
        if hostile is not None:
            await hostile.close()
        await victim.stop()
        victim.kill()
        await asyncio.gather(*(n.close() for n in w.nodes.values()), return_exceptions=True)
        await asyncio.gather(*(n.aclose() for n in w.dht), return_exceptions=True)
    problems, tracebacks = victim.log_problems()
    report["log_problems"] = problems[:20]
    report["log_tracebacks"] = tracebacks
    report["routing_table"] = _routing_table(victim.home)
    report["seconds"] = round(time.monotonic() - w.t0, 1)
    return report


# ------------------------------------------------------------------------------- output


def render(r: dict[str, Any]) -> str:
    """The report as a few plain tables."""
    lines = [
        f"hostile soak, {r['options']['size'] // MiB} MiB, seed {r['options']['seed']}, "
        f"{r.get('seconds', '?')} s in all"
    ]
    d = r.get("download", {})
    lines.append(
        f"download: {'verified' if d.get('verified') else 'FAILED'} in "
        f"{d.get('seconds')} s ({d.get('mb_s')} MB/s) {d.get('error', '')}"
    )
    rm = r.get("removal", {})
    lines.append(
        f"removal: refused after {rm.get('refused_after_s')} s "
        f"(maintenance interval {rm.get('maintenance_interval_s')} s, "
        f"{rm.get('polls')} polls)"
    )
    lines.append(
        f"victim RSS: {r.get('rss_before_attacks_mb')} MB before the attacks, "
        f"peak {r.get('peak_rss_mb')} MB, {r.get('rss_end_mb')} MB at the end"
    )
    lines.append("")
    lines.append(
        f"{'attack':<10} {'addrs':>5} {'datagrams':>9} {'bytes in':>10} "
        f"{'bytes out':>10} {'ratio':>7} {'max/addr':>8}"
    )
    for name, u in r.get("udp", {}).items():
        lines.append(
            f"{name:<10} {u['addresses']:>5} {u['datagrams']:>9} "
            f"{u['bytes_to_victim']:>10} {u['bytes_from_victim']:>10} "
            f"{u['ratio']:>7} {u['max_ratio_per_address']:>8}"
            + ("  (validated)" if u["validated"] else "")
        )
    lines.append("")
    for name, t in r.get("tcp", {}).items():
        lines.append(f"{name}: {json.dumps(t)}")
    lines.append(
        f"afterwards: {json.dumps(r.get('afterwards', {}).get('pings_answered'))} pings, "
        f"serves a member: {r.get('afterwards', {}).get('serves_member')}, share exit "
        f"{r.get('afterwards', {}).get('share_exit')}"
    )
    status = r.get("afterwards", {}).get("status") or {}
    for part, counts in (status.get("counters") or {}).items():
        shown = {k: v for k, v in counts.items() if not k.startswith(("rpc_", "push"))}
        lines.append(f"victim's {part} counters: {json.dumps(shown)}")
    table = r.get("routing_table", {})
    lines.append(
        f"victim's routing table: {table.get('contacts')} contacts, at attacker addresses: "
        f"{table.get('attacker_contacts')}"
    )
    lines.append(
        f"log problems: {len(r.get('log_problems', []))}, tracebacks: {r.get('log_tracebacks')}"
    )
    lines += [f"  {p}" for p in r.get("log_problems", [])[:5]]
    return "\n".join(lines)


def _size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="32M", help="the honest download's size (32M)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--attacks", default=",".join(sorted(ATTACKS)), help="comma-separated subset to run"
    )
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temp dir")
    args = parser.parse_args(argv)
    chosen = frozenset(a for a in args.attacks.split(",") if a)
    if not chosen <= ATTACKS:
        parser.error(f"unknown attacks: {sorted(chosen - ATTACKS)}")
    opts = SoakOptions(size=_size(args.size), seed=args.seed, attacks=chosen)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=False)
        report = asyncio.run(run_soak(Path(args.keep), opts, say))
    else:
        with tempfile.TemporaryDirectory(prefix="dhtshare-hostile-") as tmp:
            report = asyncio.run(run_soak(Path(tmp), opts, say))
    print(json.dumps(report, indent=2) if args.json else render(report))
    ok = (
        report.get("download", {}).get("verified")
        and report.get("removal", {}).get("refused_after_s") is not None
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
