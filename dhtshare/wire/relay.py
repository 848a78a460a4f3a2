"""Relay control messages: the payload of a ``FrameType.RELAY`` frame (sans-I/O).

A payload is a ``u8`` kind, then the body; every payload is at most ``MAX_RELAY_PAYLOAD``
bytes (under the pre-handshake frame limit). Addresses are ``u8 length`` (4 or 16), the
raw IP bytes, ``u16 port``. ``decode_relay`` is strict (every byte consumed) and the one
place where ``DecodeError`` and bad field values become ``RemoteProtocolError``.

- ``Reserve(key, time, host, port, signature)``: a private node asks for a reservation on
  the TCP connection it keeps open; ``key`` is its *relay key* (``RelayKey``: random,
  made per node start, never its identity key, which these frames never carry: issue 17);
  ``host:port`` is the relay's address as the node dialled it, and ``signature`` is the
  relay key's over ``reserve_message(key, time, host, port)`` (purpose
  ``RESERVE_PURPOSE``), so nobody reserves in another key's name, and a relay cannot
  replay the request to another relay (which accepts only its own address).
- ``Reserved(ttl, host, port)``: granted for ``ttl`` seconds; the address the relay saw.
- ``Refused(code, text)``: no (``RefuseCode``), to a ``Reserve`` or a ``Connect``.
- ``Connect(target_key)``: a downloader asks for a circuit to the holder of the relay key
  ``target_key`` (the holder's provider record names it with the relay's address).
- ``Incoming(circuit_id, host, port)``: on the reservation connection: someone (seen at
  ``host:port``) wants a circuit; answer by a new connection whose first frame is
  ``Accept(circuit_id)``.
- ``Ready()``: to both ends of a circuit; from the next byte on the relay splices.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias

from nacl.signing import SigningKey

from dhtshare import crypto
from dhtshare.codec import Reader, Writer
from dhtshare.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from dhtshare.errors import DecodeError, Malformed, RemoteProtocolError
from dhtshare.wire.address import check_address, pull_address, push_address
from dhtshare.wire.frames import MAX_HANDSHAKE_FRAME, FrameType, Reason, encode_frame

__all__ = [
    "CIRCUIT_ID_SIZE",
    "MAX_REFUSE_TEXT",
    "MAX_RELAY_PAYLOAD",
    "RESERVE_PURPOSE",
    "Accept",
    "Connect",
    "Incoming",
    "Ready",
    "RefuseCode",
    "Refused",
    "RelayKey",
    "RelayKind",
    "RelayMessage",
    "Reserve",
    "Reserved",
    "decode_relay",
    "encode_relay",
    "relay_frame",
    "reserve_message",
]

MAX_RELAY_PAYLOAD = 512
"""Largest payload of a RELAY frame (the pre-handshake frame limit)."""
MAX_REFUSE_TEXT = 200
"""Longest ``Refused`` text, in UTF-8 bytes."""
CIRCUIT_ID_SIZE = 16
"""Random circuit ids: an ``Accept`` cannot guess another reservation's circuit."""
RESERVE_PURPOSE = "relay-reserve"
"""The ``crypto.sign`` purpose of a ``Reserve`` signature."""

assert MAX_RELAY_PAYLOAD <= MAX_HANDSHAKE_FRAME

_MALFORMED = Malformed("relay message", lambda text: RemoteProtocolError(text, Reason.PROTOCOL))
_RESERVE_TIME = struct.Struct(">Q")


class RelayKind(IntEnum):
    """The first byte of a RELAY payload."""

    RESERVE = 1
    RESERVED = 2
    REFUSED = 3
    CONNECT = 4
    INCOMING = 5
    ACCEPT = 6
    READY = 7


class RefuseCode(IntEnum):
    """Why a relay says no."""

    NO_RESERVATION = 1  # Connect: the target holds no reservation here
    LIMIT = 2  # a reservation or circuit limit is reached
    TIMEOUT = 3  # the target did not accept the circuit in time
    BAD_REQUEST = 4  # a bad signature, a stale time, an unknown circuit
    NOT_RELAYING = 5  # this node does not relay


@dataclass(frozen=True, slots=True)
class RelayKey:
    """The key a node reserves under at relays, and that downloaders name in ``Connect``.

    A fresh ed25519 key pair (``generate``: one per node start), never derived from the
    node's identity: a relay, and anyone watching the reservation or the circuit, learns
    this key and nothing that names the member (issue 17). The member's own key is
    checked only inside the peer handshake, end to end."""

    signing_key: SigningKey = field(default_factory=SigningKey.generate, repr=False)

    @classmethod
    def generate(cls) -> RelayKey:
        return cls(SigningKey.generate())

    @property
    def public(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def reserve(self, time: int, host: str, port: int) -> Reserve:
        """A signed ``Reserve`` at ``time`` for the relay reached at ``host:port``."""
        message = reserve_message(self.public, time, host, port)
        signature = crypto.sign(self.signing_key, RESERVE_PURPOSE, message)
        return Reserve(self.public, time, host, port, signature)


@dataclass(frozen=True, slots=True)
class Reserve:
    key: bytes
    time: int
    host: str  # the relay, as the node dialled it
    port: int
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"key must be {PUBLIC_KEY_SIZE} bytes")
        if len(self.signature) != SIGNATURE_SIZE:
            raise ValueError(f"signature must be {SIGNATURE_SIZE} bytes")
        if not 0 <= self.time < 1 << 64:
            raise ValueError("time out of range")
        check_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Reserved:
    ttl: int
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.ttl <= 0xFFFFFFFF:
            raise ValueError("ttl out of range")
        check_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Refused:
    code: int
    text: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF:
            raise ValueError("code out of range")
        if len(self.text.encode("utf-8")) > MAX_REFUSE_TEXT:
            raise ValueError(f"text longer than {MAX_REFUSE_TEXT} bytes")


@dataclass(frozen=True, slots=True)
class Connect:
    target_key: bytes

    def __post_init__(self) -> None:
        if len(self.target_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"target_key must be {PUBLIC_KEY_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Incoming:
    circuit_id: bytes
    host: str
    port: int

    def __post_init__(self) -> None:
        if len(self.circuit_id) != CIRCUIT_ID_SIZE:
            raise ValueError(f"circuit_id must be {CIRCUIT_ID_SIZE} bytes")
        check_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Accept:
    circuit_id: bytes

    def __post_init__(self) -> None:
        if len(self.circuit_id) != CIRCUIT_ID_SIZE:
            raise ValueError(f"circuit_id must be {CIRCUIT_ID_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class Ready:
    pass


RelayMessage: TypeAlias = Reserve | Reserved | Refused | Connect | Incoming | Accept | Ready


def reserve_message(key: bytes, time: int, host: str, port: int) -> bytes:
    """What a ``Reserve`` signature covers: the key, the time and the relay's address
    (encoded as on the wire)."""
    w = Writer()
    push_address(w, host, port)
    return bytes(key) + _RESERVE_TIME.pack(time) + w.getvalue()


def encode_relay(msg: RelayMessage) -> bytes:
    """The payload of a RELAY frame carrying ``msg``."""
    w = Writer()
    match msg:
        case Reserve(key, time, host, port, signature):
            w.push_u8(RelayKind.RESERVE).push_bytes(key).push_u64(time)
            push_address(w, host, port)
            w.push_bytes(signature)
        case Reserved(ttl, host, port):
            w.push_u8(RelayKind.RESERVED).push_u32(ttl)
            push_address(w, host, port)
        case Refused(code, text):
            w.push_u8(RelayKind.REFUSED).push_u8(code).push_str(text, MAX_REFUSE_TEXT)
        case Connect(target_key):
            w.push_u8(RelayKind.CONNECT).push_bytes(target_key)
        case Incoming(circuit_id, host, port):
            w.push_u8(RelayKind.INCOMING).push_bytes(circuit_id)
            push_address(w, host, port)
        case Accept(circuit_id):
            w.push_u8(RelayKind.ACCEPT).push_bytes(circuit_id)
        case Ready():
            w.push_u8(RelayKind.READY)
        case _:
            raise TypeError(f"not a relay message: {msg!r}")
    return w.getvalue()


def relay_frame(msg: RelayMessage) -> bytes:
    """A complete RELAY frame carrying ``msg``."""
    return encode_frame(FrameType.RELAY, encode_relay(msg))


def decode_relay(payload: bytes | bytearray | memoryview) -> RelayMessage:
    """The message in a RELAY frame's payload; ``RemoteProtocolError`` if malformed."""
    with _MALFORMED:
        if len(payload) > MAX_RELAY_PAYLOAD:
            raise DecodeError(f"relay payload of {len(payload)} bytes")
        r = Reader(payload)
        kind = r.pull_u8()
        msg: RelayMessage
        match kind:
            case RelayKind.RESERVE:
                key, when = r.pull_bytes(PUBLIC_KEY_SIZE), r.pull_u64()
                host, port = pull_address(r)
                msg = Reserve(key, when, host, port, r.pull_bytes(SIGNATURE_SIZE))
            case RelayKind.RESERVED:
                ttl = r.pull_u32()
                msg = Reserved(ttl, *pull_address(r))
            case RelayKind.REFUSED:
                msg = Refused(r.pull_u8(), r.pull_str(MAX_REFUSE_TEXT))
            case RelayKind.CONNECT:
                msg = Connect(r.pull_bytes(PUBLIC_KEY_SIZE))
            case RelayKind.INCOMING:
                circuit = r.pull_bytes(CIRCUIT_ID_SIZE)
                msg = Incoming(circuit, *pull_address(r))
            case RelayKind.ACCEPT:
                msg = Accept(r.pull_bytes(CIRCUIT_ID_SIZE))
            case RelayKind.READY:
                msg = Ready()
            case _:
                raise DecodeError(f"unknown relay message kind {kind}")
        r.finish()
        return msg
