"""Refit the profile head in closed form on the train split once training is done.

During training the profile head is learned with the rest of the model by AdamW, whose
per-weight steps add noise that rare features (most peaks) never average out: on MOp the head
stayed at or above the per-feature mean's validation loss. Given the trained model, the
head is a generalised linear model on fixed features (the decoder state after the direction
prefix), one independent convex problem per feature: logistic regression for ATAC, least squares
for GEX, each as a residual over the per-feature train mean and with an L2 penalty. We solve them
full-batch with L-BFGS (features from :func:`translator.modeling.profile_features`), features in chunks (memory ``cells x chunk``), for each penalty of a small
grid, and keep the penalty with the lowest validation RMSE of the readout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .modeling import PROFILE_INPUTS, ProfileHead, profile_features

logger = logging.getLogger(__name__)

L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


@torch.no_grad()
def profile_states(model, sources: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
    """What the profile head reads for each source (:func:`translator.modeling.profile_features`), float32 on the CPU."""
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
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit head rows ``W [features, d]`` and biases ``b [features]`` for one target modality.

    Penalties are tried from the largest down, each warm-started from the previous solution; the
    one with the lowest validation RMSE of ``sigmoid(offset + xW' + b)`` (ATAC) or
    ``max(offset + xW' + b, 0)`` (GEX) is kept.

    Returns
    -------
    ``(W, b, report)``, ``report`` = ``{"l2": chosen, "validation_rmse": {l2: rmse}, "validation_rmse_mean": ...}``.
    """
    n_features, d = y_train.shape[1], x_train.shape[1]
    sse = {l2: 0.0 for l2 in l2_grid}
    sse_mean = 0.0
    solutions: dict[float, tuple[list, list]] = {l2: ([], []) for l2 in l2_grid}
    for begin in range(0, n_features, chunk_features):
        cols = slice(begin, min(n_features, begin + chunk_features))
        y = torch.from_numpy(y_train[:, cols].toarray().astype(np.float32))
        yv = torch.from_numpy(y_val[:, cols].toarray().astype(np.float32))
        if binary:
            y, yv = (y > 0).float(), (yv > 0).float()
        off = offset[cols]
        mean_prediction = torch.sigmoid(off) if binary else off.clamp(min=0)
        sse_mean += float(((yv - mean_prediction) ** 2).sum())
        w = torch.zeros(cols.stop - cols.start, d)
        b = torch.zeros(cols.stop - cols.start)
        for l2 in sorted(l2_grid, reverse=True):
            w, b = _solve_chunk(x_train, y, off, binary, l2, w, b, iterations)
            sse[l2] += float(((yv - _predict(x_val, w, b, off, binary)) ** 2).sum())
            solutions[l2][0].append(w)
            solutions[l2][1].append(b)
    n_entries = max(1, x_val.shape[0] * n_features)
    rmse = {l2: float(np.sqrt(v / n_entries)) for l2, v in sse.items()}
    best = min(rmse, key=rmse.get)
    report = {"l2": best, "validation_rmse": {str(k): v for k, v in rmse.items()}, "validation_rmse_mean": float(np.sqrt(sse_mean / n_entries)),
              "train_cells": int(x_train.shape[0]), "validation_cells": int(x_val.shape[0])}
    return torch.cat(solutions[best][0]), torch.cat(solutions[best][1]), report


def refit_profile_head(
    model,
    head: ProfileHead,
    sources: dict[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    truths: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]],
    ranges: dict[str, tuple[int, int]],
    offsets: dict[int, tuple[torch.Tensor, bool]],
    l2_grid: Sequence[float] = L2_GRID,
    batch_size: int = 64,
) -> dict:
    """Refit the head rows of each direction's target modality in place.

    Parameters
    ----------
    sources
        ``{direction: (train source ids, validation source ids)}`` (``<prefix> names </s>``, as in training).
    truths
        ``{direction: (train truth, validation truth)}`` of the target modality (``readout.truth_matrices``).
    ranges
        ``{direction: target token range}``.
    offsets
        ``readout.profile_offsets``.

    Returns
    -------
    ``{direction: report}`` (see :func:`fit_profile_rows`).
    """
    reports = {}
    for direction, (train_ids, val_ids) in sources.items():
        start, stop = ranges[direction]
        offset, binary = offsets[start]
        x_train = profile_states(model, train_ids, batch_size)
        x_val = profile_states(model, val_ids, batch_size)
        w, b, report = fit_profile_rows(x_train, truths[direction][0], x_val, truths[direction][1], offset.float(), binary, l2_grid)
        with torch.no_grad():
            head.weight[start:stop] = w.to(head.weight.dtype)
            head.bias[start:stop] = b.to(head.bias.dtype)
        logger.info("%s profile head refit: l2 %g, validation RMSE %.6f (per-feature mean %.6f)", direction, report["l2"],
                    report["validation_rmse"][str(report["l2"])], report["validation_rmse_mean"])
        reports[direction] = report
    return reports
