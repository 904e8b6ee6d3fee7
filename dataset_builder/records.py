"""A split's records back to numbers: the stored gene ranking, log-norm GEX and binary ATAC matrices (the truth).

The inverse of `dataset_builder.sentences`: training, calibration and evaluation all read a split's truth here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from .sentences import GeneRanking

__all__ = ["arrow_table", "gex_ranking", "gex_matrix", "sentence_matrix", "truth_matrices"]


def arrow_table(split) -> pa.Table:
    """The rows of a ``datasets.Dataset`` (selections applied) or a ``pa.Table`` as one ``pa.Table``."""
    if isinstance(split, pa.Table):
        return split
    return split.with_format("arrow")[:]


def gex_ranking(table: pa.Table) -> GeneRanking:
    """The stored ``gex_index`` / ``gex_value`` columns as a `GeneRanking` (each cell's genes by descending log-norm)."""
    index_col = table.column("gex_index").combine_chunks()
    value_col = table.column("gex_value").combine_chunks()
    offsets = index_col.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    index = index_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    value = value_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return GeneRanking(offsets, index, value)


def gex_matrix(table: pa.Table, n_genes: int) -> sp.csr_matrix:
    """Cells x genes log-norm CSR from the ``gex_index`` / ``gex_value`` list columns."""
    ranking = gex_ranking(table)
    if ranking.index.size and (ranking.index.min() < 0 or ranking.index.max() >= n_genes):
        raise ValueError(f"gex_index holds values outside [0, {n_genes}): dataset and cell_sentences.json disagree")
    matrix = sp.csr_matrix((ranking.value, ranking.index, ranking.offsets), shape=(table.num_rows, n_genes))
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def sentence_matrix(texts: pa.ChunkedArray | pa.Array, features: Sequence[str], column: str) -> sp.csr_matrix:
    """Binary cells x features CSR from space-separated sentences of feature names (vectorized)."""
    tokens = pc.split_pattern(pc.utf8_trim_whitespace(texts), " ")
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    lengths = pc.list_value_length(tokens).fill_null(0).to_numpy(zero_copy_only=False)
    flat = tokens.flatten().to_numpy(zero_copy_only=False)
    nonempty = flat != ""
    cols = pd.Index(list(features)).get_indexer(flat)
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


def truth_matrices(split, meta: dict) -> dict[str, sp.csr_matrix]:
    """Truth of a dataset split: ``{"gex": log-norm csr [cells, genes], "atac": binary csr [cells, peaks]}``.

    ``split``: a ``datasets.Dataset`` or ``pa.Table`` of records. GEX comes from the ``gex_index`` / ``gex_value``
    columns (every detected gene, not only the sentence's), ATAC from ``atac_text``.
    """
    table = arrow_table(split)
    return {
        "gex": gex_matrix(table, len(meta["genes"])),
        "atac": sentence_matrix(table.column("atac_text"), meta["peaks"], "atac_text"),
    }
