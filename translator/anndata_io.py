"""AnnData in, AnnData out: read a source modality from any layout, write the predicted target modality.

Source cells are encoded exactly as the training data was (``dataset_builder.sentences``): GEX as
``log1p(counts / size_factor)`` ranked (or binarized, following the model's ``gex_encoding``), ATAC
as the accessible peaks. Genes unknown to the model are ignored and counted; peaks of another peak
set are mapped onto the model's peaks by genomic overlap (numbers mapped / unmapped reported).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from dataset_builder.outputs import check_room_for
from tokenizer import SOURCE_MODALITY, TARGET_MODALITY

logger = logging.getLogger(__name__)


def _peak_table(names: Sequence[str]) -> pd.DataFrame:
    parts = pd.Series(list(names), dtype=str).str.rsplit("-", n=2, expand=True)
    start = parts[1].astype(np.int64).to_numpy()
    # A zero-length peak (end == start) covers its start base, so it still overlaps (and equals) its own name.
    end = np.maximum(parts[2].astype(np.int64).to_numpy(), start + 1)
    return pd.DataFrame({"chrom": parts[0], "start": start, "end": end})


def peak_overlaps(query: Sequence[str], reference: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every overlapping (query peak, reference peak) pair, vectorized per chromosome.

    Parameters
    ----------
    query, reference
        Normalized ``chrN-start-end`` peak names (half-open intervals, as in BED), any order; the
        reference peaks may overlap each other.

    Returns
    -------
    query_index, reference_index
        ``int64`` arrays of equal length, one entry per overlapping pair, sorted by query then reference
        index. A query peak appears once for each reference peak it overlaps; identical names always pair.
    """
    empty = np.zeros(0, dtype=np.int64)
    if not len(query) or not len(reference):
        return empty, empty
    q, r = _peak_table(query), _peak_table(reference)
    r["index"] = np.arange(len(r))
    pairs_q, pairs_r = [empty], [empty]
    reference_by_chrom = dict(tuple(r.groupby("chrom", sort=False)))
    for chrom, q_rows in q.groupby("chrom", sort=False).groups.items():
        ref = reference_by_chrom.get(chrom)
        if ref is None:
            continue
        ref = ref.sort_values(["start", "end"], kind="stable")
        starts, ends, ids = ref["start"].to_numpy(), ref["end"].to_numpy(), ref["index"].to_numpy()
        rows = np.asarray(q_rows)
        qs, qe = q["start"].to_numpy()[rows], q["end"].to_numpy()[rows]
        # Candidates of a query: from the first reference peak whose running maximum end passes the query's start
        # to the last one starting before the query's end; nested reference peaks among them are filtered below.
        lo = np.searchsorted(np.maximum.accumulate(ends), qs, side="right")
        hi = np.searchsorted(starts, qe, side="left")
        n = np.maximum(hi - lo, 0)
        which = np.repeat(np.arange(rows.size), n)
        candidate = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        hit = ends[candidate] > qs[which]
        pairs_q.append(rows[which[hit]])
        pairs_r.append(ids[candidate[hit]])
    query_index, reference_index = np.concatenate(pairs_q), np.concatenate(pairs_r)
    order = np.lexsort((reference_index, query_index))
    return query_index[order], reference_index[order]


SENTENCE_BLOCK = 4096  # cells ranked and joined at a time: the per-entry work arrays stay small (a full-size file has ~0.3 G entries)
_ENSEMBL_ID = r"^ENS[A-Z]*G\d{6,}(\.\d+)?$"


def _share(names: pd.Index, pattern: str) -> float:
    return float(names.str.match(pattern).mean()) if len(names) else 0.0


def _gene_name_hint(names: pd.Index, model: pd.Index, found: int, var: pd.DataFrame | None = None) -> str:
    """Why the input's gene names miss the model's, when a usual difference explains it.

    Checked in turn: a ``var`` column naming more of the model's genes (``gene_symbols``, ``gene_ids``), letter case,
    Ensembl ids against symbols, Ensembl version suffixes.
    """
    if var is not None and len(var.columns):
        matches = {column: int(model.isin(var[column].astype(str)).sum()) for column in var.columns}
        column = max(matches, key=matches.get)
        if matches[column] > found and 2 * matches[column] >= len(model):
            return (
                f"var['{column}'] names {matches[column]} of them: set adata.var_names = adata.var['{column}'] "
                "(then adata.var_names_make_unique())"
            )
    upper, names_upper = model.str.upper(), names.str.upper()
    upper_found = int(upper.isin(names_upper).sum())
    if upper_found > found:
        example = int(np.flatnonzero(names_upper.isin(upper) & ~names.isin(model))[0])
        spelled = model[int(np.flatnonzero(upper == names_upper[example])[0])]
        return (
            f"{upper_found - found} more would match if case were ignored (e.g. '{names[example]}' in the input, "
            f"'{spelled}' in the model): rename var_names to the model's spelling"
        )
    input_ids, model_ids = _share(names, _ENSEMBL_ID), _share(model, _ENSEMBL_ID)
    if input_ids > 0.5 and model_ids <= 0.5:
        return (
            f"the input names genes by Ensembl id (e.g. '{names[0]}') but the model by symbol (e.g. '{model[0]}'): "
            "set var_names to the gene symbols (e.g. adata.var_names = adata.var['gene_symbols'])"
        )
    if model_ids > 0.5 and input_ids <= 0.5:
        return (
            f"the input names genes by symbol (e.g. '{names[0]}') but the model by Ensembl id (e.g. '{model[0]}'): "
            "set var_names to the Ensembl ids (e.g. adata.var_names = adata.var['gene_ids'])"
        )
    if model_ids > 0.5 and input_ids > 0.5:
        strip = r"\.\d+$"
        if int(model.str.replace(strip, "", regex=True).isin(names.str.replace(strip, "", regex=True)).sum()) > found:
            return "the Ensembl ids differ in their version suffix (e.g. '.5'): give ids with the same versions as the model's"
    return (
        f"check that the input names genes as the model does (e.g. '{model[0]}'; symbols vs Ensembl ids, case) "
        "and is of the same organism"
    )


def _peak_name_hint(names: Sequence[str], model: Sequence[str], found: int) -> str:
    """Why the input's peaks miss the model's, when a ``chr`` prefix explains it (alt contigs such as
    ``GL000194.1`` carry no prefix on either side, so only the contigs the model names otherwise are renamed)."""
    chrom = [n.rsplit("-", 2)[0] for n in names]
    model_chroms = {n.rsplit("-", 2)[0] for n in model}
    prefixed = np.array([c.lower().startswith("chr") for c in chrom], dtype=bool)
    model_prefixed = np.mean([c.lower().startswith("chr") for c in model_chroms]) if model_chroms else 0.0
    if prefixed.mean() < 0.5 <= model_prefixed:
        renamed = [f"chr{n}" if f"chr{c}" in model_chroms and c not in model_chroms else n for n, c in zip(names, chrom, strict=True)]
        which, change = "lack the 'chr' prefix of the model's", "add it (adata.var_names = 'chr' + adata.var_names, for the chromosomes the model names so)"
    elif prefixed.mean() >= 0.5 > model_prefixed:
        renamed = [n[3:] if c[3:] in model_chroms and c not in model_chroms else n for n, c in zip(names, chrom, strict=True)]
        which, change = "have a 'chr' prefix the model's lack", "remove it (adata.var_names = adata.var_names.str.removeprefix('chr'))"
    else:
        renamed = None
    if renamed is not None and np.unique(peak_overlaps(renamed, model)[1]).size > found:
        example = names[int(np.flatnonzero(np.array(renamed, dtype=object) != np.array(names, dtype=object))[0])]
        return f"the input's peak names {which} (e.g. '{example}' vs '{model[0]}'): {change}"
    return (
        f"give peaks covering the model's regions (e.g. '{model[0]}'), on the same genome assembly (hg19 vs hg38), "
        "or the cells' counts on the model's own peaks"
    )


def _check_found(found: int, total: int, kind: str, where: str, hint) -> None:
    """Log how many of the model's source features the input reaches; refuse fewer than half, warn below all.

    ``kind``: "gene" (a model gene is found when the input names it) or "peak" (when an input peak overlaps it).
    """
    have = f"{where} has" if kind == "gene" else f"the peaks of {where} overlap"
    if total and 2 * found < total:
        raise ValueError(f"{have} only {found} of the model's {total} {kind}s, too few for a prediction; {hint()}")
    if found < total:
        missing = f"{total - found} missing" if kind == "gene" else f"{total - found} reached by no input peak"
        logger.warning("%s %d of the model's %d %ss (%s): predictions may be less accurate", have, found, total, kind, missing)
    else:
        logger.info("%s all %d of the model's %ss", have, total, kind)


def _gex_sentences(mod, meta: dict, where: str, block: int = SENTENCE_BLOCK, gene_tokens=None) -> tuple[Iterator, dict]:
    """GEX sentences ``block`` cells at a time (a generator), and the counts of what was mapped.

    With ``gene_tokens`` (input gene names -> token ids), each block is instead ``(offsets, token ids)`` of the sentences'
    genes in order (cell ``i``: ``ids[offsets[i]:offsets[i + 1]]``): the same names, never written out as text.
    """
    from dataset_builder.sentences import (
        BINARY_THRESHOLD,
        NameTable,
        gex_sentence_genes,
        gex_sentences,
        library_size_factors,
        rank_genes,
    )

    names = pd.Index(np.asarray(mod.features, dtype=object).astype(str))
    model = pd.Index(meta["genes"])
    known = names.isin(model)
    found = int(model.isin(names).sum())
    _check_found(found, len(model), "gene", where, lambda: _gene_name_hint(names, model, found, getattr(mod, "var", None)))
    counts = sp.csr_matrix(mod.matrix)
    use_obs = str(meta.get("normalization", {}).get("size_factor", "")).startswith("obs") and mod.size_factors is not None
    size_factors = np.asarray(mod.size_factors if use_obs else library_size_factors(counts), dtype=np.float64)
    name_array = NameTable(pa.array(names.tolist(), pa.string()))
    encoding, threshold = meta.get("gex_encoding", "rank"), float(meta.get("binary_threshold", BINARY_THRESHOLD))

    tokens = None if gene_tokens is None else np.asarray(gene_tokens(names.tolist()), dtype=np.int64)

    def blocks() -> Iterator:
        for start in range(0, counts.shape[0], block):
            stop = min(start + block, counts.shape[0])
            ranking = rank_genes(counts[start:stop], size_factors[start:stop])
            if tokens is None:
                yield gex_sentences(ranking, name_array, gex_encoding=encoding, threshold=threshold, known=known).to_pylist()
            else:
                offsets, index = gex_sentence_genes(ranking, gex_encoding=encoding, threshold=threshold, known=known)
                yield np.asarray(offsets, dtype=np.int64), tokens[index]

    stats = {"source_features": len(names), "unknown_genes": int((~known).sum()), "model_features": len(model), "model_features_found": found}
    if stats["unknown_genes"]:
        logger.warning("%d of %d input genes are unknown to the model and were ignored", stats["unknown_genes"], len(names))
    return blocks(), stats


def _atac_sentences(mod, meta: dict, where: str, block: int = SENTENCE_BLOCK) -> tuple[Iterator[list[str]], dict]:
    """ATAC sentences (every model peak each cell's peaks overlap) ``block`` cells at a time, and the mapping counts."""
    from dataset_builder.readers import normalize_peak_names
    from dataset_builder.sentences import NameTable, encode_atac

    names = normalize_peak_names(mod.features, where)
    model = list(meta["peaks"])
    query_index, model_index = peak_overlaps(names, model)
    found = int(np.unique(model_index).size)
    _check_found(found, len(model), "peak", where, lambda: _peak_name_hint(names, model, found))
    # Input peak -> every model peak it overlaps: a cell's accessible model peaks are one sparse product away.
    overlap = sp.csr_matrix((np.ones(query_index.size, np.int32), (query_index, model_index)), shape=(len(names), len(model)))
    matrix = sp.csr_matrix(mod.matrix)
    model_peaks = NameTable(pa.array(model, pa.string()))

    def blocks() -> Iterator[list[str]]:
        for start in range(0, matrix.shape[0], block):
            rows_block = matrix[start : start + block]
            rows_block.eliminate_zeros()
            opened = sp.csr_matrix((np.ones(rows_block.nnz, np.int32), rows_block.indices, rows_block.indptr), shape=rows_block.shape)
            # Several input peaks may reach one model peak: it is listed once, in genomic (= model) order.
            accessible = opened @ overlap
            accessible.sort_indices()
            yield encode_atac(accessible, model_peaks)["atac_text"].to_pylist()

    mapped = int(np.unique(query_index).size)
    stats = {"source_features": len(names), "mapped_peaks": mapped, "unmapped_peaks": len(names) - mapped,
             "model_features": len(model), "model_features_found": found}
    if stats["unmapped_peaks"]:
        logger.warning("%d of %d input peaks overlap no model peak and were ignored", stats["unmapped_peaks"], len(names))
    return blocks(), stats


def read_source(adata_or_path, direction: str, *, gex_modality: str = "rna", atac_modality: str = "atac",
                counts_layer: str | None = None):
    """The source modality of ``direction`` from an ``AnnData``, a ``MuData``, one path or a list of one or two paths,
    and the source cells' annotations (:func:`source_cells`).

    Objects and files go through the same reader and checks (``dataset_builder.readers.read_modality``).
    ``gex_modality`` / ``atac_modality`` name a MuData's modalities; ``counts_layer`` the layer of raw counts when ``X``
    is normalized.
    """
    from dataset_builder.readers import read_modality

    label = SOURCE_MODALITY[direction].upper()
    mod = read_modality(adata_or_path, label, gex_modality=gex_modality, atac_modality=atac_modality, counts_layer=counts_layer)
    return mod, source_cells(mod)


def source_cells(mod):
    """What the output keeps of the source cells: an ``AnnData`` without features holding every ``obs`` column as read
    (a MuData's global columns too) and the ``obsm`` arrays, indexed by barcode."""
    import anndata as ad

    from dataset_builder.readers import read_obsm

    obs = (mod.annotations if mod.annotations is not None else mod.obs).copy()
    obs.index = pd.Index(mod.cells, name=None)
    return ad.AnnData(obs=obs, obsm=read_obsm(mod))


def source_sentence_blocks(adata_or_path, direction: str, meta: dict, block: int = SENTENCE_BLOCK, gene_tokens=None, **modalities: str):
    """Source sentences ``block`` cells at a time (a generator of lists), the source cells (:func:`source_cells`), the
    counts and the cell count. ``gene_tokens`` (GEX sources only; input gene names -> token ids): each block is
    ``(offsets, token ids)`` of the sentences' genes instead of text (:func:`_gex_sentences`).

    Only the source matrix is held, never every cell's sentence (69,249 full-size cells' ATAC sentences would be
    6 G characters). ``stats['empty_cells']`` is complete once the generator is exhausted.
    ``adata_or_path``: an ``AnnData`` (raw counts in ``layers['counts']`` or ``X``), a ``MuData``, one path, or a
    list of one or two paths in any layout ``dataset_builder`` reads; ``modalities``: ``gex_modality`` /
    ``atac_modality`` (the modality names of a MuData) and ``counts_layer`` (see :func:`read_source`).
    """
    label = SOURCE_MODALITY[direction].upper()
    mod, cells = read_source(adata_or_path, direction, **modalities)
    where = str(mod.path)
    if label == "GEX":
        blocks, stats = _gex_sentences(mod, meta, where, block, gene_tokens)
    else:
        blocks, stats = _atac_sentences(mod, meta, where, block)
    stats["empty_cells"] = 0

    def counted() -> Iterator:
        for sentences in blocks:
            stats["empty_cells"] += int((np.diff(sentences[0]) == 0).sum()) if isinstance(sentences, tuple) else sum(not s for s in sentences)
            yield sentences
        if stats["empty_cells"]:
            logger.warning("%d cells have no %s feature known to the model; they are kept and predicted from an empty sentence", stats["empty_cells"], label)

    return counted(), cells, stats, len(mod.cells)


def source_sentences_from_anndata(adata_or_path, direction: str, meta: dict, **modalities: str) -> tuple[list[str], object, dict]:
    """Source sentences of every cell of an AnnData / MuData object or file(s), the source cells (:func:`source_cells`),
    and counts of what was mapped."""
    blocks, cells, stats, _ = source_sentence_blocks(adata_or_path, direction, meta, **modalities)
    sentences = [s for block in blocks for s in block]
    return sentences, cells, stats


def prediction_var(direction: str, meta: dict) -> pd.DataFrame:
    """``var`` of a prediction: the target features named as the model's training data named them (e.g. ``chr1:100-200``),
    ``normalized_name`` (the model's name, ``chr1-100-200``), ``feature_types`` and the training data's text annotations
    (``gene_ids``, ``interval``, ``genome``, ...)."""
    key = "peaks" if TARGET_MODALITY[direction] == "atac" else "genes"
    names = list(meta[key])
    annotations = dict((meta.get("var") or {}).get(key) or {})
    var = pd.DataFrame(index=pd.Index([str(n) for n in annotations.pop("input_name", names)]))
    var["feature_types"] = "ATAC" if key == "peaks" else "GEX"
    var["normalized_name"] = names
    for column, values in annotations.items():
        var[column] = [str(v) for v in values]
    return var


def _package_version() -> str:
    try:
        return importlib.metadata.version("cell-sentences")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _prediction_uns(direction: str, stats: dict, model: str | None) -> dict:
    value = "probability that the peak is accessible" if TARGET_MODALITY[direction] == "atac" else "expected log1p(counts / size_factor)"
    provenance = {"model": model or "", "package_version": _package_version()}
    return {"cell_translation": {"direction": direction, "values": value, **provenance, **{k: int(v) for k, v in stats.items()}}}


def _prediction_obs(cells, sentences: list[str] | None) -> pd.DataFrame:
    obs = cells.obs.copy()
    if sentences is not None:
        obs["translation"] = sentences
    return obs


def prediction_anndata(matrix: np.ndarray, cells, direction: str, meta: dict, stats: dict, sentences: list[str] | None = None,
                       model: str | None = None):
    """The predicted target modality as AnnData.

    ``X`` = predictions; ``obs`` / ``obsm`` = those of the source ``cells`` (:func:`source_cells`), plus
    ``obs['translation']`` when ``sentences`` are given; ``var`` = :func:`prediction_var`; ``uns['cell_translation']`` =
    direction, what the values are, the ``model`` (folder or Hub id), the package version and ``stats``.
    """
    import anndata as ad

    adata = ad.AnnData(X=np.asarray(matrix, dtype=np.float32), obs=_prediction_obs(cells, sentences), var=prediction_var(direction, meta),
                       obsm=dict(cells.obsm))
    adata.uns.update(_prediction_uns(direction, stats, model))
    return adata


def write_prediction_h5ad(path: str | os.PathLike, row_blocks, n_cells: int, cells, direction: str, meta: dict, stats_fn,
                          model: str | None = None):
    """Write the same ``.h5ad`` as ``prediction_anndata(...).write_h5ad(path)``, one block of rows at a time.

    ``row_blocks`` yields ``(matrix, sentences_or_None)`` for consecutive cells; only one block is in
    memory at once (``X`` is a dense float32 dataset filled block by block, stored in chunks of rows),
    so the output may be larger than RAM. ``stats_fn()`` gives the counts for ``uns`` once every block
    has been made. ``cells``, ``model``: see :func:`prediction_anndata`.
    """
    import h5py
    from anndata.io import write_elem

    var = prediction_var(direction, meta)
    n_features = len(var)
    check_room_for(path, 4 * n_cells * n_features, f"{n_cells:,} cells x {n_features:,} features")
    rows_per_chunk = max(1, min(max(n_cells, 1), (4 << 20) // max(4 * n_features, 1)))  # ~4 MB HDF5 chunks of whole rows
    translations: list[str] = []
    with_text = False
    with h5py.File(path, "w") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-h5ad") as writer:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_dataset("X", shape=(n_cells, n_features), dtype="float32", chunks=(rows_per_chunk, n_features) if n_cells and n_features else None)
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
        start, pending = 0, None

        def write(rows: slice, block: np.ndarray) -> None:
            x[rows] = block

        # A block is written while the next one is predicted (h5py lets go of the GIL while HDF5 writes): a full-size
        # prediction is ~32 GB, whose writing alone would otherwise add minutes. At most two blocks are in memory.
        for matrix, sentences in row_blocks:
            stop = start + len(matrix)
            if stop > n_cells:
                raise ValueError(f"the prediction blocks hold more than the {n_cells} input cells")
            block = np.asarray(matrix, dtype=np.float32)
            if pending is not None:
                pending.result()
            pending = writer.submit(write, slice(start, stop), block)
            if sentences is not None:
                with_text = True
                translations.extend(sentences)
            start = stop
        if pending is not None:
            pending.result()
        if start != n_cells:
            raise ValueError(f"the prediction blocks hold {start} cells, not the {n_cells} input cells")
        write_elem(f, "obs", _prediction_obs(cells, translations if with_text else None))
        write_elem(f, "var", var)
        write_elem(f, "obsm", dict(cells.obsm))
        write_elem(f, "uns", _prediction_uns(direction, stats_fn(), model))
        for name in ("layers", "obsp", "varm", "varp"):
            write_elem(f, name, {})
