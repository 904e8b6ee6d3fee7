"""What a model folder ships: the transformer's readout, the source kernel and the per-feature mean, blended.

Per direction the predicted matrix is ``w_t * transformer + w_k * kernel + w_m * mean`` with weights on the simplex
(``w >= 0``, summing to 1), so it stays in the target's range ([0, 1] ATAC, >= 0 GEX):

- ``transformer``: the calibrated readout of the model (and an ensemble's mean);
- ``kernel``: an RBF kernel ridge regression on the names of the source sentence
  (:class:`translator.source_kernel.SourceKernel`, the regression of ``eval.py``'s ``svd_krr``);
- ``mean``: the per-feature mean of the training cells.

The weights are chosen on held-out cells that none of the parts trained on: the transformer's validation cells, read with
its calibration cross-fitted over parts of those cells; the kernel and the mean fitted on the train cells. With few
validation cells (< :data:`FEW_CELLS`), ``train.py`` gives fold models (:mod:`translator.folds`) whose readings of
every train and validation cell are pooled (``pool``); without them, the kernel's settings and its share against the mean are chosen by k-fold over
the train and validation cells, and the validation cells choose only the transformer's share. Candidates are scored by
RMSE; a candidate that scores a cell worse than the kernel or the mean alone does is refused: its mean per-cell Pearson,
and for ATAC targets its mean per-cell AUROC and average precision, must reach the better of those two parts (flattening
every cell toward the mean is not a win, nor is a lower RMSE bought with a worse ranking of a cell's peaks). When no
candidate reaches both, only the mean's per-cell Pearson is required. Among the allowed candidates within one standard
error of the best (paired over cells), the one with the most weight on the mean is kept. When that is the mean alone, the folder predicts the mean, and a warning says so. Shipped, the kernel
and the mean are fitted again on the train and validation cells.

``readout.json`` records the weights and the held-out scores of each part under ``blend``; the arrays of the kernel and
the mean live in ``blend.safetensors``. ``train.py`` runs :func:`fit_blend` at the end of every training run;
``CellTranslator.predict_matrix`` applies the blend.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .source_kernel import SourceKernel, source_indicator

logger = logging.getLogger(__name__)

BLEND_FILE = "blend.safetensors"
PARTS = ("transformer", "kernel", "mean")
WEIGHT_STEP = 0.05
FEW_CELLS = 100  # fewer validation cells than this: the kernel's part is chosen by k-fold over train + validation
FOLDS = 5
HELD_OUT_CELLS = 1000  # the blend is chosen on at most this many validation cells (evenly spaced)
KFOLD_CELLS = 3000  # the k-fold fits the kernel on at most this many cells (every validation cell, then evenly spaced train cells)
TUNE_SHARE = 0.6  # of a direction's time left after the transformer's readings: the kernel's tuning; the rest, its final fit
MIN_FIT_CELLS = 200
PROBE_FIT_CELLS = 300  # under a time budget, a kernel fit on this many cells times the first fold
CALIBRATION_PARTS = 5  # the transformer's validation readings: its calibration fitted on the other parts of the cells
RANK_CELLS = 300  # ATAC targets: the blend's per-cell AUROC and AP are read on at most this many held-out cells
RANK_ENTRIES = 1 << 24  # ... and at most this many cells x features
MAX_RANK_CHECKS = 30  # candidates whose rank scores one walk of the choice reads at most


# -- choosing the weights -----------------------------------------------------------------------------------------------
@dataclass
class CellStats:
    """Per-cell sums that score any weighting of the parts without the matrices.

    For ``cells x features`` part matrices ``P_j`` and truth ``T``: ``gram[i, j, l] = sum_f P_j P_l``,
    ``cross[i, j] = sum_f P_j T``, ``sums[i, j] = sum_f P_j``, ``truth_sq[i] = sum_f T^2``, ``truth_sum[i] = sum_f T``.
    """

    gram: np.ndarray
    cross: np.ndarray
    sums: np.ndarray
    truth_sq: np.ndarray
    truth_sum: np.ndarray
    n_features: int

    @property
    def n_cells(self) -> int:
        return int(self.truth_sq.shape[0])


def cell_stats(parts: Sequence[np.ndarray | Callable[[slice], np.ndarray]], truth: sp.spmatrix | np.ndarray, chunk_cells: int | None = None) -> CellStats:
    """:class:`CellStats` of ``parts`` against ``truth`` (``[cells, features]``), ``chunk_cells`` cells at a time.

    A part is a ``[cells, features]`` array, a ``[features]`` vector (the same for every cell), or a function of a row
    slice giving those rows.
    """
    truth = sp.csr_matrix(truth) if sp.issparse(truth) else np.asarray(truth)
    n_cells, n_features = truth.shape
    k = len(parts)
    chunk_cells = chunk_cells or max(1, (1 << 22) // max(n_features, 1))
    gram, cross, sums = np.zeros((n_cells, k, k)), np.zeros((n_cells, k)), np.zeros((n_cells, k))
    truth_sq, truth_sum = np.zeros(n_cells), np.zeros(n_cells)
    for begin in range(0, n_cells, chunk_cells):
        rows = slice(begin, min(begin + chunk_cells, n_cells))
        t = np.asarray(truth[rows].toarray() if sp.issparse(truth) else truth[rows], dtype=np.float64)
        block = np.empty((k, t.shape[0], n_features))
        for j, part in enumerate(parts):
            values = part(rows) if callable(part) else (part if np.ndim(part) == 1 else part[rows])
            block[j] = np.broadcast_to(np.asarray(values, dtype=np.float64), t.shape)
        gram[rows] = np.einsum("jif,lif->ijl", block, block)
        cross[rows] = np.einsum("jif,if->ij", block, t)
        sums[rows] = block.sum(axis=2).T
        truth_sq[rows] = np.einsum("if,if->i", t, t)
        truth_sum[rows] = t.sum(axis=1)
    return CellStats(gram, cross, sums, truth_sq, truth_sum, n_features)


def score_weights(stats: CellStats, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(squared error, Pearson)`` of each cell (rows) under each weighting (columns; ``weights`` ``[candidates, parts]``).

    Pearson is NaN for cells whose truth is constant, 0 for a prediction constant over the features.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    quad = np.einsum("mj,ijl,ml->im", weights, stats.gram, weights)
    lin = stats.cross @ weights.T
    squared = np.maximum(quad - 2.0 * lin + stats.truth_sq[:, None], 0.0)
    f = float(stats.n_features)
    pred_sum = stats.sums @ weights.T
    cov = lin - pred_sum * stats.truth_sum[:, None] / f
    var_pred = quad - pred_sum**2 / f
    var_truth = (stats.truth_sq - stats.truth_sum**2 / f)[:, None]
    scale = np.maximum(np.abs(quad), 1e-300)
    ok = (var_pred > 1e-10 * scale) & (var_truth > 0)
    pearson = np.zeros_like(cov)
    pearson[ok] = cov[ok] / np.sqrt((var_pred * var_truth)[ok])
    pearson[np.broadcast_to(var_truth <= 0, pearson.shape)] = np.nan
    return squared, np.clip(pearson, -1.0, 1.0)


def check_weight_step(step: float) -> None:
    """Refuse a step of the weights' grid that does not divide 1."""
    n = round(1.0 / step) if step > 0 else 0
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"--weight_step must divide 1 (e.g. 0.05 or 0.1), got {step}")


def simplex_grid(n_parts: int, step: float = WEIGHT_STEP) -> np.ndarray:
    """Every weighting of ``n_parts`` parts on the simplex with the given step (``[candidates, n_parts]``)."""
    check_weight_step(step)
    n = round(1.0 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=n_parts - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in points], dtype=np.float64) / n


def choose_weights(stats: CellStats, candidates: np.ndarray, mean_part: int, references: Sequence[int] | None = None,
                   rank_scores: Callable[[np.ndarray], dict[str, float]] | None = None) -> dict:
    """Pick one weighting of the parts by held-out RMSE, refusing any that ranks a cell's features worse than a reference part.

    Parameters
    ----------
    stats
        The held-out cells' :class:`CellStats`.
    candidates
        ``[candidates, parts]`` weightings; the mean alone (weight 1 on ``mean_part``) is added when missing.
    mean_part
        The index of the per-feature mean among the parts.
    references
        The parts a candidate must match (the mean always among them): its mean per-cell Pearson, and each score of
        ``rank_scores``, at least the best of these parts alone. When no candidate matches all of them, only the
        mean's per-cell Pearson is required.
    rank_scores
        Optional: a weighting's mean per-cell rank scores (``{"auroc": ..., "ap": ...}`` for ATAC targets), asked
        only of the candidates the choice reaches.

    Returns
    -------
    ``weights`` (the chosen row), ``rmse`` and ``pearson`` of the chosen, ``best`` (the lowest RMSE allowed), and
    ``mean_rmse`` / ``mean_pearson``. Among the allowed candidates within one standard error (paired over cells) of
    the best RMSE, the chosen one has the most weight on the mean, then the lowest RMSE.
    """
    candidates = np.asarray(candidates, dtype=np.float64)
    n_parts = candidates.shape[1]
    mean_only = np.eye(n_parts)[mean_part]
    if not np.any(np.all(np.isclose(candidates, mean_only), axis=1)):
        candidates = np.vstack([candidates, mean_only])
    mean_index = int(np.flatnonzero(np.all(np.isclose(candidates, mean_only), axis=1))[0])
    references = sorted({mean_part, *(references or ())})
    squared, pearson = score_weights(stats, np.vstack([candidates, np.eye(n_parts)[references]]))
    squared, reference_pearson, pearson = squared[:, :len(candidates)], pearson[:, len(candidates):], pearson[:, :len(candidates)]
    n_cells = stats.n_cells
    rmse = np.sqrt(squared.sum(axis=0) / (n_cells * stats.n_features))
    scored = ~np.isnan(pearson[:, mean_index])
    mean_pearson = pearson[scored].mean(axis=0) if scored.any() else np.zeros(len(candidates))
    floor = reference_pearson[scored].mean(axis=0).max() if scored.any() else 0.0
    beats_mean = mean_pearson >= mean_pearson[mean_index] - 1e-12
    beats_mean[mean_index] = True
    ranked: dict[tuple, dict[str, float]] = {}

    def ranks(w: np.ndarray) -> dict[str, float]:
        key = tuple(np.round(w, 10))
        if key not in ranked:
            ranked[key] = rank_scores(w)
        return ranked[key]

    rank_floor = {}
    if rank_scores is not None:
        of_references = [ranks(np.eye(n_parts)[r]) for r in references]
        rank_floor = {key: max(r[key] for r in of_references) for key in of_references[0]}

    def matches(i: int) -> bool:
        return all(ranks(candidates[i])[key] >= value - 1e-12 for key, value in rank_floor.items())

    # Rank scores cost a sort of every held-out cell: at most MAX_RANK_CHECKS candidates are read per walk.
    cap = MAX_RANK_CHECKS if rank_scores is not None else len(candidates)
    allowed = mean_pearson >= floor - 1e-12
    by_rmse = [int(i) for i in np.argsort(rmse, kind="stable") if allowed[i]]
    best = next((i for i in by_rmse[:cap] if matches(i)), None)
    if best is None:  # the references alone, where they are candidates
        best = next((i for i in by_rmse if np.count_nonzero(candidates[i]) == 1 and int(np.argmax(candidates[i])) in references and matches(i)), None)
    guarded = best is not None
    if not guarded:
        allowed, matches = beats_mean, lambda i: True
        best = int(np.flatnonzero(allowed)[np.argmin(rmse[allowed])])
    diff = squared - squared[:, [best]]
    excess = diff.mean(axis=0)
    se = diff.std(axis=0, ddof=1) / np.sqrt(n_cells) if n_cells > 1 else np.zeros(len(candidates))
    near = allowed & (excess <= se)
    order = [int(i) for i in np.lexsort((rmse, -candidates[:, mean_part])) if near[i]]
    chosen = next((i for i in order[:cap] if i == best or matches(i)), best)
    out = {"weights": candidates[chosen], "rmse": float(rmse[chosen]), "pearson": float(mean_pearson[chosen]),
           "best_weights": candidates[best], "best_rmse": float(rmse[best]),
           "mean_rmse": float(rmse[mean_index]), "mean_pearson": float(mean_pearson[mean_index]), "matches_references": guarded}
    if rank_scores is not None:
        out["ranks"] = ranks(candidates[chosen])
        out["reference_ranks"] = rank_floor
    return out


def scores_of(stats: CellStats, weights: np.ndarray) -> tuple[float, float]:
    """Held-out ``(RMSE, mean per-cell Pearson)`` of one weighting of the parts."""
    squared, pearson = score_weights(stats, weights)
    scored = ~np.isnan(pearson[:, 0])
    return float(np.sqrt(squared.sum() / (stats.n_cells * stats.n_features))), float(pearson[scored, 0].mean()) if scored.any() else 0.0


# -- the shipped blend ----------------------------------------------------------------------------------------------------
@dataclass
class DirectionBlend:
    """One direction's shipped blend: ``weights`` over :data:`PARTS`, the fitted kernel and the per-feature mean."""

    weights: dict[str, float]
    kernel: SourceKernel | None = None
    mean: np.ndarray | None = None

    @property
    def needs_transformer(self) -> bool:
        return self.weights.get("transformer", 0.0) > 0

    def combine(self, transformer: np.ndarray | None, source: sp.csr_matrix, in_place: bool = False) -> np.ndarray:
        """The blended matrix (float32) from the transformer's matrix and the source-name indicator of the same cells.

        ``in_place``: written over ``transformer`` (a C-contiguous float32 array the caller no longer needs). The parts are
        added tile by tile (:func:`translator.metrics_core.iter_tiles`): the kernel's values are made one tile at a time,
        never as a whole ``[cells, features]`` array.
        """
        import torch

        from .metrics_core import iter_tiles

        use = {part: float(np.float32(self.weights.get(part, 0.0))) for part in PARTS}
        shape = (source.shape[0], self._n_features(transformer))
        if use["transformer"] > 0 and in_place and transformer.dtype == np.float32 and transformer.flags.c_contiguous and transformer.flags.writeable:
            out, given = transformer, None
        else:
            out = np.empty(shape, dtype=np.float32)
            given = torch.from_numpy(np.asarray(transformer, dtype=np.float32)) if use["transformer"] > 0 else None
        latent = torch.from_numpy(self.kernel.latent(source).astype(np.float32)) if use["kernel"] > 0 else None
        mean = torch.from_numpy(use["mean"] * self.mean.astype(np.float32)) if use["mean"] > 0 else None
        matrix = torch.from_numpy(out)
        for rows, columns in iter_tiles(*shape):
            tile = matrix[rows, columns]
            if given is not None:
                tile.copy_(given[rows, columns])
            if use["transformer"] > 0:
                tile.mul_(use["transformer"])
            else:
                tile.zero_()
            if latent is not None:
                tile.add_(self.kernel.tile(latent[rows], columns), alpha=use["kernel"])
            if mean is not None:
                tile.add_(mean[columns])
        return out

    def _n_features(self, transformer: np.ndarray | None) -> int:
        if transformer is not None:
            return transformer.shape[1]
        if self.mean is not None:
            return len(self.mean)
        return self.kernel.arrays["target_mean"].shape[0]


def load_blend(folder: Path, readout: dict) -> dict[str, DirectionBlend]:
    """``{direction: DirectionBlend}`` from ``readout.json``'s ``blend`` (arrays from ``blend.safetensors``), or from a
    ``source_kernel`` record (``python -m translator.stack``: ``(1 - w) * model + w * kernel``)."""
    from safetensors.numpy import load_file

    from .source_kernel import load_kernels

    records = (readout or {}).get("blend")
    if not records:
        return {d: DirectionBlend({"transformer": 1.0 - w, "kernel": w, "mean": 0.0}, kernel)
                for d, (w, kernel) in load_kernels(folder, (readout or {}).get("source_kernel")).items()}
    path = folder / BLEND_FILE
    needs_arrays = any(r["weights"].get("kernel", 0) > 0 or r["weights"].get("mean", 0) > 0 for r in records.values())
    if needs_arrays and not path.exists():
        raise FileNotFoundError(f"model folder {folder} names a blend but lacks {BLEND_FILE}; copy the whole folder")
    arrays = load_file(str(path)) if needs_arrays else {}
    out = {}
    for direction, record in records.items():
        weights = {p: float(record["weights"].get(p, 0.0)) for p in PARTS}
        kernel = mean = None
        if weights["kernel"] > 0:
            prefix = f"{direction}.kernel."
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            settings = record["kernel"]
            kernel = SourceKernel(mine, settings["source"], settings["target"], settings["gamma"], settings["scale"])
        if weights["mean"] > 0:
            mean = np.asarray(arrays[f"{direction}.mean"], dtype=np.float32)
        out[direction] = DirectionBlend(weights, kernel, mean)
    return out


def summary_lines(readout: dict) -> list[str]:
    """One line per direction: the held-out RMSE and per-cell Pearson of the blend and its parts, and the weights."""
    lines = []
    for direction, record in (readout or {}).get("blend", {}).items():
        held, w = record["held_out"], record["weights"]
        rmse, pearson = held["rmse"], held["pearson"]
        lines.append(f"{direction} held-out RMSE ({held['cells']} cells): blend {rmse['blend']:.6f}, mean {rmse['mean']:.6f}, "
                     f"kernel {rmse['kernel']:.6f}, transformer {rmse['transformer']:.6f}; per-cell Pearson: blend {pearson['blend']:.4f}, "
                     f"mean {pearson['mean']:.4f}, kernel {pearson['kernel']:.4f}, transformer {pearson['transformer']:.4f}; "
                     f"weights transformer {w['transformer']:.2f}, kernel {w['kernel']:.2f}, mean {w['mean']:.2f}")
    return lines


def card_text(readout: dict) -> str:
    """The model card's paragraph on the shipped predictor: per direction, its weights and held-out scores against its parts."""
    records = (readout or {}).get("blend")
    if not records:
        return ("The per-feature values are the transformer's calibrated readout alone: there were no held-out cells to check it "
                "against the per-feature mean.")
    pooled = next((r["held_out"]["pooled_from"] for r in records.values() if r["held_out"].get("pooled_from")), None)
    where = (f"the train and validation cells, each read by one of {len(pooled)} fold models of the same recipe and scored against a kernel "
             "and a mean, all fitted without it") if pooled else "validation cells that none of the parts was fitted on"
    lines = ["Per-feature values are `w_t * transformer + w_k * kernel + w_m * mean`: the transformer's calibrated readout, an RBF "
             "kernel ridge regression on the names of the source sentence, and the per-feature mean of the training cells. The weights "
             f"were chosen on {where} (`readout.json`, `blend`).", "",
             "| direction | weights (transformer / kernel / mean) | held-out cells | RMSE: blend / mean / kernel / transformer "
             "| per-cell Pearson: blend / mean / kernel / transformer |", "|---|---|---|---|---|"]
    for direction, record in records.items():
        w, held = record["weights"], record["held_out"]
        rmse, pearson = held["rmse"], held["pearson"]
        lines.append(f"| {direction} | {w['transformer']:.2f} / {w['kernel']:.2f} / {w['mean']:.2f} | {held['cells']} | "
                     + " / ".join(f"{rmse[k]:.4f}" for k in ("blend", "mean", "kernel", "transformer")) + " | "
                     + " / ".join(f"{pearson[k]:.3f}" for k in ("blend", "mean", "kernel", "transformer")) + " |")
    fallback = [d for d, r in records.items() if r.get("predicts_the_mean")]
    if fallback:
        lines += ["", f"**Warning:** in {', '.join(fallback)} no blend of the transformer and the kernel beat the per-feature mean on the "
                  "held-out cells, so this model predicts the per-feature mean there."]
    return "\n".join(lines)


# -- fitting a model folder's blend -----------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Cells a reader did not train on (``validation``) and the cells it did (``train``): :func:`dataset_builder.records.load_split_matrices`
    dicts. The reader is the model folder itself, or a cross-validation fold model read with the folder's calibration."""

    reader: object
    train: dict
    validation: dict


def _transformer_readings(held: Sequence[HeldOut], ids: Sequence[list[np.ndarray]], direction: str, batch_size: int, seed: int) -> tuple[list[np.ndarray], str]:
    """The transformer's calibrated matrices of the held-out cells, each part of the cells (pooled over the readers) read with the
    calibration fitted on the other parts: the shipped calibration was fitted on these very cells."""
    from .data import TARGET_MODALITY
    from .readout import cross_fitted_readout, decode_features, is_profile, with_row_stats

    target = TARGET_MODALITY[direction]
    params = (held[0].reader.readout.get("calibration") or {}).get(direction)
    n = sum(len(x) for x in ids)

    def in_sample(how: str) -> tuple[list[np.ndarray], str]:
        return [h.reader._predict_ids(x, direction, batch_size, need_sentences=False, precision="float32")[0] for h, x in zip(held, ids, strict=True)], how

    if params is None:
        return in_sample("uncalibrated")
    if any(h.reader.members for h in held) or n < 2 * CALIBRATION_PARTS:
        return in_sample("calibration in-sample")
    parts = []
    for h, x in zip(held, ids, strict=True):
        features, _ = decode_features(h.reader.model, h.reader.tokenizer, h.reader.meta, x, direction, h.reader.ranges[target],
                                      h.reader.max_target_length, batch_size, decode=not is_profile(params), profile_head=h.reader.profile_head)
        parts.append(with_row_stats(features, h.reader.meta, len(x)) if len(held) > 1 else features)
    features = {key: np.concatenate([np.asarray(f[key]) for f in parts]) for key in parts[0]}
    dense = sp.vstack([h.validation[target] for h in held]).toarray()
    out = np.empty(dense.shape, dtype=np.float32)
    for rows, prediction in cross_fitted_readout(features, dense, direction, held[0].reader.meta, params["aggregation"], CALIBRATION_PARTS, seed):
        if prediction is None:  # a part whose other parts are all 0 or all 1
            return in_sample("calibration in-sample")
        out[rows] = prediction
    bounds = np.cumsum([0, *(len(x) for x in ids)])
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], f"calibration cross-fitted over {CALIBRATION_PARTS} parts"


def _refit_kernel(src: str, tgt: str, settings: tuple, x: sp.csr_matrix, y: sp.csr_matrix, grid: dict, max_landmarks: int, seed: int):
    """``svd_krr`` with the chosen ``(n_components, gamma_scale, alpha)`` fitted on ``x`` / ``y`` (embedding as wide as when tuned)."""
    from .source_kernel import SvdKrrBaseline

    n_components, gamma_scale, alpha = settings
    model = SvdKrrBaseline(src, tgt, n_components=n_components, gamma_scale=gamma_scale, alpha=alpha, max_landmarks=max_landmarks, seed=seed)
    return model.refit(x, y, embed_components=max(grid["n_components"]))


def _predict(model, x: sp.csr_matrix) -> np.ndarray:
    return np.vstack(list(model.predict_chunks(x))).astype(np.float32)


def _pooled_settings(src: str, tgt: str, folds: Sequence[tuple], grid: dict, max_landmarks: int, seed: int,
                     deadline: float | None = None, pace: float | None = None) -> tuple[tuple, list]:
    """The kernel settings with the lowest squared error pooled over ``folds`` (``(x_fit, y_fit, x_held, y_held)``) among those
    every fold tried, and each fold's tuned kernel.

    With ``deadline``, each fold tunes within an equal share of the time left, on as many of its fit cells as that share
    allows at the pace measured so far (``pace``, seconds a fit cell; when not given, a small fit times it before the
    first fold); every held cell is still predicted.
    """
    from .source_kernel import SvdKrrBaseline

    sse: dict[tuple, float] = {}
    tuned = []
    for i, (x_fit, y_fit, x_held, y_held) in enumerate(folds):
        share = None
        if deadline is not None:
            now = time.perf_counter()
            share = now + max(0.0, deadline - now) / (len(folds) - i)
            if pace is None and x_fit.shape[0] > PROBE_FIT_CELLS:
                pace = _probe_pace(src, tgt, x_fit, y_fit, grid, max_landmarks, seed)
            rows = _affordable_rows(x_fit.shape[0], pace, share)
            if rows is not None:
                logger.info("time budget: the kernel is tuned on %d of %d cells", len(rows), x_fit.shape[0])
                x_fit, y_fit = x_fit[rows], y_fit[rows]
        model, trials = SvdKrrBaseline.tune(src, tgt, (x_fit, y_fit), (x_held, y_held), grid=grid, max_landmarks=max_landmarks, seed=seed, deadline=share)
        pace = model.seconds_per_cell
        tuned.append(model)
        for t in trials:
            key = (t["n_components"], t["gamma_scale"], t["alpha"])
            sse[key] = sse.get(key, 0.0) + t["validation_rmse"] ** 2 * x_held.shape[0]
    common = [key for key in sse if all(key in model.fitted for model in tuned)]
    return min(common, key=sse.get), tuned


def _probe_pace(src: str, tgt: str, x: sp.csr_matrix, y: sp.csr_matrix, grid: dict, max_landmarks: int, seed: int) -> float:
    """Seconds a cell of tuning one kernel width: fitting on :data:`PROBE_FIT_CELLS` cells of ``x`` / ``y`` and predicting
    as many others (fewer when there are fewer), timed."""
    from .source_kernel import SvdKrrBaseline

    m = max(1, min(PROBE_FIT_CELLS, x.shape[0] // 2))
    started = time.perf_counter()
    SvdKrrBaseline.tune(src, tgt, (x[:m], y[:m]), (x[m:2 * m], y[m:2 * m]), grid=grid, max_landmarks=max_landmarks, seed=seed, deadline=started)
    return (time.perf_counter() - started) / m


def _held_kernel(src: str, tgt: str, folds: Sequence[tuple], grid: dict, max_landmarks: int, seed: int,
                 deadline: float | None = None) -> tuple[tuple, list[np.ndarray], list[np.ndarray], object]:
    """The kernel settings pooled over ``folds``, each fold's held cells as predicted by the kernel and the mean of its fit
    cells, and the first fold's tuned kernel (its ``fit_seconds`` prices a refit)."""
    settings, tuned = _pooled_settings(src, tgt, folds, grid, max_landmarks, seed, deadline)
    kernels, means = zip(*_held_predictions(folds, tuned, settings), strict=True)
    return settings, list(kernels), list(means), tuned[0]


def _held_predictions(folds: Sequence[tuple], tuned: Sequence, settings: tuple) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fold by fold: its held cells as predicted by its kernel with ``settings``, and the mean of its fit cells."""
    for (_, y_fit, x_held, _), model in zip(folds, tuned, strict=True):
        yield _predict(model.use(settings), x_held), np.asarray(y_fit.mean(axis=0), dtype=np.float32).ravel()


def _merge(stats: Sequence[CellStats]) -> CellStats:
    return CellStats(*(np.concatenate([getattr(s, name) for s in stats]) for name in ("gram", "cross", "sums", "truth_sq", "truth_sum")),
                     n_features=stats[0].n_features)


def _kfold_kernel(src: str, tgt: str, x: sp.csr_matrix, y: sp.csr_matrix, n_val: int, grid: dict, max_landmarks: int, seed: int,
                  step: float, deadline: float | None = None, folds: int = FOLDS,
                  pace: float | None = None) -> tuple[tuple, float, np.ndarray, np.ndarray, dict, object]:
    """Few validation cells: the kernel's settings and its weight against the mean by k-fold over ``x``/``y`` (train then
    validation rows). Returns the settings, the kernel weight, the out-of-fold kernel and mean matrices of the last ``n_val``
    rows (the validation cells), and the record."""
    n = x.shape[0]
    n_folds = min(folds, n)
    fold = np.random.default_rng(seed).permutation(n) % n_folds
    splits = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(n_folds)]
    folds_xy = [(x[rest], y[rest], x[held], y[held]) for rest, held in splits]
    settings, tuned = _pooled_settings(src, tgt, folds_xy, grid, max_landmarks, seed, deadline, pace)
    # One fold's predictions at a time: only the validation rows are kept.
    kernel_oof, mean_oof = np.empty((n_val, y.shape[1]), np.float32), np.empty((n_val, y.shape[1]), np.float32)
    stats = []
    for (_, held), (k, m) in zip(splits, _held_predictions(folds_xy, tuned, settings), strict=True):
        stats.append(cell_stats([k, m], y[held]))
        val = held >= n - n_val
        kernel_oof[held[val] - (n - n_val)] = k[val]
        mean_oof[held[val] - (n - n_val)] = m
    choice = choose_weights(_merge(stats), simplex_grid(2, step), mean_part=1)
    first = tuned[0]
    record = {"folds": n_folds, "cells": int(n), "kernel_weight": float(choice["weights"][0]), "rmse": choice["rmse"], "mean_rmse": choice["mean_rmse"]}
    return settings, float(choice["weights"][0]), kernel_oof, mean_oof, record, first


def rank_scorer(parts: Sequence[Sequence[np.ndarray]], truth: Sequence[sp.csr_matrix], max_cells: int = RANK_CELLS) -> tuple[Callable[[np.ndarray], dict[str, float]], int]:
    """A function of a weighting of ``parts`` giving the blend's mean per-cell AUROC and average precision (ATAC targets)
    on at most ``max_cells`` evenly spaced held-out cells (fewer for wide targets), and that number of cells.

    ``parts``: per part, one matrix per held-out group (``[cells, features]``, or a ``[features]`` vector for every cell);
    ``truth``: the groups' target matrices.
    """
    from .metrics_core import rowwise_auroc_ap

    bounds = np.cumsum([0, *(y.shape[0] for y in truth)])
    n_features = truth[0].shape[1]
    rows = _rows(int(bounds[-1]), min(max_cells, max(1, RANK_ENTRIES // max(n_features, 1))))
    group = np.searchsorted(bounds, rows, side="right") - 1
    stacked = np.empty((len(parts), len(rows), n_features), dtype=np.float32)
    for j, matrices in enumerate(parts):
        for g in np.unique(group):
            mine = rows[group == g] - bounds[g]
            values = matrices[g]
            stacked[j, group == g] = np.broadcast_to(values, (len(mine), n_features)) if np.ndim(values) == 1 else values[mine]
    labels = sp.vstack([truth[g][rows[group == g] - bounds[g]] for g in np.unique(group)]).toarray() > 0

    def scores(weights: np.ndarray) -> dict[str, float]:
        blend = np.tensordot(np.asarray(weights, dtype=np.float32), stacked, axes=1)
        auroc, ap = rowwise_auroc_ap(blend, labels)
        with np.errstate(invalid="ignore"):
            return {"auroc": float(np.nanmean(auroc)), "ap": float(np.nanmean(ap))}

    return scores, len(rows)


def held_out_cells(n_validation: int) -> int:
    """The cells whose matrices the blend's choice holds at once, for a dataset with ``n_validation`` validation cells: the
    held-out cells, and one fold of the k-fold when they are few (:func:`translator.training.estimate_memory`)."""
    n = min(n_validation, HELD_OUT_CELLS)
    return n + (-(-KFOLD_CELLS // FOLDS) if n < FEW_CELLS else 0)


def _affordable_rows(n: int, pace: float | None, deadline: float | None) -> np.ndarray | None:
    """Evenly spaced rows of ``n`` fit cells whose kernel fit ends by ``deadline`` at ``pace`` seconds a cell (time about
    proportional to cells), at least :data:`MIN_FIT_CELLS`; None: every cell."""
    if deadline is None or pace is None:
        return None
    cap = max(MIN_FIT_CELLS, int(max(0.0, deadline - time.perf_counter()) / max(pace, 1e-12)))
    return None if cap >= n else _rows(n, cap)


def _rows(n: int, cap: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, max(1, min(n, cap))).round().astype(np.int64))


def fit_direction(held: Sequence[HeldOut], fit: Sequence[dict], direction: str, batch_size: int = 64, seed: int = 0, grid: dict | None = None,
                  max_landmarks: int = 1000, step: float = WEIGHT_STEP, few_cells: int = FEW_CELLS,
                  deadline: float | None = None) -> tuple[dict, DirectionBlend]:
    """Choose and fit one direction's blend (see the module docstring): returns ``readout.json``'s record and the blend.

    ``held``: the held-out cells and their readers (one: the folder and its validation cells; several: cross-validation
    fold models). ``fit``: the cells the shipped kernel and mean are fitted on (:func:`dataset_builder.records.load_split_matrices`).
    ``deadline`` (a ``time.perf_counter()`` value): after the transformer's readings, the kernel's settings are tuned in
    :data:`TUNE_SHARE` of the time left (fewer kernel widths when short), and the shipped kernel is fitted on as many of
    the fit cells as the rest allows at the pace the tuning measured (every cell when there is time).
    """
    from dataset_builder.records import source_sentences

    from .data import SOURCE_MODALITY, TARGET_MODALITY
    from .source_kernel import KRR_GRID

    src, tgt = SOURCE_MODALITY[direction], TARGET_MODALITY[direction]
    grid = grid or KRR_GRID
    top = held[0].reader

    def encoded(reader, data) -> tuple[list[np.ndarray], sp.csr_matrix]:
        ids = reader.encode_sources(source_sentences(data, direction, reader.meta), direction, allow_empty=True)
        return ids, source_indicator(ids, reader.ranges[src])

    val_ids, x_val = zip(*(encoded(h.reader, h.validation) for h in held), strict=True)
    x_train = [encoded(h.reader, h.train)[1] for h in held]
    y_train, y_val = [h.train[tgt] for h in held], [h.validation[tgt] for h in held]
    n_val = sum(x.shape[0] for x in x_val)
    transformer, readings = _transformer_readings(held, val_ids, direction, batch_size, seed)
    tune_by = None if deadline is None else time.perf_counter() + TUNE_SHARE * max(0.0, deadline - time.perf_counter())
    kfold = None
    if n_val >= few_cells or len(held) > 1:
        settings, kernel_val, mean_val, tuned = _held_kernel(src, tgt, list(zip(x_train, y_train, x_val, y_val, strict=True)), grid, max_landmarks,
                                                             seed, tune_by)
        candidates = simplex_grid(3, step)
        selection = f"simplex grid, step {step:g}, on {n_val} held-out cells"
    else:
        cells, folds, pace = KFOLD_CELLS, FOLDS, None
        if tune_by is not None:  # each fold costs about a probe (wide targets) plus its cells at the probe's pace
            started = time.perf_counter()
            pace = _probe_pace(src, tgt, x_train[0], y_train[0], grid, max_landmarks, seed)
            left = max(0.0, tune_by - time.perf_counter())
            folds = int(np.clip(left // (time.perf_counter() - started), 2, FOLDS))
            cells = min(cells, max(n_val + MIN_FIT_CELLS, int(left / (folds * pace))))
            if (cells, folds) != (KFOLD_CELLS, FOLDS):
                logger.info("time budget: the kernel's k-fold runs %d folds on at most %d train and validation cells", folds, cells)
        rows = _rows(x_train[0].shape[0], cells - n_val)
        x_all, y_all = sp.vstack([x_train[0][rows], x_val[0]]).tocsr(), sp.vstack([y_train[0][rows], y_val[0]]).tocsr()
        settings, v, kernel, mean, kfold, tuned = _kfold_kernel(src, tgt, x_all, y_all, n_val, grid, max_landmarks, seed, step, tune_by, folds, pace)
        kernel_val, mean_val = [kernel], [mean]
        u = np.round(np.arange(0.0, 1.0 + step / 2, step), 10)[:, None]
        candidates = np.hstack([u, (1 - u) * v, (1 - u) * (1 - v)])
        selection = (f"kernel against mean by {kfold['folds']}-fold over {kfold['cells']} train and validation cells, "
                     f"the transformer's share (step {step:g}) on {n_val} held-out cells")
    stats = _merge([cell_stats([t, k, m], y) for t, k, m, y in zip(transformer, kernel_val, mean_val, y_val, strict=True)])
    ranks, rank_cells = rank_scorer([transformer, kernel_val, mean_val], y_val) if tgt == "atac" else (None, 0)
    choice = choose_weights(stats, candidates, mean_part=2, references=(1, 2), rank_scores=ranks)
    weights = {p: round(float(w), 10) for p, w in zip(PARTS, choice["weights"], strict=True)}
    alone = {"transformer": (1.0, 0.0, 0.0), "kernel": (0.0, 1.0, 0.0), "mean": (0.0, 0.0, 1.0)}
    scores = {name: scores_of(stats, np.array(w)) for name, w in alone.items()}
    scores["blend"] = (choice["rmse"], choice["pearson"])
    held_out = {"cells": int(n_val), "transformer_readings": readings, "selection": selection,
                "rmse": {name: s[0] for name, s in scores.items()}, "pearson": {name: s[1] for name, s in scores.items()}}
    if ranks is not None:
        of_parts = {"blend": choice["ranks"], **{name: ranks(np.array(w)) for name, w in alone.items()}}
        held_out["rank_cells"] = rank_cells
        for key in ("auroc", "ap"):
            held_out[key] = {name: s[key] for name, s in of_parts.items()}
    if not choice["matches_references"]:
        logger.info("%s: no weighting matched both the kernel and the mean alone on every per-cell score; chosen among those "
                    "matching the mean's per-cell Pearson", direction)
    if len(held) > 1:
        held_out["pooled_from"] = [int(x.shape[0]) for x in x_val]

    # Shipped: the kernel and the mean fitted again on the fit cells (the train and validation cells of the folder's dataset).
    x_fit = sp.vstack([encoded(top, d)[1] for d in fit]).tocsr()
    y_fit = sp.vstack([d[tgt] for d in fit]).tocsr()
    mean = np.asarray(y_fit.mean(axis=0), dtype=np.float32).ravel()
    kernel, kernel_record = None, None
    if weights["kernel"] > 0:
        fitted = shipped_kernel(tuned, settings, x_fit, y_fit, grid, max_landmarks, seed, deadline)
        kernel = SourceKernel.from_baseline(fitted)
        kernel_record = {**kernel.settings(), "gamma_scale": settings[1], "alpha": settings[2], "fit_cells": int(fitted.embedding_cells)}
    record = {"weights": weights, "held_out": held_out, "kernel": kernel_record, "mean_fit_cells": int(y_fit.shape[0]),
              "predicts_the_mean": weights["mean"] == 1.0}
    if kfold:
        record["kernel_against_mean"] = kfold
    return record, DirectionBlend(weights, kernel, mean if weights["mean"] > 0 else None)


def shipped_kernel(tuned, settings: tuple, x_fit: sp.csr_matrix, y_fit: sp.csr_matrix, grid: dict, max_landmarks: int, seed: int,
                   deadline: float | None = None):
    """The kernel the folder ships: ``settings`` fitted again on the fit cells, on as many of them as ``deadline`` allows
    at the pace the tuning measured; when that is fewer cells than the ``tuned`` kernel (the one whose held-out
    predictions chose the blend's weights) was fitted on, that kernel itself, as it was scored."""
    rows = _affordable_rows(x_fit.shape[0], tuned.seconds_per_cell, deadline)
    if rows is not None and len(rows) < tuned.embedding_cells:
        logger.info("time budget: the kernel is shipped as tuned on %d cells (a refit could use %d of %d)", tuned.embedding_cells, len(rows), x_fit.shape[0])
        return tuned.use(settings)
    if rows is not None:
        logger.info("time budget: the kernel is fitted on %d of %d cells", len(rows), x_fit.shape[0])
        x_fit, y_fit = x_fit[rows], y_fit[rows]
    return _refit_kernel(tuned.source, tuned.target, settings, x_fit, y_fit, grid, max_landmarks, seed)


def _held_out(folder: Path, dataset_dir, pool: Sequence[tuple], calibration: dict, max_cells: int, max_train_cells: int) -> list[HeldOut]:
    """The held-out cells and their readers: the folder and its dataset's validation cells, or each pool member (a fold
    model read with the folder's calibration) and its dataset's validation cells."""
    from dataset_builder.records import load_split_matrices

    from .api import CellTranslator

    top = CellTranslator.from_pretrained(folder)
    top.blend = {}  # the parts as they are, without any blend the folder holds already
    held = []
    for pool_model, pool_data in pool or [(folder, dataset_dir)]:
        if Path(pool_model).resolve() == folder.resolve():
            reader = top
        else:
            reader = CellTranslator.from_pretrained(pool_model)
            reader.readout = {**reader.readout, "calibration": calibration}
            reader.blend, reader.members = {}, []
        held.append(HeldOut(reader, load_split_matrices(pool_data, "train", max_train_cells), load_split_matrices(pool_data, "validation", max_cells)))
    return held


def _write_blend(folder: Path, readout: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write the blend into the folder: ``blend.safetensors`` (none when no direction needs arrays), ``readout.json``, the card's section."""
    from safetensors.numpy import save

    from dataset_builder.outputs import write_text_atomic

    from .card import set_card_section
    from .readout import READOUT_FILE
    from .source_kernel import KERNEL_FILE

    readout.pop("source_kernel", None)
    if arrays:
        write_text_atomic(folder / BLEND_FILE, save(arrays))
    write_text_atomic(folder / READOUT_FILE, json.dumps(readout, indent=2))
    if not arrays:
        (folder / BLEND_FILE).unlink(missing_ok=True)
    (folder / KERNEL_FILE).unlink(missing_ok=True)  # a two-part stack's kernel, superseded by blend.safetensors
    set_card_section(folder / "README.md", "The shipped predictor", card_text(readout))


def fit_blend(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, directions: Sequence[str] | None = None, batch_size: int = 64,
              seed: int = 0, pool: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (), max_cells: int = HELD_OUT_CELLS,
              max_train_cells: int = 20000, grid: dict | None = None, max_landmarks: int = 1000, step: float = WEIGHT_STEP,
              few_cells: int = FEW_CELLS, require_held_out: bool = False, max_seconds: float | None = None) -> dict:
    """Choose and fit the blend of a trained model folder, and write it into the folder.

    Parameters
    ----------
    model_dir
        A folder written by ``train.py`` (or ``translator.ensemble``).
    dataset_dir
        The dataset it was trained on. Its validation cells (at most ``max_cells``, evenly spaced) are the held-out cells,
        read by the folder; the kernel and the mean are fitted on its train cells (at most ``max_train_cells``) and, shipped,
        on its train and validation cells.
    pool
        ``(MODEL, DATASET_DIR)`` pairs (cross-validation fold models): the held-out cells are then each ``DATASET_DIR``'s
        validation cells as ``MODEL`` reads them with the folder's calibration, against a kernel and mean fitted on its
        train cells (a folder trained on every cell has no validation cells of its own).
    directions
        Default: every calibrated direction.
    require_held_out
        Without held-out cells (no ``pool``, no validation split), raise ``ValueError`` instead of a warning.
    max_seconds
        A time budget from the call to the folder written (None: none), shared equally by the directions left: each tunes
        its kernel and fits the shipped one within its share (:func:`fit_direction`). The transformer's readings of the
        held-out cells are not cut here: bound them with ``max_cells``.

    Returns
    -------
    ``readout.json``'s new ``blend`` entry (``{direction: record}``); empty, with a warning, when there are no held-out
    cells. The folder changes only at the end: ``blend.safetensors``, ``readout.json``, then the card's section on the
    shipped predictor (``README.md``, when the folder has one).
    """
    from dataset_builder.records import load_split_matrices, load_splits
    from tokenizer import check_vocabulary, load_tokenizer, read_meta

    from .readout import READOUT_FILE
    from .recalibrate import check_pool

    folder = Path(model_dir)
    readout_path = folder / READOUT_FILE
    if not folder.is_dir() or not readout_path.exists():
        raise FileNotFoundError(f"--model {folder}: not a model folder written by train.py")
    readout = json.loads(readout_path.read_text())
    meta = read_meta(folder)
    check_vocabulary(load_tokenizer(folder), read_meta(dataset_dir), what=f"--dataset_dir {dataset_dir}")
    splits = load_splits(dataset_dir)
    has_validation = "validation" in splits and len(splits["validation"]) > 0
    if pool and not readout.get("calibration"):
        raise ValueError(f"--model {folder} has no readout calibration to read the pool with; calibrate it first (python -m translator.recalibrate)")
    if not pool and not has_validation:
        if require_held_out:
            raise ValueError(f"--dataset_dir {dataset_dir} has no validation cells to choose the weights on; give --pool MODEL DATASET_DIR (fold models)")
        logger.warning("%s has no validation cells: the shipped predictor is the transformer alone, not checked against the per-feature mean "
                       "(choose its blend on fold models' readings: python -m translator.stack --model %s --dataset_dir %s --pool MODEL DATASET_DIR ...)",
                       dataset_dir, folder, dataset_dir)
        return {}
    check_pool(pool, meta)
    started = time.perf_counter()
    end = None if max_seconds is None else started + max(0.0, max_seconds)
    calibration = readout.get("calibration") or {}
    held = _held_out(folder, dataset_dir, pool, calibration, max_cells, max_train_cells)
    fit = [load_split_matrices(dataset_dir, "train", max_train_cells), *([load_split_matrices(dataset_dir, "validation")] if has_validation else [])]
    args_path = folder / "training_args.json"
    trained = json.loads(args_path.read_text()).get("directions") if args_path.exists() else None
    directions = list(directions or calibration or trained or ("gex2atac", "atac2gex"))
    records, arrays = {}, {}
    for i, direction in enumerate(directions):
        deadline = None if end is None else time.perf_counter() + max(0.0, end - time.perf_counter()) / (len(directions) - i)
        record, blend = fit_direction(held, fit, direction, batch_size, seed, grid, max_landmarks, step, few_cells, deadline)
        records[direction] = record
        if blend.mean is not None:
            arrays[f"{direction}.mean"] = blend.mean
        if blend.kernel is not None:
            for key, value in blend.kernel.arrays.items():
                arrays[f"{direction}.kernel.{key}"] = np.ascontiguousarray(value, dtype=np.float32)
        for line in summary_lines({"blend": {direction: record}}):
            logger.info("%s", line)
        if record["predicts_the_mean"]:
            logger.warning("%s: no blend of the transformer and the source kernel beat the per-feature mean on %d held-out cells; "
                           "the model folder predicts the per-feature mean", direction, record["held_out"]["cells"])
    readout["blend"] = records
    _write_blend(folder, readout, arrays)
    logger.info("blend of %s fitted in %.1f s", ", ".join(directions), time.perf_counter() - started)
    return records
