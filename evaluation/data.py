"""Load one split of a dataset folder as sparse cells x features matrices (the numeric truth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset_builder.outputs import META_FILE
from dataset_builder.plan import SPLITS
from dataset_builder.records import arrow_table, gex_ranking, truth_matrices


def load_metadata(dataset_dir: str | Path) -> dict:
    """Read ``cell_sentences.json`` of a dataset folder (genes, peaks, encoding, train stats)."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --dataset_dir must be a folder made by `python -m dataset_builder --output_dir DIR`"
        )
    from tokenizer import read_meta

    return read_meta(dataset_dir)


def _load_split(dataset_dir: Path, split: str):
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        dsd = datasets.load_from_disk(str(dataset_dir))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{dataset_dir} is not a saved DatasetDict ({err}); build it with dataset_builder") from err
    if split not in dsd:
        raise ValueError(f"{dataset_dir} has no split {split!r} (it has {sorted(dsd)})")
    return dsd[split]


def subsample_indices(n_cells: int, max_cells: int | None) -> np.ndarray:
    """Evenly spaced cell indices (all cells when ``max_cells`` is None or not smaller than ``n_cells``)."""
    if max_cells is None or max_cells >= n_cells:
        return np.arange(n_cells)
    if max_cells <= 0:
        raise ValueError(f"--max_cells must be positive, got {max_cells}")
    return np.unique(np.linspace(0, n_cells - 1, max_cells).round().astype(np.int64))


def load_split_matrices(dataset_dir: str | Path, split: str, max_cells: int | None = None) -> dict:
    """Load one split of a dataset folder as matrices and texts.

    Parameters
    ----------
    dataset_dir
        Folder written by ``python -m dataset_builder --output_dir DIR``.
    split
        ``"train"``, ``"validation"`` or ``"test"``.
    max_cells
        Keep at most this many cells (evenly spaced over the split) for quick runs.

    Returns
    -------
    dict
        ``gex`` (CSR float32 log-norm, cells x genes), ``atac`` (CSR float32 binary, cells x peaks),
        ``gex_text``, ``atac_text``, ``cells`` (lists of str), ``cell_type`` and ``batch`` (lists or None),
        ``gex_ranking`` (the stored ``gex_index`` / ``gex_value`` columns as a
        :class:`dataset_builder.sentences.GeneRanking`), ``genes``, ``peaks``, ``meta``.
    """
    dataset_dir = Path(dataset_dir)
    meta = load_metadata(dataset_dir)
    for key in ("genes", "peaks"):
        if key not in meta:
            raise ValueError(f"{dataset_dir / 'cell_sentences.json'} lacks the {key!r} list")
    ds = _load_split(dataset_dir, split)
    keep = subsample_indices(ds.num_rows, max_cells)
    if keep.size < ds.num_rows:
        ds = ds.select(keep.tolist())
    if ds.num_rows == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} has no cells")
    table = arrow_table(ds)
    genes, peaks = list(meta["genes"]), list(meta["peaks"])
    out = {
        **truth_matrices(table, meta),
        "gex_text": table.column("gex_text").to_pylist(),
        "atac_text": table.column("atac_text").to_pylist(),
        "cells": table.column("cell").to_pylist(),
        "cell_type": table.column("cell_type").to_pylist() if "cell_type" in table.column_names else None,
        "batch": table.column("batch").to_pylist() if "batch" in table.column_names else None,
        "gex_ranking": gex_ranking(table),
        "genes": genes,
        "peaks": peaks,
        "meta": meta,
        "split": split,
    }
    return out
