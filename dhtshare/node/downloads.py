"""The node's downloads: start, persist, resume after a restart, report, and turn into shares.

This is glue between the services: providers come from the file service (the DHT), the
membership check from the group service, and pieces are served through the share registry
while the download runs (swarming). It imports neither ``node`` nor ``cli``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiofiles.os

from dhtshare.atomic import read_json, write_json
from dhtshare.errors import DhtError, DhtshareError, FileShareError, StoreError
from dhtshare.files.service import FileService
from dhtshare.home import Home
from dhtshare.identity import Identity
from dhtshare.node.dialer import Dialer
from dhtshare.reach.punch import upgrade_delay
from dhtshare.records import FileEntry, Provider
from dhtshare.store.partial import free_name, read_owner
from dhtshare.tasks import spawn_logged
from dhtshare.transfer.aio.download import Download, DownloadOptions, FileInfo, no_access_key
from dhtshare.transfer.ratelimit import TokenBucket
from dhtshare.transfer.share import AccessKey, MemberCheck, Share, ShareRegistry
from dhtshare.transfer.status import Complete, DownloadStatus, Failed, Paused
from dhtshare.transfer.swarm import ProviderAddr

__all__ = ["DownloadManager", "Handle"]

log = logging.getLogger(__name__)
PROGRESS_EVERY = 0.5


@dataclass
class Handle:
    """One download this node knows: its description, the worker, and its task.

    ``kept``: it runs in the background (started with ``--no-wait``, kept after a
    Ctrl-C, or resumed after a restart), so it goes on when a waiting ``get`` goes
    away; ``waiters`` counts the ``get`` commands waiting on it now; ``cancelled``:
    ``DownloadManager.cancel`` stopped it.
    """

    info: FileInfo
    out_dir: Path
    download: Download
    task: asyncio.Task[Path] | None = None
    kept: bool = False
    waiters: int = 0
    cancelled: bool = False
    announced: bool = False  # a partial provider record was published

    def status(self) -> DownloadStatus:
        return self.download.status()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def report(self) -> dict[str, Any]:
        """The status as ``downloads --json`` shows it, with the file's group and content id."""
        return {
            **self.status().to_json(),
            "group_id": self.info.group_id.hex(),
            "content_id": self.info.content_id.hex(),
        }

    def to_json(self) -> dict[str, Any]:
        i = self.info
        return {
            "group_id": i.group_id.hex(),
            "content_id": i.content_id.hex(),
            "name": i.name,
            "size": i.size,
            "piece_size": i.piece_size,
            "out_dir": str(self.out_dir),
            "state": self.status().state,
            "final": self.status().to_json(),
        }


class DownloadManager:
    """Every download of one node, persisted in ``home.downloads``.

    ``access_key(group_id)``: the group's current access key, which every connection to
    a provider proves (``None``: the node holds none, and a download cannot start)."""

    def __init__(
        self,
        home: Home,
        identity: Identity,
        files: FileService,
        is_member: MemberCheck,
        registry: ShareRegistry,
        on_complete: Callable[[Share], None],
        options: DownloadOptions | None = None,
        download_limit: float | None = None,
        dialer: Dialer | None = None,
        *,
        access_key: AccessKey,
    ) -> None:
        self.home, self.identity, self.files = home, identity, files
        self.access_key = access_key
        self.is_member, self.registry, self.on_complete = is_member, registry, on_complete
        self.options = options or DownloadOptions()
        # How providers are reached (direct, punched, relayed); None: their main address only.
        self.dialer = dialer
        self._starting = asyncio.Lock()  # claims of output names, one at a time
        self.handles: dict[bytes, Handle] = {}
        self._finished: dict[bytes, dict[str, Any]] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        # One bucket for every download: the limit is the node's, not each download's.
        self.bucket = TokenBucket(download_limit, now=time.monotonic())

    # ---- starting ----------------------------------------------------------------

    def _providers(self, info: FileInfo) -> Callable[[], Awaitable[list[ProviderAddr]]]:
        async def providers() -> list[ProviderAddr]:
            try:
                records = await self.files.providers(info.group_id, info.content_id, self.is_member)
            except DhtError:
                return []
            out = []
            for rec in records:
                body = rec.payload()
                if isinstance(body, Provider) and rec.signer != self.identity.public:
                    out.append(ProviderAddr(rec.signer, body.host, body.port, body.addresses))
            return out

        return providers

    def _announce(self, info: FileInfo) -> Callable[[bytes], None]:
        def first_piece(_cid: bytes) -> None:
            handle = self.handles.get(info.content_id)
            if handle is not None:
                handle.announced = True
            what = "announcing a partial download"
            spawn_logged(self._announce_partial(info), self._announcing, what, logger=log)

        return first_piece

    async def _announce_partial(self, info: FileInfo) -> None:
        try:
            await self.files.announce_provider(info.group_id, info.content_id, complete=False)
        except DhtError as exc:  # the download goes on; republishing retries
            log.warning("could not announce %s as a provider yet: %s", info.name, exc.message)

    def _build(self, info: FileInfo, out_dir: Path) -> Handle:
        self.home.resume_dir.mkdir(parents=True, exist_ok=True)
        dialer = None
        if self.dialer is not None:
            opts = self.options
            dialer = self.dialer.for_file(
                info.group_id,
                info.content_id,
                handshake_timeout=opts.connect_timeout,
                read_timeout=opts.read_timeout,
            )
        download = Download(
            self.identity,
            info,
            out_dir,
            providers=self._providers(info),
            is_member=self.is_member,
            access_key=self.access_key,
            shares=self.registry,
            state_path=self.home.resume(info.content_id),
            on_first_piece=self._announce(info),
            options=self.options,
            bucket=None if self.bucket.unlimited else self.bucket,
            dial=dialer.dial if dialer is not None else None,
            upgrade=dialer.upgrade if dialer is not None else None,
            upgrade_delay=upgrade_delay if dialer is not None else None,
        )
        return Handle(info, out_dir, download)

    async def start(
        self, group_id: bytes, entry: FileEntry, out_dir: Path, *, keep: bool = False
    ) -> Handle:
        """Start (or return the running) download of ``entry`` into ``out_dir``.

        A download of the same file already running into another directory is not
        moved nor doubled: ``FileShareError`` says where it goes. ``keep``: it goes on
        in the background when no ``get`` waits for it (see ``wait``). One start at a
        time: two ``get``s of different files with one name then pick two names.
        """
        async with self._starting:
            return await self._start(group_id, entry, out_dir, keep)

    async def _start(self, group_id: bytes, entry: FileEntry, out_dir: Path, keep: bool) -> Handle:
        running = self._running(entry.content_id, out_dir)
        if running is not None:
            running.kept |= keep
            return running
        if self.access_key(group_id) is None:
            raise no_access_key(entry.name)
        held = self.registry.get(group_id, entry.content_id)
        if held is not None and held.complete:
            raise FileShareError(
                f"you already have {entry.name} at {held.path}", "it is shared from there"
            )
        info = FileInfo.of(entry)  # entries come from list_files: entry.group_id == group_id
        try:
            await aiofiles.os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create {out_dir}: {exc.strerror}", "choose another --out"
            ) from exc
        handle = await self._claim(info, out_dir)
        if not await aiofiles.os.path.exists(handle.download.part_path):
            await _check_free_space(out_dir, info.size)
        running = self._running(entry.content_id, out_dir)  # started while we waited
        if running is not None:
            running.kept |= keep
            return running
        handle.kept = keep
        self.handles[info.content_id] = handle
        self._finished.pop(info.content_id, None)
        self._run(handle)
        self.save()
        return handle

    def _running(self, content_id: bytes, out_dir: Path) -> Handle | None:
        """The running download of ``content_id``, if it goes into ``out_dir``."""
        handle = self.handles.get(content_id)
        if handle is None or not handle.running:
            return None
        if Path(out_dir) != handle.out_dir:
            name, where = handle.download.final_path.name, handle.out_dir
            raise FileShareError(
                f"{name} is already downloading into {where}",
                f"wait for it there with: dhtshare get GROUP FILE --out {where}; or cancel it"
                f" with: dhtshare downloads cancel {handle.info.content_id.hex()[:16]}",
            )
        return handle

    async def _claim(self, info: FileInfo, out_dir: Path) -> Handle:
        """A download of ``info`` under an output name no other download owns.

        One owner per output path: the name is the file's own unless another download
        of this node holds it, or a file of that name or its ``.part`` exists (the
        user's, or another program's), in which case it is ``name (1).ext`` and so
        on; the ``.part`` file this download created before keeps its name.
        """
        handle = self._build(info, out_dir)
        taken = {
            path
            for cid, h in self.handles.items()
            if cid != info.content_id and h.status().state != "complete"
            for path in (h.download.final_path, h.download.part_path)
        }
        owner = await asyncio.to_thread(read_owner, handle.download.owner_path)
        name = await asyncio.to_thread(free_name, out_dir, info.name, taken, owner)
        if name == handle.download.final_path.name:
            return handle
        return self._build(replace(info, name=name), out_dir)

    def _run(self, handle: Handle) -> None:
        handle.task = asyncio.ensure_future(handle.download.run())
        handle.task.add_done_callback(lambda t: self._ended(handle, t))

    def _ended(self, handle: Handle, task: asyncio.Task[Path]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            info, path = handle.info, task.result()
            share = self.registry.get(info.group_id, info.content_id)
            hashes = share.hashes if share else handle.download.swarm.hashes or ()
            shared = Share(
                info.group_id, info.content_id, path, info.layout, hashes, name=info.name
            )
            self.on_complete(shared)
        elif not isinstance(exc, DhtshareError):
            log.error("download of %s crashed", handle.info.name, exc_info=exc)
        self.save()

    async def wait(
        self, handle: Handle, progress: Callable[[Handle], Awaitable[None]]
    ) -> DownloadStatus:
        """Report progress until the download ends; its error if it failed.

        If ``progress`` fails because the waiting client went away (a ``get`` killed
        or interrupted without asking to keep the download), the download is
        cancelled unless it is ``kept`` or another ``get`` still waits for it: a
        download nobody asked for never runs on silently. A download cancelled or
        paused while we wait is a ``FileShareError`` saying so.
        """
        assert handle.task is not None
        handle.waiters += 1
        try:
            while not handle.task.done():
                await progress(handle)
                await asyncio.wait([handle.task], timeout=PROGRESS_EVERY)
        except (ConnectionError, asyncio.IncompleteReadError):
            if handle.waiters == 1 and not handle.kept:
                log.info("the get of %s went away: cancelling it", handle.info.name)
                await self.cancel(handle.info.content_id)
            raise
        finally:
            handle.waiters -= 1
        name = handle.download.final_path.name
        if handle.cancelled:
            raise FileShareError(f"the download of {name} was cancelled")
        if handle.task.cancelled():
            raise FileShareError(
                f"the download of {name} paused: the node is stopping",
                "it resumes when the node starts again",
            )
        exc = handle.task.exception()
        if exc is not None:
            raise exc
        return handle.status()

    # ---- cancelling, clearing ----------------------------------------------------

    def find(self, ref: str) -> list[Handle]:
        """Downloads whose name, file name or content id (a prefix of 6+ digits) is ``ref``."""
        text = ref.strip().lower()
        named = [
            h for h in self.handles.values() if ref in (h.info.name, h.download.final_path.name)
        ]
        if named:
            return named
        return [
            h
            for h in self.handles.values()
            if len(text) >= 6 and h.info.content_id.hex().startswith(text)
        ]

    async def cancel(self, content_id: bytes) -> Handle:
        """Stop the download of ``content_id`` and forget it: its ``.part`` file and
        resume state are deleted, it is no longer served or announced, and a restart
        does not resume it. A complete download is refused (its file is a share)."""
        handle = self.handles.get(content_id)
        if handle is None:
            raise FileShareError("no such download", "list them with: dhtshare downloads")
        if handle.status().state == "complete":
            raise FileShareError(
                f"{handle.download.final_path.name} is complete, there is nothing to cancel",
                "remove the row with: dhtshare downloads clear; stop serving it with:"
                " dhtshare unshare GROUP FILE",
            )
        handle.cancelled = True
        del self.handles[content_id]
        if handle.task is not None and not handle.task.done():
            handle.task.cancel()
            await asyncio.gather(handle.task, return_exceptions=True)
        self.save()
        share = handle.download.share
        info = handle.info
        if share is not None and self.registry.get(info.group_id, content_id) is share:
            self.registry.remove(info.group_id, content_id)
        await handle.download.discard()
        if handle.announced:
            try:
                await self.files.unshare(info.group_id, content_id)
            except DhtshareError as exc:  # the record expires by itself
                log.warning("could not withdraw the partial %s: %s", info.name, exc.message)
        log.info("cancelled the download of %s", info.name)
        return handle

    def clear(self) -> list[Handle]:
        """Forget every complete and failed download (rows only: no file is deleted;
        a failed download's ``.part`` stays, so ``get`` again resumes it)."""
        ended = [h for h in self.handles.values() if h.status().state in ("complete", "failed")]
        for handle in ended:
            del self.handles[handle.info.content_id]
        if ended:
            self.save()
        return ended

    # ---- listing, persistence ----------------------------------------------------

    def statuses(self) -> list[DownloadStatus]:
        return [h.status() for h in self.handles.values()]

    def reports(self) -> list[dict[str, Any]]:
        """Every download as ``downloads --json`` shows it (without the group's name)."""
        return [h.report() for h in self.handles.values()]

    def save(self) -> None:
        docs = [h.to_json() for h in self.handles.values()]
        try:
            write_json(self.home.downloads, docs)
        except OSError as exc:
            log.error("cannot save downloads: %s", exc)

    async def resume(self) -> None:
        """Restart every download that was running or paused when the node stopped."""
        try:
            docs = read_json(self.home.downloads)
        except (OSError, ValueError):
            return
        for doc in docs:
            try:
                info = FileInfo(
                    bytes.fromhex(doc["group_id"]),
                    bytes.fromhex(doc["content_id"]),
                    str(doc["name"]),
                    int(doc["size"]),
                    int(doc["piece_size"]),
                )
                out_dir = Path(doc["out_dir"])
                if doc.get("state") in ("downloading", "paused"):
                    handle = await self._claim(info, out_dir)
                else:
                    handle = self._build(info, out_dir)
                    handle.download.mark_ended(_restored(doc))
            except (KeyError, ValueError, TypeError, OSError, DhtshareError) as exc:
                log.warning("cannot resume a download: %s", exc)
                continue
            self.handles[info.content_id] = handle
            if not handle.download.ended:
                handle.kept = True  # nobody waits for a resumed download
                self._run(handle)

    async def pause_all(self) -> None:
        tasks = [h.task for h in self.handles.values() if h.task is not None and not h.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.save()


async def _check_free_space(folder: Path, size: int) -> None:
    """Refuse a download that cannot fit, before fetching anything."""
    try:
        fs = await aiofiles.os.statvfs(folder)
    except OSError:
        return  # unknown: the write itself will report a full disk
    free = fs.f_bavail * fs.f_frsize
    if free < size:
        raise StoreError(
            f"disk full: {folder} has {free:,} bytes free, the file needs {size:,}",
            "free some space or choose another --out",
        )


def _restored(doc: dict[str, Any]) -> DownloadStatus:
    """The saved final status of a download that ended before the restart."""
    final = doc.get("final") or {}
    base = (
        str(final.get("name", doc["name"])),
        int(doc["size"]),
        int(final.get("bytes_done", 0)),
        str(final.get("path", "")),
        dict(final.get("sources", {})),
        dict(final.get("routes", {})),
    )
    if doc.get("state") == "complete":
        return Complete(*base, seconds=float(final.get("seconds", 0)))
    if doc.get("state") == "failed":
        return Failed(*base, error=str(final.get("error", "")), hint=str(final.get("hint", "")))
    return Paused(*base)
