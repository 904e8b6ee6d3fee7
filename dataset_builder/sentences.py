"""Cells -> sentences, straight on CSR arrays, one chunk of cells at a time.

GEX is normalized as ``log1p(counts / size_factor)``. The rank encoding lists the detected genes by
descending value (ties in feature order); the binary encoding (the paper's) lists the genes with
log-norm >= 2.0 in feature order. ATAC lists the peaks with count > 0 in genomic order (the reader
already sorted the peak columns). Sentences are gathered from a `NameTable` with one ``pyarrow`` ``take`` over
the name indices of a whole chunk (see `join_names`), so there is no per-cell Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

__all__ = [
    "BINARY_THRESHOLD",
    "GEX_ENCODINGS",
    "GeneRanking",
    "library_size_factors",
    "rank_genes",
    "accessible_peaks",
    "NameTable",
    "join_names",
    "encode_cells",
    "encode_gex",
    "encode_atac",
    "gex_sentence_genes",
    "gex_sentences",
]

BINARY_THRESHOLD = 2.0
GEX_ENCODINGS = ("rank", "binary")


@dataclass
class GeneRanking:
    """Detected genes of a chunk of cells, each cell's genes by descending log-norm (ties by feature order).

    ``index[offsets[i]:offsets[i + 1]]`` are cell ``i``'s gene indices, ``value[...]`` their log-norm values.
    """

    offsets: np.ndarray
    index: np.ndarray
    value: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """Cell (row) of each entry."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    @property
    def positions(self) -> np.ndarray:
        """Rank position of each entry within its cell (0 = highest)."""
        return np.arange(self.index.size) - np.repeat(self.offsets[:-1], np.diff(self.offsets))


def library_size_factors(gex: sp.csr_matrix) -> np.ndarray:
    """Size factor = library size / median library size (median over cells with counts).

    Cells without counts get 0; they have no detected gene, so it is never divided by.
    """
    library = np.asarray(gex.sum(axis=1), dtype=np.float64).ravel()
    positive = library[library > 0]
    if positive.size == 0:
        raise ValueError("every cell has an empty GEX profile: there are no counts to normalize")
    return library / np.median(positive)


def _row_of_entries(matrix: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))


def _offsets(rows: np.ndarray, n_rows: int) -> np.ndarray:
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=offsets[1:])
    return offsets


def _rank_order(
    rows: np.ndarray, index: np.ndarray, counts: np.ndarray, n_rows: int, *, sorted_indices: bool
) -> np.ndarray:
    """Permutation ordering entries by (row, descending count, feature), i.e. ``np.lexsort((index, -counts, rows))``.

    Integer counts with sorted column indices (the canonical CSR the reader gives) take one stable argsort of
    a composite int64 key ``row * C + (C - 1 - count)`` (or, when counts and rows fit 16 bits, two stable radix
    sorts, by count then by row): entries are already in (row, feature) order, so a stable sort keeps
    feature order on ties and the permutation is the lexsort's (about 4-5x faster).
    """
    if sorted_indices and counts.size:
        top = float(counts.max())
        span = top + 1.0
        if span * max(n_rows, 1) < 2.0**62:
            whole = counts.astype(np.int64)
            if np.array_equal(whole, counts):
                c = int(top) + 1
                if c <= 1 << 16 and n_rows <= 1 << 16:
                    # Both keys fit 16 bits: two stable radix sorts (count, then row) instead of one merge sort.
                    by_count = np.argsort((c - 1 - whole).astype(np.uint16), kind="stable")
                    return by_count[np.argsort(rows[by_count].astype(np.uint16), kind="stable")]
                key = rows.astype(np.int64) * c
                key += c - 1 - whole
                return np.argsort(key, kind="stable")
    return np.lexsort((index, -counts, rows))


def rank_genes(gex: sp.csr_matrix, size_factors: np.ndarray) -> GeneRanking:
    """Rank the detected genes of each cell of a CSR chunk of raw counts.

    Parameters
    ----------
    gex
        CSR raw counts, cells x genes.
    size_factors
        One size factor per cell (``[n_cells]``).

    Returns
    -------
    GeneRanking
        Detected genes (count > 0) by descending count, ties in feature order, with log-norm values
        ``log1p(count / size_factor)`` as float32. Within a cell, order by count equals order by log-norm.
    """
    rows = _row_of_entries(gex)
    detected = gex.data > 0
    rows, index, counts = rows[detected], gex.indices[detected], gex.data[detected]
    order = _rank_order(rows, index, counts, gex.shape[0], sorted_indices=bool(gex.has_sorted_indices))
    rows, index, counts = rows[order], index[order], counts[order]
    value = np.log1p(counts.astype(np.float64) / size_factors[rows]).astype(np.float32)
    return GeneRanking(_offsets(rows, gex.shape[0]), index.astype(np.int32), value)


def accessible_peaks(atac: sp.csr_matrix, peak_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Accessible peaks (count > 0) of each cell of a CSR chunk with sorted column indices.

    Parameters
    ----------
    atac
        CSR counts, cells x peaks, columns in genomic order, sorted indices.
    peak_map
        Optional ``[n_peaks]`` map from column to kept-peak index (-1 = not kept), increasing on kept peaks.

    Returns
    -------
    offsets, index
        ``index[offsets[i]:offsets[i + 1]]`` are cell ``i``'s accessible (kept) peaks in genomic order.
    """
    keep = atac.data > 0
    index = atac.indices
    if peak_map is not None:
        index = peak_map[index]
        keep &= index >= 0
    starts = atac.indptr.astype(np.int64) - int(atac.indptr[0])
    if keep.all():  # the usual case: no stored zeros (the reader drops them), every peak kept
        return starts, index.astype(np.int32)
    kept_before = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    return kept_before[starts], index[keep].astype(np.int32)


class NameTable:
    """Feature names laid out for `join_names`: every name followed by a space, then every name as is.

    Build one per feature list and reuse it for every chunk of cells.
    """

    def __init__(self, names: pa.Array | Sequence[str]):
        names = names if isinstance(names, pa.Array) else pa.array(list(names), pa.string())
        self.size = len(names)
        self.names = names
        self.table = pa.concat_arrays([pc.binary_join_element_wise(names, "", " "), names.cast(pa.string())])


def join_names(names: NameTable | pa.Array, offsets: np.ndarray, index: np.ndarray) -> pa.Array:
    """Space-joined names per cell: ``" ".join(names[index[offsets[i]:offsets[i+1]]])`` for every cell, vectorized.

    One gather writes every sentence's bytes once: each entry takes its name with a trailing space, except a
    cell's last entry, which takes the bare name, so the gathered bytes are the sentences back to back and the
    sentences' offsets are the gathered names' offsets at the cells' boundaries (no second copy to join them).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_cells = offsets.size - 1
    if n_cells == 0:
        return pa.array([], pa.string())
    table = names if isinstance(names, NameTable) else NameTable(names)
    pick = np.asarray(index).astype(np.int32, copy=True)
    ends = offsets[1:]
    last = ends[ends > offsets[:-1]] - 1
    pick[last] += table.size
    taken = table.table.take(pa.array(pick, pa.int32()))
    _, value_offsets, data = taken.buffers()
    cuts = np.frombuffer(value_offsets, dtype=np.int32, count=len(taken) + 1, offset=4 * taken.offset)[offsets]
    data = data if data is not None else pa.py_buffer(b"")
    return pa.StringArray.from_buffers(n_cells, pa.py_buffer(np.ascontiguousarray(cuts, dtype=np.int32)), data)


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def encode_cells(
    gex: sp.csr_matrix,
    atac: sp.csr_matrix,
    size_factors: np.ndarray,
    genes: NameTable | pa.Array,
    peaks: NameTable | pa.Array,
    *,
    gex_encoding: str = "rank",
    peak_map: np.ndarray | None = None,
    ranking: GeneRanking | None = None,
) -> dict[str, pa.Array]:
    """Sentences and numeric columns for one chunk of cells.

    Parameters
    ----------
    gex, atac
        CSR raw counts of the same cells (atac columns in genomic order).
    size_factors
        GEX size factor of each cell.
    genes, peaks
        Feature names as `NameTable` (build once, reuse for every chunk) or ``pa.string()`` arrays (peaks: the
        kept peaks when ``peak_map`` is given).
    gex_encoding
        ``"rank"`` or ``"binary"``.
    peak_map
        Column -> kept-peak index map for ``top_peaks`` (-1 = dropped).
    ranking
        ``rank_genes(gex, size_factors)`` when the caller already has it (e.g. to also accumulate train
        statistics from it); computed here otherwise.

    Returns
    -------
    dict
        ``gex_text``, ``atac_text``, ``gex_index``, ``gex_value``, ``n_genes``, ``n_peaks`` as Arrow arrays.
    """
    return {
        **encode_gex(gex, size_factors, genes, gex_encoding=gex_encoding, ranking=ranking),
        **encode_atac(atac, peaks, peak_map=peak_map),
    }


def encode_gex(
    gex: sp.csr_matrix,
    size_factors: np.ndarray,
    genes: NameTable | pa.Array,
    *,
    gex_encoding: str = "rank",
    ranking: GeneRanking | None = None,
) -> dict[str, pa.Array]:
    """The GEX columns of `encode_cells`: ``gex_text``, ``gex_index``, ``gex_value``, ``n_genes``."""
    if ranking is None:
        ranking = rank_genes(gex, size_factors)
    gex_text = gex_sentences(ranking, genes, gex_encoding=gex_encoding)
    return {
        "gex_text": gex_text,
        "gex_index": _list_array(ranking.offsets, ranking.index, pa.int32()),
        "gex_value": _list_array(ranking.offsets, ranking.value, pa.float32()),
        "n_genes": pa.array(np.diff(ranking.offsets).astype(np.int32), pa.int32()),
    }


def encode_atac(atac: sp.csr_matrix, peaks: NameTable | pa.Array, *, peak_map: np.ndarray | None = None) -> dict[str, pa.Array]:
    """The ATAC columns of `encode_cells`: ``atac_text``, ``n_peaks``."""
    peaks = peaks if isinstance(peaks, NameTable) else NameTable(peaks)
    peak_offsets, peak_index = accessible_peaks(atac, peak_map)
    return {
        "atac_text": join_names(peaks, peak_offsets, peak_index),
        "n_peaks": pa.array(np.diff(peak_offsets).astype(np.int32), pa.int32()),
    }


def gex_sentences(
    ranking: GeneRanking,
    genes: NameTable | pa.Array | Sequence[str],
    *,
    gex_encoding: str = "rank",
    threshold: float = BINARY_THRESHOLD,
    known: np.ndarray | None = None,
) -> pa.Array:
    """GEX sentences of a chunk of ranked cells: the one cell -> sentence step of the builder, prediction and evaluation.

    Parameters
    ----------
    ranking
        The cells' detected genes by descending log-norm (`rank_genes`, or a dataset's stored ``gex_index`` /
        ``gex_value`` columns).
    genes
        Names of the columns ``ranking.index`` points into.
    gex_encoding
        ``"rank"``: every detected gene by descending log-norm; ``"binary"``: the genes with log-norm >= ``threshold``,
        in feature order.
    known
        Optional boolean mask over the columns: genes outside it are left out of the sentences (prediction's input
        genes the model does not know).

    Returns
    -------
    pa.Array
        One ``pa.string()`` sentence per cell.
    """
    names = genes if isinstance(genes, NameTable) else NameTable(genes)
    return join_names(names, *gex_sentence_genes(ranking, gex_encoding=gex_encoding, threshold=threshold, known=known))


def gex_sentence_genes(ranking: GeneRanking, *, gex_encoding: str = "rank", threshold: float = BINARY_THRESHOLD,
                       known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The genes of each cell's GEX sentence (:func:`gex_sentences`), as ``offsets`` and column ``index``: cell ``i``'s
    sentence names ``index[offsets[i]:offsets[i + 1]]`` in order."""
    if gex_encoding not in GEX_ENCODINGS:
        raise ValueError(f"unknown gex_encoding '{gex_encoding}': use one of {GEX_ENCODINGS}")
    if gex_encoding == "rank" and known is None:
        return ranking.offsets, ranking.index
    rows, index = ranking.rows, ranking.index
    keep = np.ones(index.size, dtype=bool) if known is None else np.asarray(known, dtype=bool)[index]
    if gex_encoding == "binary":
        keep &= np.asarray(ranking.value) >= np.float32(threshold)
    rows, index = rows[keep], index[keep]
    if gex_encoding == "binary":
        order = np.lexsort((index, rows))
        rows, index = rows[order], index[order]
    return _offsets(rows, len(ranking.offsets) - 1), index
