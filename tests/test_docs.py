"""The published tables agree with the evaluation files they are built from (docs/results/*.json).

The README's headline table and docs/results.md's rank and bootstrap tables are written by hand from
``python -m evaluation.report docs/results/*.json``; these tests fail when a new read lands in the JSON
files and a table is left behind.
"""

from __future__ import annotations

import json
import re

import pytest

from evaluation.report import headline_table, model_ranks
from tests.conftest import REPO

RESULTS = sorted((REPO / "docs" / "results").glob("*.json"))
DIRECTIONS = {"GEX to ATAC": "gex2atac", "ATAC to GEX": "atac2gex"}
COLUMNS = ("rmse", "pearson_cell", "auroc_cell", "ap_cell")


def _loaded() -> dict[str, dict]:
    if not RESULTS:
        pytest.fail("docs/results/*.json is empty: the final test runs' eval_results.json belong there")
    out = {}
    for path in RESULTS:
        data = json.loads(path.read_text())
        out[data["dataset"]] = data
    return out


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header line is ``header``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    assert start is not None, f"no table with the header {header!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_headline_table_is_the_report_of_the_results_files():
    readme = (REPO / "README.md").read_text()
    expected = headline_table(list(_loaded().values())).splitlines()
    lines = readme.splitlines()
    start = lines.index(expected[0])
    assert lines[start:start + len(expected)] == expected, "README's results table differs from `python -m evaluation.report docs/results/*.json`"


def test_results_md_rank_table_matches_the_results_files():
    results = _loaded()
    rows = _table((REPO / "docs" / "results.md").read_text(), "| dataset | direction | RMSE | Pearson (cell) | AUROC (cell) | AP (cell) | RMSE cut over the mean |")
    seen = set()
    for row in rows:
        dataset, direction = row[0], DIRECTIONS[row[1]]
        data = results[dataset]
        ranks = model_ranks(data)[direction]
        for key, cell in zip(COLUMNS, row[2:6], strict=True):
            if key not in ranks:
                assert cell == "", f"{dataset} {direction} {key}: no such metric, but the table says {cell!r}"
                continue
            assert int(re.search(r"\d+", cell).group()) == ranks[key], f"{dataset} {direction} {key}: table {cell!r}, report rank {ranks[key]}"
        block = data["directions"][direction]
        cut = 100 * (1 - block["model"]["rmse"] / block["baselines"]["mean"]["rmse"])
        assert row[6] == f"{cut:.2f}%", f"{dataset} {direction}: table cut {row[6]}, results file {cut:.2f}%"
        seen.add((dataset, direction))
    assert seen == {(d, k) for d, data in results.items() for k in data["directions"]}


def test_results_md_bootstrap_table_matches_the_results_files():
    results = _loaded()
    rows = _table((REPO / "docs" / "results.md").read_text(), "| dataset | direction | RMSE | Pearson (cell) | AUROC (cell) | AP (cell) |")
    assert rows, "docs/results.md has no bootstrap table"
    for row in rows:
        dataset, direction = row[0], DIRECTIONS[row[1]]
        boot = results[dataset]["bootstrap"][direction]["metrics"]
        for key, cell in zip(COLUMNS, row[2:6], strict=True):
            if key not in boot:
                assert cell == "", f"{dataset} {direction} {key}: no bootstrap, but the table says {cell!r}"
                continue
            assert cell.startswith(f"{100 * boot[key]['share_first']:.1f}%"), (
                f"{dataset} {direction} {key}: table {cell!r}, results file {100 * boot[key]['share_first']:.1f}%")
