"""``--size``: a plain number is MiB, as ``--size 128`` reads to a person; K, M and G still work."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dhtshare.cli.main import main
from dhtshare.errors import ScenarioError
from dhtshare.sim.scenario import load_scenario, parse_size

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("128", 128 * MiB),
        (" 2 ", 2 * MiB),
        ("0.5", MiB // 2),
        ("0", 0),
        (0, 0),
        (64, 64 * MiB),  # a number in a scenario file reads the same
        ("512K", 512 * 1024),
        ("64M", 64 * MiB),
        ("64m", 64 * MiB),
        ("64MiB", 64 * MiB),
        ("64MB", 64 * MiB),
        ("1G", 1024 * MiB),
        ("1.5g", 1536 * MiB),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1", "64B", "64T", "M", True])
def test_parse_size_refuses(text: str | bool) -> None:
    with pytest.raises(ScenarioError, match="not a size"):
        parse_size(text)


def test_scenario_file_and_option_sizes() -> None:
    assert load_scenario(None, {"size": "3"}).size == 3 * MiB
    assert load_scenario(None, {"size": 3}).size == 3 * MiB


def test_simulate_size_option_is_mib() -> None:
    args = ["simulate", "--json", "--size", "1", "--nodes", "6", "--seeders", "1"]
    result = CliRunner().invoke(main, [*args, "--downloaders", "1", "--seed", "2"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["scenario"]["size"] == MiB
    assert [d["verified"] for d in doc["downloads"]] == [True]
