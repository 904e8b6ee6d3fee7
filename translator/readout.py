"""Where a prediction becomes a matrix: token distributions -> cells x features, and its calibration.

Decoding (:func:`translator.decode.constrained_decode`) keeps, for every cell, each step's
probabilities over the target modality's names and aggregates them per feature:

- ATAC targets: inclusion score ``s_k = 1 - prod_t (1 - p_t(k))`` (``noisy_or``) or ``sum_t p_t(k)`` (``sum``);
- GEX targets: expected value ``e_g = sum_t p_t(g) * rank_value[t]`` (``rank_value`` = train mean
  log-norm value of the gene at rank t, from ``cell_sentences.json``) and inclusion ``s_g``.

The ``profile`` readout needs no decoding: one decoder step after the direction prefix scores every
target feature at once (:func:`translator.model.profile_scores`, trained with ``--profile_weight``
as a residual over the train mean): ``r_k = logit(mean_k) + z_k`` for ATAC, ``r_g = mean_g + z_g`` for GEX.

Calibration, fitted on the validation split, never discards what the per-feature train mean knows:

- ATAC: ``P(accessible) = sigmoid(a * logit(s_k) + b * logit(mean_k) + c)`` (logistic regression;
  ``r_k`` in place of ``logit(s_k)`` for ``profile``); ``profile_depth`` splits the profile residual
  ``z_k`` of a cell into its mean over the cell's peaks ``u`` (how open the cell is as a whole: its depth)
  and the rest ``z_k - u`` (which peaks), each with its own weight, and adds the size of the source
  sentence ``n`` (the genes the model read), which the head's pooled (length-free) states do not carry:
  ``sigmoid(a * (z_k - u) + d * u + e * log(1 + n) + b * logit(mean_k) + c)``. With little training data the
  head's residual is too small in depth and too loud in its per-peak pattern (fitted without ``n`` on a few
  hundred cells, ``d`` came out well above 1 and ``a`` below 1), and one weight for both either loses the depth
  (RMSE) or re-ranks a cell's peaks worse than the mean does (per-cell Pearson, AUROC, AP); ``a = 0`` ranks every cell's peaks as the mean does;
- GEX: ``value = w1 * e_g + w2 * s_g * mean_detected_g + w3 * mean_g + w4`` (least squares, clipped at 0;
  ``value = w1 * r_g + w3 * mean_g + w4`` for ``profile``; ``profile_depth`` the same split as for ATAC,
  ``value = a * (z_g - u) + d * u + e * log(1 + n) + b * mean_g + c``, ``n`` the accessible peaks the model read:
  log-norm values are size-normalized, but a deeper cell still detects more genes, so its mean log-norm over all
  genes rises with its depth (MOp train cells: correlation 0.38 with ``log(1 + n)``), which the length-free head misses).

With all weight on the mean term the prediction falls back to the per-feature mean baseline.
The fitted parameters live in ``readout.json`` in the model folder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .decode import constrained_decode
from .model import profile_scores

READOUT_FILE = "readout.json"
AGGREGATIONS = ("noisy_or", "sum", "profile", "profile_depth")
PROFILE_AGGREGATIONS = ("profile", "profile_depth")  # read from the one-step profile scores, no decoding
EPS = 1e-4


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


ROW_STATS = ("atac_mean", "gex_mean", "gex_mean_detected")  # train statistics a features dict may carry per cell (pooled calibrations)


def _train_stat(features: dict[str, np.ndarray] | None, meta: dict, key: str) -> np.ndarray:
    """``meta``'s per-feature train statistic ``key``, or ``features[key]`` (``[cells, features]``) where the features carry it.

    A calibration pooled over several models' readings (:func:`translator.finishing.calibration_features` of cross-validation
    fold models) keeps, for each cell, the train statistics of the model that read it; row selections of the features dict
    select them with the rest.
    """
    if features is not None and key in features:
        return np.asarray(features[key], dtype=np.float64)
    return np.asarray(meta["train_stats"][key], dtype=np.float64)


def with_row_stats(features: dict[str, np.ndarray], meta: dict, n_cells: int) -> dict[str, np.ndarray]:
    """``features`` plus ``meta``'s train statistics (:data:`ROW_STATS`) as one (broadcast, uncopied) row per cell, so that
    readings of several models can be concatenated into one calibration, each cell keeping its own model's statistics."""
    for key in ROW_STATS:
        stat = np.asarray(meta["train_stats"][key], dtype=np.float64)
        features[key] = np.broadcast_to(stat, (n_cells, len(stat)))
    return features


def profile_offsets(tokenizer, meta: dict) -> dict[int, tuple[torch.Tensor, bool]]:
    """Per-feature offsets of the profile readout, keyed by the target range's first token id.

    ATAC: ``(logit(train accessibility rate), binary=True)``; GEX: ``(train mean log-norm, binary=False)``.
    """
    from tokenizer import feature_token_ranges

    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    stats = meta["train_stats"]
    return {
        ranges["atac"][0]: (torch.as_tensor(_logit(np.asarray(stats["atac_mean"], dtype=np.float64)), dtype=torch.float32), True),
        ranges["gex"][0]: (torch.as_tensor(np.asarray(stats["gex_mean"], dtype=np.float64), dtype=torch.float32), False),
    }


def decode_features(
    model,
    tokenizer,
    meta: dict,
    source_ids: Sequence[np.ndarray],
    direction: str,
    target_range: tuple[int, int],
    max_new_tokens: int,
    batch_size: int = 64,
    decode: bool = True,
    profile_head=None,
    encoder=None,
    profile_out: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Decode every source sentence and return the per-feature aggregates ``[cells, features]`` and the ids.

    Sources are decoded longest first in batches (little padding), results are put back in input order.
    The ``profile`` scores (one decoder step, with ``profile_head`` when the model has one) and ``source_length``
    (``[cells]``: the source names read, without prefix and ``</s>``) are always computed; with ``decode=False``
    nothing else is (no greedy decoding, empty sequences). ``encoder``: the module that encodes the sources in place of
    ``model.encoder`` (:func:`translator.decode.bf16_encoder`); its states are read in float32. ``profile_out``: a float32
    C-contiguous array of at least ``[cells, features]`` whose first rows become ``features['profile']`` (every row is
    written), so that a caller predicting chunk after chunk reuses its memory instead of touching new pages each time.
    """
    rank_value = np.asarray(meta["train_stats"]["rank_value"], dtype=np.float64)

    def step_weight(step: int) -> float:
        return float(rank_value[min(step, len(rank_value) - 1)]) if len(rank_value) else 0.0

    device = next(model.parameters()).device
    # Names in increasing id: ATAC targets (genomic order), and GEX targets of a model trained with --gex_target_order gene.
    ordered = direction == "gex2atac" or meta.get("gex_target_order", "rank") == "gene"
    return _decode_batches(model, source_ids, direction, target_range, max_new_tokens, batch_size, step_weight, device, decode, profile_head, ordered,
                           encoder, profile_out)


def decoding_threads(model) -> int:
    """Torch threads for greedy decoding on CPU: a step multiplies ``[batch, 1, d_model]`` matrices, and for narrow models
    thread hand-offs cost more than they save (a 64-wide linear took 3.0 ms with 2 threads vs 0.035 ms with 1 on 2 busy
    cores). The encoder and the profile step (``[batch, length, d_model]``, and every target feature) use every thread."""
    return max(1, min(torch.get_num_threads(), model.config.d_model // 256))


def pad_sources(source_ids: Sequence[np.ndarray], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[len(rows), longest]`` of the given sources, padded with 0."""
    length = max(len(source_ids[r]) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(source_ids[r])] = torch.from_numpy(np.asarray(source_ids[r]))
        mask[i, : len(source_ids[r])] = 1
    return input_ids, mask


def _decode_batches(model, source_ids, direction, target_range, max_new_tokens, batch_size, step_weight, device, decode=True, profile_head=None,
                    ordered=None, encoder=None, profile_out=None):
    ordered = direction == "gex2atac" if ordered is None else ordered
    lengths = np.fromiter((len(s) for s in source_ids), dtype=np.int64, count=len(source_ids))
    order = np.argsort(-lengths, kind="stable")
    # The longest sources (most often every source at the length cap) are batched apart from the shorter ones: a batch that
    # mixes them needs a padding mask, which attention adds to the position bias as a [batch, heads, length, length] copy.
    n_longest = int((lengths == lengths.max()).sum()) if len(lengths) else 0
    starts = [*range(0, n_longest, batch_size), *range(n_longest, len(order), batch_size)]
    ends = [*starts[1:], len(order)] if starts else []
    n_features = target_range[1] - target_range[0]
    keys = (["noisy_or", "sum"] + (["weighted"] if direction == "atac2gex" else [])) if decode else []
    out = {k: np.zeros((len(source_ids), n_features), dtype=np.float32) for k in keys}
    if profile_out is not None and (profile_out.dtype != np.float32 or not profile_out.flags.c_contiguous
                                    or profile_out.shape[0] < len(source_ids) or profile_out.shape[1:] != (n_features,)):
        raise ValueError(f"profile_out must be C-contiguous float32 of at least {len(source_ids)} x {n_features}, got {profile_out.shape}")
    out["profile"] = np.zeros((len(source_ids), n_features), dtype=np.float32) if profile_out is None else profile_out[: len(source_ids)]
    out["source_length"] = np.fromiter((max(0, len(s) - 2) for s in source_ids), dtype=np.float32, count=len(source_ids))  # minus prefix and </s>
    sequences: list[list[int]] = [[] for _ in source_ids]
    for begin, end in zip(starts, ends, strict=True):
        rows = order[begin:end]
        input_ids, mask = pad_sources(source_ids, rows)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            model.eval()
            # Sorted by length, most batches hold sources of one length: without padding, no mask is needed, and attention
            # adds the relative position bias [1, heads, length, length] as it is instead of a [batch, ...] copy of it.
            encoder_hidden = (model.encoder if encoder is None else encoder)(input_ids=input_ids, attention_mask=None if bool(mask.all()) else mask)
            encoder_hidden = encoder_hidden.last_hidden_state.float()
            scores = profile_scores(model, encoder_hidden, mask, input_ids, target_range, profile_head).cpu().numpy()
            if (np.diff(rows) == 1).all():
                out["profile"][rows[0] : rows[-1] + 1] = scores  # sources of one length keep their order: one block copy
            else:
                out["profile"][rows] = scores
        if not decode:
            continue
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(decoding_threads(model))
        try:
            result = constrained_decode(
                model,
                input_ids,
                mask,
                target_range,
                ordered=ordered,
                max_new_tokens=max_new_tokens,
                step_weight=step_weight if direction == "atac2gex" else None,
                encoder_hidden=encoder_hidden,
            )
        finally:
            torch.set_num_threads(threads)
        for key in keys:
            out[key][rows] = result.aggregates[key].float().cpu().numpy()
        for i, r in enumerate(rows):
            sequences[r] = result.sequences[i]
    return out, sequences


def _inclusion(features: dict[str, np.ndarray], aggregation: str) -> np.ndarray:
    return np.clip(features[aggregation], 0.0, 1.0)


def is_profile(params: dict | None) -> bool:
    """Whether a direction's calibration reads the profile scores alone (no greedy decoding needed)."""
    return bool(params) and params.get("aggregation") in PROFILE_AGGREGATIONS


def _feature_key(aggregation: str) -> str:
    return "profile" if aggregation in PROFILE_AGGREGATIONS else aggregation


def _log_source_length(features: dict[str, np.ndarray]) -> np.ndarray:
    """``log(1 + n)`` per cell, ``n`` the source names the model read (``decode_features``' ``source_length``)."""
    if "source_length" not in features:
        raise ValueError("the profile_depth readout needs features['source_length'] (the source names read per cell), as decode_features gives")
    return np.log1p(np.asarray(features["source_length"], dtype=np.float64))


def _atac_design(features: dict[str, np.ndarray], aggregation: str, meta: dict) -> list[np.ndarray]:
    """The columns the ATAC calibration weighs: ``[score, logit(mean)]``; ``profile_depth``: ``[z - u, u, log(1 + n), logit(mean)]``."""
    mean_logit = _logit(_train_stat(features, meta, "atac_mean"))
    shape = features[_feature_key(aggregation)].shape
    if aggregation == "profile_depth":
        return [*_depth_columns(features), np.broadcast_to(mean_logit, shape)]
    if aggregation == "profile":
        score = features["profile"].astype(np.float64) + mean_logit
    else:
        score = _logit(_inclusion(features, aggregation))
    return [score, np.broadcast_to(mean_logit, shape)]


def _depth_columns(features: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``[z - u, u, log(1 + n)]`` of ``profile_depth``: ``z`` the profile residual, ``u`` its cell mean, ``n`` the source size."""
    z = features["profile"].astype(np.float64)
    depth = np.broadcast_to(z.mean(axis=1, keepdims=True), z.shape)
    return [z - depth, depth, np.broadcast_to(_log_source_length(features)[:, None], z.shape)]


def _gex_design(features: dict[str, np.ndarray], aggregation: str, meta: dict) -> list[np.ndarray]:
    """The columns the GEX calibration weighs: ``[r, mean, 1]`` (``profile``); ``profile_depth``: ``[z - u, u, log(1 + n), mean, 1]``."""
    mean = _train_stat(features, meta, "gex_mean")
    mean_detected = _train_stat(features, meta, "gex_mean_detected")
    if aggregation == "profile_depth":
        shape = features["profile"].shape
        return [*_depth_columns(features), np.broadcast_to(mean, shape), np.ones(shape)]
    if aggregation == "profile":
        shape = features["profile"].shape
        return [features["profile"].astype(np.float64) + mean, np.broadcast_to(mean, shape), np.ones(shape)]
    shape = features["weighted"].shape
    return [
        features["weighted"].astype(np.float64),
        _inclusion(features, aggregation) * mean_detected,
        np.broadcast_to(mean, shape),
        np.ones(shape),
    ]


def _profile_readout(profile: np.ndarray, direction: str, meta: dict, params: dict, log_source_length: np.ndarray | None = None,
                     features: dict[str, np.ndarray] | None = None, in_place: bool = False) -> np.ndarray:
    """The calibrated profile readout, in float32, on one copy of ``profile`` (``in_place``: on ``profile`` itself).

    The same affine map as the design matrices of :func:`_atac_design` / :func:`_gex_design`, with the
    per-feature terms folded into one vector: ATAC ``sigmoid(a * z + ((a + b) * logit(mean) + intercept))``
    (``profile_depth``: ``sigmoid(a * z + ((d - a) * u + e * log(1 + n)) + (b * logit(mean) + intercept))``, ``u`` the
    row mean of ``z``, ``n`` the row's ``source_length``),
    GEX ``max(0, w0 * z + ((w0 + w1) * mean + w2))`` (``profile_depth``: ``max(0, a * z + ((d - a) * u + e * log(1 + n)) +
    (b * mean + c))``). At 116,490 peaks the float64 design took ~8 ms a cell and several [cells, features]
    temporaries; this runs torch's (multithreaded) in-place passes over cache-sized tiles.
    """
    from .metrics_core import iter_tiles

    x = np.asarray(profile, dtype=np.float32)
    if not (in_place and x is profile and x.flags.c_contiguous and x.flags.writeable):
        x = np.array(profile, dtype=np.float32, copy=True, order="C")
    atac = direction == "gex2atac"
    mean = _logit(_train_stat(features, meta, "atac_mean")) if atac else _train_stat(features, meta, "gex_mean")
    rows = None
    if params["aggregation"] == "profile_depth":
        scale, d, e, b, *rest = params["coef"]  # GEX: rest = [c]; ATAC: the intercept
        # numpy casts to float64 in small buffers; torch's mean(dtype=float64) first makes a float64 copy of the whole matrix
        # (0.5 s and 1 GB of fresh pages for 1,024 cells x 116,490 peaks, against 0.07 s here).
        depth = x.mean(axis=1, dtype=np.float64)
        offset = b * mean + (params["intercept"] if atac else rest[0])
        rows = torch.from_numpy(((d - scale) * depth + e * log_source_length).astype(np.float32))
    elif atac:
        scale, b = params["coef"]
        offset = (scale + b) * mean + params["intercept"]
    else:
        scale, w1, w2 = params["coef"]
        offset = (scale + w1) * mean + w2
    if offset.ndim == 1:
        offset = offset[None, :]
    columns = torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32))  # [1 or cells, features]
    matrix = torch.from_numpy(x)
    for r, c in iter_tiles(*x.shape):
        tile = matrix[r, c]
        tile.mul_(float(np.float32(scale)))
        if rows is not None:
            tile.add_(rows[r, None])
        tile.add_(columns[r if columns.shape[0] > 1 else slice(None), c])
        if atac:
            tile.sigmoid_()
        else:
            tile.clamp_(min=0.0)
    return x


def apply_readout(features: dict[str, np.ndarray], direction: str, meta: dict, params: dict | None, in_place: bool = False) -> np.ndarray:
    """Turn decode aggregates into the prediction matrix (float32); ``params`` = one direction of ``readout.json``.

    Without ``params`` (an uncalibrated model) ATAC gives the noisy-or inclusion score and GEX the
    expected value ``e_g``. ``in_place``: the profile readout may overwrite ``features['profile']`` (the caller's
    own features, read once) instead of a copy of it.
    """
    if params is None and "noisy_or" not in features:  # not decoded: the profile readout as trained
        params = {"aggregation": "profile", "coef": [1.0, 0.0], "intercept": 0.0} if direction == "gex2atac" else {"aggregation": "profile", "coef": [1.0, 0.0, 0.0]}
    if is_profile(params):
        size = _log_source_length(features) if params["aggregation"] == "profile_depth" else None
        return _profile_readout(features["profile"], direction, meta, params, size, features, in_place=in_place)
    if direction == "gex2atac":
        if params is None:
            return _inclusion(features, "noisy_or").astype(np.float32)
        design = _atac_design(features, params["aggregation"], meta)
        logits = sum(w * x for w, x in zip(params["coef"], design, strict=True)) + params["intercept"]
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    if params is None:
        return features["weighted"].astype(np.float32)
    design = _gex_design(features, params["aggregation"], meta)
    value = sum(w * x for w, x in zip(params["coef"], design, strict=True))
    return np.clip(value, 0.0, None).astype(np.float32)


def _rmse(prediction: np.ndarray, truth: sp.spmatrix) -> float:
    return float(np.sqrt(np.mean((prediction - truth.toarray()) ** 2)))


def check_aggregations(names: Sequence[str], what: str = "") -> None:
    """Refuse names that are not readout aggregations (``what``: the flag to name in the message)."""
    unknown = sorted(set(names) - set(AGGREGATIONS))
    if unknown:
        raise ValueError(f"{what}{': ' if what else ''}unknown readout aggregation(s) {unknown}; choose from {list(AGGREGATIONS)}")


SELECTION_PARTS = 5  # fit_readout picks an aggregation by its RMSE on cells each fit did not see, over this many parts
SELECTION_REPEATS = 10  # ... averaged over this many random partitions (on a few dozen cells one partition can flip the choice)


def check_selection_parts(parts: int, flag: str) -> None:
    """Refuse a ``selection_parts`` that is neither 0 (in-sample) nor a number of parts >= 2 (``flag``: the flag to name)."""
    if parts < 0 or parts == 1:
        raise ValueError(f"{flag} must be 0 (in-sample) or at least 2, got {parts}")


def check_selection_repeats(repeats: int, flag: str) -> None:
    """Refuse a ``selection_repeats`` below 1 (``flag``: the flag to name)."""
    if repeats < 1:
        raise ValueError(f"{flag} must be at least 1 (the random partitions the cross-fitted RMSE is averaged over), got {repeats}")


LOGISTIC_C = 1e4  # inverse L2 strength on the weights (not the intercept), as scikit-learn's LogisticRegression(C=1e4)


def logistic_fit(x: np.ndarray, y: np.ndarray, c: float = LOGISTIC_C, tol: float = 1e-10, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising ``sum_i logloss(y_i, x_i w + b) + |w|^2 / (2 c)``: scikit-learn's
    ``LogisticRegression(C=c)`` objective, solved by Newton's method to a tight optimum.

    The calibration has 2-4 columns and millions of rows: each Newton step is a few passes over ``x`` and a
    tiny solve, and ~10 steps reach the optimum, where scikit-learn's default lbfgs took 12-23 gradient
    passes of its own (3-5 s a fit at 1.6 M rows; 204 fits for 200 MOp cells, 765 of the calibration's 885 s)
    and stopped short of the optimum at its tolerance (coefficients off by up to 0.07). Starts from the
    intercept-only optimum; stops when the largest gradient entry, per row, is under ``tol`` or the Newton step
    would lower the objective by less than its rounding; a step is halved until the objective does not rise.
    """
    from scipy.special import expit

    y = np.asarray(y, dtype=np.float64)
    n, k = np.shape(x)
    design = np.empty((k + 1, n))  # one contiguous row per column: the passes below read it row by row
    design[:k] = np.asarray(x, dtype=np.float64).T
    design[k] = 1.0
    penalty = np.full(k + 1, 1.0 / c)
    penalty[k] = 0.0
    w = np.zeros(k + 1)
    rate = float(np.clip(y.mean(), 1e-12, 1.0 - 1e-12)) if n else 0.5
    w[k] = np.log(rate / (1.0 - rate))

    def evaluate(w: np.ndarray) -> tuple[np.ndarray, float]:
        # log(1 + e^eta) = -log(1 - sigmoid(eta)), with 1 - sigmoid(eta) = sigmoid(-eta) computed as such (no cancellation)
        eta = w @ design
        closed = expit(-eta)
        value = float(-np.sum(np.log(closed)) - y @ eta + 0.5 * np.sum(penalty * w * w))
        return closed, value

    closed, value = evaluate(w)
    for _ in range(max_iter):
        p = 1.0 - closed
        gradient = design @ (p - y) + penalty * w
        if np.max(np.abs(gradient)) / max(n, 1) < tol:
            break
        hessian = (design * (p * closed)) @ design.T + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        if gradient @ step <= 1e-12 * (abs(value) + 1.0):
            # the Newton decrement: the step would lower the objective by less than its rounding; take it and stop
            w = w - step
            break
        for _ in range(50):
            trial = w - step
            trial_closed, trial_value = evaluate(trial)
            if trial_value <= value:
                break
            step = step / 2.0
        else:
            break  # no decrease along the Newton direction: at the optimum to rounding
        w, closed, value = trial, trial_closed, trial_value
    return w[:k], float(w[k])


def _fit_aggregation(features: dict[str, np.ndarray], dense_truth: np.ndarray, direction: str, meta: dict, aggregation: str,
                     rng: np.random.Generator, max_entries: int) -> dict | None:
    """One aggregation's calibration fitted on all the given cells (``None`` when the targets are all 0 or all 1).

    ATAC: a logistic regression (:func:`logistic_fit`) on at most ``max_entries`` (cell, peak) entries drawn at
    random; only the drawn entries of the design are built.
    """
    if direction == "gex2atac":
        n_features = dense_truth.shape[1]
        y = dense_truth.ravel() > 0
        pick = rng.choice(len(y), size=min(max_entries, len(y)), replace=False)
        if y[pick].all() or not y[pick].any():
            return None
        rows, columns = np.divmod(pick, n_features)
        x = np.stack([np.broadcast_to(c, dense_truth.shape)[rows, columns] for c in _atac_design(features, aggregation, meta)], axis=1)
        coef, intercept = logistic_fit(x, y[pick])
        return {"aggregation": aggregation, "coef": coef.tolist(), "intercept": intercept}
    design = np.stack([np.asarray(d).ravel() for d in _gex_design(features, aggregation, meta)], axis=1)
    coef, *_ = np.linalg.lstsq(design, dense_truth.ravel(), rcond=None)
    return {"aggregation": aggregation, "coef": coef.tolist()}


def cross_fitted_readout(features: dict[str, np.ndarray], dense_truth: np.ndarray, direction: str, meta: dict, aggregation: str,
                         parts: int, seed: int, max_entries: int = 2_000_000):
    """Held-out readings of ``aggregation``: yields ``(rows, prediction)`` for each of ``parts`` random parts of the cells
    (seed ``seed``), predicted by the calibration fitted on the other parts; yields ``(rows, None)`` and stops when the targets
    of the other parts are all 0 or all 1."""
    n = dense_truth.shape[0]
    part = np.random.default_rng(seed).permutation(n) % parts
    rng = np.random.default_rng(seed + 1)
    for k in range(parts):
        fit_rows, held = np.flatnonzero(part != k), np.flatnonzero(part == k)
        params = _fit_aggregation({key: v[fit_rows] for key, v in features.items()}, dense_truth[fit_rows], direction, meta, aggregation,
                                  rng, max_entries)
        if params is None:
            yield held, None
            return
        yield held, apply_readout({key: v[held] for key, v in features.items()}, direction, meta, params)


def _cross_fitted_rmse(features: dict[str, np.ndarray], dense_truth: np.ndarray, direction: str, meta: dict, aggregations: Sequence[str],
                       parts: int, seed: int, max_entries: int, repeats: int = 1, deadline: float | None = None) -> tuple[dict[str, float] | None, int]:
    """RMSE of each of ``aggregations`` over all cells, each part predicted by the calibration fitted on the other parts, and
    the number of partitions it was averaged over.

    With ``repeats`` > 1 the squared errors are averaged over that many random partitions (seeds ``seed``,
    ``seed + 1``, ...): on 46 cells one partition's verdict between two readouts can be the reverse of most others'.
    Every candidate is scored on the same partitions; with ``deadline`` (a ``time.perf_counter()`` value) no further
    partition is begun once it has passed (at least one is). None: a part whose other parts' targets are all 0 or all 1.
    """
    squared = dict.fromkeys(aggregations, 0.0)
    done = 0
    for repeat in range(repeats):
        if done and deadline is not None and time.perf_counter() > deadline:
            break
        for name in aggregations:
            for held, prediction in cross_fitted_readout(features, dense_truth, direction, meta, name, parts, seed + repeat, max_entries):
                if prediction is None:
                    return None, done
                squared[name] += float(np.sum((prediction - dense_truth[held]) ** 2))
        done += 1
    return {name: float(np.sqrt(value / (dense_truth.size * done))) for name, value in squared.items()}, done


def fit_readout(features: dict[str, np.ndarray], truth: sp.spmatrix, direction: str, meta: dict, seed: int = 0, max_entries: int = 2_000_000,
                aggregations: Sequence[str] = AGGREGATIONS, selection_parts: int = SELECTION_PARTS,
                selection_repeats: int = SELECTION_REPEATS, deadline: float | None = None) -> dict:
    """Fit the calibration of one direction on validation cells; try each aggregation and keep the best.

    Parameters
    ----------
    features
        Output of :func:`decode_features` for the validation cells.
    truth
        The matching truth matrix (:func:`dataset_builder.records.truth_matrices`).
    max_entries
        The logistic regression sees at most this many (cell, peak) entries, drawn at random.
    aggregations
        The candidates tried (default: all of :data:`AGGREGATIONS`; those whose features are missing are skipped).
    selection_parts
        With two or more candidates and at least twice this many cells, the kept aggregation is the one with the
        lowest RMSE *cross-fitted* over this many parts of the cells (each part predicted by the calibration fitted on
        the others), so that a readout with more coefficients is not kept for fitting the very cells it is scored on
        (GEX ``profile_depth`` can lower the in-sample RMSE and raise the cross-fitted one). Its coefficients
        are then fitted on all the cells. ``0`` (or too few cells): the lowest in-sample RMSE.
    selection_repeats
        The cross-fitted RMSE is averaged over this many random partitions (1: a single
        partition, whose verdict on a few dozen cells can be the reverse of most other partitions').
    deadline
        A ``time.perf_counter()`` value (a time budget): no further random partition is begun once it has passed (at
        least one is); ``selection`` says how many were averaged.

    Returns
    -------
    The direction's ``readout.json`` entry: ``aggregation``, ``coef``, ``intercept`` (ATAC),
    ``validation_rmse`` of each aggregation (in-sample), ``validation_rmse_cross_fitted`` (when selection was
    cross-fitted), ``selection``, and ``validation_rmse_mean`` (the per-feature mean baseline).
    """
    rng = np.random.default_rng(seed)
    dense_truth = truth.toarray()
    candidates: dict[str, dict] = {}
    check_aggregations(aggregations)
    for aggregation in aggregations:
        if _feature_key(aggregation) not in features or (aggregation == "profile_depth" and "source_length" not in features):
            continue  # profile_depth needs the source sizes
        params = _fit_aggregation(features, dense_truth, direction, meta, aggregation, rng, max_entries)
        if params is None:
            continue
        params["rmse"] = _rmse(apply_readout(features, direction, meta, params), truth)
        candidates[aggregation] = params
    if not candidates:
        raise ValueError("validation cells are all accessible or all closed; calibration needs both")
    n_cells = int(truth.shape[0])
    cross_fitted, repeats = {}, 0
    if selection_parts >= 2 and len(candidates) > 1 and n_cells >= 2 * selection_parts:
        cross_fitted, repeats = _cross_fitted_rmse(features, dense_truth, direction, meta, list(candidates), selection_parts, seed, max_entries,
                                                   selection_repeats, deadline)
        cross_fitted = cross_fitted or {}  # a part with all targets 0 or 1: score in-sample instead
    if cross_fitted:
        best = candidates[min(cross_fitted, key=lambda name: (cross_fitted[name], candidates[name]["rmse"]))]
    else:
        best = min(candidates.values(), key=lambda p: p["rmse"])
    mean = _train_stat(features, meta, "atac_mean" if direction == "gex2atac" else "gex_mean")
    result = {k: v for k, v in best.items() if k != "rmse"}
    result["validation_rmse"] = {name: p["rmse"] for name, p in candidates.items()}
    if cross_fitted:
        result["validation_rmse_cross_fitted"] = cross_fitted
    averaged = f", averaged over {repeats} random partitions" if repeats > 1 else ""
    cut = f" (of {selection_repeats}: the time budget)" if cross_fitted and repeats < selection_repeats else ""
    result["selection"] = f"cross-fitted over {selection_parts} parts of the cells{averaged}{cut}" if cross_fitted else "in-sample"
    result["validation_rmse_mean"] = _rmse(np.broadcast_to(mean, dense_truth.shape), truth)
    result["validation_rmse_uncalibrated"] = _rmse(apply_readout(features, direction, meta, None), truth)
    result["n_cells"] = n_cells
    return result
