"""Records: every kind round-trips, signatures bind kind and content, the decoder is strict."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhtshare import crypto
from dhtshare.codec import Reader, Writer
from dhtshare.errors import DecodeError, RecordError
from dhtshare.groups.secrets import Invite, epoch_box
from dhtshare.identity import Identity
from dhtshare.records import (
    EPOCH_PAGE_BOXES,
    MAX_RECORD_SIZE,
    MAX_TTL,
    PAGE_MEMBERS,
    AddressKind,
    Decision,
    DirectoryEntry,
    EpochPage,
    FileEntry,
    Genesis,
    Grant,
    Handover,
    InviteInfo,
    JoinRequest,
    Kind,
    Leave,
    Member,
    PeerAddress,
    PeerInfo,
    Provider,
    Roster,
    RosterPage,
    SignedRecord,
    decode_record,
    key_for,
    max_seq,
    sign_record,
    verify_record,
)

NOW = 1_800_000_000.0
OWNER = Identity.generate("owner")
GID = os.urandom(32)
CID = os.urandom(32)


def make_roster(owner: Identity, members: int = 3, handovers: tuple[Handover, ...] = ()) -> Roster:
    genesis = Genesis(owner.public, "climbers", int(NOW), b"\x01" * 16)
    sig = crypto.sign(owner.signing_key, "genesis", genesis.encode())
    people = tuple(Member(os.urandom(32), f"m{i}", int(NOW) + i) for i in range(members))
    return Roster(genesis, sig, handovers, True, people, members)


def bodies() -> list[object]:
    return [
        make_roster(OWNER),
        RosterPage(
            GID, 7, 0, tuple(Member(os.urandom(32), "x" * 64, 1) for _ in range(PAGE_MEMBERS))
        ),
        JoinRequest(GID, "alice", "let me in"),
        Decision(GID, os.urandom(32), False, "no room"),
        Leave(GID),
        Leave(GID, Handover(os.urandom(32), int(NOW), os.urandom(64))),
        FileEntry(GID, CID, "movie.mkv", 10**9, 1 << 19),
        Provider(GID, CID, "127.0.0.1", 4000, True),
        Provider(
            GID,
            CID,
            "192.168.1.2",
            4000,
            False,
            addresses=(
                PeerAddress(AddressKind.DIRECT, "203.0.113.9", 4000),
                PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000),
                PeerAddress(AddressKind.RELAY, "2001:db8::1", 4001),
            ),
        ),
        PeerInfo((("127.0.0.1", 4000), ("::1", 4001))),
        DirectoryEntry(GID, "climbers", 12),
        # issue 17: a request carries its mailbox, a public listing its invite, and the
        # kinds that only travel sealed (a full epoch page: the largest of them)
        JoinRequest(GID, "alice", "let me in", os.urandom(32)),
        DirectoryEntry(GID, "climbers", 12, invite=Invite.new(OWNER.public).token),
        Grant(GID, 3, os.urandom(32), "climbers"),
        EpochPage(
            GID,
            4,
            0,
            25,
            tuple(
                epoch_box(os.urandom(32), OWNER.public, os.urandom(32))
                for _ in range(EPOCH_PAGE_BOXES)
            ),
        ),
        InviteInfo(GID, "climbers"),
        InviteInfo(GID, "climbers", withdrawn=True),
    ]


@pytest.mark.parametrize("body", bodies(), ids=lambda b: type(b).__name__)
def test_every_kind_round_trips_and_verifies(body: object) -> None:
    rec = sign_record(OWNER, body, seq=5, now=NOW, ttl=3600)  # type: ignore[arg-type]
    data = rec.encode()
    assert len(data) <= MAX_RECORD_SIZE
    back = decode_record(data)
    assert back == rec
    assert verify_record(back, NOW) == body
    assert back.dht_key == rec.dht_key and len(back.dht_key) == 20


def test_provider_lists_its_main_address_first_and_each_address_once() -> None:
    relay = PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000)
    main = PeerAddress(AddressKind.DIRECT, "192.168.1.2", 4000)
    body = Provider(GID, CID, "192.168.1.2", 4000, True, addresses=(relay, main, relay))
    assert body.every_address() == (main, relay)


def test_a_provider_record_without_the_address_list_names_only_its_main_address() -> None:
    """The layout before the list (issue 16) still reads: old nodes' records stay usable."""
    old = Provider(GID, CID, "192.168.1.2", 4000, True).encode()[:-1]
    assert Provider.decode(Reader(old)) == Provider(GID, CID, "192.168.1.2", 4000, True)


def test_provider_refuses_bad_addresses() -> None:
    with pytest.raises(ValueError, match="unicast"):
        PeerAddress(AddressKind.RELAY, "0.0.0.0", 4000)
    many = tuple(PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000 + i) for i in range(9))
    with pytest.raises(ValueError, match="too many"):
        Provider(GID, CID, "192.168.1.2", 4000, True, addresses=many)
    plain = Provider(GID, CID, "192.168.1.2", 4000, True).encode()[:-1]  # no address count
    odd = Writer().push_u8(1).push_u8(7).push_str("198.51.100.1", 255).push_u16(4000)
    with pytest.raises(DecodeError, match="address kind"):
        Provider.decode(Reader(plain + odd.getvalue()))


def test_keys_are_derived_from_content() -> None:
    a = sign_record(OWNER, Provider(GID, CID, "127.0.0.1", 1, True), seq=1, now=NOW, ttl=60)
    other = Provider(GID, os.urandom(32), "127.0.0.1", 1, True)
    b = sign_record(OWNER, other, seq=1, now=NOW, ttl=60)
    assert a.dht_key == key_for(Kind.PROVIDER, GID, CID)
    assert a.dht_key != b.dht_key


def test_signature_binds_every_byte() -> None:
    data = bytearray(sign_record(OWNER, Leave(GID), seq=1, now=NOW, ttl=60).encode())
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        with pytest.raises(RecordError):
            verify_record(decode_record(bytes(mutated)), NOW)


def test_signature_is_bound_to_the_kind() -> None:
    """A JoinRequest signature cannot be relabelled as another kind with the same body bytes."""
    rec = sign_record(OWNER, Leave(GID), seq=1, now=NOW, ttl=60)
    forged = SignedRecord(
        Kind.LEAVE,
        rec.signer,
        rec.seq,
        rec.issued,
        rec.expires,
        rec.body,
        crypto.sign(OWNER.signing_key, "record/join_request", rec.signed_part()),
        rec.payload(),
    )
    with pytest.raises(RecordError, match="signature"):
        verify_record(forged, NOW)


def test_expiry_window() -> None:
    rec = sign_record(OWNER, Leave(GID), seq=1, now=NOW, ttl=60)
    with pytest.raises(RecordError, match="expired"):
        verify_record(rec, NOW + 61)
    future = sign_record(OWNER, Leave(GID), seq=1, now=NOW + 3600, ttl=60)
    with pytest.raises(RecordError, match="ahead"):
        verify_record(future, NOW)
    with pytest.raises(ValueError, match="ttl"):
        sign_record(OWNER, Leave(GID), seq=1, now=NOW, ttl=MAX_TTL + 1)


def test_roster_must_be_signed_by_the_owner_at_the_end_of_the_chain() -> None:
    intruder = Identity.generate()
    roster = make_roster(OWNER)
    with pytest.raises(RecordError, match="owner"):
        verify_record(sign_record(intruder, roster, seq=2, now=NOW, ttl=60), NOW)
    heir = Identity.generate()
    msg = Handover.message(roster.group_id, 0, heir.public, int(NOW))
    good = Handover(heir.public, int(NOW), crypto.sign(OWNER.signing_key, "handover", msg))
    handed = make_roster(OWNER, handovers=(good,))
    assert handed.group_id == roster.group_id
    verify_record(sign_record(heir, handed, seq=3, now=NOW, ttl=60), NOW)
    forged = Handover(intruder.public, int(NOW), crypto.sign(intruder.signing_key, "handover", msg))
    with pytest.raises(RecordError, match="chain"):
        verify_record(
            sign_record(intruder, make_roster(OWNER, handovers=(forged,)), seq=3, now=NOW, ttl=60),
            NOW,
        )


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(RecordError, match="exceeds"):
        decode_record(b"\x01" * (MAX_RECORD_SIZE + 1))


def test_trailing_bytes_are_refused() -> None:
    data = sign_record(OWNER, Leave(GID), seq=1, now=NOW, ttl=60).encode()
    with pytest.raises(RecordError):
        decode_record(data + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_record_error(data: bytes) -> None:
    try:
        rec = decode_record(data)
    except RecordError:
        return
    with pytest.raises(RecordError):
        verify_record(rec, NOW)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_records_fail_to_decode_or_verify(data: st.DataObject) -> None:
    body = data.draw(st.sampled_from(bodies()))
    encoded = bytearray(sign_record(OWNER, body, seq=9, now=NOW, ttl=600).encode())  # type: ignore[arg-type]
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    with pytest.raises(RecordError):
        verify_record(
            decode_record(bytes(encoded[:cut]) if cut < len(encoded) else bytes(encoded)), NOW
        )


@settings(max_examples=100, deadline=None)
@given(
    name=st.text(max_size=16),
    message=st.text(max_size=60),
    seq=st.integers(0, 2**64 - 1),
)
def test_join_request_round_trip(name: str, message: str, seq: int) -> None:
    """Every seq encodes; only one no later than the clock allows (``max_seq``) verifies."""
    body = JoinRequest(GID, name, message)
    rec = decode_record(sign_record(OWNER, body, seq=seq, now=NOW, ttl=600).encode())
    if seq <= max_seq(NOW):
        assert verify_record(rec, NOW) == body
    else:
        with pytest.raises(RecordError, match="seq dated too far ahead"):
            verify_record(rec, NOW)
