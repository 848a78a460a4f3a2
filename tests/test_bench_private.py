"""``simulations/bench_private.py --quick``: every part runs and its table shows numbers.

Only the shape of the output is checked, never a timing target: the quick run is a smoke
test on a tiny network, and this machine's load is not the code's speed.
"""

from __future__ import annotations

import json
import re

import pytest
from support.scripts import load_script

bench = load_script("bench_private")

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_percentile_is_nearest_rank() -> None:
    assert bench.percentile([], 0.5) == 0.0
    assert bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    assert bench.percentile([float(i) for i in range(1, 11)], 1.0) == 10.0


def test_quick_run_prints_every_table_with_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for way in ("plain", "sealed", "sealed, after a re-key"):  # found, p50, p90, mean, RPCs
        assert re.search(rf"^{way} +\d+/\d+ +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M)
    assert re.search(rf"^sealed vs plain +[+-]{NUMBER} %", out, re.M)
    assert re.search(rf"^sealed, after a re-key vs plain +[+-]{NUMBER} %", out, re.M)
    assert re.search(rf"^remove one member \(target < 10 s\) +{NUMBER} s$", out, re.M)
    assert re.search(r"^  epoch pages published +[1-9]\d*$", out, re.M)
    assert re.search(r"^sample that caught up and read it \(\d+ at a time\) +\d+/\d+ ", out, re.M)
    assert re.search(r"^removed member +moved \d+ epochs", out, re.M)
    assert re.search(rf"^first piece +{NUMBER} +{NUMBER} / {NUMBER}$", out, re.M)
    assert re.search(rf"^invite to first piece \(median\) +{NUMBER}$", out, re.M)
    targets = out[out.index("\ntargets\n") :]
    assert len(re.findall(r"(?:yes|NO|no baseline)$", targets, re.M)) == 6


def test_only_one_part_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick", "--only", "rekey", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert "lookups" not in doc and "invite" not in doc
    assert doc["rekey"]["remove_s"] > 0 and doc["rekey"]["read_ok"] >= 0
