"""Pieces on disk: a sparse ``<name>.part`` file, written at offsets, finalized by rename.

Positional I/O (``os.pwrite`` / ``os.pread``) runs in a worker thread through
``asyncio.to_thread``. We use that rather than aiofiles' file objects: a piece
write is one positional call, so concurrent writes need no seek-then-write lock.
File-system metadata (directories, names) goes through ``aiofiles.os``.

A file takes its final name only in ``finalize()``, and never replaces an
existing file: the final name is created with ``os.link`` (which fails if the name
exists), then the ``.part`` name is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import unicodedata
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias, TypeVar

import aiofiles.os

from dhtshare.errors import StoreError
from dhtshare.store.atomic import fsync_dir

Buffer: TypeAlias = bytes | bytearray | memoryview
T = TypeVar("T")

__all__ = [
    "PART_SUFFIX",
    "BlockReader",
    "PartialFile",
    "read_block",
    "safe_name",
]

PART_SUFFIX = ".part"
FALLBACK_NAME = "download"
_NAME_MAX_BYTES = 255 - len(PART_SUFFIX)  # NAME_MAX on common file systems
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# EFBIG: a file-size limit (RLIMIT_FSIZE, a FAT32 volume) stops the download like a full disk
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})


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
    The newest pieces stay cached for the peers that fetch them from us.

    On the bench VM, which charges a host fault for every page it has not touched
    lately, recycling removed the slow runs: 32 of 32 downloads took 0.19-0.32 s of
    kernel time, against up to 0.93 s when each new piece was only advised once
    (docs/performance.md, round 4).
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


def _open_part(path: Path, size: int) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


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

    def __init__(self, fd: int, part_path: Path, final_path: Path, size: int) -> None:
        self._fd: int | None = fd
        self._cache = _CacheRecycler()
        self.part_path = part_path
        self.final_path = final_path
        self.size = size

    @classmethod
    async def open(cls, out_dir: Path, name: str, size: int) -> PartialFile:
        """Create or reopen ``<safe name>.part`` in ``out_dir``, sized to ``size`` bytes."""
        if size < 0:
            raise ValueError(f"negative file size {size}")
        final = Path(out_dir) / safe_name(name)
        part = final.with_name(final.name + PART_SUFFIX)
        try:
            await aiofiles.os.makedirs(out_dir, exist_ok=True)
            fd = await asyncio.to_thread(_open_part, part, size)
        except OSError as exc:
            raise _store_error(exc, "create", part) from exc
        return cls(fd, part, final, size)

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
