"""The NAT topology of tests/support/netns.py behaves like homes behind routers (issue #16).

Plain sockets in the namespaces, no dhtshare: private hosts reach the public ones; nothing
unsolicited gets in; the port-keeping routers keep a flow's source port; the random one
maps one local port to a different public port toward each destination.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from support.netns import (
    Echo,
    Topology,
    sh,
    tcp_observed,
    topology,
    udp_observed,
    unavailable,
)

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

QUIET = 1.0  # seconds a host listens for traffic that must not arrive


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[Topology, Echo, Echo]]:
    with topology() as topo:
        boot, public = Echo(topo, "boot"), Echo(topo, "public")
        try:
            yield topo, boot, public
        finally:
            boot.close()
            public.close()


@pytest.mark.parametrize("role", ["keep1", "keep2", "rand", "mate"])
def test_a_private_host_reaches_both_public_hosts(
    net: tuple[Topology, Echo, Echo], role: str
) -> None:
    topo, boot, public = net
    for echo in (boot, public):
        udp, tcp = udp_observed(topo, role, echo), tcp_observed(topo, role, echo)
        assert udp is not None and udp.split(":")[0] == topo.public_ip(role), udp
        assert tcp is not None and tcp.split(":")[0] == topo.public_ip(role), tcp


def test_the_public_hosts_reach_each_other_directly(net: tuple[Topology, Echo, Echo]) -> None:
    topo, boot, _ = net
    assert udp_observed(topo, "public", boot, 5600) == f"{topo.address('public')}:5600"
    assert tcp_observed(topo, "public", boot, 5601) == f"{topo.address('public')}:5601"


def test_hosts_on_one_lan_reach_each_other_directly(net: tuple[Topology, Echo, Echo]) -> None:
    """mate sits on keep1's LAN, behind the same router: they meet without NAT."""
    topo, _, _ = net
    echo = Echo(topo, "keep1", port=7100)
    try:
        assert udp_observed(topo, "mate", echo, 5700) == f"{topo.address('mate')}:5700"
        assert tcp_observed(topo, "mate", echo, 5701) == f"{topo.address('mate')}:5701"
    finally:
        echo.close()


@pytest.mark.parametrize("role", ["keep1", "rand"])
def test_nothing_unsolicited_reaches_a_private_host(
    net: tuple[Topology, Echo, Echo], role: str
) -> None:
    """UDP and TCP from the public member, to the router's address on the port the host
    listens on (even after the host sent from that port to another public host), and to
    the host's own LAN address: none of it arrives."""
    topo, boot, _ = net
    port = 6000
    with topo.socket(role, socket.SOCK_DGRAM) as udp, topo.socket(role, socket.SOCK_STREAM) as tcp:
        udp.bind(("0.0.0.0", port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", port))
        tcp.listen(4)
        # a mapping toward boot exists: its reply gets in, a third party's datagram does not
        udp.sendto(b"?", (boot.host, boot.port))
        udp.settimeout(QUIET)
        assert udp.recvfrom(100)[1] == (boot.host, boot.port)
        with topo.socket("public", socket.SOCK_DGRAM) as out:
            out.sendto(b"unsolicited", (topo.public_ip(role), port))
            with pytest.raises(OSError, match="unreachable"):  # no route to a LAN
                out.sendto(b"unsolicited", (topo.address(role), port))
        with topo.socket("public", socket.SOCK_STREAM) as out:
            out.settimeout(QUIET)
            with pytest.raises(TimeoutError):  # dropped: no RST, no connection
                out.connect((topo.public_ip(role), port))
        with (
            topo.socket("public", socket.SOCK_STREAM) as out,
            pytest.raises(OSError, match="unreachable"),
        ):
            out.connect((topo.address(role), port))
        with pytest.raises(TimeoutError):
            udp.recvfrom(100)
        tcp.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            tcp.accept()


@pytest.mark.parametrize("role", ["keep1", "keep2"])
def test_a_port_keeping_nat_keeps_the_source_port_toward_every_destination(
    net: tuple[Topology, Echo, Echo], role: str
) -> None:
    topo, boot, public = net
    mapped = f"{topo.public_ip(role)}:5555"
    assert udp_observed(topo, role, boot, 5555) == mapped
    assert udp_observed(topo, role, public, 5555) == mapped
    mapped = f"{topo.public_ip(role)}:5556"
    assert tcp_observed(topo, role, boot, 5556) == mapped
    assert tcp_observed(topo, role, public, 5556) == mapped


def test_the_random_nat_maps_one_port_differently_per_destination(
    net: tuple[Topology, Echo, Echo],
) -> None:
    topo, boot, public = net
    assert "masquerade random" in topo.rules("rand")
    for observe, sport in ((udp_observed, 5555), (tcp_observed, 5556)):
        seen = [observe(topo, "rand", echo, sport) for echo in (boot, public)]
        assert None not in seen, seen
        ports = [int(str(s).split(":")[1]) for s in seen]
        assert ports[0] != ports[1], seen
        assert sport not in ports, seen


def test_the_topology_goes_away_with_everything_in_it() -> None:
    with topology() as topo:
        names = list(topo.made)
        proc = topo.popen("keep1", "sleep", "60")
    assert proc.wait(5) != 0  # killed by the teardown
    listed = {line.split(" ", 1)[0] for line in sh("ip", "netns", "list").stdout.splitlines()}
    assert not set(names) & listed
