"""Read paired GEX + ATAC raw counts from the layouts users have in the wild.

Layouts: two AnnData files (one per modality), one AnnData with both modalities side by side
(``var['feature_types']``), a MuData ``.h5mu`` and a Cell Ranger ARC ``filtered_feature_bc_matrix.h5``; the same
layouts as objects in memory (``AnnData``, ``MuData``), read with the same checks and messages.
Every reader returns a :class:`PairedCounts`: the cells present in both modalities (first file's order),
CSR raw counts, gene names, and peak names normalized to ``chrN-start-end`` in genomic order.
Matrices are read straight from HDF5 with ``anndata.io.read_elem`` and stay sparse; a CSC matrix is
converted to CSR once. With ``chunk_cells`` (what a build uses), counts stored as CSR stay in the file as
`StoredCsr`, checked and read chunk by chunk, so memory does not grow with the cells.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem
from anndata.utils import make_index_unique

from .combined import split_csr_columns
from .peaks import genomic_order, looks_like_peaks, normalize_peak_names
from .stored import StoredCsr, entry_slices_of

if TYPE_CHECKING:
    import anndata
    import mudata

__all__ = [
    "Modality",
    "PairedCounts",
    "read_modality",
    "read_obsm",
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
_CHECK_SLICE = 1 << 22


@dataclass
class PairedCounts:
    """Raw counts of the cells measured in both modalities.

    Attributes
    ----------
    cells
        Barcodes, shape ``[n_cells]``.
    gex, atac
        CSR raw counts, cells x genes and cells x peaks (peaks in genomic order), canonical format: scipy CSR matrices,
        or `StoredCsr` (read from the file by chunks of cells) when read with ``chunk_cells``.
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
    gene_var, peak_var
        Text annotations of ``genes`` / ``peaks`` as read (``gene_ids``, ``interval``, ``genome``, ...), indexed like them;
        ``peak_var['input_name']`` is each peak's name as the input file wrote it (e.g. ``chr1:100-200``).
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
    gene_var: pd.DataFrame | None = None
    peak_var: pd.DataFrame | None = None

    @property
    def n_cells(self) -> int:
        return len(self.cells)


@dataclass
class Modality:
    """One modality as read from one file, before pairing.

    Attributes
    ----------
    path, label
        The file and ``"GEX"`` or ``"ATAC"``.
    cells, features
        Barcodes and feature names as read (10x gene symbols made unique).
    matrix
        CSR counts, cells x features (a `StoredCsr` when read with ``chunk_cells``).
    obs
        ``batch`` / ``cell_type`` (strings) when the input has them.
    counts_source
        ``"layers/counts"`` or ``"X"``.
    size_factors
        GEX size factors from ``obs``, or ``None``.
    var
        Feature annotations as read (e.g. ``gene_ids``, ``interval``, ``genome``), indexed by ``features``.
    annotations
        Every ``obs`` column as read, indexed by ``cells``.
    group
        The HDF5 group of the modality's AnnData (``/`` or ``/mod/NAME``), or ``None`` (10x ``.h5``, objects).
    adata
        The ``AnnData`` object the modality was read from when it was given in memory (``path`` then names it,
        e.g. ``the AnnData given``), else ``None``.
    """

    path: Path
    label: str
    cells: pd.Index
    features: list[str]
    matrix: sp.csr_matrix
    obs: pd.DataFrame
    counts_source: str
    size_factors: np.ndarray | None = None
    var: pd.DataFrame | None = None
    annotations: pd.DataFrame | None = None
    group: str | None = "/"
    adata: object | None = None


# ----------------------------------------------------------------------------------------- files


def _open_h5(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist: check the --input path")
    if path.is_dir():
        raise ValueError(f"input {path} is a folder: pass the .h5ad, .h5mu or 10x .h5 file inside it with --input")
    denied = f"input file {path} cannot be read: permission denied; make it readable (chmod u+r) or run as its owner"
    if not os.access(path, os.R_OK):
        raise ValueError(denied)
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"input file {path} is not an HDF5 file: give an .h5ad, .h5mu or Cell Ranger ARC .h5 file "
            "(convert other formats with anndata/scanpy first)"
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        # A lock or a permission is not damage: re-downloading would not help, closing the other process would.
        if isinstance(err, PermissionError) or "ermission denied" in str(err):
            raise ValueError(denied) from None
        if isinstance(err, BlockingIOError) or "unable to lock file" in str(err):
            raise ValueError(
                f"input file {path} is locked by another process that has it open for writing (an AnnData or h5py "
                "session, a copy in progress): close it there or let it finish, then rerun"
            ) from None
        raise ValueError(
            f"input file {path} could not be opened ({err}): it may be truncated; re-download or re-write it"
        ) from None


class _Unreadable(ValueError):
    """The fast reader cannot read this element; ``anndata.read_h5ad`` may still read the whole file."""


def _read(group: h5py.Group, key: str, path: Path):
    """``read_elem`` with errors that name the file: a truncated file fails here."""
    if key in ("obs", "var") and isinstance(group.get(key), h5py.Dataset):
        # anndata < 0.7 stored obs/var as compound (structured) datasets, which read_elem returns as bare arrays.
        raise _Unreadable(f"input file {path} stores '{key}' in the layout of anndata < 0.7")
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
        raise _Unreadable(
            f"input file {path} could not be read at '{group.name.rstrip('/')}/{key}' ({type(err).__name__}: {err}): "
            "it may be truncated or damaged; re-download or re-write it"
        ) from None


def _read_with_anndata(
    path: Path, fast_error: _Unreadable, counts_layer: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, object, str]:
    """obs, var, raw-count matrix and its source of a whole .h5ad read by ``anndata.read_h5ad``.

    The fallback for files the element reader cannot read (e.g. written by anndata < 0.7); when anndata
    cannot read the file either, the element reader's error (which names the damaged element) is raised.
    """
    import anndata

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = anndata.read_h5ad(path)
    except Exception:  # anndata raises many types on a damaged file
        if "layout of anndata < 0.7" in str(fast_error):
            raise ValueError(
                f"input file {path} was written by anndata < 0.7 and this anndata cannot read it: open it with the "
                "anndata version that wrote it and save it again with write_h5ad"
            ) from None
        raise ValueError(str(fast_error)) from None
    logger.info("read %s with anndata.read_h5ad (an older layout)", path)
    return adata.obs, adata.var, *_object_counts(adata, path, "AnnData", counts_layer)


def _object_counts(adata, path: Path, where: str, counts_layer: str | None = None) -> tuple[object, str]:
    """The raw counts of an ``AnnData`` object: ``layers[counts_layer or 'counts']`` when present, else ``X``."""
    layer = counts_layer or "counts"
    if layer in adata.layers:
        return adata.layers[layer], f"layers/{layer}"
    if adata.X is None:
        raise ValueError(f"{where} in {path} has neither X nor layers['counts']: there are no counts to read")
    return adata.X, "X"


def _object_elements(adata, path: Path, where: str, counts_layer: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, sp.csr_matrix, str]:
    """obs, var, CSR raw counts and their source of an ``AnnData`` object (``path``: how messages name it)."""
    counts, source = _object_counts(adata, path, where, counts_layer)
    return adata.obs, adata.var, _to_csr(counts, path, f"{where} {source}"), source


def _signed_indices(matrix):
    """A compressed sparse matrix with unsigned ``indices``/``indptr`` (scipy refuses them) cast to signed ones."""
    if not isinstance(matrix, sp.csr_matrix | sp.csr_array | sp.csc_matrix | sp.csc_array):
        return matrix
    if matrix.indices.dtype.kind != "u" and matrix.indptr.dtype.kind != "u":
        return matrix
    largest = max(int(matrix.indptr[-1]) if matrix.indptr.size else 0, max(matrix.shape))
    dtype = np.int32 if largest < 2**31 - 1 else np.int64
    kind = sp.csr_matrix if isinstance(matrix, sp.csr_matrix | sp.csr_array) else sp.csc_matrix
    return kind((matrix.data, matrix.indices.astype(dtype), matrix.indptr.astype(dtype)), shape=matrix.shape)


def _to_csr(matrix, path: Path, where: str) -> sp.csr_matrix:
    matrix = _signed_indices(matrix)
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        return sp.csr_matrix(matrix)
    if isinstance(matrix, sp.csc_matrix | sp.csc_array | sp.coo_matrix):
        return sp.csr_matrix(matrix.tocsr())
    if isinstance(matrix, np.ndarray) and matrix.ndim == 2:
        return sp.csr_matrix(matrix)
    raise ValueError(
        f"{where} in {path} is a {type(matrix).__name__}, not a 2-D matrix: store counts as a sparse or dense matrix"
    )


def _counts_key(group: h5py.Group, counts_layer: str | None) -> str:
    """Where an AnnData group's raw counts are: ``layers/NAME`` (``--counts_layer``, else ``counts``) when present, else ``X``."""
    layer = counts_layer or "counts"
    return f"layers/{layer}" if "layers" in group and layer in group["layers"] else "X"


def _anndata_counts(group: h5py.Group, path: Path, where: str, counts_layer: str | None = None) -> tuple[object, str]:
    """The raw-count element of an AnnData group: ``layers[counts_layer or 'counts']`` when present, else ``X``."""
    key = _counts_key(group, counts_layer)
    if key != "X":
        return _read(group["layers"], key.removeprefix("layers/"), path), key
    if "X" not in group:
        raise ValueError(f"{where} in {path} has neither X nor layers['counts']: there are no counts to read")
    return _read(group, "X", path), "X"


def _labels(values: pd.Series) -> pd.Categorical:
    """Labels as string categories, a missing one (NaN) kept missing: never the string 'nan'."""
    return pd.Categorical(np.where(values.notna().to_numpy(), values.astype(str).to_numpy(), None))


def _check_batch_labels(paired: PairedCounts, mods: Sequence[Modality], batch_key: str | None = None) -> None:
    """The builder trains one batch per label: refuse paired cells without one (NaN in ``obs['batch']`` or ``--batch_key``'s column)."""
    if "batch" not in paired.obs:
        return
    missing = int(paired.obs["batch"].isna().sum())
    if missing:
        column = batch_key or "batch"
        if batch_key is None:
            mod = next(m for m in mods if "batch" in m.obs)
            where, data = mod.obs.attrs.get("batch_from", ("obs['batch']", "adata"))
        else:
            mod = next(m for m in mods if m.annotations is not None and batch_key in m.annotations)
            where, data = f"obs['{batch_key}']", "adata"
        raise ValueError(
            f"{missing} of {paired.n_cells} cells in {mod.path} have no batch label (NaN in {where}): give them one, "
            f"or drop them first ({data} = {data}[{data}.obs['{column}'].notna()].copy())"
        )


def _obs_subset(obs: pd.DataFrame, size_factor_keys: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray | None]:
    keep = pd.DataFrame(index=obs.index)
    for column in OBS_COLUMNS:
        if column in obs:
            keep[column] = _labels(obs[column]) if column == "batch" else obs[column].astype(str).to_numpy()
    size_factors = None
    for key in size_factor_keys:
        if key in obs:
            size_factors = np.asarray(obs[key], dtype=np.float64)
            break
    return keep, size_factors


# ---------------------------------------------------------------------------------- validation


class _ValueCheck:
    """Refuse negative, NaN, infinite and (where counts are required) non-integer values of one modality, given its
    entries part by part; noting the number of non-zero values, the largest value and the first non-integer one."""

    def __init__(self, mod: Modality):
        self.where = f"{mod.label} values ({mod.counts_source}) in {mod.path}"
        self.source, self.counts_required = mod.counts_source, mod.label == "GEX"
        self.nonzero, self.top, self.fractional = 0, 0.0, None

    def add(self, part: np.ndarray) -> None:
        where = self.where
        if not np.isfinite(part).all():
            raise ValueError(
                f"{where} contain NaN or infinite entries: fix or remove those cells/features before building"
            )
        if (part < 0).any():
            raise ValueError(
                f"{where} contain negative entries (min {part.min():g}): the builder needs raw counts >= 0"
            )
        if self.fractional is None and np.issubdtype(part.dtype, np.floating):
            hit = part != np.floor(part)
            if hit.any():
                self.fractional = fractional = float(part[hit][0])
                if self.counts_required:
                    if self.source == "X":
                        raise ValueError(
                            f"{where} are not integers (e.g. {fractional:g}): X looks normalized; the builder needs raw counts: "
                            "name the layer that holds them with --counts_layer NAME (or store them in layers['counts'])"
                        )
                    raise ValueError(
                        f"{where} are not integers (e.g. {fractional:g}): {self.source} must hold raw counts; "
                        "name the layer that does with --counts_layer NAME"
                    )
        self.nonzero += int(np.count_nonzero(part))
        if part.size:
            self.top = max(self.top, float(part.max()))


def _check_names(mod: Modality) -> None:
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
    bad = (names.str.len() == 0) | names.str.contains(r"\s", regex=True)
    if bad.any():
        example = names[np.flatnonzero(bad)[0]]
        raise ValueError(
            f"{int(bad.sum())} {kind} names in {mod.path} are empty or contain whitespace (e.g. {example!r}): a {kind} "
            f"name is one word of a cell sentence; rename them (e.g. adata.var_names = adata.var_names.str.strip()"
            ".str.replace(r'\\s+', '_', regex=True)) or drop them"
        )
    if names.has_duplicates:
        dup = names[names.duplicated()][0]
        raise ValueError(
            f"duplicate {kind} names in {mod.path} (e.g. '{dup}'): every {kind} must be one token; "
            "make them unique (adata.var_names_make_unique()) or drop the repeats"
        )


def _check_values(mods: Sequence[Modality]) -> None:
    """Check the values of every modality in one pass over their entries (one read of a file that holds both)."""
    checks = [_ValueCheck(mod) for mod in mods]
    for which, _, part in entry_slices_of([mod.matrix for mod in mods], _CHECK_SLICE):
        checks[which].add(part)
    for mod, check in zip(mods, checks, strict=True):
        if check.nonzero == 0:
            raise ValueError(
                f"all cells are empty in the {mod.label} modality of {mod.path}: there are no counts to build sentences from"
            )
        if mod.label == "ATAC":
            _note_binarization(mod, check.top, check.fractional)


def _note_binarization(mod: Modality, top: float, fractional: float | None) -> None:
    """Log how ATAC values that are not 0/1 are read (``top``: the largest value, ``fractional``: the first non-integer
    one): a peak is accessible where its value is > 0."""
    if top <= 1 and fractional is None:
        return
    kind = f"not integers (e.g. {fractional:g}; normalized?)" if fractional is not None else f"counts (max {top:g})"
    logger.info(
        "ATAC values (%s) in %s are %s: binarized, a peak is accessible in a cell where its value is > 0",
        mod.counts_source, mod.path.name, kind,
    )


# ------------------------------------------------------------------------------------ layouts


def _read_anndata_group(
    group: h5py.Group, path: Path, where: str, counts_layer: str | None = None, chunk_cells: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, sp.csr_matrix | StoredCsr, str]:
    """obs, var, raw counts and their source of an AnnData group; ``chunk_cells``: counts stored as CSR stay in the file
    (a `StoredCsr` read in chunks of that many cells)."""
    obs = _read(group, "obs", path)
    var = _read(group, "var", path)
    csr = _csr_group(group, counts_layer) if chunk_cells else None
    if csr is not None:
        source = _counts_key(group, counts_layer)
        shape = _stored_shape(csr)
        if shape != (len(obs), len(var)):
            raise ValueError(f"{where} in {path}: matrix shape {shape} does not match obs x var ({len(obs)} x {len(var)})")
        return obs, var, StoredCsr(path, csr.name, shape, chunk_cells=chunk_cells), source
    counts, source = _anndata_counts(group, path, where, counts_layer)
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


def _stored_shape(element: h5py.Group) -> tuple[int, int]:
    return tuple(int(x) for x in element.attrs.get("shape", (-1, -1)))


def _modality_columns(is_modality: np.ndarray) -> np.ndarray:
    """Each column's index among the modality's columns, -1 for the other modality's."""
    return np.where(is_modality, np.cumsum(is_modality) - 1, -1)


def _read_single_modality_h5ad(path: Path, counts_layer: str | None = None, chunk_cells: int | None = None) -> Modality:
    group: str | None = "/"
    try:
        with _open_h5(path) as f:
            obs, var, matrix, source = _read_anndata_group(f, path, "AnnData", counts_layer, chunk_cells)
    except _Unreadable as err:
        obs, var, counts, source = _read_with_anndata(path, err, counts_layer)
        matrix, group = _to_csr(counts, path, f"AnnData {source}"), None
    return _single_modality(path, obs, var, matrix, source, group)


def _single_modality(path: Path, obs: pd.DataFrame, var: pd.DataFrame, matrix: sp.csr_matrix, source: str,
                     group: str | None, adata=None) -> Modality:
    """The one modality of an AnnData (labelled by ``var['feature_types']``, else by its feature names)."""
    labels = _feature_labels(var, path)
    names = var.index.astype(str).tolist()
    if labels is not None and len(set(labels)) == 1:
        label = "GEX" if labels[0] in GEX_LABELS else "ATAC"
    elif labels is not None:
        raise ValueError(
            f"{path} holds both modalities (var['feature_types'] has {sorted(set(labels))}): pass it alone as one --input"
        )
    else:
        label = "ATAC" if looks_like_peaks(names) else "GEX"
    keep, sf = _obs_subset(obs, ("size_factors",))
    return Modality(
        path, label, obs.index.astype(str), names, matrix, keep, source, sf if label == "GEX" else None,
        var=_annotations(var), annotations=obs, group=group, adata=adata,
    )


def _split_combined(
    path: Path, obs: pd.DataFrame, var: pd.DataFrame, matrix, source: str, labels: np.ndarray, adata=None
) -> tuple[Modality, Modality]:
    cells = obs.index.astype(str)
    keep, sf = _obs_subset(obs, ("GEX_size_factors", "size_factors"))
    mods = []
    for label, accepted in (("GEX", GEX_LABELS), ("ATAC", ATAC_LABELS)):
        columns = np.flatnonzero(np.isin(labels, list(accepted)))
        sub = _to_csr(matrix[:, columns] if columns.size else sp.csr_matrix((len(cells), 0)), path, label)
        names = var.index.astype(str)[columns].tolist()
        mods.append(Modality(
            path, label, cells, names, sub, keep, source, sf if label == "GEX" else None,
            var=_annotations(var.iloc[columns]), annotations=obs, group=None if adata is not None else "/", adata=adata,
        ))
    return mods[0], mods[1]


def _split_modalities(
    path: Path,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    gex: sp.csr_matrix,
    atac: sp.csr_matrix,
    source: str,
    is_gex: np.ndarray,
    kind: str = "h5ad",
) -> tuple[Modality, Modality]:
    cells = obs.index.astype(str)
    keep, sf = _obs_subset(obs, ("GEX_size_factors", "size_factors"))
    names = var.index.astype(str)
    group = None if kind == "10x" else "/"
    return (
        Modality(path, "GEX", cells, names[is_gex].tolist(), gex, keep, source, sf,
                 var=_annotations(var.loc[is_gex]), annotations=obs, group=group),
        Modality(path, "ATAC", cells, names[~is_gex].tolist(), atac, keep, source, None,
                 var=_annotations(var.loc[~is_gex]), annotations=obs, group=group),
    )


def _csr_group(group: h5py.Group, counts_layer: str | None = None) -> h5py.Group | None:
    """The HDF5 group of the raw counts when they are stored as a CSR matrix (read in chunks), else None."""
    element = group.get(_counts_key(group, counts_layer))
    if not isinstance(element, h5py.Group):
        return None
    encoding = element.attrs.get("encoding-type", "")
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    if encoding != "csr_matrix" or not {"data", "indices", "indptr"} <= set(element.keys()):
        return None
    return element


def _without_feature_types(path: Path) -> ValueError:
    return ValueError(
        f"{path} is one AnnData file without var['feature_types']: label each feature GEX or ATAC in "
        "var['feature_types'], or pass the two modalities as two files (--input RNA --input ATAC)"
    )


def _read_combined_h5ad(path: Path, only: str | None = None, counts_layer: str | None = None,
                        chunk_cells: int | None = None) -> tuple[Modality, Modality]:
    try:
        return _read_combined_h5ad_elements(path, only, counts_layer, chunk_cells)
    except _Unreadable as err:
        obs, var, counts, source = _read_with_anndata(path, err, counts_layer)
    labels = _feature_labels(var, path)
    if labels is None:
        raise _without_feature_types(path)
    mods = _split_combined(path, obs, var, _signed_indices(counts), source, labels)
    for mod in mods:
        mod.group = None  # not readable element by element
    return mods


def _read_combined_h5ad_elements(path: Path, only: str | None, counts_layer: str | None,
                                 chunk_cells: int | None = None) -> tuple[Modality, Modality]:
    with _open_h5(path) as f:
        obs = _read(f, "obs", path)
        var = _read(f, "var", path)
        labels = _feature_labels(var, path)
        if labels is None:
            raise _without_feature_types(path)
        csr = _csr_group(f, counts_layer)
        if csr is not None:
            # CSR on disk: split it chunk by chunk of rows, never holding the combined matrix.
            source = _counts_key(f, counts_layer)
            shape = _stored_shape(csr)
            if shape != (len(obs), len(var)):
                raise ValueError(f"{path}: matrix shape {shape} does not match obs x var ({len(obs)} x {len(var)})")
            is_gex = np.isin(labels, list(GEX_LABELS))
            if chunk_cells:
                gex = StoredCsr(path, csr.name, shape, columns=_modality_columns(is_gex), chunk_cells=chunk_cells)
                atac = gex.other_columns(_modality_columns(~is_gex))
                return _split_modalities(path, obs, var, gex, atac, source, is_gex)
            gex, atac = split_csr_columns(path, _read(csr, "indptr", path), csr["data"], csr["indices"], shape, is_gex, only)
            return _split_modalities(path, obs, var, gex, atac, source, is_gex)
        counts, source = _anndata_counts(f, path, "AnnData", counts_layer)
    # A CSC matrix slices columns cheaply; each modality becomes CSR once in _split_combined.
    if counts.shape != (len(obs), len(var)):
        raise ValueError(f"{path}: matrix shape {counts.shape} does not match obs x var ({len(obs)} x {len(var)})")
    return _split_combined(path, obs, var, _signed_indices(counts), source, labels)


def _read_h5mu(
    path: Path, gex_modality: str, atac_modality: str, only: str | None = None, counts_layer: str | None = None,
    chunk_cells: int | None = None,
) -> list[Modality]:
    """The GEX and ATAC modalities of a ``.h5mu`` (``only``: just that one; the other may be absent)."""
    with _open_h5(path) as f:
        top_obs = _read(f, "obs", path) if "obs" in f else None

        def read(name: str, where: str) -> tuple:
            return (*_read_anndata_group(f["mod"][name], path, where, counts_layer, chunk_cells), f"/mod/{name}", None)

        return _mudata_modalities(path, int(f.attrs.get("axis", 0)), sorted(f["mod"].keys()), top_obs, read,
                                  gex_modality, atac_modality, only)


def _read_mudata(mdata, gex_modality: str, atac_modality: str, only: str | None = None,
                 counts_layer: str | None = None) -> list[Modality]:
    """:func:`_read_h5mu` for a ``MuData`` object: its global ``obs`` columns are those ``write_h5mu`` would write (not a
    modality's column pulled up as ``NAME:column``)."""
    path = _object_path(mdata)
    pulled = {f"{name}:{column}" for name, adata in mdata.mod.items() for column in adata.obs.columns}
    top_obs = mdata.obs.loc[:, [c for c in mdata.obs.columns if c not in pulled]]

    def read(name: str, where: str) -> tuple:
        return (*_object_elements(mdata.mod[name], path, where, counts_layer), None, mdata.mod[name])

    return _mudata_modalities(path, int(getattr(mdata, "axis", 0)), sorted(mdata.mod), top_obs, read,
                              gex_modality, atac_modality, only)


def _mudata_modalities(path: Path, axis: int, available: list[str], top_obs: pd.DataFrame | None, read,
                       gex_modality: str, atac_modality: str, only: str | None) -> list[Modality]:
    """The modalities of a MuData (file or object): ``read(name, where)`` gives a modality's obs, var, CSR counts, their
    source, its HDF5 group and its ``AnnData`` object (one of the two is ``None``)."""
    if axis != 0:
        raise ValueError(
            f"{path} is a MuData with axis={axis} (its modalities share features, not cells): give "
            "paired GEX + ATAC as a MuData of axis=0, whose modalities hold the same cells (mudata.MuData({'rna': "
            "rna, 'atac': atac}))"
        )
    mods = []
    for label, name, flag in (("GEX", gex_modality, "--gex_modality"), ("ATAC", atac_modality, "--atac_modality")):
        if only is not None and label != only:
            continue
        if name not in available:
            raise ValueError(
                f"{path} has no '{name}' modality (it has {available}): pass the {label} modality's name with {flag}"
            )
        obs, var, matrix, source, group, adata = read(name, f"modality '{name}'")
        keep, sf = _obs_subset(obs, ("size_factors",))
        names = var.index.astype(str).tolist()
        mods.append(
            Modality(
                path, label, obs.index.astype(str), names, matrix, keep, source, sf if label == "GEX" else None,
                var=_annotations(var), annotations=_with_top_obs(obs, top_obs), group=group, adata=adata,
            )
        )
    if top_obs is not None:
        _global_obs_columns(top_obs, mods)
    return mods


def _global_obs_columns(top_obs: pd.DataFrame, mods: list[Modality]) -> None:
    """Copy ``batch`` / ``cell_type`` from a MuData's global obs into modalities that lack them."""
    top_obs = top_obs.set_axis(top_obs.index.astype(str))
    paired = mods[0].cells
    for mod in mods[1:]:
        paired = paired[paired.isin(mod.cells)]
    for column in OBS_COLUMNS:
        if column not in top_obs or any(column in mod.obs for mod in mods):
            continue
        if column != "batch" and top_obs[column].reindex(paired).isna().any():
            continue  # a cell type label is optional: a partial one is left out
        for mod in mods:
            mod.obs[column] = _labels(top_obs[column].reindex(mod.cells))  # a missing batch is refused by the builder
            if column == "batch":
                mod.obs.attrs["batch_from"] = ("the MuData's global obs['batch']", "mdata")


def _read_10x_h5(path: Path, chunk_cells: int | None = None) -> tuple[Modality, Modality]:
    with _open_h5(path) as f:
        try:
            m = f["matrix"]
            n_features, n_cells = (int(x) for x in m["shape"][()])
            barcodes = pd.Index([b.decode() if isinstance(b, bytes) else str(b) for b in m["barcodes"][()]])
            names = _strings(m["features/name"])
            labels = _strings(m["features/feature_type"])
            # Cell Ranger writes these beside the names; scanpy.read_10x_h5 keeps them as var columns.
            extra = {
                column: _strings(m["features"][key])
                for column, key in (("gene_ids", "id"), ("genome", "genome"), ("interval", "interval"))
                if key in m["features"] and len(m["features"][key]) == len(names)
            }
            data, indices, indptr = m["data"], m["indices"], m["indptr"][()]
        except (KeyError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable Cell Ranger feature-barcode matrix ({type(err).__name__}: {err}): "
                "give filtered_feature_bc_matrix.h5 as written by Cell Ranger ARC"
            ) from None
        var = pd.DataFrame({"feature_types": labels, **extra}, index=_unique_names(names, path))
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
        if chunk_cells:
            gex = StoredCsr(path, m.name, (n_cells, n_features), columns=_modality_columns(is_gex), chunk_cells=chunk_cells)
            atac = gex.other_columns(_modality_columns(~is_gex))
        else:
            gex, atac = split_csr_columns(path, indptr, data, indices, (n_cells, n_features), is_gex)
    return _split_modalities(path, obs, var, gex, atac, "X", is_gex, kind="10x")


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    return np.array([b.decode() if isinstance(b, bytes) else str(b) for b in dataset[()]], dtype=object)


def _unique_names(names: np.ndarray, path: Path) -> pd.Index:
    """Feature names made unique as ``scanpy.read_10x_h5`` + ``var_names_make_unique`` do (``TBCE``, ``TBCE-1``)."""
    index = pd.Index(names, dtype=object)
    if not index.has_duplicates:
        return index
    unique = make_index_unique(index)
    renamed = int((unique != index).sum())
    example = index[index.duplicated()][0]
    logger.warning(
        "%s repeats %d feature names (e.g. '%s'); renamed %d as var_names_make_unique does ('%s-1'); "
        "the Ensembl ids stay in var['gene_ids']",
        path.name, int(index.duplicated().sum()), example, renamed, example,
    )
    return pd.Index(unique, dtype=object)


def _annotations(var: pd.DataFrame) -> pd.DataFrame:
    """The text annotations of features (``gene_ids``, ``genome``, ``interval``, ...), indexed by name."""
    keep = [
        c for c in var.columns
        if c != "feature_types" and (isinstance(var[c].dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(var[c]))
    ]
    out = var[keep].astype(str) if keep else pd.DataFrame(index=var.index)
    out.index = var.index.astype(str)
    return out


def _with_top_obs(obs: pd.DataFrame, top_obs: pd.DataFrame | None) -> pd.DataFrame:
    """A modality's ``obs`` plus the MuData-level ``obs`` columns it lacks (rows aligned by barcode)."""
    if top_obs is None:
        return obs
    top = top_obs.reindex(obs.index)
    extra = [c for c in top.columns if c not in obs.columns]
    return pd.concat([obs, top[extra]], axis=1) if extra else obs


# ---------------------------------------------------------------------------------- pairing


_SUFFIX_SEPARATORS = "_-.:#|"


def _suffixes(cells: pd.Index) -> list[str]:
    """``""`` and the suffixes every barcode of ``cells`` ends with that start at a separator (``_rna``, ``-1_rna``), shortest first."""
    text = cells.to_series().astype(str)
    common = os.path.commonprefix([t[::-1] for t in (text.iloc[0], text.iloc[-1])])[::-1] if len(text) else ""
    found = [""]
    for i, char in enumerate(common):
        suffix = common[i:]
        if char in _SUFFIX_SEPARATORS and len(suffix) > 1 and text.str.endswith(suffix).all():
            found.append(suffix)
    return sorted(found, key=len)  # the shortest suffixes that pair the cells win: '_rna', not '-1_rna'


def _strip_modality_suffixes(first: Modality, second: Modality) -> None:
    """Pair barcodes like ``AAAC-1_rna`` / ``AAAC-1_atac``: when no barcode is shared as written, and removing one suffix
    that every barcode of a file carries makes them match, the barcodes are renamed without it (and it is logged)."""
    best, best_shared = None, 0
    for a in _suffixes(first.cells):
        for b in _suffixes(second.cells):
            if a == b:
                continue
            left = pd.Index(first.cells.str.slice(stop=-len(a))) if a else first.cells
            right = pd.Index(second.cells.str.slice(stop=-len(b))) if b else second.cells
            shared = int(left.isin(right).sum())
            if shared > best_shared and not left.has_duplicates and not right.has_duplicates:
                best, best_shared = (a, b, left, right), shared
    if best is None:
        return
    a, b, first.cells, second.cells = best
    logger.warning(
        "no barcode is shared as written; paired %d cells after removing the suffix %s from %s and %s from %s",
        best_shared, repr(a) if a else "(none)", first.path.name, repr(b) if b else "(none)", second.path.name,
    )


def _obs_column(mods: Sequence[tuple[Modality, np.ndarray]], name: str, key: str | None) -> np.ndarray | None:
    """``obs[key]`` of the first modality that has it (without a key: its checked ``name`` column), as strings,
    for the paired rows."""
    for mod, rows in mods:
        if key is None and name in mod.obs:
            return mod.obs[name].to_numpy()[rows]
        if key is not None and mod.annotations is not None and key in mod.annotations:
            values = mod.annotations[key].iloc[rows]
            return np.asarray(_labels(values)) if name == "batch" else values.astype(str).to_numpy()
    return None


def _paired_obs(cells: pd.Index, mods: Sequence[tuple[Modality, np.ndarray]], batch_key: str | None,
                cell_type_key: str | None) -> pd.DataFrame:
    """``batch`` / ``cell_type`` of the paired cells from the obs columns the keys name (default: the same names)."""
    obs = pd.DataFrame(index=pd.Index(cells, name="cell"))
    columns = sorted({c for mod, _ in mods if mod.annotations is not None for c in mod.annotations.columns})
    files = " and ".join(dict.fromkeys(str(mod.path) for mod, _ in mods))
    for name, key, flag, hints in (
        ("batch", batch_key, "--batch_key", ("batch", "sample", "library", "donor")),
        ("cell_type", cell_type_key, "--cell_type_key", ("type", "cell", "label", "annotation")),
    ):
        values = _obs_column(mods, name, key)
        if values is not None:
            obs[name] = values
        elif key is not None:
            raise ValueError(f"{flag} {key}: {files} has no obs column '{key}' (columns: {columns}); name one of them")
        else:
            similar = [c for c in columns if any(h in c.lower() for h in hints)]
            if similar:
                logger.info("no obs['%s'] in %s; name one of %s with %s to use it", name, files, similar, flag)
    return obs


def _feature_var(mod: Modality, index: Sequence[str]) -> pd.DataFrame:
    var = mod.var if mod.var is not None else pd.DataFrame(index=pd.Index(mod.features))
    var = var.copy()
    var.index = pd.Index(list(index))
    return var


def _paired_rows(mod: Modality, rows: np.ndarray) -> sp.csr_matrix:
    """``mod.matrix[rows]``; all rows in order: the matrix itself when it was read from a file (pairing then sorts it and
    drops its zeros in place), a copy when it belongs to an object in memory (the caller's object is never changed)."""
    n = mod.matrix.shape[0]
    if len(rows) == n and np.array_equal(rows, np.arange(n)):
        return mod.matrix.copy() if mod.adata is not None else mod.matrix
    return mod.matrix[rows]


def _paired_matrix(mod: Modality, rows: np.ndarray, column_order: np.ndarray | None = None) -> sp.csr_matrix | StoredCsr:
    """The paired cells' counts, columns renumbered by ``column_order`` (old -> new index), canonical: sorted, duplicates
    summed, stored zeros dropped (they are not detections; row lengths then count detected features)."""
    if isinstance(mod.matrix, StoredCsr):
        return mod.matrix.paired(rows, column_order)
    matrix = _paired_rows(mod, rows)
    if column_order is not None:
        matrix.indices = column_order[matrix.indices].astype(matrix.indices.dtype)
        matrix.has_sorted_indices = False
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def _pair(
    first: Modality, second: Modality, batch_key: str | None = None, cell_type_key: str | None = None
) -> PairedCounts:
    if first.label == second.label:
        raise ValueError(
            f"{first.path} and {second.path} both hold {first.label}: give one GEX and one ATAC file "
            "(set var['feature_types'] to GEX / ATAC if detection by feature names failed)"
        )
    if not first.cells.isin(second.cells).any():
        _strip_modality_suffixes(first, second)
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
    obs = _paired_obs(shared, ((first, first_rows), (second, second_rows)), batch_key, cell_type_key)
    peaks = normalize_peak_names(atac.features, atac.path)
    if pd.Index(peaks).has_duplicates:
        dup = pd.Index(peaks)[pd.Index(peaks).duplicated()][0]
        raise ValueError(
            f"duplicate peak names in {atac.path} (e.g. '{dup}'): every peak must be one token; drop the repeats"
        )
    order = genomic_order(peaks)
    inverse = None
    if not np.array_equal(order, np.arange(len(order))):
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
    gex_matrix, atac_matrix = _paired_matrix(gex, gex_rows), _paired_matrix(atac, atac_rows, inverse)
    size_factors = gex.size_factors[gex_rows] if gex.size_factors is not None else None
    sources = list(dict.fromkeys(p.name for p in (first.path, second.path)))
    peak_var = _feature_var(atac, peaks).iloc[order]
    peak_var.insert(0, "input_name", [str(atac.features[i]) for i in order])
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
        gene_var=_feature_var(gex, gex.features),
        peak_var=peak_var,
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
    inputs: str | os.PathLike | Sequence[str | os.PathLike | anndata.AnnData] | anndata.AnnData | mudata.MuData,
    *,
    gex_modality: str = "rna",
    atac_modality: str = "atac",
    batch_key: str | None = None,
    cell_type_key: str | None = None,
    counts_layer: str | None = None,
    chunk_cells: int | None = None,
) -> PairedCounts:
    """Read paired GEX + ATAC raw counts from one or two files, or from the same layouts as objects in memory.

    Parameters
    ----------
    inputs
        One file (combined ``.h5ad`` with ``var['feature_types']``, ``.h5mu``, or Cell Ranger ARC ``.h5``)
        or two ``.h5ad`` files, one per modality (detected by ``feature_types`` or peak-like names); or a ``MuData``,
        a combined ``AnnData``, or two ``AnnData`` objects (checked as their files would be; messages name them
        ``the AnnData given``). Objects are not changed.
    gex_modality, atac_modality
        Modality names inside a ``.h5mu`` file or ``MuData``.
    batch_key, cell_type_key
        ``obs`` columns read as ``batch`` (library / sample / donor) and ``cell_type``; default: those names, if present.
    counts_layer
        The layer holding raw counts when ``X`` is normalized; default: ``layers['counts']`` when present, else ``X``.
    chunk_cells
        Leave counts that a file stores as CSR in the file, checked and later read in chunks of this many cells
        (``gex`` / ``atac`` are then `StoredCsr`), so memory does not grow with the cells; None: read them into memory.

    Returns
    -------
    PairedCounts
        The cells present in both modalities, in the first input's order. Barcodes that differ only by one suffix per
        input (``AAAC-1_rna`` / ``AAAC-1_atac``) are paired without it.
    """
    first, second = _read_layout(_inputs(inputs), None, gex_modality, atac_modality, counts_layer, chunk_cells)
    for mod in (first, second):
        _check_counts_layer(mod, counts_layer)
        _check_names(mod)
    _check_values((first, second))
    paired = _pair(first, second, batch_key, cell_type_key)
    _check_batch_labels(paired, (first, second), batch_key)
    gex_path = first.path if first.label == "GEX" else second.path
    _check_size_factors(paired, gex_path)
    if paired.dropped_cells:
        logger.warning(
            "dropped %d cells present in only one modality; kept %d paired cells", paired.dropped_cells, paired.n_cells
        )
    return paired


def _is_anndata(value) -> bool:
    import anndata

    return isinstance(value, anndata.AnnData)


def _is_mudata(value) -> bool:
    import mudata

    return isinstance(value, mudata.MuData)


def _object_path(value) -> Path:
    """How messages name an object given in memory: ``the AnnData given``."""
    return Path(f"the {type(value).__name__} given")


def _inputs(inputs) -> list:
    """One or two inputs: paths as ``Path``, objects as given."""
    single = isinstance(inputs, str | os.PathLike) or _is_anndata(inputs) or _is_mudata(inputs)
    items = [inputs] if single else list(inputs)
    if len(items) not in (1, 2):
        raise ValueError(f"give one or two --input files, not {len(items)}")
    if len(items) == 2 and any(_is_mudata(x) for x in items):
        raise ValueError("a MuData holds both modalities: give it alone, not with a second input")
    return [x if _is_anndata(x) or _is_mudata(x) else Path(x) for x in items]


def _read_layout(items: list, only: str | None, gex_modality: str, atac_modality: str, counts_layer: str | None,
                 chunk_cells: int | None = None) -> list[Modality]:
    """The modalities of one or two inputs (``only``: ``"GEX"`` or ``"ATAC"`` when one is enough), unchecked;
    ``chunk_cells``: see `read_paired`."""
    if len(items) == 2:
        return [_read_single(x, counts_layer, chunk_cells) for x in items]
    item = items[0]
    if _is_mudata(item):
        return _read_mudata(item, gex_modality, atac_modality, only=only, counts_layer=counts_layer)
    if _is_anndata(item):
        path = _object_path(item)
        obs, var, matrix, source = _object_elements(item, path, "AnnData", counts_layer)
        labels = _feature_labels(var, path)
        if labels is not None and (only is None or (set(labels) & GEX_LABELS and set(labels) & ATAC_LABELS)):
            return list(_split_combined(path, obs, var, matrix, source, labels, adata=item))
        if only is None:
            raise _without_feature_types(path)
        return [_single_modality(path, obs, var, matrix, source, None, adata=item)]
    kind = _layout(item)
    if kind == "h5mu":
        return _read_h5mu(item, gex_modality, atac_modality, only=only, counts_layer=counts_layer, chunk_cells=chunk_cells)
    if kind == "10x":
        return list(_read_10x_h5(item, chunk_cells))
    found = _h5ad_feature_labels(item) if only is not None else set()
    if only is None or (found & GEX_LABELS and found & ATAC_LABELS):
        # Both modalities in one file: only the asked modality's entries are copied out (CSR on disk),
        # and the whole matrix is never read first as a single modality.
        return list(_read_combined_h5ad(item, only=only, counts_layer=counts_layer, chunk_cells=chunk_cells))
    return [_read_single_modality_h5ad(item, counts_layer, chunk_cells)]


def _read_single(item, counts_layer: str | None, chunk_cells: int | None = None) -> Modality:
    """One modality of two inputs: an ``.h5ad`` file or an ``AnnData`` object."""
    if _is_anndata(item):
        path = _object_path(item)
        return _single_modality(path, *_object_elements(item, path, "AnnData", counts_layer), None, adata=item)
    return _read_single_modality_h5ad(item, counts_layer, chunk_cells)


def _h5ad_feature_labels(path: Path) -> set[str]:
    """The ``var['feature_types']`` labels of an .h5ad (empty when it has none)."""
    try:
        with _open_h5(path) as f:
            var = _read(f, "var", path) if "var" in f else None
    except _Unreadable as err:
        var = _read_with_anndata(path, err)[1]
    labels = _feature_labels(var, path) if var is not None else None
    return set(labels) if labels is not None else set()


def _layout(path: Path) -> str:
    """``"h5mu"``, ``"10x"`` or ``"h5ad"``: which reader a single file needs."""
    with _open_h5(path) as f:
        return "h5mu" if "mod" in f else "10x" if "matrix" in f else "h5ad"


def _check_counts_layer(mod: Modality, counts_layer: str | None) -> None:
    """``--counts_layer NAME`` must name a layer of the GEX data (ATAC, binarized anyway, may use X)."""
    if counts_layer is None or mod.label != "GEX" or mod.counts_source == f"layers/{counts_layer}":
        return
    layers: list[str] = sorted(mod.adata.layers.keys()) if mod.adata is not None else []
    if mod.group is not None:
        with _open_h5(mod.path) as f:
            group = f[mod.group]
            layers = sorted(group["layers"].keys()) if "layers" in group else []
    raise ValueError(
        f"--counts_layer {counts_layer}: the GEX data in {mod.path} has no layers['{counts_layer}'] (layers: {layers}); "
        "name a layer it has, or leave the flag out to read layers['counts'] or X"
    )


def read_modality(
    inputs: str | os.PathLike | Sequence[str | os.PathLike | anndata.AnnData] | anndata.AnnData | mudata.MuData,
    label: str,
    *,
    gex_modality: str = "rna",
    atac_modality: str = "atac",
    counts_layer: str | None = None,
) -> Modality:
    """Read one modality (``"GEX"`` or ``"ATAC"``) from any input :func:`read_paired` reads, unpaired.

    Parameters
    ----------
    inputs
        One file (single-modality or combined ``.h5ad``, ``.h5mu``, Cell Ranger ARC ``.h5``) or two ``.h5ad`` files;
        or the same as objects in memory (``AnnData``, ``MuData``).
    label
        ``"GEX"`` or ``"ATAC"``.
    gex_modality, atac_modality
        Modality names inside a ``.h5mu`` file or ``MuData``.
    counts_layer
        The layer holding raw counts when ``X`` is normalized (see :func:`read_paired`).

    Returns
    -------
    Modality
        Every cell of the input holding that modality, checked as the builder checks it.
    """
    items = _inputs(inputs)
    mods = _read_layout(items, label, gex_modality, atac_modality, counts_layer)
    chosen = [m for m in mods if m.label == label]
    if not chosen:
        found = ", ".join(sorted({m.label for m in mods}))
        names = ", ".join(str(x if isinstance(x, Path) else _object_path(x)) for x in items)
        raise ValueError(f"{names} holds {found}, not the {label} modality this direction needs")
    mod = chosen[0]
    _check_counts_layer(mod, counts_layer)
    _check_names(mod)
    _check_values((mod,))
    return mod


def read_obsm(mod: Modality) -> dict[str, object]:
    """The ``obsm`` arrays (embeddings such as ``X_umap``) of the AnnData a :class:`Modality` was read from.

    Returns
    -------
    dict
        Name -> array (or DataFrame) with one row per cell of ``mod``, in its order (copies, for an object in memory);
        empty for a Cell Ranger ``.h5`` and for a file read through ``anndata.read_h5ad``.
    """
    if mod.adata is not None:
        return {str(k): v.copy() for k, v in mod.adata.obsm.items() if getattr(v, "shape", (None,))[0] == len(mod.cells)}
    if mod.group is None:
        return {}
    with _open_h5(mod.path) as f:
        group = f[mod.group]
        if "obsm" not in group:
            return {}
        obsm = _read(group, "obsm", mod.path)
    return {str(k): v for k, v in obsm.items() if getattr(v, "shape", (None,))[0] == len(mod.cells)}
