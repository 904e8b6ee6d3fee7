"""After the training loop: the profile head's closed-form refit, the readout calibration on validation cells (each cut
to fit a time budget), and the model folder's files.

``train.py`` runs these in order once the weights are final; ``translator.recalibrate`` calibrates a finished folder
again with :func:`calibrate`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from dataset_builder.outputs import apply_umask
from dataset_builder.records import truth_matrices
from tokenizer import DIRECTIONS, PREFIX, check_same_features, feature_token_ranges, read_meta, save_tokenizer

from .arguments import DataArguments, ModelArguments, RunArguments
from .data import SOURCE_COLUMN, TARGET_MODALITY, names_to_ids, source_ids
from .model import PROFILE_HEAD_FILE
from .predictor import HELD_OUT_CELLS
from .readout import (
    AGGREGATIONS,
    READOUT_FILE,
    SELECTION_PARTS,
    SELECTION_REPEATS,
    decode_features,
    fit_readout,
    profile_offsets,
    with_row_stats,
)
from .serving import write_serving_files
from .streaming import sample_rows
from .training import Budget

logger = logging.getLogger("train")


FINISH_SHARE = 0.15  # of the budget left after training, kept beyond the estimated calibration: the blend's kernel, the folder, a margin
CALIBRATION_SHARE = 0.6  # of the budget left after the refit: the calibration and the blend's second reading of its cells
# (the rest: the blend's kernel and the model folder)
MIN_CALIBRATION_CELLS = 20
PROBE_CELLS = 8
PACE_MARGIN = 1.5  # a refit solve on many cells runs slower per entry than the small one timed; the cell cap allows for it


def refit_cell_cap(seconds: float | None, n_inputs: int, n_target_features: Sequence[int], device: torch.device | str = "cpu") -> int | None:
    """Train cells the head refit may use to end within ``seconds`` (None: no limit, and None back; 0: its solves do not
    fit even on few cells, and the trained head is kept).

    The refit's time is about proportional to cells x features solved (:func:`translator.profile_fit.refit_cost`, summed over
    the directions' target modalities), at the pace of a small solve timed here (times :data:`PACE_MARGIN`); and each of
    its solves (:func:`translator.profile_fit.refit_solves`, over twice the small one's features) costs at least that
    small solve twice.
    """
    from .profile_fit import MIN_REFIT_CELLS, PACE_CELLS, PACE_FEATURES, refit_cost, refit_solves, seconds_per_entry

    if seconds is None:
        return None
    share = max(0.0, seconds)
    pace = PACE_MARGIN * seconds_per_entry(n_inputs, device=device)
    solves = sum(refit_solves(n) for n in n_target_features)
    if solves * 2 * pace * PACE_CELLS * PACE_FEATURES > share:
        return 0
    per_cell = sum(refit_cost(1, n) for n in n_target_features)
    return max(MIN_REFIT_CELLS, int(share / max(pace * per_cell, 1e-12)))


def refit_seconds(left: float, calibration_per_cell: float, calibration_cells: int, held_out_cells: int) -> float:
    """What the head refit may use of the ``left`` seconds of a time budget: all but the calibration's estimated time
    (its ``calibration_cells`` decoded and a readout chosen on one partition of them, 1.5 decodings' worth), the blend's
    second reading of its ``held_out_cells``, and :data:`FINISH_SHARE` of ``left``."""
    calibration = calibration_per_cell * (1.5 * calibration_cells + held_out_cells)
    return max(0.0, (1 - FINISH_SHARE) * left - calibration)


def calibration_pace(model, tokenizer, meta: dict, split, directions: Sequence[str], max_source_length: int, max_target_length: int,
                     batch_size: int, profile_head=None) -> float:
    """Seconds :func:`calibration_features` takes per cell of ``split``, timed on a few of its cells."""
    probe = split.select(range(min(PROBE_CELLS, len(split))))
    started = time.perf_counter()
    calibration_features(model, tokenizer, meta, probe, directions, max_source_length, max_target_length, len(probe), batch_size, profile_head)
    return (time.perf_counter() - started) / max(1, len(probe))


def calibration_cell_cap(seconds: float, per_cell: float) -> int:
    """Validation cells the calibration may decode to end within :data:`CALIBRATION_SHARE` of ``seconds``, at
    ``per_cell`` (:func:`calibration_pace`): the readout's fits after the decoding take about half as long again, and the
    blend then decodes the cells once more."""
    return max(MIN_CALIBRATION_CELLS, int(CALIBRATION_SHARE * max(0.0, seconds) / (2.5 * max(per_cell, 1e-12))))


def calibration_features(model, tokenizer, meta: dict, split, directions: Sequence[str], max_source_length: int, max_target_length: int,
                         max_cells: int = 500, batch_size: int = 64, profile_head=None, row_stats: bool = False) -> dict:
    """What a calibration is fitted on: ``{direction: (features, truth)}`` for (up to ``max_cells`` evenly spaced) cells of ``split``.

    ``row_stats``: the features also carry the model's per-feature train statistics as one row per cell
    (:data:`translator.readout.ROW_STATS`), so that readings of several models (cross-validation fold models, each
    with its own train split) can be pooled into one calibration.
    """
    n = len(split)
    rows = sample_rows(n, max_cells)
    cells = split.select(rows.tolist())
    truth = truth_matrices(cells, meta)
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    out = {}
    for direction in directions:
        names = names_to_ids(tokenizer, cells[SOURCE_COLUMN[direction]])
        ids = [source_ids(x, direction, tokenizer, max_source_length) for x in names]
        target = TARGET_MODALITY[direction]
        features, _ = decode_features(model, tokenizer, meta, ids, direction, ranges[target], max_target_length, batch_size, profile_head=profile_head)
        if row_stats:
            with_row_stats(features, meta, len(rows))
        out[direction] = (features, truth[target])
    return out


def calibrate(model, tokenizer, meta: dict, split, directions: Sequence[str], max_source_length: int, max_target_length: int, max_cells: int = 500, batch_size: int = 64, seed: int = 0, profile_head=None,
              aggregations: Sequence[str] = AGGREGATIONS, selection_parts: int = SELECTION_PARTS, selection_repeats: int = SELECTION_REPEATS,
              pool: Sequence[dict] = (), deadline: float | None = None) -> dict:
    """Fit the readout calibration of each direction on (up to ``max_cells`` evenly spaced) cells of ``split``, choosing among ``aggregations``
    (by RMSE cross-fitted over ``selection_parts`` parts of the cells, averaged over ``selection_repeats`` random partitions; 0 parts:
    in-sample, see :func:`translator.readout.fit_readout`).

    ``pool``: more cells to fit on, as other models read them (:func:`calibration_features` with ``row_stats=True``, one dict
    per model: the other folds of a cross-validation, each read by the fold model that did not train on it); each cell
    keeps the train statistics of the model that read it. The coefficients are then fitted on all of them together.
    ``split`` None: on ``pool`` alone (a model trained on every cell, whose fold models read the cells it trained on).
    ``deadline`` (a ``time.perf_counter()`` value, a time budget): the choice's random partitions stop once it has passed
    (:func:`translator.readout.fit_readout`).
    """
    import scipy.sparse as sp

    if split is None and not pool:
        raise ValueError("a calibration needs cells: a split, or readings to pool")
    own = calibration_features(model, tokenizer, meta, split, directions, max_source_length, max_target_length, max_cells, batch_size,
                               profile_head, row_stats=bool(pool)) if split is not None else None
    out = {}
    for direction in directions:
        parts = [*([own[direction]] if own is not None else []), *(extra[direction] for extra in pool)]
        features, truth = parts[0]
        if pool:  # one features dict and one truth matrix over every model's cells
            features = {key: np.concatenate([np.asarray(f[key]) for f, _ in parts]) for key in features}
            truth = sp.vstack([t for _, t in parts]).tocsr()
        out[direction] = fit_readout(features, truth, direction, meta, seed=seed, aggregations=aggregations, selection_parts=selection_parts,
                                     selection_repeats=selection_repeats, deadline=deadline)
        if pool:
            out[direction]["pooled_cells"] = [int(t.shape[0]) for _, t in parts]
    return out


def widget_examples(tokenizer, split, directions: Sequence[str], n_names: int = 50, n_cells: int = 2) -> list[dict]:
    """Real input sentences for the card's widget: prefix and the first ``n_names`` names of validation cells."""
    examples = []
    for direction in directions:
        for i in range(min(n_cells, len(split))):
            names = split[i][SOURCE_COLUMN[direction]].split()[:n_names]
            examples.append({"text": " ".join([PREFIX[direction], *names]), "title": f"{direction} cell {split[i]['cell']}"})
    return examples


def write_model_folder(output_dir: str | os.PathLike, model, tokenizer, meta: dict, readout: dict, training_args: dict, max_target_length: int, profile_head=None) -> list[str]:
    """Write the Hub-ready files into ``output_dir``: weights (safetensors), configs, tokenizer, metadata, readout, args.

    ``profile_head`` (a :class:`translator.model.ProfileHead`) goes to ``profile_head.safetensors``.

    Files are written to a temporary folder in ``output_dir`` and moved in one by one.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            max_length=int(max_target_length),
            no_repeat_ngram_size=1,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        write_serving_files(tmp, model.generation_config, tokenizer, len(meta["genes"]))
        if profile_head is not None:
            profile_head.save(tmp / PROFILE_HEAD_FILE)
        save_tokenizer(tokenizer, tmp, meta)
        (tmp / READOUT_FILE).write_text(json.dumps(readout, indent=2))
        (tmp / "training_args.json").write_text(json.dumps(training_args, indent=2))
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            apply_umask(tmp / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def read_refit_choices(folders: list[str], meta: dict, directions: list[str]) -> dict:
    """``--profile_choices_from``: the refit settings pooled over these model folders' refits (:func:`translator.profile_fit.pooled_choice`)."""
    from .profile_fit import pooled_choice

    reports = []
    for folder in folders:
        path = Path(folder) / READOUT_FILE
        if not path.exists():
            raise FileNotFoundError(f"--profile_choices_from {folder}: no {READOUT_FILE}; give model folders written by train.py")
        folder_meta = read_meta(folder)
        check_same_features(meta, folder_meta, f"--profile_choices_from {folder}", reference="the dataset's", fix="give fold models of this dataset")
        refit = json.loads(path.read_text()).get("profile_refit") or {}
        missing = [d for d in directions if not refit.get(d, {}).get("validation_cells")]
        if missing:
            raise ValueError(f"--profile_choices_from {folder}: no head refit scored on validation cells for {', '.join(missing)}; "
                             "give models trained with a validation split (and without --no_profile_refit)")
        reports.append(refit)
    return pooled_choice(reports)


def refit_head(model, profile_head, tokenizer, meta, train_split, validation, train_examples, eval_examples, batch_size: int, ranks=(),
               choices: dict | None = None, max_cells: int | None = None, deadline: float | None = None) -> dict:
    """Closed-form refit of the profile head on the train split (``translator.profile_fit``); L2 chosen on validation, or given
    (``choices``, then validation may be empty). ``max_cells``: at most this many train cells, evenly spaced (a time budget);
    ``deadline``: a direction whose solves would end after it keeps its trained rows."""
    from .profile_fit import refit_profile_head

    started = time.perf_counter()
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    truth_train, truth_val = truth_matrices(train_split, meta), truth_matrices(validation, meta)
    sources, truths, target_ranges = {}, {}, {}
    for code, direction in enumerate(DIRECTIONS):
        rows = np.flatnonzero(np.asarray(train_examples.directions) == code)  # this direction's examples, in cell order
        val_rows = np.flatnonzero(np.asarray(eval_examples.directions) == code)
        cells = np.arange(len(rows))
        if max_cells is not None and len(rows) > max_cells:
            cells = sample_rows(len(rows), max_cells)
            logger.info("%s head refit on %d of %d train cells (--max_train_seconds)", direction, len(cells), len(rows))
        if not len(rows) or not (len(val_rows) or (choices and direction in choices)):
            continue
        target = TARGET_MODALITY[direction]
        sources[direction] = ([train_examples.sources[i] for i in rows[cells]], [eval_examples.sources[i] for i in val_rows])
        truths[direction] = (truth_train[target][cells], truth_val[target])
        target_ranges[direction] = ranges[target]
    reports = refit_profile_head(model, profile_head, sources, truths, target_ranges, profile_offsets(tokenizer, meta), batch_size=batch_size,
                                 ranks=ranks, choices=choices, deadline=deadline)
    for report in reports.values():
        report["seconds"] = round(time.perf_counter() - started, 1)
    return reports


def finish_readout(model, profile_head, tokenizer, meta: dict, splits, validation, train_examples, eval_examples, model_args: ModelArguments,
                   data_args: DataArguments, run: RunArguments, budget: Budget, refit_choices: dict | None, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """The head refit and the readout calibration of a trained model, each cut to fit what is left of ``budget``.

    Returns ``readout.json``'s content and the cap on the held-out cells that the blend reads again
    (``{"max_cells": N}`` under a time budget, else empty).
    """
    caps = (data_args.max_source_length, data_args.max_target_length)
    calibration, refit, held_out_cap = {}, {}, {}
    n_validation = len(splits["validation"])
    calibration_cells = min(n_validation, data_args.calibration_cells) if data_args.calibration_cells > 0 else 0
    per_cell = 0.0  # seconds the calibration takes per validation cell, timed before the refit so that the refit leaves it its time
    if budget.limited and calibration_cells:
        per_cell = calibration_pace(model, tokenizer, meta, splits["validation"], data_args.directions, *caps, run.per_device_eval_batch_size, profile_head)
    if profile_head is not None and model_args.profile_refit and (len(validation) or refit_choices):
        targets = [len(meta["peaks" if d == "gex2atac" else "genes"]) for d in data_args.directions]
        seconds = refit_seconds(budget.left(), per_cell, calibration_cells, min(n_validation, HELD_OUT_CELLS)) if budget.limited else None
        refit_cells = refit_cell_cap(seconds, profile_head.weight.shape[1], targets, device)
        if refit_cells == 0:
            logger.warning("--max_train_seconds: %.0f s left, too little for the head refit; the trained profile head is kept", budget.left())
        else:
            refit = refit_head(model, profile_head, tokenizer, meta, splits["train"], validation, train_examples, eval_examples,
                               run.per_device_eval_batch_size, model_args.profile_ranks, refit_choices, refit_cells,
                               time.perf_counter() + seconds if seconds is not None else None)
    if not n_validation:
        logger.warning("the validation split is empty: no validation loss, and the readout stays uncalibrated "
                       "(calibrate it on fold models' readings: python -m translator.recalibrate --model OUT --dataset_dir DATA --pool MODEL DATASET_DIR ...)")
    elif calibration_cells:
        started, window = time.perf_counter(), CALIBRATION_SHARE * max(0.0, budget.left())
        deadline = None
        if budget.limited:
            cap = calibration_cell_cap(budget.left(), per_cell)
            held_out_cap = {"max_cells": min(cap, HELD_OUT_CELLS)}  # the blend decodes validation cells again: at most as many as the budget allows
            # The readout's choice stops averaging partitions in time for the blend's second reading of its cells.
            deadline = started + window - min(cap, HELD_OUT_CELLS, n_validation) * per_cell
        if budget.limited and cap < calibration_cells:
            logger.info("--max_train_seconds: %.0f s left, the calibration and the blend decode %d of %d validation cells (the readout chosen on one partition)", budget.left(), cap, calibration_cells)
            calibration_cells = cap
            selection_repeats = 1  # one partition: the readout's cross-fitted choice costs a tenth
        else:
            selection_repeats = data_args.calibration_selection_repeats
        logger.info("calibrating the readout on %s validation cells", calibration_cells)
        calibration = calibrate(model, tokenizer, meta, splits["validation"], data_args.directions, *caps, calibration_cells, run.per_device_eval_batch_size, run.seed, profile_head,
                                selection_parts=data_args.calibration_selection_parts, selection_repeats=selection_repeats, deadline=deadline)
        for direction, params in calibration.items():
            if "the time budget" in params["selection"]:
                logger.info("--max_train_seconds: the %s readout chosen by RMSE %s", direction, params["selection"])
            cross = params.get("validation_rmse_cross_fitted")
            logger.info("%s readout: %s (chosen by %s validation RMSE: %s; per-feature mean %.6f)", direction, params["aggregation"],
                        "cross-fitted" if cross else "in-sample", ", ".join(f"{name} {value:.6f}" for name, value in (cross or params["validation_rmse"]).items()),
                        params["validation_rmse_mean"])
    examples_split = splits["validation"] if len(splits["validation"]) else splits["train"]
    readout = {"max_source_length": caps[0], "max_target_length": caps[1], "calibration": calibration, "profile_refit": refit,
               "examples": widget_examples(tokenizer, examples_split, data_args.directions)}
    return readout, held_out_cap


def training_record(model_args: ModelArguments, data_args: DataArguments, run: RunArguments, **facts) -> dict:
    """``training_args.json``: every argument (folders by name only, never a local path) and the run's ``facts``."""
    from dataclasses import asdict

    saved = {**asdict(model_args), **asdict(data_args), **asdict(run)}
    for key in ("dataset_dir", "tokenizer_dir", "output_dir", "resume_from_checkpoint"):
        saved[key] = Path(saved[key]).name if saved[key] else None
    saved["profile_choices_from"] = [Path(f).name for f in model_args.profile_choices_from]
    saved.update(facts)
    return saved
