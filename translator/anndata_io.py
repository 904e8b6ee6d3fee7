"""AnnData in, AnnData out: read a source modality from any layout, write the predicted target modality.

Source cells are encoded exactly as the training data was (``dataset_builder.sentences``): GEX as
``log1p(counts / size_factor)`` ranked (or binarized, following the model's ``gex_encoding``), ATAC
as the accessible peaks. Genes unknown to the model are ignored and counted; peaks of another peak
set are mapped onto the model's peaks by genomic overlap (numbers mapped / unmapped reported).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from .data import SOURCE_MODALITY, TARGET_MODALITY

logger = logging.getLogger(__name__)


def _read_source_modality(paths: Sequence[Path], label: str):
    """The ``label`` ("GEX" or "ATAC") modality from one or two files, via dataset_builder's readers."""

    from dataset_builder import readers

    if len(paths) not in (1, 2):
        raise ValueError(f"give one or two --input files, not {len(paths)}")
    if len(paths) == 2:
        mods = [readers._read_single_modality_h5ad(p) for p in paths]
    else:
        path = paths[0]
        with readers._open_h5(path) as f:
            kind = "h5mu" if "mod" in f else "10x" if "matrix" in f else "h5ad"
        if kind == "h5mu":
            mods = list(readers._read_h5mu(path, "rna", "atac"))
        elif kind == "10x":
            mods = list(readers._read_10x_h5(path))
        else:
            with readers._open_h5(path) as f:
                labels = readers._feature_labels(readers._read(f, "var", path), path) if "var" in f else None
            found = set(labels) if labels is not None else set()
            if found & readers.GEX_LABELS and found & readers.ATAC_LABELS:
                # Both modalities in one file: only the source modality's entries are copied out (CSR on disk),
                # and the whole matrix is never read first as a single modality.
                mods = list(readers._read_combined_h5ad(path, only=label))
            else:
                mods = [readers._read_single_modality_h5ad(path)]
    chosen = [m for m in mods if m.label == label]
    if not chosen:
        found = ", ".join(sorted({m.label for m in mods}))
        raise ValueError(f"{', '.join(str(p) for p in paths)} holds {found}, not the {label} modality this direction needs")
    mod = chosen[0]
    readers._check_modality(mod)
    return mod


def map_peaks_by_overlap(query: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """Index of the reference peak overlapping each query peak (-1 = none), vectorized per chromosome.

    Both lists are normalized ``chrN-start-end`` names; the reference is in genomic order with
    non-overlapping peaks (as dataset_builder writes it). A query peak maps to the first reference
    peak it overlaps; identical names always map to each other.
    """

    def split(names: Sequence[str]) -> pd.DataFrame:
        parts = pd.Series(list(names), dtype=str).str.rsplit("-", n=2, expand=True)
        return pd.DataFrame({"chrom": parts[0], "start": parts[1].astype(np.int64), "end": parts[2].astype(np.int64)})

    out = np.full(len(query), -1, dtype=np.int64)
    if not len(query) or not len(reference):
        return out
    q, r = split(query), split(reference)
    r["index"] = np.arange(len(r))
    for chrom, q_rows in q.groupby("chrom", sort=False).groups.items():
        ref = r[r["chrom"] == chrom].sort_values("start")
        if ref.empty:
            continue
        ends = np.maximum.accumulate(ref["end"].to_numpy())
        starts = ref["start"].to_numpy()
        qs = q.loc[q_rows, "start"].to_numpy()
        qe = q.loc[q_rows, "end"].to_numpy()
        j = np.searchsorted(ends, qs, side="right")  # first reference peak ending after the query start
        j_clipped = np.minimum(j, len(ref) - 1)
        hit = (j < len(ref)) & (starts[j_clipped] < qe)
        out[np.asarray(q_rows)[hit]] = ref["index"].to_numpy()[j_clipped[hit]]
    return out


SENTENCE_BLOCK = 4096  # cells ranked and joined at a time: the per-entry work arrays stay small (a full-size file has ~0.3 G entries)


def _gex_sentences(mod, meta: dict, block: int = SENTENCE_BLOCK) -> tuple[Iterator[list[str]], dict]:
    """GEX sentences ``block`` cells at a time (a generator), and the counts of what was mapped."""
    from dataset_builder.sentences import BINARY_THRESHOLD, NameTable, library_size_factors, rank_genes

    counts = sp.csr_matrix(mod.matrix)
    use_obs = str(meta.get("normalization", {}).get("size_factor", "")).startswith("obs") and mod.size_factors is not None
    size_factors = np.asarray(mod.size_factors if use_obs else library_size_factors(counts), dtype=np.float64)
    names = np.asarray(mod.features, dtype=object)
    name_array = NameTable(pa.array(names.tolist(), pa.string()))
    model_genes = set(meta["genes"])
    known = np.array([n in model_genes for n in names])

    def blocks() -> Iterator[list[str]]:
        for start in range(0, counts.shape[0], block):
            stop = min(start + block, counts.shape[0])
            ranking = rank_genes(counts[start:stop], size_factors[start:stop])
            index, value, rows = ranking.index, ranking.value, ranking.rows
            keep = known[index]
            if meta.get("gex_encoding") == "binary":
                keep &= value >= np.float32(BINARY_THRESHOLD)
                order = np.lexsort((index, rows))
                rows, index, keep = rows[order], index[order], keep[order]
            rows, index = rows[keep], index[keep]
            offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=stop - start))])
            yield _join(name_array, offsets, index)

    stats = {"source_features": len(names), "unknown_genes": int((~known).sum())}
    if stats["unknown_genes"]:
        logger.warning("%d of %d input genes are unknown to the model and were ignored", stats["unknown_genes"], len(names))
    return blocks(), stats


def _atac_sentences(mod, meta: dict, block: int = SENTENCE_BLOCK) -> tuple[Iterator[list[str]], dict]:
    """ATAC sentences (the model's peaks each cell's peaks overlap) ``block`` cells at a time, and the mapping counts."""
    from dataset_builder.readers import normalize_peak_names
    from dataset_builder.sentences import NameTable

    names = normalize_peak_names(mod.features, mod.path)
    mapping = map_peaks_by_overlap(names, meta["peaks"])
    matrix = sp.csr_matrix(mod.matrix)
    model_peaks = NameTable(pa.array(list(meta["peaks"]), pa.string()))

    def blocks() -> Iterator[list[str]]:
        for start in range(0, matrix.shape[0], block):
            rows_block = matrix[start : start + block]
            rows_block.eliminate_zeros()
            cols = mapping[rows_block.indices]
            rows = np.repeat(np.arange(rows_block.shape[0]), np.diff(rows_block.indptr))
            keep = cols >= 0
            # Several input peaks may fall on one model peak: count it once, in genomic (= model) order.
            accessible = sp.csr_matrix((np.ones(keep.sum(), np.int8), (rows[keep], cols[keep])), shape=(rows_block.shape[0], len(meta["peaks"])))
            accessible.sum_duplicates()
            accessible.sort_indices()
            yield _join(model_peaks, accessible.indptr, accessible.indices)

    stats = {"source_features": len(names), "mapped_peaks": int((mapping >= 0).sum()), "unmapped_peaks": int((mapping < 0).sum())}
    if stats["unmapped_peaks"]:
        logger.warning("%d of %d input peaks overlap no model peak and were ignored", stats["unmapped_peaks"], len(names))
    return blocks(), stats


def _join(names, offsets: np.ndarray, index: np.ndarray) -> list[str]:
    from dataset_builder.sentences import join_names

    return join_names(names, np.asarray(offsets), np.asarray(index)).to_pylist()


def source_sentence_blocks(adata_or_path, direction: str, meta: dict, block: int = SENTENCE_BLOCK):
    """Source sentences ``block`` cells at a time (a generator of lists), with ``obs``, the counts and the cell count.

    Only the source matrix is held, never every cell's sentence (69,249 full-size cells' ATAC sentences would be
    6 G characters). ``stats['empty_cells']`` is complete once the generator is exhausted.
    ``adata_or_path``: an ``AnnData`` (raw counts in ``layers['counts']`` or ``X``), one path, or a
    list of one or two paths in any layout ``dataset_builder`` reads.
    """
    label = SOURCE_MODALITY[direction].upper()
    tmp_dir = None
    if hasattr(adata_or_path, "obs_names"):
        tmp_dir = tempfile.TemporaryDirectory()
        path = Path(tmp_dir.name) / "input.h5ad"
        adata_or_path.write_h5ad(path)
        paths = [path]
    elif isinstance(adata_or_path, str | os.PathLike):
        paths = [Path(adata_or_path)]
    else:
        paths = [Path(p) for p in adata_or_path]
    try:
        mod = _read_source_modality(paths, label)
    finally:
        if tmp_dir is not None:
            tmp_dir.cleanup()
    blocks, stats = _gex_sentences(mod, meta, block) if label == "GEX" else _atac_sentences(mod, meta, block)
    stats["empty_cells"] = 0
    obs = mod.obs.copy()
    obs.index = pd.Index(mod.cells, name=None)

    def counted() -> Iterator[list[str]]:
        for sentences in blocks:
            stats["empty_cells"] += sum(not s for s in sentences)
            yield sentences
        if stats["empty_cells"]:
            logger.warning("%d cells have no %s feature known to the model; they are kept and predicted from an empty sentence", stats["empty_cells"], label)

    return counted(), obs, stats, len(mod.cells)


def source_sentences_from_anndata(adata_or_path, direction: str, meta: dict) -> tuple[list[str], pd.DataFrame, dict]:
    """Source sentences of every cell of an AnnData object or file(s), their ``obs``, and counts of what was mapped."""
    blocks, obs, stats, _ = source_sentence_blocks(adata_or_path, direction, meta)
    sentences = [s for block in blocks for s in block]
    return sentences, obs, stats


def _prediction_var(direction: str, meta: dict) -> pd.DataFrame:
    target = TARGET_MODALITY[direction]
    names = meta["peaks"] if target == "atac" else meta["genes"]
    return pd.DataFrame({"feature_types": "ATAC" if target == "atac" else "GEX"}, index=pd.Index(names))


def _prediction_uns(direction: str, stats: dict) -> dict:
    value = "probability that the peak is accessible" if TARGET_MODALITY[direction] == "atac" else "expected log1p(counts / size_factor)"
    return {"cell_translation": {"direction": direction, "values": value, **{k: int(v) for k, v in stats.items()}}}


def _prediction_obs(obs: pd.DataFrame, sentences: list[str] | None) -> pd.DataFrame:
    obs = obs.copy()
    if sentences is not None:
        obs["translation"] = sentences
    return obs


def prediction_anndata(matrix: np.ndarray, obs: pd.DataFrame, direction: str, meta: dict, stats: dict, sentences: list[str] | None = None):
    """The predicted target modality as AnnData: ``X`` = predictions, ``var_names`` = the model's features."""
    import anndata as ad

    adata = ad.AnnData(X=np.asarray(matrix, dtype=np.float32), obs=_prediction_obs(obs, sentences), var=_prediction_var(direction, meta))
    adata.uns.update(_prediction_uns(direction, stats))
    return adata


def write_prediction_h5ad(path: str | os.PathLike, row_blocks, n_cells: int, obs: pd.DataFrame, direction: str, meta: dict, stats_fn):
    """Write the same ``.h5ad`` as ``prediction_anndata(...).write_h5ad(path)``, one block of rows at a time.

    ``row_blocks`` yields ``(matrix, sentences_or_None)`` for consecutive cells; only one block is in
    memory at once (``X`` is a dense float32 dataset filled block by block, stored in chunks of rows),
    so the output may be larger than RAM. ``stats_fn()`` gives the counts for ``uns`` once every block
    has been made.
    """
    import h5py
    from anndata.io import write_elem

    var = _prediction_var(direction, meta)
    n_features = len(var)
    rows_per_chunk = max(1, min(max(n_cells, 1), (4 << 20) // max(4 * n_features, 1)))  # ~4 MB HDF5 chunks of whole rows
    translations: list[str] = []
    with_text = False
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_dataset("X", shape=(n_cells, n_features), dtype="float32", chunks=(rows_per_chunk, n_features) if n_cells and n_features else None)
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
        start = 0
        for matrix, sentences in row_blocks:
            stop = start + len(matrix)
            if stop > n_cells:
                raise ValueError(f"the prediction blocks hold more than the {n_cells} input cells")
            x[start:stop] = np.asarray(matrix, dtype=np.float32)
            if sentences is not None:
                with_text = True
                translations.extend(sentences)
            start = stop
        if start != n_cells:
            raise ValueError(f"the prediction blocks hold {start} cells, not the {n_cells} input cells")
        write_elem(f, "obs", _prediction_obs(obs, translations if with_text else None))
        write_elem(f, "var", var)
        write_elem(f, "uns", _prediction_uns(direction, stats_fn()))
        for name in ("layers", "obsm", "obsp", "varm", "varp"):
            write_elem(f, name, {})
