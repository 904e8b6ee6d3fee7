"""A small deterministic paired GEX + ATAC dataset, the default input on a fresh machine.

Cells belong to cell types; each type switches on a program of genes. Every gene has linked peaks
just upstream of it, and a gene that is on in a cell has its linked peaks open in that cell (mostly)
and high expression (negative-binomial counts), so one modality predicts the other. Cells come from
several batches (libraries) with their own depth. Written as a MuData ``.h5mu`` (modalities ``rna``
and ``atac``, raw counts in ``X``), the scverse layout.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["SIMULATED_TEST_BATCHES", "SIMULATED_VALIDATION_BATCHES", "simulate_paired", "write_simulated"]

SIMULATED_TEST_BATCHES = ("sim4",)
SIMULATED_VALIDATION_BATCHES = ("sim3",)


def simulate_paired(
    n_cells: int = 400,
    n_genes: int = 200,
    peaks_per_gene: int = 3,
    n_cell_types: int = 5,
    n_batches: int = 4,
    seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Simulate paired raw counts.

    Returns
    -------
    rna, atac
        AnnData objects over the same cells (integer counts in CSR ``X``, ``obs['batch']``, ``obs['cell_type']``);
        peaks are named ``chrN:start-end`` (Cell Ranger style).
    """
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, n_cell_types, n_cells)
    batch = np.repeat(np.arange(n_batches), int(np.ceil(n_cells / n_batches)))[:n_cells]
    # Each type switches on ~25% of genes; programs overlap.
    program = rng.random((n_cell_types, n_genes)) < 0.25
    on_prob = np.where(program[cell_type], 0.85, 0.05)
    gene_on = rng.random((n_cells, n_genes)) < on_prob
    base = rng.gamma(2.0, 0.6, n_genes)
    depth = rng.lognormal(0.0, 0.3, n_cells) * np.linspace(0.8, 1.25, n_batches)[batch]
    mean = depth[:, None] * base[None, :] * np.where(gene_on, 6.0, 0.15)
    dispersion = 2.0
    gex = rng.negative_binomial(dispersion, dispersion / (dispersion + mean)).astype(np.float32)

    peak_gene = np.repeat(np.arange(n_genes), peaks_per_gene)
    open_prob = np.where(gene_on[:, peak_gene], 0.7, 0.03)
    accessible = rng.random(open_prob.shape) < open_prob
    atac = (accessible * (1 + rng.binomial(1, 0.3, open_prob.shape))).astype(np.float32)

    chrom = 1 + np.arange(n_genes) % 5
    gene_start = 1_000_000 + (np.arange(n_genes) // 5) * 200_000
    offsets = np.tile(np.arange(peaks_per_gene) * 2_000 + 500, n_genes)
    peak_start = gene_start[peak_gene] - offsets
    peaks = [f"chr{c}:{s}-{s + 500}" for c, s in zip(chrom[peak_gene], peak_start, strict=True)]
    genes = [f"SimG{i:03d}" for i in range(n_genes)]

    letters = np.array(list("ACGT"))
    barcodes = ["".join(letters[rng.integers(0, 4, 16)]) + "-1" for _ in range(n_cells)]
    obs = pd.DataFrame(
        {"batch": [f"sim{b + 1}" for b in batch], "cell_type": [f"type{t}" for t in cell_type]},
        index=pd.Index(barcodes),
    )
    rna = ad.AnnData(sp.csr_matrix(gex), obs=obs.copy(), var=pd.DataFrame(index=genes))
    rna.var["feature_types"] = "Gene Expression"
    atac_ad = ad.AnnData(sp.csr_matrix(atac), obs=obs.copy(), var=pd.DataFrame(index=peaks))
    atac_ad.var["feature_types"] = "Peaks"
    atac_ad.var["linked_gene"] = [genes[g] for g in peak_gene]
    return rna, atac_ad


def write_simulated(path: str | Path, **kwargs) -> Path:
    """Write the simulated dataset as ``.h5mu`` (modalities ``rna`` and ``atac``) and return its path.

    Keyword arguments go to :func:`simulate_paired`.
    """
    import mudata as md

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rna, atac = simulate_paired(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.set_options(pull_on_update=False)
        mdata = md.MuData({"rna": rna, "atac": atac})
        tmp = path.with_name(f".{path.name}.tmp")
        mdata.write(tmp)
    tmp.replace(path)
    return path
