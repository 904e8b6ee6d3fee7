"""Write a simulated multiome file the size of the full NeurIPS 2021 competition file (GSE194122).

One combined AnnData ``.h5ad``: cells x (genes + peaks), ``var['feature_types']`` in {GEX, ATAC},
raw counts in ``layers['counts']`` (float32 CSR, like GSE194122), ``X`` = log-normalized GEX and binary
ATAC, ``obs`` with ``batch``, ``cell_type``, ``GEX_size_factors``. Defaults: 69,249 cells, 13,431 genes
with about 1,500 detected a cell, 116,490 peaks with about 4,000 accessible a cell.

The CSR is generated and written in chunks of cells straight into resizable HDF5 datasets, so memory
stays bounded (a few hundred MB) whatever the number of cells. The file is cached: when it exists with
the same parameters it is reused. It belongs in /tmp, never in the repository.

    python bench/make_large.py                      # /tmp/bench_large.h5ad (about 6 GB, a few minutes)
    python bench/make_large.py --quick --output /tmp/bench_small.h5ad
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

DEFAULT_OUTPUT = Path("/tmp/bench_large.h5ad")
CHROMOSOMES = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]
BATCHES = ["s1d1", "s1d2", "s1d3", "s2d1", "s2d4", "s2d5", "s3d1", "s3d3", "s3d6", "s3d7", "s4d1", "s4d8", "s4d9"]
CELL_TYPES = [f"type_{i:02d}" for i in range(22)]


@dataclass(frozen=True)
class LargeSpec:
    """Shape of the simulated file."""

    n_cells: int = 69_249
    n_genes: int = 13_431
    n_peaks: int = 116_490
    genes_per_cell: float = 1_500.0
    peaks_per_cell: float = 4_000.0
    seed: int = 0
    with_x: bool = True
    chunk_cells: int = 2_000
    compression: str | None = None  # an h5py filter for the CSR arrays ("gzip", "lzf"), with byte shuffling

    @classmethod
    def quick(cls) -> LargeSpec:
        return cls(n_cells=1_200, n_genes=2_000, n_peaks=12_000, genes_per_cell=150.0, peaks_per_cell=400.0, chunk_cells=500)


def _draws_for_unique(weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Number of weighted draws with replacement whose expected count of distinct features is each target."""
    grid = np.unique(np.geomspace(1, weights.size * 20, 400).astype(np.int64))
    log_keep = np.log1p(-weights)
    expected = np.array([weights.size - np.exp(m * log_keep).sum() for m in grid])
    targets = np.clip(targets, 1, expected[-1] * 0.99)
    return np.interp(targets, expected, grid).astype(np.int64)


def _feature_names(spec: LargeSpec, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    genes = [f"GENE{i:05d}" for i in range(spec.n_genes)]
    per_chrom = np.bincount(np.arange(spec.n_peaks) * len(CHROMOSOMES) // spec.n_peaks, minlength=len(CHROMOSOMES))
    peaks = []
    for chrom, count in zip(CHROMOSOMES, per_chrom, strict=True):
        starts = np.cumsum(rng.integers(2_000, 40_000, size=count)) + 10_000
        widths = rng.integers(200, 1_500, size=count)
        peaks.extend(f"{chrom}-{s}-{s + w}" for s, w in zip(starts.tolist(), widths.tolist(), strict=True))
    return genes, peaks


def _chunk(spec, rng, gene_p, peak_p, n):
    """One chunk of n cells: (indptr_counts [n+1] local, indices int32, counts float32, x float32 or None, size_factor)."""
    n_features = spec.n_genes + spec.n_peaks
    depth = rng.lognormal(0.0, 0.35, size=n)
    gene_draws = _draws_for_unique(gene_p, spec.genes_per_cell * depth)
    peak_draws = _draws_for_unique(peak_p, spec.peaks_per_cell * rng.lognormal(0.0, 0.35, size=n))
    gene_cdf = np.cumsum(gene_p)
    peak_cdf = np.cumsum(peak_p)
    gene_rows = np.repeat(np.arange(n, dtype=np.int64), gene_draws)
    gene_cols = np.minimum(np.searchsorted(gene_cdf, rng.random(gene_rows.size) * gene_cdf[-1]), spec.n_genes - 1)
    peak_rows = np.repeat(np.arange(n, dtype=np.int64), peak_draws)
    peak_cols = np.minimum(np.searchsorted(peak_cdf, rng.random(peak_rows.size) * peak_cdf[-1]), spec.n_peaks - 1)
    keys = np.concatenate([gene_rows * n_features + gene_cols, peak_rows * n_features + spec.n_genes + peak_cols])
    del gene_rows, gene_cols, peak_rows, peak_cols
    keys, multiplicity = np.unique(keys, return_counts=True)
    rows = keys // n_features
    cols = (keys - rows * n_features).astype(np.int32)
    del keys
    is_gene = cols < spec.n_genes
    counts = multiplicity.astype(np.float32)
    # GEX: draws give the detected set; extra reads make a long-tailed count; ATAC counts stay small (1-2 mostly).
    counts[is_gene] += rng.geometric(0.35, size=int(is_gene.sum())) - 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    library = np.bincount(rows[is_gene], weights=counts[is_gene], minlength=n)
    x = None
    if spec.with_x:
        size_factor = library / np.median(library)
        x = np.where(is_gene, np.log1p(counts / size_factor[rows]), 1.0).astype(np.float32)
    else:
        size_factor = library / np.median(library)
    return indptr, cols, counts, x, size_factor


def _create_csr(group: h5py.Group, name: str, shape: tuple[int, int], compression: str | None = None) -> h5py.Group:
    csr = group.create_group(name)
    filters = {"compression": compression, "shuffle": True} if compression else {}
    csr.attrs["encoding-type"] = "csr_matrix"
    csr.attrs["encoding-version"] = "0.1.0"
    csr.attrs["shape"] = np.array(shape, dtype=np.int64)
    csr.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,), **filters)
    csr.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,), **filters)
    csr.create_dataset("indptr", shape=(shape[0] + 1,), dtype=np.int64)
    return csr


def _append(csr: h5py.Group, data: np.ndarray, indices: np.ndarray) -> None:
    start = csr["data"].shape[0]
    for name, values in (("data", data), ("indices", indices)):
        csr[name].resize((start + values.size,))
        csr[name][start:] = values


def write_large(path: str | os.PathLike = DEFAULT_OUTPUT, spec: LargeSpec = LargeSpec(), overwrite: bool = False) -> Path:
    """Write (or reuse) the simulated combined h5ad at ``path``; return the path.

    The file is written to a temporary name in the same folder and renamed when complete. A sidecar
    ``PATH.json`` records the spec, so a file made with other parameters is rebuilt.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if path.exists() and sidecar.exists() and not overwrite:
        with open(sidecar) as fh:
            if json.load(fh).get("spec") == asdict(spec):
                print(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rng = np.random.default_rng(spec.seed)
    genes, peaks = _feature_names(spec, rng)
    # Feature popularity: a few genes / peaks are detected in most cells, most are rare (as in real data).
    gene_p = rng.lognormal(0.0, 1.5, size=spec.n_genes)
    gene_p /= gene_p.sum()
    peak_p = rng.lognormal(0.0, 1.0, size=spec.n_peaks)
    peak_p /= peak_p.sum()
    shape = (spec.n_cells, spec.n_genes + spec.n_peaks)
    t0 = time.perf_counter()
    nnz = 0
    size_factors = np.empty(spec.n_cells)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            layers = f.create_group("layers")
            layers.attrs["encoding-type"] = "dict"
            layers.attrs["encoding-version"] = "0.1.0"
            counts_csr = _create_csr(layers, "counts", shape, spec.compression)
            x_csr = _create_csr(f, "X", shape, spec.compression) if spec.with_x else None
            indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
            for start in range(0, spec.n_cells, spec.chunk_cells):
                n = min(spec.chunk_cells, spec.n_cells - start)
                local_indptr, cols, counts, x, sf = _chunk(spec, rng, gene_p, peak_p, n)
                indptr[start + 1 : start + n + 1] = nnz + local_indptr[1:]
                size_factors[start : start + n] = sf
                _append(counts_csr, counts, cols)
                if x_csr is not None:
                    _append(x_csr, x, cols)
                nnz += cols.size
                done = start + n
                print(f"\r{done:,}/{spec.n_cells:,} cells, {nnz / done:,.0f} non-zeros a cell, {time.perf_counter() - t0:.0f} s", end="", flush=True)
            print()
            counts_csr["indptr"][:] = indptr
            if x_csr is not None:
                x_csr["indptr"][:] = indptr
            obs_rng = np.random.default_rng(spec.seed + 1)
            barcodes = [f"CELL{i:06d}-{BATCHES[i * len(BATCHES) // spec.n_cells]}" for i in range(spec.n_cells)]
            obs = pd.DataFrame(
                {
                    "batch": pd.Categorical([BATCHES[i * len(BATCHES) // spec.n_cells] for i in range(spec.n_cells)], categories=BATCHES),
                    "cell_type": pd.Categorical(obs_rng.choice(CELL_TYPES, size=spec.n_cells), categories=CELL_TYPES),
                    "GEX_size_factors": size_factors.astype(np.float32),
                },
                index=pd.Index(barcodes, name=None),
            )
            var = pd.DataFrame(
                {"feature_types": pd.Categorical(["GEX"] * spec.n_genes + ["ATAC"] * spec.n_peaks, categories=["ATAC", "GEX"])},
                index=pd.Index(genes + peaks, name=None),
            )
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            for name in ("obsm", "varm", "obsp", "varp"):
                write_elem(f, name, {})
            write_elem(f, "uns", {"note": "simulated by bench/make_large.py, the size of GSE194122"})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with open(sidecar, "w") as fh:
        json.dump({"spec": asdict(spec), "nnz": int(nnz), "seconds": time.perf_counter() - t0}, fh)
    print(f"wrote {path}: {spec.n_cells:,} cells x {shape[1]:,} features, {nnz:,} non-zeros, "
          f"{path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the .h5ad (keep it out of the repository)")
    parser.add_argument("--n_cells", type=int, default=None, help="number of cells (default 69,249; --quick 1,200)")
    parser.add_argument("--no_x", action="store_true", help="write only layers['counts'], no X (halves size and time)")
    parser.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="compress the count arrays (smaller, slower to read)")
    parser.add_argument("--quick", action="store_true", help="a tiny file for the smoke test")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when a matching cached file exists")
    args = parser.parse_args(argv)
    spec = LargeSpec.quick() if args.quick else LargeSpec()
    changes = {"with_x": not args.no_x, "compression": args.compression}
    if args.n_cells is not None:
        if args.n_cells < 2:
            raise ValueError(f"--n_cells {args.n_cells}: needs at least 2 cells")
        changes["n_cells"] = args.n_cells
    spec = LargeSpec(**{**asdict(spec), **changes})
    if Path(args.output).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        raise ValueError(f"--output {args.output}: the simulated file is GBs; write it outside the repository (e.g. /tmp)")
    write_large(args.output, spec, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
