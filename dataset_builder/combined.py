"""One cells x features CSR matrix holding both modalities (a combined h5ad, a 10x h5) -> one CSR a modality.

The matrix is read in chunks of rows straight from HDF5 (or sliced from arrays) and each entry is copied to its
modality in one pass; see `split_csr_columns`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

__all__ = ["split_csr_columns"]

_SPLIT_ENTRIES = 1 << 24  # entries a chunk of rows (a 64 MB float32 read)


def _row_chunks(indptr: np.ndarray, max_entries: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of at most ``max_entries`` entries each (a longer row is a range alone)."""
    n_rows = indptr.size - 1
    chunks, start = [], 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + max_entries, side="right")) - 1
        stop = min(max(stop, start + 1), n_rows)
        chunks.append((start, stop))
        start = stop
    return chunks


def _leading_runs(first: np.ndarray, bounds: np.ndarray) -> np.ndarray | None:
    """Per row (entries ``bounds[i]:bounds[i + 1]``), the length of its leading run of True entries, when every
    row is all its True entries then all its False ones; None otherwise."""
    counts = np.zeros(bounds.size - 1, dtype=np.int64)
    if first.size == 0:
        return counts
    not_first = ~first
    # A False entry followed by a True one inside a row breaks the layout (a row start may follow anything).
    rising = np.flatnonzero(first[1:] & not_first[:-1]) + 1
    if rising.size and not np.isin(rising, bounds).all():
        return None
    starts, ends = bounds[:-1], bounds[1:]
    filled = ends > starts
    # A row that starts True is all True unless a True -> False step falls inside it, which ends its run.
    counts[filled] = np.where(first[starts[filled]], ends[filled] - starts[filled], 0)
    falling = np.flatnonzero(first[:-1] & not_first[1:]) + 1
    row = np.searchsorted(bounds, falling, side="right") - 1
    inside = falling > bounds[row]
    counts[row[inside]] = falling[inside] - bounds[row[inside]]
    return counts


def _copy_runs(source: np.ndarray, runs: tuple[np.ndarray, np.ndarray], out: np.ndarray) -> None:
    """``out[:] = concatenate([source[a:b] for a, b in zip(*runs)])``, one slice copy a run."""
    position = 0
    for a, b in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
        if b > a:
            out[position : position + b - a] = source[a:b]
            position += b - a
    if position != out.size:
        raise AssertionError(f"copied {position} entries into {out.size}")


class _Entries:
    """Entry ranges ``lo:hi`` of a CSR's ``data`` / ``indices`` (HDF5 datasets or arrays), with errors that name the file.

    HDF5 datasets are read into one buffer each of ``longest`` entries, reused for every chunk (fresh memory costs the
    kernel a zeroing pass per page: a new array a chunk doubled the system time of the read).
    """

    def __init__(self, path: Path, data, indices, longest: int, n_cols: int):
        self.path, self.data, self.indices, self.n_cols = path, data, indices, n_cols
        self.buffers = {id(array): np.empty(longest, dtype=array.dtype) for array in (data, indices) if isinstance(array, h5py.Dataset)}

    def read(self, array, lo: int, hi: int) -> np.ndarray:
        try:
            if id(array) in self.buffers:
                out = self.buffers[id(array)][: hi - lo]
                if hi > lo:
                    array.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
                return out
            return np.asarray(array[lo:hi])
        except Exception as err:  # h5py raises many types on a damaged file
            raise ValueError(
                f"the count matrix in {self.path} could not be read ({type(err).__name__}: {err}): "
                "it may be truncated or damaged; re-download or re-write it"
            ) from None

    def columns(self, lo: int, hi: int) -> np.ndarray:
        index = self.read(self.indices, lo, hi)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= self.n_cols):
            raise ValueError(
                f"the count matrix in {self.path} has column indices outside 0..{self.n_cols - 1}: it is damaged; re-write it"
            )
        return index


def _check_csr(path: Path, indptr: np.ndarray, nnz: int, n_indices: int, n_rows: int) -> None:
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0 or indptr[-1] != nnz or n_indices != nnz:
        raise ValueError(
            f"the count matrix in {path} is not a consistent CSR matrix (indptr of {indptr.size} for {n_rows} cells, "
            f"{nnz} values, {n_indices} indices): it may be truncated or damaged; re-write it"
        )
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"the count matrix in {path} has a decreasing indptr: it is damaged; re-write it")


def split_csr_columns(
    path: Path, indptr, data, indices, shape: tuple[int, int], is_gex: np.ndarray, only: str | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split a cells x features CSR into its GEX and ATAC columns, reading it in chunks of rows.

    ``data`` and ``indices`` are sliced by entry ranges (h5py datasets, read straight from the file, or
    arrays), in one pass, so memory holds the two output matrices plus one chunk: a per-entry mask
    ``is_gex[indices]`` picks each entry's modality and a column remap gives its index within that modality.
    Entries keep their order, so each output equals ``matrix[:, columns]`` of that modality's columns.
    ``only="GEX"`` / ``"ATAC"``: the other modality's entries are skipped, not copied, and it comes back
    as an empty matrix of the right shape (prediction needs one modality).
    """
    n_rows, n_cols = shape
    indptr = np.asarray(indptr, dtype=np.int64)
    nnz = int(data.shape[0])
    _check_csr(path, indptr, nnz, int(indices.shape[0]), n_rows)
    n_gex = int(is_gex.sum())
    n_atac = n_cols - n_gex
    chunks = _row_chunks(indptr, _SPLIT_ENTRIES)
    entries = _Entries(path, data, indices, max((int(indptr[stop] - indptr[start]) for start, stop in chunks), default=0), n_cols)

    # One pass: each entry is copied to its modality, column renumbered. The outputs are allocated at the
    # combined size, of which only the pages written become resident, and shrunk in place at the end.
    index_dtype = np.dtype(np.int32) if max(nnz, n_cols) < 2**31 - 1 else np.dtype(np.int64)
    remap = np.zeros(n_cols, dtype=np.int64)
    remap[is_gex] = np.arange(n_gex)
    remap[~is_gex] = np.arange(n_atac)
    # The usual layouts store one modality's columns first, then the other's: then the mask is one comparison
    # and the remap one subtraction (no gathers through lookup tables).
    gex_first = bool(is_gex[:n_gex].all())
    layout = _Layout(is_gex, n_gex, n_atac, gex_first, not gex_first and bool(is_gex[n_atac:].all()), remap.astype(index_dtype), only)
    gex_indptr = np.zeros(n_rows + 1, dtype=np.int64)
    gex_data, gex_index = np.empty(nnz, dtype=data.dtype), np.empty(nnz, dtype=index_dtype)
    atac_data, atac_index = np.empty(nnz, dtype=data.dtype), np.empty(nnz, dtype=index_dtype)
    n_gex_entries = n_atac_entries = 0
    for start, stop in chunks:
        lo, hi = int(indptr[start]), int(indptr[stop])
        values, index = entries.read(data, lo, hi), entries.columns(lo, hi).astype(index_dtype, copy=False)
        outputs = ((gex_data, gex_index, n_gex_entries), (atac_data, atac_index, n_atac_entries))
        per_row = _split_chunk(values, index, indptr[start : stop + 1] - lo, layout, outputs)
        cumulative = np.cumsum(per_row)
        gex_indptr[start + 1 : stop + 1] = n_gex_entries + cumulative
        g = int(cumulative[-1]) if cumulative.size else 0
        n_gex_entries += g
        n_atac_entries += hi - lo - g
        del values, index
    atac_indptr = indptr - gex_indptr
    # A skipped modality comes back empty (its buffers were never written, so never resident).
    if only == "ATAC":
        gex_data, gex_index, gex_indptr, n_gex_entries = np.empty(0, data.dtype), np.empty(0, index_dtype), np.zeros_like(indptr), 0
    if only == "GEX":
        atac_data, atac_index, atac_indptr, n_atac_entries = np.empty(0, data.dtype), np.empty(0, index_dtype), np.zeros_like(indptr), 0
    for array, size in ((gex_data, n_gex_entries), (gex_index, n_gex_entries), (atac_data, n_atac_entries), (atac_index, n_atac_entries)):
        array.resize(size, refcheck=False)
    return (
        sp.csr_matrix((gex_data, gex_index, gex_indptr.astype(index_dtype)), shape=(n_rows, n_gex)),
        sp.csr_matrix((atac_data, atac_index, atac_indptr.astype(index_dtype)), shape=(n_rows, n_atac)),
    )


@dataclass
class _Layout:
    """Where each modality's columns are: ``gex_first`` / ``atac_first`` (one block, then the other) or mixed (``remap``)."""

    is_gex: np.ndarray
    n_gex: int
    n_atac: int
    gex_first: bool
    atac_first: bool
    remap: np.ndarray
    only: str | None


def _split_chunk(values: np.ndarray, index: np.ndarray, bounds: np.ndarray, layout: _Layout, outputs: tuple) -> np.ndarray:
    """Copy one chunk of rows (entries ``values`` / ``index``, row ``bounds``) into the GEX and ATAC outputs
    (``(data, index, entries written so far)`` each), column renumbered; return the GEX entries of each row."""
    gex_first, atac_first = layout.gex_first, layout.atac_first
    if gex_first:
        mask = index < layout.n_gex
    elif atac_first:
        mask = index >= layout.n_atac
    else:
        mask = layout.is_gex[index]
    # Sorted columns in a block layout put each row's first modality before the other: then every output
    # is a run of each row, copied as such (a few times faster than masking every entry).
    leading = _leading_runs(mask if gex_first else ~mask, bounds) if gex_first or atac_first else None
    if leading is not None:
        per_row = leading if gex_first else np.diff(bounds) - leading
    else:
        # GEX entries of each row: sums over the rows' entry ranges (empty rows have none).
        lengths = np.diff(bounds)
        per_row = np.zeros(bounds.size - 1, dtype=np.int64)
        if mask.size:
            filled = lengths > 0
            per_row[filled] = np.add.reduceat(mask.view(np.uint8), bounds[:-1][filled], dtype=np.int64)
    g = int(per_row.sum())
    (gex_data, gex_index, gex_done), (atac_data, atac_index, atac_done) = outputs
    parts = (
        ("GEX", gex_data, gex_index, layout.n_atac if atac_first else 0, gex_done, g),
        ("ATAC", atac_data, atac_index, layout.n_gex if gex_first else 0, atac_done, mask.size - g),
    )
    if leading is not None:
        cuts = bounds[:-1] + leading  # where each row's second modality starts
        first, second = (parts[0], parts[1]) if gex_first else (parts[1], parts[0])
        for (label, out_data, out_index, shift, done, count), lo_side in ((first, True), (second, False)):
            if layout.only is not None and label != layout.only:
                continue
            runs = (bounds[:-1], cuts) if lo_side else (cuts, bounds[1:])
            _copy_runs(values, runs, out_data[done : done + count])
            _copy_runs(index, runs, out_index[done : done + count])
            if shift:
                np.subtract(out_index[done : done + count], shift, out=out_index[done : done + count])
        return per_row
    for label, out_data, out_index, shift, done, count in parts:
        if layout.only is not None and label != layout.only:
            continue
        keep = mask if label == "GEX" else ~mask
        np.compress(keep, values, out=out_data[done : done + count])
        if gex_first or atac_first:
            np.compress(keep, index, out=out_index[done : done + count])
            if shift:
                np.subtract(out_index[done : done + count], shift, out=out_index[done : done + count])
        else:
            np.take(layout.remap, index[keep], out=out_index[done : done + count])
    return per_row
