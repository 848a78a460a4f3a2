"""Every file the docs cite exists, so a moved or deleted module cannot leave a stale pointer.

A cited path is any word ending in ``.py`` or ``.md``, any word that starts with one of the
repository's folders (``dhtshare/``, ``tests/``, ``simulations/``, ``docs/``) or with a
package of ``dhtshare`` (``transfer/aio/``; ``files/service.pick_entry`` names
``files/service.py``), and any dotted ``dhtshare.x.y`` module name.
A path is looked up relative to the repository, to ``docs/`` (for ``../`` links) and to
``dhtshare/``; a bare file name (``picker.py``) must name a file somewhere in the tree.
Patterns (``dhtshare/*.py``, ``<name>.part``) are not paths.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
TOP_FOLDERS = ("dhtshare", "tests", "simulations", "docs")

_WORD = re.compile(r"[A-Za-z0-9_./<>*-]+")
_MODULE = re.compile(r"\bdhtshare(?:\.[a-z_][a-z0-9_]*)+")
_PREFIX = re.compile(r"dhtshare/v[0-9]")  # a signing purpose (dhtshare/v1/record/...)
_ATTRIBUTE = re.compile(r"^(.*/[a-z_0-9]+)\.(?!(?:py|md|json|toml)$)[A-Za-z_]\w*$")  # a/b.name


def _packages() -> set[str]:
    return {p.parent.name for p in (ROOT / "dhtshare").glob("*/__init__.py")}


def _tree_files() -> list[Path]:
    return [p for folder in TOP_FOLDERS for p in (ROOT / folder).rglob("*") if p.is_file()] + [
        p for p in ROOT.iterdir() if p.is_file()
    ]


def cited_paths(text: str, packages: set[str]) -> set[str]:
    """The file and folder paths a markdown text names (see the module docstring)."""
    found: set[str] = set()
    for raw in _WORD.findall(text):
        word = raw.rstrip(".-").split("#")[0]
        if any(c in word for c in "<>*") or "//" in word or _PREFIX.match(word):
            continue
        first = word.lstrip("./").split("/")[0]
        if "/" in word and (first in TOP_FOLDERS or first in packages):
            found.add(_ATTRIBUTE.sub(r"\1.py", word))
        elif word.endswith((".py", ".md")):
            found.add(word)
    return found


def missing(path: str, files: list[Path]) -> bool:
    """True if ``path`` names no file or folder of the repository."""
    bases = (ROOT, ROOT / "docs", ROOT / "dhtshare")
    if any((base / path).exists() for base in bases):
        return False
    if "/" not in path:
        return not any(p.name == path for p in files)
    return True


def missing_modules(text: str) -> set[str]:
    """The dotted ``dhtshare.x`` names in ``text`` that are neither a module nor an
    attribute of one."""
    bad = set()
    for name in _MODULE.findall(text):
        parts = name.split(".")
        candidates = [parts, parts[:-1]] if len(parts) > 2 else [parts]
        if not any(
            (ROOT.joinpath(*c).with_suffix(".py")).is_file() or (ROOT.joinpath(*c)).is_dir()
            for c in candidates
        ):
            bad.add(name)
    return bad


def test_every_path_the_docs_cite_exists() -> None:
    files = _tree_files()
    packages = _packages()
    stale = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        bad = {p for p in cited_paths(text, packages) if missing(p, files)}
        bad |= missing_modules(text)
        if bad:
            stale[doc.relative_to(ROOT).as_posix()] = sorted(bad)
    assert stale == {}


def test_the_check_finds_a_stale_path() -> None:
    files = _tree_files()
    text = "see `transfer/download.py`, `cli.py`, `dhtshare/gone/` and `dhtshare.gone`"
    cited = cited_paths(text, _packages())
    assert {p for p in cited if missing(p, files)} == {
        "transfer/download.py",
        "cli.py",
        "dhtshare/gone/",
    }
    assert missing_modules(text) == {"dhtshare.gone"}
    assert not missing("transfer/picker.py", files)
    assert not missing("picker.py", files)
