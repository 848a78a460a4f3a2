"""An IP address and port on the wire, as the connectivity frames carry it (pure).

``u8 length`` (4 or 16), the raw address bytes, ``u16 port``: one encoding for the
``RELAY`` and ``PUNCH`` payloads (docs/wire.md).
"""

from __future__ import annotations

import ipaddress

from dhtshare.codec import Reader, Writer
from dhtshare.errors import DecodeError

__all__ = ["check_address", "pull_address", "push_address"]


def check_address(host: str, port: int, *, min_port: int = 0) -> None:
    """``ValueError`` unless ``host`` is an IP literal and ``min_port <= port <= 65535``."""
    ipaddress.ip_address(host)
    if not min_port <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")


def push_address(w: Writer, host: str, port: int) -> Writer:
    packed = ipaddress.ip_address(host).packed
    return w.push_u8(len(packed)).push_bytes(packed).push_u16(port)


def pull_address(r: Reader) -> tuple[str, int]:
    size = r.pull_u8()
    if size not in (4, 16):
        raise DecodeError(f"address of {size} bytes")
    host = str(ipaddress.ip_address(r.pull_bytes(size)))
    return host, r.pull_u16()
