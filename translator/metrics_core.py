"""Numeric core of the translation metrics: pure numpy / scipy, streamed over chunks of cells.

The shipped predictor scores its blend with these kernels (:mod:`translator.predictor`), ``eval.py`` reports them
(:mod:`evaluation.runner`), and ``metrics/cell_translation`` serves them as an ``evaluate`` module: the file imports
nothing from the package, so that a copy of it works on its own.

A cells x features target is never held as one dense array: the truth stays sparse (or is given
dense for small data), predictions arrive chunk by chunk, and :class:`MetricAccumulator` keeps
only per-feature sums, per-cell scores, two score histograms and a bounded sample of cells for
the per-feature rank correlations.

Definitions (``target`` is the modality being predicted):

- ``rmse``, ``mae``: over every cell x feature entry (log-normalized GEX, binary ATAC).
- ``pearson_cell`` / ``spearman_cell``: correlation of one cell's predicted and observed profile,
  averaged over cells whose observed profile is not constant; a constant prediction scores 0.
- ``pearson_feature`` / ``spearman_feature``: the same across cells for one feature, averaged over
  features whose observed values are not constant (Spearman on at most ``feature_rank_max_entries``
  entries: an evenly strided subset of cells when the split is larger, see ``details``).
- ``auroc_cell`` / ``ap_cell`` (ATAC): ranking of one cell's peaks by predicted score against its
  accessible peaks, averaged over cells with both accessible and closed peaks (ties get the mean rank,
  AP as in ``sklearn.metrics.average_precision_score``).
- ``auroc_all`` / ``ap_all`` (ATAC): over all entries, computed from per-class histograms of the
  scores clipped to [0, 1] with ``n_bins`` equal bins: exact for scores quantized to those bins,
  otherwise scores inside one bin count as tied (error below 1 / n_bins of the curve).
- ``accuracy_binary``: share of entries whose binarized prediction equals the binarized truth.
  ATAC: prediction >= 0.5 against accessible (truth >= 0.5); GEX: prediction > ``gex_threshold``
  (0 by default) against detected (truth > 0). ``accuracy_binary_all_zeros`` is the same share for
  a prediction of all zeros, i.e. the share of closed / undetected entries: the floor any
  "accuracy" must be read against.
- ``token_precision`` / ``token_recall`` / ``token_f1`` / ``token_jaccard``: per cell, the predicted
  token set (the generated sentence's feature names; without sentences, the binarized prediction)
  against the observed set (non-zero truth entries), averaged over cells; two empty sets score 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

TARGETS = ("atac", "gex")
METRIC_KEYS = (
    "rmse",
    "mae",
    "pearson_cell",
    "pearson_feature",
    "spearman_cell",
    "spearman_feature",
    "auroc_cell",
    "ap_cell",
    "auroc_all",
    "ap_all",
    "token_f1",
    "token_jaccard",
    "accuracy_binary",
)
ATAC_ONLY_KEYS = ("auroc_cell", "ap_cell", "auroc_all", "ap_all")
EXTRA_KEYS = ("token_precision", "token_recall", "accuracy_binary_all_zeros")
PER_CELL_KEYS = ("pearson_cell", "spearman_cell", "auroc_cell", "ap_cell", "token_f1", "token_jaccard")


def metric_keys(target: str) -> tuple[str, ...]:
    """Metric names reported for a target modality (``"atac"`` or ``"gex"``), the headline keys first."""
    _check_target(target)
    keys = METRIC_KEYS if target == "atac" else tuple(k for k in METRIC_KEYS if k not in ATAC_ONLY_KEYS)
    return keys + EXTRA_KEYS


def default_chunk_cells(n_features: int, max_entries: int = 1 << 22) -> int:
    """Number of cells per chunk so that one dense chunk holds at most ``max_entries`` values."""
    return int(max(1, min(1024, max_entries // max(1, n_features))))


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def _dense(x: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.toarray(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with the same row of ``y``.

    Rows where ``y`` is constant give NaN (excluded later); rows where only ``x`` is constant give 0.
    """
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    sxx = np.einsum("ij,ij->i", xc, xc)
    syy = np.einsum("ij,ij->i", yc, yc)
    sxy = np.einsum("ij,ij->i", xc, yc)
    out = np.zeros(x.shape[0], dtype=np.float64)
    ok = (sxx > 0) & (syy > 0)
    out[ok] = sxy[ok] / np.sqrt(sxx[ok] * syy[ok])
    out[syy <= 0] = np.nan
    return np.clip(out, -1.0, 1.0)


def rowwise_auroc(scores: np.ndarray, labels: np.ndarray, score_ranks: np.ndarray | None = None) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U from mean ranks); NaN for rows with a single class.

    Parameters
    ----------
    scores
        ``[cells, features]`` predicted scores.
    labels
        ``[cells, features]`` boolean (or 0/1) truth.
    score_ranks
        Optional precomputed ``rankdata(scores, axis=1)`` (average ranks) to reuse.
    """
    labels = np.asarray(labels, dtype=bool)
    ranks = rankdata(scores, axis=1) if score_ranks is None else score_ranks
    n_pos = labels.sum(axis=1).astype(np.float64)
    n_neg = labels.shape[1] - n_pos
    rank_sum = np.where(labels, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def rowwise_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision of each row, tie handling as ``sklearn.metrics.average_precision_score``.

    NaN for rows without positives or without negatives.
    """
    labels = np.asarray(labels, dtype=bool)
    n_cells, n_features = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    s_sorted = np.take_along_axis(scores, order, axis=1)
    y_sorted = np.take_along_axis(labels, order, axis=1)
    tp = np.cumsum(y_sorted, axis=1, dtype=np.float64)
    # a threshold ends where the next (lower) score differs: precision is read at the end of each tie group
    is_end = np.ones_like(s_sorted, dtype=bool)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    positions = np.broadcast_to(np.arange(n_features), (n_cells, n_features))
    end_index = np.where(is_end, positions, n_features - 1)
    end_index = np.minimum.accumulate(end_index[:, ::-1], axis=1)[:, ::-1]
    precision_at_end = np.take_along_axis(tp, end_index, axis=1) / (end_index + 1.0)
    n_pos = labels.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(y_sorted, precision_at_end, 0.0).sum(axis=1) / n_pos
    ap[(n_pos == 0) | (n_pos == n_features)] = np.nan
    return ap


def rowwise_auroc_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rowwise_auroc` and :func:`rowwise_average_precision` of each row from one sort (ties as they handle them)."""
    labels = np.asarray(labels, dtype=bool)
    n_cells, n_features = scores.shape
    order = np.argsort(-scores, axis=1)  # the order within a tie group does not matter: both read whole groups
    s_sorted = np.take_along_axis(scores, order, axis=1)
    y_sorted = np.take_along_axis(labels, order, axis=1)
    positions = np.broadcast_to(np.arange(n_features), (n_cells, n_features))
    is_end = np.ones_like(s_sorted, dtype=bool)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    is_start = np.ones_like(is_end)
    is_start[:, 1:] = is_end[:, :-1]
    end_index = np.minimum.accumulate(np.where(is_end, positions, n_features - 1)[:, ::-1], axis=1)[:, ::-1]
    start_index = np.maximum.accumulate(np.where(is_start, positions, 0), axis=1)
    n_pos = y_sorted.sum(axis=1, dtype=np.float64)
    n_neg = n_features - n_pos
    # Ascending average rank of a tie group spanning descending positions [start, end]: n - (start + end) / 2.
    rank_sum = np.where(y_sorted, n_features - (start_index + end_index) / 2.0, 0.0).sum(axis=1)
    tp = np.cumsum(y_sorted, axis=1, dtype=np.float64)
    precision_at_end = np.take_along_axis(tp, end_index, axis=1) / (end_index + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        ap = np.where(y_sorted, precision_at_end, 0.0).sum(axis=1) / n_pos
    single = (n_pos == 0) | (n_neg == 0)
    auc[single], ap[single] = np.nan, np.nan
    return auc, ap


def histogram_auroc_ap(hist_pos: np.ndarray, hist_neg: np.ndarray) -> tuple[float, float]:
    """AUROC and average precision from per-class score histograms (bins in ascending score order).

    Scores in one bin count as tied, exactly as ``sklearn`` treats equal scores.
    """
    pos = np.asarray(hist_pos, dtype=np.float64)[::-1]
    neg = np.asarray(hist_neg, dtype=np.float64)[::-1]
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    pos_above = np.cumsum(pos) - pos
    auroc = float(np.sum(neg * (pos_above + 0.5 * pos)) / (n_pos * n_neg))
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    ap = float(np.sum(pos / n_pos * precision))
    return auroc, ap


def histogram_curves(hist_pos: np.ndarray, hist_neg: np.ndarray) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall points from per-class score histograms."""
    pos = np.asarray(hist_pos, dtype=np.float64)[::-1]
    neg = np.asarray(hist_neg, dtype=np.float64)[::-1]
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(neg)])
    keep = np.concatenate([[True], (pos + neg) > 0])
    tp, fp = tp[keep], fp[keep]
    n_pos, n_neg = max(tp[-1], 1.0), max(fp[-1], 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1.0), 1.0)
    return {"fpr": fp / n_neg, "tpr": tp / n_pos, "recall": tp / n_pos, "precision": precision}


def _binary_stats(pred_bin: np.ndarray, true_bin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.count_nonzero(pred_bin & true_bin, axis=1).astype(np.float64)
    return tp, pred_bin.sum(axis=1, dtype=np.float64), true_bin.sum(axis=1, dtype=np.float64)


def _token_scores(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> dict[str, np.ndarray]:
    union = n_pred + n_true - tp
    both_empty = union == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, tp / n_pred, np.where(both_empty, 1.0, 0.0))
        recall = np.where(n_true > 0, tp / n_true, np.where(both_empty, 1.0, 0.0))
        f1 = np.where(n_pred + n_true > 0, 2 * tp / (n_pred + n_true), 1.0)
        jaccard = np.where(union > 0, tp / union, 1.0)
    return {"token_precision": precision, "token_recall": recall, "token_f1": f1, "token_jaccard": jaccard}


class MetricAccumulator:
    """Streams chunks of cells and returns every metric of one method on one target.

    Parameters
    ----------
    target
        ``"atac"`` (binary truth, scores in [0, 1]) or ``"gex"`` (log-normalized truth).
    n_cells, n_features
        Shape of the whole evaluated matrix (needed up front to bound memory).
    feature_names
        Target feature names, needed only when generated sentences are given to :meth:`update`.
    n_bins
        Histogram bins for ``auroc_all`` / ``ap_all``.
    feature_rank_max_entries
        At most this many cell x feature values are kept for ``spearman_feature``.
    gex_threshold
        A GEX prediction above this value counts as "detected" for the binary metrics.
    example_cell
        Index of the cell whose predicted and observed rows are kept for plots.
    """

    def __init__(
        self,
        target: str,
        n_cells: int,
        n_features: int,
        feature_names: Sequence[str] | None = None,
        n_bins: int = 10_000,
        feature_rank_max_entries: int = 50_000_000,
        gex_threshold: float = 0.0,
        example_cell: int | None = None,
    ) -> None:
        _check_target(target)
        if n_cells <= 0 or n_features <= 0:
            raise ValueError(f"cannot evaluate an empty matrix ({n_cells} cells x {n_features} features)")
        self.target, self.n_cells, self.n_features = target, int(n_cells), int(n_features)
        self.feature_index = {name: i for i, name in enumerate(feature_names)} if feature_names is not None else None
        self.n_bins = int(n_bins)
        self.gex_threshold = float(gex_threshold)
        self.seen = 0
        self.sse = 0.0
        self.sae = 0.0
        self.correct = 0.0
        self.true_zero = 0.0
        self.col = {k: np.zeros(self.n_features, dtype=np.float64) for k in ("x", "y", "xx", "yy", "xy")}
        self.per_cell = {k: np.full(self.n_cells, np.nan) for k in PER_CELL_KEYS + ("token_precision", "token_recall")}
        self.cell_sse = np.zeros(self.n_cells)
        self.cell_sae = np.zeros(self.n_cells)
        self.cell_correct = np.zeros(self.n_cells)
        self.hist_pos = np.zeros(self.n_bins, dtype=np.int64)
        self.hist_all = np.zeros(self.n_bins, dtype=np.int64)
        self.rank_stride = int(np.ceil(self.n_cells * self.n_features / max(1, feature_rank_max_entries)))
        self.rank_stride = max(1, self.rank_stride)
        self.rank_pred: list[np.ndarray] = []
        self.rank_true: list[sp.csr_matrix] = []
        self.example_cell = self.n_cells // 2 if example_cell is None else int(example_cell)
        self.example: dict[str, np.ndarray] = {}
        self.token_source: str | None = None

    def update(
        self,
        predictions: np.ndarray,
        references: np.ndarray | sp.spmatrix | sp.sparray,
        predicted_sentences: Sequence[str] | None = None,
    ) -> None:
        """Add the next chunk of cells (in order).

        Parameters
        ----------
        predictions
            ``[chunk, n_features]`` dense predictions.
        references
            ``[chunk, n_features]`` truth, sparse or dense.
        predicted_sentences
            Optional generated sentences of those cells (space-separated target feature names).
        """
        pred = np.asarray(predictions, dtype=np.float64)
        if pred.ndim != 2 or pred.shape[1] != self.n_features:
            raise ValueError(f"predictions must have shape [cells, {self.n_features}], got {pred.shape}")
        true = _dense(references)
        if true.shape != pred.shape:
            raise ValueError(f"predictions {pred.shape} and references {true.shape} differ in shape")
        if not np.all(np.isfinite(pred)):
            raise ValueError("predictions contain NaN or infinite values")
        start, stop = self.seen, self.seen + pred.shape[0]
        if stop > self.n_cells:
            raise ValueError(f"received {stop} cells but the accumulator was made for {self.n_cells}")
        rows = slice(start, stop)
        diff = pred - true
        self.cell_sse[rows] = np.einsum("ij,ij->i", diff, diff)
        self.cell_sae[rows] = np.abs(diff).sum(axis=1)
        self.sse += float(self.cell_sse[rows].sum())
        self.sae += float(self.cell_sae[rows].sum())
        del diff

        for key, value in (("x", pred), ("y", true), ("xx", pred * pred), ("yy", true * true), ("xy", pred * true)):
            self.col[key] += value.sum(axis=0)

        self.per_cell["pearson_cell"][rows] = rowwise_pearson(pred, true)
        pred_ranks = rankdata(pred, axis=1)
        self.per_cell["spearman_cell"][rows] = rowwise_pearson(pred_ranks, rankdata(true, axis=1))

        if self.target == "atac":
            true_bin = true >= 0.5
            pred_bin = pred >= 0.5
            self.per_cell["auroc_cell"][rows] = rowwise_auroc(pred, true_bin, score_ranks=pred_ranks)
            self.per_cell["ap_cell"][rows] = rowwise_average_precision(pred, true_bin)
            bins = np.minimum((np.clip(pred, 0.0, 1.0) * self.n_bins).astype(np.int64), self.n_bins - 1)
            self.hist_all += np.bincount(bins.ravel(), minlength=self.n_bins)
            self.hist_pos += np.bincount(bins[true_bin], minlength=self.n_bins)
        else:
            true_bin = true > 0
            pred_bin = pred > self.gex_threshold
        del pred_ranks

        self.cell_correct[rows] = np.count_nonzero(pred_bin == true_bin, axis=1)
        self.correct += float(self.cell_correct[rows].sum())
        self.true_zero += float(true_bin.size - np.count_nonzero(true_bin))

        if predicted_sentences is not None:
            tp, n_pred, n_true = self._sentence_stats(predicted_sentences, true_bin)
            self.token_source = "sentences"
        else:
            tp, n_pred, n_true = _binary_stats(pred_bin, true_bin)
            self.token_source = self.token_source or "binarized_prediction"
        for key, value in _token_scores(tp, n_pred, n_true).items():
            self.per_cell[key][rows] = value

        keep = np.arange(start, stop) % self.rank_stride == 0
        if keep.any():
            self.rank_pred.append(pred[keep].astype(np.float32))
            self.rank_true.append(sp.csr_matrix(true[keep].astype(np.float32)))
        if start <= self.example_cell < stop:
            self.example = {"prediction": pred[self.example_cell - start].copy(), "truth": true[self.example_cell - start].copy()}
        self.seen = stop

    def _sentence_stats(
        self, sentences: Sequence[str], true_bin: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.feature_index is None:
            raise ValueError("feature_names are needed to score generated sentences")
        if len(sentences) != true_bin.shape[0]:
            raise ValueError(f"got {len(sentences)} sentences for a chunk of {true_bin.shape[0]} cells")
        tp = np.zeros(len(sentences))
        n_pred = np.zeros(len(sentences))
        for i, sentence in enumerate(sentences):
            tokens = set(sentence.split())
            # tokens that are not target features (special tokens, the other modality) count as wrong
            idx = np.fromiter((self.feature_index.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
            n_pred[i] = len(tokens)
            valid = idx[idx >= 0]
            tp[i] = np.count_nonzero(true_bin[i, valid])
        return tp, n_pred, true_bin.sum(axis=1, dtype=np.float64)

    def _feature_correlations(self) -> tuple[np.ndarray, np.ndarray]:
        n = float(self.seen)
        c = self.col
        cov = c["xy"] / n - c["x"] * c["y"] / n**2
        var_x = c["xx"] / n - (c["x"] / n) ** 2
        var_y = c["yy"] / n - (c["y"] / n) ** 2
        tol = 1e-12
        pearson = np.zeros(self.n_features)
        ok = (var_x > tol) & (var_y > tol)
        pearson[ok] = cov[ok] / np.sqrt(var_x[ok] * var_y[ok])
        pearson[var_y <= tol] = np.nan

        spearman = np.full(self.n_features, np.nan)
        if self.rank_pred:
            pred = np.vstack(self.rank_pred)
            true = sp.vstack(self.rank_true).tocsc()
            block = max(1, (1 << 22) // max(1, pred.shape[0]))
            for lo in range(0, self.n_features, block):
                hi = min(self.n_features, lo + block)
                p_ranks = rankdata(pred[:, lo:hi], axis=0)
                t_ranks = rankdata(true[:, lo:hi].toarray(), axis=0)
                spearman[lo:hi] = rowwise_pearson(p_ranks.T, t_ranks.T)
        return np.clip(pearson, -1.0, 1.0), spearman

    def result(self, cell_types: Sequence[str] | None = None) -> dict:
        """Return ``{"metrics": {name: float}, "details": {...}, "by_cell_type": {...}}``.

        Parameters
        ----------
        cell_types
            Optional label of every cell (length ``n_cells``) for the per-cell-type breakdown.
        """
        if self.seen != self.n_cells:
            raise ValueError(f"only {self.seen} of {self.n_cells} cells were added before result()")
        n_entries = float(self.n_cells) * self.n_features
        pearson_feature, spearman_feature = self._feature_correlations()
        metrics: dict[str, float] = {
            "rmse": float(np.sqrt(self.sse / n_entries)),
            "mae": float(self.sae / n_entries),
            "pearson_cell": _nanmean(self.per_cell["pearson_cell"]),
            "pearson_feature": _nanmean(pearson_feature),
            "spearman_cell": _nanmean(self.per_cell["spearman_cell"]),
            "spearman_feature": _nanmean(spearman_feature),
        }
        if self.target == "atac":
            auroc_all, ap_all = histogram_auroc_ap(self.hist_pos, self.hist_all - self.hist_pos)
            metrics.update(
                auroc_cell=_nanmean(self.per_cell["auroc_cell"]),
                ap_cell=_nanmean(self.per_cell["ap_cell"]),
                auroc_all=auroc_all,
                ap_all=ap_all,
            )
        metrics.update(
            token_f1=_nanmean(self.per_cell["token_f1"]),
            token_jaccard=_nanmean(self.per_cell["token_jaccard"]),
            accuracy_binary=float(self.correct / n_entries),
            token_precision=_nanmean(self.per_cell["token_precision"]),
            token_recall=_nanmean(self.per_cell["token_recall"]),
            accuracy_binary_all_zeros=float(self.true_zero / n_entries),
        )
        details = {
            "n_cells": self.n_cells,
            "n_features": self.n_features,
            "cells_with_pearson": int(np.isfinite(self.per_cell["pearson_cell"]).sum()),
            "features_with_pearson": int(np.isfinite(pearson_feature).sum()),
            "features_with_spearman": int(np.isfinite(spearman_feature).sum()),
            "spearman_feature_cells": int(sum(p.shape[0] for p in self.rank_pred)),
            "token_source": self.token_source,
        }
        if self.target == "atac":
            details["cells_with_auroc"] = int(np.isfinite(self.per_cell["auroc_cell"]).sum())
            details["histogram_bins"] = self.n_bins
        else:
            details["gex_threshold"] = self.gex_threshold
        out = {"metrics": metrics, "details": details}
        if cell_types is not None:
            out["by_cell_type"] = self._by_group(cell_types)
        return out

    def _by_group(self, labels: Sequence[str]) -> dict[str, dict[str, float]]:
        labels = np.asarray(labels, dtype=object)
        if labels.shape[0] != self.n_cells:
            raise ValueError(f"got {labels.shape[0]} cell-type labels for {self.n_cells} cells")
        groups: dict[str, dict[str, float]] = {}
        for label in sorted(set(labels.tolist()), key=str):
            mask = labels == label
            n_entries = float(mask.sum()) * self.n_features
            row = {
                "n_cells": float(mask.sum()),
                "rmse": float(np.sqrt(self.cell_sse[mask].sum() / n_entries)),
                "mae": float(self.cell_sae[mask].sum() / n_entries),
                "accuracy_binary": float(self.cell_correct[mask].sum() / n_entries),
            }
            for key in PER_CELL_KEYS:
                if self.target == "gex" and key in ATAC_ONLY_KEYS:
                    continue
                row[key] = _nanmean(self.per_cell[key][mask])
            groups[str(label)] = row
        return groups

    def curves(self) -> dict[str, np.ndarray]:
        """ROC and precision-recall points over all entries (ATAC targets only)."""
        if self.target != "atac":
            raise ValueError("ROC and precision-recall curves exist only for ATAC targets")
        return histogram_curves(self.hist_pos, self.hist_all - self.hist_pos)

    def feature_means(self) -> dict[str, np.ndarray]:
        """Per-feature mean of the predictions and of the truth over the cells seen."""
        n = max(1, self.seen)
        return {"prediction": self.col["x"] / n, "truth": self.col["y"] / n}


BOOTSTRAP_KEYS = ("rmse", "pearson_cell", "auroc_cell", "ap_cell")  # the headline metrics of the results tables


def paired_bootstrap(accs: dict[str, MetricAccumulator], reference: str = "model", resamples: int = 1000, seed: int = 0,
                     max_entries: int = 1 << 24, point: dict[str, dict] | None = None) -> dict:
    """How firmly ``reference`` leads: a paired bootstrap over cells of every headline metric.

    Each resample draws the split's cells with replacement, the same cells for every method, and recomputes RMSE
    (from the per-cell squared errors) and the per-cell means of Pearson, AUROC and AP (cells without a value
    skipped, as in :meth:`MetricAccumulator.result`). For each metric: ``share_first``, the share of resamples in
    which ``reference`` is strictly better than every other method, and per other method the point ``difference``
    (``reference`` minus it; negative is better for RMSE), its bootstrap ``sd`` and 95% percentile ``interval_95``, and ``share_ahead``. Methods without a
    finite value on a metric are left out of that metric. ``max_entries`` bounds the
    ``[resamples, cells]`` count matrix held at once. ``point``: each method's ``result()["metrics"]`` when the caller
    already has them (otherwise computed here).
    """
    if reference not in accs:
        raise ValueError(f"paired_bootstrap: no method named {reference!r} among {sorted(accs)}")
    if resamples < 1:
        raise ValueError(f"the bootstrap needs at least 1 resample, got {resamples}")
    first = accs[reference]
    n = first.n_cells
    if any(acc.n_cells != n or acc.seen != n for acc in accs.values()):
        raise ValueError("paired_bootstrap needs every method scored on the same, complete set of cells")
    keys = [k for k in BOOTSTRAP_KEYS if first.target == "atac" or k not in ATAC_ONLY_KEYS]
    per_cell = {}
    for name, acc in accs.items():
        per_cell[name] = {"rmse": acc.cell_sse / acc.n_features}
        per_cell[name].update({k: acc.per_cell[k] for k in keys if k != "rmse"})
    rng = np.random.default_rng(seed)
    draws = {name: {k: np.empty(resamples) for k in keys} for name in accs}
    block = max(1, max_entries // max(1, n))
    for begin in range(0, resamples, block):
        rows = min(block, resamples - begin)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=rows).astype(np.float64)  # [rows, cells]: times each cell is drawn
        for name in accs:
            for k in keys:
                v = per_cell[name][k]
                finite = np.isfinite(v)
                total = counts[:, finite] @ v[finite]
                if k == "rmse":
                    draws[name][k][begin : begin + rows] = np.sqrt(total / n)
                else:
                    weight = counts[:, finite].sum(axis=1)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        draws[name][k][begin : begin + rows] = np.where(weight > 0, total / weight, np.nan)
    point = point or {name: acc.result()["metrics"] for name, acc in accs.items()}
    out: dict = {"resamples": int(resamples), "seed": int(seed), "reference": reference, "metrics": {}}
    for k in keys:
        sign = 1.0 if k == "rmse" else -1.0  # sign * value: lower is better
        others = [name for name in accs if name != reference and np.isfinite(point[name].get(k, np.nan)) and np.all(np.isfinite(draws[name][k]))]
        if not np.isfinite(point[reference].get(k, np.nan)):
            continue
        mine = sign * draws[reference][k]
        ahead_all = np.ones(resamples, dtype=bool)
        versus = {}
        for name in others:
            theirs = sign * draws[name][k]
            ahead_all &= mine < theirs
            diff = draws[reference][k] - draws[name][k]
            versus[name] = {"difference": float(point[reference][k] - point[name][k]), "sd": float(diff.std(ddof=1)) if resamples > 1 else 0.0,
                            "interval_95": [float(q) for q in np.percentile(diff, [2.5, 97.5])],
                            "share_ahead": float(np.mean(mine < theirs))}
        out["metrics"][k] = {"share_first": float(ahead_all.mean()), "versus": versus}
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def iter_row_chunks(n_cells: int, chunk_cells: int) -> Iterable[slice]:
    """Consecutive slices of at most ``chunk_cells`` rows covering ``range(n_cells)``."""
    for start in range(0, n_cells, chunk_cells):
        yield slice(start, min(n_cells, start + chunk_cells))


# 8 MB of float32: a tile's passes stay in cache, and each (multithreaded) pass is long enough that its threads' hand-off
# is a small cost even on busy cores
TILE_ROWS, TILE_COLUMNS = 128, 16384


def iter_tiles(n_cells: int, n_features: int, rows: int | None = None, columns: int | None = None) -> Iterable[tuple[slice, slice]]:
    """``(row slice, column slice)`` tiles covering a ``n_cells x n_features`` matrix, row blocks outermost (default
    :data:`TILE_ROWS` x :data:`TILE_COLUMNS`).

    Several elementwise passes over one tile cost about one pass over memory, where the same passes over whole
    ``[cells, features]`` arrays (116,490 peaks: 0.5 GB a 1,024-cell chunk) each read and write it all.
    """
    for row in iter_row_chunks(n_cells, rows or TILE_ROWS):
        for column in iter_row_chunks(n_features, columns or TILE_COLUMNS):
            yield row, column


def compute_metrics(
    predictions: np.ndarray,
    references: np.ndarray | sp.spmatrix | sp.sparray,
    target: str,
    predicted_sentences: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    cell_types: Sequence[str] | None = None,
    chunk_cells: int | None = None,
    **accumulator_kwargs,
) -> dict:
    """Every metric of one prediction matrix against the truth, computed in chunks of cells.

    Parameters
    ----------
    predictions
        ``[cells, features]`` dense predictions (ATAC: scores in [0, 1]; GEX: log-norm values).
    references
        ``[cells, features]`` truth, ``scipy.sparse`` or dense.
    target
        ``"atac"`` or ``"gex"``.
    predicted_sentences, feature_names
        Optional generated sentences and the target feature names for the token metrics.
    cell_types
        Optional labels for the per-cell-type breakdown.
    chunk_cells
        Cells per chunk (default: about 4 million entries a chunk).

    Returns
    -------
    dict
        ``{"metrics": {...}, "details": {...}[, "by_cell_type": {...}]}`` as :meth:`MetricAccumulator.result`.
    """
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    n_cells, n_features = predictions.shape
    if predicted_sentences is not None and len(predicted_sentences) != n_cells:
        raise ValueError(f"got {len(predicted_sentences)} sentences for {n_cells} cells")
    acc = MetricAccumulator(target, n_cells, n_features, feature_names=feature_names, **accumulator_kwargs)
    references = sp.csr_matrix(references) if sp.issparse(references) else references
    for rows in iter_row_chunks(n_cells, chunk_cells or default_chunk_cells(n_features)):
        acc.update(
            predictions[rows],
            references[rows],
            None if predicted_sentences is None else predicted_sentences[rows],
        )
    return acc.result(cell_types=cell_types)
