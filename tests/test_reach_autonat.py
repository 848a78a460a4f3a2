"""The reachability test's pure rules (reach/autonat.py) and the dial-back limit
(dht/antiamp.py), with literal times."""

from __future__ import annotations

import pytest

from dhtshare.dht.antiamp import AntiAmplification, DialBackLimit
from dhtshare.errors import RemoteProtocolError
from dhtshare.reach.autonat import (
    Reachability,
    ReachRound,
    Verdict,
    dialback_wait,
    format_address,
    network_of,
)
from dhtshare.wire.dialback import decode_dialback, dialback_frame
from dhtshare.wire.frames import FrameType

# three peers in three networks (/24s): agreement needs two of them
A, B, C = ("10.0.1.1", 4000), ("10.0.2.2", 4000), ("10.0.3.3", 4000)
ME = ("203.0.113.9", 4001)
N1, N2, N3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


def asked(*peers: tuple[tuple[str, int], bytes]) -> ReachRound:
    r = ReachRound(100.0)
    for peer, nonce in peers:
        r.ask(peer, nonce)
    return r


def test_public_once_a_peer_confirms_on_udp_and_tcp() -> None:
    r = asked((A, N1), (B, N2))
    r.answered(A, ME, True, 0.01, 100.01)
    assert r.verdict(100.01) is None  # B has not answered yet
    r.answered(B, ME, True, 0.01, 100.02)
    assert r.arrived(N1, False, ("10.0.0.1", 50000))
    assert r.verdict(100.02) is None  # UDP alone is not a confirmation
    assert r.arrived(N1, True, ("10.0.0.1", 50001))
    assert r.verdict(100.03) is Verdict.PUBLIC  # no need to wait for the deadline
    assert r.confirmed() == [A]


def test_private_after_the_deadline_when_two_dialing_peers_never_confirm() -> None:
    r = asked((A, N1), (B, N2))
    r.answered(A, ME, True, 0.1, 100.1)
    r.answered(B, ME, True, 0.2, 100.2)
    assert r.deadline == pytest.approx(100.2 + 1.0)  # 4 * 0.2 s is under the floor
    r.arrived(N1, False, ("10.0.0.1", 50000))  # one channel is not enough
    assert r.verdict(101.1) is None
    assert r.verdict(101.2) is Verdict.PRIVATE


def test_unknown_with_fewer_than_two_dialing_peers() -> None:
    r = asked((A, N1), (B, N2), (C, N3))
    r.answered(A, ME, True, 0.1, 100.1)
    r.answered(B, ME, False, 0.1, 100.1)  # rate limited or not validated: no evidence
    r.failed(C)
    assert r.verdict(200.0) is Verdict.UNKNOWN


def test_no_peers_or_no_answers_is_unknown_at_once() -> None:
    assert ReachRound(5.0).verdict(5.0) is Verdict.UNKNOWN
    r = asked((A, N1), (B, N2))
    r.failed(A)
    r.failed(B)
    assert r.verdict(100.0) is Verdict.UNKNOWN


def test_lying_or_stray_dial_backs_count_for_nothing() -> None:
    r = asked((A, N1), (B, N2))
    r.answered(A, ME, True, 0.01, 100.0)
    r.answered(B, ME, True, 0.01, 100.0)
    assert not r.arrived(b"\x09" * 16, True, A)  # a nonce nobody was given
    assert not r.arrived(b"\x09" * 16, False, A)
    assert not r.arrived(N1, False, A)  # UDP from the asked address: our own mapping
    assert r.arrived(N1, True, ("10.0.0.1", 50001))
    assert not r.arrived(N1, True, ("10.0.0.1", 50002))  # a repeat is not new evidence
    assert r.verdict(101.0) is Verdict.PRIVATE  # A sent TCP only: not confirmed


def test_confirmation_counts_only_for_the_majority_address() -> None:
    r = asked((A, N1), (B, N2), (C, N3))
    other = ("198.51.100.1", 4001)
    r.answered(A, other, True, 0.01, 100.0)  # a liar (or a stale mapping)
    r.answered(B, ME, True, 0.01, 100.0)
    r.answered(C, ME, True, 0.01, 100.0)
    r.arrived(N1, False, ("10.0.0.1", 1))
    r.arrived(N1, True, ("10.0.0.1", 2))
    assert r.observed() == ME
    assert r.verdict(100.5) is None
    assert r.verdict(101.0) is Verdict.UNKNOWN  # a peer confirmed: not private either


def test_an_observed_address_tie_gives_no_address_whoever_was_asked_first() -> None:
    other = ("198.51.100.1", 4001)
    for first, second in ((A, B), (B, A)):
        r = asked((first, N1), (second, N2))
        r.answered(first, other, True, 0.01, 100.0)
        r.answered(second, ME, True, 0.01, 100.0)
        assert r.observed() is None
        assert not r.varies()


def test_sybils_in_one_network_count_once_and_confirm_only_their_own_address() -> None:
    """Finding 1 of the issue-16 hostile test: three sybils in one /24 report a victim's
    address and confirm (they dial our real address); one honest peer reports ours."""
    victim = ("198.51.100.66", 80)
    sybils = [(f"192.0.2.{i}", 4100) for i in (31, 32, 33)]
    r = asked(*zip(sybils, (N1, N2, N3), strict=True), (A, b"\x04" * 16))
    for sybil, nonce in zip(sybils, (N1, N2, N3), strict=True):
        r.answered(sybil, victim, True, 0.01, 100.0)
        r.arrived(nonce, False, (sybil[0], 50000))
        r.arrived(nonce, True, (sybil[0], 50001))
    r.answered(A, ME, True, 0.01, 100.0)
    assert network_of(sybils[0][0]) == network_of(sybils[2][0]) == "192.0.2.0/24"
    assert r.observed() is None  # one network each: no agreement
    assert r.verdict(100.0) is Verdict.PUBLIC  # reachable (the sybils reached us) ...
    p = Reachability()
    state = p.finish(r, Verdict.PUBLIC, 100.0)
    assert state.observed is None and state.public_address is None  # ... at no known address


def test_one_network_is_not_enough_unless_the_address_is_our_own() -> None:
    near = ("10.0.1.2", 4000)  # A's /24
    for own, want in (((), None), ((ME,), ME)):
        r = ReachRound(100.0, own=frozenset(own))
        r.ask(A, N1)
        r.ask(near, N2)
        r.answered(A, ME, True, 0.01, 100.0)
        r.answered(near, ME, True, 0.01, 100.0)
        assert r.observed() == want
    r = asked((A, N1), (B, N2))
    r.answered(A, ME, True, 0.01, 100.0)
    r.answered(B, ME, True, 0.01, 100.0)
    assert r.observed() == ME  # two networks agree


def test_networks_are_a_24_or_a_48_loopback_and_lan_included() -> None:
    assert network_of("127.0.0.66") == network_of("127.0.0.1") == "127.0.0.0/24"
    assert network_of("::ffff:203.0.113.9") == "203.0.113.0/24"
    assert network_of("2001:db8:1:2::1") == "2001:db8:1::/48"


def test_one_ip_at_different_ports_is_a_symmetric_nat() -> None:
    r = asked((A, N1), (B, N2))
    r.answered(A, ("203.0.113.9", 1111), True, 0.01, 100.0)
    r.answered(B, ("203.0.113.9", 2222), True, 0.01, 100.0)
    assert r.varies() and r.answered_by(A)
    p = Reachability()
    assert p.finish(r, Verdict.PRIVATE, 102.0).varies


def test_a_nonce_is_for_one_peer() -> None:
    r = asked((A, N1))
    with pytest.raises(ValueError, match="one peer"):
        r.ask(B, N1)


def test_dialback_wait_follows_rtt_within_bounds() -> None:
    assert dialback_wait(0.0001) == 1.0
    assert dialback_wait(0.5) == 2.0
    assert dialback_wait(10.0) == 5.0


def test_format_address() -> None:
    assert format_address(None) is None
    assert format_address(("203.0.113.9", 4001)) == "203.0.113.9:4001"
    assert format_address(("2001:db8::1", 4001)) == "[2001:db8::1]:4001"


def finish(
    policy: Reachability, verdict: Verdict, now: float, observed: tuple[str, int] = ME
) -> Verdict:
    """One round with two answers from two networks, recorded as ``verdict``; the node's
    verdict after it."""
    r = policy.begin(now)
    r.ask(A, N1)
    r.ask(B, N2)
    r.answered(A, observed, True, 0.01, now)
    r.answered(B, observed, True, 0.01, now)
    return policy.finish(r, verdict, now).verdict


def test_schedule_quick_while_unknown_then_slow_then_settled() -> None:
    p = Reachability(unknown_every=5.0, quick_rounds=2, slow_every=60.0, settled_every=300.0)
    assert p.due(0.0) == 0.0
    assert finish(p, Verdict.UNKNOWN, 0.0) is Verdict.UNKNOWN
    assert p.state.public_address is None  # an unknown round records no address
    assert p.due(0.0) == 5.0
    finish(p, Verdict.UNKNOWN, 5.0)
    assert p.due(5.0) == 5.0
    finish(p, Verdict.UNKNOWN, 10.0)
    assert p.due(10.0) == 60.0
    assert finish(p, Verdict.PUBLIC, 70.0) is Verdict.PUBLIC
    assert p.due(70.0) == 300.0
    # an inconclusive round keeps the verdict
    assert finish(p, Verdict.UNKNOWN, 370.0) is Verdict.PUBLIC
    assert p.due(370.0) == 5.0
    p.retest_now()
    assert p.due(371.0) == 0.0


def test_a_new_observed_address_is_tested_again_once() -> None:
    p = Reachability(settled_every=300.0)
    finish(p, Verdict.PUBLIC, 0.0)
    moved = ("198.51.100.7", 4001)
    finish(p, Verdict.PUBLIC, 10.0, observed=moved)
    assert p.state.observed == moved and p.due(10.0) == 0.0
    finish(p, Verdict.PUBLIC, 11.0, observed=ME)  # moved again right away: no loop
    assert p.due(11.0) == 300.0


def test_dialback_limit_per_ip_and_in_all() -> None:
    lim = DialBackLimit(per_ip=2, per_ip_every=10.0, total=3, total_every=1.0)
    assert lim.allow("10.0.0.1", 0.0)
    assert lim.allow("10.0.0.1", 0.0)
    assert not lim.allow("10.0.0.1", 0.0)  # its bucket is empty
    assert lim.allow("10.0.0.2", 0.0)
    assert not lim.allow("10.0.0.3", 0.0)  # every asker's bucket is empty
    assert lim.allow("10.0.0.3", 1.0)
    assert not lim.allow("10.0.0.1", 5.0)  # half a token back
    assert lim.allow("10.0.0.1", 10.0)


def test_dialback_limit_forgets_old_ips_but_the_total_still_holds() -> None:
    lim = DialBackLimit(per_ip=1, per_ip_every=100.0, total=2, total_every=100.0, max_ips=1)
    assert lim.allow("10.0.0.1", 0.0)
    assert lim.allow("10.0.0.2", 0.0)  # 10.0.0.1 forgotten
    assert not lim.allow("10.0.0.1", 0.0)  # full again, but the total is spent


def test_client_mark_validates_and_runs_out() -> None:
    amp = AntiAmplification()
    addr = ("10.0.0.1", 4000)
    amp.mark_client(addr, until=100.0)
    assert amp.is_validated(addr) and amp.answered_as(addr) is None
    assert amp.is_client(addr, 99.0)
    assert not amp.is_client(addr, 100.0)
    amp.mark_client(addr, until=200.0)
    amp.validate(addr, b"\x07" * 20)  # it answers a ping with its id again: a server
    assert not amp.is_client(addr, 150.0)
    assert amp.answered_as(addr) == b"\x07" * 20


def test_dialback_frame_carries_exactly_the_nonce() -> None:
    frame = dialback_frame(N1)
    assert frame[:5] == (16).to_bytes(4, "big") + bytes([FrameType.DIALBACK])
    assert decode_dialback(frame[5:]) == N1
    for bad in (b"", N1[:15], N1 + b"\x00"):
        with pytest.raises(RemoteProtocolError):
            decode_dialback(bad)
    with pytest.raises(ValueError, match="16 bytes"):
        dialback_frame(b"short")


def test_an_unknown_round_keeps_the_observed_address() -> None:
    p = Reachability()
    finish(p, Verdict.PUBLIC, 0.0)
    assert finish(p, Verdict.UNKNOWN, 400.0, observed=("198.51.100.66", 80)) is Verdict.PUBLIC
    assert p.state.observed == ME


def test_a_decided_round_without_agreement_keeps_the_address_only_if_still_seen() -> None:
    p = Reachability()
    finish(p, Verdict.PUBLIC, 0.0)
    r = p.begin(300.0)
    r.ask(A, N1)
    r.ask(B, N2)
    r.answered(A, ME, True, 0.01, 300.0)
    r.answered(B, ("198.51.100.66", 80), True, 0.01, 300.0)  # a tie: no agreement
    assert p.finish(r, Verdict.PUBLIC, 300.0).observed == ME  # A still saw ME
    r = p.begin(600.0)
    r.ask(A, N1)
    r.answered(A, ("198.51.100.7", 4001), True, 0.01, 600.0)
    assert p.finish(r, Verdict.PUBLIC, 600.0).observed is None  # ME no longer seen


def private_round(policy: Reachability, now: float, *peers: tuple[str, int]) -> Verdict:
    """A round in which ``peers`` all said they were dialing and none confirmed."""
    r = policy.begin(now)
    for i, peer in enumerate(peers):
        r.ask(peer, bytes([i + 1]) * 16)
        r.answered(peer, ME, True, 0.01, now)
    verdict = r.verdict(now + 5.0)
    assert verdict is Verdict.PRIVATE
    return policy.finish(r, verdict, now + 5.0).verdict


def test_a_public_node_goes_private_only_after_two_refuting_rounds_from_two_networks() -> None:
    """Finding 2 of the issue-16 hostile test: two liars (one network) that never dial,
    while an honest contact's dial-back budget is spent, must not flip a public node."""
    p = Reachability(unknown_every=5.0)
    finish(p, Verdict.PUBLIC, 0.0)
    liars = ("192.0.2.21", 4100), ("192.0.2.22", 4100)
    for t in range(10):
        assert private_round(p, 300.0 + 10 * t, *liars) is Verdict.PUBLIC
    assert private_round(p, 500.0, A, B) is Verdict.PUBLIC  # one round from two networks
    assert p.due(505.0) == 5.0  # ... tested again soon
    assert private_round(p, 510.0, *liars) is Verdict.PUBLIC  # breaks the streak
    assert private_round(p, 520.0, A, B) is Verdict.PUBLIC
    assert private_round(p, 530.0, A, C) is Verdict.PRIVATE  # two in a row
    # from unknown (a node just started) one round still decides
    fresh = Reachability()
    assert private_round(fresh, 0.0, *liars) is Verdict.PRIVATE


def test_dial_back_limit_counts_an_ipv6_64_as_one_asker() -> None:
    lim = DialBackLimit(per_ip=2, per_ip_every=10.0)
    assert lim.allow("2001:db8:1:2::1", 0.0)
    assert lim.allow("2001:db8:1:2::2", 0.0)
    assert not lim.allow("2001:db8:1:2:ffff::3", 0.0)  # same /64: its bucket is empty
    assert lim.allow("2001:db8:1:3::1", 0.0)  # another /64
    assert lim.allow("10.0.0.1", 0.0) and lim.allow("10.0.0.1", 0.0)
    assert lim.allow("10.0.0.2", 0.0)  # IPv4: per address


def test_dial_back_limit_counts_a_network_together() -> None:
    lim = DialBackLimit(per_net=3, per_net_every=1.0)
    assert all(lim.allow(f"192.0.2.{i}", 0.0) for i in range(3))
    assert not lim.allow("192.0.2.9", 0.0)  # the /24's bucket is empty
    assert lim.allow("198.51.100.1", 0.0)
    assert lim.allow("192.0.2.9", 1.0)


def test_dial_back_limit_keeps_a_reserve_for_routing_table_contacts() -> None:
    """Finding 2: a flood from many validated addresses spends the total bucket; a
    contact in our routing table is still dialled back (from the reserve)."""
    lim = DialBackLimit(total=4, total_every=1.0, reserved=2, reserved_every=10.0)
    flood = [f"198.51.{i}.1" for i in range(100)]
    assert sum(lim.allow(ip, 0.0) for ip in flood) == 4
    assert not lim.allow("203.0.113.1", 0.0)  # a stranger waits for the total bucket
    assert lim.allow("203.0.113.2", 0.0, known=True)
    assert lim.allow("203.0.113.3", 0.0, known=True)
    assert not lim.allow("203.0.113.4", 0.0, known=True)  # the reserve is spent too
    assert lim.allow("203.0.113.4", 10.0, known=True)


# A home: we are 192.168.1.2 on our LAN, our router is 198.51.100.7 to the outside.
HOME = ("192.168.1.2", 4001)
MATE = ("192.168.1.3", 4001)  # a LAN-mate
NAT = ("198.51.100.7", 31000)


def at_home(*peers: tuple[tuple[str, int], bytes]) -> ReachRound:
    r = ReachRound(100.0, own=frozenset({HOME}))
    for peer, nonce in peers:
        r.ask(peer, nonce)
    return r


def test_a_lan_mates_dial_back_says_nothing_about_the_outside() -> None:
    """The LAN-mate confirms across the LAN; the one peer outside (a bootstrap node) saw
    our router and its dial-back never came: private, with no address agreed."""
    r = at_home((MATE, N1), (A, N2))
    r.answered(MATE, HOME, True, 0.001, 100.0)
    r.answered(A, NAT, True, 0.02, 100.02)
    r.arrived(N1, False, ("192.168.1.3", 50000))
    r.arrived(N1, True, ("192.168.1.3", 50001))
    assert r.verdict(100.5) is None  # waiting for A's dial-back
    assert r.verdict(101.02) is Verdict.PRIVATE
    assert r.observed() is None  # one network saw NAT: not enough to name it


def test_one_peer_that_saw_a_nat_and_never_dialled_through_is_enough() -> None:
    r = at_home((A, N1))
    r.answered(A, NAT, True, 0.02, 100.02)
    assert r.verdict(101.02) is Verdict.PRIVATE


def test_one_peer_that_saw_our_own_address_and_never_dialled_is_not_enough() -> None:
    """A public node (seen at its own address) with one peer: rate limited, say."""
    r = ReachRound(100.0, own=frozenset({ME}))
    r.ask(A, N1)
    r.answered(A, ME, True, 0.02, 100.02)
    assert r.verdict(101.02) is Verdict.UNKNOWN


def test_a_liar_naming_another_address_cannot_hide_an_honest_confirmation() -> None:
    """A peer outside our network that saw our own address is not a LAN-mate: its
    confirmation counts, whatever a liar says it saw."""
    r = ReachRound(100.0, own=frozenset({ME}))
    r.ask(A, N1)
    r.ask(B, N2)
    r.answered(A, ("192.0.2.66", 80), True, 0.02, 100.02)  # the liar
    r.answered(B, ME, True, 0.02, 100.02)
    r.arrived(N2, False, ("10.0.2.2", 50000))
    r.arrived(N2, True, ("10.0.2.2", 50001))
    assert r.verdict(100.03) is Verdict.PUBLIC
