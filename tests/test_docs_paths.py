"""Every file the docs cite exists, so a moved or deleted module cannot leave a stale pointer.

A cited path is any word ending in ``.py`` or ``.md``, any word that starts with one of the
repository's folders (``dhtshare/``, ``tests/``, ``simulations/``, ``docs/``) or with a
package of ``dhtshare`` (``transfer/aio/``; ``files/service.pick_entry`` names
``files/service.py``), and any dotted ``dhtshare.x.y`` module name.
A path is looked up relative to the repository, to ``docs/`` (for ``../`` links) and to
``dhtshare/``. A bare file name (``picker.py``) is looked up there and in the folder the
text last named (``transfer/``); it is cited as ``transfer/picker.py`` when neither has it.
A dotted name must import, or be an attribute of what its longest importable prefix is
(``dhtshare.transfer.swarm.Swarm``, ``dhtshare.sim.Network.start``); a folder alone does
not make ``dhtshare.transfer.download`` a module.
Patterns (``dhtshare/*.py``, ``<name>.part``) are not paths.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
TOP_FOLDERS = ("dhtshare", "tests", "simulations", "docs")
BASES = (ROOT, ROOT / "docs", ROOT / "dhtshare")

_WORD = re.compile(r"[A-Za-z0-9_./<>*-]+")
_MODULE = re.compile(r"\bdhtshare(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_PREFIX = re.compile(r"dhtshare/v[0-9]")  # a signing purpose (dhtshare/v1/record/...)
_ATTRIBUTE = re.compile(r"^(.*/[a-z_0-9]+)\.(?!(?:py|md|json|toml)$)[A-Za-z_]\w*$")  # a/b.name


def _packages() -> set[str]:
    return {p.parent.name for p in (ROOT / "dhtshare").glob("*/__init__.py")}


def _exists(path: str) -> bool:
    return any((base / path).exists() for base in BASES)


def cited_paths(text: str, packages: set[str]) -> set[str]:
    """The file and folder paths a markdown text names (see the module docstring)."""
    found: set[str] = set()
    folder = ""  # the folder the text last named
    for raw in _WORD.findall(text):
        word = raw.rstrip(".-").split("#")[0]
        if any(c in word for c in "<>*") or "//" in word or _PREFIX.match(word):
            continue
        first = word.lstrip("./").split("/")[0]
        if "/" in word and (first in TOP_FOLDERS or first in packages):
            found.add(_ATTRIBUTE.sub(r"\1.py", word))
            if word.endswith("/") and _exists(word):
                folder = word
        elif "/" not in word and word.endswith(".py") and folder and not _exists(word):
            found.add(folder + word)
        elif word.endswith((".py", ".md")):
            found.add(word)
    return found


def missing(path: str) -> bool:
    """True if ``path`` names no file or folder of the repository."""
    return not _exists(path)


def _resolves(name: str) -> bool:
    """True if ``name`` imports, or is an attribute (chain) of the longest prefix that does."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return False
            value = getattr(value, attribute)
        return True
    return False


def missing_modules(text: str) -> set[str]:
    """The dotted ``dhtshare.x`` names in ``text`` that name no module, package or attribute
    of one."""
    return {name for name in _MODULE.findall(text) if not _resolves(name)}


def test_every_path_the_docs_cite_exists() -> None:
    packages = _packages()
    stale = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        bad = {p for p in cited_paths(text, packages) if missing(p)}
        bad |= missing_modules(text)
        if bad:
            stale[doc.relative_to(ROOT).as_posix()] = sorted(bad)
    assert stale == {}


def test_the_check_finds_a_stale_path() -> None:
    text = (
        "see `transfer/download.py`, `cli.py`, `dhtshare/gone/` and `dhtshare.gone`"
        "; in `node/`, `daemon.py` and `service.py`; in `transfer/aio/`, `download.py`"
        " and the base's `content.py`"
    )
    cited = cited_paths(text, _packages())
    assert {p for p in cited if missing(p)} == {
        "transfer/download.py",
        "cli.py",
        "dhtshare/gone/",
        "node/daemon.py",  # in cli/, though a file of that name exists in the tree
    }
    assert {"node/service.py", "transfer/aio/download.py", "content.py"} <= cited
    assert not missing("transfer/picker.py")
    assert missing("picker.py")  # a bare name is not looked up anywhere in the tree
    assert missing_modules(text) == {"dhtshare.gone"}


def test_a_dotted_name_is_a_module_or_an_attribute_of_one() -> None:
    text = (
        "`dhtshare.transfer.download`, `dhtshare.transfer.serve.PeerServer`,"
        " `dhtshare.transfer.Swarm`, `dhtshare.transfer.aio.serve.PeerServer`,"
        " `dhtshare.transfer.swarm.Swarm`, `dhtshare.transfer.aio` and `dhtshare.content`"
    )
    assert missing_modules(text) == {
        "dhtshare.transfer.download",
        "dhtshare.transfer.serve.PeerServer",
        "dhtshare.transfer.Swarm",
    }
