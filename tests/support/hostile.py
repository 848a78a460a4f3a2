"""Inputs a hostile peer may send, shared by the tests of the boundaries that refuse them."""

from __future__ import annotations

HOSTILE_HOSTS = [  # hosts a hostile contact may name
    "127.0.0.1\x00",  # NUL: sendto raises TypeError/ValueError
    "localhost",  # a name: sendto would resolve it, blocking the loop
    "127.000.000.001",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "255.255.255.255",
    "224.0.0.1",
    "ff02::1",
    "fe80::1%lo",
    "::1",  # valid, but not our address family
    "",
    "x" * 300,
]
