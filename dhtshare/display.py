"""How results look in a terminal: sizes, aligned tables, a one-line progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import click

__all__ = ["ProgressLine", "format_rate", "format_size", "table"]


def format_size(n: float) -> str:
    """Bytes for people: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.1f} MB/s"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns aligned to their widest cell; numbers right-aligned; header in bold on a tty."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    head = click.style(line(list(headers)), bold=True)
    return "\n".join([head, *(line(r) for r in cells)])


class ProgressLine:
    """A progress bar redrawn in place on a terminal; sparse plain lines otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_pct = 0  # plain lines start at 10%: an early failure prints only its error
        self._drawn = False

    def update(self, done: int, extra: str = "") -> None:
        pct = min(100, int(100 * done / self.total))
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
