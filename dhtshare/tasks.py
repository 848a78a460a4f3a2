"""Background tasks that are neither lost nor silent.

A task nobody awaits must be held somewhere (the event loop keeps only a weak reference)
and its failure must reach the log (else it surfaces, if ever, as "Task exception was
never retrieved"). ``spawn_logged`` does both, for every owner of background tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["spawn_logged"]

T = TypeVar("T")


def spawn_logged(
    coro: Awaitable[T],
    tasks: set[asyncio.Task[Any]],
    what: str,
    *,
    logger: logging.Logger,
    level: int = logging.ERROR,
    on_error: Callable[[BaseException], None] | None = None,
) -> asyncio.Task[T]:
    """Run ``coro`` as a task held in ``tasks`` until it ends (its owner cancels what is
    left there when it stops). If it fails (a cancellation is no failure), ``logger``
    logs "``what`` failed" at ``level`` with the traceback, then ``on_error(exc)`` runs."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(t: asyncio.Task[T]) -> None:
        tasks.discard(t)
        exc = None if t.cancelled() else t.exception()
        if exc is None:
            return
        logger.log(level, "%s failed", what, exc_info=exc)
        if on_error is not None:
            on_error(exc)

    task.add_done_callback(done)
    return task
