"""The builder's fast paths give exactly what the straightforward computations give.

Chunked column split of a combined CSR (vs ``matrix[:, columns]``), composite-key ranking (vs the 3-key
lexsort), accessible peaks without row arrays, train statistics accumulated from the build's own rankings
(vs ranking the train cells again), and the saved folder (builder shards moved, not copied).
"""

from __future__ import annotations

import json

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dataset_builder.combined as combined
import dataset_builder.readers as readers
from dataset_builder import META_FILE, build_dataset
from dataset_builder.plan import TrainStats, make_plan, train_stats
from dataset_builder.sentences import NameTable, accessible_peaks, join_names, rank_genes
from dataset_builder.simulate import simulate_paired, write_simulated


def _combined(tmp_path, layout: str, seed: int = 0):
    """A combined h5ad (GEX and ATAC columns interleaved or in blocks) with stored zeros and an empty cell."""
    rng = np.random.default_rng(seed)
    n, n_features = 40, 90
    labels = np.array(["GEX"] * 30 + ["ATAC"] * 60)
    if layout == "interleaved":
        rng.shuffle(labels)
    elif layout == "atac_first":
        labels = labels[::-1].copy()
    names = [
        f"g{i}" if label == "GEX" else f"chr{1 + i % 3}:{1000 * i}-{1000 * i + 500}" for i, label in enumerate(labels)
    ]
    x = sp.random(n, n_features, density=0.25, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 6)
    x.data[::9] = 0  # stored zeros are not detections
    x = sp.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape)
    x.data[x.indptr[5] : x.indptr[6]] = 0
    if layout == "gex_first_unsorted":  # column indices stored in reverse within each row
        for i in range(n):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            x.indices[lo:hi], x.data[lo:hi] = x.indices[lo:hi][::-1].copy(), x.data[lo:hi][::-1].copy()
        x.has_sorted_indices = False
    obs = pd.DataFrame({"batch": ["b0", "b1"] * (n // 2)}, index=[f"c{i}" for i in range(n)])
    path = tmp_path / f"combined_{layout}.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame({"feature_types": labels}, index=names)).write_h5ad(path)
    return path, x, labels


@pytest.mark.parametrize("layout", ["interleaved", "gex_first", "atac_first", "gex_first_unsorted"])
def test_chunked_split_equals_column_slicing(tmp_path, monkeypatch, layout):
    path, x, labels = _combined(tmp_path, layout)
    gex_cols, atac_cols = np.flatnonzero(labels == "GEX"), np.flatnonzero(labels == "ATAC")
    for entries in (1, 13, 1 << 24):  # chunks of one row up to the whole matrix
        monkeypatch.setattr(combined, "_SPLIT_ENTRIES", entries)
        paired = readers.read_paired([path])
        expected_gex = x[:, gex_cols]
        expected_gex.eliminate_zeros()
        assert (paired.gex != expected_gex).nnz == 0 and paired.gex.shape == expected_gex.shape
        assert paired.genes == [f"g{i}" for i in gex_cols]
        assert paired.atac.nnz == int((x[:, atac_cols].toarray() > 0).sum())
        assert paired.atac.has_canonical_format and paired.gex.has_canonical_format


def test_leading_runs_equal_a_row_by_row_count():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 6, size=200)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    leading = rng.integers(0, lengths + 1)
    first = np.concatenate([np.arange(n) < k for n, k in zip(lengths, leading, strict=True)]).astype(bool)
    np.testing.assert_array_equal(combined._leading_runs(first, bounds), leading)
    # A True after a False inside a row breaks the layout; across a row boundary it does not.
    row = int(np.flatnonzero(lengths >= 2)[0])
    broken = first.copy()
    broken[bounds[row] : bounds[row + 1]] = False
    broken[bounds[row + 1] - 1] = True
    assert combined._leading_runs(broken, bounds) is None
    assert combined._leading_runs(np.zeros(0, bool), np.zeros(3, np.int64)).tolist() == [0, 0]


def _random_counts(rng, n_rows, n_cols, scale):
    m = sp.random(n_rows, n_cols, density=0.2, format="csr", random_state=int(rng.integers(1 << 30)))
    m.data = np.floor(m.data * scale).astype(np.float32)  # many ties and some stored zeros
    return m


def test_rank_order_equals_lexsort():
    rng = np.random.default_rng(3)
    for scale in (4, 1000, 1e6):  # 16-bit radix path, and the composite int64 key beyond 16 bits
        m = _random_counts(rng, 60, 80, scale)
        ranking = rank_genes(m, np.ones(60))
        rows = np.repeat(np.arange(60), np.diff(m.indptr))
        keep = m.data > 0
        order = np.lexsort((m.indices[keep], -m.data[keep], rows[keep]))
        assert ranking.index.tolist() == m.indices[keep][order].tolist()
    fractional = _random_counts(rng, 20, 30, 4)
    fractional.data += 0.5  # non-integer values take the lexsort path
    ranking = rank_genes(fractional, np.ones(20))
    rows = np.repeat(np.arange(20), np.diff(fractional.indptr))
    order = np.lexsort((fractional.indices, -fractional.data, rows))
    assert ranking.index.tolist() == fractional.indices[order].tolist()


def test_accessible_peaks_with_zeros_and_peak_map():
    rng = np.random.default_rng(5)
    m = _random_counts(rng, 30, 50, 3)
    peak_map = np.full(50, -1)
    peak_map[::2] = np.arange(25)
    for pm in (None, peak_map):
        offsets, index = accessible_peaks(m, pm)
        for i in range(30):
            row = m[i]
            cols = row.indices[row.data > 0]
            cols = cols if pm is None else pm[cols][pm[cols] >= 0]
            assert index[offsets[i] : offsets[i + 1]].tolist() == sorted(cols.tolist())


@pytest.mark.parametrize("n_cells", [0, 1, 7, 300])
def test_join_names_equals_python_join(n_cells):
    """The one-gather join equals str.join per cell, with empty cells first, last and in between."""
    rng = np.random.default_rng(n_cells)
    names = [f"chr{i % 3 + 1}-{i * 37}-{i * 37 + int(rng.integers(1, 900))}" for i in range(50)] + ["g", "gene-with-long-name"]
    lengths = rng.integers(0, 6, size=n_cells)
    lengths[:: max(n_cells // 3, 1)] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = rng.integers(0, len(names), size=int(offsets[-1])).astype(np.int32)
    expected = [" ".join(names[j] for j in index[offsets[i] : offsets[i + 1]]) for i in range(n_cells)]
    before = index.copy()
    table = NameTable(names)
    for given in (table, table, table.names):  # the table is reused, or made from a plain array
        out = join_names(given, offsets, index)
        out.validate(full=True)
        assert out.to_pylist() == expected
    np.testing.assert_array_equal(index, before)  # the caller's indices are not modified


def test_train_stats_from_any_chunking_are_bit_identical():
    rna, atac = simulate_paired(n_cells=300, n_genes=40, peaks_per_gene=2)
    paired = readers.PairedCounts(
        cells=np.asarray(rna.obs_names, dtype=object),
        gex=sp.csr_matrix(rna.X),
        atac=sp.csr_matrix(atac.X),
        genes=list(rna.var_names),
        peaks=readers.normalize_peak_names(list(atac.var_names)),
        obs=rna.obs[["batch"]].copy(),
    )
    plan = make_plan(paired)
    expected = train_stats(plan)
    rows = plan.rows["train"]
    # The plan leaves the per-peak train counts to the records (no --top_peaks choice needs them first).
    assert plan.peak_train_counts is None and TrainStats(plan).needs_atac
    accessible = (paired.atac[rows] > 0).sum(axis=0).A1
    assert expected["atac_mean"] == (accessible / rows.size).tolist()
    for chunk in (1, 7, 64, rows.size):
        stats = TrainStats(plan)
        for start in range(0, rows.size, chunk):
            part = rows[start : start + chunk]
            stats.add(rank_genes(paired.gex[part], plan.size_factors[part]))
            assert not stats.complete
            stats.add_atac(paired.atac[part])
        assert stats.complete and stats.result() == expected
    with pytest.raises(ValueError, match="train ATAC rows"):
        stats.add_atac(paired.atac[rows[:1]])
    # With --top_peaks the plan counts them itself (it needs them to choose), and the same means come out.
    top = make_plan(paired, top_peaks=len(paired.peaks) - 3)
    assert top.peak_train_counts is not None and not TrainStats(top).needs_atac
    kept = {name: i for i, name in enumerate(paired.peaks)}
    assert train_stats(top)["atac_mean"] == [accessible[kept[name]] / rows.size for name in top.peaks]


def test_saved_folder_equals_save_to_disk(tmp_path):
    path = write_simulated(tmp_path / "sim.h5mu")
    built = build_dataset([path], tmp_path / "out", test_batches=["sim4"], chunk_size=50)
    for name, split in built.items():
        state = json.loads((tmp_path / "out" / name / "state.json").read_text())
        assert state["_split"] == name and len(state["_data_files"]) >= 1
        # A plain save_to_disk of the loaded split loads back to the same table.
        split.save_to_disk(str(tmp_path / "copy" / name))
        again = datasets.load_from_disk(str(tmp_path / "copy" / name))
        assert again.data.table.equals(split.data.table)
    # Same input and options, other chunking: the same records, fingerprints and metadata.
    other = build_dataset([path], tmp_path / "other", test_batches=["sim4"], chunk_size=2048)
    for name, split in built.items():
        assert split.data.table.equals(other[name].data.table) and split._fingerprint == other[name]._fingerprint
    assert (tmp_path / "out" / META_FILE).read_text() == (tmp_path / "other" / META_FILE).read_text()
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["splits"] == {k: v.num_rows for k, v in built.items()}
    plan_stats = meta["train_stats"]
    assert len(plan_stats["rank_value"]) == max(built["train"]["n_genes"])
