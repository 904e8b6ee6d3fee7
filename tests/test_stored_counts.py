"""Counts left in their file and read by chunks of cells give what the counts read into memory give.

Every layout a file can store CSR counts in (two h5ad files, a combined h5ad, a MuData h5mu, a Cell Ranger h5) is
read both ways and compared entry by entry; whole builds are compared record by record, fingerprint and metadata,
for chunks of one cell up to more than the file, chunks that cut batches in the middle included; the bad values
are refused with the same line either way; no read of the file takes more cells than a chunk; and the checks and
the digest read a file that holds both modalities once.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dataset_builder.stored as stored
from dataset_builder import build_dataset
from dataset_builder.outputs import META_FILE
from dataset_builder.plan import content_digest, make_plan
from dataset_builder.readers import read_paired
from dataset_builder.simulate import simulate_paired, write_simulated
from dataset_builder.stored import StoredCsr, entry_slices
from tests.test_readers import write_10x_h5

CHUNKS = (1, 7, 50, 4096)  # the simulated batches have 75 cells: 7 and 50 cut batches, 4096 takes the whole file


def _awkward(matrix: sp.csr_matrix, seed: int) -> sp.csr_matrix:
    """The same counts with what real files hold: stored zeros, a repeated entry, column indices unsorted in some rows."""
    rng = np.random.default_rng(seed)
    m = matrix.tocoo()
    data, row, col = m.data.copy(), m.row.copy(), m.col.copy()
    data[rng.random(data.size) < 0.05] = 0
    # Split one entry of each of a few rows into two halves (duplicates that sum to the count).
    pick = rng.choice(np.flatnonzero(data >= 2), size=min(5, int((data >= 2).sum())), replace=False)
    half = np.floor(data[pick] / 2)
    data[pick] -= half
    data, row, col = np.concatenate([data, half]), np.concatenate([row, row[pick]]), np.concatenate([col, col[pick]])
    order = np.lexsort((rng.random(data.size), row))  # rows in order, entries within a row shuffled
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=matrix.shape[0]), out=indptr[1:])
    out = sp.csr_matrix((data[order], col[order].astype(np.int32), indptr), shape=matrix.shape)
    out.has_sorted_indices = False
    return out


def _two_files(tmp_path):
    """RNA and ATAC files over partly different cells in different orders, peaks not in genomic order."""
    rna, atac = simulate_paired(n_cells=300, n_genes=60, peaks_per_gene=3)
    rna.X, atac.X = _awkward(sp.csr_matrix(rna.X), 1), _awkward(sp.csr_matrix(atac.X), 2)
    rng = np.random.default_rng(3)
    atac = atac[rng.permutation(atac.n_obs)[:280]].copy()  # 20 RNA-only cells, another order
    atac = atac[:, rng.permutation(atac.n_vars)].copy()
    rna.write_h5ad(tmp_path / "rna.h5ad")
    atac.write_h5ad(tmp_path / "atac.h5ad")
    return [tmp_path / "rna.h5ad", tmp_path / "atac.h5ad"]


def _combined(tmp_path):
    """One h5ad with GEX and ATAC columns interleaved and the raw counts in layers['counts']."""
    rna, atac = simulate_paired(n_cells=300, n_genes=60, peaks_per_gene=3, seed=4)
    x = sp.hstack([_awkward(sp.csr_matrix(rna.X), 5), _awkward(sp.csr_matrix(atac.X), 6)], format="csr")
    labels = np.array(["GEX"] * rna.n_vars + ["ATAC"] * atac.n_vars)
    order = np.random.default_rng(7).permutation(labels.size)
    var = pd.DataFrame({"feature_types": labels[order]}, index=np.concatenate([rna.var_names, atac.var_names])[order])
    adata = ad.AnnData(X=sp.csr_matrix(x.shape, dtype=np.float32), obs=rna.obs, var=var, layers={"counts": x[:, order]})
    adata.write_h5ad(tmp_path / "combined.h5ad")
    return [tmp_path / "combined.h5ad"]


def _h5mu(tmp_path):
    return [write_simulated(tmp_path / "sim.h5mu")]


def _tenx(tmp_path):
    rna, atac = simulate_paired(n_cells=300, n_genes=60, peaks_per_gene=3, seed=8)
    write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", rna, atac)
    return [tmp_path / "filtered_feature_bc_matrix.h5"]


LAYOUTS = {"two_files": _two_files, "combined": _combined, "h5mu": _h5mu, "10x": _tenx}


def _equal_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.data.dtype == b.data.dtype


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stored_counts_read_by_chunks_equal_the_counts_in_memory(tmp_path, layout):
    inputs = LAYOUTS[layout](tmp_path)
    memory = read_paired(inputs)
    for chunk_cells in CHUNKS:
        paired = read_paired(inputs, chunk_cells=chunk_cells)
        assert list(paired.cells) == list(memory.cells) and paired.peaks == memory.peaks and paired.genes == memory.genes
        for name in ("gex", "atac"):
            on_disk, in_memory = getattr(paired, name), getattr(memory, name)
            assert isinstance(on_disk, StoredCsr)
            n = on_disk.shape[0]
            _equal_csr(on_disk[np.arange(n)], in_memory)
            np.testing.assert_array_equal(on_disk.indptr, in_memory.indptr)
            np.testing.assert_array_equal(on_disk.sum(axis=1), in_memory.sum(axis=1))
            rows = np.random.default_rng(chunk_cells).choice(n, size=min(n, 40), replace=False)  # any order
            _equal_csr(on_disk[rows], in_memory[rows])
            for step in (13, 1 << 20):
                for (i1, d1), (i2, d2) in zip(entry_slices(on_disk, step), entry_slices(in_memory, step), strict=True):
                    np.testing.assert_array_equal(i1, i2)
                    np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize(("layout", "chunks", "splits"), [
    ("h5mu", CHUNKS, {"test_batches": ["sim4"], "validation_batches": ["sim3"], "top_peaks": 100}),
    ("two_files", (7, 50), {"test_batches": ["sim4"]}),  # validation: a barcode-hash sample of the other batches' cells
    ("combined", (7, 50), {}),  # hash split
    ("10x", (7, 50), {"top_peaks": 50}),
])
def test_a_build_from_stored_counts_equals_the_build_in_memory(tmp_path, layout, chunks, splits):
    inputs = LAYOUTS[layout](tmp_path)
    reference = build_dataset(inputs, tmp_path / "memory", chunk_size=32, input_chunk_cells=None, **splits)
    meta = (tmp_path / "memory" / META_FILE).read_text()
    for chunk_cells in chunks:
        out = tmp_path / f"chunks_{chunk_cells}"
        built = build_dataset(inputs, out, chunk_size=32, input_chunk_cells=chunk_cells, **splits)
        assert list(built) == list(reference)
        for name, split in reference.items():
            assert built[name].data.table.equals(split.data.table), (chunk_cells, name)
            assert built[name]._fingerprint == split._fingerprint
        assert (out / META_FILE).read_text() == meta


@pytest.mark.parametrize(("value", "message"), [
    (-1.0, "contain negative entries"),
    (np.nan, "contain NaN or infinite entries"),
    (0.5, "are not integers"),
])
def test_bad_values_in_stored_counts_are_refused_with_the_same_line(tmp_path, value, message):
    rna, atac = simulate_paired(n_cells=120, n_genes=30, peaks_per_gene=2)
    x = sp.csr_matrix(rna.X)
    x.data[x.indptr[100] + 1] = value  # late in the file: found only once the scan gets there
    rna.X = x
    rna.write_h5ad(tmp_path / "rna.h5ad")
    atac.write_h5ad(tmp_path / "atac.h5ad")
    inputs = [tmp_path / "rna.h5ad", tmp_path / "atac.h5ad"]
    with pytest.raises(ValueError, match=message) as in_memory:
        build_dataset(inputs, tmp_path / "memory", input_chunk_cells=None)
    for chunk_cells in (1, 7):
        with pytest.raises(ValueError, match=message) as on_disk:
            build_dataset(inputs, tmp_path / "disk", input_chunk_cells=chunk_cells)
        assert str(on_disk.value) == str(in_memory.value)
    assert not (tmp_path / "disk").exists() and not list(tmp_path.glob(".disk*"))


def test_a_build_never_reads_more_cells_at_once_than_a_chunk(tmp_path, monkeypatch):
    inputs = _combined(tmp_path)
    reads: list[int] = []
    original = StoredCsr._read_stored

    def counting(self, rows):
        reads.append(int(rows.size))
        return original(self, rows)

    monkeypatch.setattr(StoredCsr, "_read_stored", counting)
    monkeypatch.setattr(stored, "_READ_ENTRIES", 1 << 30)
    build_dataset(inputs, tmp_path / "out", chunk_size=16, input_chunk_cells=25)
    assert reads and max(reads) <= 25  # the records' chunks (16 cells) and the scans' (25 cells), never the 300 cells
    monkeypatch.setattr(stored, "_READ_ENTRIES", 500)  # about 5 cells of entries
    reads.clear()
    build_dataset(inputs, tmp_path / "small", chunk_size=16, input_chunk_cells=25)
    assert max(reads) == 16 and min(reads) < 16  # the scans' reads are bounded by entries too


def test_the_checks_and_the_digest_read_a_combined_file_once_for_both_modalities(tmp_path, monkeypatch):
    inputs = _combined(tmp_path)
    entries: list[int] = []
    original = stored._Handle.read

    def counting(self, spans, key):
        if not (self.shared and key in self._reads):  # served from the file, not from the last reads kept
            entries.append(sum(hi - lo for lo, hi in spans))
        return original(self, spans, key)

    monkeypatch.setattr(stored._Handle, "read", counting)
    paired = read_paired(inputs, chunk_cells=25)
    stored_entries = paired.gex._file_indptr[-1]
    assert sum(entries) == stored_entries  # every stored entry once, for both modalities' checks
    plan = make_plan(paired)
    entries.clear()
    digest = content_digest(plan)
    assert sum(entries) == stored_entries
    assert digest == content_digest(make_plan(read_paired(inputs)))  # the same digest as the counts in memory
