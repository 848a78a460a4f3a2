"""Text for people: safe one-line strings, sizes, plurals and aligned tables (pure).

Every string that came from the network or from a record (names, messages, group
names, file names, paths, error messages that quote them) reaches the terminal
through ``clean``: control characters (C0 with tab and newline, DEL, C1 with CSI),
format characters (bidi overrides and isolates, zero-width joiners and spaces, the
byte-order mark), lone surrogates and line or paragraph separators are shown as a
visible escape (``\\x1b``, ``\\u202e``) instead of being written, and a backslash
is doubled (``\\\\``), so a name holding the four characters ``\\x1b`` shows as
``\\\\x1b`` and never looks like an escaped ESC. So no escape
sequence (a clipboard write, a screen clear, a cursor move) and no line break (a
forged table row) from a remote peer reaches the terminal. ``table`` and ``fields``
clean every value they print; ``--json`` output is JSON with ``ensure_ascii`` and
needs no cleaning. The terminal side (log formatter, progress bar) is ``cli/display.py``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "clean",
    "fields",
    "format_rate",
    "format_size",
    "plural",
    "table",
    "table_with_notes",
]

BOLD, RESET = "\x1b[1m", "\x1b[0m"  # the only escapes we write; click.echo strips them off a tty
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(value: object) -> str:
    """``value`` as one line of text that is safe to print on a terminal."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(_shown(c) for c in text)


def _shown(char: str) -> str:
    """One character as ``clean`` prints it: a backslash doubled (so a literal ``\\x1b``
    cannot pass for an escaped ESC), an unsafe character escaped, any other as it is."""
    if char == "\\":
        return "\\\\"
    return _escape(char) if unicodedata.category(char) in _UNSAFE else char


def fields(doc: Mapping[Any, Any]) -> str:
    """``key  value`` lines, keys padded to the longest; every key and value cleaned."""
    items = [(clean(k), clean(v)) for k, v in doc.items()]
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k:{width}}  {v}" for k, v in items)


def format_size(n: float) -> str:
    """Bytes for people: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.1f} MB/s"


def plural(count: int, noun: str, nouns: str = "") -> str:
    """``1 peer``, ``2 peers``, ``0 peers`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns aligned to their widest cell; numbers right-aligned; header in bold
    (``click.echo`` drops the escape when the output is not a terminal).

    Every cell is ``clean``ed: a cell is one line, whatever it holds."""
    cells = [[clean(c) for c in row] for row in rows]
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

    head = BOLD + line(list(headers)) + RESET
    return "\n".join([head, *(line(r) for r in cells)])


def table_with_notes(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], notes: Sequence[Sequence[str]]
) -> str:
    """``table``, each row followed by its notes (``notes[i]`` for ``rows[i]``), each an
    indented line of its own, cleaned like every cell."""
    lines = table(rows, headers).split("\n")
    out = lines[:1]
    for line, extra in zip(lines[1:], notes, strict=True):
        out += [line, *(f"  {clean(n)}" for n in extra)]
    return "\n".join(out)
