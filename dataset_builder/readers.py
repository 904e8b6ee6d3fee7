"""Read paired GEX + ATAC raw counts from the layouts users have in the wild.

Layouts: two AnnData files (one per modality), one AnnData with both modalities side by side
(``var['feature_types']``), a MuData ``.h5mu`` and a Cell Ranger ARC ``filtered_feature_bc_matrix.h5``.
Every reader returns a :class:`PairedCounts`: the cells present in both modalities (first file's order),
CSR raw counts, gene names, and peak names normalized to ``chrN-start-end`` in genomic order.
Matrices are read straight from HDF5 with ``anndata.io.read_elem`` and stay sparse; a CSC matrix is
converted to CSR once.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

__all__ = [
    "PairedCounts",
    "read_paired",
    "normalize_peak_names",
    "genomic_order",
    "GEX_LABELS",
    "ATAC_LABELS",
]

logger = logging.getLogger(__name__)

GEX_LABELS = frozenset({"GEX", "Gene Expression"})
ATAC_LABELS = frozenset({"ATAC", "Peaks"})
OBS_COLUMNS = ("batch", "cell_type")
# Integer and finiteness checks walk the value array in slices so memory stays bounded.
_CHECK_SLICE = 1 << 24
# Entries per chunk of rows when a combined CSR matrix is split into its modalities.
_SPLIT_ENTRIES = 1 << 24
_PEAK_RE = re.compile(r"^([A-Za-z0-9._]+?)[:_-](\d+)[-_](\d+)$")


@dataclass
class PairedCounts:
    """Raw counts of the cells measured in both modalities.

    Attributes
    ----------
    cells
        Barcodes, shape ``[n_cells]``.
    gex, atac
        CSR raw counts, cells x genes and cells x peaks (peaks in genomic order), canonical format.
    genes, peaks
        Feature names; peaks normalized to ``chrN-start-end`` and sorted genomically.
    obs
        Cell annotations indexed by barcode: ``batch`` and ``cell_type`` (strings) when the input has them.
    size_factors
        GEX size factors from ``obs['size_factors']`` (or ``GEX_size_factors``), or ``None``.
    counts_source
        ``"layers/counts"`` or ``"X"``: where the GEX raw counts came from.
    dropped_cells
        Cells present in only one modality (not kept).
    source
        Input file names (basenames).
    """

    cells: np.ndarray
    gex: sp.csr_matrix
    atac: sp.csr_matrix
    genes: list[str]
    peaks: list[str]
    obs: pd.DataFrame
    size_factors: np.ndarray | None = None
    counts_source: str = "X"
    dropped_cells: int = 0
    source: list[str] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return len(self.cells)


@dataclass
class _Modality:
    """One modality as read from one file, before pairing."""

    path: Path
    label: str
    cells: pd.Index
    features: list[str]
    matrix: sp.csr_matrix
    obs: pd.DataFrame
    counts_source: str
    size_factors: np.ndarray | None = None


# ----------------------------------------------------------------------------------------- files


def _open_h5(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist: check the --input path")
    if path.is_dir():
        raise ValueError(f"input {path} is a folder: pass the .h5ad, .h5mu or 10x .h5 file inside it with --input")
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"input file {path} is not an HDF5 file: give an .h5ad, .h5mu or Cell Ranger ARC .h5 file "
            "(convert other formats with anndata/scanpy first)"
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(
            f"input file {path} could not be opened ({err}): it may be truncated; re-download or re-write it"
        ) from None


def _read(group: h5py.Group, key: str, path: Path):
    """``read_elem`` with errors that name the file: a truncated file fails here."""
    try:
        with warnings.catch_warnings():
            # Files from muon/older anndata lack encoding metadata; they read fine.
            warnings.filterwarnings("ignore", message=".*without encoding metadata")
            return read_elem(group[key])
    except KeyError:
        raise ValueError(
            f"input file {path} has no '{group.name.rstrip('/')}/{key}': it is not a complete AnnData file"
        ) from None
    except Exception as err:  # h5py / anndata raise many types on a damaged file
        raise ValueError(
            f"input file {path} could not be read at '{group.name.rstrip('/')}/{key}' ({type(err).__name__}: {err}): "
            "it may be truncated or damaged; re-download or re-write it"
        ) from None


def _to_csr(matrix, path: Path, where: str) -> sp.csr_matrix:
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        return sp.csr_matrix(matrix)
    if isinstance(matrix, sp.csc_matrix | sp.csc_array | sp.coo_matrix):
        return sp.csr_matrix(matrix.tocsr())
    if isinstance(matrix, np.ndarray) and matrix.ndim == 2:
        return sp.csr_matrix(matrix)
    raise ValueError(
        f"{where} in {path} is a {type(matrix).__name__}, not a 2-D matrix: store counts as a sparse or dense matrix"
    )


def _anndata_counts(group: h5py.Group, path: Path, where: str) -> tuple[object, str]:
    """The raw-count element of an AnnData group: ``layers['counts']`` when present, else ``X``."""
    if "layers" in group and "counts" in group["layers"]:
        return _read(group["layers"], "counts", path), "layers/counts"
    if "X" not in group:
        raise ValueError(f"{where} in {path} has neither X nor layers['counts']: there are no counts to read")
    return _read(group, "X", path), "X"


def _obs_subset(obs: pd.DataFrame, size_factor_keys: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray | None]:
    keep = pd.DataFrame(index=obs.index)
    for column in OBS_COLUMNS:
        if column in obs:
            keep[column] = obs[column].astype(str).to_numpy()
    size_factors = None
    for key in size_factor_keys:
        if key in obs:
            size_factors = np.asarray(obs[key], dtype=np.float64)
            break
    return keep, size_factors


# ---------------------------------------------------------------------------------- validation


def _check_values(matrix: sp.csr_matrix, path: Path, label: str, source: str, *, counts_required: bool) -> None:
    """Refuse negative, NaN, infinite and (where counts are required) non-integer values."""
    data = matrix.data
    where = f"{label} values ({source}) in {path}"
    for start in range(0, data.size, _CHECK_SLICE):
        part = data[start : start + _CHECK_SLICE]
        if not np.isfinite(part).all():
            raise ValueError(
                f"{where} contain NaN or infinite entries: fix or remove those cells/features before building"
            )
        if (part < 0).any():
            raise ValueError(
                f"{where} contain negative entries (min {part.min():g}): the builder needs raw counts >= 0"
            )
        if counts_required and np.issubdtype(part.dtype, np.floating):
            fractional = part != np.floor(part)
            if fractional.any():
                example = part[fractional][0]
                if source == "X":
                    raise ValueError(
                        f"{where} are not integers (e.g. {example:g}): X looks normalized; the builder needs raw counts, "
                        "so store them in layers['counts'] (normalized X may stay beside them)"
                    )
                raise ValueError(f"{where} are not integers (e.g. {example:g}): layers['counts'] must hold raw counts")


def _check_modality(mod: _Modality) -> None:
    kind = "gene" if mod.label == "GEX" else "peak"
    if len(mod.features) == 0:
        raise ValueError(f"the {mod.label} modality in {mod.path} has zero features: give a file with {kind}s in var")
    if mod.cells.has_duplicates:
        dup = mod.cells[mod.cells.duplicated()][0]
        raise ValueError(
            f"duplicate cell barcodes in {mod.path} (e.g. '{dup}'): barcodes must be unique; "
            "use adata.obs_names_make_unique() or drop the repeats"
        )
    names = pd.Index(mod.features)
    if names.has_duplicates:
        dup = names[names.duplicated()][0]
        raise ValueError(
            f"duplicate {kind} names in {mod.path} (e.g. '{dup}'): every {kind} must be one token; "
            "make them unique (adata.var_names_make_unique()) or drop the repeats"
        )
    _check_values(mod.matrix, mod.path, mod.label, mod.counts_source, counts_required=mod.label == "GEX")
    if mod.matrix.count_nonzero() == 0:
        raise ValueError(
            f"all cells are empty in the {mod.label} modality of {mod.path}: there are no counts to build sentences from"
        )


# ------------------------------------------------------------------------------------- peaks


def normalize_peak_names(names: Sequence[str], path: str | Path = "input") -> list[str]:
    """Normalize peak names to ``chr-start-end``.

    Parameters
    ----------
    names
        Peak names as ``chr:start-end``, ``chr_start_end`` or ``chr-start-end``.
    path
        File the names come from (for the error message).

    Returns
    -------
    list[str]
        ``chrN-start-end`` names, same order.
    """
    parts = pd.Series(list(names), dtype=object).astype(str).str.extract(_PEAK_RE)
    bad = parts[0].isna()
    if bad.any():
        example = list(names)[int(np.flatnonzero(bad.to_numpy())[0])]
        raise ValueError(
            f"{int(bad.sum())} peak names in {path} are not genomic intervals (e.g. '{example}'): "
            "name peaks 'chr1-100-200', 'chr1:100-200' or 'chr1_100_200'"
        )
    start = parts[1].astype(np.int64)
    end = parts[2].astype(np.int64)
    if (end < start).any():
        example = list(names)[int(np.flatnonzero((end < start).to_numpy())[0])]
        raise ValueError(f"peak names in {path} have end < start (e.g. '{example}'): fix the peak coordinates")
    return (parts[0] + "-" + start.astype(str) + "-" + end.astype(str)).tolist()


def _chromosome_key(contig: str) -> tuple:
    name = contig[3:] if contig.lower().startswith("chr") else contig
    if name.isdigit():
        return (0, int(name), "")
    special = {"X": 1, "Y": 2, "M": 3, "MT": 3}
    if name.upper() in special:
        return (special[name.upper()], 0, "")
    return (4, 0, contig)


def genomic_order(peaks: Sequence[str]) -> np.ndarray:
    """Permutation sorting normalized peak names by natural chromosome order (1..22, X, Y, M, others), start, end."""
    parts = pd.Series(list(peaks), dtype=object).str.rsplit("-", n=2, expand=True)
    contigs = parts[0].to_numpy()
    unique = sorted(set(contigs), key=_chromosome_key)
    rank = pd.Index(unique).get_indexer(contigs)
    return np.lexsort((parts[2].astype(np.int64).to_numpy(), parts[1].astype(np.int64).to_numpy(), rank))


def _looks_like_peaks(names: Sequence[str]) -> bool:
    sample = list(names[:1000])
    if not sample:
        return False
    hits = sum(bool(_PEAK_RE.match(str(n))) for n in sample)
    return hits / len(sample) > 0.9


# ------------------------------------------------------------------------------------ layouts


def _read_anndata_group(
    group: h5py.Group, path: Path, where: str
) -> tuple[pd.DataFrame, pd.DataFrame, sp.csr_matrix, str]:
    obs = _read(group, "obs", path)
    var = _read(group, "var", path)
    counts, source = _anndata_counts(group, path, where)
    matrix = _to_csr(counts, path, f"{where} {source}")
    if matrix.shape != (len(obs), len(var)):
        raise ValueError(
            f"{where} in {path}: matrix shape {matrix.shape} does not match obs x var ({len(obs)} x {len(var)})"
        )
    return obs, var, matrix, source


def _feature_labels(var: pd.DataFrame, path: Path) -> np.ndarray | None:
    if "feature_types" not in var:
        return None
    labels = var["feature_types"].astype(str).to_numpy()
    unknown = sorted(set(labels) - GEX_LABELS - ATAC_LABELS)
    if unknown:
        raise ValueError(
            f"var['feature_types'] in {path} has unknown labels {unknown}: use GEX / ATAC "
            "(or Cell Ranger's 'Gene Expression' / 'Peaks')"
        )
    return labels


def _read_single_modality_h5ad(path: Path) -> _Modality:
    with _open_h5(path) as f:
        obs, var, matrix, source = _read_anndata_group(f, path, "AnnData")
    labels = _feature_labels(var, path)
    names = var.index.astype(str).tolist()
    if labels is not None and len(set(labels)) == 1:
        label = "GEX" if labels[0] in GEX_LABELS else "ATAC"
    elif labels is not None:
        raise ValueError(
            f"{path} holds both modalities (var['feature_types'] has {sorted(set(labels))}): pass it alone as one --input"
        )
    else:
        label = "ATAC" if _looks_like_peaks(names) else "GEX"
    keep, sf = _obs_subset(obs, ("size_factors",))
    return _Modality(path, label, obs.index.astype(str), names, matrix, keep, source, sf if label == "GEX" else None)


def _split_combined(
    path: Path, obs: pd.DataFrame, var: pd.DataFrame, matrix, source: str, labels: np.ndarray
) -> tuple[_Modality, _Modality]:
    cells = obs.index.astype(str)
    keep, sf = _obs_subset(obs, ("GEX_size_factors", "size_factors"))
    mods = []
    for label, accepted in (("GEX", GEX_LABELS), ("ATAC", ATAC_LABELS)):
        columns = np.flatnonzero(np.isin(labels, list(accepted)))
        sub = _to_csr(matrix[:, columns] if columns.size else sp.csr_matrix((len(cells), 0)), path, label)
        names = var.index.astype(str)[columns].tolist()
        mods.append(_Modality(path, label, cells, names, sub, keep, source, sf if label == "GEX" else None))
    return mods[0], mods[1]


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


def _split_csr_columns(
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
    if indptr.shape != (n_rows + 1,) or indptr[0] != 0 or indptr[-1] != nnz or int(indices.shape[0]) != nnz:
        raise ValueError(
            f"the count matrix in {path} is not a consistent CSR matrix (indptr of {indptr.size} for {n_rows} cells, "
            f"{nnz} values, {int(indices.shape[0])} indices): it may be truncated or damaged; re-write it"
        )
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"the count matrix in {path} has a decreasing indptr: it is damaged; re-write it")
    n_gex = int(is_gex.sum())
    n_atac = n_cols - n_gex
    remap = np.zeros(n_cols, dtype=np.int64)
    remap[is_gex] = np.arange(n_gex)
    remap[~is_gex] = np.arange(n_atac)
    chunks = _row_chunks(indptr, _SPLIT_ENTRIES)

    # HDF5 datasets are read into one buffer each, reused for every chunk (fresh memory costs the kernel a
    # zeroing pass per page: a new array a chunk doubled the system time of the read).
    longest = max((int(indptr[stop] - indptr[start]) for start, stop in chunks), default=0)
    buffers = {
        id(array): np.empty(longest, dtype=array.dtype) for array in (data, indices) if isinstance(array, h5py.Dataset)
    }

    def read(array, lo: int, hi: int) -> np.ndarray:
        try:
            if id(array) in buffers:
                out = buffers[id(array)][: hi - lo]
                if hi > lo:
                    array.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
                return out
            return np.asarray(array[lo:hi])
        except Exception as err:  # h5py raises many types on a damaged file
            raise ValueError(
                f"the count matrix in {path} could not be read ({type(err).__name__}: {err}): "
                "it may be truncated or damaged; re-download or re-write it"
            ) from None

    def columns(lo: int, hi: int) -> np.ndarray:
        index = read(indices, lo, hi)
        if index.size and (int(index.min()) < 0 or int(index.max()) >= n_cols):
            raise ValueError(
                f"the count matrix in {path} has column indices outside 0..{n_cols - 1}: it is damaged; re-write it"
            )
        return index

    # One pass: each entry is copied to its modality, column renumbered. The outputs are allocated at the
    # combined size, of which only the pages written become resident, and shrunk in place at the end.
    index_dtype = np.dtype(np.int32) if max(nnz, n_cols) < 2**31 - 1 else np.dtype(np.int64)
    remap = remap.astype(index_dtype)
    # The usual layouts store one modality's columns first, then the other's: then the mask is one comparison
    # and the remap one subtraction (no gathers through lookup tables).
    gex_first = bool(is_gex[:n_gex].all())
    atac_first = not gex_first and bool(is_gex[n_atac:].all())
    gex_indptr = np.zeros(n_rows + 1, dtype=np.int64)
    gex_data, gex_index = np.empty(nnz, dtype=data.dtype), np.empty(nnz, dtype=index_dtype)
    atac_data, atac_index = np.empty(nnz, dtype=data.dtype), np.empty(nnz, dtype=index_dtype)
    n_gex_entries = n_atac_entries = 0
    for start, stop in chunks:
        lo, hi = int(indptr[start]), int(indptr[stop])
        values, index = read(data, lo, hi), columns(lo, hi).astype(index_dtype, copy=False)
        if gex_first:
            mask = index < n_gex
        elif atac_first:
            mask = index >= n_atac
        else:
            mask = is_gex[index]
        bounds = indptr[start : stop + 1] - lo
        # Sorted columns in a block layout put each row's first modality before the other: then every output
        # is a run of each row, copied as such (a few times faster than masking every entry).
        leading = _leading_runs(mask if gex_first else ~mask, bounds) if gex_first or atac_first else None
        if leading is not None:
            per_row = leading if gex_first else np.diff(bounds) - leading
        else:
            # GEX entries of each row: sums over the rows' entry ranges (empty rows have none).
            lengths = np.diff(bounds)
            per_row = np.zeros(stop - start, dtype=np.int64)
            if mask.size:
                filled = lengths > 0
                per_row[filled] = np.add.reduceat(mask.view(np.uint8), bounds[:-1][filled], dtype=np.int64)
        cumulative = np.cumsum(per_row)
        gex_indptr[start + 1 : stop + 1] = n_gex_entries + cumulative
        g = int(cumulative[-1]) if cumulative.size else 0
        a = mask.size - g
        parts = (
            ("GEX", gex_data, gex_index, n_atac if atac_first else 0, n_gex_entries, g),
            ("ATAC", atac_data, atac_index, n_gex if gex_first else 0, n_atac_entries, a),
        )
        if leading is not None:
            cuts = bounds[:-1] + leading  # where each row's second modality starts
            first, second = (parts[0], parts[1]) if gex_first else (parts[1], parts[0])
            for label, lo_side, (_, out_data, out_index, shift, done, count) in (
                (first[0], True, first),
                (second[0], False, second),
            ):
                if only is not None and label != only:
                    continue
                runs = (bounds[:-1], cuts) if lo_side else (cuts, bounds[1:])
                _copy_runs(values, runs, out_data[done : done + count])
                _copy_runs(index, runs, out_index[done : done + count])
                if shift:
                    np.subtract(out_index[done : done + count], shift, out=out_index[done : done + count])
        else:
            for label, out_data, out_index, shift, done, count in parts:
                if only is not None and label != only:
                    continue
                keep = mask if label == "GEX" else ~mask
                np.compress(keep, values, out=out_data[done : done + count])
                if gex_first or atac_first:
                    np.compress(keep, index, out=out_index[done : done + count])
                    if shift:
                        np.subtract(out_index[done : done + count], shift, out=out_index[done : done + count])
                else:
                    np.take(remap, index[keep], out=out_index[done : done + count])
        n_gex_entries += g
        n_atac_entries += a
        del values, index, mask
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


def _split_modalities(
    path: Path,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    gex: sp.csr_matrix,
    atac: sp.csr_matrix,
    source: str,
    is_gex: np.ndarray,
) -> tuple[_Modality, _Modality]:
    cells = obs.index.astype(str)
    keep, sf = _obs_subset(obs, ("GEX_size_factors", "size_factors"))
    names = var.index.astype(str)
    return (
        _Modality(path, "GEX", cells, names[is_gex].tolist(), gex, keep, source, sf),
        _Modality(path, "ATAC", cells, names[~is_gex].tolist(), atac, keep, source, None),
    )


def _csr_group(group: h5py.Group) -> h5py.Group | None:
    """The HDF5 group of the raw counts when they are stored as a CSR matrix (read in chunks), else None."""
    element = group["layers"]["counts"] if "layers" in group and "counts" in group["layers"] else group.get("X")
    if not isinstance(element, h5py.Group):
        return None
    encoding = element.attrs.get("encoding-type", "")
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    if encoding != "csr_matrix" or not {"data", "indices", "indptr"} <= set(element.keys()):
        return None
    return element


def _read_combined_h5ad(path: Path, only: str | None = None) -> tuple[_Modality, _Modality]:
    with _open_h5(path) as f:
        obs = _read(f, "obs", path)
        var = _read(f, "var", path)
        labels = _feature_labels(var, path)
        if labels is None:
            raise ValueError(
                f"{path} is one AnnData file without var['feature_types']: label each feature GEX or ATAC in "
                "var['feature_types'], or pass the two modalities as two files (--input RNA --input ATAC)"
            )
        csr = _csr_group(f)
        if csr is not None:
            # CSR on disk: split it chunk by chunk of rows, never holding the combined matrix.
            source = "layers/counts" if csr.name.endswith("layers/counts") else "X"
            shape = tuple(int(x) for x in csr.attrs.get("shape", (-1, -1)))
            if shape != (len(obs), len(var)):
                raise ValueError(f"{path}: matrix shape {shape} does not match obs x var ({len(obs)} x {len(var)})")
            is_gex = np.isin(labels, list(GEX_LABELS))
            gex, atac = _split_csr_columns(path, _read(csr, "indptr", path), csr["data"], csr["indices"], shape, is_gex, only)
            return _split_modalities(path, obs, var, gex, atac, source, is_gex)
        counts, source = _anndata_counts(f, path, "AnnData")
    # A CSC matrix slices columns cheaply; each modality becomes CSR once in _split_combined.
    if counts.shape != (len(obs), len(var)):
        raise ValueError(f"{path}: matrix shape {counts.shape} does not match obs x var ({len(obs)} x {len(var)})")
    return _split_combined(path, obs, var, counts, source, labels)


def _read_h5mu(path: Path, gex_modality: str, atac_modality: str) -> tuple[_Modality, _Modality]:
    with _open_h5(path) as f:
        available = sorted(f["mod"].keys())
        top_obs = _read(f, "obs", path) if "obs" in f else None
        mods = []
        for label, name, flag in (("GEX", gex_modality, "--gex_modality"), ("ATAC", atac_modality, "--atac_modality")):
            if name not in f["mod"]:
                raise ValueError(
                    f"{path} has no '{name}' modality (it has {available}): pass the {label} modality's name with {flag}"
                )
            obs, var, matrix, source = _read_anndata_group(f["mod"][name], path, f"modality '{name}'")
            keep, sf = _obs_subset(obs, ("size_factors",))
            if top_obs is not None:
                top = top_obs.reindex(obs.index.astype(str))
                for column in OBS_COLUMNS:
                    if column not in keep and column in top and top[column].notna().all():
                        keep[column] = top[column].astype(str).to_numpy()
            names = var.index.astype(str).tolist()
            mods.append(
                _Modality(
                    path, label, obs.index.astype(str), names, matrix, keep, source, sf if label == "GEX" else None
                )
            )
    return mods[0], mods[1]


def _read_10x_h5(path: Path) -> tuple[_Modality, _Modality]:
    with _open_h5(path) as f:
        try:
            m = f["matrix"]
            n_features, n_cells = (int(x) for x in m["shape"][()])
            barcodes = pd.Index([b.decode() if isinstance(b, bytes) else str(b) for b in m["barcodes"][()]])
            names = np.array(
                [b.decode() if isinstance(b, bytes) else str(b) for b in m["features/name"][()]], dtype=object
            )
            labels = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in m["features/feature_type"][()]])
            data, indices, indptr = m["data"], m["indices"], m["indptr"][()]
        except (KeyError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable Cell Ranger feature-barcode matrix ({type(err).__name__}: {err}): "
                "give filtered_feature_bc_matrix.h5 as written by Cell Ranger ARC"
            ) from None
        var = pd.DataFrame(index=pd.Index(names))
        obs = pd.DataFrame(index=barcodes)
        _feature_labels(pd.DataFrame({"feature_types": labels}), path)
        if len(names) != n_features or len(labels) != n_features or len(barcodes) != n_cells:
            raise ValueError(
                f"{path} is not a readable Cell Ranger feature-barcode matrix (shape {n_features} x {n_cells} but "
                f"{len(names)} features, {len(barcodes)} barcodes): give filtered_feature_bc_matrix.h5 as written by "
                "Cell Ranger ARC"
            )
        # The 10x matrix is features x cells in CSC, i.e. cells x features in CSR: split it chunk by chunk.
        is_gex = np.isin(labels, list(GEX_LABELS))
        gex, atac = _split_csr_columns(path, indptr, data, indices, (n_cells, n_features), is_gex)
    return _split_modalities(path, obs, var, gex, atac, "X", is_gex)


# ---------------------------------------------------------------------------------- pairing


def _pair(first: _Modality, second: _Modality) -> PairedCounts:
    if first.label == second.label:
        raise ValueError(
            f"{first.path} and {second.path} both hold {first.label}: give one GEX and one ATAC file "
            "(set var['feature_types'] to GEX / ATAC if detection by feature names failed)"
        )
    shared_mask = first.cells.isin(second.cells)
    shared = first.cells[shared_mask]
    if len(shared) == 0:
        raise ValueError(
            f"no shared cell barcodes between {first.path} and {second.path}: the files must describe the same cells "
            f"(e.g. '{first.cells[0]}' vs '{second.cells[0]}'; check barcode suffixes such as '-1')"
        )
    dropped = len(first.cells) + len(second.cells) - 2 * len(shared)
    first_rows = np.flatnonzero(shared_mask)
    second_rows = second.cells.get_indexer(shared)
    gex, atac = (first, second) if first.label == "GEX" else (second, first)
    gex_rows, atac_rows = (first_rows, second_rows) if first.label == "GEX" else (second_rows, first_rows)
    obs = pd.DataFrame(index=pd.Index(shared, name="cell"))
    for column in OBS_COLUMNS:
        for mod, rows in ((first, first_rows), (second, second_rows)):
            if column in mod.obs and column not in obs:
                obs[column] = mod.obs[column].to_numpy()[rows]
    whole = lambda rows, n: len(rows) == n and np.array_equal(rows, np.arange(n))  # noqa: E731
    gex_matrix = gex.matrix if whole(gex_rows, gex.matrix.shape[0]) else gex.matrix[gex_rows]
    atac_matrix = atac.matrix if whole(atac_rows, atac.matrix.shape[0]) else atac.matrix[atac_rows]
    peaks = normalize_peak_names(atac.features, atac.path)
    if pd.Index(peaks).has_duplicates:
        dup = pd.Index(peaks)[pd.Index(peaks).duplicated()][0]
        raise ValueError(
            f"duplicate peak names in {atac.path} (e.g. '{dup}'): every peak must be one token; drop the repeats"
        )
    order = genomic_order(peaks)
    if not np.array_equal(order, np.arange(len(order))):
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        atac_matrix.indices = inverse[atac_matrix.indices].astype(atac_matrix.indices.dtype)
        atac_matrix.has_sorted_indices = False
    for matrix in (gex_matrix, atac_matrix):
        matrix.sum_duplicates()
        matrix.eliminate_zeros()  # stored zeros are not detections; row lengths now count detected features
    size_factors = gex.size_factors[gex_rows] if gex.size_factors is not None else None
    sources = list(dict.fromkeys(p.name for p in (first.path, second.path)))
    return PairedCounts(
        cells=np.asarray(shared, dtype=object),
        gex=gex_matrix,
        atac=atac_matrix,
        genes=list(gex.features),
        peaks=[peaks[i] for i in order],
        obs=obs,
        size_factors=size_factors,
        counts_source=gex.counts_source,
        dropped_cells=int(dropped),
        source=sources,
    )


def _check_size_factors(paired: PairedCounts, path: Path) -> None:
    if paired.size_factors is None:
        return
    library = np.asarray(paired.gex.sum(axis=1)).ravel()
    sf = paired.size_factors
    bad = ~np.isfinite(sf) | ((sf <= 0) & (library > 0))
    if bad.any():
        raise ValueError(
            f"obs size factors in {path} are not positive and finite for {int(bad.sum())} cells: "
            "fix them or remove the size_factors column to use library size / median library size"
        )


def read_paired(
    inputs: Sequence[str | Path], *, gex_modality: str = "rna", atac_modality: str = "atac"
) -> PairedCounts:
    """Read paired GEX + ATAC raw counts from one or two files.

    Parameters
    ----------
    inputs
        One file (combined ``.h5ad`` with ``var['feature_types']``, ``.h5mu``, or Cell Ranger ARC ``.h5``)
        or two ``.h5ad`` files, one per modality (detected by ``feature_types`` or peak-like names).
    gex_modality, atac_modality
        Modality names inside a ``.h5mu`` file.

    Returns
    -------
    PairedCounts
        The cells present in both modalities, in the first file's order.
    """
    paths = [Path(p) for p in inputs]
    if len(paths) not in (1, 2):
        raise ValueError(f"give one or two --input files, not {len(paths)}")
    if len(paths) == 2:
        first, second = (_read_single_modality_h5ad(p) for p in paths)
    else:
        path = paths[0]
        with _open_h5(path) as f:
            kind = "h5mu" if "mod" in f else "10x" if "matrix" in f else "h5ad"
        if kind == "h5mu":
            first, second = _read_h5mu(path, gex_modality, atac_modality)
        elif kind == "10x":
            first, second = _read_10x_h5(path)
        else:
            first, second = _read_combined_h5ad(path)
    for mod in (first, second):
        _check_modality(mod)
    paired = _pair(first, second)
    gex_path = first.path if first.label == "GEX" else second.path
    _check_size_factors(paired, gex_path)
    if paired.dropped_cells:
        logger.warning(
            "dropped %d cells present in only one modality; kept %d paired cells", paired.dropped_cells, paired.n_cells
        )
    return paired
