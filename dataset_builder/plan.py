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
import scipy.sparse as sp

from .readers import PairedCounts
from .sentences import GEX_ENCODINGS, GeneRanking, library_size_factors, rank_genes
from .stored import StoredCsr, entry_slices_of

__all__ = ["SPLITS", "BuildPlan", "TrainStats", "make_plan", "split_cells", "train_stats", "content_digest"]

SPLITS = ("train", "validation", "test")
# Hash split: 80 / 10 / 10 by a stable hash of the barcode.
_HASH_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}
_STATS_CHUNK = 4096
# Entries per slice when hashing the count matrices.
_DIGEST_SLICE = 1 << 22
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
    peak_train_counts: np.ndarray | None = None  # None: counted while the train records are written (`TrainStats.add_atac`)
    test_batches: list[str] = field(default_factory=list)
    validation_batches: list[str] = field(default_factory=list)


def _hash_bucket(cells: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "little") % 100 for c in cells),
        dtype=np.int64,
        count=len(cells),
    )


def split_cells(
    paired: PairedCounts, test_batches: Sequence[str] | None = None, validation_batches: Sequence[str] | None = None,
    no_validation: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """Row indices of each split: by batch names when given, else by a deterministic barcode hash (80/10/10).

    ``no_validation`` (with ``test_batches``, without ``validation_batches``): the validation split stays empty and every
    cell outside the test batches trains: a final model whose settings were chosen by cross-validation beforehand.

    Returns
    -------
    rows, split_by
        ``{"train": rows, "validation": rows, "test": rows}`` (input order) and ``"batch"``, ``"hash"``, or
        ``"batch+hash"`` (test by batch, validation a 10% barcode-hash sample of the other batches' cells).
    """
    test_batches, validation_batches = list(test_batches or []), list(validation_batches or [])
    if no_validation and (validation_batches or not test_batches):
        raise ValueError("--no_validation needs --test_batches and no --validation_batches: give the held-out batches and drop --validation_batches")
    if not test_batches and not validation_batches:
        bucket = _hash_bucket(paired.cells)
        rows = {name: np.flatnonzero((bucket >= lo) & (bucket < hi)) for name, (lo, hi) in _HASH_BUCKETS.items()}
        return rows, "hash"
    if "batch" not in paired.obs:
        raise ValueError(
            f"--test_batches/--validation_batches need a batch column, but {', '.join(paired.source)} has no obs['batch']: "
            "name the column with --batch_key (e.g. library, sample, donor), or leave both flags out to split by barcode hash"
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
    if not validation_batches and not no_validation:
        # Settings are chosen on validation, never on test: without validation batches, hold out a
        # deterministic 10% of the train batches' cells (by barcode hash) as validation.
        held = _hash_bucket(paired.cells[rows["train"]]) < _VALIDATION_FROM_TRAIN
        rows["validation"], rows["train"] = rows["train"][held], rows["train"][~held]
        return rows, "batch+hash"
    return rows, "batch"


def _accessible_counts(atac, rows: np.ndarray, n_peaks: int) -> np.ndarray:
    """Cells of ``rows`` in which each peak is accessible (count > 0), in slices of entries (no row copy); a `StoredCsr`
    is read in chunks of its rows."""
    if isinstance(atac, StoredCsr):
        counts = np.zeros(n_peaks, dtype=np.int64)
        for chunk in atac.row_chunks(rows):
            counts += np.bincount(chunk.indices[chunk.data > 0], minlength=n_peaks)
        return counts
    selected = np.zeros(atac.shape[0], dtype=bool)
    selected[rows] = True
    counts = np.zeros(n_peaks, dtype=np.int64)
    indptr = atac.indptr
    step = max(1, _STATS_CHUNK)
    for start in range(0, atac.shape[0], step):
        stop = min(start + step, atac.shape[0])
        if not selected[start:stop].any():
            continue
        lo, hi = int(indptr[start]), int(indptr[stop])
        entry_rows = np.repeat(selected[start:stop], np.diff(indptr[start : stop + 1]))
        keep = entry_rows & (atac.data[lo:hi] > 0)
        counts += np.bincount(atac.indices[lo:hi][keep], minlength=n_peaks)
    return counts


def make_plan(
    paired: PairedCounts,
    *,
    test_batches: Sequence[str] | None = None,
    validation_batches: Sequence[str] | None = None,
    gex_encoding: str = "rank",
    top_peaks: int | None = None,
    no_validation: bool = False,
) -> BuildPlan:
    """Decide splits, size factors and kept peaks (``top_peaks`` most often accessible in train); ``no_validation``: see :func:`split_cells`."""
    if gex_encoding not in GEX_ENCODINGS:
        raise ValueError(f"--gex_encoding '{gex_encoding}' is unknown: use one of {list(GEX_ENCODINGS)}")
    if top_peaks is not None and top_peaks <= 0:
        raise ValueError(f"--top_peaks must be a positive number of peaks, not {top_peaks}")
    rows, split_by = split_cells(paired, test_batches, validation_batches, no_validation)
    if paired.size_factors is not None:
        size_factors, sf_source = paired.size_factors, "obs:size_factors"
    else:
        size_factors, sf_source = library_size_factors(paired.gex), "library_size / median_library_size"
    peak_map, peaks, counts = None, list(paired.peaks), None
    if top_peaks is not None and top_peaks < len(paired.peaks):
        # Most often accessible first, ties in genomic order; then kept in genomic order. Without this choice the counts
        # are taken from the train cells' ATAC rows as their records are written: one read of the file fewer.
        counts = _accessible_counts(paired.atac, rows["train"], len(paired.peaks))
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


class TrainStats:
    """Accumulates the train statistics from the gene rankings and ATAC rows of consecutive train cells.

    The builder ranks every train cell once to write its records; feeding those rankings here (in train
    row order, any chunking) gives exactly what `train_stats` computes by ranking the train cells itself:
    the sums are taken over the same blocks of ``_STATS_CHUNK`` cells, entry by entry in the same order,
    so the floating-point results are bit-identical. Where the plan has no per-peak train counts (no
    ``--top_peaks`` choice needed them), the train cells' ATAC rows are fed too (`add_atac`, any chunking and
    order: the counts are integers).
    """

    def __init__(self, plan: BuildPlan):
        self.plan = plan
        self.n_rows = int(plan.rows["train"].size)
        self.seen = 0
        n_genes = len(plan.paired.genes)
        self._value_sum = np.zeros(n_genes)
        self._detected = np.zeros(n_genes)
        self._rank_sum, self._rank_n = np.zeros(0), np.zeros(0)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (index, value, positions)
        self._pending_rows = 0
        self._peak_counts = None if plan.peak_train_counts is not None else np.zeros(len(plan.peaks), dtype=np.int64)
        self.atac_seen = 0

    @property
    def needs_atac(self) -> bool:
        """Whether the train cells' ATAC rows must be added (the plan has no per-peak train counts)."""
        return self._peak_counts is not None

    @property
    def complete(self) -> bool:
        """Whether every train cell has been added (its ATAC row too where `needs_atac`)."""
        return self.seen == self.n_rows and (not self.needs_atac or self.atac_seen == self.n_rows)

    def add_atac(self, atac: sp.csr_matrix) -> None:
        """Add the ATAC rows of train cells (the plan's peaks as columns): the cells where each peak is accessible."""
        if not self.needs_atac:
            return
        if self.atac_seen + atac.shape[0] > self.n_rows:
            raise ValueError(f"TrainStats got {self.atac_seen + atac.shape[0]} train ATAC rows, but the plan has {self.n_rows}")
        self._peak_counts += np.bincount(atac.indices[atac.data > 0], minlength=self._peak_counts.size)
        self.atac_seen += atac.shape[0]

    def add(self, ranking: GeneRanking) -> None:
        """Add the ranking of the next ``len(ranking.offsets) - 1`` train cells (in train row order)."""
        n = len(ranking.offsets) - 1
        if self.seen + n > self.n_rows:
            raise ValueError(f"TrainStats got {self.seen + n} train cells, but the plan has {self.n_rows}")
        positions = ranking.positions
        done = 0
        while done < n:
            take = min(n - done, _STATS_CHUNK - self._pending_rows)
            lo, hi = int(ranking.offsets[done]), int(ranking.offsets[done + take])
            self._pending.append((ranking.index[lo:hi], ranking.value[lo:hi], positions[lo:hi]))
            self._pending_rows += take
            done += take
            if self._pending_rows == _STATS_CHUNK:
                self._flush()
        self.seen += n
        if self.seen == self.n_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        if len(self._pending) == 1:
            index, value, positions = self._pending[0]
        else:
            index, value, positions = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
        self._pending, self._pending_rows = [], 0
        self._add_block(index, value, positions)

    def _add_block(self, index: np.ndarray, value: np.ndarray, positions: np.ndarray) -> None:
        n_genes = self._value_sum.size
        self._value_sum += np.bincount(index, weights=value, minlength=n_genes)
        self._detected += np.bincount(index, minlength=n_genes)
        length = int(positions.max()) + 1 if positions.size else 0
        if length > self._rank_sum.size:
            self._rank_sum = np.pad(self._rank_sum, (0, length - self._rank_sum.size))
            self._rank_n = np.pad(self._rank_n, (0, length - self._rank_n.size))
        self._rank_sum += np.bincount(positions, weights=value, minlength=self._rank_sum.size)
        self._rank_n += np.bincount(positions, minlength=self._rank_n.size)

    def result(self) -> dict[str, list[float]]:
        """The statistics (see `train_stats`); every train cell must have been added."""
        if not self.complete:
            raise ValueError(f"TrainStats has {self.seen} of {self.n_rows} train cells: add the rest first")
        value_sum, detected, rank_sum, rank_n = self._value_sum, self._detected, self._rank_sum, self._rank_n
        n_genes = value_sum.size
        n_train = max(self.n_rows, 1)
        return {
            "gex_mean": (value_sum / n_train).tolist(),
            "gex_detect_rate": (detected / n_train).tolist(),
            "gex_mean_detected": np.divide(value_sum, detected, out=np.zeros(n_genes), where=detected > 0).tolist(),
            "atac_mean": ((self._peak_counts if self.needs_atac else self.plan.peak_train_counts) / n_train).tolist(),
            "rank_value": np.divide(rank_sum, rank_n, out=np.zeros(rank_sum.size), where=rank_n > 0).tolist(),
        }


def train_stats(plan: BuildPlan) -> dict[str, list[float]]:
    """Train-split statistics that map predictions back to values (see docs/architecture.md).

    Ranks the train cells itself; a build that already ranks them feeds a `TrainStats` instead.

    Returns
    -------
    dict
        ``gex_mean``, ``gex_detect_rate``, ``gex_mean_detected`` (per gene), ``atac_mean`` (per kept peak),
        ``rank_value`` (mean log-norm of the gene at each rank position of the full detected-gene ranking).
    """
    paired, rows = plan.paired, plan.rows["train"]
    stats = TrainStats(plan)
    for start in range(0, rows.size, _STATS_CHUNK):
        chunk = rows[start : start + _STATS_CHUNK]
        stats.add(rank_genes(paired.gex[chunk], plan.size_factors[chunk]))
        if stats.needs_atac:
            stats.add_atac(paired.atac[chunk])
    return stats.result()


def content_digest(plan: BuildPlan) -> str:
    """A digest of everything that determines the records (not file names): equal digests mean equal records.

    The matrices are hashed in their native arrays where those are already canonical (int32 column indices,
    float32 counts), so no 64-bit copy of every entry is made; other dtypes are converted slice by slice. A `StoredCsr`
    is read chunk by chunk and hashed in the same slices, so its digest is the one of the same matrix in memory; the two
    modalities are read together (`entry_slices_of`), so a combined file is read once.
    """
    h = hashlib.sha256()  # twice blake2b's speed here (SHA instructions); the first 32 hex digits are kept
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
    matrices = (paired.gex, paired.atac)
    # Each matrix is hashed on its own, both in one pass over the entries (one read of a file that holds both).
    parts = [hashlib.sha256(np.ascontiguousarray(matrix.indptr, dtype=np.int64)) for matrix in matrices]
    index_dtypes = [np.int32 if matrix.shape[1] < 2**31 else np.int64 for matrix in matrices]
    for which, indices, values in entry_slices_of(matrices, _DIGEST_SLICE):
        # The same matrix hashes alike whatever dtypes its layout stored: column indices as int32 (they fit),
        # values as float32 where that is exact (counts are), else float64, each slice tagged with its width.
        parts[which].update(np.ascontiguousarray(indices, dtype=index_dtypes[which]))
        _hash_values(parts[which], values)
    for part in parts:
        h.update(part.digest())
    h.update(np.ascontiguousarray(plan.size_factors, dtype=np.float64))
    return h.hexdigest()[:32]


def _hash_values(h, values: np.ndarray) -> None:
    """Feed ``b"f4"`` + float32 values when float32 holds them exactly, else ``b"f8"`` + float64 values."""
    if values.dtype != np.float32:
        narrow = values.astype(np.float32)
        if not np.array_equal(narrow, values):
            h.update(b"f8")
            h.update(np.ascontiguousarray(values, dtype=np.float64))
            return
        values = narrow
    h.update(b"f4")
    h.update(np.ascontiguousarray(values))
