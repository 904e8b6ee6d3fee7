"""Refit the readout calibration of a trained model folder: the last stage of ``train.py``, alone.

``train.py`` ends by fitting ``readout.json``'s ``calibration`` on the validation split
(:func:`translator.finishing.calibrate`). When the readout gains an option (such as ``profile_depth``),
a folder trained before can take it without retraining: this runs that same stage on the same cells with
the settings in the folder's ``training_args.json`` (``calibration_cells``, ``directions``, ``seed``,
``per_device_eval_batch_size``) and the caps in ``readout.json``, so the folder ends as a fresh
``train.py`` run with the current code would leave it. Only ``readout.json``'s ``calibration`` changes; the file
is replaced in one move.

``--pool MODEL DATASET_DIR`` (repeatable) fits the calibration on more cells: the validation cells of each
``DATASET_DIR`` as its ``MODEL`` reads them, beside the folder's own (none, when ``--dataset_dir`` was built with
``--no_validation``: a final model trained on every cell, calibrated on its fold models' readings of the cells they did not train on). Made for cross-validation fold models: fold 0's
model calibrated on every fold, each fold read by the model that did not train on it (each cell keeps the per-feature
train statistics of the model that read it): with 5 folds, every training cell calibrates instead of one fifth of them.

Usage::

    python -m translator.recalibrate --model models/mop --dataset_dir data/mop
    python -m translator.recalibrate --model m_0 --dataset_dir f0 --pool m_1 f1 --pool m_2 f2 --pool m_3 f3 --pool m_4 f4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dataset_builder.outputs import write_text_atomic

logger = logging.getLogger("recalibrate")


def check_pool(pool: Sequence[tuple[str | os.PathLike, str | os.PathLike]], meta: dict) -> list:
    """Check ``--pool MODEL DATASET_DIR`` entries against the folder's ``meta`` (one line naming the entry when one is unfit);
    return ``[(MODEL, DATASET_DIR's validation split)]``."""
    from dataset_builder.records import load_splits
    from tokenizer import check_same_features, check_vocabulary, load_tokenizer, read_meta

    from .readout import READOUT_FILE

    out = []
    for pool_model, pool_data in pool:
        what = f"--pool {pool_model} {pool_data}"
        if not (Path(pool_model) / READOUT_FILE).exists():
            raise FileNotFoundError(f"{what}: {pool_model} is not a model folder written by train.py")
        pool_meta = read_meta(pool_model)
        check_same_features(meta, pool_meta, what, reference="--model's", fix="pool only models of the same dataset (cross-validation folds)")
        check_vocabulary(load_tokenizer(pool_model), read_meta(pool_data), what=what)
        pool_split = load_splits(pool_data)
        if "validation" not in pool_split or not len(pool_split["validation"]):
            raise ValueError(f"{what}: {pool_data} has no validation cells to fit on")
        out.append((pool_model, pool_split["validation"]))
    return out


def recalibrate(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, calibration_cells: int | None = None, cpu_threads: int = 1,
                aggregations: Sequence[str] | None = None, selection_parts: int | None = None, selection_repeats: int | None = None,
                pool: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = ()) -> dict:
    """Refit ``model_dir``'s calibration on ``dataset_dir``'s validation split; return ``{direction: (old, new)}`` summaries.

    ``aggregations`` restricts the readouts the calibration chooses from (default: all, as ``train.py``), e.g. to score
    one folder with and without ``profile_depth``. ``selection_parts`` is how the aggregation is chosen (default: the
    folder's ``train.py --calibration_selection_parts``, or :data:`translator.readout.SELECTION_PARTS` (cross-fitted, train.py's
    default) for folders without it; ``0``: the lowest in-sample RMSE).
    ``selection_repeats``: the random partitions that RMSE is averaged over (default: the folder's
    ``--calibration_selection_repeats``, else :data:`translator.readout.SELECTION_REPEATS`).
    ``pool``: ``(model folder, dataset folder)`` pairs whose validation cells, as that model reads them, are fitted on too
    (see the module docstring); every pair must name the same genes and peaks as ``model_dir``.
    """
    from dataset_builder.records import load_splits
    from tokenizer import check_vocabulary, load_tokenizer, read_meta

    from .api import CellTranslator
    from .finishing import calibrate, calibration_features
    from .readout import (
        AGGREGATIONS,
        READOUT_FILE,
        SELECTION_PARTS,
        SELECTION_REPEATS,
        check_aggregations,
        check_selection_parts,
        check_selection_repeats,
    )

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder; give a model folder written by train.py")
    args_path, readout_path = folder / "training_args.json", folder / READOUT_FILE
    for path in (args_path, readout_path):
        if not path.exists():
            raise FileNotFoundError(f"--model {folder}: no {path.name}; give a model folder written by train.py")
    training_args = json.loads(args_path.read_text())
    readout = json.loads(readout_path.read_text())
    cells = int(training_args.get("calibration_cells", 500) if calibration_cells is None else calibration_cells)
    if cells < 1:
        raise ValueError(f"--calibration_cells must be at least 1, got {cells}")
    check_aggregations(aggregations or (), "--aggregations")
    parts = int(training_args.get("calibration_selection_parts", SELECTION_PARTS) if selection_parts is None else selection_parts)
    check_selection_parts(parts, "--selection_parts")
    repeats = int(training_args.get("calibration_selection_repeats", SELECTION_REPEATS) if selection_repeats is None else selection_repeats)
    check_selection_repeats(repeats, "--selection_repeats")
    # Every check before the weights load (their progress bar would precede the one error line).
    check_vocabulary(load_tokenizer(folder), read_meta(dataset_dir), what=f"--dataset_dir {dataset_dir}")
    splits = load_splits(dataset_dir)
    own_cells = len(splits["validation"]) if "validation" in splits else 0
    if not own_cells and not pool:
        raise ValueError(f"--dataset_dir {dataset_dir} has no validation cells; the calibration is fitted on them (or on --pool MODEL DATASET_DIR)")
    pooled_splits = check_pool(pool, read_meta(folder))
    translator = CellTranslator.from_pretrained(folder)
    directions = training_args.get("directions") or list(readout.get("calibration") or {})
    torch.set_num_threads(max(1, cpu_threads))
    started = time.perf_counter()
    caps, batch = (int(readout["max_source_length"]), int(readout["max_target_length"])), int(training_args.get("per_device_eval_batch_size", 64))
    pooled = []
    for pool_model, pool_split in pooled_splits:
        reader = CellTranslator.from_pretrained(pool_model)
        pooled.append(calibration_features(reader.model, reader.tokenizer, reader.meta, pool_split, directions, *caps, cells, batch,
                                           reader.profile_head, row_stats=True))
    new = calibrate(translator.model, translator.tokenizer, translator.meta, splits["validation"] if own_cells else None, directions, *caps, cells, batch,
                    int(training_args.get("seed", 0)), translator.profile_head,
                    tuple(aggregations) if aggregations else AGGREGATIONS, parts, repeats, pool=pooled)
    if pool:
        for params in new.values():
            params["pooled_from"] = [*([[Path(folder).name, Path(dataset_dir).name]] if own_cells else []), *([Path(m).name, Path(d).name] for m, d in pool)]
    old = readout.get("calibration") or {}
    readout["calibration"] = new
    write_text_atomic(readout_path, json.dumps(readout, indent=2))
    if readout.get("blend") and new != old:
        logger.warning("the blend in %s was chosen for the previous calibration; choose it again: python -m translator.stack --model %s "
                       "--dataset_dir %s [--pool MODEL DATASET_DIR ...]", readout_path, folder, dataset_dir)
    summary = {}
    for direction, params in new.items():
        before = old.get(direction, {})
        summary[direction] = {"before": before.get("aggregation"), "after": params["aggregation"],
                              "validation_rmse": params["validation_rmse"][params["aggregation"]], "validation_rmse_mean": params["validation_rmse_mean"]}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder written by train.py (rewritten in place)")
    parser.add_argument("--dataset_dir", required=True, help="the dataset folder the model was trained on (its validation split is read)")
    parser.add_argument("--calibration_cells", type=int, help="validation cells to fit on (default: the folder's training_args.json value)")
    parser.add_argument("--aggregations", nargs="+", help="readouts the calibration may choose from (default: all, as train.py), "
                        "e.g. noisy_or sum profile to leave profile_depth out")
    parser.add_argument("--selection_parts", type=int, help="choose the aggregation by RMSE cross-fitted over this many parts of the cells "
                        "(default: the folder's train.py --calibration_selection_parts, else 5); 0 = the lowest in-sample RMSE")
    parser.add_argument("--selection_repeats", type=int, help="average that cross-fitted RMSE over this many random partitions "
                        "(default: the folder's train.py --calibration_selection_repeats, else 10); 1 = one partition")
    parser.add_argument("--pool", nargs=2, action="append", default=[], metavar=("MODEL", "DATASET_DIR"),
                        help="also fit on DATASET_DIR's validation cells as MODEL reads them (repeatable; cross-validation fold models)")
    parser.add_argument("--cpu_threads", type=int, default=1)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    summary = recalibrate(args.model, args.dataset_dir, args.calibration_cells, args.cpu_threads, args.aggregations, args.selection_parts, args.selection_repeats,
                          [tuple(p) for p in args.pool])
    for direction, row in summary.items():
        if direction != "seconds":
            print(f"{direction}: {row['before']} -> {row['after']}, validation RMSE {row['validation_rmse']:.6f} (mean {row['validation_rmse_mean']:.6f})")
    print(f"rewrote {Path(args.model) / 'readout.json'} ({summary['seconds']} s)")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    from dataset_builder.cli import run_main

    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
