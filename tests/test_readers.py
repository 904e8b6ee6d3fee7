"""Readers: every layout gives the same paired counts; names and order follow the contract."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dataset_builder import build_dataset
from dataset_builder.readers import genomic_order, normalize_peak_names, read_modality, read_paired
from dataset_builder.sentences import encode_cells, rank_genes
from dataset_builder.simulate import simulate_paired, write_simulated
from tests.conftest import shared_file


def test_normalize_peak_names_accepts_the_three_styles():
    names = ["chr1:100-200", "chr2_5_10", "chrX-7-9", "KI270711.1:30-40", "chrUn_GL000220v1:1-5"]
    assert normalize_peak_names(names) == [
        "chr1-100-200",
        "chr2-5-10",
        "chrX-7-9",
        "KI270711.1-30-40",
        "chrUn_GL000220v1-1-5",
    ]
    with pytest.raises(ValueError, match="not genomic intervals"):
        normalize_peak_names(["chr1:100-200", "GeneA"])


def test_genomic_order_is_natural_chromosome_order_then_start():
    peaks = ["chrX-5-6", "chr10-1-2", "chr2-300-400", "chrM-1-2", "chr2-30-40", "chrY-1-2", "chr1-9-10", "GL1-1-2"]
    ordered = [peaks[i] for i in genomic_order(peaks)]
    assert ordered == [
        "chr1-9-10",
        "chr2-30-40",
        "chr2-300-400",
        "chr10-1-2",
        "chrX-5-6",
        "chrY-1-2",
        "chrM-1-2",
        "GL1-1-2",
    ]


def test_rank_genes_orders_by_value_then_feature():
    counts = sp.csr_matrix(np.array([[0, 3, 1, 3, 0], [0, 0, 0, 0, 0], [5, 0, 0, 0, 2]], dtype=np.float32))
    ranking = rank_genes(counts, np.array([1.0, 1.0, 2.0]))
    assert ranking.offsets.tolist() == [0, 3, 3, 5]
    assert ranking.index.tolist() == [1, 3, 2, 0, 4]
    np.testing.assert_allclose(ranking.value, np.log1p([3, 3, 1, 2.5, 1.0]), rtol=1e-6)


def test_encode_cells_binary_and_top_peaks():
    import pyarrow as pa

    gex = sp.csr_matrix(np.array([[20, 1, 0, 9], [0, 0, 0, 0]], dtype=np.float32))
    atac = sp.csr_matrix(np.array([[1, 0, 2, 1], [0, 0, 0, 0]], dtype=np.float32))
    genes, peaks = pa.array(["A", "B", "C", "D"]), pa.array(["p0", "p2"])
    peak_map = np.array([0, -1, 1, -1])
    out = encode_cells(gex, atac, np.ones(2), genes, peaks, gex_encoding="binary", peak_map=peak_map)
    # log1p(20) and log1p(9) are >= 2.0, log1p(1) is not; feature order.
    assert out["gex_text"].to_pylist() == ["A D", ""]
    assert out["atac_text"].to_pylist() == ["p0 p2", ""]
    assert out["n_genes"].to_pylist() == [3, 0] and out["n_peaks"].to_pylist() == [2, 0]


def test_two_files_pair_by_barcode_in_first_file_order(tmp_path):
    rna, atac = simulate_paired(n_cells=30, n_genes=10, peaks_per_gene=2)
    atac = atac[::-1][3:].copy()  # reversed and 3 cells fewer
    rna.write_h5ad(tmp_path / "rna.h5ad")
    atac.write_h5ad(tmp_path / "atac.h5ad")
    paired = read_paired([tmp_path / "atac.h5ad", tmp_path / "rna.h5ad"])  # ATAC first: its order wins
    assert list(paired.cells) == list(atac.obs_names)
    assert paired.dropped_cells == 3
    np.testing.assert_array_equal(paired.gex.toarray(), rna[atac.obs_names].X.toarray())
    assert paired.genes == list(rna.var_names)
    assert paired.peaks[0].startswith("chr1-") and ":" not in "".join(paired.peaks)


def write_10x_h5(path, rna: ad.AnnData, atac: ad.AnnData, gene_names=None, gene_ids=None) -> None:
    """Cell Ranger ARC's filtered_feature_bc_matrix.h5 layout (features x cells CSC, names, ids, types)."""
    combined = sp.hstack([sp.csr_matrix(rna.X), sp.csr_matrix(atac.X)]).tocsr()  # cells x features CSR == features x cells CSC
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = combined.data.astype(np.int32)
        m["indices"] = combined.indices.astype(np.int64)
        m["indptr"] = combined.indptr.astype(np.int64)
        m["shape"] = np.array([combined.shape[1], combined.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array(list(rna.obs_names), dtype="S")
        feats = m.create_group("features")
        names = list(gene_names if gene_names is not None else rna.var_names) + list(atac.var_names)
        feats["name"] = np.array(names, dtype="S")
        feats["id"] = np.array(list(gene_ids if gene_ids is not None else rna.var_names) + list(atac.var_names), dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * rna.n_vars + ["Peaks"] * atac.n_vars, dtype="S")


def test_cellranger_arc_h5_equals_h5mu(tmp_path):
    rna, atac = simulate_paired(n_cells=40, n_genes=12, peaks_per_gene=2)
    write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", rna, atac)
    write_simulated(tmp_path / "sim.h5mu", n_cells=40, n_genes=12, peaks_per_gene=2)
    from_10x = read_paired([tmp_path / "filtered_feature_bc_matrix.h5"])
    from_mu = read_paired([tmp_path / "sim.h5mu"])
    assert list(from_10x.cells) == list(from_mu.cells)
    assert from_10x.genes == from_mu.genes and from_10x.peaks == from_mu.peaks
    assert (from_10x.gex != from_mu.gex).nnz == 0 and (from_10x.atac != from_mu.atac).nnz == 0


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_cellranger_h5_with_repeated_gene_symbols_reads_and_builds_like_scanpy(tmp_path, caplog):
    rna, atac = simulate_paired(n_cells=60, n_genes=12, peaks_per_gene=2)
    symbols = list(rna.var_names)
    symbols[3] = symbols[7] = symbols[1]  # human references repeat some symbols; the Ensembl ids differ
    ids = [f"ENSG{i:011d}" for i in range(len(symbols))]
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, rna, atac, gene_names=symbols, gene_ids=ids)
    with caplog.at_level("WARNING", logger="dataset_builder.readers"):
        paired = read_paired([path])
    expected = ad.AnnData(var=pd.DataFrame(index=symbols))
    expected.var_names_make_unique()
    assert paired.genes == list(expected.var_names) and len(set(paired.genes)) == len(symbols)
    assert "renamed 2" in caplog.text and path.name in caplog.text
    np.testing.assert_array_equal(paired.gex.toarray(), np.asarray(sp.csr_matrix(rna.X).toarray()))
    gex = read_modality([path], "GEX")
    assert list(gex.var["gene_ids"]) == ids and list(gex.var.index) == paired.genes
    data = build_dataset([path], tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "cell_sentences.json").read_text())
    assert meta["genes"] == paired.genes and sum(len(split) for split in data.values()) == 60


def test_mop_h5mu_equals_two_files():
    mu = read_paired([shared_file("mop_snareseq/mop_snare.h5mu")])
    two = read_paired([shared_file("mop_snareseq/mop_snare_rna.h5ad"), shared_file("mop_snareseq/mop_snare_atac.h5ad")])
    assert mu.gex.shape == (10_309, 1_677) and mu.atac.shape == (10_309, 25_734)
    assert list(mu.cells) == list(two.cells) and mu.genes == two.genes and mu.peaks == two.peaks
    assert (mu.gex != two.gex).nnz == 0 and (mu.atac != two.atac).nnz == 0
    pd.testing.assert_frame_equal(mu.obs, two.obs)
    assert mu.counts_source == "X" and mu.size_factors is None


def test_bmmc_combined_uses_counts_layer_and_size_factors():
    paired = read_paired([shared_file("bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad")])
    assert paired.counts_source == "layers/counts"
    assert paired.gex.shape == (500, 600) and paired.atac.shape == (500, 600)
    raw = ad.read_h5ad(shared_file("bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad"))
    np.testing.assert_array_equal(paired.size_factors, raw.obs["GEX_size_factors"].to_numpy())
    assert np.all(paired.gex.data == np.round(paired.gex.data))


def test_pbmc_colon_peak_names_are_normalized():
    paired = read_paired([shared_file("pbmc_markers/pbmc1k_markers.h5mu")])
    assert paired.atac.shape == (1_000, 174) and paired.gex.shape == (1_000, 45)
    assert all(p.count("-") == 2 and ":" not in p for p in paired.peaks)
    assert list(genomic_order(paired.peaks)) == list(range(174))


@pytest.mark.parametrize("layout", ["gex_first", "atac_first", "interleaved"])
def test_split_of_one_modality_equals_that_modality_of_the_full_split(tmp_path, layout):
    from pathlib import Path

    from dataset_builder.combined import split_csr_columns

    rng = np.random.default_rng(1)
    matrix = sp.random(40, 30, density=0.3, format="csr", random_state=2, dtype=np.float32)
    matrix.data = np.ceil(matrix.data * 5)
    is_gex = {"gex_first": np.arange(30) < 12, "atac_first": np.arange(30) >= 18, "interleaved": rng.random(30) < 0.4}[layout]
    args = (Path("m.h5ad"), matrix.indptr, matrix.data, matrix.indices, matrix.shape, is_gex)
    gex, atac = split_csr_columns(*args)
    assert (gex != matrix[:, is_gex]).nnz == 0 and (atac != matrix[:, ~is_gex]).nnz == 0
    only_gex, no_atac = split_csr_columns(*args, only="GEX")
    no_gex, only_atac = split_csr_columns(*args, only="ATAC")
    for got, want in ((only_gex, gex), (only_atac, atac)):
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
    assert no_atac.shape == atac.shape and no_atac.nnz == 0 and no_gex.shape == gex.shape and no_gex.nnz == 0


def test_prediction_reads_counts_from_the_named_layer(tmp_path):
    from translator.anndata_io import read_source

    rna, _ = simulate_paired(n_cells=30, n_genes=10, peaks_per_gene=2)
    rna.layers["raw"] = rna.X.copy()
    rna.X = rna.X.astype(np.float32)
    rna.X.data = np.log1p(rna.X.data)
    with pytest.raises(ValueError, match="--counts_layer NAME"):
        read_source(rna, "gex2atac")
    mod, cells = read_source(rna, "gex2atac", counts_layer="raw")
    assert mod.counts_source == "layers/raw" and (mod.matrix != sp.csr_matrix(rna.layers["raw"])).nnz == 0
    assert list(cells.obs_names) == list(rna.obs_names) and list(cells.obs.columns) == list(rna.obs.columns)


def _same_paired(a, b) -> None:
    assert list(a.cells) == list(b.cells) and a.genes == b.genes and a.peaks == b.peaks
    assert (a.gex != b.gex).nnz == 0 and (a.atac != b.atac).nnz == 0
    assert a.counts_source == b.counts_source and a.dropped_cells == b.dropped_cells
    np.testing.assert_array_equal(a.size_factors, b.size_factors)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.peak_var, b.peak_var)


@pytest.mark.parametrize("layout", ["h5mu", "combined", "two"])
def test_objects_in_memory_read_as_their_files(layout):
    import mudata

    if layout == "h5mu":
        paths = [shared_file("pbmc_markers/pbmc1k_markers.h5mu")]
        objects = mudata.read_h5mu(paths[0])
    elif layout == "combined":
        paths = [shared_file("bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad")]
        objects = ad.read_h5ad(paths[0])
    else:
        paths = [shared_file(f"bmmc_starter/openproblems_bmmc_multiome_starter.{m}.h5ad") for m in ("atac", "rna")]
        objects = [ad.read_h5ad(p) for p in paths]
    first = objects[0] if isinstance(objects, list) else objects
    before = first.copy()
    _same_paired(read_paired(objects), read_paired(paths))
    for label in ("GEX", "ATAC"):
        from_object, from_file = read_modality(objects, label), read_modality(paths, label)
        assert from_object.features == from_file.features and list(from_object.cells) == list(from_file.cells)
        assert (from_object.matrix != from_file.matrix).nnz == 0
    # The caller's object is not changed (pairing sorts peaks and drops stored zeros in place).
    target = first.mod["atac"] if layout == "h5mu" else first
    kept = before.mod["atac"] if layout == "h5mu" else before
    assert (sp.csr_matrix(target.X) != sp.csr_matrix(kept.X)).nnz == 0 and list(target.var_names) == list(kept.var_names)


def test_an_object_in_memory_is_checked_and_named_as_given():
    rna, atac = simulate_paired(n_cells=30, n_genes=8, peaks_per_gene=2)
    rna.X = sp.csr_matrix(rna.X, dtype=np.float32) * 0.5
    with pytest.raises(ValueError, match=r"GEX values \(X\) in the AnnData given are not integers .* --counts_layer"):
        read_paired([rna, atac])
    with pytest.raises(ValueError, match="the AnnData given holds ATAC, not the GEX modality"):
        read_modality(atac, "GEX")
    with pytest.raises(ValueError, match="--counts_layer raw: the GEX data in the AnnData given has no layers"):
        read_modality(rna, "GEX", counts_layer="raw")
