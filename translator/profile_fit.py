"""Refit the profile head in closed form on the train split once training is done.

During training the profile head is learned with the rest of the model by AdamW, whose
per-weight steps add noise that rare features (most peaks) never average out: on MOp the head
stayed at or above the per-feature mean's validation loss. Given the trained model, the
head is a generalised linear model on fixed features (the decoder state after the direction
prefix), one independent convex problem per feature: logistic regression for ATAC, least squares
for GEX, each as a residual over the per-feature train mean and with an L2 penalty. We solve them
full-batch with L-BFGS (features from :func:`translator.model.profile_features`), features in chunks (memory ``cells x chunk``), for each penalty of a small
grid, and keep the penalty with the lowest validation RMSE of the readout.

Then, optionally, a reduced rank (:func:`reduce_rank`): the head's scores over the train cells are a
``cells x features`` matrix of rank at most ``3 * d_model``; projecting every score vector onto its top
``K`` principal directions (over features) keeps what the cells share and drops per-feature noise fitted
to few train cells. The projection is folded into the head's weights and biases (the head stays one
linear map of the same shape), and ``K`` (or no projection) is chosen by the same validation RMSE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch

from .model import PROFILE_INPUTS, ProfileHead, cuda_tf32, profile_features
from .streaming import sample_rows

logger = logging.getLogger(__name__)

L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
RANK_GRID = (4, 8, 16, 32, 64)
CHOICE_CHUNKS = 8  # above this many chunks of features, the L2 is chosen on this many evenly spaced chunks, then fitted to all


def refit_cost(n_cells: int, n_features: int, n_l2: int = len(L2_GRID), chunk_features: int = 2048) -> int:
    """Cell-feature entries solved by :func:`fit_profile_rows` (its time is about proportional): every L2 on the chunks the
    choice is made on, then the chosen L2 alone on the rest when the features are many."""
    chunks = -(-n_features // chunk_features)
    if chunks <= CHOICE_CHUNKS or n_l2 == 1:
        return n_cells * n_features * n_l2
    return n_cells * (CHOICE_CHUNKS * chunk_features * n_l2 + n_features)


MIN_REFIT_CELLS = 50  # a refit cut to fit a time budget uses at least this many train cells, or none


class RefitOverBudget(RuntimeError):
    """The solves left would end after the refit's deadline (at the pace of those done): ``seconds_per_solve`` is that
    pace, ``total`` the refit's solves."""

    def __init__(self, message: str, seconds_per_solve: float = 0.0, total: int = 0):
        super().__init__(message)
        self.seconds_per_solve, self.total = seconds_per_solve, total

    def cells_within(self, n_cells: int, seconds: float, margin: float = 0.8) -> int:
        """Train cells a new refit may use so that all its solves end within ``seconds`` (a solve's time is about
        proportional to its cells), at ``margin`` of that estimate."""
        if self.seconds_per_solve <= 0 or self.total <= 0:
            return 0
        return int(n_cells * margin * max(0.0, seconds) / (self.seconds_per_solve * self.total))


class SolvePace:
    """Counts a refit's solves against a deadline (a ``time.perf_counter()`` value): after each solve, raises
    :class:`RefitOverBudget` when the solves left, at the mean pace so far, would end after it."""

    def __init__(self, deadline: float | None, total: int):
        self.deadline, self.total, self.done = deadline, int(total), 0
        self.started = time.perf_counter()

    def solved(self) -> None:
        self.done += 1
        if self.deadline is None or self.done >= self.total:
            return
        now = time.perf_counter()
        if now + (now - self.started) / self.done * (self.total - self.done) > self.deadline:
            per_solve = (now - self.started) / self.done
            raise RefitOverBudget(f"{self.total - self.done} of {self.total} solves left at {per_solve:.2f} s each", per_solve, self.total)


def refit_solves(n_features: int, n_l2: int = len(L2_GRID), chunk_features: int = 2048) -> int:
    """Solves of :func:`fit_profile_rows` (one per chunk of features and penalty tried): each costs at least a few
    optimizer steps, however few the cells."""
    chunks = -(-n_features // chunk_features)
    if chunks <= CHOICE_CHUNKS or n_l2 == 1:
        return chunks * n_l2
    return CHOICE_CHUNKS * n_l2 + chunks


@torch.no_grad()
def profile_states(model, sources: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """What the profile head reads for each source (:func:`translator.model.profile_features`), float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([-len(s) for s in sources], kind="stable")
    out = torch.zeros(len(sources), PROFILE_INPUTS * model.config.d_model)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        lengths = torch.tensor([len(sources[r]) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(sources[r])] = torch.from_numpy(np.asarray(sources[r]))
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        ids, mask = ids.to(device), mask.to(device)
        encoder_hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out[torch.from_numpy(rows)] = profile_features(model, encoder_hidden, mask, ids).float().cpu()
    return out


def _solve_chunk(x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, binary: bool, l2: float, w0: torch.Tensor, b0: torch.Tensor, iterations: int):
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe")
    n = x.shape[0]

    def closure():
        optimizer.zero_grad()
        z = x @ w.T + b + offset
        if binary:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / n
        else:
            loss = ((z - y) ** 2).sum() / n
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def _predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, offset: torch.Tensor, binary: bool) -> torch.Tensor:
    z = x @ w.T + b + offset
    return torch.sigmoid(z) if binary else z.clamp(min=0)


def fit_profile_rows(
    x_train: torch.Tensor,
    y_train: sp.csr_matrix,
    x_val: torch.Tensor,
    y_val: sp.csr_matrix,
    offset: torch.Tensor,
    binary: bool,
    l2_grid: Sequence[float] = L2_GRID,
    iterations: int = 25,
    chunk_features: int = 2048,
    device: torch.device | str | None = None,
    pace: SolvePace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit head rows ``W [features, d]`` and biases ``b [features]`` for one target modality.

    Penalties are tried from the largest down, each warm-started from the previous solution; the
    one with the lowest validation RMSE of ``sigmoid(offset + xW' + b)`` (ATAC) or
    ``max(offset + xW' + b, 0)`` (GEX) is kept. With more than :data:`CHOICE_CHUNKS` chunks of
    features (tens of thousands of peaks), the penalties are tried on that many evenly spaced chunks and
    the other chunks are fitted with the chosen one alone (one solve each instead of one per penalty). The solves run on ``device`` (default: ``x_train``'s;
    a GPU's products in full fp32, TF32 off) and the result comes back on the CPU. ``pace``: counts the solves against a
    deadline (:class:`SolvePace`, which raises :class:`RefitOverBudget`).

    Returns
    -------
    ``(W, b, report)``, ``report`` = ``{"l2": chosen, "validation_rmse": {l2: rmse}, "validation_rmse_mean": ...}``.
    """
    device = torch.device(device) if device is not None else x_train.device
    with _full_fp32(device):
        return _fit_profile_rows(x_train.to(device), y_train, x_val.to(device), y_val, offset.to(device), binary, l2_grid, iterations, chunk_features,
                                 pace)


@contextmanager
def _full_fp32(device: torch.device):
    """On a CUDA device, fp32 matrix products in full precision (TF32 off) for the duration; elsewhere nothing."""
    restore = cuda_tf32(False) if device.type == "cuda" else None
    try:
        yield
    finally:
        if restore is not None:
            restore()


PACE_CELLS, PACE_FEATURES = 256, 1024  # the solve :func:`seconds_per_entry` times


def seconds_per_entry(n_inputs: int, binary: bool = True, device: torch.device | str = "cpu", n_cells: int = PACE_CELLS,
                      n_features: int = PACE_FEATURES, iterations: int = 25) -> float:
    """Seconds one refit solve takes per cell-feature entry on ``device``, timed on a small random problem of that shape
    (what a time budget sizes the refit by, with :func:`refit_cost`)."""
    import time

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(n_cells, n_inputs, generator=generator) * 0.1).to(device)
    y = (torch.rand(n_cells, n_features, generator=generator) < 0.05).float().to(device)
    offset = torch.full((n_features,), -3.0, device=device)
    w, b = torch.zeros(n_features, n_inputs, device=device), torch.zeros(n_features, device=device)
    with _full_fp32(torch.device(device)):
        started = time.perf_counter()
        _solve_chunk(x, y, offset, binary, L2_GRID[0], w, b, iterations)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / (n_cells * n_features)


def _fit_profile_rows(x_train, y_train, x_val, y_val, offset, binary, l2_grid, iterations, chunk_features, pace=None):
    n_features = y_train.shape[1]
    starts = list(range(0, n_features, chunk_features))
    if len(starts) <= CHOICE_CHUNKS or len(l2_grid) == 1:
        return _fit_chunks(x_train, y_train, x_val, y_val, offset, binary, l2_grid, iterations, chunk_features, starts, pace)
    chosen = set(np.linspace(0, len(starts) - 1, CHOICE_CHUNKS).round().astype(int).tolist())
    sample = [starts[i] for i in sorted(chosen)]
    rest = [starts[i] for i in range(len(starts)) if i not in chosen]
    w_s, b_s, report = _fit_chunks(x_train, y_train, x_val, y_val, offset, binary, l2_grid, iterations, chunk_features, sample, pace)
    w_r, b_r, _ = _fit_chunks(x_train, y_train, x_val, y_val, offset, binary, (report["l2"],), iterations, chunk_features, rest, pace)
    w, b = torch.zeros(n_features, x_train.shape[1]), torch.zeros(n_features)
    for starts_part, w_part, b_part in ((sample, w_s, b_s), (rest, w_r, b_r)):
        cols = np.concatenate([np.arange(s, min(n_features, s + chunk_features)) for s in starts_part])
        w[cols], b[cols] = w_part, b_part
    report.update(choice_features=int(sum(min(n_features, s + chunk_features) - s for s in sample)))
    return w, b, report


def _fit_chunks(x_train, y_train, x_val, y_val, offset, binary, l2_grid, iterations, chunk_features, starts, pace=None):
    """Fit the feature chunks beginning at ``starts`` along the warm-started L2 path; the rows of the L2 with the lowest
    validation RMSE over these chunks, with the report of the choice."""
    device = x_train.device
    n_features, d = y_train.shape[1], x_train.shape[1]
    sse = {l2: 0.0 for l2 in l2_grid}
    sse_mean = 0.0
    solutions: dict[float, tuple[list, list]] = {l2: ([], []) for l2 in l2_grid}
    n_cols = 0
    for begin in starts:
        cols = slice(begin, min(n_features, begin + chunk_features))
        n_cols += cols.stop - cols.start
        y = torch.from_numpy(y_train[:, cols].toarray().astype(np.float32)).to(device)
        yv = torch.from_numpy(y_val[:, cols].toarray().astype(np.float32)).to(device)
        if binary:
            y, yv = (y > 0).float(), (yv > 0).float()
        off = offset[cols]
        mean_prediction = torch.sigmoid(off) if binary else off.clamp(min=0)
        sse_mean += float(((yv - mean_prediction) ** 2).sum())
        w = torch.zeros(cols.stop - cols.start, d, device=device)
        b = torch.zeros(cols.stop - cols.start, device=device)
        for l2 in sorted(l2_grid, reverse=True):
            w, b = _solve_chunk(x_train, y, off, binary, l2, w, b, iterations)
            sse[l2] += float(((yv - _predict(x_val, w, b, off, binary)) ** 2).sum())
            solutions[l2][0].append(w.cpu())
            solutions[l2][1].append(b.cpu())
            if pace is not None:
                pace.solved()
    n_entries = max(1, x_val.shape[0] * n_cols)
    rmse = {l2: float(np.sqrt(v / n_entries)) for l2, v in sse.items()}
    best = min(rmse, key=rmse.get)
    report = {"l2": best, "validation_rmse": {str(k): v for k, v in rmse.items()}, "validation_rmse_mean": float(np.sqrt(sse_mean / n_entries)),
              "train_cells": int(x_train.shape[0]), "validation_cells": int(x_val.shape[0])}
    return torch.cat(solutions[best][0]), torch.cat(solutions[best][1]), report


def _validation_sse(x_val: torch.Tensor, y_val: sp.csr_matrix, heads: dict, offset: torch.Tensor, binary: bool,
                    chunk_features: int = 2048) -> dict:
    """Validation sum of squared errors of each candidate head ``{key: (W, b)}``; each truth chunk is densified once."""
    n_features = y_val.shape[1]
    sse = dict.fromkeys(heads, 0.0)
    for begin in range(0, n_features, chunk_features):
        cols = slice(begin, min(n_features, begin + chunk_features))
        yv = torch.from_numpy(y_val[:, cols].toarray().astype(np.float32))
        if binary:
            yv = (yv > 0).float()
        for key, (w, b) in heads.items():
            sse[key] += float(((yv - _predict(x_val, w[cols], b[cols], offset[cols], binary)) ** 2).sum())
    return sse


def _rank_basis(x_train: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(mean train state, principal directions over features, how many of them the scores have)`` of the head's train
    scores (see :func:`reduce_rank`)."""
    x64 = x_train.double()
    mean = x64.mean(0)
    _, s, vt = torch.linalg.svd(x64 - mean, full_matrices=False)  # cells x d: d <= 3 * d_model columns
    m = (s[:, None] * vt) @ w.double().T  # [d, features]: Z = U m
    _, sm, basis = torch.linalg.svd(m, full_matrices=False)  # basis rows: principal directions over features
    usable = int((sm > sm[0] * 1e-6).sum()) if len(sm) else 0
    return mean, basis, usable


def _project(w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w64 = w.double()
    v = basis[:k]
    w_k = v.T @ (v @ w64)
    b_k = b.double() + (w64 - w_k) @ mean
    return w_k.float(), b_k.float()


def project_rank(x_train: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head reduced to rank ``k`` (as :func:`reduce_rank` makes each candidate), no choice made; ``k`` = 0 or at least the
    scores' rank: the head unchanged."""
    mean, basis, usable = _rank_basis(x_train, w)
    return _project(w, b, mean, basis, k) if 0 < k < usable else (w, b)


def reduce_rank(
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: sp.csr_matrix,
    w: torch.Tensor,
    b: torch.Tensor,
    offset: torch.Tensor,
    binary: bool,
    ranks: Sequence[int] = RANK_GRID,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Project the head's scores onto their top-``K`` train principal directions; ``K`` chosen on validation.

    With ``Z = (x_train - mean) W^T`` (``cells x features``, never formed: its right singular vectors come from
    the SVD of ``S V^T W^T``, where ``x_train - mean = U S V^T`` is ``cells x d``) and ``V_K`` its top ``K``
    right singular vectors, the reduced head is ``W' = V_K^T V_K W`` and ``b' = b + (W - W') mean``, so the
    scores of the mean train state do not move. ``K`` = 0 (no projection) is a candidate too, and wins ties.

    Returns
    -------
    ``(W', b', report)``, ``report`` = ``{"rank": K or 0, "validation_rmse": {K: rmse}}``.
    """
    mean, basis, usable = _rank_basis(x_train, w)
    candidates = {0: (w, b)}
    for k in sorted(set(ranks)):
        if not 0 < k < usable:
            continue  # a projection on every direction the scores have changes nothing
        candidates[k] = _project(w, b, mean, basis, k)
    sse = _validation_sse(x_val, y_val, candidates, offset, binary)
    n_entries = max(1, x_val.shape[0] * w.shape[0])
    rmse = {k: float(np.sqrt(v / n_entries)) for k, v in sse.items()}
    best = min(rmse, key=lambda k: (rmse[k], k != 0))
    return *candidates[best], {"rank": best, "validation_rmse": {str(k): v for k, v in rmse.items()}}


def _pooled_mse(grids: Sequence[dict], cells: np.ndarray) -> dict[str, float]:
    """``{setting: mean squared error over every model's validation cells}`` from each model's ``{setting: RMSE}`` (settings all share)."""
    keys = set(grids[0]).intersection(*grids[1:])
    return {key: float(sum(g[key] ** 2 * c for g, c in zip(grids, cells, strict=True)) / cells.sum()) for key in keys}


def pooled_choice(reports: Sequence[dict]) -> dict[str, dict]:
    """The refit's settings chosen over several models' refits: ``{direction: {"l2": ..., "rank": ...}}``.

    ``reports``: the ``profile_refit`` entries of the ``readout.json`` of models of the same recipe, each fitted on its own
    train cells and scored on its own validation cells (cross-validation fold models). Per direction, the L2 with the lowest
    validation mean squared error pooled over every model's validation cells, and likewise the reduced rank (0: none, which
    wins ties; each model scored the ranks at the L2 it chose). A model trained on all their cells (no validation split
    left, ``train.py --profile_choices_from``) is refitted with these settings.
    """
    if not reports:
        raise ValueError("no refit reports to choose from")
    directions = [d for d in reports[0] if all(d in r for r in reports)]
    out = {}
    for direction in directions:
        rows = [r[direction] for r in reports]
        cells = np.array([float(r["validation_cells"]) for r in rows])
        mse = {"l2": _pooled_mse([r["validation_rmse"] for r in rows], cells)}
        l2 = min(mse["l2"], key=lambda key: (mse["l2"][key], -float(key)))  # ties: the larger penalty
        rank = 0
        if all("reduced_rank" in r for r in rows):
            mse["rank"] = _pooled_mse([r["reduced_rank"]["validation_rmse"] for r in rows], cells)
            rank = int(min(mse["rank"], key=lambda key: (mse["rank"][key], key != "0", int(key))))
        out[direction] = {"l2": float(l2), "rank": rank, "validation_mse_pooled": mse, "models": len(rows)}
    return out


def refit_profile_head(
    model,
    head: ProfileHead,
    sources: dict[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    truths: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]],
    ranges: dict[str, tuple[int, int]],
    offsets: dict[int, tuple[torch.Tensor, bool]],
    l2_grid: Sequence[float] = L2_GRID,
    batch_size: int = 64,
    ranks: Sequence[int] = (),
    choices: dict[str, dict] | None = None,
    deadline: float | None = None,
) -> dict:
    """Refit the head rows of each direction's target modality in place.

    Parameters
    ----------
    sources
        ``{direction: (train source ids, validation source ids)}`` (``<prefix> names </s>``, as in training).
    truths
        ``{direction: (train truth, validation truth)}`` of the target modality (``dataset_builder.records.truth_matrices``).
    ranges
        ``{direction: target token range}``.
    offsets
        ``readout.profile_offsets``.
    ranks
        Reduced ranks to try after the refit (:func:`reduce_rank`); empty: none.
    choices
        ``{direction: {"l2": ..., "rank": ...}}`` made beforehand (:func:`pooled_choice`): that direction is refitted with
        that L2 and reduced to that rank (0: not reduced), nothing is chosen, and its validation sources may be empty.
    deadline
        A ``time.perf_counter()`` value (a time budget): a direction whose solves would end after it, at the pace of its
        first ones, starts again on as many evenly spaced train cells as that pace says fit (at least
        :data:`MIN_REFIT_CELLS`); if even those would overrun, it keeps its trained rows (a warning says so; no report).

    Returns
    -------
    ``{direction: report}`` (see :func:`fit_profile_rows`; with ``ranks`` also ``"reduced_rank"``).
    """
    reports = {}
    for direction, (train_ids, val_ids) in sources.items():
        start, stop = ranges[direction]
        offset, binary = offsets[start]
        x_train = profile_states(model, train_ids, batch_size)
        x_val = profile_states(model, val_ids, batch_size)
        chosen = (choices or {}).get(direction)
        grid = (chosen["l2"],) if chosen else l2_grid
        y_train = truths[direction][0]
        solves = refit_solves(stop - start, len(grid))
        device = next(model.parameters()).device  # the model's GPU, when it has one
        w = None
        for attempt in range(2):  # the second on fewer cells, when the first one's pace says it would overrun
            try:
                w, b, report = fit_profile_rows(x_train, y_train, x_val, truths[direction][1], offset.float(), binary, grid, device=device,
                                                pace=SolvePace(deadline, solves))
                break
            except RefitOverBudget as err:
                n_cells = err.cells_within(x_train.shape[0], deadline - time.perf_counter())
                if attempt or n_cells < MIN_REFIT_CELLS:
                    logger.warning("%s profile head refit would overrun --max_train_seconds (%s): the trained rows are kept", direction, err)
                    break
                rows = sample_rows(x_train.shape[0], n_cells)
                logger.info("%s profile head refit on %d of %d train cells, to end within --max_train_seconds (%s)", direction, len(rows),
                            x_train.shape[0], err)
                x_train, y_train = x_train[torch.from_numpy(rows)], y_train[rows]
        if w is None:
            continue
        if chosen:
            w, b = project_rank(x_train, w, b, int(chosen["rank"]))
            report.update(chosen_beforehand=chosen, reduced_rank={"rank": int(chosen["rank"])})
            if not len(val_ids):
                report.update(validation_rmse={}, validation_rmse_mean=None)
            logger.info("%s profile head refit with the settings chosen beforehand: l2 %g, reduced rank %s", direction, chosen["l2"],
                        chosen["rank"] or "none")
        else:
            logger.info("%s profile head refit: l2 %g, validation RMSE %.6f (per-feature mean %.6f)", direction, report["l2"],
                        report["validation_rmse"][str(report["l2"])], report["validation_rmse_mean"])
            if ranks:
                w, b, report["reduced_rank"] = reduce_rank(x_train, x_val, truths[direction][1], w, b, offset.float(), binary, ranks)
                logger.info("%s profile head reduced rank: %s (validation RMSE by rank: %s)", direction, report["reduced_rank"]["rank"] or "none",
                            ", ".join(f"{k} {v:.6f}" for k, v in report["reduced_rank"]["validation_rmse"].items()))
        with torch.no_grad():
            head.weight[start:stop] = w.to(head.weight)  # dtype and device (the refit solves on the CPU)
            head.bias[start:stop] = b.to(head.bias)
        reports[direction] = report
    return reports
