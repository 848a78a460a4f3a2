"""spawn_logged: a background task is held until it ends, and only a failure is logged."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dhtshare.tasks import spawn_logged

log = logging.getLogger("test.tasks")


async def fail() -> None:
    raise RuntimeError("boom")


async def succeed() -> int:
    return 7


async def test_a_failure_is_logged_and_reported_and_the_task_let_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG, logger="test.tasks"):
        task = spawn_logged(fail(), tasks, "the chore", logger=log, on_error=errors.append)
        assert tasks == {task}
        await asyncio.wait([task])
    assert tasks == set()
    assert [str(e) for e in errors] == ["boom"]
    [record] = caplog.records
    assert record.getMessage() == "the chore failed" and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is errors[0]


async def test_success_and_cancellation_are_not_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG, logger="test.tasks"):
        done = spawn_logged(succeed(), tasks, "quick", logger=log, on_error=errors.append)
        stuck = spawn_logged(asyncio.Event().wait(), tasks, "stuck", logger=log)
        await asyncio.wait([done])
        stuck.cancel()
        await asyncio.wait([stuck])
    assert done.result() == 7 and stuck.cancelled()
    assert tasks == set() and errors == [] and caplog.records == []


async def test_the_level_is_the_callers(caplog: pytest.LogCaptureFixture) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    with caplog.at_level(logging.DEBUG, logger="test.tasks"):
        task = spawn_logged(fail(), tasks, "an RPC", logger=log, level=logging.DEBUG)
        await asyncio.wait([task])
    assert [(r.getMessage(), r.levelno) for r in caplog.records] == [
        ("an RPC failed", logging.DEBUG)
    ]
