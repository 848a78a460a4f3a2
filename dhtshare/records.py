"""Signed records: the one envelope every DHT value travels in, and the body of each kind.

Envelope (all integers big-endian; docs/records.md has the tables)::

    version u8 | kind u8 | signer 32 | seq u64 | issued u64 | expires u64 | body u16+bytes | sig 64

The signature covers every byte before it, under the purpose ``record/<kind>``. A record's
DHT key is derived from ids inside its body (``dht_key``), so a storing node can tell a record
filed under the wrong key. A record's ``slot`` names what a newer record replaces: under one
key, a record with a higher ``seq`` in the same slot supersedes the older one.

A roster proves its own authority: it carries the founding record (whose hash is the group
id, signed by the founding owner) and the chain of ownership hand-overs, each signed by the
previous owner; only the owner at the end of the chain may sign the roster. So a storing node
can refuse a roster from anyone else without knowing anything but the record.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeAlias

from dhtshare import crypto
from dhtshare.codec import Reader, Writer
from dhtshare.content import check_layout
from dhtshare.errors import DecodeError, Malformed, RecordError

if TYPE_CHECKING:
    from dhtshare.identity import Identity

__all__ = [
    "CLOCK_SKEW",
    "INNER_KINDS",
    "MAX_RECORD_SIZE",
    "MAX_TTL",
    "AddressKind",
    "Body",
    "Decision",
    "DirectoryEntry",
    "EpochBox",
    "EpochPage",
    "FileEntry",
    "Genesis",
    "Grant",
    "Handover",
    "InviteInfo",
    "JoinRequest",
    "Kind",
    "Leave",
    "Member",
    "PeerAddress",
    "PeerInfo",
    "Provider",
    "Rank",
    "Roster",
    "RosterPage",
    "Sealed",
    "SignedRecord",
    "decode_record",
    "epoch_key_ids",
    "every_address",
    "key_for",
    "max_seq",
    "page_key_ids",
    "sign_record",
    "time_seq",
    "verify_record",
]

VERSION = 1
MAX_RECORD_SIZE = 7680  # one record must fit one DHT store request (rpcudp refuses > 8 KiB)
MAX_TTL = 7 * 24 * 3600  # a record may not claim to live longer than a week
CLOCK_SKEW = 600  # seconds of clock difference tolerated between signer and reader
MAX_NAME = 64  # bytes of UTF-8 in a group or member display name
MAX_TEXT = 280  # bytes in a join message or rejection reason
MAX_INVITE = 80  # bytes of an invite token in a directory entry
MAX_HANDOVERS = 16
INLINE_MEMBERS = 38  # members carried in the roster record itself
PAGE_MEMBERS = 65  # members per roster page (names up to 64 bytes; fits a sealed record)
MAX_PAGES = 40  # so a group holds up to 38 + 40 * 65 = 2,638 members
MAX_ADDRESSES = 8
SECRET_SIZE = 32  # epoch, invite and mailbox secrets
AUTHOR_PURPOSE = "space/author"  # a space key certifies an author key (``Sealed.cert``)
LOCATOR_SIZE = 20  # a sealed record's locator (the salt of its DHT key)
TAG_SIZE = 16  # a sealed record's opaque slot
BOX_SIZE = 80  # crypto_box_seal of a 32-byte secret to one member's X25519 key
HINT_SIZE = 8  # which box of an epoch page is whose (keyed by the old epoch secret)
EPOCH_PAGE_BOXES = 80  # boxes per epoch page: 2,000 members take 25 pages
MAX_EPOCH_PAGES = 34  # enough for the largest roster (2,638 members): a page 0 that claims
# more would cost every member a lookup per claimed page
_ID = crypto.HASH_SIZE  # group ids, content ids, page digests
_KEY = crypto.PUBLIC_KEY_SIZE  # signers, owners, members
_SIG = crypto.SIGNATURE_SIZE
_HEADER = 1 + 1 + _KEY + 8 + 8 + 8 + 2
MAX_BODY = MAX_RECORD_SIZE - _HEADER - _SIG
_MALFORMED = Malformed("record", RecordError)


class Kind(IntEnum):
    ROSTER = 1
    ROSTER_PAGE = 2
    JOIN_REQUEST = 3
    DECISION = 4
    LEAVE = 5
    FILE_ENTRY = 6
    PROVIDER = 7
    PEER = 8
    DIRECTORY = 9
    SEALED = 10  # the only kind a private group puts in the DHT: opaque to storing nodes
    GRANT = 11  # inside a sealed record: an epoch secret for one new member
    EPOCH = 12  # inside a sealed record: one page of the next epoch's secret, per member
    INVITE = 13  # inside a sealed record: what an invite holder may know of the group

    @property
    def label(self) -> str:
        return self.name.lower()


def max_seq(now: float) -> int:
    """The highest ``seq`` a record may carry at ``now``: ``time_seq`` of the latest clock
    a signer may have (``now + CLOCK_SKEW``). Rosters count 1, 2, 3, ... far below it;
    other kinds take ``time_seq``. So a record cannot claim a ``seq`` no later record of
    its slot could beat (2**64 - 1 would hold the slot until it expires, for good if
    renewed)."""
    return time_seq(now + CLOCK_SKEW)


def key_for(kind: Kind, *ids: bytes) -> bytes:
    """The 20-byte DHT key under which records of ``kind`` about ``ids`` live."""
    return crypto.dht_key(kind.label, *ids)


def time_seq(now: float) -> int:
    """A sequence number from the clock (milliseconds): newer publications win."""
    return int(now * 1000)


def epoch_key_ids(group_id: bytes, epoch: int, index: int) -> tuple[bytes, bytes, bytes]:
    """The ids of the inner key of page ``index`` announcing ``epoch`` (each epoch's
    announcement has its own keys, so announcing the next one does not replace it)."""
    return group_id, epoch.to_bytes(4, "big"), bytes([index])


def page_key_ids(group_id: bytes, signer: bytes, index: int) -> tuple[bytes, bytes, bytes]:
    """The ids of a roster page's DHT key: group, signer and index.

    The signer is part of the key so that a page signed by any key but the owner's lands
    under another key: storing nodes refuse a record filed under a key not its own, so
    nobody can crowd the owner's pages out of their key (readers look under the key of the
    owner named by the roster they verified).
    """
    return group_id, signer, bytes([index])


# ---------------------------------------------------------------------------------- bodies


def _check_id(value: bytes, what: str, size: int = _ID) -> None:
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes")


def _check_text(value: str, limit: int, what: str) -> None:
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{what} longer than {limit} bytes")


@dataclass(frozen=True, slots=True)
class Genesis:
    """The founding record of a group; its hash is the group id."""

    owner: bytes
    name: str
    created: int
    nonce: bytes

    def __post_init__(self) -> None:
        _check_id(self.owner, "owner", _KEY)
        _check_text(self.name, MAX_NAME, "group name")
        if len(self.nonce) != 16:
            raise ValueError("nonce must be 16 bytes")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.owner).push_str(self.name, MAX_NAME)
        return w.push_u64(self.created).push_bytes(self.nonce).getvalue()

    @classmethod
    def pull(cls, r: Reader) -> Genesis:
        return cls(r.pull_bytes(_KEY), r.pull_str(MAX_NAME), r.pull_u64(), r.pull_bytes(16))

    @property
    def group_id(self) -> bytes:
        return crypto.digest("group", self.encode())


@dataclass(frozen=True, slots=True)
class Handover:
    """Ownership passed to ``new_owner`` at ``at``, signed by the previous owner."""

    new_owner: bytes
    at: int
    signature: bytes

    @staticmethod
    def message(group_id: bytes, index: int, new_owner: bytes, at: int) -> bytes:
        return (
            Writer()
            .push_bytes(group_id)
            .push_u32(index)
            .push_bytes(new_owner)
            .push_u64(at)
            .getvalue()
        )

    def encode_into(self, w: Writer) -> None:
        w.push_bytes(self.new_owner).push_u64(self.at).push_bytes(self.signature)

    @classmethod
    def pull(cls, r: Reader) -> Handover:
        return cls(r.pull_bytes(_KEY), r.pull_u64(), r.pull_bytes(_SIG))


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a group since ``since`` (unix seconds)."""

    key: bytes
    name: str
    since: int

    def __post_init__(self) -> None:
        _check_id(self.key, "member key", _KEY)
        _check_text(self.name, MAX_NAME, "member name")

    def encode_into(self, w: Writer) -> None:
        w.push_bytes(self.key).push_str(self.name, MAX_NAME).push_u64(self.since)

    @classmethod
    def pull(cls, r: Reader) -> Member:
        return cls(r.pull_bytes(_KEY), r.pull_str(MAX_NAME), r.pull_u64())


def _push_members(w: Writer, members: tuple[Member, ...]) -> None:
    w.push_u16(len(members))
    for m in members:
        m.encode_into(w)


def _pull_members(r: Reader, limit: int) -> tuple[Member, ...]:
    n = r.pull_u16()
    if n > limit:
        raise DecodeError(f"{n} members exceeds {limit}")
    return tuple(Member.pull(r) for _ in range(n))


@dataclass(frozen=True, slots=True)
class Roster:
    """A group's member list, version ``seq`` of the envelope; signed by the current owner.

    ``members`` are the first members inline; ``page_digests`` name further pages
    (``RosterPage``) that hold the rest, each bound to this roster's ``seq``.
    """

    genesis: Genesis
    genesis_sig: bytes
    handovers: tuple[Handover, ...]
    public: bool
    members: tuple[Member, ...]
    total_members: int
    page_digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if len(self.handovers) > MAX_HANDOVERS:
            raise ValueError(f"more than {MAX_HANDOVERS} hand-overs")
        if len(self.members) > INLINE_MEMBERS or len(self.page_digests) > MAX_PAGES:
            raise ValueError("too many inline members or pages")
        if any(len(d) != _ID for d in self.page_digests):
            raise ValueError(f"page digests must be {_ID} bytes")

    @property
    def group_id(self) -> bytes:
        return self.genesis.group_id

    @property
    def owner(self) -> bytes:
        """The owner at the end of the hand-over chain."""
        return self.handovers[-1].new_owner if self.handovers else self.genesis.owner

    def chain_is_valid(self) -> bool:
        """The founding signature and every hand-over check out, back to the founder."""
        gid = self.group_id
        if not crypto.verify(
            self.genesis.owner, "genesis", self.genesis.encode(), self.genesis_sig
        ):
            return False
        owner = self.genesis.owner
        for i, h in enumerate(self.handovers):
            if not crypto.verify(
                owner, "handover", Handover.message(gid, i, h.new_owner, h.at), h.signature
            ):
                return False
            owner = h.new_owner
        return True

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.genesis.encode()).push_bytes(self.genesis_sig)
        w.push_u8(len(self.handovers))
        for h in self.handovers:
            h.encode_into(w)
        w.push_u8(1 if self.public else 0)
        _push_members(w, self.members)
        w.push_u32(self.total_members).push_u8(len(self.page_digests))
        for d in self.page_digests:
            w.push_bytes(d)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Roster:
        genesis, sig = Genesis.pull(r), r.pull_bytes(_SIG)
        n = r.pull_u8()
        if n > MAX_HANDOVERS:
            raise DecodeError("too many hand-overs")
        handovers = tuple(Handover.pull(r) for _ in range(n))
        public = _pull_bool(r)
        members = _pull_members(r, INLINE_MEMBERS)
        total = r.pull_u32()
        pages = r.pull_u8()
        if pages > MAX_PAGES:
            raise DecodeError("too many pages")
        digests = tuple(r.pull_bytes(_ID) for _ in range(pages))
        return cls(genesis, sig, handovers, public, members, total, digests)


@dataclass(frozen=True, slots=True)
class RosterPage:
    """Members ``index``-th page of roster version ``roster_seq``; the roster holds its digest."""

    group_id: bytes
    roster_seq: int
    index: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        if len(self.members) > PAGE_MEMBERS or self.index >= MAX_PAGES:
            raise ValueError("page too large or index out of range")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_u64(self.roster_seq).push_u8(self.index)
        _push_members(w, self.members)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> RosterPage:
        return cls(r.pull_bytes(_ID), r.pull_u64(), r.pull_u8(), _pull_members(r, PAGE_MEMBERS))

    @property
    def digest(self) -> bytes:
        return crypto.digest("roster-page", self.encode())


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """The signer asks to join ``group_id`` under a display name."""

    group_id: bytes
    name: str
    message: str = ""
    #: the requester's mailbox secret: the owner answers (a grant or a rejection) there
    reply: bytes = bytes(SECRET_SIZE)

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_text(self.name, MAX_NAME, "name")
        _check_text(self.message, MAX_TEXT, "message")
        _check_id(self.reply, "reply secret", SECRET_SIZE)

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_str(self.name, MAX_NAME)
        return w.push_str(self.message, MAX_TEXT).push_bytes(self.reply).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> JoinRequest:
        return cls(
            r.pull_bytes(_ID), r.pull_str(MAX_NAME), r.pull_str(MAX_TEXT), r.pull_bytes(SECRET_SIZE)
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The owner's answer to ``requester``'s join request (a rejection is visible to it)."""

    group_id: bytes
    requester: bytes
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_id(self.requester, "requester", _KEY)
        _check_text(self.reason, MAX_TEXT, "reason")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_bytes(self.requester)
        return w.push_u8(int(self.accepted)).push_str(self.reason, MAX_TEXT).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Decision:
        return cls(r.pull_bytes(_ID), r.pull_bytes(_KEY), _pull_bool(r), r.pull_str(MAX_TEXT))


@dataclass(frozen=True, slots=True)
class Leave:
    """The signer leaves ``group_id`` (effective from the envelope's ``issued`` time).

    An owner who leaves includes the signed ``handover`` to its heir; the heir's node then
    publishes the next roster with that hand-over appended to the chain.
    """

    group_id: bytes
    handover: Handover | None = None

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id)
        if self.handover is None:
            return w.push_u8(0).getvalue()
        w.push_u8(1)
        self.handover.encode_into(w)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Leave:
        gid = r.pull_bytes(_ID)
        return cls(gid, Handover.pull(r) if _pull_bool(r) else None)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file the signer shares in ``group_id``; ``content_id`` is its hash-tree root."""

    group_id: bytes
    content_id: bytes
    name: str
    size: int
    piece_size: int
    withdrawn: bool = False

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_id(self.content_id, "content id")
        _check_text(self.name, 255, "file name")
        check_layout(self.size, self.piece_size)  # before anyone sizes anything by them

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_bytes(self.content_id)
        w.push_str(self.name, 255).push_u64(self.size).push_u32(self.piece_size)
        return w.push_u8(int(self.withdrawn)).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> FileEntry:
        return cls(
            r.pull_bytes(_ID),
            r.pull_bytes(_ID),
            r.pull_str(255),
            r.pull_u64(),
            r.pull_u32(),
            _pull_bool(r),
        )


@dataclass(frozen=True, slots=True)
class Sealed:
    """An encrypted record of a private group, as storing nodes see it.

    ``space`` is a write key derived from a group secret (an epoch's, an invite's or a
    mailbox's) and the DHT key is ``key_for(SEALED, space, locator)``. The envelope's signer
    is the writer's **author** key (one per writer and space, derived from both secrets), and
    ``cert`` is the space key's signature of it: only holders of the secret can certify an
    author, so only they can write under the key (a hash of the space key and the
    locator), and a slot is the author's (``signer ‖ tag``), so no writer can replace
    another's record. ``box`` is the AEAD ciphertext (nonce first) of a padded inner record.
    """

    space: bytes
    cert: bytes
    locator: bytes
    tag: bytes
    box: bytes

    def __post_init__(self) -> None:
        _check_id(self.space, "space key", _KEY)
        _check_id(self.cert, "certificate", _SIG)
        _check_id(self.locator, "locator", LOCATOR_SIZE)
        _check_id(self.tag, "tag", TAG_SIZE)

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.space).push_bytes(self.cert)
        w.push_bytes(self.locator).push_bytes(self.tag)
        return w.push_varbytes(self.box, MAX_BODY).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Sealed:
        return cls(
            r.pull_bytes(_KEY),
            r.pull_bytes(_SIG),
            r.pull_bytes(LOCATOR_SIZE),
            r.pull_bytes(TAG_SIZE),
            r.pull_varbytes(MAX_BODY),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """The owner gives one accepted requester the group's current epoch secret (sealed in
    the requester's mailbox, which only the two of them can find)."""

    group_id: bytes
    epoch: int
    secret: bytes
    name: str

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_id(self.secret, "epoch secret", SECRET_SIZE)
        _check_text(self.name, MAX_NAME, "name")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_u32(self.epoch).push_bytes(self.secret)
        return w.push_str(self.name, MAX_NAME).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Grant:
        return cls(r.pull_bytes(_ID), r.pull_u32(), r.pull_bytes(SECRET_SIZE), r.pull_str(MAX_NAME))


@dataclass(frozen=True, slots=True)
class EpochBox:
    """One member's copy of the next epoch secret: ``hint`` says whose, ``box`` is the
    secret sealed to that member's X25519 key."""

    hint: bytes
    box: bytes

    def __post_init__(self) -> None:
        _check_id(self.hint, "hint", HINT_SIZE)
        _check_id(self.box, "box", BOX_SIZE)


@dataclass(frozen=True, slots=True)
class EpochPage:
    """Page ``index`` of ``count`` announcing epoch ``epoch`` of ``group_id`` (sealed under
    the previous epoch, signed by the owner): the new secret for each remaining member."""

    group_id: bytes
    epoch: int
    index: int
    count: int
    boxes: tuple[EpochBox, ...]

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        if not 0 <= self.index < self.count <= MAX_EPOCH_PAGES:
            raise RecordError("epoch page index out of range")
        if len(self.boxes) > EPOCH_PAGE_BOXES:
            raise RecordError(f"more than {EPOCH_PAGE_BOXES} boxes in an epoch page")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_u32(self.epoch)
        w.push_u8(self.index).push_u8(self.count).push_u16(len(self.boxes))
        for b in self.boxes:
            w.push_bytes(b.hint).push_bytes(b.box)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> EpochPage:
        gid, epoch, index, count, n = (
            r.pull_bytes(_ID),
            r.pull_u32(),
            r.pull_u8(),
            r.pull_u8(),
            r.pull_u16(),
        )
        if n > EPOCH_PAGE_BOXES:
            raise DecodeError("too many boxes")
        boxes = tuple(EpochBox(r.pull_bytes(HINT_SIZE), r.pull_bytes(BOX_SIZE)) for _ in range(n))
        return cls(gid, epoch, index, count, boxes)


@dataclass(frozen=True, slots=True)
class InviteInfo:
    """What an invite holder reads in the group's inbox: which group it asks to join."""

    group_id: bytes
    name: str
    withdrawn: bool = False  # the owner replaced this invite (``group invite --rotate``)
    #: the invite's space key: a record the owner signed for another invite (another
    #: group's, say a public one) re-sealed into this inbox is not believed
    space: bytes = bytes(_KEY)

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_text(self.name, MAX_NAME, "name")
        _check_id(self.space, "space key", _KEY)

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_str(self.name, MAX_NAME)
        return w.push_u8(int(self.withdrawn)).push_bytes(self.space).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> InviteInfo:
        return cls(r.pull_bytes(_ID), r.pull_str(MAX_NAME), _pull_bool(r), r.pull_bytes(_KEY))


def check_peer_address(host: str, port: int) -> None:
    """``ValueError`` unless ``host`` is an IP address one can connect to and ``port`` is
    1..65535. A provider's address is checked here, once, when its record is built or
    decoded; so every ``Provider`` a reader holds has a host ``open_peer`` accepts."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host {host[:64]!r} is not an IP address") from None
    if addr.is_unspecified or addr.is_multicast or addr == _BROADCAST:
        raise ValueError(f"host {host} is not a unicast address")
    if not 0 < port < 65536:
        raise ValueError("port out of range")


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class AddressKind(IntEnum):
    """How to use an address in a provider record (docs/connectivity.md)."""

    DIRECT = 0  # connect to it: a public address, or a LAN address for peers on that LAN
    RELAY = 1  # a relay holding a reservation for the signer: open a circuit there


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """One way to reach a record's signer. A ``RELAY`` address carries ``key``: the
    signer's relay key (``wire.relay.RelayKey``: random per node start, never its identity
    key), which a downloader names in the relay's ``Connect``. A relay address without one
    (the layout before issue 17) still reads, but leads nowhere."""

    kind: AddressKind
    host: str
    port: int
    key: bytes | None = None

    def __post_init__(self) -> None:
        check_peer_address(self.host, self.port)
        if self.key is not None:
            if self.kind is not AddressKind.RELAY:
                raise ValueError("only a relay address carries a key")
            _check_id(self.key, "relay key", _KEY)

    def encode_into(self, w: Writer) -> None:
        keyed = 0 if self.key is None else _KEYED
        w.push_u8(self.kind | keyed).push_str(self.host, 255).push_u16(self.port)
        if self.key is not None:
            w.push_bytes(self.key)

    @classmethod
    def pull(cls, r: Reader) -> PeerAddress:
        byte = r.pull_u8()
        try:
            kind = AddressKind(byte & ~_KEYED)
        except ValueError:
            raise DecodeError("unknown address kind") from None
        host, port = r.pull_str(255), r.pull_u16()
        return cls(kind, host, port, r.pull_bytes(_KEY) if byte & _KEYED else None)


_KEYED = 0x80
"""In an address's kind byte: a relay key (32 bytes) follows the port."""


@dataclass(frozen=True, slots=True)
class Provider:
    """The signer holds (some of) ``content_id`` for ``group_id`` and serves it at host:port.

    ``host:port`` is the signer's main direct address; ``addresses`` lists the other ways
    to reach it (more direct addresses, and relays that hold a reservation for it), at
    most ``MAX_ADDRESSES``.
    """

    group_id: bytes
    content_id: bytes
    host: str
    port: int
    complete: bool
    withdrawn: bool = False
    addresses: tuple[PeerAddress, ...] = ()

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_id(self.content_id, "content id")
        check_peer_address(self.host, self.port)
        if len(self.addresses) > MAX_ADDRESSES:
            raise ValueError("too many addresses")

    def every_address(self) -> tuple[PeerAddress, ...]:
        """The main address first, then the others, each once."""
        return every_address(self.host, self.port, self.addresses)

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_bytes(self.content_id)
        w.push_str(self.host, 255).push_u16(self.port)
        w.push_u8(int(self.complete)).push_u8(int(self.withdrawn))
        w.push_u8(len(self.addresses))
        for address in self.addresses:
            address.encode_into(w)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> Provider:
        gid, cid, host, port = r.pull_bytes(_ID), r.pull_bytes(_ID), r.pull_str(255), r.pull_u16()
        complete, withdrawn = _pull_bool(r), _pull_bool(r)
        n = r.pull_u8() if r.remaining else 0  # a record from before the list names none
        if n > MAX_ADDRESSES:
            raise DecodeError("too many addresses")
        addresses = tuple(PeerAddress.pull(r) for _ in range(n))
        return cls(gid, cid, host, port, complete, withdrawn, addresses)


def every_address(
    host: str, port: int, addresses: tuple[PeerAddress, ...]
) -> tuple[PeerAddress, ...]:
    """``host:port`` as a direct address, then ``addresses``, without repeats."""
    seen: dict[PeerAddress, None] = {PeerAddress(AddressKind.DIRECT, host, port): None}
    for address in addresses:
        seen.setdefault(address, None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """Where the signer can be reached now."""

    addresses: tuple[tuple[str, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.addresses) > MAX_ADDRESSES:
            raise ValueError("too many addresses")
        for host, port in self.addresses:
            _check_text(host, 255, "host")
            if not 0 < port < 65536:
                raise ValueError("port out of range")

    def encode(self) -> bytes:
        w = Writer().push_u8(len(self.addresses))
        for host, port in self.addresses:
            w.push_str(host, 255).push_u16(port)
        return w.getvalue()

    @classmethod
    def decode(cls, r: Reader) -> PeerInfo:
        n = r.pull_u8()
        if n > MAX_ADDRESSES:
            raise DecodeError("too many addresses")
        return cls(tuple((r.pull_str(255), r.pull_u16()) for _ in range(n)))


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """A group listed in the public directory by its owner, with its invite (the owner's
    choice: anyone may then ask to join; readers check the owner signed it)."""

    group_id: bytes
    name: str
    member_count: int
    withdrawn: bool = False
    invite: str = ""

    def __post_init__(self) -> None:
        _check_id(self.group_id, "group id")
        _check_text(self.name, MAX_NAME, "group name")
        _check_text(self.invite, MAX_INVITE, "invite")

    def encode(self) -> bytes:
        w = Writer().push_bytes(self.group_id).push_str(self.name, MAX_NAME)
        w.push_u32(self.member_count).push_u8(int(self.withdrawn))
        return w.push_str(self.invite, MAX_INVITE).getvalue()

    @classmethod
    def decode(cls, r: Reader) -> DirectoryEntry:
        gid, name, count, withdrawn = (
            r.pull_bytes(_ID),
            r.pull_str(MAX_NAME),
            r.pull_u32(),
            _pull_bool(r),
        )
        return cls(gid, name, count, withdrawn, r.pull_str(MAX_INVITE) if r.remaining else "")


Body: TypeAlias = (
    Roster
    | RosterPage
    | JoinRequest
    | Decision
    | Leave
    | FileEntry
    | Provider
    | PeerInfo
    | DirectoryEntry
    | Sealed
    | Grant
    | EpochPage
    | InviteInfo
)


def _pull_bool(r: Reader) -> bool:
    value = r.pull_u8()
    if value > 1:
        raise DecodeError("boolean must be 0 or 1")
    return value == 1


@dataclass(frozen=True, slots=True)
class _KindSpec:
    kind: Kind
    decode: Callable[[Reader], Any]
    key_ids: Callable[[Any, bytes], tuple[bytes, ...]]  # (body, signer) -> ids for key_for
    slot: Callable[[Any, bytes], bytes]  # (body, signer) -> merge slot


def _by_signer(_body: Any, signer: bytes) -> bytes:
    return signer


_SPECS: dict[type, _KindSpec] = {
    Roster: _KindSpec(Kind.ROSTER, Roster.decode, lambda b, s: (b.group_id,), lambda b, s: b""),
    RosterPage: _KindSpec(
        Kind.ROSTER_PAGE,
        RosterPage.decode,
        lambda b, s: page_key_ids(b.group_id, s, b.index),
        _by_signer,
    ),
    JoinRequest: _KindSpec(
        Kind.JOIN_REQUEST, JoinRequest.decode, lambda b, s: (b.group_id,), _by_signer
    ),
    Decision: _KindSpec(
        Kind.DECISION, Decision.decode, lambda b, s: (b.group_id, b.requester), _by_signer
    ),
    Leave: _KindSpec(Kind.LEAVE, Leave.decode, lambda b, s: (b.group_id,), _by_signer),
    FileEntry: _KindSpec(
        Kind.FILE_ENTRY, FileEntry.decode, lambda b, s: (b.group_id,), lambda b, s: s + b.content_id
    ),
    Provider: _KindSpec(
        Kind.PROVIDER, Provider.decode, lambda b, s: (b.group_id, b.content_id), _by_signer
    ),
    PeerInfo: _KindSpec(Kind.PEER, PeerInfo.decode, lambda b, s: (s,), _by_signer),
    DirectoryEntry: _KindSpec(
        Kind.DIRECTORY, DirectoryEntry.decode, lambda b, s: (), lambda b, s: s + b.group_id
    ),
    Sealed: _KindSpec(
        Kind.SEALED, Sealed.decode, lambda b, s: (b.space, b.locator), lambda b, s: s + b.tag
    ),
    # inner kinds: these never reach a storing node in the clear (``groups/sealing.py``)
    Grant: _KindSpec(Kind.GRANT, Grant.decode, lambda b, s: (b.group_id,), _by_signer),
    EpochPage: _KindSpec(
        Kind.EPOCH,
        EpochPage.decode,
        lambda b, s: epoch_key_ids(b.group_id, b.epoch, b.index),
        _by_signer,
    ),
    InviteInfo: _KindSpec(Kind.INVITE, InviteInfo.decode, lambda b, s: (), _by_signer),
}
_SPEC_BY_KIND = {spec.kind: spec for spec in _SPECS.values()}
INNER_KINDS = frozenset({Kind.GRANT, Kind.EPOCH, Kind.INVITE})
"""Kinds that exist only inside a sealed record: a storing node refuses them in the clear."""


def kind_of(body: Body) -> Kind:
    return _SPECS[type(body)].kind


# -------------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """One signed DHT value. Construct with ``sign_record`` or ``decode_record``."""

    kind: Kind
    signer: bytes
    seq: int
    issued: int
    expires: int
    body: bytes
    signature: bytes
    _payload: Body = field(compare=False, repr=False)

    def signed_part(self) -> bytes:
        w = Writer().push_u8(VERSION).push_u8(self.kind).push_bytes(self.signer)
        w.push_u64(self.seq).push_u64(self.issued).push_u64(self.expires)
        return w.push_varbytes(self.body, MAX_BODY).getvalue()

    def encode(self) -> bytes:
        return self.signed_part() + self.signature

    def payload(self) -> Body:
        """The typed body."""
        return self._payload

    @property
    def dht_key(self) -> bytes:
        spec = _SPEC_BY_KIND[self.kind]
        return key_for(self.kind, *spec.key_ids(self._payload, self.signer))

    @property
    def slot(self) -> bytes:
        return _SPEC_BY_KIND[self.kind].slot(self._payload, self.signer)

    @property
    def rank(self) -> Rank:
        """Which record in a slot wins: ``a.rank > b.rank`` when ``a`` replaces ``b``.

        A partial order (see ``Rank``): for a roster, only a record whose hand-over chain
        extends the other's can replace it, so a fork of the chain never outranks it.
        """
        chain = self._payload.handovers if isinstance(self._payload, Roster) else ()
        return Rank(chain, self.seq)

    def supersedes(self, other: SignedRecord) -> bool:
        """True when this record replaces ``other`` in the same slot (``rank`` order)."""
        return self.rank > other.rank


@dataclass(frozen=True, slots=True)
class Rank:
    """What orders the records of one slot, from nothing the signer can forge.

    ``a > b`` when ``a``'s hand-over chain extends ``b``'s (``b``'s is a prefix of it) and
    ``a`` is further along: a longer chain, or the same chain and a higher ``seq``. Two
    rosters whose chains fork are not comparable either way: a storing node keeps the one
    it holds (the first chain it saw wins unless another extends it), so a former owner
    who signs a second chain from an earlier link, however long and whatever its ``seq``,
    cannot displace the current chain. Kinds without a chain compare by ``seq`` alone, and
    ``verify_record`` bounds ``seq`` by the clock, so no slot can be wedged at 2**64 - 1.
    """

    chain: tuple[Handover, ...]
    seq: int

    def extends(self, other: Rank) -> bool:
        """This chain starts with ``other``'s chain."""
        n = len(other.chain)
        return len(self.chain) >= n and self.chain[:n] == other.chain

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Rank):
            return NotImplemented
        if not self.extends(other):
            return False
        return len(self.chain) > len(other.chain) or self.seq > other.seq

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Rank):
            return NotImplemented
        return other > self


def sign_record(
    identity: Identity, body: Body, *, seq: int, now: float, ttl: float
) -> SignedRecord:
    """Sign ``body`` as ``identity``, valid from ``now`` for ``ttl`` seconds."""
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL}]")
    kind = kind_of(body)
    encoded = body.encode()
    if len(encoded) > MAX_BODY:
        raise RecordError(f"{kind.label} record too large ({len(encoded)} bytes)")
    unsigned = SignedRecord(
        kind, identity.public, seq, int(now), int(now + ttl), encoded, b"", body
    )
    signature = crypto.sign(identity.signing_key, "record/" + kind.label, unsigned.signed_part())
    return SignedRecord(
        kind, identity.public, seq, int(now), int(now + ttl), encoded, signature, body
    )


def decode_record(data: bytes) -> SignedRecord:
    """Parse an encoded record strictly (signature not yet checked); ``RecordError`` if bad."""
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_SIZE}")
    with _MALFORMED:
        r = Reader(data)
        if r.pull_u8() != VERSION:
            raise RecordError("unknown record version")
        kind = Kind(r.pull_u8())
        signer, seq, issued, expires = r.pull_bytes(_KEY), r.pull_u64(), r.pull_u64(), r.pull_u64()
        body = r.pull_varbytes(MAX_BODY)
        signature = r.pull_bytes(_SIG)
        r.finish()
        body_reader = Reader(body)
        payload = _SPEC_BY_KIND[kind].decode(body_reader)
        body_reader.finish()
    return SignedRecord(kind, signer, seq, issued, expires, body, signature, payload)


def verify_record(rec: SignedRecord, now: float) -> Body:
    """Check signature, validity window and self-proof; return the typed body."""
    if not crypto.verify(rec.signer, "record/" + rec.kind.label, rec.signed_part(), rec.signature):
        raise RecordError("bad signature")
    if rec.expires <= now:
        raise RecordError("record expired")
    if rec.issued > now + CLOCK_SKEW or rec.expires > now + MAX_TTL + CLOCK_SKEW:
        raise RecordError("record dated too far ahead")
    if rec.expires < rec.issued:
        raise RecordError("record expires before it is issued")
    if rec.seq > max_seq(now):
        raise RecordError("record seq dated too far ahead")
    body = rec.payload()
    if isinstance(body, Sealed) and not crypto.verify(
        body.space, AUTHOR_PURPOSE, rec.signer, body.cert
    ):
        raise RecordError("sealed record's author is not certified by its space key")
    if isinstance(body, Roster):
        if not body.chain_is_valid():
            raise RecordError("roster hand-over chain does not verify")
        if rec.signer != body.owner:
            raise RecordError("roster not signed by the group's owner")
    return body
