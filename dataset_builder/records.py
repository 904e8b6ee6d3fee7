"""A split's records back to numbers: the stored gene ranking, log-norm GEX and binary ATAC matrices (the truth).

The inverse of `dataset_builder.sentences`: training, calibration, the shipped predictor's blend and evaluation all read
a split's truth here (:func:`truth_matrices`, or a whole split of a dataset folder: :func:`load_split_matrices`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from .outputs import META_FILE
from .plan import SPLITS
from .sentences import BINARY_THRESHOLD, GEX_ENCODINGS, GeneRanking, gex_sentences

__all__ = ["FILE_FORMATS", "split_files", "load_splits", "arrow_table", "gex_ranking", "gex_matrix", "sentence_matrix", "truth_matrices", "load_metadata", "subsample_indices",
           "load_split_matrices", "source_sentences"]


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


def load_metadata(dataset_dir: str | Path) -> dict:
    """Read ``cell_sentences.json`` of a dataset folder (genes, peaks, encoding, train stats)."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --dataset_dir must be a folder made by `python -m dataset_builder --output_dir DIR`"
        )
    from tokenizer import read_meta  # the tokenizer package imports this one

    return read_meta(dataset_dir)


FILE_FORMATS = ("arrow", "parquet")


def split_files(dataset_dir: str | Path, split: str) -> tuple[str, list[Path]]:
    """The file format (``"arrow"`` or ``"parquet"``) and the record files, in row order, of one split of a dataset folder.

    An ``arrow`` split is a ``Dataset.save_to_disk`` folder (``DIR/split/state.json`` lists its Arrow stream files); a
    ``parquet`` split is ``DIR/split/data-XXXXX-of-NNNNN.parquet`` (``python -m dataset_builder --file_format parquet``).
    """
    folder = Path(dataset_dir) / split
    state = folder / "state.json"
    if state.is_file():
        return "arrow", [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    parquet = sorted(folder.glob("*.parquet"))
    if parquet:
        return "parquet", parquet
    raise FileNotFoundError(f"{dataset_dir} has no {split} split (no {state} and no Parquet files in {folder}); give a folder written by "
                            "`python -m dataset_builder`")


def load_splits(dataset_dir: str | Path, splits: Sequence[str] | None = None):
    """A dataset folder's splits as a ``datasets.DatasetDict`` (``splits``: only these), whether stored as Arrow or Parquet.

    Arrow folders open memory-mapped (``datasets.load_from_disk``); Parquet splits load through ``datasets.load_dataset
    ("parquet")``, which keeps an Arrow copy in the ``datasets`` cache. An empty split is an empty table of the same columns.
    """
    import datasets
    import pyarrow.parquet as pq

    dataset_dir = Path(dataset_dir)
    wanted = list(SPLITS if splits is None else splits)
    names = json.loads((dataset_dir / "dataset_dict.json").read_text())["splits"] if (dataset_dir / "dataset_dict.json").is_file() else []
    if not names:
        raise FileNotFoundError(f"{dataset_dir} is not a dataset folder (no dataset_dict.json); build it with `python -m dataset_builder`")
    wanted = [s for s in wanted if s in names]
    out = {}
    for split in wanted:
        kind, files = split_files(dataset_dir, split)
        if kind == "arrow":
            out[split] = datasets.load_from_disk(str(dataset_dir / split))
        elif sum(pq.ParquetFile(f).metadata.num_rows for f in files):
            out[split] = datasets.load_dataset("parquet", data_files={split: [str(f) for f in files]}, split=split)
        else:
            schema = pq.read_schema(files[0])
            out[split] = datasets.Dataset(datasets.table.InMemoryTable(schema.empty_table()), info=datasets.DatasetInfo(
                features=datasets.Features.from_arrow_schema(schema)), split=datasets.Split(split))
    return datasets.DatasetDict(out)


def _load_split(dataset_dir: Path, split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dsd = load_splits(dataset_dir, [split])
    if split not in dsd:
        raise ValueError(f"{dataset_dir} has no split {split!r}")
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


def source_sentences(data: dict, direction: str, model_meta: dict | None) -> list[str]:
    """Source sentences of the split, re-made in the model's own GEX encoding when it differs."""
    if direction == "atac2gex":
        return data["atac_text"]
    meta = model_meta or {}
    encoding = meta.get("gex_encoding", data["meta"].get("gex_encoding", "rank"))
    if encoding == data["meta"].get("gex_encoding", "rank") and meta.get("binary_threshold") in (None, data["meta"].get("binary_threshold")):
        return data["gex_text"]
    if encoding not in GEX_ENCODINGS:
        raise ValueError(f"the model's cell_sentences.json has an unknown gex_encoding {encoding!r}")
    threshold = float(meta.get("binary_threshold", BINARY_THRESHOLD))
    return gex_sentences(data["gex_ranking"], data["genes"], gex_encoding=encoding, threshold=threshold).to_pylist()
