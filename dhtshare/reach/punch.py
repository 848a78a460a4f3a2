"""When a hole punch dials, when it gives up, and when a relayed session tries again (pure).

The exchange (docs/connectivity.md): the dialer D sends ``PunchConnect`` at ``t0`` and
receives the provider P's at ``t1``; ``rtt = t1 - t0``. D sends ``PunchSync`` at ``ts``
and starts at ``ts + rtt / 2``; P starts when it reads the sync (about ``rtt / 2``
later), so both SYNs leave at about the same moment and cross (TCP simultaneous open).

From its start each side makes ``attempts`` connects, ``interval`` apart; attempt ``k``
begins at ``start + k * interval`` and is given up at ``start + (k + 1) * interval``.
The punch is over at ``start + attempts * interval`` (both sides stop accepting too).
``interval`` is two round trips and a margin, within ``[MIN_INTERVAL, MAX_INTERVAL]``:
an attempt always has time for a SYN to cross and its answer to come back.

Which addresses a punch dials (``punch_targets``): at most ``MAX_TARGETS`` of those the
other side offered, of our own address family, never a multicast, unspecified, broadcast or
link-local one, and a loopback one only when our own address is loopback; the provider
also keeps only the IP the relay saw the dialer connect from. Nothing else in a
``PunchConnect`` is trusted: it may name any host (a victim to flood with SYNs).

A relayed session tries to upgrade (a new circuit and a punch) ``upgrade_delay(n)``
seconds after its ``n``-th failed try (n = 0: after the session started relayed).
Every time is a float in seconds; ``now`` is passed in.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "ATTEMPTS",
    "CONNECT_TIMEOUT",
    "MAX_INTERVAL",
    "MAX_RTT",
    "MAX_TARGETS",
    "MIN_INTERVAL",
    "SYNC_TIMEOUT",
    "UPGRADE_FIRST",
    "UPGRADE_MAX",
    "PunchSchedule",
    "punch_targets",
    "upgrade_delay",
]

ATTEMPTS = 4
"""Connects per punch, on each side."""
MIN_INTERVAL = 0.25
"""Least time between attempts (a LAN or loopback round trip is far shorter)."""
MAX_INTERVAL = 3.0
MARGIN = 0.05
"""Added to two round trips: the jitter of scheduling both ends."""
MAX_RTT = 3.0
"""A longer measured round trip is not worth punching through: the dialer stays relayed."""
CONNECT_TIMEOUT = 5.0
"""How long the dialer waits for the provider's ``PunchConnect``."""
SYNC_TIMEOUT = 5.0
"""How long the provider waits for the dialer's ``PunchSync`` (or a fallback handshake)."""
MAX_TARGETS = 2
"""Most addresses one side dials in a punch (a ``PunchConnect`` may carry more)."""
UPGRADE_FIRST = 10.0
UPGRADE_MAX = 300.0


@dataclass(frozen=True, slots=True)
class PunchSchedule:
    """The attempts of one punch, for a measured round trip ``rtt``."""

    rtt: float
    attempts: int = ATTEMPTS

    def __post_init__(self) -> None:
        if self.rtt < 0:
            raise ValueError("a round trip is not negative")
        if self.attempts < 1:
            raise ValueError("at least one attempt")

    @property
    def worth_trying(self) -> bool:
        """False when the round trip is too long to time a simultaneous open by."""
        return self.rtt <= MAX_RTT

    @property
    def interval(self) -> float:
        return min(MAX_INTERVAL, max(MIN_INTERVAL, 2 * self.rtt + MARGIN))

    def dialer_start(self, sync_sent: float) -> float:
        """When the dialer begins: half a round trip after it sent ``PunchSync``."""
        return sync_sent + self.rtt / 2

    @staticmethod
    def listener_start(sync_received: float) -> float:
        """When the provider begins: as soon as it read ``PunchSync``."""
        return sync_received

    def attempt_start(self, start: float, attempt: int) -> float:
        """When attempt ``attempt`` (0-based) connects."""
        self._check(attempt)
        return start + attempt * self.interval

    def attempt_deadline(self, start: float, attempt: int) -> float:
        """When attempt ``attempt`` is given up if it has not connected."""
        self._check(attempt)
        return start + (attempt + 1) * self.interval

    def deadline(self, start: float) -> float:
        """When the whole punch is given up."""
        return start + self.attempts * self.interval

    def _check(self, attempt: int) -> None:
        if not 0 <= attempt < self.attempts:
            raise ValueError(f"attempt {attempt} of {self.attempts}")


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def _ip(host: str) -> Address | None:
    """``host`` as an IP (an IPv4-mapped IPv6 address as its IPv4), or ``None``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _dialable(ip: Address, loopback: bool) -> bool:
    """Whether a punch may dial ``ip`` (``loopback``: our own address is loopback)."""
    if ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        return False
    if isinstance(ip, ipaddress.IPv4Address) and (ip == _BROADCAST or ip in _THIS_NETWORK):
        return False
    return loopback or not ip.is_loopback


def punch_targets(
    offered: tuple[tuple[str, int], ...], own_ip: str, source_ip: str | None = None
) -> tuple[tuple[str, int], ...]:
    """The addresses of ``offered`` (the other side's ``PunchConnect``) a punch from
    ``own_ip`` (our address as others see it) dials, in their order: at most
    ``MAX_TARGETS``, of ``own_ip``'s family, none repeated, none multicast, unspecified,
    broadcast or link-local, none loopback unless ``own_ip`` is. With ``source_ip`` (the
    dialer's IP as the relay saw it), only addresses with that IP."""
    own = _ip(own_ip)
    if own is None:
        return ()
    source = None if source_ip is None else _ip(source_ip)
    if source_ip is not None and source is None:
        return ()
    family = ipaddress.ip_address(own_ip).version  # of the sockets: a mapped one is IPv6
    out: list[tuple[str, int]] = []
    seen: set[tuple[Address, int]] = set()
    for host, port in offered:
        ip = _ip(host)
        if ip is None or ipaddress.ip_address(host).version != family:
            continue
        if not 0 < port < 65536 or (source is not None and ip != source):
            continue
        if not _dialable(ip, own.is_loopback) or (ip, port) in seen:
            continue
        seen.add((ip, port))
        out.append((host, port))
        if len(out) == MAX_TARGETS:
            break
    return tuple(out)


def upgrade_delay(failures: int) -> float:
    """Seconds before a relayed session's next upgrade try, after ``failures`` failed
    tries: ``UPGRADE_FIRST`` doubling each time, at most ``UPGRADE_MAX``."""
    if failures < 0:
        raise ValueError("failures is not negative")
    return min(UPGRADE_MAX, UPGRADE_FIRST * float(2 ** min(failures, 32)))
