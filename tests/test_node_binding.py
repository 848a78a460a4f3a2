"""``node start`` listens on every interface by default and advertises a reachable address.

Before, it listened on 127.0.0.1 unless told otherwise, so ``dhtshare node start
--bootstrap HOST:PORT --detach`` as the README shows it could not reach a bootstrap node
anywhere but on loopback. Now it listens on 0.0.0.0 and puts into its provider records the
local address the kernel picks toward the bootstrap node. Tests stay on loopback: with
``--bootstrap 127.0.0.1:PORT`` and no ``--host``, the node listens on 0.0.0.0, advertises
127.0.0.1, and two such nodes exchange a file. The choice itself is unit-tested with
literal answers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
from support.cli import Users

from dhtshare.node.netaddr import choose_advertised, local_address_toward


def test_default_node_listens_everywhere_and_advertises_address_toward_bootstrap(
    users: Users,
) -> None:
    u = users
    for name in ("alice", "bob"):
        u.new_user(name)
        started = u.start(name)  # no --host, no --advertise
        assert "listening on 0.0.0.0" in started.stdout, started.stdout
    status = u.json("alice", "node", "status")
    host, port = status["address"].rsplit(":", 1)
    assert host == "0.0.0.0"
    assert status["advertised"] == f"127.0.0.1:{port}"
    # the peer server really accepts on every interface: here, a second loopback address
    with socket.create_connection(("127.0.0.2", int(port)), timeout=5):
        pass

    u.group_of("alice", "climbers", "bob")
    data = os.urandom(2 * 1024 * 1024 + 5)
    (u.root / "a.bin").write_bytes(data)
    u.run("alice", "share", "climbers", str(u.root / "a.bin"))
    u.run("bob", "get", "climbers", "a.bin", "--out", str(u.root / "dl"))
    assert (u.root / "dl" / "a.bin").read_bytes() == data


def test_host_and_advertise_still_win(users: Users) -> None:
    u = users
    u.new_user("carol")
    u.start("carol", "--host", "127.0.0.1", "--advertise", "127.0.0.9")
    status = u.json("carol", "node", "status")
    port = status["address"].rsplit(":", 1)[1]
    assert status["address"] == f"127.0.0.1:{port}"
    assert status["advertised"] == f"127.0.0.9:{port}"


# ---- the choice of address, with literal answers


def answers(
    table: dict[str, str | None],
) -> tuple[Callable[[str, int], str | None], list[str]]:
    asked: list[str] = []

    def local_toward(host: str, port: int) -> str | None:
        asked.append(host)
        return table.get(host)

    return local_toward, asked


def test_advertise_given_wins() -> None:
    probe, asked = answers({"10.0.0.1": "10.0.0.5"})
    assert choose_advertised("0.0.0.0", "pub.example", [("10.0.0.1", 4000)], probe) == "pub.example"
    assert asked == []


def test_specific_host_is_advertised_as_is() -> None:
    probe, asked = answers({"10.0.0.1": "10.0.0.5"})
    assert choose_advertised("192.168.1.4", None, [("10.0.0.1", 4000)], probe) == "192.168.1.4"
    assert asked == []


def test_wildcard_takes_the_address_toward_the_first_target_with_a_route() -> None:
    probe, asked = answers({"203.0.113.9": "192.168.1.20", "10.0.0.1": "10.0.0.5"})
    targets = [("boot.example.org", 4000), ("203.0.113.9", 4000), ("10.0.0.1", 4000)]
    assert choose_advertised("0.0.0.0", None, targets, probe) == "192.168.1.20"
    assert asked == ["boot.example.org", "203.0.113.9"]


def test_wildcard_with_nobody_to_reach_falls_back_to_loopback() -> None:
    probe, _ = answers({})
    assert choose_advertised("0.0.0.0", None, [("10.0.0.1", 1)], probe) == "127.0.0.1"
    assert choose_advertised("::", None, [], probe) == "::1"


def test_ipv4_wildcard_never_advertises_an_ipv6_address() -> None:
    probe, _ = answers({"2001:db8::1": "2001:db8::5", "10.0.0.1": "10.0.0.5"})
    targets = [("2001:db8::1", 4000), ("10.0.0.1", 4000)]
    assert choose_advertised("0.0.0.0", None, targets, probe) == "10.0.0.5"
    assert choose_advertised("::", None, targets, probe) == "2001:db8::5"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.1"])
def test_the_kernel_answers_loopback_toward_loopback(host: str) -> None:
    assert local_address_toward(host, 4000) == "127.0.0.1"


def test_no_answer_for_a_name() -> None:
    """A host name is not looked up (no DNS at start): the DHT contacts it leads to are."""
    assert local_address_toward("boot.example.org", 4000) is None
