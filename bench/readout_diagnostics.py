"""Diagnostics of a trained model's readout on the validation split (nothing here reads test cells).

- ``kernel``: RBF kernel ridge on the profile head's inputs (the model's states, standardised; Nystroem landmarks;
  width as a multiple of the median squared distance), fitted either to the targets over the per-feature train mean
  (``direct``) or to the residual of the model's own calibrated readout on the train cells (``residual``); the
  validation RMSE of every setting beside the model's.
- ``centre``: the profile head refit (``translator.profile_fit.fit_profile_rows``) on the states as they are and with
  each batch's (library's / donor's) mean state replaced by the train mean; validation RMSE before calibration.
- ``ensemble``: the mean of several models' predicted matrices (``--model`` and ``--members``), scored with the
  metrics core (RMSE, per-cell Pearson, AUROC, AP) beside each member alone.
- ``bootstrap``: how well the validation split can rank the model against the tuned baselines: a paired bootstrap over
  its cells of the RMSE difference (model minus baseline).
- ``sampled``: a "several sampled sentences" readout: ``--samples`` sentences drawn per validation cell
  (each step's name drawn from its distribution at ``--temperature``), read two ways (the share of draws naming each
  feature; the mean of the drawn paths' step-probability aggregates) and calibrated as the greedy readout's
  aggregates are, against the profile readout and the greedy sentence, all cross-fitted over ``--parts``, and the best
  blend of each with the profile readout (an upper bound on what the draws add).
- ``crossfit``: the calibration scored on cells it was not fitted on. ``train.py`` fits ``readout.json``'s calibration
  on the validation cells that ``eval.py --split validation`` then scores, so a readout with more coefficients looks
  better there than it is. This splits the validation cells into ``--parts`` parts, fits the calibration (the same
  ``fit_readout`` rule: the lowest RMSE among ``--aggregations``) on all parts but one and predicts that one, for
  every part, and writes for each aggregation set an ``eval_results.json`` of the pooled predictions (the metrics
  core's RMSE, per-cell Pearson, AUROC, AP) that ``python -m evaluation.crossval pool`` reads as a candidate; beside it
  the in-sample figures (fitted and scored on all cells, what ``eval.py`` reports).

- ``foldpool``: the calibration fitted on the cells of several cross-validation folds at once (more cells to
  calibrate on). ``--model`` / ``--dataset_dir`` and ``--members`` / ``--member_dataset_dirs`` are the fold models
  with the dataset folders whose validation split is each one's held-out fold. For every fold ``k`` the calibration
  (the same ``fit_readout`` rule over each arm) is fitted on the other folds' cells as their own fold models read
  them, plus, for each of ``--parts`` parts of fold ``k``, the rest of fold ``k`` as its model reads it, and predicts
  that part with fold ``k``'s model (arm ``pooled``); ``others``: fitted on the other folds' cells only. Each row keeps
  the per-feature train mean of the model that read it. Writes ``<output_dir>/fold_<k>/<mode>/<arm>/eval_results.json``
  for ``python -m evaluation.crossval pool``.

Usage::

    python bench/readout_diagnostics.py kernel --model models/mop --dataset_dir data/mop
    python bench/readout_diagnostics.py centre --model models/mop --dataset_dir data/mop
    python bench/readout_diagnostics.py bootstrap --model models/bmmc --dataset_dir data/bmmc
    python bench/readout_diagnostics.py ensemble --model models/mop --members models/mop_seed7 --dataset_dir data/mop
    python bench/readout_diagnostics.py sampled --model models/mop --dataset_dir data/mop --samples 8
    python bench/readout_diagnostics.py crossfit --model m_0 --dataset_dir f0 --arms profile profile,profile_depth \
        --output_dir crossfit_0     # writes crossfit_0/<arm>/eval_results.json
    python bench/readout_diagnostics.py foldpool --model m_0 --dataset_dir f0 --members m_1 m_2 m_3 m_4 \
        --member_dataset_dirs f1 f2 f3 f4 --dataset_name bmmc --output_dir foldpool_m

Each writes ``bench/results/readout_<command>[_<tag>].json`` (``--results_dir`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from bench_common import write_results

from evaluation.crossval import ranked_keys
from tokenizer import DIRECTIONS
from tokenizer import SOURCE_MODALITY as SOURCE
from translator.data import TARGET_MODALITY as TARGET


def _load(model: str, dataset_dir: str):
    from dataset_builder.records import load_split_matrices
    from translator.api import CellTranslator

    return CellTranslator.from_pretrained(model), load_split_matrices(dataset_dir, "train"), load_split_matrices(dataset_dir, "validation")


def _states(translator, split: dict, direction: str) -> tuple[list[str], torch.Tensor]:
    from dataset_builder.records import source_sentences
    from translator.profile_fit import profile_states

    sentences = source_sentences(split, direction, translator.meta)
    return sentences, profile_states(translator.model, translator.encode_sources(sentences, direction, allow_empty=True))


def _rmse(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((prediction - truth) ** 2)))


def kernel(translator, train: dict, val: dict, directions: Sequence[str], gamma_scales: Sequence[float], ridges: Sequence[float],
           landmarks: int, seed: int = 0) -> dict:
    from sklearn.kernel_approximation import Nystroem

    out = {}
    for direction in directions:
        target = TARGET[direction]
        y_train, y_val = train[target].tocsr().astype(np.float32), val[target].toarray().astype(np.float32)
        s_train, x_train = _states(translator, train, direction)
        s_val, x_val = _states(translator, val, direction)
        model_train, model_val = translator.predict_matrix(s_train, direction), translator.predict_matrix(s_val, direction)
        mean = np.asarray(y_train.mean(0)).ravel()
        upper = 1.0 if target == "atac" else None
        mu, sd = x_train.double().mean(0).numpy(), x_train.double().std(0).numpy() + 1e-8
        z_train, z_val = (x_train.double().numpy() - mu) / sd, (x_val.double().numpy() - mu) / sd
        rng = np.random.default_rng(seed)
        sample = z_train[rng.choice(len(z_train), size=min(1000, len(z_train)), replace=False)]
        d2 = ((sample[:, None] - sample[None]) ** 2).sum(-1)
        median = float(np.median(d2[np.triu_indices(len(sample), 1)])) or 1.0
        grid = []
        for scale in gamma_scales:
            mapper = Nystroem(kernel="rbf", gamma=scale / median, n_components=min(landmarks, len(z_train)), random_state=seed).fit(z_train)
            f_train, f_val = mapper.transform(z_train), mapper.transform(z_val)
            evals, evecs = np.linalg.eigh(f_train.T @ f_train)
            yt_f = np.asarray((y_train.T @ f_train).T)  # f' Y, [landmarks, features]
            for fit, rhs, base in (("direct", yt_f - np.outer(f_train.sum(0), mean), np.broadcast_to(mean, y_val.shape)),
                                   ("residual", yt_f - f_train.T @ model_train, model_val)):
                proj = evecs.T @ rhs
                for ridge in ridges:
                    coef = evecs @ (proj / (np.maximum(evals, 0.0) + ridge)[:, None])
                    prediction = np.clip(base + f_val @ coef, 0.0, upper)
                    grid.append({"fit": fit, "gamma_scale": scale, "ridge": ridge, "validation_rmse": _rmse(prediction, y_val)})
        best = {fit: min((g for g in grid if g["fit"] == fit), key=lambda g: g["validation_rmse"]) for fit in ("direct", "residual")}
        out[direction] = {"train_cells": len(z_train), "validation_cells": len(z_val), "state_width": int(x_train.shape[1]),
                          "model_validation_rmse": _rmse(model_val, y_val), "mean_validation_rmse": _rmse(np.broadcast_to(mean, y_val.shape), y_val),
                          "best": best, "grid": grid}
        print(f"{direction}: model {out[direction]['model_validation_rmse']:.6f}, direct {best['direct']['validation_rmse']:.6f}, "
              f"residual {best['residual']['validation_rmse']:.6f}", flush=True)
    return out


def centre_by_batch(x: torch.Tensor, batches: Sequence[str], reference: torch.Tensor) -> torch.Tensor:
    """Each batch's mean row of ``x`` replaced by ``reference``."""
    x = x.clone()
    labels = np.asarray(batches)
    for value in np.unique(labels):
        rows = torch.from_numpy(np.flatnonzero(labels == value))
        x[rows] = x[rows] - x[rows].mean(0) + reference
    return x


def centre(translator, train: dict, val: dict, directions: Sequence[str], dataset_dir: str) -> dict:
    from translator.profile_fit import fit_profile_rows
    from translator.readout import profile_offsets

    if train["batch"] is None or val["batch"] is None:
        raise SystemExit(f"--dataset_dir {dataset_dir} has no batch column; centring needs each cell's batch (library or donor)")
    offsets = profile_offsets(translator.tokenizer, translator.meta)
    out = {}
    for direction in directions:
        target = TARGET[direction]
        offset, binary = offsets[translator.ranges[target][0]]
        _, x_train = _states(translator, train, direction)
        _, x_val = _states(translator, val, direction)
        reference = x_train.mean(0)
        rows = {}
        for label, (a, b) in {"plain": (x_train, x_val),
                              "centred": (centre_by_batch(x_train, train["batch"], reference), centre_by_batch(x_val, val["batch"], reference))}.items():
            _, _, report = fit_profile_rows(a, train[target], b, val[target], offset.float(), binary)
            rows[label] = {"l2": report["l2"], "validation_rmse": report["validation_rmse"][str(report["l2"])]}
        out[direction] = {**rows, "mean_validation_rmse": report["validation_rmse_mean"],
                          "train_batches": sorted(set(train["batch"])), "validation_batches": sorted(set(val["batch"]))}
        print(f"{direction}: plain {rows['plain']['validation_rmse']:.6f}, centred {rows['centred']['validation_rmse']:.6f}", flush=True)
    return out


def bootstrap(translator, train: dict, val: dict, directions: Sequence[str], resamples: int, seed: int = 0) -> dict:
    from dataset_builder.records import source_sentences
    from evaluation.baselines import fit_baselines

    rng = np.random.default_rng(seed)
    out = {}
    for direction in directions:
        source, target = SOURCE[direction], TARGET[direction]
        truth = val[target].toarray()
        model_error = ((translator.predict_matrix(source_sentences(val, direction, translator.meta), direction) - truth) ** 2).mean(1)
        models, _ = fit_baselines(source, target, (train[source], train[target]), (val[source], val[target]), names=("mean", "svd_knn", "svd_krr"))
        draws = rng.integers(0, len(truth), size=(resamples, len(truth)))
        out[direction] = {}
        for name, baseline in models.items():
            error = ((np.vstack(list(baseline.predict_chunks(val[source]))) - truth) ** 2).mean(1)
            diffs = np.sqrt(model_error[draws].mean(1)) - np.sqrt(error[draws].mean(1))
            out[direction][name] = {"model_rmse": float(np.sqrt(model_error.mean())), "baseline_rmse": float(np.sqrt(error.mean())),
                                    "difference": float(np.sqrt(model_error.mean()) - np.sqrt(error.mean())),
                                    "bootstrap_sd": float(diffs.std()), "share_model_ahead": float((diffs < 0).mean())}
            row = out[direction][name]
            print(f"{direction} vs {name}: difference {row['difference']:+.6f}, sd {row['bootstrap_sd']:.6f}, model ahead in {row['share_model_ahead']:.1%}")
    return out


def ensemble(translator, members: Sequence[str], val: dict, directions: Sequence[str]) -> dict:
    from dataset_builder.records import source_sentences
    from translator.api import CellTranslator
    from translator.metrics_core import compute_metrics

    models = [translator, *(CellTranslator.from_pretrained(m) for m in members)]
    out = {}
    for direction in directions:
        target = TARGET[direction]
        predictions = [m.predict_matrix(source_sentences(val, direction, m.meta), direction) for m in models]
        rows = {}
        for label, matrix in [*((f"member_{i}", p) for i, p in enumerate(predictions)), ("ensemble", np.mean(predictions, axis=0))]:
            metrics = compute_metrics(matrix, val[target], target)["metrics"]
            rows[label] = {k: float(metrics[k]) for k in ranked_keys(metrics)}
        out[direction] = rows
        print(f"{direction}: " + ", ".join(f"{label} {row['rmse']:.6f}" for label, row in rows.items()), flush=True)
    return out


def _partition(val: dict, parts: int, seed: int, selection_parts: int | None, selection_repeats: int | None) -> tuple[np.ndarray, int, int]:
    """Each validation cell's part (``parts`` random parts), and ``fit_readout``'s selection settings with its defaults filled in."""
    from translator.readout import SELECTION_PARTS, SELECTION_REPEATS

    n = val["gex"].shape[0]
    if not 2 <= parts <= n:
        raise SystemExit(f"--parts must be from 2 to the {n} validation cells, got {parts}")
    part = np.random.default_rng(seed).permutation(n) % parts
    return (part, SELECTION_PARTS if selection_parts is None else selection_parts,
            SELECTION_REPEATS if selection_repeats is None else selection_repeats)


def _cross_fitted(features: dict[str, np.ndarray], truth, direction: str, meta: dict, arm: Sequence[str], part: np.ndarray, seed: int,
                  selection_parts: int, selection_repeats: int) -> tuple[np.ndarray, list[str]]:
    """Each part's prediction from the calibration (``fit_readout`` over ``arm``) fitted on the other parts; the aggregation each kept."""
    from translator.readout import apply_readout, fit_readout

    prediction = np.zeros(truth.shape, dtype=np.float32)
    chosen = []
    for k in range(int(part.max()) + 1):
        fit_rows, held = np.flatnonzero(part != k), np.flatnonzero(part == k)
        params = fit_readout({key: v[fit_rows] for key, v in features.items()}, truth[fit_rows], direction, meta, seed=seed,
                             aggregations=arm, selection_parts=selection_parts, selection_repeats=selection_repeats)
        prediction[held] = apply_readout({key: v[held] for key, v in features.items()}, direction, meta, params)
        chosen.append(params["aggregation"])
    return prediction, chosen


def sampled_features(translator, source_ids: Sequence[np.ndarray], direction: str, samples: int, temperature: float, seed: int = 0,
                     batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """Per-feature aggregates of ``samples`` sentences drawn per cell (``constrained_decode`` with a generator).

    Two estimates from the same draws, each a features dict that ``fit_readout`` calibrates exactly as it does the
    greedy step aggregates (plus ``profile`` and ``source_length`` as ``decode_features`` gives them):

    - ``share``: ``noisy_or`` and ``sum`` are the share of the draws that name the feature; ``weighted`` (GEX
      targets) the mean over the draws of the train mean value at the rank where the gene was named (0 where not);
    - ``paths``: the mean over the draws of each drawn path's step-probability aggregates (``noisy_or``, ``sum``,
      ``weighted``, as the greedy readout aggregates its one path): the same quantity with far less variance than
      the share of a few draws.
    """
    from translator.decode import constrained_decode
    from translator.readout import decode_features, pad_sources

    start, stop = translator.ranges[TARGET[direction]]
    profile, _ = decode_features(translator.model, translator.tokenizer, translator.meta, source_ids, direction, (start, stop),
                                 translator.max_target_length, decode=False, profile_head=translator.profile_head)
    rank_value = np.asarray(translator.meta["train_stats"]["rank_value"], dtype=np.float32)

    def step_weight(step: int) -> float:
        return float(rank_value[min(step, len(rank_value) - 1)]) if len(rank_value) else 0.0

    ordered = direction == "gex2atac" or translator.meta.get("gex_target_order", "rank") == "gene"
    shape = (len(source_ids), stop - start)
    share = {key: np.zeros(shape, dtype=np.float32) for key in ("noisy_or", "weighted")}
    paths = {key: np.zeros(shape, dtype=np.float32) for key in ("noisy_or", "sum", "weighted")}
    generator = torch.Generator().manual_seed(seed)
    order = np.argsort([-len(s) for s in source_ids], kind="stable")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, translator.model.config.d_model // 256)))  # as decode_features: narrow steps
    try:
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            input_ids, mask = pad_sources(source_ids, rows)
            for _ in range(samples):
                result = constrained_decode(translator.model, input_ids, mask, (start, stop), ordered=ordered, max_new_tokens=translator.max_target_length,
                                            step_weight=step_weight, generator=generator, temperature=temperature)
                for key in paths:
                    paths[key][rows] += result.aggregates[key].numpy() / samples
                for i, r in enumerate(rows):
                    named = np.asarray(result.sequences[i], dtype=np.int64) - start
                    share["noisy_or"][r, named] += 1.0 / samples
                    if len(named) and len(rank_value):
                        share["weighted"][r, named] += rank_value[np.minimum(np.arange(len(named)), len(rank_value) - 1)] / samples
    finally:
        torch.set_num_threads(threads)
    share["sum"] = share["noisy_or"].copy()
    return {name: {**profile, **estimate} for name, estimate in (("share", share), ("paths", paths))}


def sampled(translator, val: dict, directions: Sequence[str], samples: int, temperature: float, parts: int, seed: int = 0,
            selection_parts: int | None = None, selection_repeats: int | None = None) -> dict:
    """A "several sampled sentences" readout against the profile readout, all calibrated cross-fitted.

    Arms: ``profile,profile_depth`` (the readout ``train.py`` calibrates), ``greedy`` (the one greedy sentence's step
    aggregates), ``sampled share`` and ``sampled paths`` (``samples`` sentences a cell, the two
    estimates of :func:`sampled_features`), and for each sampled arm the best blend ``w * sampled + (1 - w) * profile``
    over a grid of ``w``, chosen on the same pooled cross-fitted predictions it is scored on: an upper bound on what
    the draws add to the profile readout.
    """
    from dataset_builder.records import source_sentences
    from translator.metrics_core import compute_metrics
    from translator.readout import decode_features

    part, selection_parts, selection_repeats = _partition(val, parts, seed, selection_parts, selection_repeats)
    out = {}
    for direction in directions:
        target = TARGET[direction]
        truth = val[target].tocsr()
        ids = translator.encode_sources(source_sentences(val, direction, translator.meta), direction, allow_empty=True)
        began = time.perf_counter()
        greedy, greedy_ids = decode_features(translator.model, translator.tokenizer, translator.meta, ids, direction, translator.ranges[target],
                                    translator.max_target_length, profile_head=translator.profile_head)
        greedy_seconds = time.perf_counter() - began
        began = time.perf_counter()
        drawn = sampled_features(translator, ids, direction, samples, temperature, seed)
        seconds = time.perf_counter() - began
        aggregation = ["noisy_or", "sum"]  # the decoded aggregates fit_readout chooses between
        arms = {"profile,profile_depth": (greedy, ["profile", "profile_depth"]), "greedy": (greedy, aggregation),
                "sampled share": (drawn["share"], aggregation), "sampled paths": (drawn["paths"], aggregation)}
        predictions, rows = {}, {}
        for name, (features, arm) in arms.items():
            predictions[name], chosen = _cross_fitted(features, truth, direction, translator.meta, arm, part, seed, selection_parts, selection_repeats)
            rows[name] = {"aggregation_per_part": chosen}
        dense = truth.toarray()
        profile = predictions["profile,profile_depth"]
        for name in ("sampled share", "sampled paths"):
            blends = {w: _rmse(w * predictions[name] + (1 - w) * profile, dense) for w in np.linspace(0, 1, 11)}
            best = min(blends, key=blends.get)
            predictions[f"best blend, {name}"] = best * predictions[name] + (1 - best) * profile
            rows[f"best blend, {name}"] = {"weight_of_sampled": float(best), "rmse_by_weight": {f"{w:.1f}": r for w, r in blends.items()}}
        for name, prediction in predictions.items():
            metrics = compute_metrics(prediction, truth, target)["metrics"]
            rows[name]["cross_fitted"] = {k: float(metrics[k]) for k in ranked_keys(metrics)}
        rows["greedy"].update(mean_names=float(np.mean([len(s) for s in greedy_ids])), seconds=round(greedy_seconds, 1))
        rows["sampled share"].update(mean_names_per_draw=float(drawn["share"]["sum"].sum(axis=1).mean()), seconds=round(seconds, 1))
        out[direction] = rows
        print(f"{direction}: " + ", ".join(f"{name} {row['cross_fitted']['rmse']:.6f}" for name, row in rows.items())
              + f" ({samples} draws a cell in {seconds:.0f} s, greedy {greedy_seconds:.0f} s)", flush=True)
    return out


def crossfit(translator, val: dict, directions: Sequence[str], arms: Sequence[Sequence[str]], parts: int, dataset: str,
             output_dir: str | None, seed: int = 0, selection_parts: int | None = None, selection_repeats: int | None = None) -> dict:
    """Cross-fitted calibration of each arm (a set of aggregations); see the module docstring."""
    from dataset_builder.outputs import write_text_atomic
    from dataset_builder.records import source_sentences
    from translator.metrics_core import compute_metrics
    from translator.readout import apply_readout, decode_features, fit_readout

    part, selection_parts, selection_repeats = _partition(val, parts, seed, selection_parts, selection_repeats)
    n = len(part)
    out, results = {}, {",".join(arm): {"dataset": dataset, "split": "validation", "n_cells": n, "directions": {},
                                             "readout": f"calibration cross-fitted over {parts} parts of the validation cells"}
                        for arm in arms}
    for direction in directions:
        target = TARGET[direction]
        truth = val[target].tocsr()
        ids = translator.encode_sources(source_sentences(val, direction, translator.meta), direction, allow_empty=True)
        features, _ = decode_features(translator.model, translator.tokenizer, translator.meta, ids, direction, translator.ranges[target],
                                      translator.max_target_length, decode=False, profile_head=translator.profile_head)
        out[direction] = {}
        for arm in arms:
            prediction, chosen = _cross_fitted(features, truth, direction, translator.meta, arm, part, seed, selection_parts, selection_repeats)
            in_sample = fit_readout(features, truth, direction, translator.meta, seed=seed, aggregations=arm, selection_parts=selection_parts,
                                     selection_repeats=selection_repeats)
            metrics = compute_metrics(prediction, truth, target)["metrics"]
            fitted = compute_metrics(apply_readout(features, direction, translator.meta, in_sample), truth, target)["metrics"]
            row = {"cross_fitted": {k: float(metrics[k]) for k in ranked_keys(metrics)},
                   "in_sample": {k: float(fitted[k]) for k in ranked_keys(fitted)},
                   "aggregation_per_part": chosen, "aggregation_in_sample": in_sample["aggregation"]}
            out[direction][",".join(arm)] = row
            results[",".join(arm)]["directions"][direction] = {"model": row["cross_fitted"]}
            print(f"{direction} {','.join(arm)}: cross-fitted RMSE {row['cross_fitted']['rmse']:.6f}, in-sample {row['in_sample']['rmse']:.6f} "
                  f"({', '.join(chosen)})", flush=True)
    if output_dir:
        for name, result in results.items():
            write_text_atomic(Path(output_dir) / name / "eval_results.json", json.dumps(result, indent=2) + "\n")
    return out


def foldpool(models: Sequence[str], dataset_dirs: Sequence[str], directions: Sequence[str], arms: Sequence[Sequence[str]], parts: int,
             dataset: str, output_dir: str | None, seed: int = 0, selection_parts: int | None = None, selection_repeats: int | None = None) -> dict:
    """The calibration fitted on pooled folds (see the module docstring): for each fold, arm and mode, the fold's metrics."""
    from dataset_builder.outputs import write_text_atomic
    from dataset_builder.records import load_split_matrices, source_sentences
    from translator.api import CellTranslator
    from translator.metrics_core import compute_metrics
    from translator.readout import apply_readout, decode_features, fit_readout, with_row_stats

    if len(models) != len(dataset_dirs) or len(models) < 2:
        raise SystemExit(f"foldpool needs one --member_dataset_dirs entry per --members model and at least 2 folds, got {len(models)} models and {len(dataset_dirs)} folders")
    folds = []
    for model, dataset_dir in zip(models, dataset_dirs, strict=True):
        translator, val = CellTranslator.from_pretrained(model), load_split_matrices(dataset_dir, "validation")
        part, selection_parts, selection_repeats = _partition(val, parts, seed, selection_parts, selection_repeats)
        features = {}
        for direction in directions:
            ids = translator.encode_sources(source_sentences(val, direction, translator.meta), direction, allow_empty=True)
            features[direction], _ = decode_features(translator.model, translator.tokenizer, translator.meta, ids, direction,
                                                     translator.ranges[TARGET[direction]], translator.max_target_length, decode=False,
                                                     profile_head=translator.profile_head)
            with_row_stats(features[direction], translator.meta, len(ids))  # each cell keeps the statistics of the model that read it
        folds.append({"meta": translator.meta, "val": val, "part": part, "features": features})

    def fit(direction, arm, rows):  # rows: (fold index, cell indices) read by that fold's model, each with its model's train means
        feats = [{key: v[r] for key, v in folds[i]["features"][direction].items()} for i, r in rows]
        pooled = {key: np.concatenate([f[key] for f in feats]) for key in feats[0]}
        truth = sp.vstack([folds[i]["val"][TARGET[direction]].tocsr()[r] for i, r in rows]).tocsr()
        return fit_readout(pooled, truth, direction, folds[0]["meta"], seed=seed, aggregations=arm, selection_parts=selection_parts,
                           selection_repeats=selection_repeats)

    out = {}
    for k, fold in enumerate(folds):
        out[f"fold_{k}"] = {}
        others = [(i, np.arange(f["val"]["gex"].shape[0])) for i, f in enumerate(folds) if i != k]
        for direction in directions:
            target = TARGET[direction]
            truth, features = fold["val"][target].tocsr(), fold["features"][direction]
            for arm in arms:
                name = ",".join(arm)
                predictions, chosen = {}, {}
                params = fit(direction, arm, others)
                predictions["others"] = apply_readout(features, direction, fold["meta"], params)
                chosen["others"] = [params["aggregation"]]
                prediction, chosen["pooled"] = np.zeros(truth.shape, dtype=np.float32), []
                for p in range(int(fold["part"].max()) + 1):
                    fit_rows, held = np.flatnonzero(fold["part"] != p), np.flatnonzero(fold["part"] == p)
                    params = fit(direction, arm, [*others, (k, fit_rows)])
                    prediction[held] = apply_readout({key: v[held] for key, v in features.items()}, direction, fold["meta"], params)
                    chosen["pooled"].append(params["aggregation"])
                predictions["pooled"] = prediction
                for mode, matrix in predictions.items():
                    metrics = compute_metrics(matrix, truth, target)["metrics"]
                    row = {m: float(metrics[m]) for m in ranked_keys(metrics)}
                    out[f"fold_{k}"].setdefault(mode, {}).setdefault(name, {})[direction] = {"metrics": row, "aggregations": chosen[mode]}
                    if output_dir:
                        path = Path(output_dir) / f"fold_{k}" / mode / name / "eval_results.json"
                        result = json.loads(path.read_text()) if path.exists() else {
                            "dataset": dataset, "split": "validation", "n_cells": int(truth.shape[0]), "directions": {},
                            "readout": f"calibration fitted on the other folds' cells ({mode})"}
                        result["directions"][direction] = {"model": row}
                        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
                    print(f"fold {k} {direction} {name} {mode}: RMSE {row['rmse']:.6f} ({', '.join(chosen[mode])})", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("kernel", "centre", "bootstrap", "ensemble", "crossfit", "sampled", "foldpool"))
    parser.add_argument("--model", required=True, help="model folder written by train.py")
    parser.add_argument("--dataset_dir", required=True, help="dataset folder (train and validation splits are read)")
    parser.add_argument("--members", nargs="+", default=[], help="ensemble: the other model folders averaged with --model; foldpool: the other folds' models")
    parser.add_argument("--member_dataset_dirs", nargs="+", default=[], help="foldpool: each --members model's dataset folder (its validation split the model's held-out fold)")
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument("--gamma_scales", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--ridges", nargs="+", type=float, default=[1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--landmarks", type=int, default=1500)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--arms", nargs="+", default=["profile", "profile,profile_depth"],
                        help="crossfit: each arm a comma-separated set of readout aggregations the calibration chooses from")
    parser.add_argument("--parts", type=int, default=5, help="crossfit, sampled: the validation cells are split into this many parts")
    parser.add_argument("--samples", type=int, default=8, help="sampled: sentences drawn per cell")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampled: the temperature of each step's draw")
    parser.add_argument("--selection_parts", type=int, help="crossfit: how each fit picks its aggregation (fit_readout's selection_parts; "
                        "default its own, cross-fitted over 5 parts; 0 = lowest in-sample RMSE)")
    parser.add_argument("--selection_repeats", type=int, help="crossfit: the random partitions each fit's cross-fitted RMSE is averaged over "
                        "(fit_readout's selection_repeats; default its own, 10; 1 = a single partition)")
    parser.add_argument("--dataset_name", help="crossfit: the name eval.py was given (--dataset_name), so crossval pool pairs the folds")
    parser.add_argument("--output_dir", help="crossfit: write <output_dir>/<arm>/eval_results.json for evaluation.crossval pool")
    parser.add_argument("--cpu_threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: one width, two ridges, 50 landmarks, 100 resamples")
    parser.add_argument("--tag", help="results file readout_<command>_<tag>.json (default readout_<command>.json)")
    parser.add_argument("--results_dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    if args.quick:
        args.gamma_scales, args.ridges, args.landmarks, args.resamples = [1.0], [1.0, 100.0], 50, 100
    started = time.perf_counter()
    if args.command == "foldpool":  # several models, each with its own folder: nothing to load here
        figures = foldpool([args.model, *args.members], [args.dataset_dir, *args.member_dataset_dirs], args.directions, [a.split(",") for a in args.arms],
                           args.parts, args.dataset_name or Path(args.dataset_dir).name, args.output_dir,
                           selection_parts=args.selection_parts, selection_repeats=args.selection_repeats)
        write_results("readout_foldpool" + (f"_{args.tag}" if args.tag else ""), {"models": [args.model, *args.members], "directions": figures,
                      "seconds": round(time.perf_counter() - started, 1)}, args.quick, args.results_dir)
        return 0
    translator, train, val = _load(args.model, args.dataset_dir)
    if args.command == "kernel":
        figures = kernel(translator, train, val, args.directions, args.gamma_scales, args.ridges, args.landmarks)
    elif args.command == "centre":
        figures = centre(translator, train, val, args.directions, args.dataset_dir)
    elif args.command == "bootstrap":
        figures = bootstrap(translator, train, val, args.directions, args.resamples)
    elif args.command == "sampled":
        if args.samples < 1 or args.temperature <= 0:
            raise SystemExit(f"--samples must be at least 1 and --temperature above 0, got {args.samples} and {args.temperature}")
        figures = sampled(translator, val, args.directions, args.samples, args.temperature, args.parts,
                          selection_parts=args.selection_parts, selection_repeats=args.selection_repeats)
    elif args.command == "crossfit":
        figures = crossfit(translator, val, args.directions, [a.split(",") for a in args.arms], args.parts, args.dataset_name or Path(args.dataset_dir).name, args.output_dir,
                           selection_parts=args.selection_parts, selection_repeats=args.selection_repeats)
    else:
        if not args.members:
            raise SystemExit("ensemble needs --members: the model folders to average with --model")
        figures = ensemble(translator, args.members, val, args.directions)
    name = f"readout_{args.command}" + (f"_{args.tag}" if args.tag else "")
    figures = {"model": args.model, "members": args.members, "dataset_dir": args.dataset_dir, "directions": figures,
               "seconds": round(time.perf_counter() - started, 1)}
    write_results(name, figures, args.quick, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
