"""Issue 17: relays learn a node's relay key, never its identity key.

A private node reserves under a ``RelayKey`` (random per node start), its provider
records name that key next to each relay, and a downloader names it in ``Connect``; the
member's identity is checked only inside the peer handshake. The first test runs real
nodes on 127.x and looks at everything the relay received: every control frame it
decoded, and (as root, as CI runs) every TCP and UDP payload to or from the relay's host
on ``lo``. On the code before this change the ``Reserve`` named the identity key.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from support.capture import TCP, UDP, encodings, first_hits, on_hosts, wire_capture
from support.nodes import NodeCluster

from dhtshare.codec import Reader, Writer
from dhtshare.errors import DecodeError, ProtocolError
from dhtshare.identity import Identity
from dhtshare.node.dialer import Dialer
from dhtshare.reach.aio import relay as relay_module
from dhtshare.reach.aio.relay import RelayKeeper, open_circuit
from dhtshare.reach.autonat import ReachState, Verdict
from dhtshare.records import (
    AddressKind,
    PeerAddress,
    Provider,
    decode_record,
    sign_record,
    verify_record,
)
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire.relay import RelayKey, decode_relay

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
DOWNLOADER_HOST = "127.0.30.1"
GID, CID = bytes(range(32)), bytes(range(32, 64))
NOW = 1_700_000_000.0


async def test_a_reservation_and_a_circuit_carry_no_identity_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []  # every RELAY payload the relay decoded

    def recording(payload: bytes | bytearray | memoryview) -> object:
        parsed.append(bytes(payload))
        return decode_relay(payload)

    monkeypatch.setattr(relay_module, "decode_relay", recording)
    async with NodeCluster.running(tmp_path, own_hosts=True) as cluster:
        public, private = await cluster.node("public"), await cluster.node("private")
        for node in (public, private):
            node.reachability._listeners.clear()  # the loopback test would say "public"
        wire = wire_capture(on_hosts(public.address[0]), (TCP, UDP))
        try:
            public._reach_changed(ReachState(Verdict.PUBLIC))
            changed, announce = asyncio.Event(), private.keeper.on_change
            assert announce is not None

            def on_change() -> None:
                announce()
                changed.set()

            private.keeper.on_change = on_change
            private._reach_changed(ReachState(Verdict.PRIVATE))
            async with asyncio.timeout(WAIT):
                while not private.relays:
                    changed.clear()
                    await changed.wait()
            # what the private node's provider records say: the relay, and the key there
            (address,) = private.relay_addresses()
            assert address.kind is AddressKind.RELAY and address.key is not None
            sock, _ = await open_circuit(
                (address.host, address.port), address.key, local=DOWNLOADER_HOST
            )
            sock.close()
            assert public.relay_server is not None
            assert public.relay_server.stats["circuit"] == 1  # spliced before Ready was sent
            if wire is not None:  # everything sent before it was read
                wire.mark(os.urandom(16), DOWNLOADER_HOST, (public.address[0], 9))
        finally:
            if wire is not None:
                wire.close()
        relay_key = private.keeper.key.public
        needles = encodings("holder identity", private.identity.public)
        needles |= encodings("relay's identity", public.identity.public)

    # the control frames the relay decoded: Reserve, Connect, Accept
    assert relay_key in b"".join(parsed)  # positive control: the Reserve and Connect
    assert first_hits({f"payload {i}": p for i, p in enumerate(parsed)}, needles) == {}
    # every byte to or from the relay's host (as root: every packet on lo)
    if wire is None and os.geteuid() != 0:  # CI runs as root: there it must capture
        pytest.skip("the wire capture needs root (AF_PACKET); the relay's frames were clean")
    assert wire is not None, "no AF_PACKET capture on lo, though root"
    assert wire.drops == 0 and wire.fragments == 0  # the capture missed nothing
    flows = {str(flow): bytes(data) for flow, data in wire.flows.items()}
    assert any(relay_key in data for data in flows.values())  # it saw the Reserve
    assert wire.payload_bytes(UDP) > 0  # and the DHT traffic: pings, lookups, dial-backs
    assert first_hits(flows, needles) == {}


def test_a_keeper_never_reserves_under_an_identity() -> None:
    with pytest.raises(TypeError, match="RelayKey"):
        RelayKeeper(Identity.generate(), list, lambda s, _: None)  # type: ignore[arg-type]


def test_relay_keys_are_fresh() -> None:
    assert RelayKey.generate().public != RelayKey.generate().public


def test_a_relay_address_carries_the_relay_key() -> None:
    owner, key = Identity.generate(), RelayKey.generate().public
    addresses = (
        PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000, key),
        PeerAddress(AddressKind.RELAY, "2001:db8::1", 4001, key),
        PeerAddress(AddressKind.DIRECT, "203.0.113.9", 4000),
    )
    body = Provider(GID, CID, "192.168.1.2", 4000, True, addresses=addresses)
    rec = sign_record(owner, body, seq=1, now=NOW, ttl=3600)
    back = verify_record(decode_record(rec.encode()), NOW)
    assert back == body
    assert isinstance(back, Provider) and [a.key for a in back.addresses] == [key, key, None]


def test_a_relay_address_without_a_key_still_reads() -> None:
    """The layout before issue 17: kind, host, port; it reads, and names no key."""
    old = Writer().push_u8(AddressKind.RELAY).push_str("198.51.100.1", 255).push_u16(4000)
    address = PeerAddress.pull(Reader(old.getvalue()))
    assert address == PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000)
    assert address.key is None


def test_only_a_relay_address_carries_a_key_of_the_right_size() -> None:
    with pytest.raises(ValueError, match="only a relay"):
        PeerAddress(AddressKind.DIRECT, "198.51.100.1", 4000, bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        PeerAddress(AddressKind.RELAY, "198.51.100.1", 4000, bytes(31))
    keyed_direct = Writer().push_u8(0x80).push_str("198.51.100.1", 255).push_u16(4000)
    keyed_direct.push_bytes(bytes(32))
    with pytest.raises(ValueError, match="only a relay"):
        PeerAddress.pull(Reader(keyed_direct.getvalue()))
    short = Writer().push_u8(0x81).push_str("198.51.100.1", 255).push_u16(4000)
    with pytest.raises(DecodeError):
        PeerAddress.pull(Reader(short.push_bytes(bytes(16)).getvalue()))


async def test_the_dialer_names_the_relay_key_and_skips_a_relay_without_one() -> None:
    asked: list[tuple[tuple[str, int], bytes]] = []

    async def refusing(relay: tuple[str, int], key: bytes) -> tuple[socket.socket, bytes]:
        asked.append((relay, key))
        raise ProtocolError("refused")

    me, holder, key = Identity.generate(), Identity.generate(), RelayKey.generate().public
    dialer = Dialer(me, open_circuit=refusing).for_file(GID, CID)
    keyless = PeerAddress(AddressKind.RELAY, "127.0.30.2", 4000)
    keyed = PeerAddress(AddressKind.RELAY, "127.0.30.3", 4000, key)
    addr = ProviderAddr(holder.public, "127.0.30.9", 4000, (keyless, keyed))
    async with asyncio.timeout(WAIT):
        assert await dialer.upgrade(addr) is None
    assert asked == [(("127.0.30.3", 4000), key)]  # never the holder's identity key
