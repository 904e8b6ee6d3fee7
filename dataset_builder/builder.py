"""The `datasets` builder of cell sentences, and `build_dataset`, which runs it and saves the folder.

`CellSentencesBuilder` is an Arrow-based builder in the manner of datasets' packaged Parquet module:
a `BuilderConfig` dataclass, `_info`, `_split_generators`, and `_generate_tables` yielding whole
`pyarrow` tables, one per chunk of cells. `datasets` 4+ no longer runs loading scripts, so
`build_dataset` instantiates and runs it, then writes the `save_to_disk` folder and
`cell_sentences.json` atomically (temporary folder beside the output, then rename).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.builder import Key
from datasets.table import InMemoryTable

from .plan import SPLITS, BuildPlan, content_digest, make_plan, train_stats
from .readers import read_paired
from .sentences import BINARY_THRESHOLD, encode_cells

__all__ = [
    "BUILDER_VERSION",
    "META_FILE",
    "CellSentencesConfig",
    "CellSentencesBuilder",
    "build_dataset",
    "features_for",
]

logger = logging.getLogger(__name__)

BUILDER_VERSION = "1.0.0"
META_FILE = "cell_sentences.json"


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
        test_batches, validation_batches: batch names held out (else split by barcode hash).
        gex_encoding: "rank" (detected genes by descending log-norm) or "binary" (log-norm >= 2.0).
        top_peaks: keep the N peaks most often accessible in train.
        chunk_size: cells per yielded Arrow table.
    """

    inputs: tuple[str, ...] = ()
    gex_modality: str = "rna"
    atac_modality: str = "atac"
    test_batches: tuple[str, ...] = ()
    validation_batches: tuple[str, ...] = ()
    gex_encoding: str = "rank"
    top_peaks: int | None = None
    chunk_size: int = 2048


class CellSentencesBuilder(datasets.ArrowBasedBuilder):
    """Arrow-based builder: paired counts -> one table of sentences per chunk of cells.

    Pass ``plan=`` (a `BuildPlan`) to reuse data already read; otherwise `_split_generators`
    reads ``config.inputs``. ``progress`` (a tqdm bar) is advanced by the cells written.
    """

    BUILDER_CONFIG_CLASS = CellSentencesConfig

    def __init__(self, *args, plan: BuildPlan | None = None, progress=None, **kwargs):
        self._plan = plan
        self._progress = progress
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = features_for(self._plan.paired.obs.columns) if self._plan is not None else None
        return datasets.DatasetInfo(
            description="Paired single-cell GEX and ATAC profiles written as cell sentences.", features=features
        )

    def _get_plan(self) -> BuildPlan:
        if self._plan is None:
            cfg = self.config
            paired = read_paired(cfg.inputs, gex_modality=cfg.gex_modality, atac_modality=cfg.atac_modality)
            self._plan = make_plan(
                paired,
                test_batches=cfg.test_batches,
                validation_batches=cfg.validation_batches,
                gex_encoding=cfg.gex_encoding,
                top_peaks=cfg.top_peaks,
            )
        return self._plan

    def _split_generators(self, dl_manager):
        plan = self._get_plan()
        self.info.features = features_for(plan.paired.obs.columns)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in SPLITS]

    def _generate_tables(self, split: str):
        plan = self._get_plan()
        paired, rows = plan.paired, plan.rows[split]
        genes, peaks = pa.array(paired.genes, pa.string()), pa.array(plan.peaks, pa.string())
        schema = self.info.features.arrow_schema
        chunk_size = max(int(self.config.chunk_size), 1)
        for batch_id, start in enumerate(range(0, rows.size, chunk_size)):
            chunk = rows[start : start + chunk_size]
            columns = encode_cells(
                paired.gex[chunk],
                paired.atac[chunk],
                plan.size_factors[chunk],
                genes,
                peaks,
                gex_encoding=plan.gex_encoding,
                peak_map=plan.peak_map,
            )
            columns["cell"] = pa.array(paired.cells[chunk].astype(str), pa.string())
            for column in ("batch", "cell_type"):
                if column in paired.obs:
                    columns[column] = pa.array(paired.obs[column].to_numpy()[chunk].astype(str), pa.string())
            yield Key(0, batch_id), pa.table({name: columns[name] for name in schema.names}, schema=schema)
            if self._progress is not None:
                self._progress.update(chunk.size)


def _metadata(plan: BuildPlan, fingerprint: str) -> dict:
    paired = plan.paired
    return {
        "genes": list(paired.genes),
        "peaks": list(plan.peaks),
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
        "train_stats": train_stats(plan),
        "source": list(paired.source),
        "builder_version": BUILDER_VERSION,
        "content_digest": fingerprint,
    }


def _as_split(builder: CellSentencesBuilder, plan: BuildPlan, split: str, digest: str) -> datasets.Dataset:
    """One split of the prepared builder; an empty split (e.g. no validation batches) is an empty table."""
    if plan.rows[split].size:
        return builder.as_dataset(split=split)
    logger.warning("split '%s' has no cells", split)
    features = builder.info.features
    table = InMemoryTable(features.arrow_schema.empty_table())
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(table, info=info, split=datasets.Split(split), fingerprint=f"{digest[:16]}-{split}-empty")


def _publish(staged: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an overwritten folder is removed only after the rename."""
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"output folder {output_dir} exists: pass --overwrite_output_dir or choose another --output_dir"
            )
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
    gex_encoding: str = "rank",
    top_peaks: int | None = None,
    gex_modality: str = "rna",
    atac_modality: str = "atac",
    chunk_size: int = 2048,
    overwrite: bool = False,
    progress: bool = False,
) -> datasets.DatasetDict:
    """Read paired counts, write cell sentences and metadata to ``output_dir``.

    Parameters
    ----------
    inputs
        One or two input files (see `readers.read_paired`).
    output_dir
        Folder to create (a `DatasetDict.save_to_disk` folder plus ``cell_sentences.json``).
    test_batches, validation_batches
        Batch (library / donor) names held out; without both, cells are split 80/10/10 by barcode hash.
    gex_encoding
        ``"rank"`` or ``"binary"``.
    top_peaks
        Keep only the N peaks most often accessible in train.
    overwrite
        Replace an existing ``output_dir`` (otherwise refuse).
    progress
        Show a tqdm progress bar over cells.

    Returns
    -------
    datasets.DatasetDict
        The saved dataset, loaded back from ``output_dir``.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} exists: pass --overwrite_output_dir or choose another --output_dir"
        )
    if chunk_size <= 0:
        raise ValueError(f"--chunk_size must be positive, not {chunk_size}")
    paired = read_paired(inputs, gex_modality=gex_modality, atac_modality=atac_modality)
    plan = make_plan(
        paired,
        test_batches=test_batches,
        validation_batches=validation_batches,
        gex_encoding=gex_encoding,
        top_peaks=top_peaks,
    )
    logger.info(
        "paired %d cells (%d dropped: present in only one modality); splits %s by %s",
        paired.n_cells,
        paired.dropped_cells,
        {k: int(v.size) for k, v in plan.rows.items()},
        plan.split_by,
    )
    digest = content_digest(plan)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=paired.n_cells, unit="cell", desc="cell sentences")
        builder = CellSentencesBuilder(
            cache_dir=str(work / "cache"),
            dataset_name="cell_sentences",
            config_id=f"default-{digest}",
            hash=digest,
            plan=plan,
            progress=bar,
            inputs=tuple(str(p) for p in inputs),
            gex_modality=gex_modality,
            atac_modality=atac_modality,
            test_batches=tuple(test_batches or ()),
            validation_batches=tuple(validation_batches or ()),
            gex_encoding=gex_encoding,
            top_peaks=top_peaks,
            chunk_size=chunk_size,
        )
        was_enabled = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        try:
            builder.download_and_prepare()
            dataset = datasets.DatasetDict({split: _as_split(builder, plan, split, digest) for split in SPLITS})
            staged = work / "dataset"
            # An empty split still needs one (empty) shard to load back.
            dataset.save_to_disk(str(staged), num_shards={s: None if len(d) else 1 for s, d in dataset.items()})
        finally:
            if was_enabled:
                datasets.utils.logging.enable_progress_bar()
        del dataset
        meta = _metadata(plan, digest)
        (staged / META_FILE).write_text(json.dumps(meta) + "\n")
        _publish(staged, output_dir, overwrite)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(work, ignore_errors=True)
    empty = meta["empty_cells"]
    if empty["gex"] or empty["atac"]:
        logger.warning(
            "kept all-zero cells with empty sentences: %d without GEX counts, %d without ATAC counts",
            empty["gex"],
            empty["atac"],
        )
    return datasets.load_from_disk(str(output_dir))
