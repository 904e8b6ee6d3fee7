"""The cross-dataset benchmark command on tiny simulated data, and its verdict rule."""

from __future__ import annotations

import json

import pytest

from dataset_builder.simulate import write_simulated
from evaluation.benchmark import main, parse_inputs, verdicts


def _results(model_rmse: float, interval: list[float], model_pearson: float, pearson_interval: list[float]) -> dict:
    """A run_evaluation result with a bootstrap block: the model against mean (best RMSE) and svd_krr (best Pearson)."""
    return {
        "directions": {"atac2gex": {"model": {"rmse": model_rmse, "pearson_cell": model_pearson},
                                    "baselines": {"mean": {"rmse": 0.50, "pearson_cell": 0.40}, "svd_krr": {"rmse": 0.52, "pearson_cell": 0.45}}}},
        "bootstrap": {"atac2gex": {"metrics": {
            "rmse": {"share_first": 0.9, "versus": {"mean": {"difference": model_rmse - 0.50, "interval_95": interval},
                                                    "svd_krr": {"difference": model_rmse - 0.52, "interval_95": [-1.0, 1.0]}}},
            "pearson_cell": {"share_first": 0.5, "versus": {"mean": {"difference": model_pearson - 0.40, "interval_95": [-1.0, 1.0]},
                                                            "svd_krr": {"difference": model_pearson - 0.45, "interval_95": pearson_interval}}},
        }}},
    }


def test_the_verdict_is_ahead_or_behind_only_where_the_interval_of_the_margin_over_the_best_baseline_excludes_zero():
    rows = {r["metric"]: r for r in verdicts(_results(0.48, [-0.03, -0.01], 0.44, [-0.02, 0.01]))}
    # RMSE: lower is better, so the margin is baseline minus model, and its interval flips sign.
    assert rows["rmse"]["best_baseline"] == "mean" and rows["rmse"]["margin"] == pytest.approx(0.02)
    assert rows["rmse"]["interval_95"] == [0.01, 0.03] and rows["rmse"]["verdict"] == "ahead"
    assert rows["pearson_cell"]["best_baseline"] == "svd_krr" and rows["pearson_cell"]["margin"] == pytest.approx(-0.01)
    assert rows["pearson_cell"]["verdict"] == "tied"
    rows = {r["metric"]: r for r in verdicts(_results(0.53, [0.01, 0.05], 0.30, [-0.2, -0.1]))}
    assert rows["rmse"]["verdict"] == "behind" and rows["pearson_cell"]["verdict"] == "behind"


def test_bad_inputs_get_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="write NAME=FILE"):
        parse_inputs(["just_a_file.h5ad"])
    with pytest.raises(FileNotFoundError, match="--input a: .*missing.h5ad not found"):
        parse_inputs([f"a={tmp_path / 'missing.h5ad'}"])
    assert main(["--input", "a", "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_benchmark_builds_trains_and_scores_a_dataset_in_one_table(tmp_path):
    """A simulated dataset split by the builder's batch options: one JSON and one markdown table with a row per
    direction and headline metric, margins oriented so that positive is better, verdicts that follow the intervals."""
    batched = write_simulated(tmp_path / "in" / "batched.h5mu", n_cells=120, n_genes=20, peaks_per_gene=3, seed=2)
    out = tmp_path / "bench"
    code = main(["--input", f"batched={batched}", "--build_args", "batched=--test_batches sim4 --validation_batches sim3",
                 "--time_budget_s", "20", "--bootstrap", "50", "--output_dir", str(out)])
    assert code == 0
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["split"] == "validation" and set(summary["datasets"]) == {"batched"}
    entry = summary["datasets"]["batched"]
    assert {(r["direction"], r["metric"]) for r in entry["rows"]} == {
        ("gex2atac", "rmse"), ("gex2atac", "pearson_cell"), ("gex2atac", "auroc_cell"), ("gex2atac", "ap_cell"),
        ("atac2gex", "rmse"), ("atac2gex", "pearson_cell")}
    for row in entry["rows"]:
        low, high = row["interval_95"]
        assert low <= high and row["best_baseline"] in ("zeros", "mean", "svd_knn", "svd_krr")
        assert row["verdict"] == ("ahead" if low > 0 else "behind" if high < 0 else "tied")
        better = row["baseline"] - row["model"] if row["metric"] == "rmse" else row["model"] - row["baseline"]
        assert row["margin"] == pytest.approx(better)
        # Beside it, the transformer's readout alone against the same baselines, and the blend's weights.
        alone = row["transformer_alone"]
        assert alone["best_baseline"] in ("zeros", "mean", "svd_knn", "svd_krr") and alone["verdict"] in ("ahead", "tied", "behind")
        assert sum(row["weights"].values()) == pytest.approx(1.0)
    table = (out / "benchmark.md").read_text()
    assert sum(line.startswith("| batched |") for line in table.splitlines()) == 6
    assert entry["training"]["completed_steps"] > 0
    # The batch options reached the builder: the scored validation split is batch sim3's 30 cells.
    assert entry["n_cells"] == 30
