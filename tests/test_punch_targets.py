"""Which offered addresses a punch dials (reach/punch.punch_targets), with literal addresses.

A ``PunchConnect`` comes from the other side or from whatever relay carries the circuit:
it may name any host, so a punch must not become a SYN reflector.
"""

from __future__ import annotations

from dhtshare.reach.punch import MAX_TARGETS, punch_targets

VICTIMS = tuple(("198.51.100.7", 9000 + i) for i in range(8))


def test_at_most_two_of_eight_offered_addresses_are_dialled() -> None:
    assert MAX_TARGETS == 2
    assert punch_targets(VICTIMS, "203.0.113.5") == VICTIMS[:2]


def test_the_provider_dials_only_the_ip_the_relay_saw() -> None:
    offered = (*VICTIMS[:6], ("192.0.2.9", 4242), ("192.0.2.9", 4243))
    assert punch_targets(offered, "203.0.113.5", "192.0.2.9") == offered[6:]
    assert punch_targets(VICTIMS, "203.0.113.5", "192.0.2.9") == ()
    # an IPv4-mapped source (a dual-stack relay) is the same IP
    assert punch_targets(offered, "203.0.113.5", "::ffff:192.0.2.9") == offered[6:]
    assert punch_targets(offered, "203.0.113.5", "not an ip") == ()


def test_multicast_unspecified_broadcast_and_link_local_are_never_dialled() -> None:
    bad = (
        ("224.0.0.1", 80),
        ("239.1.2.3", 80),
        ("0.0.0.0", 80),
        ("0.1.2.3", 80),
        ("255.255.255.255", 80),
        ("169.254.1.1", 80),
        ("::ffff:224.0.0.1", 80),
    )
    assert punch_targets(bad, "203.0.113.5") == ()
    assert punch_targets(bad, "127.0.0.1") == ()  # a loopback node neither
    bad6 = (("ff02::1", 80), ("::", 80), ("fe80::1", 80))
    assert punch_targets(bad6, "2001:db8::5") == ()
    assert punch_targets((*bad, ("192.0.2.1", 80)), "203.0.113.5") == (("192.0.2.1", 80),)


def test_loopback_only_when_our_own_address_is_loopback() -> None:
    offered = (("127.0.0.1", 80), ("::ffff:127.0.0.2", 81), ("10.0.0.2", 82))
    assert punch_targets(offered, "203.0.113.5") == (("10.0.0.2", 82),)
    assert punch_targets(offered[:1] + offered[2:], "127.0.0.1") == (
        ("127.0.0.1", 80),
        ("10.0.0.2", 82),
    )
    assert punch_targets((("::1", 80),), "2001:db8::5") == ()
    assert punch_targets((("::1", 80),), "::1") == (("::1", 80),)


def test_only_our_family_and_no_address_twice() -> None:
    offered = (("2001:db8::9", 80), ("192.0.2.1", 80), ("192.0.2.1", 80), ("192.0.2.2", 80))
    assert punch_targets(offered, "203.0.113.5") == (("192.0.2.1", 80), ("192.0.2.2", 80))
    assert punch_targets(offered, "2001:db8::5") == (("2001:db8::9", 80),)
    assert punch_targets(offered, "not an ip") == ()
