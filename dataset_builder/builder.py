"""The `datasets` builder of cell sentences, and `build_dataset`, which runs it and saves the folder.

`CellSentencesBuilder` is an Arrow-based builder in the manner of datasets' packaged Parquet module:
a `BuilderConfig` dataclass, `_info`, `_split_generators`, and `_generate_tables` yielding whole
`pyarrow` tables, one per chunk of cells. `datasets` 4+ no longer runs loading scripts, so
`build_dataset` instantiates and runs it, then moves its Arrow shards into the `save_to_disk` folder layout
(records are written once), or writes the records as zstd Parquet shards (``file_format="parquet"``), and writes
`cell_sentences.json`, atomically (temporary folder beside the output, then rename). The train statistics of the metadata come from the rankings made while writing train.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from datasets.builder import Key
from datasets.table import InMemoryTable
from datasets.utils.py_utils import asdict

from .outputs import META_FILE, check_output, check_replaceable
from .plan import SPLITS, BuildPlan, TrainStats, content_digest, make_plan, train_stats
from .readers import read_paired
from .records import FILE_FORMATS, load_splits
from .sentences import BINARY_THRESHOLD, NameTable, encode_atac, encode_gex, rank_genes
from .stored import DEFAULT_CHUNK_CELLS, StoredCsr, release_free_memory

__all__ = [
    "BUILDER_VERSION",
    "CellSentencesConfig",
    "CellSentencesBuilder",
    "build_dataset",
    "features_for",
]

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1.0.0"
PARQUET_SHARD_BYTES = 256 << 20  # a Parquet shard is closed once its file reaches this size
# Parquet row groups are read whole: one the size of the streamed reader's blocks of contiguous cells
# (``translator.streaming.StreamingExamples(block_cells=64)``) decodes every cell once per epoch.
PARQUET_ROW_GROUP_CELLS = 64
_PREFETCH_CHUNKS = 2  # chunks made ahead of the writer (512 cells each: ~65 MB of records at full size)


def features_for(obs_columns: Sequence[str]) -> datasets.Features:
    """The record schema (docs/architecture.md), with ``batch`` / ``cell_type`` when the input has them."""
    features = {
        "cell": datasets.Value("string"),
        "gex_text": datasets.Value("string"),
        "atac_text": datasets.Value("string"),
        "gex_index": datasets.List(datasets.Value("int32")),
        "gex_value": datasets.List(datasets.Value("float32")),
        "n_genes": datasets.Value("int32"),
        "n_peaks": datasets.Value("int32"),
    }
    for column in ("batch", "cell_type"):
        if column in obs_columns:
            features[column] = datasets.Value("string")
    return datasets.Features(features)


@dataclass
class CellSentencesConfig(datasets.BuilderConfig):
    """BuilderConfig for cell sentences.

    Args:
        inputs: one or two input files (see `readers.read_paired`).
        gex_modality, atac_modality: modality names inside a `.h5mu` file.
        batch_key, cell_type_key: obs columns read as `batch` and `cell_type` (default: those names).
        counts_layer: the layer holding raw counts (default: `layers['counts']` when present, else `X`).
        test_batches, validation_batches: batch names held out (else split by barcode hash).
        no_validation: no validation split (every cell outside the test batches trains).
        gex_encoding: "rank" (detected genes by descending log-norm) or "binary" (log-norm >= 2.0).
        top_peaks: keep the N peaks most often accessible in train.
        chunk_size: cells per yielded Arrow table.
    """

    inputs: tuple[str, ...] = ()
    gex_modality: str = "rna"
    atac_modality: str = "atac"
    batch_key: str | None = None
    cell_type_key: str | None = None
    counts_layer: str | None = None
    test_batches: tuple[str, ...] = ()
    validation_batches: tuple[str, ...] = ()
    no_validation: bool = False
    gex_encoding: str = "rank"
    top_peaks: int | None = None
    chunk_size: int = 512


def _chunk_rows(matrix: sp.csr_matrix | StoredCsr, rows: np.ndarray) -> sp.csr_matrix:
    """``matrix[rows]`` for increasing row indices; a run of consecutive rows is a view, not a copy (a `StoredCsr`
    reads them from its file)."""
    if isinstance(matrix, StoredCsr):
        return matrix[rows]
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 != rows.size:
        return matrix[rows]
    lo, hi = int(matrix.indptr[first]), int(matrix.indptr[last + 1])
    return sp.csr_matrix(
        (matrix.data[lo:hi], matrix.indices[lo:hi], matrix.indptr[first : last + 2] - lo),
        shape=(rows.size, matrix.shape[1]),
        copy=False,
    )


class CellSentencesBuilder(datasets.ArrowBasedBuilder):
    """Arrow-based builder: paired counts -> one table of sentences per chunk of cells.

    Pass ``plan=`` (a `BuildPlan`) to reuse data already read; otherwise `_split_generators`
    reads ``config.inputs``. ``progress`` (a tqdm bar) is advanced by the cells written.
    """

    BUILDER_CONFIG_CLASS = CellSentencesConfig

    def __init__(self, *args, plan: BuildPlan | None = None, progress=None, **kwargs):
        self._plan = plan
        self._tables: tuple[NameTable, NameTable] | None = None  # gene / peak gather tables, made on first use
        self._progress = progress
        self.train_stats: dict[str, list[float]] | None = None  # filled while the train split is generated
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = features_for(self._plan.paired.obs.columns) if self._plan is not None else None
        return datasets.DatasetInfo(
            description="Paired single-cell GEX and ATAC profiles written as cell sentences.", features=features
        )

    def _get_plan(self) -> BuildPlan:
        if self._plan is None:
            cfg = self.config
            paired = read_paired(
                cfg.inputs, gex_modality=cfg.gex_modality, atac_modality=cfg.atac_modality, batch_key=cfg.batch_key,
                cell_type_key=cfg.cell_type_key, counts_layer=cfg.counts_layer, chunk_cells=DEFAULT_CHUNK_CELLS,
            )
            self._plan = make_plan(
                paired,
                test_batches=cfg.test_batches,
                validation_batches=cfg.validation_batches,
                gex_encoding=cfg.gex_encoding,
                top_peaks=cfg.top_peaks,
                no_validation=cfg.no_validation,
            )
        return self._plan

    def _split_generators(self, dl_manager):
        plan = self._get_plan()
        self.info.features = features_for(plan.paired.obs.columns)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in SPLITS]

    def _generate_tables(self, split: str):
        plan = self._get_plan()
        rows = plan.rows[split]
        genes, peaks = self._name_tables(plan)
        schema = self.info.features.arrow_schema
        chunk_size = max(int(self.config.chunk_size), 1)
        # The train cells are ranked once: their rankings also give the train statistics of the metadata.
        stats = TrainStats(plan) if split == "train" else None

        def gex_columns(chunk: np.ndarray) -> dict[str, pa.Array]:
            gex = _chunk_rows(plan.paired.gex, chunk)
            ranking = rank_genes(gex, plan.size_factors[chunk])
            if stats is not None:
                stats.add(ranking)  # one GEX worker takes the chunks in order: the sums stay bit-identical
            return encode_gex(gex, plan.size_factors[chunk], genes, gex_encoding=plan.gex_encoding, ranking=ranking)

        def atac_columns(chunk: np.ndarray) -> dict[str, pa.Array]:
            atac = _chunk_rows(plan.paired.atac, chunk)
            if stats is not None:
                stats.add_atac(atac)  # the per-peak train counts, where the plan did not need them earlier
            return encode_atac(atac, peaks, peak_map=plan.peak_map)

        # Each chunk's GEX and ATAC columns are made in two worker threads while this thread hands the finished
        # chunks, in order, to the writer: the sorts, gathers and file writes release the GIL, so they overlap.
        with ThreadPoolExecutor(1, "cell-sentences-gex") as gex_pool, ThreadPoolExecutor(1, "cell-sentences-atac") as atac_pool:
            pending: deque = deque()
            try:
                for batch_id, start in enumerate(range(0, rows.size, chunk_size)):
                    chunk = rows[start : start + chunk_size]
                    pending.append((batch_id, chunk, gex_pool.submit(gex_columns, chunk), atac_pool.submit(atac_columns, chunk)))
                    if len(pending) > _PREFETCH_CHUNKS:
                        yield self._finish_chunk(plan, schema, *pending.popleft())
                while pending:
                    yield self._finish_chunk(plan, schema, *pending.popleft())
            finally:
                for _, _, *futures in pending:
                    for future in futures:
                        future.cancel()
        if stats is not None and stats.complete:
            self.train_stats = stats.result()

    def _name_tables(self, plan: BuildPlan) -> tuple[NameTable, NameTable]:
        """The gene and peak gather tables, made once for all splits."""
        if self._tables is None:
            self._tables = (NameTable(pa.array(plan.paired.genes, pa.string())), NameTable(pa.array(plan.peaks, pa.string())))
        return self._tables

    def _finish_chunk(self, plan: BuildPlan, schema: pa.Schema, batch_id: int, chunk: np.ndarray, *parts: Future):
        """The chunk's table (its worker threads' columns and the cell labels), keyed for the writer."""
        columns = {name: array for part in parts for name, array in part.result().items()}
        paired = plan.paired
        columns["cell"] = pa.array(paired.cells[chunk].astype(str), pa.string())
        for column in ("batch", "cell_type"):
            if column in paired.obs:
                columns[column] = pa.array(paired.obs[column].to_numpy()[chunk].astype(str), pa.string())
        if self._progress is not None:
            self._progress.update(chunk.size)
        return Key(0, batch_id), pa.table({name: columns[name] for name in schema.names}, schema=schema)


def _feature_annotations(plan: BuildPlan) -> dict[str, dict[str, list[str]]]:
    """The input's text annotations of the kept genes and peaks (``gene_ids``, ``interval``, ...) and, where the input
    named peaks otherwise (``chr1:100-200``), their input names: predictions name and annotate features with them."""
    paired, out = plan.paired, {}
    for key, table, names in (("genes", paired.gene_var, paired.genes), ("peaks", paired.peak_var, plan.peaks)):
        if table is None:
            continue
        table = table.reindex(pd.Index(names))
        columns = {c: table[c].astype(str).tolist() for c in table.columns}
        if columns.get("input_name") == list(names):
            del columns["input_name"]
        if columns:
            out[key] = columns
    return out


def _metadata(plan: BuildPlan, fingerprint: str, stats: dict[str, list[float]] | None = None) -> dict:
    paired = plan.paired
    return {
        "genes": list(paired.genes),
        "peaks": list(plan.peaks),
        "var": _feature_annotations(plan),
        "gex_encoding": plan.gex_encoding,
        "binary_threshold": BINARY_THRESHOLD,
        "top_peaks": plan.top_peaks,
        "normalization": {
            "gex": "log1p(counts / size_factor)",
            "size_factor": plan.size_factor_source,
            "atac": "counts > 0",
            "counts_source": paired.counts_source,
        },
        "splits": {name: int(plan.rows[name].size) for name in SPLITS},
        "split_by": plan.split_by,
        "test_batches": plan.test_batches,
        "validation_batches": plan.validation_batches,
        "dropped_cells": paired.dropped_cells,
        "empty_cells": {
            "gex": int((np.diff(paired.gex.indptr) == 0).sum()),
            "atac": int((np.diff(paired.atac.indptr) == 0).sum()),
        },
        "train_stats": stats if stats is not None else train_stats(plan),
        "source": list(paired.source),
        "builder_version": BUILDER_VERSION,
        "content_digest": fingerprint,
    }


def _as_split(builder: CellSentencesBuilder, plan: BuildPlan, split: str, digest: str) -> datasets.Dataset:
    """One split of the prepared builder; an empty split (e.g. no validation batches) is an empty table."""
    if plan.rows[split].size:
        dataset = builder.as_dataset(split=split)
        return datasets.Dataset(dataset.data, info=dataset.info, split=dataset.split, fingerprint=f"{digest[:16]}-{split}")
    logger.warning("split '%s' has no cells", split)
    features = builder.info.features
    table = InMemoryTable(features.arrow_schema.empty_table())
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(table, info=info, split=datasets.Split(split), fingerprint=f"{digest[:16]}-{split}-empty")


def _save_split(dataset: datasets.Dataset, path: Path) -> None:
    """Write one split as a ``Dataset.save_to_disk`` folder, moving the builder's Arrow shards instead of copying.

    The builder's cache files are Arrow stream files like the ones ``save_to_disk`` writes; renaming them to
    ``data-XXXXX-of-NNNNN.arrow`` beside the same ``state.json`` and ``dataset_info.json`` gives a folder that
    ``datasets.load_from_disk`` opens to the same table and fingerprint, without writing every record twice.
    A split without cache files (an empty split, an in-memory table) is written by ``save_to_disk``.
    """
    files = [Path(c["filename"]) for c in dataset.cache_files]
    if not files or dataset._indices is not None:
        dataset.save_to_disk(str(path), num_shards=1 if len(dataset) == 0 else None)
        return
    path.mkdir(parents=True, exist_ok=True)
    names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    state = {
        key: dataset.__dict__[key]
        for key in ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")
    }
    state["_split"] = str(dataset.split) if dataset.split is not None else None
    state["_data_files"] = [{"filename": name} for name in names]
    info = asdict(dataset.info)
    for source, name in zip(files, names, strict=True):
        os.replace(source, path / name)
    with open(path / datasets.config.DATASET_STATE_JSON_FILENAME, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    with open(path / datasets.config.DATASET_INFO_FILENAME, "w", encoding="utf-8") as f:
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)


def _save_dataset_dict(dataset: datasets.DatasetDict, path: Path) -> None:
    """``DatasetDict.save_to_disk`` layout, each split written by `_save_split`."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / datasets.config.DATASETDICT_JSON_FILENAME, "w", encoding="utf-8") as f:
        json.dump({"splits": list(dataset)}, f)
    for name, split in dataset.items():
        _save_split(split, path / name)


def check_dataset_output(inputs: Sequence[str | Path] | None, output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is, holds or sits inside an input, or that exists and is not a dataset folder to replace."""
    check_output(output_dir, {"--input": inputs}, "--output_dir")
    check_replaceable(output_dir, "--output_dir", "dataset", overwrite, "--overwrite_output_dir")


def _publish(staged: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an overwritten folder is removed only after the rename."""
    if output_dir.exists():
        check_replaceable(output_dir, "--output_dir", "dataset", overwrite, "--overwrite_output_dir")
        trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        output_dir.rename(trash / output_dir.name)
        staged.rename(output_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staged.rename(output_dir)


def build_dataset(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    test_batches: Sequence[str] | None = None,
    validation_batches: Sequence[str] | None = None,
    no_validation: bool = False,
    gex_encoding: str = "rank",
    top_peaks: int | None = None,
    gex_modality: str = "rna",
    atac_modality: str = "atac",
    batch_key: str | None = None,
    cell_type_key: str | None = None,
    counts_layer: str | None = None,
    chunk_size: int = 512,
    overwrite: bool = False,
    progress: bool = False,
    license: str | None = None,
    input_chunk_cells: int | None = DEFAULT_CHUNK_CELLS,
    file_format: str = "arrow",
    load: bool = True,
) -> datasets.DatasetDict | dict:
    """Read paired counts, write cell sentences and metadata to ``output_dir``.

    Parameters
    ----------
    inputs
        One or two input files (see `readers.read_paired`).
    output_dir
        Folder to create (a `DatasetDict.save_to_disk` folder plus ``cell_sentences.json``).
    test_batches, validation_batches
        Batch (library / donor) names held out; without both, cells are split 80/10/10 by barcode hash; with
        ``test_batches`` only, a 10% barcode-hash sample of the other cells is the validation split, unless ``no_validation``.
    no_validation
        No validation split: every cell outside ``test_batches`` trains (a final model whose settings were chosen by
        cross-validation; ``train.py --profile_choices_from`` and ``translator.recalibrate --pool`` then need no validation cells).
    gex_encoding
        ``"rank"`` or ``"binary"``.
    top_peaks
        Keep only the N peaks most often accessible in train.
    gex_modality, atac_modality, batch_key, cell_type_key, counts_layer
        How to read the input (see `readers.read_paired`).
    overwrite
        Replace an existing ``output_dir`` (otherwise refuse).
    progress
        Show a tqdm progress bar over cells.
    license
        Hub license id of the data, recorded in ``cell_sentences.json`` for the cards; default the one an input
        file records in ``uns['license']``, else none.
    input_chunk_cells
        Count matrices that a file stores as CSR stay in the file and are read in chunks of at most this many cells
        (the records are the same), so memory does not grow with the number of cells; None reads them into memory.
    file_format
        ``"arrow"``: each split a ``Dataset.save_to_disk`` folder (memory-mapped by ``datasets.load_from_disk``).
        ``"parquet"``: each split as zstd-compressed Parquet shards ``split/data-XXXXX-of-NNNNN.parquet`` in row groups
        of 64 cells, about a third of the Arrow size; ``train.py --streaming`` reads them directly, the other
        commands through ``datasets.load_dataset("parquet")`` (:func:`dataset_builder.records.load_splits`).
    load
        Return the saved dataset loaded back; ``False`` returns the folder's metadata instead (``cell_sentences.json``,
        whose ``splits`` gives the cells a split), which loads nothing (loading Parquet splits copies them to the cache).

    Returns
    -------
    datasets.DatasetDict or dict
        The saved dataset, loaded back from ``output_dir`` (with ``load=False``, its metadata).
    """
    output_dir = Path(output_dir)
    check_dataset_output(inputs, output_dir, overwrite)
    if file_format not in FILE_FORMATS:
        raise ValueError(f"--file_format must be one of {FILE_FORMATS}, not {file_format!r}")
    if chunk_size <= 0:
        raise ValueError(f"--chunk_size must be positive, not {chunk_size}")
    if input_chunk_cells is not None and input_chunk_cells <= 0:
        raise ValueError(f"input_chunk_cells must be positive (or None), not {input_chunk_cells}")
    paired = read_paired(
        inputs, gex_modality=gex_modality, atac_modality=atac_modality, batch_key=batch_key,
        cell_type_key=cell_type_key, counts_layer=counts_layer, chunk_cells=input_chunk_cells,
    )
    try:
        plan = make_plan(
            paired,
            test_batches=test_batches,
            validation_batches=validation_batches,
            gex_encoding=gex_encoding,
            top_peaks=top_peaks,
            no_validation=no_validation,
        )
        release_free_memory()  # what the passes over the counts (checks, plan) freed, before the records' threads start
        logger.info(
            "paired %d cells (%d dropped: present in only one modality); splits %s by %s",
            paired.n_cells,
            paired.dropped_cells,
            {k: int(v.size) for k, v in plan.rows.items()},
            plan.split_by,
        )
        config = dict(
            inputs=tuple(str(p) for p in inputs),
            gex_modality=gex_modality,
            atac_modality=atac_modality,
            batch_key=batch_key,
            cell_type_key=cell_type_key,
            counts_layer=counts_layer,
            test_batches=tuple(test_batches or ()),
            validation_batches=tuple(validation_batches or ()),
            no_validation=no_validation,
            gex_encoding=gex_encoding,
            top_peaks=top_peaks,
            chunk_size=chunk_size,
        )
        from .hub import recorded_license

        meta = _write_dataset(plan, config, output_dir, paired.n_cells if progress else None, overwrite, license or recorded_license(inputs),
                              file_format)
        empty = meta["empty_cells"]
        if empty["gex"] or empty["atac"]:
            logger.warning(
                "kept all-zero cells with empty sentences: %d without GEX counts, %d without ATAC counts",
                empty["gex"],
                empty["atac"],
            )
    finally:
        for matrix in (paired.gex, paired.atac):
            if isinstance(matrix, StoredCsr):
                matrix.close()
    return load_splits(output_dir) if load else meta


def _write_parquet(builder: CellSentencesBuilder, plan: BuildPlan, folder: Path) -> None:
    """Every split's records as zstd Parquet shards of about `PARQUET_SHARD_BYTES` (``split/data-XXXXX-of-NNNNN.parquet``)
    in row groups of `PARQUET_ROW_GROUP_CELLS` cells; an empty split is one file with the columns and no rows."""
    builder.info.features = features_for(plan.paired.obs.columns)
    schema = builder.info.features.arrow_schema
    folder.mkdir(parents=True)
    for split in SPLITS:
        (folder / split).mkdir()
        paths, writer = [], None
        try:
            for _, table in builder._generate_tables(split):
                if writer is None or paths[-1].stat().st_size >= PARQUET_SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    paths.append(folder / split / f"part-{len(paths):05d}.parquet")
                    writer = pq.ParquetWriter(paths[-1], schema, compression="zstd")
                writer.write_table(table, row_group_size=PARQUET_ROW_GROUP_CELLS)
            if writer is None:
                paths.append(folder / split / "part-00000.parquet")
                writer = pq.ParquetWriter(paths[-1], schema, compression="zstd")
        finally:
            if writer is not None:
                writer.close()
        for i, path in enumerate(paths):
            path.rename(path.with_name(f"data-{i:05d}-of-{len(paths):05d}.parquet"))
    (folder / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(SPLITS)}))


def _write_dataset(plan: BuildPlan, config: dict, output_dir: Path, progress_cells: int | None, overwrite: bool, license: str | None,
                   file_format: str = "arrow") -> dict:
    """Make the records of ``plan`` (``config``: the builder's settings) in a work folder beside ``output_dir``, save them
    with their metadata in ``file_format`` and publish them as ``output_dir``; return the metadata. ``progress_cells``:
    show a bar over that many cells."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    bar = None
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="content-digest")
    try:
        # The digest (hashing every count) runs beside the records' making; only the fingerprints need it.
        digest_future = hashing.submit(content_digest, plan)
        if progress_cells is not None:
            from tqdm.auto import tqdm

            bar = tqdm(total=progress_cells, unit="cell", desc="cell sentences")
        builder = CellSentencesBuilder(
            cache_dir=str(work / "cache"), dataset_name="cell_sentences", config_id="default", hash="records", plan=plan, progress=bar, **config,
        )
        was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        staged = work / "dataset"
        try:
            if file_format == "parquet":
                _write_parquet(builder, plan, staged)
                digest = digest_future.result()
            else:
                builder.download_and_prepare()
                digest = digest_future.result()
                dataset = datasets.DatasetDict({split: _as_split(builder, plan, split, digest) for split in SPLITS})
                _save_dataset_dict(dataset, staged)
                del dataset
        finally:
            if was_enabled:
                datasets.utils.logging.enable_progress_bar()
        meta = _metadata(plan, digest, builder.train_stats)
        meta["license"] = license
        (staged / META_FILE).write_text(json.dumps(meta) + "\n")
        _publish(staged, output_dir, overwrite)
    finally:
        hashing.shutdown(wait=True)
        if bar is not None:
            bar.close()
        shutil.rmtree(work, ignore_errors=True)
    return meta
