"""Scenarios: what a simulation runs, from defaults, a JSON file and command-line options."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dhtshare.errors import ScenarioError
from dhtshare.text import plural

__all__ = ["Scenario", "load_scenario", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgKMG])(?:i?[bB])?)?\s*$")
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a plain number is MiB (``128``, as a person reads ``--size 128``);
    a K, M or G suffix (optionally ``iB`` or ``B``) names KiB, MiB or GiB."""
    match = None if isinstance(text, bool) else _SIZE.match(str(text))
    if not match:
        raise ScenarioError(f"not a size: {text!r}", "a number of MiB, or with K, M or G: 64, 512K")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


@dataclass(frozen=True)
class Scenario:
    """One simulation run. Defaults are the README's ``dhtshare simulate``."""

    name: str = "default"
    nodes: int = 30
    size: int = 64 << 20
    seeders: int = 3
    downloaders: int = 3
    churn: float = 0.0  # fraction of DHT-only nodes stopped half-way
    churn_levels: tuple[float, ...] = ()  # DHT lookups measured at each of these fractions stopped
    seeder_leaves: bool = True  # one seeder stops half-way through the downloads
    seed: int = 1
    procs: int = 1
    lookups: int = 200  # lookups measured per churn level
    records: int = 50  # records published before lookups are measured
    ksize: int = 20
    alpha: int = 3
    upload_limit_mb_s: float = 0.0  # per seeder; 0 = unlimited
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        members = self.seeders + self.downloaders + 2  # + bootstrap + owner
        if self.size > 0 and self.nodes < members:
            raise ScenarioError(
                f"{self.nodes} nodes cannot hold {plural(self.seeders, 'seeder')}"
                f" and {plural(self.downloaders, 'downloader')}",
                f"use --nodes {members} or more",
            )
        if self.size > 0 and (self.seeders < 1 or self.downloaders < 1):
            raise ScenarioError(
                "a transfer needs at least one seeder and one downloader", "or use --size 0"
            )
        if not 0 <= self.churn < 1 or any(not 0 <= c < 1 for c in self.churn_levels):
            raise ScenarioError("churn must be a fraction below 1", "e.g. --churn 0.2")

    @property
    def levels(self) -> tuple[float, ...]:
        """Churn levels at which lookups are measured (always starts at 0)."""
        levels = {0.0, *self.churn_levels}
        if self.churn:
            levels.add(self.churn)
        return tuple(sorted(levels))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_scenario(path: str | None, options: dict[str, Any]) -> Scenario:
    """Defaults, then the scenario file, then command-line options."""
    scenario = Scenario()
    if path is not None:
        scenario = _apply(scenario, _read(Path(path)))
    if path is not None and "name" not in options:
        options = {"name": Path(path).stem, **options}
    return _apply(scenario, options)


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScenarioError(
            f"cannot read scenario {path}: {exc}", "check the file is JSON"
        ) from exc
    if not isinstance(doc, dict):
        raise ScenarioError(f"scenario {path} must be a JSON object", "see simulations/README.md")
    return doc


def _apply(scenario: Scenario, values: dict[str, Any]) -> Scenario:
    known = {f.name for f in fields(Scenario)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ScenarioError(
            f"unknown scenario keys: {', '.join(unknown)}", f"known: {', '.join(sorted(known))}"
        )
    values = dict(values)
    if "size" in values:
        values["size"] = parse_size(values["size"])
    if "churn_levels" in values:
        values["churn_levels"] = tuple(float(c) for c in values["churn_levels"])
    try:
        return replace(scenario, **values)
    except TypeError as exc:
        raise ScenarioError(f"bad scenario value: {exc}", "see simulations/README.md") from exc
