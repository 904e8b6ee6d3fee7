"""The published tables agree with the benchmark file they are built from (docs/results/benchmark.json).

docs/results.md carries the benchmark's full table (``evaluation.benchmark.markdown``), README.md its compact table
(``evaluation.benchmark.compact_table``). These tests fail when the results file changes and a table is left behind,
or when a table is edited by hand away from its file.
"""

from __future__ import annotations

import json

import pytest

from evaluation.benchmark import compact_table, markdown, verdicts, with_transformer_alone
from tests.conftest import REPO

RESULTS = REPO / "docs" / "results" / "benchmark.json"


def _summary() -> dict:
    if not RESULTS.exists():
        pytest.fail("docs/results/benchmark.json is missing: the cross-dataset benchmark's summary belongs there")
    return json.loads(RESULTS.read_text())


def _assert_block(path, expected: list[str]) -> None:
    lines = path.read_text().splitlines()
    header = next(line for line in expected if line.startswith("|"))
    assert header in lines, f"{path.name} has no table with the header {header!r}"
    start = lines.index(header)
    table = [line for line in expected if line.startswith("|")]
    assert lines[start:start + len(table)] == table, f"{path.name}'s table differs from docs/results/benchmark.json"


def test_readme_table_is_the_compact_table_of_the_benchmark():
    _assert_block(REPO / "README.md", compact_table(_summary()).splitlines())


def test_results_md_table_is_the_benchmark_table():
    _assert_block(REPO / "docs" / "results.md", markdown(_summary()).splitlines())


def test_the_compact_table_gives_each_metric_its_margin_and_verdict_and_the_blend_weights():
    """On a made-up evaluation: the best baseline per metric is chosen by its direction (lower RMSE, higher Pearson),
    the verdict follows the interval, the transformer alone and the weights ride along."""
    block = {"model": {"rmse": 0.5, "pearson_cell": 0.3}, "transformer_alone": {"rmse": 0.52, "pearson_cell": 0.25},
             "blend_weights": {"transformer": 0.6, "kernel": 0.4, "mean": 0.0},
             "baselines": {"mean": {"rmse": 0.6, "pearson_cell": 0.4}, "svd_krr": {"rmse": 0.55, "pearson_cell": 0.2}}}

    def boot(rmse_interval, pearson_interval):
        return {"metrics": {"rmse": {"share_first": 1.0, "versus": {"svd_krr": {"difference": -0.05, "interval_95": rmse_interval}}},
                            "pearson_cell": {"share_first": 0.0, "versus": {"mean": {"difference": -0.1, "interval_95": pearson_interval}}}}}

    results = {"directions": {"atac2gex": block}, "bootstrap": {"atac2gex": boot([-0.07, -0.03], [-0.15, -0.05])},
               "bootstrap_transformer_alone": {"atac2gex": boot([-0.04, 0.01], [-0.2, -0.1])}}
    rows = with_transformer_alone(verdicts(results), results)
    summary = {"datasets": {"toy": {"n_cells": 10, "rows": rows}}}
    assert compact_table(summary).splitlines()[2] == "| toy | 10 | ATAC to GEX | +0.05000 ahead | -0.10000 behind | - | - | 0.60/0.40/0.00 |"
    rmse = next(r for r in rows if r["metric"] == "rmse")
    assert rmse["transformer_alone"]["verdict"] == "tied" and rmse["transformer_alone"]["best_baseline"] == "svd_krr"
