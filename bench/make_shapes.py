"""Write simulated paired datasets of different shapes for the cross-dataset benchmark.

    python bench/make_shapes.py --output_dir /tmp/shapes

Four ``.h5mu`` files (``dataset_builder.simulate``'s cells, types and batches; split them with
``--test_batches sim4 --validation_batches sim3``):

- ``few_cells.h5mu``: 500 cells, 200 genes, 600 peaks;
- ``many_peaks.h5mu``: 1,500 cells, 400 genes, 16,000 peaks (40 a gene);
- ``sparse_atac.h5mu``: 1,500 cells, 300 genes, 900 peaks, each read kept with probability 0.1 (about 24 accessible peaks a cell, from about 185);
- ``shallow_gex.h5mu``: 1,500 cells, 300 genes, 900 peaks, each GEX count kept with probability 0.05 (about 33 counts a cell, from about 650).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dataset_builder.simulate import simulate_paired

SHAPES = {
    "few_cells": ({"n_cells": 500, "n_genes": 200, "peaks_per_gene": 3}, None, None),
    "many_peaks": ({"n_cells": 1500, "n_genes": 400, "peaks_per_gene": 40}, None, None),
    "sparse_atac": ({"n_cells": 1500, "n_genes": 300, "peaks_per_gene": 3}, None, 0.1),
    "shallow_gex": ({"n_cells": 1500, "n_genes": 300, "peaks_per_gene": 3}, 0.05, None),
}


def thin(matrix: sp.csr_matrix, keep: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Binomial thinning: each count kept with probability ``keep`` (a shallower library)."""
    out = sp.csr_matrix(matrix, copy=True)
    out.data = rng.binomial(out.data.astype(np.int64), keep).astype(np.float32)
    out.eliminate_zeros()
    return out


def write_shape(name: str, output_dir: Path, seed: int = 0) -> Path:
    import mudata as md

    kwargs, gex_keep, atac_keep = SHAPES[name]
    rna, atac = simulate_paired(seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 1)
    if gex_keep is not None:
        rna.X = thin(rna.X, gex_keep, rng)
    if atac_keep is not None:
        atac.X = thin(atac.X, atac_keep, rng)
    path = output_dir / f"{name}.h5mu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.set_options(pull_on_update=False)
        md.MuData({"rna": rna, "atac": atac}).write(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder for the .h5mu files (outside the repository)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seed", type=int, default=0, help="random seed of the simulation (another seed: another draw of every shape)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        print(write_shape(name, out, args.seed))


if __name__ == "__main__":
    main()
