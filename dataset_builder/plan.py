"""What a build will write: the splits, the kept peaks, the train-split statistics and a content digest.

Everything here is decided from the paired counts before a single record is written, so that bad
split flags fail before any output exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .readers import PairedCounts
from .sentences import GEX_ENCODINGS, library_size_factors, rank_genes

__all__ = ["SPLITS", "BuildPlan", "make_plan", "split_cells", "train_stats", "content_digest"]

SPLITS = ("train", "validation", "test")
# Hash split: 80 / 10 / 10 by a stable hash of the barcode.
_HASH_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
_STATS_CHUNK = 4096
# Percent of the train batches' cells held out as validation when only --test_batches is given.
_VALIDATION_FROM_TRAIN = 10


@dataclass
class BuildPlan:
    """A paired dataset plus every decision the builder needs to write its records."""

    paired: PairedCounts
    rows: dict[str, np.ndarray]
    split_by: str
    size_factors: np.ndarray
    size_factor_source: str
    gex_encoding: str = "rank"
    top_peaks: int | None = None
    peak_map: np.ndarray | None = None
    peaks: list[str] = field(default_factory=list)
    peak_train_counts: np.ndarray | None = None
    test_batches: list[str] = field(default_factory=list)
    validation_batches: list[str] = field(default_factory=list)


def _hash_bucket(cells: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "little") % 100 for c in cells),
        dtype=np.int64,
        count=len(cells),
    )


def split_cells(
    paired: PairedCounts, test_batches: Sequence[str] | None = None, validation_batches: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Row indices of each split: by batch names when given, else by a deterministic barcode hash (80/10/10).

    Returns
    -------
    rows, split_by
        ``{"train": rows, "validation": rows, "test": rows}`` (input order) and ``"batch"``, ``"hash"``, or
        ``"batch+hash"`` (test by batch, validation a 10% barcode-hash sample of the other batches' cells).
    """
    test_batches, validation_batches = list(test_batches or []), list(validation_batches or [])
    if not test_batches and not validation_batches:
        bucket = _hash_bucket(paired.cells)
        rows = {name: np.flatnonzero((bucket >= lo) & (bucket < hi)) for name, (lo, hi) in _HASH_BUCKETS.items()}
        return rows, "hash"
    if "batch" not in paired.obs:
        raise ValueError(
            f"--test_batches/--validation_batches need obs['batch'], but {', '.join(paired.source)} has no batch column: "
            "add obs['batch'] or leave both flags out to split by barcode hash"
        )
    batch = paired.obs["batch"].to_numpy().astype(str)
    known = sorted(set(batch))
    for flag, names in (("--test_batches", test_batches), ("--validation_batches", validation_batches)):
        unknown = [b for b in names if b not in known]
        if unknown:
            raise ValueError(
                f"{flag} names batches {unknown} that are not in obs['batch'] (batches: {known}): fix the names"
            )
    overlap = sorted(set(test_batches) & set(validation_batches))
    if overlap:
        raise ValueError(
            f"batches {overlap} are in both --test_batches and --validation_batches: give each batch to one split"
        )
    is_test, is_validation = np.isin(batch, test_batches), np.isin(batch, validation_batches)
    rows = {
        "train": np.flatnonzero(~is_test & ~is_validation),
        "validation": np.flatnonzero(is_validation),
        "test": np.flatnonzero(is_test),
    }
    if rows["train"].size == 0:
        raise ValueError(
            "--test_batches and --validation_batches cover every batch: leave at least one batch for train"
        )
    if not validation_batches:
        # Settings are chosen on validation, never on test: without validation batches, hold out a
        # deterministic 10% of the train batches' cells (by barcode hash) as validation.
        held = _hash_bucket(paired.cells[rows["train"]]) < _VALIDATION_FROM_TRAIN
        rows["validation"], rows["train"] = rows["train"][held], rows["train"][~held]
        return rows, "batch+hash"
    return rows, "batch"


def make_plan(
    paired: PairedCounts,
    *,
    test_batches: Sequence[str] | None = None,
    validation_batches: Sequence[str] | None = None,
    gex_encoding: str = "rank",
    top_peaks: int | None = None,
) -> BuildPlan:
    """Decide splits, size factors and kept peaks (``top_peaks`` most often accessible in train)."""
    if gex_encoding not in GEX_ENCODINGS:
        raise ValueError(f"--gex_encoding '{gex_encoding}' is unknown: use one of {list(GEX_ENCODINGS)}")
    if top_peaks is not None and top_peaks <= 0:
        raise ValueError(f"--top_peaks must be a positive number of peaks, not {top_peaks}")
    rows, split_by = split_cells(paired, test_batches, validation_batches)
    if paired.size_factors is not None:
        size_factors, sf_source = paired.size_factors, "obs:size_factors"
    else:
        size_factors, sf_source = library_size_factors(paired.gex), "library_size / median_library_size"
    train = paired.atac[rows["train"]]
    counts = np.bincount(train.indices[train.data > 0], minlength=len(paired.peaks))
    peak_map, peaks = None, list(paired.peaks)
    if top_peaks is not None and top_peaks < len(paired.peaks):
        # Most often accessible first, ties in genomic order; then kept in genomic order.
        kept = np.sort(np.lexsort((np.arange(counts.size), -counts))[:top_peaks])
        peak_map = np.full(len(paired.peaks), -1, dtype=np.int64)
        peak_map[kept] = np.arange(kept.size)
        peaks = [paired.peaks[i] for i in kept]
        counts = counts[kept]
    return BuildPlan(
        paired=paired,
        rows=rows,
        split_by=split_by,
        size_factors=size_factors,
        size_factor_source=sf_source,
        gex_encoding=gex_encoding,
        top_peaks=top_peaks,
        peak_map=peak_map,
        peaks=peaks,
        peak_train_counts=counts,
        test_batches=list(test_batches or []),
        validation_batches=list(validation_batches or []),
    )


def train_stats(plan: BuildPlan) -> dict[str, list[float]]:
    """Train-split statistics that map predictions back to values (see docs/architecture.md).

    Returns
    -------
    dict
        ``gex_mean``, ``gex_detect_rate``, ``gex_mean_detected`` (per gene), ``atac_mean`` (per kept peak),
        ``rank_value`` (mean log-norm of the gene at each rank position of the full detected-gene ranking).
    """
    paired, rows = plan.paired, plan.rows["train"]
    n_genes = len(paired.genes)
    value_sum = np.zeros(n_genes)
    detected = np.zeros(n_genes)
    rank_sum, rank_n = np.zeros(0), np.zeros(0)
    for start in range(0, rows.size, _STATS_CHUNK):
        chunk = rows[start : start + _STATS_CHUNK]
        ranking = rank_genes(paired.gex[chunk], plan.size_factors[chunk])
        value_sum += np.bincount(ranking.index, weights=ranking.value, minlength=n_genes)
        detected += np.bincount(ranking.index, minlength=n_genes)
        positions = ranking.positions
        length = int(positions.max()) + 1 if positions.size else 0
        if length > rank_sum.size:
            rank_sum = np.pad(rank_sum, (0, length - rank_sum.size))
            rank_n = np.pad(rank_n, (0, length - rank_n.size))
        rank_sum += np.bincount(positions, weights=ranking.value, minlength=rank_sum.size)
        rank_n += np.bincount(positions, minlength=rank_n.size)
    n_train = max(rows.size, 1)
    return {
        "gex_mean": (value_sum / n_train).tolist(),
        "gex_detect_rate": (detected / n_train).tolist(),
        "gex_mean_detected": np.divide(value_sum, detected, out=np.zeros(n_genes), where=detected > 0).tolist(),
        "atac_mean": (plan.peak_train_counts / n_train).tolist(),
        "rank_value": np.divide(rank_sum, rank_n, out=np.zeros(rank_sum.size), where=rank_n > 0).tolist(),
    }


def content_digest(plan: BuildPlan) -> str:
    """A digest of everything that determines the records (not file names): equal digests mean equal records."""
    h = hashlib.blake2b(digest_size=16)
    paired = plan.paired
    options = {
        "gex_encoding": plan.gex_encoding,
        "top_peaks": plan.top_peaks,
        "genes": paired.genes,
        "peaks": plan.peaks,
        "obs": {c: paired.obs[c].tolist() for c in paired.obs.columns},
        "cells": [str(c) for c in paired.cells],
    }
    h.update(json.dumps(options, sort_keys=True).encode())
    for name in ("train", "validation", "test"):
        h.update(np.ascontiguousarray(plan.rows[name], dtype=np.int64).tobytes())
    for matrix in (paired.gex, paired.atac):
        for array, dtype in ((matrix.indptr, np.int64), (matrix.indices, np.int64), (matrix.data, np.float64)):
            # In slices, in one dtype: the same counts stored as int32/float32 or int64/float64 hash alike.
            for start in range(0, array.size, _STATS_CHUNK * 1024):
                h.update(np.ascontiguousarray(array[start : start + _STATS_CHUNK * 1024], dtype=dtype).tobytes())
    h.update(np.ascontiguousarray(plan.size_factors, dtype=np.float64).tobytes())
    return h.hexdigest()
