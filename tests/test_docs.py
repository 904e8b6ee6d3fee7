"""The published tables agree with the evaluation files they are built from (docs/results/*.json).

README.md and docs/results.md carry the margin table (the model against the best tuned baseline per
metric, with the paired bootstrap's sd and share of redraws); docs/results.md also carries the full table
of ``python -m evaluation.report docs/results/*.json``. These tests fail when a results file changes and a
table is left behind, or when a table is edited by hand away from its file.
"""

from __future__ import annotations

import json

import pytest

from evaluation.report import headline_table
from tests.conftest import REPO
from tokenizer import DIRECTION_NAMES

RESULTS = sorted((REPO / "docs" / "results").glob("*.json"))
METRICS = {"rmse": "RMSE", "pearson_cell": "Pearson (cell)", "auroc_cell": "AUROC (cell)", "ap_cell": "AP (cell)"}
BASELINES = ("zeros", "mean", "svd_knn", "svd_krr")
MARGIN_HEADER = "| dataset | direction | metric | model | best baseline | margin (sd) | model ahead in | verdict |"


def _loaded() -> list[dict]:
    if not RESULTS:
        pytest.fail("docs/results/*.json is empty: the final test runs' eval_results.json belong there")
    return [json.loads(path.read_text()) for path in RESULTS]


def margin_table(results_list: list[dict]) -> list[str]:
    """The margin table's lines: per dataset, direction and headline metric, the model, the best tuned baseline,
    the model's margin over it with the bootstrap sd, the share of redraws in which the model is ahead, and the
    verdict (ahead: the model ahead in more than 97.5% of redraws; behind: in fewer than 2.5%; tied otherwise)."""
    lines = [MARGIN_HEADER, "|---|---|---|---|---|---|---|---|"]
    for results in results_list:
        for direction, block in results["directions"].items():
            boot = results["bootstrap"][direction]["metrics"]
            for key, label in METRICS.items():
                if key not in block["model"]:
                    continue
                scores = {name: block["baselines"][name][key] for name in BASELINES if name in block["baselines"]}
                best = (min if key == "rmse" else max)(scores, key=scores.get)
                versus = boot[key]["versus"][best]
                ahead = versus["share_ahead"]
                verdict = "ahead" if ahead > 0.975 else "behind" if ahead < 0.025 else "tied"
                lines.append(
                    f"| {results['dataset']} | {DIRECTION_NAMES[direction]} | {label} | {block['model'][key]:.6f} | "
                    f"{best} {scores[best]:.6f} | {versus['difference']:+.6f} ({versus['sd']:.6f}) | {100 * ahead:.1f}% | {verdict} |")
    return lines


def _assert_block(path, expected: list[str]) -> None:
    lines = path.read_text().splitlines()
    assert expected[0] in lines, f"{path.name} has no table with the header {expected[0]!r}"
    start = lines.index(expected[0])
    assert lines[start:start + len(expected)] == expected, f"{path.name}'s table differs from docs/results/*.json"


def test_readme_margin_table_is_that_of_the_results_files():
    _assert_block(REPO / "README.md", margin_table(_loaded()))


def test_results_md_margin_table_is_that_of_the_results_files():
    _assert_block(REPO / "docs" / "results.md", margin_table(_loaded()))


def test_results_md_full_table_is_the_report_of_the_results_files():
    _assert_block(REPO / "docs" / "results.md", headline_table(_loaded()).splitlines())


def test_the_margin_table_reads_the_bootstrap_of_the_best_baseline():
    """On a made-up results file: the best baseline per metric is chosen by its direction (lower RMSE, higher
    Pearson) and the verdict follows the share of redraws."""
    block = {"model": {"rmse": 0.5, "pearson_cell": 0.3},
             "baselines": {"mean": {"rmse": 0.6, "pearson_cell": 0.4}, "svd_krr": {"rmse": 0.55, "pearson_cell": 0.2}}}
    boot = {"rmse": {"versus": {"svd_krr": {"difference": -0.05, "sd": 0.01, "share_ahead": 0.99}}},
            "pearson_cell": {"versus": {"mean": {"difference": -0.1, "sd": 0.02, "share_ahead": 0.01}}}}
    results = {"dataset": "toy", "directions": {"atac2gex": block}, "bootstrap": {"atac2gex": {"metrics": boot}}}
    rows = margin_table([results])[2:]
    assert rows == ["| toy | ATAC to GEX | RMSE | 0.500000 | svd_krr 0.550000 | -0.050000 (0.010000) | 99.0% | ahead |",
                    "| toy | ATAC to GEX | Pearson (cell) | 0.300000 | mean 0.400000 | -0.100000 (0.020000) | 1.0% | behind |"]
