"""Baselines on simulated arrays and on a small real MOp subset: they must beat the trivial guesses."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation.baselines import (
    MeanBaseline,
    SvdKnnBaseline,
    ZerosBaseline,
    fit_baselines,
)
from tests.conftest import shared_file
from translator.metrics_core import compute_metrics

SMALL_KNN = {"n_components": (8, 16), "k": (10, 30), "prior": (0.0, 10.0)}
SMALL_KRR = {"n_components": (8, 16), "gamma_scale": (0.3, 1.0), "alpha": (0.1, 1.0)}


def paired_cells(n_cells: int, seed: int, n_genes: int = 120, n_peaks: int = 300):
    """Paired GEX (log-norm CSR) and ATAC (binary CSR) driven by a shared hidden cell state."""
    rng = np.random.default_rng(seed)
    programs = np.random.default_rng(99).gamma(1.0, 1.0, size=(4, n_genes))
    access = np.random.default_rng(98).beta(0.4, 3.0, size=(4, n_peaks))
    mix = rng.dirichlet(np.full(4, 0.3), size=n_cells)
    gex = np.log1p(rng.poisson(mix @ programs * 2.0)).astype(np.float32)
    atac = (rng.random((n_cells, n_peaks)) < mix @ access).astype(np.float32)
    return sp.csr_matrix(gex), sp.csr_matrix(atac)


def _predict(model, source):
    return np.vstack(list(model.predict_chunks(source, 37)))


@pytest.mark.parametrize(("source", "target"), [("gex", "atac"), ("atac", "gex")])
def test_baselines_rank_on_simulated_cells(source, target):
    train, val, test = (dict(zip(("gex", "atac"), paired_cells(n, s), strict=True)) for n, s in ((300, 0), (80, 1), (80, 2)))
    models, settings = fit_baselines(
        source, target, (train[source], train[target]), (val[source], val[target]), knn_grid=SMALL_KNN, krr_grid=SMALL_KRR
    )
    truth = test[target]
    scores = {name: compute_metrics(_predict(m, test[source]), truth, target)["metrics"] for name, m in models.items()}
    assert scores["mean"]["rmse"] < scores["zeros"]["rmse"]
    for name in ("svd_knn", "svd_krr"):
        assert scores[name]["rmse"] < scores["mean"]["rmse"], name
        assert scores[name]["pearson_cell"] > scores["mean"]["pearson_cell"], name
        chosen = {k: settings[name][k] for k in ("n_components", "validation_rmse")}
        best = min(settings[name]["grid"], key=lambda t: t["validation_rmse"])
        assert chosen == {"n_components": best["n_components"], "validation_rmse": best["validation_rmse"]}
    prediction = _predict(models["svd_krr"], test[source])
    assert prediction.min() >= 0.0 and (target == "gex" or prediction.max() <= 1.0)
    assert prediction.shape == truth.shape


def test_zeros_and_mean_predict_what_they_say():
    gex, atac = paired_cells(50, 3)
    zeros = _predict(ZerosBaseline("gex", "atac").fit(gex, atac), gex[:7])
    assert zeros.shape == (7, atac.shape[1]) and not zeros.any()
    mean = _predict(MeanBaseline("gex", "atac").fit(gex, atac), gex[:7])
    np.testing.assert_allclose(mean[3], np.asarray(atac.mean(axis=0)).ravel(), rtol=1e-6)


def test_bad_arguments_are_refused():
    gex, atac = paired_cells(20, 4)
    with pytest.raises(ValueError, match="unknown baselines"):
        fit_baselines("gex", "atac", (gex, atac), (gex, atac), names=["knn"])
    with pytest.raises(ValueError, match="target must be one of"):
        SvdKnnBaseline("gex", "rna")
    with pytest.raises(ValueError, match="same cells"):
        fit_baselines("gex", "atac", (gex, atac[:5]), (gex, atac))


def _mop_matrices():
    import anndata as ad

    rna = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_rna.h5ad"))
    atac = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_atac.h5ad"))
    counts = sp.csr_matrix(rna.X, dtype=np.float32)
    size = np.asarray(counts.sum(axis=1)).ravel()
    gex = sp.csr_matrix(sp.diags(np.median(size) / size) @ counts)
    gex.data = np.log1p(gex.data)
    peaks = sp.csr_matrix(atac.X, dtype=np.float32)
    peaks.data[:] = 1.0
    return gex, peaks, np.asarray(rna.obs["batch"])


def test_baselines_on_real_mop_subset():
    """Train on 2,000 cells of nine libraries, validate on 300 cells of 09J (real SNARE-seq)."""
    gex, atac, batch = _mop_matrices()
    train = np.flatnonzero(~np.isin(batch, ["09J", "09K", "09L"]))
    train = train[np.linspace(0, train.size - 1, 2000).astype(int)]
    val = np.flatnonzero(batch == "09J")
    val = val[np.linspace(0, val.size - 1, 300).astype(int)]
    data = {"gex": gex, "atac": atac}

    grid = {"n_components": (32, 64), "k": (100, 200), "prior": (25.0, 100.0)}
    models, _ = fit_baselines(
        "gex", "atac", (gex[train], atac[train]), (gex[val], atac[val]), names=("zeros", "mean", "svd_knn"), knn_grid=grid
    )
    scores = {n: compute_metrics(_predict(m, gex[val]), atac[val], "atac")["metrics"] for n, m in models.items()}
    assert scores["mean"]["rmse"] < scores["zeros"]["rmse"]
    assert scores["svd_knn"]["rmse"] < scores["zeros"]["rmse"]
    assert scores["svd_knn"]["auroc_cell"] > scores["mean"]["auroc_cell"]
    assert scores["svd_knn"]["auroc_all"] > scores["mean"]["auroc_all"]

    models, settings = fit_baselines(
        "atac", "gex", (data["atac"][train], data["gex"][train]), (data["atac"][val], data["gex"][val]),
        knn_grid=SMALL_KNN, krr_grid=SMALL_KRR, krr_landmarks=300,
    )
    scores = {n: compute_metrics(_predict(m, atac[val]), gex[val], "gex")["metrics"] for n, m in models.items()}
    for name in ("svd_knn", "svd_krr"):
        assert scores[name]["rmse"] < scores["mean"]["rmse"] < scores["zeros"]["rmse"], name
    assert settings["svd_krr"]["landmarks"] == 300


def test_refit_baselines_keep_their_settings_and_learn_from_train_and_validation():
    """``fit_baselines(refit=True)``: tuned on validation as before, then fitted again on both splits with those settings."""
    train, val = (dict(zip(("gex", "atac"), paired_cells(n, s), strict=True)) for n, s in ((200, 0), (60, 1)))
    args = ("atac", "gex", (train["atac"], train["gex"]), (val["atac"], val["gex"]))
    tuned, tuned_settings = fit_baselines(*args, knn_grid=SMALL_KNN, krr_grid=SMALL_KRR)
    refit, refit_settings = fit_baselines(*args, knn_grid=SMALL_KNN, krr_grid=SMALL_KRR, refit=True)
    both = {m: sp.vstack([train[m], val[m]]).tocsr() for m in ("gex", "atac")}
    probe = paired_cells(30, 5)[1]
    np.testing.assert_allclose(_predict(refit["mean"], probe)[0], np.asarray(both["gex"].mean(axis=0)).ravel(), rtol=1e-5)
    for name in ("svd_knn", "svd_krr"):
        chosen = {k: v for k, v in tuned_settings[name].items() if k not in ("fit_seconds", "gamma", "landmarks")}
        again = {k: v for k, v in refit_settings[name].items() if k not in ("fit_seconds", "gamma", "landmarks", "refit_cells")}
        assert again == chosen, name  # the same grid point and the same validation scores
        if name == "svd_krr":
            assert (tuned_settings[name]["landmarks"], refit_settings[name]["landmarks"]) == (200, 260)  # exact kernel ridge on every cell
        assert refit_settings[name]["refit_cells"] == 260 and "refit_cells" not in tuned_settings[name]
        # the same settings fitted on both splits from scratch give the refit's predictions
        if name == "svd_knn":
            fresh = SvdKnnBaseline("atac", "gex", n_components=max(SMALL_KNN["n_components"]), k=chosen["k"], prior=chosen["prior"]).fit(both["atac"], both["gex"])
            fresh._fit_index(chosen["n_components"])
            np.testing.assert_allclose(_predict(refit[name], probe), _predict(fresh, probe), rtol=1e-5, atol=1e-6)
        assert not np.allclose(_predict(refit[name], probe), _predict(tuned[name], probe)), name  # 60 more cells change it
