"""What crossed the loopback wire: every TCP and UDP payload on ``lo``, per flow, as the kernel
carried it (an ``AF_PACKET`` socket bound to ``lo``: needs root, as CI runs), and the searches
the privacy tests run over it.

``WireCapture(keep)`` keeps the flows ``keep(flow)`` accepts (e.g. ``on_hosts(...)``), each
flow one direction of one connection or one UDP socket pair, its payloads concatenated in
the order the kernel delivered them (loopback neither loses nor reorders), so a string split
over two TCP segments is still found. ``close()`` reads the kernel's drop counter: a test
asserts ``drops == 0`` before it trusts an absence.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "TCP",
    "UDP",
    "Flow",
    "WireCapture",
    "encodings",
    "first_hits",
    "hits",
    "on_hosts",
    "windows",
    "wire_capture",
]

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
_ETH_P_ALL = 0x0003
_SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max
_SOL_PACKET, _PACKET_STATISTICS = 263, 6


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of one TCP connection or UDP socket pair."""

    proto: int
    src: tuple[str, int]
    dst: tuple[str, int]

    def __str__(self) -> str:
        kind = {TCP: "tcp", UDP: "udp"}.get(self.proto, str(self.proto))
        return f"{kind} {self.src[0]}:{self.src[1]} -> {self.dst[0]}:{self.dst[1]}"


def on_hosts(*hosts: str) -> Callable[[Flow], bool]:
    """Keep the flows to or from any of ``hosts``."""
    wanted = set(hosts)
    return lambda flow: flow.src[0] in wanted or flow.dst[0] in wanted


class WireCapture:
    """Every payload of ``protocols`` on ``lo`` in the flows ``keep`` accepts, read by a thread
    until ``close()``; ``packets`` counts the kept packets that carried a payload."""

    def __init__(
        self, keep: Callable[[Flow], bool], protocols: Iterable[int] = (TCP,), size: int = 64 << 20
    ) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        try:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
            self.sock.bind(("lo", 0))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(0.05)
        self.keep, self.protocols = keep, frozenset(protocols)
        self.flows: dict[Flow, bytearray] = {}
        self.packets = 0
        self.fragments = 0  # IP fragments after the first: no ports to file them under
        self.drops = 0
        self._decided: dict[bytes, Flow | None] = {}
        self._awaited: bytes | None = None
        self._seen = threading.Event()
        self._stop = threading.Event()
        self._stop_by = float("inf")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # once told to stop: read on until lo is quiet for a moment (what was sent is in),
        # but no longer than ``_DRAIN`` seconds, busy lo or not
        while True:
            try:
                frame, where = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            if self._stop.is_set() and time.monotonic() > self._stop_by:
                return
            if where[2] == socket.PACKET_HOST:  # lo shows each packet leaving and arriving
                self._take(frame[14:])  # after the (all-zero) Ethernet header of lo

    def _take(self, ip: bytes) -> None:
        if ip[0] >> 4 != 4 or ip[9] not in self.protocols:
            return
        if int.from_bytes(ip[6:8], "big") & 0x1FFF:
            self.fragments += 1
            return
        body = ip[(ip[0] & 15) * 4 : int.from_bytes(ip[2:4], "big")]
        key = bytes(ip[9:10] + ip[12:20] + body[:4])
        if key not in self._decided:
            self._decided[key] = self._flow(ip[9], ip[12:20], body[:4])
        flow = self._decided[key]
        if flow is None:
            return
        payload = body[(body[12] >> 4) * 4 :] if flow.proto == TCP else body[8:]
        if payload:
            self.packets += 1
            self.flows.setdefault(flow, bytearray()).extend(payload)
            if self._awaited is not None and self._awaited in payload:
                self._seen.set()

    def _flow(self, proto: int, hosts: bytes, ports: bytes) -> Flow | None:
        src_port, dst_port = struct.unpack("!HH", ports)
        src, dst = socket.inet_ntoa(hosts[:4]), socket.inet_ntoa(hosts[4:])
        flow = Flow(proto, (src, src_port), (dst, dst_port))
        return flow if self.keep(flow) else None

    def mark(self, marker: bytes, src: str, dst: tuple[str, int], timeout: float = 10.0) -> None:
        """Send ``marker`` in one UDP datagram from ``src`` to ``dst`` (kept by ``keep``;
        best a closed port) and return once this capture has read it."""
        self._seen.clear()
        self._awaited = marker
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((src, 0))
            sock.sendto(marker, dst)
        if not self._seen.wait(timeout):
            raise AssertionError(f"the capture did not see the marker datagram to {dst}")
        self._awaited = None

    def close(self) -> None:
        """Stop reading; ``drops`` is then how many packets the kernel had no room for."""
        self._stop_by = time.monotonic() + _DRAIN
        self._stop.set()
        self._thread.join(_DRAIN + 5)
        packets_and_drops = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        self.drops = struct.unpack("II", packets_and_drops)[1]
        self.sock.close()

    def payload_bytes(self, proto: int) -> int:
        return sum(len(data) for flow, data in self.flows.items() if flow.proto == proto)


_DRAIN = 2.0  # seconds a closing capture may still read a busy lo


def wire_capture(
    keep: Callable[[Flow], bool], protocols: Iterable[int] = (TCP,)
) -> WireCapture | None:
    """A ``WireCapture``, or ``None`` where there can be none (not root, or not Linux)."""
    try:
        return WireCapture(keep, protocols)
    except (OSError, AttributeError):
        return None


def windows(data: bytes, size: int = 64) -> set[bytes]:
    """Every ``size``-byte run of ``data`` at a multiple of ``size``: any plaintext run of
    ``2 * size - 1`` bytes or more contains one."""
    return {data[i : i + size] for i in range(0, len(data) - size + 1, size)}


def hits(captured: bytes, runs: set[bytes], size: int = 64) -> int:
    """How many ``size``-byte runs of ``captured`` are among ``runs``."""
    return sum(1 for i in range(len(captured) - size + 1) if captured[i : i + size] in runs)


def encodings(label: str, raw: bytes) -> dict[str, bytes]:
    """``raw`` as bytes and as every text a program is likely to write it in: hex (either
    case), base64 (standard and URL-safe, unpadded), base32 (either case, unpadded: the
    form of a printed member id), keyed ``"label (form)"``."""
    b64 = base64.b64encode(raw).rstrip(b"=")
    b32 = base64.b32encode(raw).rstrip(b"=")
    return {
        f"{label} (raw)": raw,
        f"{label} (hex)": raw.hex().encode(),
        f"{label} (HEX)": raw.hex().upper().encode(),
        f"{label} (base64)": b64,
        f"{label} (base64url)": b64.replace(b"+", b"-").replace(b"/", b"_"),
        f"{label} (base32)": b32.lower(),
        f"{label} (BASE32)": b32,
    }


def first_hits(
    places: Mapping[str, bytes], needles: Mapping[str, bytes]
) -> dict[str, tuple[str, int]]:
    """For each needle found in any of ``places`` (name -> bytes): the first place, in the
    order given, and the offset there."""
    found: dict[str, tuple[str, int]] = {}
    for label, needle in needles.items():
        for place, data in places.items():
            at = data.find(needle)
            if at >= 0:
                found[label] = (place, at)
                break
    return found
