"""Fold models for the blend when validation cells are few.

With fewer than :data:`translator.predictor.FEW_CELLS` validation cells, the blend's weights would be chosen on too few
cells to tell the transformer's share from noise. ``train.py`` then trains ``--blend_folds`` models of the same recipe,
each on the train and validation cells but one fold and for as many steps as the model kept, in child processes (one
at a time, each within its share of the time budget). The blend is chosen on every one of those cells as read by the
fold model that did not train on it (:func:`translator.predictor.fit_blend` with ``pool``). The fold models and their
datasets live in a folder beside the output folder (``.NAME.folds``) and are deleted once the blend is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np

from dataset_builder.outputs import META_FILE

from .arguments import DataArguments, ModelArguments, RunArguments
from .predictor import FEW_CELLS
from .training import Budget

logger = logging.getLogger("train")

FOLD_SHARE = 0.5  # of the budget left once the model folder is written: the fold models; the rest, the blend
MIN_FOLD_SECONDS = 30.0  # a fold model's share of the budget below this: no fold models, the blend reads the validation cells
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def wants_folds(n_validation: int, run: RunArguments, streaming: bool) -> bool:
    """Whether this run trains fold models for its blend: few validation cells, ``--blend_folds`` on, the blend on."""
    return run.blend and run.blend_folds >= 2 and 0 < n_validation < FEW_CELLS and not streaming


def write_fold_datasets(splits, dataset_dir: str | os.PathLike, root: Path, n_folds: int, seed: int) -> list[Path]:
    """``n_folds`` dataset folders under ``root``: the train and validation cells, one fold of them (drawn at random with
    ``seed``) as the validation split and the others as the train split; the dataset's metadata copied beside them."""
    cells = datasets.concatenate_datasets([splits["train"], splits["validation"]])
    fold = np.random.default_rng(seed).permutation(len(cells)) % n_folds
    folders = []
    for f in range(n_folds):
        folder = root / f"fold{f}" / "data"
        datasets.DatasetDict({"train": cells.select(np.flatnonzero(fold != f).tolist()),
                              "validation": cells.select(np.flatnonzero(fold == f).tolist())}).save_to_disk(str(folder))
        meta = json.loads((Path(dataset_dir) / META_FILE).read_text())
        meta["train_stats"] = split_train_stats(cells.select(np.flatnonzero(fold != f).tolist()), meta)
        meta["splits"] = {"train": int((fold != f).sum()), "validation": int((fold == f).sum()), "test": 0}
        (folder / META_FILE).write_text(json.dumps(meta))
        folders.append(folder)
    return folders


def split_train_stats(split, meta: dict) -> dict[str, list[float]]:
    """The statistics of ``meta["train_stats"]`` (:func:`dataset_builder.plan.train_stats`) computed on ``split``'s cells
    from their records: a fold model's train cells are not the dataset's."""
    from dataset_builder.records import truth_matrices

    n_genes, n_cells = len(meta["genes"]), max(len(split), 1)
    table = split.with_format("numpy", columns=["gex_index", "gex_value"])
    index = [np.asarray(x, dtype=np.int64) for x in table["gex_index"]]
    value = [np.asarray(x, dtype=np.float64) for x in table["gex_value"]]
    flat_index = np.concatenate(index) if index else np.zeros(0, np.int64)
    flat_value = np.concatenate(value) if value else np.zeros(0)
    positions = np.concatenate([np.arange(len(x)) for x in index]) if index else np.zeros(0, np.int64)
    value_sum = np.bincount(flat_index, weights=flat_value, minlength=n_genes)
    detected = np.bincount(flat_index, minlength=n_genes).astype(np.float64)
    rank_sum, rank_n = np.bincount(positions, weights=flat_value), np.bincount(positions)
    atac = truth_matrices(split, meta)["atac"]
    return {"gex_mean": (value_sum / n_cells).tolist(), "gex_detect_rate": (detected / n_cells).tolist(),
            "gex_mean_detected": np.divide(value_sum, detected, out=np.zeros(n_genes), where=detected > 0).tolist(),
            "atac_mean": (np.asarray(atac.sum(axis=0)).ravel() / n_cells).tolist(),
            "rank_value": np.divide(rank_sum, rank_n, out=np.zeros(rank_sum.size), where=rank_n > 0).tolist()}


def fold_arguments(model_args: ModelArguments, data_args: DataArguments, run: RunArguments, data: Path, output: Path, steps: int,
                   seconds: float, refit_from: str | None) -> dict:
    """The arguments of one fold model: the run's recipe on ``data`` for ``steps`` steps, without early stopping, checkpoints,
    calibration, blend, evaluation or push (the folder's own calibration reads the fold models)."""
    values = {**asdict(model_args), **asdict(data_args), **asdict(run)}
    values.update(dataset_dir=str(data), output_dir=str(output), max_steps=steps, max_train_seconds=seconds,
                  early_stopping_patience=0, load_best_model_at_end=False, eval_steps=0, checkpointing_steps=0, resume_from_checkpoint=None,
                  overwrite_output_dir=False, calibration_cells=0, blend=False, blend_folds=0, evaluate=False, push_to_hub=False,
                  hub_model_id=None, report_to="none", stop_after_steps=0, profile_choices_from=[refit_from] if refit_from else [])
    return values


def train_fold_models(model_args: ModelArguments, data_args: DataArguments, run: RunArguments, splits, steps: int, readout: dict,
                      budget: Budget) -> list[tuple[Path, Path]]:
    """Train the fold models (see the module docstring): ``[(MODEL, DATASET_DIR)]`` for :func:`translator.predictor.fit_blend`'s
    ``pool``; empty (and a log line saying why) when the time budget cannot afford them or a fold fails."""
    n_folds = run.blend_folds
    seconds = 0.0
    if budget.limited:
        seconds = FOLD_SHARE * max(0.0, budget.left()) / n_folds
        if seconds < MIN_FOLD_SECONDS:
            logger.info("time budget: %.0f s left, too little for %d fold models; the blend is chosen on the %d validation cells",
                        budget.left(), n_folds, len(splits["validation"]))
            return []
    refit = readout.get("profile_refit") or {}
    scored = refit and all(refit.get(d, {}).get("validation_cells") for d in data_args.directions)
    root = fold_root(run.output_dir)
    shutil.rmtree(root, ignore_errors=True)
    logger.info("%d validation cells: training %d fold models of %d steps on the %d train and validation cells, so that the blend is "
                "chosen on every one of them", len(splits["validation"]), n_folds, steps, len(splits["train"]) + len(splits["validation"]))
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    pool = []
    for f, data in enumerate(write_fold_datasets(splits, data_args.dataset_dir, root, n_folds, run.seed)):
        output = data.parent / "model"
        config = data.parent / "arguments.json"
        config.write_text(json.dumps(fold_arguments(model_args, data_args, run, data, output, steps, seconds, run.output_dir if scored else None)))
        log = data.parent / "train.log"
        with open(log, "w") as fh:
            done = subprocess.run([sys.executable, "-m", "train", str(config)], stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0 or not (output / "config.json").exists():
            last = (log.read_text().strip().splitlines() or ["no output"])[-1]
            logger.warning("fold model %d of %d failed (%s); the blend is chosen on the %d validation cells", f + 1, n_folds, last[:300], len(splits["validation"]))
            return []
        pool.append((output, data))
        logger.info("fold model %d of %d trained", f + 1, n_folds)
    return pool


def fold_root(output_dir: str | os.PathLike) -> Path:
    """The folder of the fold models and their datasets: beside the output folder, so that the folder never holds them."""
    out = Path(output_dir)
    return out.parent / f".{out.name}.folds"


def remove_fold_models(output_dir: str | os.PathLike) -> None:
    shutil.rmtree(fold_root(output_dir), ignore_errors=True)
