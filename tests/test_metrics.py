"""The metric core against sklearn / scipy, the sanity checks that catch metric bugs, the evaluate module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluation import load_metric
from tests.conftest import shared_file
from translator.metrics_core import (
    METRIC_KEYS,
    compute_metrics,
    histogram_auroc_ap,
    metric_keys,
    rowwise_auroc,
    rowwise_average_precision,
)


def simulated_atac(n_cells: int = 60, n_peaks: int = 400, seed: int = 0):
    """Binary truth with cell-type structure and a noisy probability prediction of it (with ties)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    rate = rng.beta(0.5, 4.0, size=(3, n_peaks))
    truth = (rng.random((n_cells, n_peaks)) < rate[types]).astype(np.float32)
    pred = np.clip(0.6 * rate[types] + 0.3 * truth + 0.2 * rng.random((n_cells, n_peaks)), 0, 1)
    pred = np.round(pred, 2)  # ties, as real predictions have
    return pred.astype(np.float32), truth, np.array([f"t{t}" for t in types])


def simulated_gex(n_cells: int = 60, n_genes: int = 150, seed: int = 1):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    level = rng.gamma(1.0, 1.0, size=(3, n_genes))
    truth = np.where(rng.random((n_cells, n_genes)) < 0.3, np.log1p(rng.poisson(level[types] * 3)), 0.0)
    pred = np.maximum(0.0, 0.3 * np.log1p(level[types] * 3) + rng.normal(0, 0.2, truth.shape))
    return pred.astype(np.float32), truth.astype(np.float32)


def test_rowwise_auroc_and_ap_equal_sklearn_with_ties():
    pred, truth, _ = simulated_atac()
    auroc = rowwise_auroc(pred, truth > 0)
    ap = rowwise_average_precision(pred, truth > 0)
    for i in range(truth.shape[0]):
        if 0 < truth[i].sum() < truth.shape[1]:
            assert auroc[i] == pytest.approx(roc_auc_score(truth[i], pred[i]), abs=1e-12)
            assert ap[i] == pytest.approx(average_precision_score(truth[i], pred[i]), abs=1e-12)
        else:
            assert np.isnan(auroc[i]) and np.isnan(ap[i])


def test_one_sort_gives_the_rowwise_auroc_and_ap_with_ties():
    from translator.metrics_core import rowwise_auroc_ap, rowwise_average_precision

    rng = np.random.default_rng(3)
    for scores in (rng.random((40, 200)), rng.integers(0, 4, (40, 200)).astype(np.float32)):
        labels = rng.random((40, 200)) < 0.15
        labels[0], labels[1] = False, True  # a row with one class: NaN in both
        auroc, ap = rowwise_auroc_ap(scores, labels)
        np.testing.assert_allclose(auroc, rowwise_auroc(scores, labels), rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(ap, rowwise_average_precision(scores, labels), rtol=1e-12, equal_nan=True)
        assert np.isnan(auroc[:2]).all() and np.isnan(ap[:2]).all()


def test_histogram_auroc_ap_exact_on_binned_scores_and_close_otherwise():
    pred, truth, _ = simulated_atac(seed=3)
    n_bins = 50
    binned = (np.floor(pred * n_bins).clip(0, n_bins - 1) + 0.5) / n_bins
    idx = (binned * n_bins).astype(int)
    hist_pos = np.bincount(idx[truth > 0], minlength=n_bins)
    hist_neg = np.bincount(idx[truth == 0], minlength=n_bins)
    auroc, ap = histogram_auroc_ap(hist_pos, hist_neg)
    assert auroc == pytest.approx(roc_auc_score(truth.ravel(), binned.ravel()), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(truth.ravel(), binned.ravel()), abs=1e-12)
    # the default 10,000 bins on raw (unbinned) scores: within 1e-3 of the exact values
    rng = np.random.default_rng(0)
    raw = np.clip(pred + rng.normal(0, 0.01, pred.shape), 0, 1)
    m = compute_metrics(raw, truth, "atac")["metrics"]
    assert m["auroc_all"] == pytest.approx(roc_auc_score(truth.ravel(), raw.ravel()), abs=1e-3)
    assert m["ap_all"] == pytest.approx(average_precision_score(truth.ravel(), raw.ravel()), abs=1e-3)


def test_correlations_equal_scipy():
    pred, truth = simulated_gex()
    m = compute_metrics(pred, sp.csr_matrix(truth), "gex")["metrics"]
    cells = [i for i in range(truth.shape[0]) if truth[i].std() > 0]
    feats = [j for j in range(truth.shape[1]) if truth[:, j].std() > 0]
    assert m["pearson_cell"] == pytest.approx(np.mean([pearsonr(pred[i], truth[i])[0] for i in cells]), abs=1e-6)
    assert m["spearman_cell"] == pytest.approx(np.mean([spearmanr(pred[i], truth[i])[0] for i in cells]), abs=1e-6)
    assert m["pearson_feature"] == pytest.approx(np.mean([pearsonr(pred[:, j], truth[:, j])[0] for j in feats]), abs=1e-6)
    assert m["spearman_feature"] == pytest.approx(np.mean([spearmanr(pred[:, j], truth[:, j])[0] for j in feats]), abs=1e-6)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), rel=1e-6)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), rel=1e-6)


def test_chunked_sparse_equals_unchunked_dense():
    pred, truth, types = simulated_atac(n_cells=45)
    one = compute_metrics(pred, truth, "atac", cell_types=types, chunk_cells=45)
    many = compute_metrics(pred, sp.csr_matrix(truth), "atac", cell_types=types, chunk_cells=4)
    for key, value in one["metrics"].items():
        assert many["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for label, row in one["by_cell_type"].items():
        for key, value in row.items():
            assert many["by_cell_type"][label][key] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_spearman_feature_on_a_bounded_cell_sample():
    pred, truth = simulated_gex(n_cells=80)
    full = compute_metrics(pred, truth, "gex")
    sampled = compute_metrics(pred, truth, "gex", feature_rank_max_entries=40 * truth.shape[1])
    assert full["details"]["spearman_feature_cells"] == 80
    assert sampled["details"]["spearman_feature_cells"] == 40
    assert sampled["metrics"]["spearman_feature"] == pytest.approx(full["metrics"]["spearman_feature"], abs=0.1)


@pytest.mark.parametrize("target", ["atac", "gex"])
def test_perfect_prediction_and_shuffled_truth(target):
    pred, truth = (simulated_atac()[:2] if target == "atac" else simulated_gex())
    perfect = compute_metrics(truth.copy(), sp.csr_matrix(truth), target)["metrics"]
    assert perfect["rmse"] == 0.0 and perfect["mae"] == 0.0
    for key in ("pearson_cell", "pearson_feature", "spearman_cell", "spearman_feature", "token_f1", "token_jaccard", "accuracy_binary"):
        assert perfect[key] == pytest.approx(1.0), key
    if target == "atac":
        for key in ("auroc_cell", "ap_cell", "auroc_all", "ap_all"):
            assert perfect[key] == pytest.approx(1.0), key
    shuffled = compute_metrics(truth[np.random.default_rng(0).permutation(truth.shape[0])], truth, target)["metrics"]
    assert shuffled["rmse"] > perfect["rmse"] + 0.01
    assert shuffled["pearson_cell"] < 0.9 and shuffled["token_f1"] < 0.9
    if target == "atac":
        assert shuffled["auroc_cell"] < 0.9


def test_mean_beats_zeros_and_metric_keys_on_simulated_arrays():
    _, truth, _ = simulated_atac(n_cells=80)
    train, test = truth[:40], truth[40:]
    zeros = compute_metrics(np.zeros_like(test), test, "atac")["metrics"]
    mean = compute_metrics(np.broadcast_to(train.mean(0), test.shape).copy(), test, "atac")["metrics"]
    assert mean["rmse"] < zeros["rmse"]
    assert zeros["auroc_cell"] == pytest.approx(0.5) and zeros["accuracy_binary"] == zeros["accuracy_binary_all_zeros"]
    assert mean["auroc_cell"] > 0.6
    assert set(metric_keys("atac")) == set(zeros) and set(METRIC_KEYS) <= set(zeros)
    gex = compute_metrics(np.zeros((3, 5)), np.eye(3, 5), "gex")["metrics"]
    assert set(gex) == set(metric_keys("gex")) and "auroc_cell" not in gex


def test_mean_beats_zeros_on_real_mop_subset():
    import anndata as ad

    atac = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_atac.h5ad"), backed="r")
    rna = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_rna.h5ad"), backed="r")
    batch = np.asarray(rna.obs["batch"])
    train = np.flatnonzero(batch == "09A")[:300]
    test = np.flatnonzero(batch == "09J")[:200]
    counts = sp.csr_matrix(rna.X[np.concatenate([train, test])], dtype=np.float32)
    size = np.asarray(counts.sum(axis=1)).ravel()
    gex = sp.csr_matrix(sp.diags(np.median(size) / size) @ counts)
    gex.data = np.log1p(gex.data)
    peaks = sp.csr_matrix(atac.X[np.concatenate([train, test])], dtype=np.float32)
    peaks.data[:] = 1.0
    for target, matrix in (("gex", gex), ("atac", peaks)):
        truth = matrix[len(train) :]
        mean = np.asarray(matrix[: len(train)].mean(axis=0)).ravel()
        m_mean = compute_metrics(np.broadcast_to(mean, truth.shape).copy(), truth, target)["metrics"]
        m_zero = compute_metrics(np.zeros(truth.shape, dtype=np.float32), truth, target)["metrics"]
        assert m_mean["rmse"] < m_zero["rmse"], target
        assert m_mean["pearson_cell"] > 0.05, target


def test_token_metrics_from_sentences():
    truth = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    pred = np.zeros_like(truth)
    names = ["p0", "p1", "p2", "p3"]
    out = compute_metrics(pred, truth, "atac", predicted_sentences=["p0 p2 p2 </s>", ""], feature_names=names)
    m = out["metrics"]
    # cell 0: predicted {p0, p2, </s>} vs {p0, p1}: tp 1, F1 2/5, Jaccard 1/4; cell 1: both empty -> 1
    assert m["token_f1"] == pytest.approx((0.4 + 1.0) / 2)
    assert m["token_jaccard"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["token_precision"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert out["details"]["token_source"] == "sentences"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        compute_metrics(np.zeros((2, 3)), np.zeros((2, 4)), "atac")
    with pytest.raises(ValueError, match="target must be one of"):
        compute_metrics(np.zeros((2, 3)), np.zeros((2, 3)), "rna")
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.full((2, 3), np.nan), np.zeros((2, 3)), "gex")


def test_evaluate_module_loads_offline_by_path_and_matches_core():
    pred, truth, types = simulated_atac(n_cells=20, n_peaks=50)
    metric = load_metric("atac")
    rows = metric.compute(predictions=pred.tolist(), references=truth.tolist())
    whole = metric.compute(prediction_matrix=pred, reference_matrix=sp.csr_matrix(truth), cell_types=types)
    core = compute_metrics(pred, truth, "atac")["metrics"]
    for key in METRIC_KEYS:
        assert rows[key] == pytest.approx(core[key], rel=1e-6), key
        assert whole[key] == pytest.approx(core[key], rel=1e-6), key
    assert set(whole["by_cell_type"]) == set(types)
    gex = load_metric("gex").compute(predictions=[[0.5, 0.0], [0.0, 2.0]], references=[[1.0, 0.0], [0.0, 2.0]])
    assert gex["rmse"] == pytest.approx(np.sqrt(0.25 / 4))
    with pytest.raises(ValueError):
        load_metric("rna")
    import evaluate

    from evaluation import METRIC_PATH

    plain = evaluate.load(str(METRIC_PATH))
    assert plain.compute(predictions=pred.tolist(), references=truth.tolist(), target="atac")["rmse"] == pytest.approx(core["rmse"], rel=1e-6)
    with pytest.raises(ValueError, match="which modality"):
        plain.compute(predictions=pred.tolist(), references=truth.tolist())


def test_evaluate_module_is_self_contained_and_equals_the_package(tmp_path):
    """The metric folder as it is published (links resolved), loaded where the repository's packages cannot be imported."""
    import json
    import shutil
    import subprocess
    import sys

    from evaluation import METRIC_PATH

    folder = tmp_path / "cell_translation"
    shutil.copytree(METRIC_PATH, folder, symlinks=False)
    pred, truth, _ = simulated_atac(n_cells=20, n_peaks=50)
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "truth.npy", truth)
    script = f"""
import json, sys
for name in ("evaluation", "translator", "dataset_builder", "tokenizer"):
    sys.modules[name] = None  # importing the repository's packages fails here
import evaluate, numpy as np
pred, truth = np.load({str(tmp_path / "pred.npy")!r}), np.load({str(tmp_path / "truth.npy")!r})
out = {{}}
for target, p, t in (("atac", pred, truth), ("gex", 3 * pred, 2 * truth)):
    out[target] = evaluate.load({str(folder)!r}, target).compute(predictions=p.tolist(), references=t.tolist())
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for target, p, t in (("atac", pred, truth), ("gex", 3 * pred, 2 * truth)):
        core = compute_metrics(p.astype(np.float32), t.astype(np.float32), target)["metrics"]
        assert set(got[target]) == set(core)
        for key, value in core.items():
            assert got[target][key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), (target, key)
