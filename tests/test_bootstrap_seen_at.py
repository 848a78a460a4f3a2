"""A relaying bootstrap node behind a router that forwards its port accepts Reserves
naming the address its contacts see it at, but only one that contacts in two networks
agree on, at its own port: one lying contact cannot make it accept Reserves naming the
liar's relay (a replay of a victim's Reserve from there would take the reservation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from dhtshare.cli.daemon import _seen_at
from dhtshare.dht.protocol import ReachReply
from dhtshare.dht.server import DhtNode

PORT = 4000


@dataclass
class Contact:
    ip: str
    port: int


class Contacts:
    """Stands in for a DhtNode: its contacts, and what each answers to ``reach``."""

    def __init__(self, answers: Mapping[str, tuple[str, int] | None]) -> None:
        self.answers = answers

    def contacts(self) -> list[Contact]:
        return [Contact(ip, 4000) for ip in self.answers]

    async def reach(self, address: tuple[str, int], nonce: bytes) -> ReachReply | None:
        seen = self.answers[address[0]]
        return None if seen is None else ReachReply(seen[0], seen[1], False)


def node(answers: Mapping[str, tuple[str, int] | None]) -> DhtNode:
    return cast(DhtNode, cast(Any, Contacts(answers)))


async def test_two_networks_must_agree_at_our_port() -> None:
    public, liar = ("203.0.113.7", PORT), ("198.51.100.66", PORT)
    answers = {
        "192.0.2.1": public,
        "192.0.3.1": public,  # another /24: agreement
        "192.0.4.1": liar,  # alone
        "192.0.5.1": ("203.0.113.7", 5555),  # not our port
    }
    assert await _seen_at(node(answers), PORT) == {public}


async def test_one_liar_or_one_network_is_not_enough() -> None:
    liar = ("198.51.100.66", PORT)
    assert await _seen_at(node({"192.0.4.1": liar, "192.0.4.2": liar}), PORT) == set()
    assert await _seen_at(node({"192.0.4.1": liar, "192.0.5.1": None}), PORT) == set()
