"""The composition root: one node builds every part, owns every task, knows the state dir.

A node is a DHT node (UDP) and a peer server (TCP) on the same port, the group, file and
transfer services on top, and the state directory that makes a restart resume everything
(``home.Home`` names each of its files: key, DHT contacts, groups, shares and their piece
hashes, downloads and their resume state, settings, the control socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhtshare.atomic import read_hashes, read_json, write_hashes, write_json
from dhtshare.content import FileLayout
from dhtshare.dht.server import DhtNode
from dhtshare.errors import DhtError, DhtshareError, GroupError, NodeError, StoreError
from dhtshare.files.liveness import Liveness
from dhtshare.files.service import FileService
from dhtshare.groups.service import GroupService, GroupState
from dhtshare.home import Home
from dhtshare.identity import Identity
from dhtshare.node import control, settings
from dhtshare.node.commands import Commands
from dhtshare.node.dialer import Dialer, circuit_handler
from dhtshare.node.downloads import DownloadManager
from dhtshare.node.netaddr import choose_advertised, local_address_toward
from dhtshare.reach.aio.reachability import ReachabilityService
from dhtshare.reach.aio.relay import RelayKeeper, RelayKey, RelayServer, open_circuit
from dhtshare.reach.autonat import ReachState, Verdict
from dhtshare.records import AddressKind, PeerAddress
from dhtshare.tasks import spawn_logged
from dhtshare.text import plural
from dhtshare.transfer.aio.download import DownloadOptions
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share, ShareRegistry

__all__ = ["Node", "NodeConfig"]

log = logging.getLogger(__name__)
PORT_ATTEMPTS = 20
ADVERTISE_PROBES = 3  # DHT contacts tried for the local address to advertise
MISS_REFRESH = 3.0  # seconds between roster refreshes caused by a membership check
WITHDRAW_TIMEOUT = 5.0  # seconds a clean stop spends withdrawing its provider records
STALE_ROUNDS = 1.5
"""A group's membership goes stale (and the node serves nobody in it) when its roster was
last read in full more than this many maintenance intervals ago. Every round refreshes it,
so on a healthy DHT it is never older than about one interval; a removal the node cannot
read takes effect within ``STALE_ROUNDS`` intervals of the last good read, so within two
intervals of the removal."""


@dataclass(frozen=True)
class NodeConfig:
    """How to run a node. ``identity`` set directly (simulations) skips the key file."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 0
    bootstrap: tuple[tuple[str, int], ...] = ()
    passphrase: bytes | None = None
    identity: Identity | None = None
    upload_limit: float | None = None  # bytes/s
    download_limit: float | None = None  # bytes/s
    maintenance_interval: float = 30.0  # also the unit of the membership bound (STALE_ROUNDS)
    provider_timeout: float = DownloadOptions().provider_timeout  # fail: nobody serves this long
    advertise: str | None = None  # the host peers should connect to, if not ``host``
    control: bool = True  # serve the control socket
    log_level: str = "info"  # what node.log keeps (kept across restarts: settings.py)
    relay: bool = True  # relay for private nodes once found public (``--no-relay``: False)
    ksize: int = 20
    clock: Callable[[], float] = time.time  # what the group service reads (tests move it)


def read_state(path: Path, default: Any) -> Any:
    """The JSON state file ``path``, ``default`` if it is missing; ``NodeError`` if damaged."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise NodeError(f"state file {path} is damaged", "restore it or delete it") from exc


class Node:
    """A running dhtshare node. Build it with ``await Node.start(config)``."""

    def __init__(
        self, config: NodeConfig, identity: Identity, dht: DhtNode, server: PeerServer
    ) -> None:
        self.config, self.home, self.identity = config, Home(config.home), identity
        self.dht, self.server = dht, server
        self.registry = server.shares
        self.groups = GroupService(
            dht,
            identity,
            self._load_group_state(),
            clock=config.clock,
            max_age=STALE_ROUNDS * config.maintenance_interval,
        )
        self.files = FileService(
            self.groups.sealed,
            identity,
            lambda: self.advertised,
            more_addresses=lambda: self.more_addresses(),
        )
        self.liveness = Liveness(self._answers, lambda: self.advertised)
        # reachability: ``.state`` (verdict, observed address); started after the join
        self.reachability = ReachabilityService(
            dht, extra_peers=lambda: config.bootstrap, own=self._own_dht_addresses
        )
        # relays: we relay while public (unless --no-relay); we hold reservations while private
        self.relay_server = RelayServer(own_addresses=self._seen_public) if config.relay else None
        local = None if config.host in ("", "0.0.0.0", "::") else config.host
        self.keeper = RelayKeeper(
            RelayKey.generate(),  # never the identity: relays must not learn who we are
            self._relay_candidates,
            circuit_handler(server.adopt, lambda: server.address, self.public_ip),
            on_change=self._relays_changed,
            local=local,
        )
        self._keeping: asyncio.Task[Any] | None = None
        self._announced_more: tuple[PeerAddress, ...] = ()  # more_addresses last announced
        self._warned_no_relay = False
        self._keeping_since = 0.0  # monotonic time the keeper started
        self._readdressing = asyncio.Lock()
        self.reachability.add_listener(self._reach_changed)
        self.downloads = DownloadManager(
            self.home,
            identity,
            self.files,
            self.is_member,
            self.registry,
            self._completed,
            DownloadOptions(
                provider_timeout=config.provider_timeout,
                repoll_interval=min(DownloadOptions().repoll_interval, config.provider_timeout),
            ),
            download_limit=config.download_limit,
            access_key=self.groups.access_key,
            dialer=Dialer(
                identity,
                access_key=self.groups.access_key,
                key_refused=self._refresh_soon,
                open_circuit=functools.partial(open_circuit, local=local),
                public_ip=self.public_ip,
                is_private=lambda: self.reachability.state.verdict is not Verdict.PUBLIC,
            ),
        )
        self.shares: dict[tuple[bytes, bytes], Share] = {}
        self.stopped = asyncio.Event()
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._control: asyncio.Server | None = None
        self._refreshed: dict[bytes, float] = {}  # gid -> monotonic time of a miss refresh
        self._reported_stale: set[bytes] = set()  # groups whose staleness was logged
        self._routes: dict[str, str | None] = {}  # host -> our local address toward it
        self._members_seen: dict[bytes, dict[bytes, str]] = {}  # what the log last said

    # ---- start and stop ----------------------------------------------------------

    @classmethod
    async def start(cls, config: NodeConfig) -> Node:
        """Open the state dir, bind UDP+TCP, bootstrap, resume shares and downloads."""
        home = Home(config.home)
        home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if config.control and await control.answering(control.socket_path(home)):
            raise NodeError(
                f"a node is already running for {home.root}",
                "stop it first with: dhtshare node stop",
            )
        identity = config.identity or Identity.load(home.identity, config.passphrase)
        registry = ShareRegistry(
            lambda gid, key: node.is_member(gid, key), lambda: node.groups.access_keys()
        )
        dht, server = await _bind(config, home, identity, registry)
        node = cls(config, identity, dht, server)
        if config.control:  # the next start tries this port first, with these settings
            with contextlib.suppress(OSError):
                write_json(home.address, node.address_info())
        try:
            await node._join()
            await node._refresh_groups()
            node._members_seen = node._membership()
            await node._resume()
            node._spawn(node.server.serve(), "peer server")
            node.reachability.attach(node.server)  # UDP and TCP dial-backs reach it
            node._spawn(node.reachability.run(), "reachability")
            node._spawn(node._maintain_forever(), "maintenance")
            if config.control:
                node._control = await control.serve(
                    control.prepare_socket(home), Commands(node).handle
                )
                with contextlib.suppress(OSError):
                    settings.save(home, node.settings())
        except BaseException:
            await node.close()
            raise
        node._log_started()
        return node

    # ---- relays ------------------------------------------------------------------

    @property
    def relays(self) -> list[tuple[str, int]]:
        """Relays holding a reservation for us now."""
        return self.keeper.relays

    def _seen_public(self) -> list[tuple[str, int]]:
        """Where others reach us, verified (a Reserve names it: a relay behind a router
        that forwards the port is not reached at its socket's address)."""
        state = self.reachability.state
        if state.verdict is Verdict.PUBLIC and state.observed is not None:
            return [state.observed]
        return []

    def relay_addresses(self) -> tuple[PeerAddress, ...]:
        """Our relays as provider-record addresses (``AddressKind.RELAY``, each with the
        keeper's relay key: what a downloader names in ``Connect``); none once the keeper
        is stopped (public), even while its reservations are still closing."""
        if self._keeping is None:
            return ()
        key = self.keeper.key.public
        return tuple(PeerAddress(AddressKind.RELAY, host, port, key) for host, port in self.relays)

    def more_addresses(self) -> tuple[PeerAddress, ...]:
        """What our provider records add to the advertised address: the public address
        others dialled us back on (when it is another one, e.g. a host behind a router
        that forwards the port; only at our own port number, so a lie about our address
        cannot point downloaders at a third party's service), then our relays."""
        state = self.reachability.state
        seen = state.observed if state.verdict is Verdict.PUBLIC else None
        advertised = self.advertised
        if seen is None or seen == advertised or seen[1] != advertised[1]:
            return self.relay_addresses()
        return (PeerAddress(AddressKind.DIRECT, *seen), *self.relay_addresses())

    def _own_dht_addresses(self) -> tuple[tuple[str, int], ...]:
        """Where our DHT socket listens as far as we know: the advertised host, its port."""
        return ((self.advertised[0], self.dht.address[1]),)

    def public_ip(self) -> str | None:
        """Our address as others see it: the one peers in most networks observed (at least
        two agreeing, ``reach/autonat.py``), else a relay's view."""
        observed = self.reachability.state.observed
        if observed is not None:
            return observed[0]
        return next((host for host, _ in self.keeper.observed.values()), None)

    def _relay_candidates(self) -> list[tuple[str, int]]:
        """Where to ask for a reservation: DHT contacts (all public: private nodes stay out
        of routing tables), TCP on their UDP port number; then the bootstrap nodes."""
        contacts = [(str(n.ip), int(n.port)) for n in self.dht.contacts()]
        return contacts + [a for a in self.config.bootstrap if a not in contacts]

    def _reach_changed(self, state: ReachState) -> None:
        """Relay while public; hold reservations while private."""
        public = state.verdict is Verdict.PUBLIC
        relay = self.relay_server
        self.server.relay_handler = relay.handle if public and relay is not None else None
        if state.verdict is Verdict.PRIVATE and self._keeping is None:
            self._keeping = spawn_logged(self.keeper.run(), self._tasks, "relay keeper", logger=log)
            self._keeping_since = time.monotonic()
        elif public and self._keeping is not None:
            self._keeping.cancel()
            self._keeping = None
        more = self.more_addresses()
        if more != self._announced_more:  # a public address learnt, relays dropped
            self._announced_more = more
            self._spawn(self._readdress(), "re-announce with new addresses")

    def _relays_changed(self) -> None:
        if self._keeping is None or self._keeping.cancelling():
            return  # stopping: the records are withdrawn or readdressed as public
        log.info("relays holding a reservation for us: %s", _addresses(self.relays) or "none")
        self._spawn(self._readdress(), "re-announce with new relays")

    async def _readdress(self) -> None:
        try:
            async with self._readdressing:  # one at a time: each compares with what is out
                await self.files.readdress()
        except DhtshareError as exc:  # republishing carries the new addresses later
            log.warning("could not announce our new relays yet: %s", exc.message)

    def settings(self) -> settings.Settings:
        """What the next ``node start`` reuses when not told otherwise."""
        c = self.config
        return {
            "upload_limit": c.upload_limit,
            "download_limit": c.download_limit,
            "log_level": c.log_level,
            "bootstrap": [list(address) for address in c.bootstrap],
        }

    def _log_started(self) -> None:
        host, port = self.address
        log.info(
            "node %s (%s) started: listening on %s:%d, advertising %s:%d; %s, %s, %s, %s;"
            " log level %s",
            self.identity.id,
            self.identity.name,
            host,
            port,
            *self.advertised,
            plural(self.dht.contact_count(), "DHT contact"),
            plural(len(self.groups.state.groups), "group"),
            plural(len(self.shares), "share"),
            plural(len(self.downloads.statuses()), "download"),
            self.config.log_level,
        )

    async def _join(self) -> None:
        """Join through ``--bootstrap`` and the saved contacts that answered (``_open_dht``)."""
        saved = [(str(n.ip), int(n.port)) for n in self.dht.contacts()]
        seeds = list(self.config.bootstrap) + [a for a in saved if a != self.address]
        found = 0
        if seeds:
            found = await self.dht.bootstrap(seeds)
            if found == 0 and self.config.bootstrap:
                where = ", ".join(f"{h}:{p}" for h, p in self.config.bootstrap)
                raise NodeError(
                    f"no bootstrap node answered at {where}",
                    "check the address and that its UDP port is open: dhtshare ping HOST:PORT",
                )
        if found == 0 and self.dht.contact_count() == 0:
            why = "no --bootstrap and no saved contacts"
            if seeds or self.home.dht.exists():
                why = "no saved contact answered"
            log.warning(
                "not connected to any node: %s; others can join through this node, but"
                " publishing fails until one does (start with --bootstrap HOST:PORT)",
                why,
            )

    async def _refresh_groups(self) -> None:
        """Fetch every roster once, so membership checks answer right after a restart."""
        state = self.groups.state
        for gid in sorted(set(state.groups) | set(state.drafts)):
            with contextlib.suppress(DhtshareError):
                await self.groups.refresh(gid)

    def is_member(self, group_id: bytes, key: bytes) -> bool:
        """Membership from the cached roster (no for everyone once it is stale: see
        ``STALE_ROUNDS``). A miss, or a hit on a roster older than half a maintenance
        interval, refreshes that roster in the background (at most every few seconds), so a
        member accepted a moment ago is served on retry and a removed one that keeps asking is
        refused within one interval of its removal (half an interval of age, plus a lookup)."""
        member = self.groups.is_member(group_id, key)
        age = self.groups.age(group_id)
        if not member or age is None or age >= self.config.maintenance_interval / 2:
            self._refresh_soon(group_id)
        return member

    def _refresh_soon(self, group_id: bytes) -> None:
        """Refresh ``group_id`` in the background (at most every ``MISS_REFRESH`` s): a
        membership miss, an old roster, or a provider that could not open our handshake
        (the group moved to an epoch we have not followed: the refresh follows it, and the
        download's next try proves the new access key)."""
        if group_id not in self.groups.state.groups:
            return
        now = time.monotonic()
        if now - self._refreshed.get(group_id, -MISS_REFRESH) >= MISS_REFRESH:
            self._refreshed[group_id] = now
            self._spawn(self._refresh_quietly(group_id), "roster refresh")

    def stale_groups(self) -> dict[bytes, float]:
        """My groups whose membership is stale (group id -> since when, unix time): the
        node serves nobody in them until a roster refresh succeeds."""
        out = {}
        for gid in self.groups.state.groups:
            since = self.groups.stale_since(gid)
            if since is not None:
                out[gid] = since
        return out

    def _report_stale(self) -> None:
        """Log each group that went stale or recovered since the last report."""
        stale = self.stale_groups()
        for gid, since in stale.items():
            if gid not in self._reported_stale:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
                log.warning(
                    "roster of %s stale since %s (refresh failing), not serving it",
                    self.groups.state.name_of(gid) or gid.hex()[:16],
                    when,
                )
        for gid in self._reported_stale - set(stale):
            log.info("roster of %s fresh again, serving it", self.groups.state.name_of(gid))
        self._reported_stale = set(stale)

    def _report_no_relay(self) -> None:
        """Warn once while we are private and hold no relay: nobody outside our network
        can reach us (once the keeper has looked for one for a maintenance interval)."""
        stranded = (
            self.reachability.state.verdict is Verdict.PRIVATE
            and self._keeping is not None
            and time.monotonic() - self._keeping_since >= self.config.maintenance_interval
            and not self.relays
        )
        if stranded and not self._warned_no_relay:
            log.warning(
                "behind a router and no relay holds a reservation for us: members outside"
                " this network cannot download from us (a bootstrap node started with"
                " --relay, or a public member, relays)"
            )
        self._warned_no_relay = stranded

    async def _refresh_quietly(self, group_id: bytes) -> None:
        with contextlib.suppress(DhtshareError):
            await self.groups.refresh(group_id)

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        spawn_logged(coro, self._tasks, what, logger=log)

    async def close(self) -> None:
        """Stop everything: sharing stops (provider records withdrawn), downloads pause,
        state is saved."""
        if self._control is not None:
            self._control.close()
        await self.downloads.pause_all()
        await self._withdraw_providers()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.server.close()
        self.save_state()
        if self.config.control:  # what we held for others comes back on the next start
            with contextlib.suppress(OSError):
                self.dht.save_records(self.home.held_records)
        await self.dht.aclose()
        log.info("node %s stopped; state saved", self.identity.id)
        with contextlib.suppress(Exception):
            control.remove_socket(self.home)
        self.stopped.set()

    async def _withdraw_providers(self) -> None:
        """Tell the DHT this node serves nothing any more, so ``files`` stops counting it
        (bounded: a stop never waits on the DHT for long; ``_resume`` re-announces)."""
        with contextlib.suppress(TimeoutError, DhtshareError):
            async with asyncio.timeout(WITHDRAW_TIMEOUT):
                await self.files.withdraw_providers()

    async def _answers(self, address: tuple[str, int]) -> bool:
        """Whether ``address`` answers a DHT ping (the DHT's RPC timeout bounds it)."""
        if not self.dht.running:
            return False
        return await self.dht.ping(address)

    def request_stop(self) -> None:
        """Ask the process running this node to stop it (the control ``stop`` command)."""
        self.stopped.set()

    # ---- state -------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def advertised(self) -> tuple[str, int]:
        """Where peers reach our peer server: ``--advertise``, a specific ``--host``, or
        (listening on every interface) the local address toward the bootstrap node or a
        DHT contact (``netaddr.choose_advertised``)."""
        _host, port = self.address
        contacts = [(str(n.ip), int(n.port)) for n in self.dht.contacts()[:ADVERTISE_PROBES]]
        host = choose_advertised(
            self.config.host,
            self.config.advertise,
            [*self.config.bootstrap, *contacts],
            self._local_toward,
        )
        return host, port

    def _local_toward(self, host: str, port: int) -> str | None:
        if host not in self._routes:
            if len(self._routes) >= 64:
                self._routes.clear()
            self._routes[host] = local_address_toward(host, port)
        return self._routes[host]

    def address_info(self) -> dict[str, Any]:
        host, port = self.address
        return {
            "host": host,
            "port": port,
            "advertised": "{}:{}".format(*self.advertised),
            "id": self.identity.id,
            "dht_contacts": self.dht.contact_count(),
        }

    def _load_group_state(self) -> GroupState:
        doc = read_state(self.home.groups, None)
        return GroupState() if doc is None else GroupState.from_json(doc)

    def save_state(self) -> None:
        """Write groups, shares, downloads and DHT contacts (each atomically)."""
        if self.config.identity is not None and not self.config.control:
            return  # simulated nodes keep nothing
        try:
            write_json(self.home.groups, self.groups.state.to_json())
            shares = self.shares.values()
            served = [_share_doc(s, self.registry.get(s.group_id, s.content_id)) for s in shares]
            write_json(self.home.shares, served)
            self.downloads.save()
            self.dht.save_state(self.home.dht)
        except OSError as exc:
            log.error("could not save node state: %s", exc)

    async def _resume(self) -> None:
        """Serve every saved share again and restart unfinished downloads."""
        for doc in read_state(self.home.shares, []):
            try:
                shared = _shared_from(doc, self.home)
                self._serve(shared, doc)
                self._spawn(self._announce(shared), "re-announce")
            except (KeyError, ValueError, OSError, DhtshareError) as exc:
                log.warning("cannot resume share %s: %s", doc.get("name"), exc)
        await self.downloads.resume()

    async def _announce(self, shared: Share) -> None:
        try:
            await self.files.announce(shared)
        except DhtError as exc:  # republishing retries it; say so once
            log.warning("could not announce %s yet: %s", shared.name, exc.message)

    async def _maintain_forever(self) -> None:
        """One maintenance round per interval; a round that fails (even on a bug that a
        hostile record reached) is logged and the next one runs, since membership goes
        stale, and the node stops serving, without rounds."""
        while True:
            await asyncio.sleep(self.config.maintenance_interval)
            try:
                await self.maintain()
            except Exception:
                log.exception("maintenance round failed; the next one runs as usual")

    async def maintain(self) -> None:
        """Join again if every contact is gone; apply leaves, take over handed groups,
        refresh rosters, save state."""
        try:
            await self._rejoin_if_alone()
            await self.groups.maintain()
            for gid in list(self.groups.state.groups):
                with contextlib.suppress(DhtshareError):
                    await self.groups.refresh(gid)
            await self.dht.republish()
        except DhtshareError as exc:
            log.warning("maintenance: %s", exc)
        self._log_membership()
        self._report_stale()
        self._report_no_relay()
        self.save_state()

    async def _rejoin_if_alone(self) -> None:
        """A node that lost every DHT contact (its bootstrap node was down a while, its
        router forgot it) joins again through ``--bootstrap``, then stores its own records
        again at once: the nodes that held them may have restarted empty."""
        if self.dht.contact_count() > 0 or not self.config.bootstrap:
            return
        if await self.dht.bootstrap(list(self.config.bootstrap)):
            log.info("joined the DHT again through %s", _addresses(list(self.config.bootstrap)))
            self.reachability.retest()  # the network around us may have changed
            await self.dht.republish_all()

    def _membership(self) -> dict[bytes, dict[bytes, str]]:
        """My groups and their members (key -> name), as last read."""
        return {
            gid: {m.key: m.name for m in self.groups.members(gid)}
            for gid in self.groups.state.groups
        }

    def _log_membership(self) -> None:
        """Log the groups I joined or left, and who joined or left them, since last time."""
        before, after = self._members_seen, self._membership()
        self._members_seen = after
        for gid in after.keys() - before.keys():
            count = plural(len(after[gid]), "member")
            log.info("joined group %s: %s", self.group_label(gid), count)
        for gid in before.keys() - after.keys():
            log.info("no longer a member of group %s", self.group_label(gid))
        for gid in after.keys() & before.keys():
            old, new = before[gid], after[gid]
            for key in new.keys() - old.keys():
                log.info("%s (%s) joined group %s", new[key], key.hex()[:16], self.group_label(gid))
            for key in old.keys() - new.keys():
                log.info("%s (%s) left group %s", old[key], key.hex()[:16], self.group_label(gid))

    # ---- sharing -----------------------------------------------------------------

    def group_label(self, group_id: bytes) -> str:
        """``name (id prefix)`` of a group, for the log (the formatter cleans the name)."""
        return f"{self.groups.state.name_of(group_id) or '?'} ({group_id.hex()[:16]})"

    def _completed(self, shared: Share) -> None:
        """A download finished: keep serving it as a complete share and say so in the DHT."""
        log.info(
            "download of %s (%s) in group %s complete and verified: %s",
            shared.name,
            shared.content_id.hex()[:16],
            self.group_label(shared.group_id),
            shared.path,
        )
        _save_hashes(self.home, shared.content_id, shared.hashes)
        self._serve(shared)
        self._spawn(self._announce(shared), "announce completed download")
        self.save_state()

    def _serve(self, shared: Share, doc: dict[str, Any] | None = None) -> None:
        """Serve ``shared``, keeping what was uploaded of it so far (from the share it
        replaces, e.g. the download that just completed, or from its saved ``doc``)."""
        old = self.registry.get(shared.group_id, shared.content_id)
        self.shares[shared.group_id, shared.content_id] = self.registry.add(shared)
        if old is not None:
            shared.uploaded, shared.served_to = old.uploaded, set(old.served_to)
        elif doc is not None:
            shared.uploaded, shared.served_to = _upload_stats(doc)

    def upload_stats(self, group_id: bytes, content_id: bytes) -> tuple[int, int]:
        """Bytes of a share uploaded, and to how many peers, since it was first shared."""
        share = self.registry.get(group_id, content_id)
        return (share.uploaded, len(share.served_to)) if share is not None else (0, 0)

    async def share(
        self,
        group_id: bytes,
        path: Path,
        progress: Callable[[int, int], Awaitable[None] | None] | None = None,
    ) -> Share:
        """Hash ``path`` and share it with the group; it is served at once."""
        self.require_member(group_id)
        shared = await self.files.share(group_id, path, progress)
        _save_hashes(self.home, shared.content_id, shared.hashes)
        self._serve(shared)
        self.save_state()
        log.info(
            "sharing %s (%s, %d bytes) in group %s from %s",
            shared.name,
            shared.content_id.hex()[:16],
            shared.size,
            self.group_label(group_id),
            shared.path,
        )
        return shared

    async def unshare(self, group_id: bytes, content_id: bytes) -> None:
        shared = self.shares.pop((group_id, content_id), None)
        self.registry.remove(group_id, content_id)
        await self.files.unshare(group_id, content_id)
        self.save_state()
        log.info(
            "stopped sharing %s (%s) in group %s",
            shared.name if shared else "?",
            content_id.hex()[:16],
            self.group_label(group_id),
        )

    def require_member(self, group_id: bytes) -> None:
        if not self.groups.is_member(group_id, self.identity.public):
            if group_id in self.stale_groups():
                raise GroupError(
                    "this group's roster could not be read from the DHT lately, so membership"
                    " cannot be checked",
                    "check the node's DHT contacts with: dhtshare node status; then retry",
                )
            raise GroupError(
                "you are not a member of this group", "ask its owner: dhtshare group join GROUP"
            )


async def _bind(
    config: NodeConfig, home: Home, identity: Identity, registry: ShareRegistry
) -> tuple[DhtNode, PeerServer]:
    """UDP and TCP on the same port. Without ``--port``, the port of the last run comes
    first (peers and routing tables still know it); else retry port 0 until one is free
    for both."""
    saved = _saved_port(home) if config.port == 0 else 0
    if saved:
        with contextlib.suppress(NodeError):
            return await _bind_port(config, home, saved, identity, registry)
    for _ in range(PORT_ATTEMPTS - 1 if config.port == 0 else 0):
        with contextlib.suppress(NodeError):
            return await _bind_port(config, home, 0, identity, registry)  # TCP port taken
    return await _bind_port(config, home, config.port, identity, registry)


def _addresses(addresses: list[tuple[str, int]]) -> str:
    return ", ".join(f"{host}:{port}" for host, port in addresses)


def _saved_port(home: Home) -> int:
    try:
        port = int(read_state(home.address, {}).get("port", 0))
    except (NodeError, AttributeError, TypeError, ValueError):
        return 0
    return port if 0 < port < 65536 else 0


async def _bind_port(
    config: NodeConfig, home: Home, port: int, identity: Identity, registry: ShareRegistry
) -> tuple[DhtNode, PeerServer]:
    try:
        dht = await _open_dht(config, home, port)
    except OSError as exc:
        raise NodeError(
            f"cannot listen on {config.host}:{port} (UDP): {exc.strerror}",
            "choose another --port, or stop the program using it",
        ) from exc
    server = PeerServer(
        identity, config.host, dht.address[1], shares=registry, upload_rate=config.upload_limit
    )
    try:
        await server.start()
    except NodeError:
        await dht.aclose()
        raise
    return dht, server


async def _open_dht(config: NodeConfig, home: Home, port: int) -> DhtNode:
    """The DHT node, listening on ``port``: the last run's (``DhtNode.load_state``: its id,
    and its saved contacts that answer a ping) if ``home.dht`` is usable, else a new one."""
    if home.dht.exists():
        with contextlib.suppress(DhtError):
            dht = await DhtNode.load_state(home.dht, port, config.host)
            dht.load_records(home.held_records)
            return dht
    dht = DhtNode(config.ksize)
    try:
        await dht.listen(port, config.host)
    except OSError:
        await dht.aclose()
        raise
    return dht


def _share_doc(s: Share, served: Share | None) -> dict[str, Any]:
    doc = {
        "group_id": s.group_id.hex(),
        "content_id": s.content_id.hex(),
        "name": s.name,
        "path": str(s.path),
        "size": s.size,
        "piece_size": s.piece_size,
    }
    if served is not None:
        doc["uploaded"] = served.uploaded
        doc["served_to"] = sorted(k.hex() for k in served.served_to)
    return doc


def _upload_stats(doc: dict[str, Any]) -> tuple[int, set[bytes]]:
    """What a saved share says was uploaded; anything malformed counts as nothing."""
    uploaded = doc.get("uploaded", 0)
    peers = doc.get("served_to", [])
    if not isinstance(uploaded, int) or isinstance(uploaded, bool) or uploaded < 0:
        uploaded = 0
    keys: set[bytes] = set()
    if isinstance(peers, list):
        for text in peers:
            with contextlib.suppress(TypeError, ValueError):
                key = bytes.fromhex(text)
                if len(key) == 32:
                    keys.add(key)
    return uploaded, keys


def _save_hashes(home: Home, content_id: bytes, hashes: tuple[bytes, ...]) -> None:
    home.hashes_dir.mkdir(exist_ok=True)
    write_hashes(home.hashes(content_id), hashes)


def load_hashes(home: Home, content_id: bytes) -> tuple[bytes, ...]:
    hashes = read_hashes(home.hashes(content_id))
    if hashes is None:
        raise StoreError(
            f"piece hashes of {content_id.hex()[:16]} are missing or damaged",
            "share the file again",
        )
    return hashes


def _shared_from(doc: dict[str, Any], home: Home) -> Share:
    cid = bytes.fromhex(doc["content_id"])
    path = Path(doc["path"])
    if not path.is_file() or path.stat().st_size != int(doc["size"]):
        raise StoreError(f"{path} is gone or changed", "share it again")
    layout = FileLayout(int(doc["size"]), int(doc["piece_size"]))
    gid = bytes.fromhex(doc["group_id"])
    return Share(gid, cid, path, layout, load_hashes(home, cid), name=str(doc["name"]))
