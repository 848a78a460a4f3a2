"""Layering: the folders of ``dhtshare/`` are its layers, checked on the source with ``ast``.

Every ``import`` in ``dhtshare/`` is read (module level, inside functions, and under
``if TYPE_CHECKING:``) and resolved to an absolute module name. Each module belongs to the
layer of its folder, and the rules are stated over folders, not over a list of modules:

1. **Imports point down.** Each layer has a rank (``RANKS``); a module imports only its own
   layer and layers of lower rank. The base (the modules at the top of ``dhtshare/``) is
   rank 0, the ``cli`` edge the highest. ``__main__`` (``python -m dhtshare``) is the entry
   point above everything.
2. **``transfer`` never imports ``dht``, ``groups`` or ``reach``**, not even from
   ``transfer/aio/``: it is given callables instead, so the swarm can be tested and reused
   without a DHT, and a download does not know how its connections were made.
3. **``cli`` imports ``sim`` only lazily** (inside the ``simulate`` command): the simulator
   and its dependencies are loaded only when a simulation runs.
4. **Pure layers are pure.** Every module in ``wire/``, and in ``transfer/`` and ``reach/``
   outside their ``aio/`` folders, is sans-I/O; so is every module of ``dht/`` and
   ``groups/`` except the I/O edge (the modules named in ``IO_MODULE_NAMES``, and the package's
   ``__init__``); so is every base module except the ones that touch the file system,
   the process or the loop (``BASE_IO``). A pure module imports none of asyncio,
   aiofiles, socket, click, time or datetime; of kademlia only ``kademlia.storage``; and
   of dhtshare only pure modules and ``identity``.

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

# Layer -> rank. A layer is a folder (``transfer.aio`` is the asyncio part of ``transfer``).
RANKS = {
    "base": 0,
    "wire": 1,
    "store": 1,
    "dht": 2,
    "transfer": 2,
    "reach": 2,
    "transfer.aio": 3,
    "groups": 3,
    "files": 4,
    "reach.aio": 4,
    "node": 5,
    "sim": 6,
    "cli": 7,
    "__main__": 8,
}
PURE_LAYERS = frozenset({"wire", "transfer", "reach"})
MIXED_LAYERS = frozenset({"dht", "groups"})  # pure, except modules named in IO_MODULE_NAMES
# The I/O edge of a mixed layer: the modules built on the event loop or on kademlia's
# asyncio classes (``kademlia.routing`` schedules pings itself).
IO_MODULE_NAMES = frozenset({"server", "protocol", "routing", "service", "dialback", "sealeddht"})
BASE_IO = frozenset(
    {"dhtshare.atomic", "dhtshare.identity", "dhtshare.allocator", "dhtshare.tasks"}
)
PURE_MAY_ALSO_IMPORT = frozenset({"dhtshare.identity"})
FORBIDDEN_IN_PURE = frozenset({"asyncio", "aiofiles", "socket", "click", "time", "datetime"})
KADEMLIA_IN_PURE = frozenset({"kademlia.storage"})

# (importer, imported top-level name) pairs that break rule 4 on purpose, each with its reason.
ALLOWED_IN_PURE = frozenset(
    {
        # dht/storage.py: ``time.time`` is only the *default* of the injected ``clock``
        # argument; the clock is called only by the IStorage methods kademlia calls
        # (``__setitem__``, ``get``, ``__iter__``, ``iter_older_than``); every logic method
        # takes ``now``. Listed here rather than hidden: the module does reference a clock.
        ("dhtshare.dht.storage", "time"),
    }
)


def layer_of(module: str, is_package: bool = False) -> str:
    """The layer (folder) ``module`` lives in: ``base`` for the top-level modules."""
    parts = module.split(".")
    if module == "dhtshare.__main__":
        return "__main__"
    if len(parts) == 1 or (len(parts) == 2 and not is_package and parts[1] not in RANKS):
        return "base"
    if parts[1] in ("transfer", "reach") and len(parts) > 2 and parts[2] == "aio":
        return f"{parts[1]}.aio"
    return parts[1]


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


def is_pure(module: str, is_package: bool = False) -> bool:
    layer = layer_of(module, is_package)
    if layer in PURE_LAYERS:
        return True
    if layer in MIXED_LAYERS:  # a package's __init__ there re-exports its I/O edge too
        return not is_package and module.split(".")[-1] not in IO_MODULE_NAMES
    return layer == "base" and module != "dhtshare" and module not in BASE_IO


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(imports: list[Import], packages: frozenset[str] = frozenset()) -> list[str]:
    """Every broken rule, as ``importer:line: message`` (``packages``: names that are
    packages, so ``dhtshare.wire`` is the wire layer, not a base module)."""
    out: list[str] = []
    for imp in imports:
        where = f"{imp.importer}:{imp.line}"
        top = imp.target.split(".")[0]
        if top != "dhtshare":
            if is_pure(imp.importer, imp.importer in packages):
                if top in FORBIDDEN_IN_PURE and (imp.importer, top) not in ALLOWED_IN_PURE:
                    out.append(f"{where}: pure module imports {imp.target}")
                if top == "kademlia" and imp.target not in KADEMLIA_IN_PURE:
                    out.append(f"{where}: pure module imports {imp.target} (only kademlia.storage)")
            continue
        src = layer_of(imp.importer, imp.importer in packages)
        dst = layer_of(imp.target, imp.target in packages)
        if src == "cli" and dst == "sim":
            if not imp.lazy:
                out.append(f"{where}: cli imports sim at module level (only lazily)")
        elif src != dst and RANKS[dst] >= RANKS[src] and imp.target != "dhtshare":
            out.append(f"{where}: {src} imports {imp.target} ({dst} is not below {src})")
        if src in ("transfer", "transfer.aio") and dst in ("dht", "groups", "reach", "reach.aio"):
            out.append(f"{where}: transfer imports {imp.target}")
        if (
            is_pure(imp.importer, imp.importer in packages)
            and imp.target not in ("dhtshare", *PURE_MAY_ALSO_IMPORT)
            and not is_pure(imp.target, imp.target in packages)
        ):
            out.append(f"{where}: pure module imports impure {imp.target}")
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


@functools.cache
def _package() -> tuple[frozenset[str], frozenset[str], tuple[Import, ...]]:
    """(module names, package names, every import) of the real tree."""
    sources = package_sources()
    packages = frozenset(n for n, (_, is_package) in sources.items() if is_package)
    return frozenset(sources), packages, tuple(scan(sources))


def test_the_package_keeps_its_layers() -> None:
    _, packages, imports = _package()
    assert len(imports) > 200
    assert violations(list(imports), packages) == []


def test_every_module_is_in_a_known_layer() -> None:
    """A new folder must be given a rank (and a rule) before it can hold code."""
    modules, packages, _ = _package()
    assert {layer_of(m, m in packages) for m in modules} <= set(RANKS)


def test_the_pure_layers_hold_what_they_should() -> None:
    modules, packages, _ = _package()
    pure = {m for m in modules if is_pure(m, m in packages)}
    for module in (
        "dhtshare.codec",
        "dhtshare.records",
        "dhtshare.wire.connection",
        "dhtshare.transfer.picker",
        "dhtshare.groups.rules",
        "dhtshare.dht.storage",
    ):
        assert module in pure
    for module in (
        "dhtshare.transfer.aio.download",
        "dhtshare.dht.server",
        "dhtshare.node.service",
        "dhtshare.atomic",
    ):
        assert module in modules and module not in pure
    assert modules >= BASE_IO


def test_allow_list_entries_are_still_needed() -> None:
    """An allow-list entry whose import went away must be deleted, not left to rot."""
    _, _, imports = _package()
    used = {(i.importer, i.target.split(".")[0]) for i in imports}
    assert used >= ALLOWED_IN_PURE


def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    """Violations of ``module`` if its source were ``source`` (the rest of the tree as is)."""
    known, packages, base = _package()
    imports = [i for i in base if i.importer != module]
    imports += imports_of(module, source, is_package, known)
    return [v for v in violations(imports, packages) if v.startswith(module + ":")]


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("dhtshare.records", "import asyncio\n", "pure module imports asyncio"),
        ("dhtshare.codec", "from time import monotonic\n", "pure module imports time"),
        ("dhtshare.wire.frames", "import socket\n", "pure module imports socket"),
        ("dhtshare.transfer.picker", "import aiofiles\n", "pure module imports aiofiles"),
        ("dhtshare.groups.rules", "def f():\n    import click\n", "pure module imports click"),
        ("dhtshare.dht.storage", "from kademlia.network import Server\n", "kademlia.network"),
        ("dhtshare.transfer.picker", "from dhtshare.atomic import write_atomic\n", "impure"),
        ("dhtshare.groups.rules", "from dhtshare.groups import service\n", "impure"),
        ("dhtshare.transfer.aio.download", "from dhtshare.dht.server import DhtNode\n", "transfer"),
        ("dhtshare.transfer.aio.serve", "from dhtshare.groups.rules import heir_of\n", "transfer"),
        ("dhtshare.node.downloads", "from dhtshare.cli import main\n", "node imports"),
        ("dhtshare.files.service", "from dhtshare.node.service import Node\n", "files imports"),
        ("dhtshare.records", "from dhtshare.wire.frames import MAX_FRAME\n", "base imports"),
        ("dhtshare.files.service", "from dhtshare.cli.daemon import run\n", "files imports"),
        ("dhtshare.node.service", "from dhtshare.sim.network import Network\n", "node imports"),
        ("dhtshare.cli.main", "from dhtshare.sim.runner import run_simulation\n", "imports sim"),
        ("dhtshare.sim.runner", "from dhtshare.cli.display import ProgressLine\n", "sim imports"),
        ("dhtshare.dht.server", "from dhtshare.transfer.picker import BLOCK_SIZE\n", "dht imports"),
        ("dhtshare.reach.punch", "import socket\n", "pure module imports socket"),
        ("dhtshare.transfer.aio.download", "from dhtshare.reach.aio import punch\n", "transfer"),
        ("dhtshare.reach.aio.relay", "from dhtshare.node.service import Node\n", "reach.aio imp"),
    ],
)
def test_a_bad_import_is_caught(module: str, source: str, expected: str) -> None:
    found = _check(module, source)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("dhtshare.cli.main", "def f():\n    from dhtshare.sim.runner import run_simulation\n"),
        ("dhtshare.sim.report", "from dhtshare.sim.scenario import Scenario\n"),
        ("dhtshare.dht.storage", "from kademlia.storage import IStorage\n"),
        ("dhtshare.wire", "from dhtshare.wire.frames import MAX_FRAME\n"),
        ("dhtshare.node.service", "from dhtshare.transfer.aio.download import Download\n"),
        ("dhtshare.transfer.picker", "from dhtshare.codec import Reader\n"),
    ],
)
def test_an_allowed_import_passes(module: str, source: str) -> None:
    assert _check(module, source, is_package=module == "dhtshare.wire") == []
