"""Control-socket commands: resolve what the user typed, call the node, return JSON-able data.

GROUP is a group id (or a unique prefix of one) or a name unique among my groups and the groups
I asked to join (pending or rejected); MEMBER is a member id or a unique display name; FILE is
a content id (or unique prefix) or a file name unique in the group. Every failure is a
``DhtshareError`` with a hint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dhtshare.dht.server import DhtNode
from dhtshare.errors import (
    DhtshareError,
    FileShareError,
    GroupError,
    IdentityError,
    NodeError,
    StaleRosterError,
)
from dhtshare.files.liveness import Liveness
from dhtshare.files.service import FileService, ListedFile
from dhtshare.groups.secrets import Invite
from dhtshare.groups.service import GroupService
from dhtshare.identity import Identity, format_id, parse_id
from dhtshare.node import eventlog
from dhtshare.node.control import Progress
from dhtshare.node.downloads import DownloadManager
from dhtshare.node.settings import Settings
from dhtshare.reach.aio.reachability import ReachabilityService
from dhtshare.transfer.aio.serve import PeerServer
from dhtshare.transfer.share import Share

__all__ = ["COMMANDS", "Commands", "NodeApi"]


class NodeApi(Protocol):
    """What the commands use of a running node (``node.service.Node`` is one). The node
    imports this module, never the other way round."""

    identity: Identity
    dht: DhtNode
    server: PeerServer
    groups: GroupService
    files: FileService
    liveness: Liveness
    downloads: DownloadManager
    shares: dict[tuple[bytes, bytes], Share]
    started_at: float
    reachability: ReachabilityService

    @property
    def relays(self) -> list[tuple[str, int]]: ...

    @property
    def address(self) -> tuple[str, int]: ...

    @property
    def advertised(self) -> tuple[str, int]: ...

    def settings(self) -> Settings: ...

    def stale_groups(self) -> dict[bytes, float]: ...

    def group_label(self, group_id: bytes) -> str: ...

    def upload_stats(self, group_id: bytes, content_id: bytes) -> tuple[int, int]: ...

    def require_member(self, group_id: bytes) -> None: ...

    def save_state(self) -> None: ...

    def request_stop(self) -> None: ...

    async def share(
        self,
        group_id: bytes,
        path: Path,
        progress: Callable[[int, int], Awaitable[None] | None] | None = None,
    ) -> Share: ...

    async def unshare(self, group_id: bytes, content_id: bytes) -> None: ...


Handler = Callable[..., Awaitable[Any]]
"""A command's method: ``(commands, progress=..., **args)``, its result JSON-able."""
COMMANDS: dict[str, Handler] = {}
"""Every control command by the name the CLI sends (``group.create``), filled once by
``@command`` as the class below is defined."""
H = TypeVar("H", bound=Handler)


def command(name: str) -> Callable[[H], H]:
    """Register the decorated method as the handler of command ``name``."""

    def register(handler: H) -> H:
        assert name not in COMMANDS, name
        COMMANDS[name] = handler
        return handler

    return register


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _unique(
    matches: list[Any], what: str, ref: str, hint: str, ids: Callable[[Any], str] | None = None
) -> Any:
    """The one match; else ``GroupError`` (for several, naming each by ``ids`` if given)."""
    if not matches:
        raise GroupError(f"unknown {what}: {ref}", hint)
    if len(matches) > 1:
        which = f": {', '.join(sorted(ids(m) for m in matches))}" if ids else ""
        raise GroupError(
            f"{what} {ref!r} is ambiguous ({len(matches)} match){which}",
            "use the id (or a unique prefix of it)" if ids else "use the full id",
        )
    return matches[0]


class Commands:
    """Answers control requests for one node."""

    def __init__(self, node: NodeApi) -> None:
        self.node = node

    async def handle(self, cmd: str, args: dict[str, Any], progress: Progress) -> Any:
        handler = COMMANDS.get(cmd)
        if handler is None:
            raise NodeError(f"unknown command {cmd!r}", "is the CLI the same version as the node?")
        try:
            result = await handler(self, progress=progress, **args)
        except DhtshareError as exc:
            eventlog.command_failed(cmd, args, exc.message)
            raise
        eventlog.command_done(cmd, args, result, self.node.group_label)
        return result

    # ---- resolving names ---------------------------------------------------------

    async def group(self, ref: str) -> bytes:
        """Resolve ``ref`` (see the module doc) and refresh that group's roster.

        A name not found among my groups may belong to a request accepted since the last
        maintenance round, so pending requests are checked once before giving up. The roster
        is fetched again so that membership answers (mine and other peers') are current, and a
        group handed over to me is taken over now (``GroupService.claim``), so I can act as
        its owner at once.
        """
        try:
            gid = self._lookup(ref)
        except GroupError:
            if not await self._settle_requests():
                raise
            gid = self._lookup(ref)
        before = self._group_keys()
        try:
            await self.node.groups.claim(gid)
        except StaleRosterError:
            raise
        except GroupError:
            pass  # unreachable for now: answer from the last verified roster
        self._save_if_changed(before)  # e.g. took the group over: keep the new owner's draft
        return gid

    def _group_keys(self) -> tuple[frozenset[bytes], ...]:
        state = self.node.groups.state
        return frozenset(state.groups), frozenset(state.requested), frozenset(state.drafts)

    def _save_if_changed(self, before: tuple[frozenset[bytes], ...]) -> None:
        if self._group_keys() != before:
            self.node.save_state()

    async def _settle_requests(self) -> bool:
        """Turn accepted join requests into groups; True if any did."""
        state = self.node.groups.state
        before = set(state.groups)
        for gid in list(state.requested):
            try:
                await self.node.groups.status(gid)
            except StaleRosterError:
                raise
            except GroupError:
                continue
        if set(state.groups) == before:
            return False
        self.node.save_state()
        return True

    def _lookup(self, ref: str) -> bytes:
        """A group id from an id, a unique id prefix, or a unique name among my groups."""
        state = self.node.groups.state
        known = set(state.groups) | set(state.requested)
        text = ref.strip().lower()
        by_invite = [g for g in known if state.keys.get(g) and state.keys[g].invite == ref.strip()]
        if by_invite:
            return by_invite[0]
        if len(text) == 64:
            try:
                return bytes.fromhex(text)
            except ValueError:
                pass
        by_name = [g for g in known if state.name_of(g) == ref]
        if by_name:
            return bytes(_unique(by_name, "group", ref, "", lambda g: g.hex()[:12]))
        by_prefix = [g for g in known if len(text) >= 6 and g.hex().startswith(text)]
        return bytes(_unique(by_prefix, "group", ref, "list yours with: dhtshare group list"))

    async def require_member(self, gid: bytes) -> None:
        """``GroupError`` unless I am a member; a requester learns where its request stands."""
        node = self.node
        keys = node.groups.state.keys.get(gid)
        if keys is not None and keys.removed:
            raise GroupError(
                "you were removed from this group: it moved to keys you do not hold",
                "ask the owner for an invite, then: dhtshare group join INVITE",
            )
        if node.groups.is_member(gid, node.identity.public):
            return
        if gid in node.groups.state.requested:
            status, reason = await node.groups.status(gid)
            if status == "rejected":
                raise GroupError(
                    f"the owner rejected your request to join{': ' + reason if reason else ''}",
                    "ask the owner, then: dhtshare group join GROUP",
                )
            if status == "pending":
                raise GroupError(
                    "your request to join is still pending", "wait until the owner accepts it"
                )
        node.require_member(gid)

    async def member(self, gid: bytes, ref: str, *, pending: bool = False) -> tuple[bytes, str]:
        """A member (or requester) key and name from an id or a unique display name."""
        people = [(m.key, m.name) for m in self.node.groups.members(gid)]
        if pending:
            people += [(r.requester, r.name) for r in await self.node.groups.requests(gid)]
        try:
            key = parse_id(ref)
            return key, next((n for k, n in people if k == key), "")
        except IdentityError:
            pass
        named = list({k: n for k, n in people if n == ref}.items())
        where = "group requests" if pending else "group members"
        listed = f"list them with: dhtshare {where} GROUP"
        return tuple(_unique(named, "member", ref, listed, lambda m: format_id(m[0])[:12]))

    async def file(self, gid: bytes, ref: str) -> ListedFile:
        files = await self.node.files.list_files(gid, self.node.groups.is_member)
        by_name = [f for f in files if f.entry.name == ref]
        if len(by_name) == 1:
            return by_name[0]
        text = ref.lower()
        by_id = [f for f in files if len(text) >= 6 and f.entry.content_id.hex().startswith(text)]
        if not by_id and not by_name:
            raise FileShareError(
                f"no file {ref!r} in this group", "list them with: dhtshare files GROUP"
            )
        if len(by_id) != 1:
            raise FileShareError(f"file {ref!r} is ambiguous", "use its content id")
        return by_id[0]

    # ---- node --------------------------------------------------------------------

    @command("status")
    async def cmd_status(self, progress: Progress) -> dict[str, Any]:
        node = self.node
        host, port = node.address
        return {
            "id": node.identity.id,
            "name": node.identity.name,
            "pid": os.getpid(),
            "address": f"{host}:{port}",
            "advertised": "{}:{}".format(*node.advertised),
            "uptime_s": round(time.time() - node.started_at),
            **node.settings(),  # upload_limit, download_limit, log_level
            "dht_contacts": node.dht.contact_count(),
            "reachability": node.reachability.state.verdict.value,
            "public_address": node.reachability.state.public_address,
            "relays": [f"{host}:{port}" for host, port in node.relays],
            "groups": len(node.groups.state.groups),
            "shares": len(node.shares),
            "downloads": len(node.downloads.statuses()),
            "peer_connections": node.server.connections,
            "stale_groups": _stale_groups(node.stale_groups()),
            "counters": {"dht": node.dht.stats.snapshot(), "peers": node.server.stats.snapshot()},
        }

    @command("stop")
    async def cmd_stop(self, progress: Progress) -> dict[str, Any]:
        self.node.request_stop()
        return {"stopping": True, "pid": os.getpid()}

    # ---- groups ------------------------------------------------------------------

    @command("group.create")
    async def cmd_group_create(
        self, progress: Progress, name: str, public: bool = False
    ) -> dict[str, Any]:
        groups = self.node.groups
        gid = await groups.create(name, public=public)
        self.node.save_state()
        invite = groups.state.keys[gid].invite
        return {"group_id": gid.hex(), "name": groups.state.name_of(gid), "invite": invite}

    @command("group.invite")
    async def cmd_group_invite(
        self, progress: Progress, group: str, rotate: bool = False
    ) -> dict[str, Any]:
        """The group's invite (owner only); ``rotate`` replaces it."""
        gid = self._lookup(group)
        invite = await self.node.groups.invite(gid, rotate=rotate)
        self.node.save_state()
        return {"group_id": gid.hex(), "invite": invite}

    @command("group.join")
    async def cmd_group_join(
        self, progress: Progress, group: str, message: str = ""
    ) -> dict[str, Any]:
        invite = await self._joinable(group)
        gid = await self.node.groups.request_join(invite, message)
        self.node.save_state()
        status, _ = await self.node.groups.status(gid)
        self.node.save_state()
        return {"group_id": gid.hex(), "status": status}

    async def _joinable(self, ref: str) -> str:
        """The invite ``ref`` is, or the invite of the public group ``ref`` names."""
        try:
            Invite.parse(ref)
            return ref.strip()
        except GroupError:
            pass
        listed = [
            g.invite
            for g in await self.node.groups.directory()
            if g.name == ref or g.group_id.hex() == ref.strip().lower()
        ]
        return str(_unique(listed, "group", ref, "paste the invite the owner gave you"))

    @command("group.leave")
    async def cmd_group_leave(self, progress: Progress, group: str) -> dict[str, Any]:
        """Leave (or cancel a request); my shares in the group stop, and stay stopped."""
        gid = self._lookup(group)
        name = self.node.groups.state.name_of(gid)
        stopped = await self._stop_shares(gid)  # while I hold the keys to withdraw entries
        gone = await self.node.groups.leave(gid)
        self.node.save_state()
        heir = gone.heir
        return {
            "group_id": gid.hex(),
            "name": name,
            "outcome": gone.outcome,
            "new_owner": format_id(heir.key) if heir else "",
            "new_owner_name": heir.name if heir else "",
            "stopped_shares": stopped,
        }

    @command("group.forget")
    async def cmd_group_forget(self, progress: Progress, group: str) -> dict[str, Any]:
        """Drop a group or request from my list without telling anyone (e.g. a group that
        no longer exists); my shares in it stop. A group I own must be left instead."""
        gid, state = self._lookup(group), self.node.groups.state
        if gid in state.drafts and gid in state.groups:
            raise GroupError(
                "you own this group: leaving it hands it on",
                "leave it with: dhtshare group leave GROUP",
            )
        if gid not in state.groups and gid not in state.requested:
            raise GroupError(f"unknown group: {group}", "list yours with: dhtshare group list")
        name = state.name_of(gid)
        stopped = await self._stop_shares(gid)  # while I hold the keys to withdraw entries
        self.node.groups.forget(gid)
        self.node.save_state()
        return {"group_id": gid.hex(), "name": name, "stopped_shares": stopped}

    async def _stop_shares(self, gid: bytes) -> list[str]:
        """Unshare everything I serve in ``gid``; the names, sorted."""
        mine = [s for (g, _), s in list(self.node.shares.items()) if g == gid]
        for shared in mine:
            await self.node.unshare(gid, shared.content_id)
        return sorted(s.name for s in mine)

    @command("group.requests")
    async def cmd_group_requests(self, progress: Progress, group: str) -> list[dict[str, Any]]:
        gid = await self.group(group)
        return [
            {
                "id": format_id(r.requester),
                "name": r.name,
                "message": r.message,
                "time": _when(r.issued),
                "time_ts": r.issued,
            }
            for r in await self.node.groups.requests(gid)
        ]

    async def _decide(
        self,
        group: str,
        member: str,
        decide: Callable[[bytes, bytes], Awaitable[object]],
        *,
        pending: bool,
    ) -> dict[str, Any]:
        """Resolve ``member`` (among requesters too if ``pending``) and ``decide`` on it."""
        gid = await self.group(group)
        key, name = await self.member(gid, member, pending=pending)
        await decide(gid, key)
        self.node.save_state()
        return {"id": format_id(key), "name": name}

    @command("group.accept")
    async def cmd_group_accept(self, progress: Progress, group: str, member: str) -> dict[str, Any]:
        return await self._decide(group, member, self.node.groups.accept, pending=True)

    @command("group.reject")
    async def cmd_group_reject(
        self, progress: Progress, group: str, member: str, reason: str = ""
    ) -> dict[str, Any]:
        reject = partial(self.node.groups.reject, reason=reason)
        return await self._decide(group, member, reject, pending=True)

    @command("group.remove")
    async def cmd_group_remove(self, progress: Progress, group: str, member: str) -> dict[str, Any]:
        return await self._decide(group, member, self.node.groups.remove, pending=False)

    @command("group.list")
    async def cmd_group_list(
        self, progress: Progress, directory: bool = False
    ) -> list[dict[str, Any]]:
        if directory:
            return [
                {
                    "group_id": g.group_id.hex(),
                    "name": g.name,
                    "members": g.members,
                    "owner": format_id(g.owner),
                    "invite": g.invite,
                }
                for g in await self.node.groups.directory()
            ]
        before = self._group_keys()
        rows = [
            {
                "group_id": g.group_id.hex(),
                "name": g.name,
                "role": g.role,
                "members": g.members,
                "reason": g.reason,
            }
            for g in await self.node.groups.my_groups()
        ]
        self._save_if_changed(before)  # a request accepted, a group taken over
        return rows

    @command("group.members")
    async def cmd_group_members(self, progress: Progress, group: str) -> list[dict[str, Any]]:
        gid = await self.group(group)
        view = await self.node.groups.claim(gid)
        return [
            {
                "id": format_id(m.key),
                "name": m.name,
                "since": _when(m.since),
                "since_ts": m.since,
                "role": "owner" if m.key == view.owner else "member",
            }
            for m in self.node.groups.members(gid)
        ]

    # ---- files -------------------------------------------------------------------

    @command("share")
    async def cmd_share(self, progress: Progress, group: str, path: str) -> dict[str, Any]:
        gid = await self.group(group)
        await self.require_member(gid)

        async def report(done: int, total: int) -> None:
            await progress({"done": done, "total": total})

        shared = await self.node.share(gid, Path(path), report)
        return {"content_id": shared.content_id.hex(), "name": shared.name, "size": shared.size}

    @command("files")
    async def cmd_files(self, progress: Progress, group: str) -> list[dict[str, Any]]:
        gid = await self.group(group)
        await self.require_member(gid)
        names = {m.key: m.name for m in self.node.groups.members(gid)}
        found = await self.node.files.list_files(gid, self.node.groups.is_member)
        live = await self.node.liveness.answered(a for f in found for a in f.addresses)
        return [
            {
                "content_id": f.entry.content_id.hex(),
                "name": f.entry.name,
                "size": f.entry.size,
                "sharer": format_id(f.sharer),
                "sharer_name": names.get(f.sharer, ""),
                "providers": f.providers,
                "online": sum(
                    1 for a, r in zip(f.addresses, f.relayed, strict=True) if r or a in live
                ),
                "shared": _when(f.shared_at),
            }
            for f in found
        ]

    @command("unshare")
    async def cmd_unshare(self, progress: Progress, group: str, file: str) -> dict[str, Any]:
        gid = await self.group(group)
        mine = [
            s
            for (g, _), s in self.node.shares.items()
            if g == gid and (s.name == file or s.content_id.hex().startswith(file.lower()))
        ]
        shared = _unique(mine, "shared file", file, "list your shares with: dhtshare shares")
        await self.node.unshare(gid, shared.content_id)
        return {"content_id": shared.content_id.hex(), "name": shared.name}

    @command("shares")
    async def cmd_shares(
        self, progress: Progress, group: str | None = None
    ) -> list[dict[str, Any]]:
        """What this node serves (in one group, or in all), with what it uploaded of each."""
        node = self.node
        gid = await self.group(group) if group else None
        out = []
        for (g, cid), shared in sorted(
            node.shares.items(), key=lambda kv: (node.groups.state.name_of(kv[0][0]), kv[1].name)
        ):
            if gid is not None and g != gid:
                continue
            uploaded, peers = node.upload_stats(g, cid)
            out.append(
                {
                    "name": shared.name,
                    "group_id": g.hex(),
                    "group": node.groups.state.name_of(g),
                    "size": shared.size,
                    "content_id": cid.hex(),
                    "path": str(shared.path),
                    "peers": peers,
                    "uploaded": uploaded,
                }
            )
        return out

    @command("get")
    async def cmd_get(
        self, progress: Progress, group: str, file: str, out: str, wait: bool = True
    ) -> dict[str, Any]:
        gid = await self.group(group)
        await self.require_member(gid)
        info = await self.file(gid, file)
        handle = await self.node.downloads.start(gid, info.entry, Path(out), keep=not wait)
        if not wait:
            return self._download_row(handle.report())
        await self.node.downloads.wait(handle, lambda h: progress(self._download_row(h.report())))
        return self._download_row(handle.report())

    def _download_row(self, report: dict[str, Any]) -> dict[str, Any]:
        """A download's report with its group's name (``""`` if this node forgot it)."""
        gid = bytes.fromhex(report["group_id"])
        return {**report, "group": self.node.groups.state.name_of(gid) or ""}

    @command("downloads")
    async def cmd_downloads(self, progress: Progress) -> list[dict[str, Any]]:
        return [self._download_row(r) for r in self.node.downloads.reports()]

    @command("downloads.cancel")
    async def cmd_downloads_cancel(self, progress: Progress, file: str) -> dict[str, Any]:
        """Cancel one download (FILE: its name or a content id prefix of 6+ digits)."""
        matches = self.node.downloads.find(file)
        if not matches:
            raise FileShareError(f"no download {file!r}", "list them with: dhtshare downloads")
        if len(matches) > 1:
            raise FileShareError(
                f"download {file!r} is ambiguous ({len(matches)} match)",
                "use its content id, from: dhtshare downloads --json",
            )
        row = self._download_row(matches[0].report())
        await self.node.downloads.cancel(matches[0].info.content_id)
        return row

    @command("downloads.clear")
    async def cmd_downloads_clear(self, progress: Progress) -> list[dict[str, Any]]:
        """Forget every complete and failed download; no file is deleted."""
        return [self._download_row(h.report()) for h in self.node.downloads.clear()]


def _stale_groups(stale: dict[bytes, float]) -> str:
    """Groups the node serves nobody in because their roster could not be read lately."""
    return (
        "; ".join(
            f"{gid.hex()[:16]} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}"
            for gid, at in sorted(stale.items())
        )
        or "none"
    )
