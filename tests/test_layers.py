"""Layering: the import rules of docs/architecture.md, checked on the source with ``ast``.

Every ``import`` in ``dhtshare/`` is read (module level, inside functions, and under
``if TYPE_CHECKING:``) and resolved to an absolute module name. The rules:

1. Pure modules (no I/O loop, no sockets, no CLI, no clock) import none of asyncio,
   aiofiles, socket, click, time or datetime; of kademlia only ``kademlia.storage``; and
   of dhtshare only other pure modules, ``identity`` and ``stats``.
2. ``transfer`` never imports ``dht`` or ``groups``: it is given callables instead.
3. No module imports ``cli`` (except ``__main__``, the ``python -m dhtshare`` entry point).
4. ``node`` is imported only by ``daemon``, ``sim.runner`` and, for type checking only,
   ``commands``; ``daemon`` only by ``cli``.
5. ``sim`` is imported only by ``sim`` itself and, lazily (inside a function), by ``cli``.

The checker is a plain function over ``{module: source}``, so the tests at the bottom feed
it broken sources to prove each rule can fail.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dhtshare"

PURE = frozenset(
    {
        "dhtshare.errors",
        "dhtshare.codec",
        "dhtshare.crypto",
        "dhtshare.records",
        "dhtshare.groups.rules",
        "dhtshare.files.content",
        "dhtshare.transfer.picker",
        "dhtshare.transfer.ratelimit",
        "dhtshare.dht.storage",
        "dhtshare.dht.sources",
        "dhtshare.dht.contacts",
        "dhtshare.dht.antiamp",
        "dhtshare.dht.closeness",
    }
)
PURE_PACKAGES = ("dhtshare.wire",)  # every module in these packages is pure
PURE_MAY_ALSO_IMPORT = frozenset({"dhtshare.identity", "dhtshare.stats"})
FORBIDDEN_IN_PURE = frozenset({"asyncio", "aiofiles", "socket", "click", "time", "datetime"})
KADEMLIA_IN_PURE = frozenset({"kademlia.storage"})

# (importer, imported top-level name) pairs that break rule 1 on purpose, each with its reason.
ALLOWED_IN_PURE = frozenset(
    {
        # dht/storage.py: ``time.time`` is only the *default* of the injected ``clock``
        # argument; the clock is called only by the IStorage methods kademlia calls
        # (``__setitem__``, ``get``, ``__iter__``, ``iter_older_than``); every logic method
        # takes ``now``. Listed here rather than hidden: the module does reference a clock.
        ("dhtshare.dht.storage", "time"),
    }
)

NODE_IMPORTERS = frozenset({"dhtshare.cli.daemon", "dhtshare.sim.runner"})
NODE_TYPE_ONLY_IMPORTERS = frozenset({"dhtshare.node.commands"})
DAEMON_IMPORTERS = frozenset({"dhtshare.cli.main"})
CLI_IMPORTERS = frozenset({"dhtshare.__main__"})
SIM_LAZY_IMPORTERS = frozenset({"dhtshare.cli.main"})


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # absolute dotted name
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``
    lazy: bool  # inside a function body


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """Dotted name of ``path`` under ``root`` (the package dir), and whether it is a package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(
    name: str, source: str, is_package: bool = False, known: frozenset[str] = frozenset()
) -> list[Import]:
    """Every import in ``source`` (module ``name``); ``from X import y`` also yields ``X.y``
    when that is a module in ``known``."""
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, type_checking, lazy))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.module, node.level)
            if base != "__future__":
                found.append(Import(name, base, node.lineno, type_checking, lazy))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        found.append(Import(name, sub, node.lineno, type_checking, lazy))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, True, lazy)
            for stmt in node.orelse:
                visit(stmt, type_checking, lazy)
            return
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking, inner)

    visit(ast.parse(source), False, False)
    return found


def is_pure(module: str) -> bool:
    return module in PURE or any(_under(module, p) for p in PURE_PACKAGES)


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(imports: list[Import]) -> list[str]:
    """Every broken rule, as ``importer:line: message``."""
    out: list[str] = []
    for imp in imports:
        where = f"{imp.importer}:{imp.line}"
        top = imp.target.split(".")[0]
        if is_pure(imp.importer):
            if top in FORBIDDEN_IN_PURE and (imp.importer, top) not in ALLOWED_IN_PURE:
                out.append(f"{where}: pure module imports {imp.target}")
            if top == "kademlia" and imp.target not in KADEMLIA_IN_PURE:
                out.append(f"{where}: pure module imports {imp.target} (only kademlia.storage)")
            if (
                top == "dhtshare"
                and imp.target not in ("dhtshare", *PURE_MAY_ALSO_IMPORT)
                and not is_pure(imp.target)
            ):
                out.append(f"{where}: pure module imports impure {imp.target}")
        if _under(imp.importer, "dhtshare.transfer") and (
            _under(imp.target, "dhtshare.dht") or _under(imp.target, "dhtshare.groups")
        ):
            out.append(f"{where}: transfer imports {imp.target}")
        if _under(imp.target, "dhtshare.cli.main") and imp.importer not in CLI_IMPORTERS:
            out.append(f"{where}: imports the cli")
        if _under(imp.target, "dhtshare.node.service") and not (
            imp.importer in NODE_IMPORTERS
            or (imp.importer in NODE_TYPE_ONLY_IMPORTERS and imp.type_checking)
        ):
            out.append(f"{where}: imports node")
        if _under(imp.target, "dhtshare.cli.daemon") and imp.importer not in DAEMON_IMPORTERS:
            out.append(f"{where}: imports daemon")
        if (
            _under(imp.target, "dhtshare.sim")
            and not _under(imp.importer, "dhtshare.sim")
            and not (imp.importer in SIM_LAZY_IMPORTERS and imp.lazy)
        ):
            out.append(f"{where}: imports sim")
    return out


def scan(sources: dict[str, tuple[str, bool]]) -> list[Import]:
    """Imports of every module in ``{name: (source, is_package)}``."""
    known = frozenset(sources)
    return [
        imp
        for name, (src, is_package) in sorted(sources.items())
        for imp in imports_of(name, src, is_package, known)
    ]


def package_sources(root: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = _module_name(path, root)
        out[name] = (path.read_text(encoding="utf-8"), is_package)
    return out


# ------------------------------------------------------------------------------- tests


def test_the_package_keeps_its_layers() -> None:
    sources = package_sources()
    assert "dhtshare.records" in sources and "dhtshare.wire.connection" in sources
    assert violations(scan(sources)) == []


def test_every_pure_module_exists() -> None:
    sources = package_sources()
    assert set(sources) >= PURE
    assert any(is_pure(m) for m in sources if m.startswith("dhtshare.wire."))


def test_allow_list_entries_are_still_needed() -> None:
    """An allow-list entry whose import went away must be deleted, not left to rot."""
    imports = scan(package_sources())
    used = {(i.importer, i.target.split(".")[0]) for i in imports}
    assert used >= ALLOWED_IN_PURE


@functools.cache
def _package_imports() -> tuple[frozenset[str], tuple[Import, ...]]:
    sources = package_sources()
    return frozenset(sources), tuple(scan(sources))


def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    """Violations of ``module`` if its source were ``source`` (the rest of the tree as is)."""
    known, base = _package_imports()
    imports = [i for i in base if i.importer != module]
    imports += imports_of(module, source, is_package, known)
    return [v for v in violations(imports) if v.startswith(module + ":")]


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("dhtshare.records", "import asyncio\n", "pure module imports asyncio"),
        ("dhtshare.codec", "from time import monotonic\n", "pure module imports time"),
        ("dhtshare.wire.frames", "import socket\n", "pure module imports socket"),
        ("dhtshare.transfer.picker", "import aiofiles\n", "pure module imports aiofiles"),
        ("dhtshare.groups.rules", "def f():\n    import click\n", "pure module imports click"),
        ("dhtshare.dht.storage", "from kademlia.network import Server\n", "kademlia.network"),
        ("dhtshare.files.content", "from dhtshare.node.downloads import X\n", "impure"),
        ("dhtshare.groups.rules", "from ..groups import service\n", "impure"),
        ("dhtshare.transfer.aio.download", "from dhtshare.dht.server import DhtNode\n", "transfer"),
        ("dhtshare.transfer.aio.serve", "from ..groups.rules import heir_of\n", "transfer"),
        ("dhtshare.node.downloads", "from . import cli\n", "imports the cli"),
        ("dhtshare.node.downloads", "from .node import Node\n", "imports node"),
        ("dhtshare.node.commands", "from .node import Node\n", "imports node"),
        ("dhtshare.files.service", "from ..daemon import run_foreground\n", "imports daemon"),
        ("dhtshare.node.service", "from .sim.network import Network\n", "imports sim"),
        ("dhtshare.cli.main", "from .sim.runner import run_simulation\n", "imports sim"),
    ],
)
def test_a_bad_import_is_caught(module: str, source: str, expected: str) -> None:
    found = _check(module, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (
            "dhtshare.node.commands",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .node import Node\n",
        ),
        ("dhtshare.cli.main", "def f():\n    from .sim.runner import run_simulation\n"),
        ("dhtshare.sim.report", "from .scenario import Scenario\n"),
        ("dhtshare.dht.storage", "from kademlia.storage import IStorage\n"),
        ("dhtshare.wire", "from dhtshare.wire.frames import MAX_FRAME\n"),
    ],
)
def test_an_allowed_import_passes(module: str, source: str) -> None:
    assert _check(module, source, is_package=module == "dhtshare.wire") == []
