"""Prediction inputs crafted from the BMMC starter files: how many of the model's peaks an input reaches, and the
hint when it reaches too few. Only the source matrix and the model's feature names are needed (no trained model)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from tests.conftest import shared_file
from translator.anndata_io import source_sentences_from_anndata

GEX = "bmmc_starter/openproblems_bmmc_multiome_starter.test_mod1.h5ad"
ATAC = "bmmc_starter/openproblems_bmmc_multiome_starter.test_mod2.h5ad"


@pytest.fixture(scope="module")
def bmmc():
    gex, atac = ad.read_h5ad(shared_file(GEX)), ad.read_h5ad(shared_file(ATAC))
    meta = {"genes": list(gex.var_names), "peaks": list(atac.var_names), "gex_encoding": "rank"}
    return gex, atac, meta


def _atac(atac: ad.AnnData, matrix, names: list[str]) -> ad.AnnData:
    out = ad.AnnData(X=matrix, obs=atac.obs[[]].copy())
    out.var_names = names
    return out


def test_peaks_without_chr_beside_an_alt_contig_get_the_chr_hint(bmmc):
    _, atac, meta = bmmc
    assert any(not p.startswith("chr") for p in meta["peaks"])  # GL000205.2 carries no prefix in the model either
    stripped = _atac(atac, atac.layers["counts"].copy(), [p.removeprefix("chr") for p in atac.var_names])
    with pytest.raises(ValueError, match=r"overlap only \d+ of the model's 600 peaks.*lack the 'chr' prefix of the model's"):
        source_sentences_from_anndata(stripped, "atac2gex", meta)


def test_a_broader_peak_set_reaches_every_model_peak_it_overlaps(bmmc, caplog):
    _, atac, meta = bmmc
    peaks = [p.split("-") for p in atac.var_names]
    # Neighbouring peaks of a chromosome merged pairwise: one broad input peak over two model peaks.
    pairs = [(i, i + 1) for i in range(0, len(peaks) - 1, 2) if peaks[i][0] == peaks[i + 1][0]]
    broad = [f"{peaks[a][0]}-{peaks[a][1]}-{peaks[b][2]}" for a, b in pairs]
    counts = atac.layers["counts"].tocsc()
    merged = np.column_stack([(counts[:, a] + counts[:, b]).toarray().ravel() for a, b in pairs]).astype(np.float32)
    caplog.set_level("WARNING")
    sentences, _, stats = source_sentences_from_anndata(_atac(atac, merged, broad), "atac2gex", meta)
    assert stats["mapped_peaks"] == len(pairs) and stats["model_features_found"] == 2 * len(pairs)
    unreached = len(meta["peaks"]) - 2 * len(pairs)
    assert f"({unreached} reached by no input peak)" in caplog.text
    # A cell's sentence lists both model peaks of each broad peak it has open, in model order.
    own, _, _ = source_sentences_from_anndata(
        _atac(atac, _spread(merged, pairs, len(meta["peaks"])), list(atac.var_names)), "atac2gex", meta
    )
    assert sentences == own


def _spread(merged: np.ndarray, pairs: list[tuple[int, int]], n_peaks: int) -> np.ndarray:
    out = np.zeros((merged.shape[0], n_peaks), dtype=np.float32)
    for k, (a, b) in enumerate(pairs):
        out[:, a] = out[:, b] = merged[:, k]
    return out
