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
)
from dhtshare.wire.dialback import decode_dialback, dialback_frame
from dhtshare.wire.frames import FrameType

A, B, C = ("10.0.0.1", 4000), ("10.0.0.2", 4000), ("10.0.0.3", 4000)
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


def test_observed_address_tie_keeps_the_previous_one() -> None:
    r = asked((A, N1), (B, N2))
    other = ("198.51.100.1", 4001)
    r.answered(A, other, True, 0.01, 100.0)
    r.answered(B, ME, True, 0.01, 100.0)
    assert r.observed() == other
    assert r.observed(previous=ME) == ME
    assert not r.varies()


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
    """One round with one answer, recorded as ``verdict``; the node's verdict after it."""
    r = policy.begin(now)
    r.ask(A, N1)
    r.answered(A, observed, True, 0.01, now)
    return policy.finish(r, verdict, now).verdict


def test_schedule_quick_while_unknown_then_slow_then_settled() -> None:
    p = Reachability(unknown_every=5.0, quick_rounds=2, slow_every=60.0, settled_every=300.0)
    assert p.due(0.0) == 0.0
    assert finish(p, Verdict.UNKNOWN, 0.0) is Verdict.UNKNOWN
    assert p.state.public_address == "203.0.113.9:4001"
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
