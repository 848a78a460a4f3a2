"""``dhtshare simulate`` through the CLI: the JSON summary, and the same seed plays the same run."""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner

from dhtshare.cli.main import main


def simulate(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["simulate", "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_default_scenario_summary() -> None:
    doc = simulate("--size", "6M", "--nodes", "14", "--seed", "7")
    assert doc["ok"] is True
    assert doc["nodes"] == 14
    assert doc["startup_s"] > 0
    assert doc["peak_rss_mb"] > 0
    lookups = doc["lookups"]
    assert lookups["count"] > 0
    assert lookups["success_rate"] == 1.0
    assert 0 < lookups["p50_ms"] <= lookups["p95_ms"]
    assert lookups["rpcs_per_lookup"] > 0
    assert len(doc["downloads"]) == 3
    for download in doc["downloads"]:
        assert download["verified"] is True
        assert download["seconds"] > 0
        assert download["mb_s"] > 0
        assert len(download["sources"]) >= 2  # pieces came from several peers at once
    assert set(doc["seeders"]) == {"seeder0", "seeder1", "seeder2"}
    assert sum(doc["seeders"].values()) > 0
    assert any("left half-way" in e["event"] for e in doc["churn_events"])


def test_same_seed_same_scenario() -> None:
    first = simulate("--size", "2M", "--nodes", "16", "--seed", "3", "--churn", "0.3")
    again = simulate("--size", "2M", "--nodes", "16", "--seed", "3", "--churn", "0.3")
    other = simulate("--size", "2M", "--nodes", "16", "--seed", "4", "--churn", "0.3")
    assert first["plan"] == again["plan"]
    assert first["plan"]["churned_nodes"]
    levels = first["lookups"]["by_churn"]
    assert levels[0]["churn"] == 0.0
    assert levels[1]["churn"] > 0
    assert all(lv["success_rate"] == 1.0 and lv["count"] > 0 for lv in levels)
    assert any("churn: stopped" in e["event"] for e in first["churn_events"])
    assert first["plan"]["file_sha256"] != other["plan"]["file_sha256"]
    assert first["plan"]["members"] != other["plan"]["members"]


def test_bad_options_give_one_line_errors() -> None:
    result = CliRunner().invoke(main, ["simulate", "--size", "lots"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: not a size")
    assert "Traceback" not in result.stderr
    result = CliRunner().invoke(main, ["simulate", "--nodes", "4", "--size", "1M"])
    assert result.exit_code != 0
    assert "cannot hold" in result.stderr
