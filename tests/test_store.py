"""Partial files, safe names and resume state (store/)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtshare.errors import StoreError
from dhtshare.store.partial import (
    BlockReader,
    PartialFile,
    _pread_cached,
    free_name,
    read_block,
    read_owner,
    safe_name,
)
from dhtshare.store.resume import ResumeState, load_or_new, read_state

CID = bytes(range(32))


async def test_pieces_out_of_order_then_finalize(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(10_000)
    pieces = [(off, data[off : off + 4096]) for off in range(0, len(data), 4096)]
    pf = await PartialFile.open(tmp_path, "movie.mkv", len(data))
    assert pf.part_path == tmp_path / "movie.mkv.part"
    assert pf.part_path.stat().st_size == len(data)
    for off, chunk in reversed(pieces):
        await pf.write_piece(off, chunk)
    assert await pf.read(4096, 10) == data[4096:4106]
    final = await pf.finalize()
    assert final == tmp_path / "movie.mkv"
    assert final.read_bytes() == data
    assert not pf.part_path.exists()
    assert pf.closed


async def test_reopen_keeps_written_pieces(tmp_path: Path) -> None:
    owner = tmp_path / "state" / "a.owner"
    owner.parent.mkdir()
    async with await PartialFile.open(tmp_path, "a.bin", 8, owner=owner) as pf:
        assert pf.created
        await pf.write_piece(4, b"WXYZ")
    async with await PartialFile.open(tmp_path, "a.bin", 8, owner=owner) as pf:
        assert not pf.created
        assert await pf.read(0, 8) == b"\0\0\0\0WXYZ"
        await pf.write_piece(0, b"abcd")
        await pf.finalize()
    assert (tmp_path / "a.bin").read_bytes() == b"abcdWXYZ"
    assert not owner.exists()  # the record goes with the .part name


async def test_a_part_file_the_download_did_not_create_is_never_touched(tmp_path: Path) -> None:
    mine = tmp_path / "notes.txt.part"
    mine.write_bytes(b"the user's own file")
    owner = tmp_path / "notes.owner"
    with pytest.raises(StoreError, match="did not create it") as info:
        await PartialFile.open(tmp_path, "notes.txt", 4, owner=owner)
    assert "move" in info.value.hint
    with pytest.raises(StoreError, match="did not create it"):
        await PartialFile.open(tmp_path, "notes.txt", 4)  # no owner record: create only
    assert mine.read_bytes() == b"the user's own file"
    assert not owner.exists() and not (tmp_path / "notes.txt").exists()


async def test_a_replaced_part_file_is_not_reopened(tmp_path: Path) -> None:
    # The .part this download created was swapped for another file of the same name.
    owner = tmp_path / "r.owner"
    async with await PartialFile.open(tmp_path, "r.bin", 4, owner=owner) as pf:
        await pf.write_piece(0, b"ours")
    part = tmp_path / "r.bin.part"
    part.unlink()
    keep = tmp_path / "keep"
    keep.write_bytes(b"someone else's")
    part.symlink_to(keep)
    with pytest.raises(StoreError, match="did not create it"):
        await PartialFile.open(tmp_path, "r.bin", 4, owner=owner)
    part.unlink()
    part.write_bytes(b"theirs, 5+")
    with pytest.raises(StoreError, match="did not create it"):
        await PartialFile.open(tmp_path, "r.bin", 4, owner=owner)
    assert part.read_bytes() == b"theirs, 5+" and keep.read_bytes() == b"someone else's"
    part.unlink()  # gone: the download starts over under its name
    async with await PartialFile.open(tmp_path, "r.bin", 4, owner=owner) as pf:
        assert pf.created and await pf.read(0, 4) == bytes(4)


def test_free_name_skips_every_name_in_use(tmp_path: Path) -> None:
    assert free_name(tmp_path, "a/x.tar.gz") == "x.tar.gz"
    (tmp_path / "x.tar.gz").write_bytes(b"")
    assert free_name(tmp_path, "x.tar.gz") == "x.tar (1).gz"
    (tmp_path / "x.tar (1).gz.part").write_bytes(b"")
    taken = {tmp_path / "x.tar (2).gz"}
    assert free_name(tmp_path, "x.tar.gz", taken) == "x.tar (3).gz"
    # Another download's final name "y.part" is this one's .part name: not free either.
    assert free_name(tmp_path, "y", {tmp_path / "y.part"}) == "y (1)"
    (tmp_path / ".hidden").symlink_to(tmp_path / "nowhere")
    assert free_name(tmp_path, ".hidden") == ".hidden (1)"
    long = "é" * 123 + ".bin"  # 250 bytes: the longest name kept whole
    (tmp_path / safe_name(long)).write_bytes(b"")
    second = free_name(tmp_path, long)
    assert second.endswith(" (1).bin") and len((second + ".part").encode()) <= 255
    assert second == safe_name(second)


async def test_free_name_keeps_the_part_file_this_download_created(tmp_path: Path) -> None:
    owner = tmp_path / "o.owner"
    (tmp_path / "v.bin.part").write_bytes(b"user")
    name = free_name(tmp_path, "v.bin", owner=read_owner(owner))
    assert name == "v (1).bin"
    async with await PartialFile.open(tmp_path, name, 2, owner=owner):
        pass
    (tmp_path / "v.bin.part").unlink()  # the first name is free again, but ours is (1)
    assert free_name(tmp_path, "v.bin", owner=read_owner(owner)) == "v (1).bin"


async def test_a_batch_writes_only_the_pieces_whose_check_passes(tmp_path: Path) -> None:
    async with await PartialFile.open(tmp_path, "b.bin", 12) as pf:
        checked: list[bytes] = []

        def check(data: bytes | bytearray | memoryview) -> bool:
            checked.append(bytes(data))
            return bytes(data) != b"bad!"

        results = await pf.write_pieces_if(
            [(0, b"good", check), (4, b"bad!", check), (8, b"fine", check)]
        )
        assert results == [True, False, True]
        assert checked == [b"good", b"bad!", b"fine"]
        assert await pf.read(0, 12) == b"good" + bytes(4) + b"fine"


async def test_a_cancelled_batch_finishes_its_writes_before_the_caller_moves_on(
    tmp_path: Path,
) -> None:
    # The worker thread cannot be stopped; the caller must not go on (and close the file
    # descriptor the thread writes through) until the thread is done.
    release = threading.Event()
    started = threading.Event()

    def slow_check(_data: bytes | bytearray | memoryview) -> bool:
        started.set()
        return release.wait(timeout=10)

    pf = await PartialFile.open(tmp_path, "c.bin", 4)
    task = asyncio.ensure_future(pf.write_pieces_if([(0, b"data", slow_check)]))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    for _ in range(20):  # loop turns, not time: enough for a cancellation to go through
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pf.read(0, 4) == b"data"  # the thread's write happened before we returned
    await pf.close()


async def test_write_outside_file_is_refused(tmp_path: Path) -> None:
    async with await PartialFile.open(tmp_path, "a.bin", 8) as pf:
        with pytest.raises(ValueError, match="outside"):
            await pf.write_piece(6, b"abc")


async def test_finalize_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(b"precious")
    pf = await PartialFile.open(tmp_path, "report.pdf", 3)
    await pf.write_piece(0, b"new")
    with pytest.raises(StoreError, match="already exists") as info:
        await pf.finalize()
    assert "move or rename" in info.value.hint
    assert (tmp_path / "report.pdf").read_bytes() == b"precious"
    assert (tmp_path / "report.pdf.part").read_bytes() == b"new"
    (tmp_path / "report.pdf").unlink()
    assert (await pf.finalize()).read_bytes() == b"new"


async def test_finalize_refuses_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "x").symlink_to(tmp_path / "elsewhere")
    pf = await PartialFile.open(tmp_path, "x", 1)
    with pytest.raises(StoreError, match="already exists"):
        await pf.finalize()
    await pf.close()
    assert not (tmp_path / "elsewhere").exists()


async def test_finalize_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    pf = await PartialFile.open(tmp_path, "f", 2)
    await pf.write_piece(0, b"ok")
    assert (await pf.finalize()).read_bytes() == b"ok"
    (tmp_path / "g").write_bytes(b"keep")
    pg = await PartialFile.open(tmp_path, "g", 2)
    with pytest.raises(StoreError, match="already exists"):
        await pg.finalize()
    await pg.close()
    assert (tmp_path / "g").read_bytes() == b"keep"


async def test_disk_full_keeps_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pf = await PartialFile.open(tmp_path, "big.iso", 100)
    await pf.write_piece(0, b"a" * 10)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StoreError, match="disk full") as info:
        await pf.write_piece(10, b"b" * 10)
    assert "free some space" in info.value.hint
    monkeypatch.undo()
    await pf.close()
    assert (tmp_path / "big.iso.part").read_bytes()[:10] == b"a" * 10
    assert not (tmp_path / "big.iso").exists()


async def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def one_byte(fd: int, data: bytes, offset: int) -> int:
        return real(fd, bytes(data[:1]), offset)

    pf = await PartialFile.open(tmp_path, "s", 5)
    monkeypatch.setattr(os, "pwrite", one_byte)
    await pf.write_piece(0, b"hello")
    monkeypatch.undo()
    assert await pf.read(0, 5) == b"hello"
    await pf.close()


async def test_open_in_unwritable_place_is_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError, match="cannot"):
        await PartialFile.open(blocker, "x", 1)


async def test_block_reader(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    path.write_bytes(b"0123456789")
    assert await read_block(path, 3, 4) == b"3456"
    async with await BlockReader.open(path) as reader:
        assert reader.size == 10
        assert await reader.read(8, 2) == b"89"
        with pytest.raises(StoreError, match="changed on disk"):
            await reader.read(8, 5)
    with pytest.raises(StoreError):
        await read_block(tmp_path / "missing", 0, 1)


async def test_block_reader_reads_cached_and_uncached_blocks_alike(tmp_path: Path) -> None:
    # A block in the page cache is read at once; one that is not (dropped below, once
    # it is on disk) goes through the worker thread. Both give the same bytes.
    data = random.Random(7).randbytes(4 * 65536)
    path = tmp_path / "shared"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        cached = _pread_cached(fd, 65536, 65536)  # just written: cached (None elsewhere)
        assert cached is None or cached == data[65536 : 2 * 65536]
        assert _pread_cached(fd, 3 * 65536, 65537) is None  # short: not the whole block
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    async with await BlockReader.open(path) as reader:
        for offset in (0, 65536, 3 * 65536):
            assert await reader.read(offset, 65536) == data[offset : offset + 65536]
        with pytest.raises(StoreError, match="changed on disk"):
            await reader.read(3 * 65536, 65537)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("a\\b\\c.txt", "c.txt"),
        ("/", "download"),
        ("..", "download"),
        (".", "download"),
        ("", "download"),
        ("  spaced  ", "spaced"),
        ("evil\x00name\n", "evilname"),
        ("dir/..", "download"),
        ("x\u202etxt.exe", "xtxt.exe"),
    ],
)
def test_safe_name_examples(name: str, expected: str) -> None:
    assert safe_name(name) == expected


def test_safe_name_limits_length() -> None:
    name = safe_name("é" * 400)
    assert len(name.encode("utf-8")) <= 250
    assert name == "é" * 125


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("out").resolve()


@given(
    st.text(max_size=300)
    | st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "\0", " "])).map("".join)
)
def test_safe_name_never_escapes(out_dir: Path, name: str) -> None:
    base = safe_name(name)
    assert base not in ("", ".", "..")
    assert "/" not in base and "\\" not in base and "\0" not in base
    target = out_dir / (base + ".part")
    assert target.resolve().parent == out_dir
    with target.open("xb"):  # the name really is creatable, inside the directory
        pass
    assert [p.name for p in out_dir.iterdir()] == [target.name]
    target.unlink()


def test_resume_round_trip() -> None:
    state = ResumeState(CID, 10, {0, 1, 2, 5, 9})
    again = ResumeState.from_json(state.to_json())
    assert again == state
    assert '"verified":[[0,3],[5,6],[9,10]]' in state.to_json()
    assert again.missing() == [3, 4, 6, 7, 8]
    assert not again.complete


def test_resume_mark_and_complete() -> None:
    state = ResumeState(CID, 2)
    state.mark(1)
    state.mark(0)
    assert state.complete
    with pytest.raises(IndexError):
        state.mark(2)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "content_id": "00", "piece_count": 1, "verified": []}',
        '{"version": 1, "content_id": "00", "piece_count": 1, "verified": []}',
        '{"version": 1, "content_id": "' + CID.hex() + '", "piece_count": 3, "verified": [[2, 4]]}',
        '{"version": 1, "content_id": "'
        + CID.hex()
        + '", "piece_count": 9, "verified": [[3, 5], [4, 6]]}',
        '{"version": 1, "content_id": "'
        + CID.hex()
        + '", "piece_count": 3, "verified": [[true, 2]]}',
        '{"version": 1, "content_id": "' + CID.hex() + '", "piece_count": -1, "verified": []}',
        '{"version": 1, "content_id": "' + CID.hex() + '", "verified": []}',
    ],
)
def test_resume_damaged_is_store_error(text: str) -> None:
    with pytest.raises(StoreError, match="damaged"):
        ResumeState.from_json(text)


def test_resume_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "dl.resume"
    ResumeState(CID, 4, {1}).save(path)
    ResumeState(CID, 4, {1, 2}).save(path)
    assert read_state(path).verified == {1, 2}
    assert load_or_new(path, CID, 4).verified == {1, 2}
    assert [p.name for p in tmp_path.iterdir()] == ["dl.resume"]


def test_resume_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dl.resume"
    ResumeState(CID, 4, {1}).save(path)

    def crash(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="disk full"):
        ResumeState(CID, 4, {1, 2, 3}).save(path)
    monkeypatch.undo()
    assert read_state(path).verified == {1}
    assert [p.name for p in tmp_path.iterdir()] == ["dl.resume"]


def test_load_or_new_falls_back_to_fresh(tmp_path: Path) -> None:
    path = tmp_path / "dl.resume"
    assert load_or_new(path, CID, 4) == ResumeState(CID, 4)
    path.write_text("{broken")
    with pytest.raises(StoreError):
        read_state(path)
    assert load_or_new(path, CID, 4) == ResumeState(CID, 4)
    ResumeState(CID, 4, {0}).save(path)
    assert load_or_new(path, CID, 5).verified == set()
    assert load_or_new(path, bytes(32), 4).verified == set()
