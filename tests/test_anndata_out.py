"""AnnData out keeps what came in: the source's obs and obsm, the target features as the training data named them,
their annotations, and which model made the prediction."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO, shared_file
from tests.test_train import ENV
from tests.translator_fixtures import build_real, tiny_args

PBMC = "pbmc_markers/pbmc1k_markers.h5mu"  # 10x Multiome, peaks named chr1:100-200, var gene_ids / genome / interval

md.set_options(pull_on_update=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model trained on the PBMC file as Cell Ranger ARC named its features."""
    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pbmc")
    data, tok = build_real(root, shared_file(PBMC))
    out = root / "model"
    assert train.main(tiny_args(data, tok, out, "--max_steps", "4", "--checkpointing_steps", "0")) == 0
    return out


@pytest.fixture(scope="module")
def cells():
    """The PBMC cells with a lab's own obs columns and an embedding, as a user's MuData would carry them."""
    mdata = md.read_h5mu(shared_file(PBMC))
    rna, atac = mdata["rna"], mdata["atac"]
    rng = np.random.default_rng(0)
    rna.obs["leiden"] = pd.Categorical(rng.choice(["0", "1", "2"], rna.n_obs))
    rna.obs["n_counts"] = np.asarray(rna.X.sum(axis=1)).ravel().astype(np.float32)
    rna.obsm["X_umap"] = rng.normal(size=(rna.n_obs, 2)).astype(np.float32)
    atac.obs["tss_score"] = rng.random(atac.n_obs)
    atac.obsm["X_lsi"] = rng.normal(size=(atac.n_obs, 5))
    return rna, atac


def test_gex_to_atac_keeps_obs_obsm_and_the_users_peak_names(model_dir, tmp_path, cells):
    from translator import CellTranslator

    rna, atac = cells
    path = tmp_path / "rna.h5ad"
    rna.write_h5ad(path)
    output = tmp_path / "pred.h5ad"
    cmd = [sys.executable, "predict.py", "--model", str(model_dir), "--input", str(path), "--direction", "gex2atac", "--output", str(output)]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pred = ad.read_h5ad(output)
    # Cells: every obs column and obsm array of the input, unchanged.
    assert list(pred.obs_names) == list(rna.obs_names)
    pd.testing.assert_frame_equal(pred.obs[list(rna.obs.columns)], rna.obs, check_names=False)
    np.testing.assert_array_equal(pred.obsm["X_umap"], rna.obsm["X_umap"])
    # Features: the peaks as the training file named them (chr1:100-200), aligned with the user's own ATAC data.
    assert sorted(pred.var_names) == sorted(atac.var_names)
    assert all(":" in name for name in pred.var_names)
    assert list(pred.var["normalized_name"]) == [n.replace(":", "-") for n in pred.var_names]
    for column in ("gene_ids", "genome", "interval"):
        assert list(pred.var[column]) == list(atac.var.loc[pred.var_names, column].astype(str))
    assert (pred.var["feature_types"] == "ATAC").all()
    # Provenance: which model, direction and package version.
    uns = pred.uns["cell_translation"]
    assert uns["model"] == str(model_dir) and uns["direction"] == "gex2atac"
    assert uns["package_version"] == importlib.metadata.version("cell-sentences")
    # The in-memory API gives the same AnnData.
    same = CellTranslator.from_pretrained(model_dir).predict_anndata(rna, "gex2atac")
    assert list(same.var_names) == list(pred.var_names) and list(same.obs.columns) == list(pred.obs.columns)
    np.testing.assert_allclose(np.asarray(same.X), np.asarray(pred.X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(same.obsm["X_umap"], rna.obsm["X_umap"])
    assert same.uns["cell_translation"]["model"] == str(model_dir)


def test_atac_to_gex_from_a_mudata_keeps_the_gene_annotations(model_dir, cells):
    from translator import CellTranslator

    rna, atac = cells
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["sample"] = "pbmc1k"  # a MuData-level column
    pred = CellTranslator.from_pretrained(model_dir).predict_anndata(mdata, "atac2gex")
    assert list(pred.obs_names) == list(atac.obs_names)
    assert {"tss_score", "sample"} <= set(pred.obs.columns) and (pred.obs["sample"] == "pbmc1k").all()
    np.testing.assert_array_equal(pred.obsm["X_lsi"], atac.obsm["X_lsi"])
    assert list(pred.var_names) == list(rna.var_names)
    assert list(pred.var["gene_ids"]) == list(rna.var["gene_ids"].astype(str))
