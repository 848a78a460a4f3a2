"""``display.clean`` and the renderers built on it: one safe line per value."""

from __future__ import annotations

import logging
import sys
import unicodedata

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtshare.cli.display import CleanFormatter, ProgressLine
from dhtshare.text import clean, fields, table

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
CLEAR = "\x1b[2J\x1b[H"
HOSTILE_NAME = f"{OSC52}{CLEAR}mal\u202eory\nbob  ok"
HOSTILE_MESSAGE = f"hi{CLEAR}\nmallory  0123abcd  please accept\x9b2J\x7f"
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def unsafe_chars(text: str) -> list[str]:
    return [c for c in text if c != "\n" and unicodedata.category(c) in UNSAFE]


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("alice", "alice"),
        ("Zoë 🧗", "Zoë 🧗"),
        ("a\x1bb", "a\\x1bb"),
        ("x\ny", "x\\x0ay"),
        ("tab\there", "tab\\x09here"),
        ("\x9b2J", "\\x9b2J"),
        ("del\x7f", "del\\x7f"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("a\u2066b\u2069", "a\\u2066b\\u2069"),
        ("zero\u200bwidth\u200d", "zero\\u200bwidth\\u200d"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \ud800", "lone \\ud800"),
        ("\ufeffbom", "\\ufeffbom"),
        ("C:\\dir", "C:\\\\dir"),
        (42, "42"),
    ],
)
def test_clean_examples(raw: object, shown: str) -> None:
    assert clean(raw) == shown


def test_literal_backslash_escape_text_cannot_pass_for_an_escaped_control() -> None:
    """A name holding the four characters ``\\x1b`` must not print like a real ESC."""
    literal, real = "a\\x1bb", "a\x1bb"
    assert clean(literal) != clean(real)
    assert clean(literal) == "a\\\\x1bb"


def unescape(shown: str) -> str:
    """The inverse of ``clean``'s escaping (test oracle): every escape read back."""
    out, i = [], 0
    while i < len(shown):
        if shown[i] != "\\":
            out.append(shown[i])
            i += 1
            continue
        kind = shown[i + 1]
        if kind == "\\":
            out.append("\\")
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}[kind]
        out.append(chr(int(shown[i + 2 : i + 2 + width], 16)))
        i += 2 + width
    return "".join(out)


@given(st.text(max_size=200))
def test_clean_leaves_no_unsafe_character_and_keeps_safe_text(text: str) -> None:
    shown = clean(text)
    assert not unsafe_chars(shown) and "\n" not in shown
    shown.encode("utf-8")  # printable on any UTF-8 terminal (no lone surrogate)
    assert unescape(shown) == text  # two different texts never look the same
    if not any(unicodedata.category(c) in UNSAFE for c in text) and "\\" not in text:
        assert shown == text


def test_tables_fields_and_progress_lines_are_one_line_per_row() -> None:
    out = table([(HOSTILE_NAME, 3), ("carol", 10)], ["NAME", "N"])
    assert len(out.splitlines()) == 3 and not unsafe_chars(click.unstyle(out))
    out = fields({"name": HOSTILE_NAME, "id": "ab"})
    assert len(out.splitlines()) == 2 and not unsafe_chars(out)

    class Stream:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return False

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    stream = Stream()
    bar = ProgressLine(HOSTILE_NAME, 100, stream)  # type: ignore[arg-type]
    bar.update(50, HOSTILE_MESSAGE)
    assert stream.text.count("\n") == 1 and not unsafe_chars(stream.text)


def test_log_lines_are_cleaned_and_tracebacks_keep_their_lines() -> None:
    formatter = CleanFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "could not announce %s", (HOSTILE_NAME,), None
    )
    out = formatter.format(record)
    assert "\n" not in out and not unsafe_chars(out) and "\\x1b]52;c;" in out
    try:
        raise ValueError(f"bad host {CLEAR}")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.exc_text = None
    out = formatter.format(record)
    assert out.count("\n") >= 2 and not unsafe_chars(out) and "\\x1b[2J" in out
