"""Load one split of a dataset folder as sparse cells x features matrices (the numeric truth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

SPLITS = ("train", "validation", "test")


def load_metadata(dataset_dir: str | Path) -> dict:
    """Read ``cell_sentences.json`` of a dataset folder (genes, peaks, encoding, train stats)."""
    path = Path(dataset_dir) / "cell_sentences.json"
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


def gex_matrix(table: pa.Table, n_genes: int) -> sp.csr_matrix:
    """Cells x genes log-norm CSR from the ``gex_index`` / ``gex_value`` list columns."""
    index_col = table.column("gex_index").combine_chunks()
    value_col = table.column("gex_value").combine_chunks()
    offsets = index_col.offsets.to_numpy() - index_col.offsets[0].as_py()
    indices = index_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    values = value_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise ValueError(f"gex_index holds values outside [0, {n_genes}): dataset and cell_sentences.json disagree")
    matrix = sp.csr_matrix((values, indices, offsets), shape=(table.num_rows, n_genes))
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def sentence_matrix(texts: pa.ChunkedArray | pa.Array, features: list[str], column: str) -> sp.csr_matrix:
    """Binary cells x features CSR from space-separated sentences of feature names (vectorized)."""
    tokens = pc.split_pattern(pc.utf8_trim_whitespace(texts), " ")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    lengths = pc.list_value_length(tokens).fill_null(0).to_numpy(zero_copy_only=False)
    flat = tokens.flatten().to_numpy(zero_copy_only=False)
    nonempty = flat != ""
    cols = pd.Index(features).get_indexer(flat)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    bad = nonempty & (cols < 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} tokens of {column} (e.g. {flat[bad][0]!r}) are not in cell_sentences.json: "
            "the dataset folder is inconsistent"
        )
    keep = nonempty
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])), shape=(len(lengths), len(features))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def binary_gex_sentences(gex: sp.csr_matrix, genes: list[str], threshold: float = 2.0) -> list[str]:
    """Binary-encoding GEX sentences: genes with log-norm >= ``threshold``, in feature order."""
    gex = sp.csr_matrix(gex)
    gex.sort_indices()
    names = np.asarray(genes, dtype=object)
    out = []
    for i in range(gex.shape[0]):
        lo, hi = gex.indptr[i], gex.indptr[i + 1]
        idx = gex.indices[lo:hi][gex.data[lo:hi] >= threshold]
        out.append(" ".join(names[idx]))
    return out


def rank_gex_sentences(order_offsets: np.ndarray, order_indices: np.ndarray, genes: list[str]) -> list[str]:
    """Rank-encoding GEX sentences: detected genes in the stored descending log-norm order.

    ``order_offsets`` / ``order_indices`` are the flattened ``gex_index`` column (see :func:`load_split_matrices`).
    """
    names = np.asarray(genes, dtype=object)
    return [" ".join(names[order_indices[lo:hi]]) for lo, hi in zip(order_offsets[:-1], order_offsets[1:], strict=True)]


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
        ``gex_order_offsets`` / ``gex_order_indices`` (the ``gex_index`` column flattened: genes of cell ``i``
        in descending log-norm order are ``indices[offsets[i]:offsets[i + 1]]``), ``genes``, ``peaks``, ``meta``.
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
    table = ds.with_format("arrow")[:]
    genes, peaks = list(meta["genes"]), list(meta["peaks"])
    index_col = table.column("gex_index").combine_chunks()
    gex_offsets = index_col.offsets.to_numpy() - index_col.offsets[0].as_py()
    gex_indices = index_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    out = {
        "gex": gex_matrix(table, len(genes)),
        "atac": sentence_matrix(table.column("atac_text"), peaks, "atac_text"),
        "gex_text": table.column("gex_text").to_pylist(),
        "atac_text": table.column("atac_text").to_pylist(),
        "cells": table.column("cell").to_pylist(),
        "cell_type": table.column("cell_type").to_pylist() if "cell_type" in table.column_names else None,
        "batch": table.column("batch").to_pylist() if "batch" in table.column_names else None,
        "gex_order_offsets": gex_offsets,
        "gex_order_indices": gex_indices,
        "genes": genes,
        "peaks": peaks,
        "meta": meta,
        "split": split,
    }
    return out
