"""Count matrices left in their HDF5 file and read in chunks of cells, so that a build never holds a whole matrix.

`StoredCsr` stands for a cells x features CSR matrix stored as ``data`` / ``indices`` / ``indptr`` datasets (an
AnnData CSR element, a Cell Ranger ``matrix`` group): one modality's columns of it when the file holds both, and,
once paired, the paired cells in order with their columns in output order, canonical (sorted column indices,
duplicates summed, no stored zeros) exactly as the in-memory reader makes them. It offers what a build asks of a
count matrix: ``shape``, ``indptr``, ``nnz``, row sums (``sum(axis=1)``) and rows (``matrix[rows]``, a scipy CSR).
`entry_slices` walks the entries of either kind, a scipy CSR or a `StoredCsr`, in the same slices;
`entry_slices_of` walks several matrices at once, reading a combined file once for both modalities.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .combined import _check_csr, _row_chunks

__all__ = ["StoredCsr", "entry_slices", "entry_slices_of", "release_free_memory", "DEFAULT_CHUNK_CELLS"]

DEFAULT_CHUNK_CELLS = 2048  # cells a scan reads at once (about 90 MB of entries at 10x Multiome's density)
_READ_ENTRIES = 1 << 22  # and at most this many entries (32 MB of float32 values and int32 indices)
# Wanted rows closer than this (in entries) are read in one slice with what lies between them: one read instead of
# many small ones, at a bounded cost of unwanted entries.
_GAP_ENTRIES = 1 << 14


class _Handle:
    """The file open for reading, once, for the matrices read from it (h5py serializes the reads of threads anyway).

    When both modalities of one stored matrix share it (``shared``), the last few reads are kept: the GEX and ATAC
    columns of a chunk are made in two threads from the same stored rows, which are then read once.
    """

    _KEPT_READS = 4

    def __init__(self, path: Path, element: str):
        self.path, self.element = path, element
        self.shared = False
        self._lock = threading.Lock()
        self._file: h5py.File | None = None
        self._reads: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def read(self, spans: list[tuple[int, int]], key: bytes) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``data`` and ``indices`` of each entry range of ``spans``; ``key`` names the read for a shared handle."""
        with self._lock:
            kept = self._reads.get(key) if self.shared else None
            if kept is not None:
                return kept
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            group = self._file[self.element]
            data, indices = group["data"], group["indices"]
            out = [data[lo:hi] for lo, hi in spans], [indices[lo:hi] for lo, hi in spans]
            if self.shared:
                self._reads[key] = out
                while len(self._reads) > self._KEPT_READS:
                    self._reads.popitem(last=False)
            return out

    def close(self) -> None:
        with self._lock:
            self._reads.clear()
            if self._file is not None:
                self._file.close()
                self._file = None


class StoredCsr:
    """A cells x features CSR count matrix in an HDF5 file, read by rows.

    Parameters
    ----------
    path
        The HDF5 file.
    element
        The group holding ``data``, ``indices`` and ``indptr`` (``/X``, ``/layers/counts``, ``/mod/rna/X``, ``/matrix``).
    shape
        ``(cells, features)`` of the stored matrix.
    columns
        For a matrix holding two modalities: each stored column's index in this modality, -1 for the other's
        (None: every column, as stored).
    chunk_cells
        Cells a scan reads at once.
    """

    def __init__(self, path: str | Path, element: str, shape: tuple[int, int], *, columns: np.ndarray | None = None,
                 chunk_cells: int = DEFAULT_CHUNK_CELLS):
        if chunk_cells <= 0:
            raise ValueError(f"chunk_cells must be positive, not {chunk_cells}")
        self.path, self.element, self.chunk_cells = Path(path), element, int(chunk_cells)
        try:
            with h5py.File(self.path, "r") as f:
                group = f[element]
                indptr = np.asarray(group["indptr"][()], dtype=np.int64)
                nnz, n_indices, self.dtype = int(group["data"].shape[0]), int(group["indices"].shape[0]), group["data"].dtype
        except (KeyError, OSError) as err:
            raise ValueError(f"the count matrix in {self.path} could not be read ({type(err).__name__}: {err}): it may be truncated "
                             "or damaged; re-download or re-write it") from None
        _check_csr(self.path, indptr, nnz, n_indices, shape[0])
        self._handle = _Handle(self.path, element)
        self._file_indptr, self._file_columns = indptr, int(shape[1])
        self._index_dtype = np.dtype(np.int32) if self._file_columns < 2**31 - 1 else np.dtype(np.int64)
        self._columns = None if columns is None else np.asarray(columns, dtype=self._index_dtype)
        n_columns = shape[1] if columns is None else int((self._columns >= 0).sum())
        self._rows: np.ndarray | None = None  # the stored row of each row (a paired matrix); None: the stored rows
        self._canonical = self._renumbered = False
        self.shape = (int(shape[0]), int(n_columns))
        self._indptr: np.ndarray | None = None
        self._sums: np.ndarray | None = None
        # Each stored row's entries and sum once canonical, noted while the checks read every row (see `entry_parts`):
        # a paired matrix then knows its row pointers without reading the file again.
        self._stored_counts: tuple[np.ndarray, np.ndarray] | None = None

    def close(self) -> None:
        """Close the file (it opens again on the next read)."""
        self._handle.close()

    def __repr__(self) -> str:
        return f"StoredCsr({self.path.name}:{self.element}, shape={self.shape})"

    # ------------------------------------------------------------------------------------------ pairing

    def other_columns(self, columns: np.ndarray) -> StoredCsr:
        """The other modality's columns of the same stored matrix (``columns`` as in the constructor), reading the file
        through the same handle, so that a chunk's stored rows are read once for both."""
        out = object.__new__(StoredCsr)
        out.__dict__.update(self.__dict__)
        out._columns = np.asarray(columns, dtype=self._index_dtype)
        out.shape = (self.shape[0], int((out._columns >= 0).sum()))
        out._stored_counts = None
        self._handle.shared = True
        return out

    def paired(self, rows: np.ndarray, column_order: np.ndarray | None = None) -> StoredCsr:
        """The matrix of ``rows`` (in that order), columns renumbered by ``column_order`` (old index -> new index;
        None: kept), canonical: what ``matrix[rows]`` with renumbered indices, ``sum_duplicates()`` and
        ``eliminate_zeros()`` gives in memory."""
        out = object.__new__(StoredCsr)
        out.__dict__.update(self.__dict__)
        rows = np.asarray(rows, dtype=np.int64)
        out._rows = rows if self._rows is None else self._rows[rows]
        if column_order is not None:
            order = np.asarray(column_order, dtype=self._index_dtype)
            out._columns = order if self._columns is None else np.where(self._columns >= 0, order[np.maximum(self._columns, 0)], -1)
            out._renumbered = True
        out._canonical, out._indptr, out._sums = True, None, None
        out.shape = (int(rows.size), self.shape[1])
        return out

    # ------------------------------------------------------------------------------------------ reading

    def _stored_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def _read_stored(self, stored: np.ndarray) -> sp.csr_matrix:
        """Stored rows ``stored`` (increasing) as a CSR over the stored columns, entries as stored."""
        if not stored.size:
            return sp.csr_matrix((0, self._file_columns), dtype=self.dtype)
        indptr = self._file_indptr
        starts, stops = indptr[stored], indptr[stored + 1]
        lengths = stops - starts
        # Spans of wanted rows read as one slice each: a new span where the gap to the previous row is large.
        cut = np.flatnonzero(starts[1:] - stops[:-1] > _GAP_ENTRIES) + 1
        first = np.concatenate(([0], cut))
        last = np.concatenate((cut, [stored.size])) - 1
        spans = list(zip(starts[first].tolist(), stops[last].tolist(), strict=True))
        try:
            data_parts, index_parts = self._handle.read(spans, stored.tobytes())
        except Exception as err:  # h5py raises many types on a damaged file
            raise ValueError(f"the count matrix in {self.path} could not be read ({type(err).__name__}: {err}): it may be truncated "
                             "or damaged; re-download or re-write it") from None
        if int(lengths.sum()) != sum(part.size for part in data_parts):
            # Rows in between that are not wanted: keep only the wanted rows' entries.
            data_parts, index_parts = list(data_parts), list(index_parts)
            for n, (a, b) in enumerate(zip(first.tolist(), last.tolist(), strict=True)):
                if int(stops[b] - starts[a]) != int(lengths[a : b + 1].sum()):
                    keep = _entry_positions(starts[a : b + 1] - starts[a], lengths[a : b + 1])
                    data_parts[n], index_parts[n] = data_parts[n][keep], index_parts[n][keep]
        values = np.concatenate(data_parts) if len(data_parts) != 1 else data_parts[0]
        index = np.concatenate(index_parts) if len(index_parts) != 1 else index_parts[0]
        if not values.size:
            values, index = np.zeros(0, self.dtype), np.zeros(0, self._index_dtype)
        dtype = self._index_dtype if values.size < 2**31 - 1 else np.dtype(np.int64)
        index = index.astype(dtype, copy=False)
        if not self._canonical and index.size and (int(index.min()) < 0 or int(index.max()) >= self._file_columns):
            # Checked on the first read of every row (the checks read the whole matrix before anything is paired).
            raise ValueError(
                f"the count matrix in {self.path} has column indices outside 0..{self._file_columns - 1}: it is damaged; re-write it"
            )
        out_indptr = np.zeros(stored.size + 1, dtype=dtype)
        np.cumsum(lengths, out=out_indptr[1:])
        return sp.csr_matrix((values, index, out_indptr), shape=(stored.size, self._file_columns), copy=False)

    def _select_columns(self, matrix: sp.csr_matrix) -> sp.csr_matrix:
        """This modality's entries of ``matrix`` (stored columns), renumbered, in their order."""
        if self._columns is None:
            return matrix
        index = self._columns[matrix.indices]
        keep = index >= 0  # a copy is made even when every entry is kept: a shared read is never changed
        kept_before = np.zeros(keep.size + 1, dtype=matrix.indptr.dtype)
        np.cumsum(keep, out=kept_before[1:])
        return sp.csr_matrix((matrix.data[keep], index[keep], kept_before[matrix.indptr]), shape=(matrix.shape[0], self.shape[1]), copy=False)

    def __getitem__(self, rows) -> sp.csr_matrix:
        """Rows ``rows`` (an index array or a slice) as a scipy CSR."""
        if isinstance(rows, slice):
            rows = np.arange(self.shape[0])[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise TypeError("a StoredCsr is indexed by one array of rows")
        stored = self._stored_rows(rows)
        order = None
        if stored.size > 1 and np.any(stored[1:] < stored[:-1]):
            order = np.argsort(stored, kind="stable")
            stored = stored[order]
        matrix = self._select_columns(self._read_stored(stored))
        if order is not None:
            inverse = np.empty_like(order)
            inverse[order] = np.arange(order.size)
            matrix = matrix[inverse]
        if self._canonical:
            if self._renumbered:
                matrix.has_sorted_indices = False  # as the in-memory reader marks renumbered peaks, so both sort alike
            matrix.sum_duplicates()
            matrix.eliminate_zeros()
        return matrix

    def row_chunks(self, rows: np.ndarray | None = None) -> Iterator[sp.csr_matrix]:
        """``self[rows]`` (default: every row, in order) in consecutive chunks of at most ``chunk_cells`` cells and
        about ``_READ_ENTRIES`` stored entries."""
        rows = np.arange(self.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        lengths = np.diff(self._file_indptr)[self._stored_rows(rows)]
        bounds = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        for start, stop in _row_chunks(bounds, _READ_ENTRIES):
            for lo in range(start, stop, self.chunk_cells):
                yield self[rows[lo : min(lo + self.chunk_cells, stop)]]

    def entry_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(indices, data)`` of consecutive chunks of rows, in row order: as stored for a modality as read, canonical once paired.

        Reading a modality as read to the end also notes each stored row's canonical entries and sum, which pairing
        (a choice of rows; a renumbering of columns changes neither count) reuses.
        """
        noting = not self._canonical and self._rows is None
        lengths, sums = [], []
        for chunk in self.row_chunks():
            yield chunk.indices, chunk.data
            if noting:
                canonical = chunk.copy()
                canonical.sum_duplicates()
                canonical.eliminate_zeros()
                lengths.append(np.diff(canonical.indptr))
                sums.append(np.asarray(canonical.sum(axis=1)).ravel())
        if noting:
            self._stored_counts = _joined(lengths, sums, self.dtype)

    # ------------------------------------------------------------------------------------ per-row figures

    def _scan(self, sums_needed: bool) -> None:
        noted = self._stored_counts
        if noted is not None and self._canonical:
            rows = self._stored_rows(np.arange(self.shape[0]))
            self._indptr = _pointers(noted[0][rows])
            if not self._renumbered:  # renumbered columns add a row's values in another order
                self._sums = noted[1][rows]
            if self._sums is not None or not sums_needed:
                return
        lengths, sums = [], []
        for chunk in self.row_chunks():
            lengths.append(np.diff(chunk.indptr))
            sums.append(np.asarray(chunk.sum(axis=1)).ravel())
        lengths, self._sums = _joined(lengths, sums, self.dtype)
        self._indptr = _pointers(lengths)

    @property
    def indptr(self) -> np.ndarray:
        """Row pointers of the entries (int64), from one scan of the file (or what the checks noted)."""
        if self._indptr is None:
            self._scan(sums_needed=False)
        return self._indptr

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def sum(self, axis: int) -> np.ndarray:
        """Row sums, ``[cells, 1]`` (``axis=1`` only), as scipy sums each row of the matrix in memory."""
        if axis != 1:
            raise ValueError("a StoredCsr sums rows only (axis=1)")
        if self._sums is None:
            self._scan(sums_needed=True)
        return self._sums.reshape(-1, 1)


def _joined(lengths: list[np.ndarray], sums: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    if not lengths:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=dtype)
    return np.concatenate(lengths), np.concatenate(sums)


def _pointers(lengths: np.ndarray) -> np.ndarray:
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return indptr


def _entry_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every row, concatenated."""
    total = int(lengths.sum())
    offsets = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)


def entry_slices(matrix, step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, data)`` of ``matrix``'s entries in row order, in slices of ``step`` entries (the last one shorter).

    A scipy CSR is sliced; a `StoredCsr` is read chunk by chunk and cut at the same places, so any per-slice figure
    (a digest, a first bad value) comes out the same either way.
    """
    for _, indices, data in entry_slices_of([matrix], step):
        yield indices, data


def entry_slices_of(matrices: Sequence, step: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(i, indices, data)``: the `entry_slices` of every matrix ``matrices[i]``, each in its order.

    The `StoredCsr` among them are read chunk by chunk in step, so that the modalities of one stored matrix (a combined
    file) take each chunk of rows from one read of the file (see `StoredCsr.other_columns`); the others come first.
    """
    stored = [i for i, matrix in enumerate(matrices) if isinstance(matrix, StoredCsr)]
    for i, matrix in enumerate(matrices):
        if not isinstance(matrix, StoredCsr):
            for start in range(0, matrix.data.size, step):
                yield i, matrix.indices[start : start + step], matrix.data[start : start + step]
    slicers = {i: _Slicer(step) for i in stored}
    for parts in itertools.zip_longest(*(matrices[i].entry_parts() for i in stored)):
        for i, part in zip(stored, parts, strict=True):
            if part is not None:
                for indices, data in slicers[i].add(*part):
                    yield i, indices, data
    for i in stored:
        for indices, data in slicers[i].rest():
            yield i, indices, data


class _Slicer:
    """Entries given in parts of any size, handed back in slices of ``step``."""

    def __init__(self, step: int):
        self.step = step
        self._index: list[np.ndarray] = []
        self._data: list[np.ndarray] = []
        self._held = 0

    def add(self, index: np.ndarray, data: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The full slices that ``index`` / ``data`` complete; the rest is held for the next part."""
        if not data.size:
            return
        self._index.append(index)
        self._data.append(data)
        self._held += data.size
        if self._held < self.step:
            return
        index, data = np.concatenate(self._index), np.concatenate(self._data)
        start = 0
        while self._held - start >= self.step:
            yield index[start : start + self.step], data[start : start + self.step]
            start += self.step
        self._index, self._data, self._held = [index[start:]], [data[start:]], self._held - start

    def rest(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The last, shorter slice (if any entries are held)."""
        if self._held:
            yield np.concatenate(self._index), np.concatenate(self._data)


def release_free_memory() -> None:
    """Give the memory that the C allocator holds free back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A pass over a large file frees a buffer per chunk, and glibc keeps much of that memory, fragmented, as part of the
    process: at a million cells more than a gigabyte after the checks. The records' worker threads allocate from other
    arenas and would not reuse it.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return
    trim(0)
