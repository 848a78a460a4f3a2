"""The terminal side of output: the node's log formatter and a progress bar.

Both clean what they print with ``text.clean`` (a log line quotes names, hosts and
errors from peers; a progress label names a file), so a log on a terminal, or a
``tail -f node.log``, is as safe as the CLI's output.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from dhtshare.text import clean

__all__ = ["LOG_FORMAT", "CleanFormatter", "ProgressLine"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CleanFormatter(logging.Formatter):
    """Log lines (messages quote names, hosts and errors from peers) cleaned line by line,
    so a log on a terminal, or a ``tail -f node.log``, is as safe as the CLI's output; a
    traceback keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return clean(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _clean_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _clean_lines(super().formatStack(stack_info))


def _clean_lines(text: str) -> str:
    return "\n".join(clean(line) for line in text.split("\n"))


class ProgressLine:
    """A progress bar redrawn in place on a terminal; sparse plain lines otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = clean(label), max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_pct = 0  # plain lines start at 10%: an early failure prints only its error
        self._drawn = False

    def update(self, done: int, extra: str = "") -> None:
        pct = max(0, min(100, 100 * done // self.total))
        extra = clean(extra)
        if self.tty:
            width = 30
            filled = width * pct // 100
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {pct:3d}% {extra}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif pct >= self._last_pct + 10:
            self._last_pct = pct - pct % 10
            self.stream.write(f"{self.label}: {pct}% {extra}\n")

    def finish(self) -> None:
        """End the bar's line (once), so what follows starts on a line of its own."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
