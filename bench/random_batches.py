"""Write a copy of a paired file whose cells carry a seeded random split as their batch.

For a dataset without libraries or donors (or to draw another held-out split of one): every cell gets
``obs['batch']`` = ``test``, ``validation`` or ``train``, drawn with ``--seed`` in the given fractions, in each
modality of an ``.h5mu`` (or the obs of an ``.h5ad``). Build it with
``python -m dataset_builder --input OUT --test_batches test --validation_batches validation``.

    python bench/random_batches.py --input pbmc1k_markers.h5mu --output pbmc_split.h5mu --seed 1
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np


def random_batches(n_cells: int, test: float, validation: float, seed: int) -> np.ndarray:
    """``n_cells`` labels: exactly ``round(test * n)`` test and ``round(validation * n)`` validation cells, the rest train."""
    n_test, n_val = round(test * n_cells), round(validation * n_cells)
    if n_test + n_val > n_cells:
        raise ValueError(f"--test {test} and --validation {validation} add up to more than every cell")
    labels = np.array(["train"] * n_cells, dtype=object)
    order = np.random.default_rng(seed).permutation(n_cells)
    labels[order[:n_test]] = "test"
    labels[order[n_test:n_test + n_val]] = "validation"
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a paired .h5mu, or one .h5ad holding both modalities")
    parser.add_argument("--output", required=True, help="the copy to write (outside the repository)")
    parser.add_argument("--test", type=float, default=0.1, help="fraction of the cells in the test split")
    parser.add_argument("--validation", type=float, default=0.1, help="fraction of the cells in the validation split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source, output = Path(args.input), Path(args.output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source.suffix == ".h5mu":
            import mudata as md

            md.set_options(pull_on_update=False)
            data = md.read_h5mu(source)
            labels = random_batches(data.n_obs, args.test, args.validation, args.seed)
            for modality in data.mod.values():
                modality.obs["batch"] = labels
            data.obs["batch"] = labels
        else:
            import anndata as ad

            data = ad.read_h5ad(source)
            labels = random_batches(data.n_obs, args.test, args.validation, args.seed)
            data.obs["batch"] = labels
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        data.write(tmp)
    tmp.replace(output)
    print(f"{output}: " + ", ".join(f"{name} {int((labels == name).sum())}" for name in ("train", "validation", "test")))


if __name__ == "__main__":
    main()
