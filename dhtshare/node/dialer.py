"""Dialling a provider: which route, in which order (docs/connectivity.md).

``FileDialer.dial(addr)`` returns a handshaken ``PeerStream`` and its route:

- ``"direct"``: an ordinary connection to one of the provider's DIRECT addresses. They
  are tried in parallel, ``stagger`` seconds apart (the next one at once when the one
  before it failed), the main address first;
- through each RELAY address (a relay holding a reservation for the provider), started
  ``relay_after`` seconds after the last direct try or as soon as it failed: a circuit
  (``open_circuit``) to the provider's relay key that the address names (never its
  identity key: the relay must not learn who is dialled; a relay address without a key,
  from an older record, is skipped), then a hole punch (``reach/aio/punch.py``) when we
  know our public address. A punched connection whose handshake succeeds closes the circuit: route
  ``"punched"`` if we are private (``is_private()``), ``"direct"`` otherwise (a public
  dialer is reached by the provider's connection: the reverse connection). Else the
  handshake runs over the circuit: ``"relayed"``.

The first route that works wins; every other try is cancelled and its sockets closed.
Whatever connected, the handshake proves the group's current access key
(``Dialer.access_key``, asked at each try) and must authenticate ``addr.peer_key``: an
address or a relay that leads to someone else counts as a failure. ``upgrade(addr)`` (a relayed
session's try for better) opens new circuits and punches, without the relayed fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from dhtshare.errors import ProtocolError, RemoteProtocolError
from dhtshare.identity import Identity
from dhtshare.reach.aio.punch import Adopt, punch_as_dialer, punch_as_listener
from dhtshare.records import AddressKind, PeerAddress
from dhtshare.transfer.aio.peer import (
    HANDSHAKE_TIMEOUT,
    READ_TIMEOUT,
    PeerStream,
    open_peer,
    open_peer_on,
)
from dhtshare.transfer.share import AccessKey
from dhtshare.transfer.swarm import ProviderAddr
from dhtshare.wire.frames import Reason

__all__ = [
    "DIRECT",
    "PUNCHED",
    "RELAYED",
    "CircuitHandler",
    "Dialer",
    "FileDialer",
    "OpenCircuit",
    "circuit_handler",
]

log = logging.getLogger(__name__)

DIRECT, PUNCHED, RELAYED = "direct", "punched", "relayed"

OpenCircuit = Callable[[tuple[str, int], bytes], Awaitable[tuple[socket.socket, bytes]]]
"""``reach/aio/relay.open_circuit``: a circuit to a relay key's holder through a relay."""

Try = Callable[[], Awaitable[tuple[PeerStream, str]]]


@dataclass
class Dialer:
    """The node's way to reach providers; ``for_file`` gives one download's dialer.

    ``open_circuit`` is ``None`` when the node cannot use relays; ``public_ip()`` our
    address as others see it (``None``: unknown, so no punch); ``is_private()`` whether
    the reachability test found us private; ``access_key(group_id)`` the group's current
    access key (``None``: we hold none, and every try fails); ``key_refused(group_id)`` is
    told when a provider could not open our handshake (``DECRYPT_FAILED``): the group may
    have moved to an epoch we have not followed yet.
    """

    identity: Identity
    access_key: AccessKey = lambda group_id: None
    key_refused: Callable[[bytes], None] = lambda group_id: None
    open_circuit: OpenCircuit | None = None
    public_ip: Callable[[], str | None] = lambda: None
    is_private: Callable[[], bool] = lambda: False
    stagger: float = 0.25
    relay_after: float = 1.0
    relay_stagger: float = 2.0
    circuit_timeout: float = 10.0

    def for_file(
        self,
        group_id: bytes,
        content_id: bytes,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> FileDialer:
        return FileDialer(self, group_id, content_id, handshake_timeout, read_timeout)


class FileDialer:
    """Dials the providers of one file (``group_id``, ``content_id``)."""

    def __init__(
        self,
        dialer: Dialer,
        group_id: bytes,
        content_id: bytes,
        handshake_timeout: float,
        read_timeout: float | None,
    ) -> None:
        self.dialer = dialer
        self.group_id, self.content_id = group_id, content_id
        self.handshake_timeout, self.read_timeout = handshake_timeout, read_timeout

    def _access_key(self) -> bytes:
        key = self.dialer.access_key(self.group_id)
        if key is None:
            raise ProtocolError("this node holds no access key of the group")
        return key

    async def dial(self, addr: ProviderAddr) -> tuple[PeerStream, str]:
        """A session with ``addr``'s provider and its route (module doc). Raises
        ``OSError`` or ``ProtocolError`` (the first try's error) if no route worked."""
        try:
            return await self._first(self._tries(addr, fallback=True))
        except RemoteProtocolError as exc:
            if exc.reason == Reason.DECRYPT_FAILED:
                self.dialer.key_refused(self.group_id)
            raise

    async def upgrade(self, addr: ProviderAddr) -> tuple[PeerStream, str] | None:
        """A punched session with ``addr``'s provider through one of its relays (route
        ``"punched"``, or ``"direct"`` for a public dialer), or ``None``. Its direct
        addresses are not tried again: they failed when the relayed session was made."""
        tries = [t for t in self._tries(addr, fallback=False) if t[0] is AddressKind.RELAY]
        if not tries:
            return None
        try:
            return await self._first(tries)
        except (OSError, ProtocolError, TimeoutError) as exc:
            log.debug("no upgrade to %s: %s", addr.peer_key.hex()[:12], exc)
            return None

    # -- the tries ------------------------------------------------------------------

    def _tries(
        self, addr: ProviderAddr, *, fallback: bool
    ) -> list[tuple[AddressKind, tuple[float, Try]]]:
        d = self.dialer
        out: list[tuple[AddressKind, tuple[float, Try]]] = []
        at = 0.0
        addresses = addr.every_address()
        for a in (a for a in addresses if a.kind is AddressKind.DIRECT):
            out.append((AddressKind.DIRECT, (at, self._direct_try(addr, a))))
            at += d.stagger
        if d.open_circuit is not None:
            at += d.relay_after - d.stagger if out else 0.0
            for a in (a for a in addresses if a.kind is AddressKind.RELAY and a.key):
                out.append((AddressKind.RELAY, (at, self._relay_try(addr, a, fallback))))
                at += d.relay_stagger
        return out

    def _direct_try(self, addr: ProviderAddr, where: PeerAddress) -> Try:
        async def attempt() -> tuple[PeerStream, str]:
            stream = await open_peer(
                self.dialer.identity,
                where.host,
                where.port,
                self.group_id,
                self.content_id,
                access_key=self._access_key(),
                handshake_timeout=self.handshake_timeout,
                read_timeout=self.read_timeout,
            )
            await _check_key(stream, addr)
            return stream, DIRECT

        return attempt

    def _relay_try(self, addr: ProviderAddr, relay: PeerAddress, fallback: bool) -> Try:
        async def attempt() -> tuple[PeerStream, str]:
            return await self._via_relay(addr, relay, fallback)

        return attempt

    async def _via_relay(
        self, addr: ProviderAddr, relay: PeerAddress, fallback: bool
    ) -> tuple[PeerStream, str]:
        d = self.dialer
        assert d.open_circuit is not None and relay.key is not None
        async with asyncio.timeout(d.circuit_timeout):
            circuit, leftover = await d.open_circuit((relay.host, relay.port), relay.key)
        owned: socket.socket | None = circuit
        try:
            ip = d.public_ip()
            if ip is not None:
                punched = await punch_as_dialer(circuit, leftover, ip)
                if punched is not None:
                    try:
                        stream = await self._session_on(punched, addr)
                    except (OSError, ProtocolError, TimeoutError) as exc:
                        log.debug("punched connection failed its handshake: %s", exc)
                    else:
                        return stream, PUNCHED if d.is_private() else DIRECT
            if not fallback:
                raise ProtocolError(f"no punch through {relay.host}:{relay.port}")
            owned = None  # the stream owns the circuit from here
            return await self._session_on(circuit, addr), RELAYED
        finally:
            if owned is not None:
                owned.close()

    async def _session_on(self, sock: socket.socket, addr: ProviderAddr) -> PeerStream:
        stream = await open_peer_on(
            sock,
            self.dialer.identity,
            self.group_id,
            self.content_id,
            access_key=self._access_key(),
            handshake_timeout=self.handshake_timeout,
            read_timeout=self.read_timeout,
        )
        await _check_key(stream, addr)
        return stream

    # -- racing ---------------------------------------------------------------------

    async def _first(
        self, tries: list[tuple[AddressKind, tuple[float, Try]]]
    ) -> tuple[PeerStream, str]:
        """The first try to succeed; try ``i`` starts at its offset, or as soon as try
        ``i - 1`` failed. Raises the first failure's error if every try failed."""
        if not tries:
            raise OSError("the provider gave no address we can use")
        failed = [asyncio.Event() for _ in tries]

        async def run(i: int) -> tuple[PeerStream, str]:
            at, attempt = tries[i][1]
            if i > 0 and at > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(at):
                        await failed[i - 1].wait()
            try:
                return await attempt()
            except BaseException:
                failed[i].set()
                raise

        tasks = [asyncio.ensure_future(run(i)) for i in range(len(tries))]
        winner: tuple[PeerStream, str] | None = None
        try:
            pending = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task in done and not task.cancelled() and task.exception() is None:
                        winner = task.result()
                        break
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, tuple) and result is not winner:
                    await result[0].aclose()
        if winner is not None:
            return winner
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        raise OSError("no route to the provider")


async def _check_key(stream: PeerStream, addr: ProviderAddr) -> None:
    """The handshake authenticated ``addr.peer_key``, or the stream is closed and this
    is a ``ProtocolError`` (an address or relay that leads to someone else)."""
    if stream.peer_key != addr.peer_key:
        await stream.aclose()
        raise ProtocolError("the address leads to another peer")


class CircuitHandler(Protocol):
    """What ``circuit_handler`` makes: ``(sock, leftover)`` or ``(sock, leftover, source)``."""

    def __call__(
        self, sock: socket.socket, leftover: bytes, source: tuple[str, int] | None = None, /
    ) -> Awaitable[None]: ...


def circuit_handler(
    adopt: Adopt,
    listening: Callable[[], tuple[str, int]],
    public_ip: Callable[[], str | None],
) -> CircuitHandler:
    """The provider's side of each circuit a relay opens to us (``RelayKeeper``'s
    ``on_circuit``): answer the dialer's punch from beside our peer listener
    (``listening()``: its address), then hand every connection to ``adopt``
    (``PeerServer.adopt``); see ``reach/aio/punch.punch_as_listener``. ``source``: the
    dialer's address as the relay saw it (its ``Incoming``): the punch dials that IP
    only (``None``: not known, so the offered addresses are not filtered by IP)."""

    async def on_circuit(
        sock: socket.socket, leftover: bytes, source: tuple[str, int] | None = None
    ) -> None:
        host, port = listening()
        bind = "" if host in ("", "0.0.0.0", "::") else host
        outcome = await punch_as_listener(
            sock,
            leftover,
            port,
            public_ip(),
            adopt,
            bind_host=bind,
            source_ip=None if source is None else source[0],
        )
        log.debug("circuit: %s", outcome)

    return on_circuit
