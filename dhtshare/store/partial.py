"""Pieces on disk: a sparse ``<name>.part`` file, written at offsets, finalized by rename.

Positional I/O (``os.pwrite`` / ``os.pread``) runs in a worker thread through
``asyncio.to_thread``. We use that rather than aiofiles' file objects: a piece
write is one positional call, so concurrent writes need no seek-then-write lock.
File-system metadata (directories, names) goes through ``aiofiles.os``.

A file takes its final name only in ``finalize()``, and never replaces an
existing file: the final name is created with ``os.link`` (which fails if the name
exists), then the ``.part`` name is removed.

One owner per output path. ``PartialFile.open`` creates ``<name>.part`` with
``O_CREAT | O_EXCL`` and never truncates, writes or renames a file it did not
create: to resume, it is given an *owner record* (a small JSON file beside the
download's resume state) that names the ``.part`` path and the device and inode it
had when this download created it; only a file with that identity is reopened.
``free_name`` picks, for a new download, the first of ``name``, ``name (1).ext``,
``name (2).ext``... whose final and ``.part`` names are free on disk and not taken
by another download of the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import stat
import unicodedata
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, TypeVar

import aiofiles.os

from dhtshare.atomic import fsync_dir, write_atomic
from dhtshare.errors import StoreError

Buffer: TypeAlias = bytes | bytearray | memoryview
T = TypeVar("T")

__all__ = [
    "PART_SUFFIX",
    "BlockReader",
    "PartOwner",
    "PartialFile",
    "free_name",
    "read_block",
    "read_owner",
    "safe_name",
]

PART_SUFFIX = ".part"
FALLBACK_NAME = "download"
_NAME_MAX_BYTES = 255 - len(PART_SUFFIX)  # NAME_MAX on common file systems
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# EFBIG: a file-size limit (RLIMIT_FSIZE, a FAT32 volume) stops the download like a full disk
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
MAX_NAME_TRIES = 1000
"""``free_name`` gives up after ``name (999).ext``."""


def safe_name(name: str) -> str:
    """Reduce a file name from the network to a safe basename.

    Keeps the last path component (``/`` and ``\\`` both separate), drops control,
    format and unassigned characters, trims spaces and limits the UTF-8 length.
    The result is never empty, ``.`` or ``..``, and has no separator.
    """
    text = unicodedata.normalize("NFC", name)
    text = "".join(c for c in text if unicodedata.category(c) not in _DROP_CATEGORIES)
    parts = [p for p in text.replace("\\", "/").split("/") if p.strip()]
    base = parts[-1].strip() if parts else ""
    base = _truncate_utf8(base, _NAME_MAX_BYTES).strip()
    if base in ("", ".", ".."):
        return FALLBACK_NAME
    return base


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def _store_error(exc: OSError, action: str, path: Path, keep: Path | None = None) -> StoreError:
    """Map an OSError to a one-line ``StoreError``; disk full gets its own message."""
    kept = f"; the partial download is kept as {keep}" if keep else ""
    if exc.errno in _FULL_ERRNOS:
        return StoreError(f"disk full while {action} {path}{kept}", "free some space, then resume")
    reason = exc.strerror or str(exc)
    return StoreError(
        f"cannot {action} {path}: {reason}{kept}", "check the path and its permissions"
    )


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]
        offset += written


async def _uninterrupted(work: Callable[[], T]) -> T:
    """``work()`` in a worker thread; if we are cancelled, first wait for it to end.

    A thread cannot be stopped, and ``work`` writes through our file descriptor: were
    the caller to close the file while it still ran, a later ``pwrite`` could land in
    whatever file reused that descriptor number.
    """
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the caller is gone, the error has no one to go to
        raise


KEEP_CACHED = 16 * 1024 * 1024
"""Bytes of the newest pieces left in the page cache: other peers ask for them next."""


def _dont_need(fd: int, offset: int, length: int) -> None:
    """``POSIX_FADV_DONTNEED`` on a range (Linux: start writeback of its dirty pages,
    drop its clean ones); elsewhere, or if refused, nothing happens."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class _CacheRecycler:
    """Keeps a download's page cache to its newest ``KEEP_CACHED`` bytes.

    A piece just written is advised at once, which starts its writeback (so the fsync
    before the final name has little left to wait for) but drops nothing: its pages
    are still dirty. Once ``KEEP_CACHED`` newer bytes have been written it is advised
    again; written back by then, its pages are dropped, and the kernel hands them
    straight back for the next writes instead of filling memory with the whole file.
    The newest pieces stay cached for the peers that fetch them from us. Pages that
    are reused cost less than fresh ones (measurements:
    docs/performance-history.md, round 4).
    """

    def __init__(self) -> None:
        self._recent: deque[tuple[int, int]] = deque()
        self._recent_bytes = 0

    def written(self, fd: int, offset: int, length: int) -> None:
        _dont_need(fd, offset, length)
        self._recent.append((offset, length))
        self._recent_bytes += length
        while self._recent_bytes > KEEP_CACHED:
            old_offset, old_length = self._recent.popleft()
            self._recent_bytes -= old_length
            _dont_need(fd, old_offset, old_length)


def _pread_cached(fd: int, offset: int, length: int) -> bytearray | None:
    """``length`` bytes at ``offset`` if the page cache holds them all, else ``None``.

    ``preadv`` with ``RWF_NOWAIT`` (Linux) never waits for the disk: it fails with
    ``EAGAIN`` or reads short instead. That saves a worker-thread hop per block when
    serving a file that is in memory, as a seeder's usually is (the hop costs about
    as much as copying the 256 KiB block). Elsewhere: always ``None``.
    """
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return None
    buf = bytearray(length)
    try:
        got = os.preadv(fd, [buf], offset, flag)
    except OSError:
        return None  # EAGAIN: not cached; EOPNOTSUPP: a file system without it
    return buf if got == length else None


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class PartOwner:
    """Which ``.part`` file a download created: its path and its identity on disk."""

    part: Path
    dev: int
    ino: int

    def to_json(self) -> str:
        return json.dumps({"part": str(self.part), "dev": self.dev, "ino": self.ino})

    def matches(self, st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (self.dev, self.ino)


def read_owner(path: Path) -> PartOwner | None:
    """The owner record at ``path``, or ``None`` if it is missing or damaged."""
    try:
        doc = json.loads(Path(path).read_text("utf-8"))
        part, dev, ino = doc["part"], doc["dev"], doc["ino"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not (isinstance(part, str) and isinstance(dev, int) and isinstance(ino, int)):
        return None
    return PartOwner(Path(part), dev, ino)


def owns(owner: PartOwner | None, part: Path) -> bool:
    """Whether ``part`` is, on disk now, the file ``owner`` records."""
    if owner is None or owner.part != part:
        return False
    try:
        return owner.matches(os.lstat(part))
    except OSError:
        return False


def _open_part(
    path: Path, size: int, owner: PartOwner | None, record: Path | None
) -> tuple[int, bool]:
    """``(fd, created)``: reopen the file ``owner`` records, or create a new one
    and record it at ``record``.

    A file at ``path`` that this download did not create raises ``FileExistsError``;
    it is never truncated. ``O_NONBLOCK``: opening a FIFO planted there must not hang.
    """
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if owner is not None and owner.part == path:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except FileNotFoundError:
            pass  # gone: start over under the same name
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symbolic link now: not the file we created
                raise FileExistsError(errno.EEXIST, "a symbolic link", str(path)) from exc
            raise
        else:
            try:
                st = os.fstat(fd)
                if not owner.matches(st):
                    raise FileExistsError(errno.EEXIST, "not created by this download", str(path))
                if st.st_size != size:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            return fd, False
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        if record is not None:
            st = os.fstat(fd)
            write_atomic(record, PartOwner(path, st.st_dev, st.st_ino).to_json().encode())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, True


async def _open_part_async(
    path: Path, size: int, owner: PartOwner | None, record: Path | None
) -> tuple[int, bool]:
    """``_open_part`` in a worker thread; if we are cancelled, it still ends and the
    file it opened is closed (the file and its record stay consistent)."""
    task = asyncio.ensure_future(asyncio.to_thread(_open_part, path, size, owner, record))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is None:
            os.close(task.result()[0])
        raise


def _candidates(name: str) -> list[str]:
    """``name``, then ``stem (1).ext`` ... ``stem (999).ext``, each a safe name."""
    base = safe_name(name)
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    out = [base]
    for n in range(1, MAX_NAME_TRIES):
        tag = f" ({n}){ext}"
        room = _NAME_MAX_BYTES - len(tag.encode("utf-8"))
        out.append(_truncate_utf8(stem, max(room, 1)).rstrip() + tag)
    return out


def free_name(
    out_dir: Path, name: str, taken: Collection[Path] = (), owner: PartOwner | None = None
) -> str:
    """The name a new download of ``name`` into ``out_dir`` should take (blocking I/O).

    The ``.part`` file ``owner`` records, if it is still that file and its final name
    is free, keeps its name (resume). Otherwise the first candidate (``name``,
    ``stem (1).ext``, ...) whose final and ``.part`` paths are neither in ``taken``
    (the final and ``.part`` paths of the node's other downloads) nor on disk.
    ``StoreError`` if none is free.
    """
    out_dir = Path(out_dir)
    if owner is not None and owner.part.parent == out_dir and owner.part.name.endswith(PART_SUFFIX):
        final = owner.part.with_name(owner.part.name[: -len(PART_SUFFIX)])
        free = final not in taken and owner.part not in taken and not os.path.lexists(final)
        if free and owns(owner, owner.part):
            return final.name
    for candidate in _candidates(name):
        final = out_dir / candidate
        part = final.with_name(candidate + PART_SUFFIX)
        if final in taken or part in taken or os.path.lexists(final) or os.path.lexists(part):
            continue
        return candidate
    raise StoreError(
        f"no free name for {safe_name(name)} in {out_dir}", "choose another --out directory"
    )


def _link_no_replace(src: Path, dst: Path) -> None:
    """Give ``src`` the name ``dst`` too; ``FileExistsError`` if ``dst`` exists."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        # No hard links here (e.g. FAT): claim the name exclusively, then replace our claim.
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(src, dst)


class PartialFile:
    """A download in progress: ``<name>.part`` in the output directory, sparse, of fixed size."""

    def __init__(
        self,
        fd: int,
        part_path: Path,
        final_path: Path,
        size: int,
        *,
        created: bool = True,
        owner_path: Path | None = None,
    ) -> None:
        self._fd: int | None = fd
        self._cache = _CacheRecycler()
        self.part_path = part_path
        self.final_path = final_path
        self.size = size
        self.created = created
        """True if ``open`` created the ``.part`` file (nothing in it is verified yet)."""
        self.owner_path = owner_path

    @classmethod
    async def open(
        cls, out_dir: Path, name: str, size: int, *, owner: Path | None = None
    ) -> PartialFile:
        """Create ``<safe name>.part`` in ``out_dir`` (``O_EXCL``), sized to ``size`` bytes.

        With ``owner`` (the path of this download's owner record), a ``.part`` file
        this download created earlier is reopened instead, and a new one is recorded
        there. A ``.part`` file it did not create is never touched: ``StoreError``.
        """
        if size < 0:
            raise ValueError(f"negative file size {size}")
        final = Path(out_dir) / safe_name(name)
        part = final.with_name(final.name + PART_SUFFIX)
        recorded = await asyncio.to_thread(read_owner, owner) if owner is not None else None
        try:
            await aiofiles.os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc, "create", part) from exc
        record = Path(owner) if owner is not None else None
        try:
            fd, created = await _open_part_async(part, size, recorded, record)
        except FileExistsError as exc:
            raise StoreError(
                f"{part} exists and this download did not create it; it is left as it is",
                f"move {part} away, or download into another --out directory",
            ) from exc
        except OSError as exc:
            raise _store_error(exc, "create", part) from exc
        return cls(fd, part, final, size, created=created, owner_path=record)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.part_path} is closed")
        return self._fd

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside file of {self.size} bytes")

    async def write_piece(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; disk full raises ``StoreError`` and keeps the file."""
        self._check_range(offset, len(data))
        fd = self._require_fd()
        try:
            await _uninterrupted(functools.partial(_pwrite_all, fd, data, offset))
        except OSError as exc:
            raise _store_error(exc, "writing", self.part_path, self.part_path) from exc

    async def write_pieces_if(
        self,
        pieces: Sequence[tuple[int, Buffer, Callable[[Buffer], bool]]],
    ) -> list[bool]:
        """For each ``(offset, data, check)``: run ``check(data)``; if true, write ``data``.

        All of it happens in one worker-thread call (one thread hop per batch, not two
        per piece); ``check`` should release the GIL (hashlib does for large buffers).
        Returns each check's result; a write error is a ``StoreError`` as in
        ``write_piece`` (pieces before it in the batch may have been written).
        """
        for offset, data, _ in pieces:
            self._check_range(offset, len(data))
        fd = self._require_fd()

        def work() -> list[bool]:
            results = []
            for offset, data, check in pieces:
                good = check(data)
                if good:
                    _pwrite_all(fd, memoryview(data), offset)
                    self._cache.written(fd, offset, len(data))
                results.append(good)
            return results

        try:
            return await _uninterrupted(work)
        except OSError as exc:
            raise _store_error(exc, "writing", self.part_path, self.part_path) from exc

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (holes read as zeros)."""
        self._check_range(offset, length)
        fd = self._require_fd()
        try:
            return await asyncio.to_thread(_pread_exact, fd, offset, length)
        except OSError as exc:
            raise _store_error(exc, "read", self.part_path) from exc

    async def sync(self) -> None:
        """Flush written pieces to disk (before saving resume state that trusts them)."""
        fd = self._require_fd()
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            raise _store_error(exc, "writing", self.part_path, self.part_path) from exc

    async def finalize(self) -> Path:
        """fsync, then give the file its final name; never replaces an existing file.

        If the final name is taken, raises ``StoreError`` and keeps the ``.part``
        file (still open, so ``finalize`` can be retried once the name is free).
        """
        await self.sync()
        try:
            await asyncio.to_thread(_link_no_replace, self.part_path, self.final_path)
        except FileExistsError as exc:
            raise StoreError(
                f"{self.final_path} already exists; the download is kept as {self.part_path}",
                f"move or rename {self.final_path}, then resume the download",
            ) from exc
        except OSError as exc:
            raise _store_error(exc, "create", self.final_path, self.part_path) from exc
        await self._drop_part_name()
        await self.close()
        if self.owner_path is not None:
            with contextlib.suppress(OSError):
                await aiofiles.os.unlink(self.owner_path)
        return self.final_path

    async def _drop_part_name(self) -> None:
        try:
            await aiofiles.os.unlink(self.part_path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the final name exists; a leftover .part link holds no extra data
        await asyncio.to_thread(fsync_dir, self.final_path.parent)

    async def close(self) -> None:
        """Close the file, keeping ``.part`` on disk (a later ``open`` resumes it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    async def __aenter__(self) -> PartialFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class BlockReader:
    """Keeps a shared file open for serving blocks from it."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self._fd: int | None = fd
        self.path = path
        self.size = size

    @classmethod
    async def open(cls, path: Path) -> BlockReader:
        """Open ``path`` read-only; ``StoreError`` if it cannot be opened."""
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _store_error(exc, "open", path) from exc
        size = (await asyncio.to_thread(os.fstat, fd)).st_size
        return cls(fd, path, size)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly ``length`` bytes at ``offset``; ``StoreError`` if the file got shorter.

        Bytes already in the page cache are read at once (``RWF_NOWAIT``); only a read
        that would wait for the disk goes to a worker thread.
        """
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        cached = _pread_cached(self._fd, offset, length)
        if cached is not None:
            return cached
        try:
            data = await asyncio.to_thread(_pread_exact, self._fd, offset, length)
        except OSError as exc:
            raise _store_error(exc, "read", self.path) from exc
        if len(data) != length:
            raise StoreError(
                f"{self.path} changed on disk (too short)", "share it again, or stop sharing it"
            )
        return data

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    async def __aenter__(self) -> BlockReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def read_block(path: Path, offset: int, length: int) -> bytes | bytearray:
    """Read one block from ``path`` (opens and closes it); see ``BlockReader``."""
    async with await BlockReader.open(path) as reader:
        return await reader.read(offset, length)
