"""Model folders of one dataset against a reference folder, scored on the same cells with a paired bootstrap.

Each folder predicts the split's cells (``CellTranslator.predict_matrix``, the folder's readout, as ``eval.py`` scores
it); the headline metrics (RMSE, per-cell Pearson, and per-cell AUROC and AP for ATAC targets) are computed over the same
cells, and ``translator.metrics_core.paired_bootstrap`` redraws those cells to give each difference (a ``--model`` minus
``--reference``) a 95% interval; ``tied``: the interval holds zero. A paired test over hundreds of cells resolves very
small differences, so a setting that should not change accuracy (bf16 against fp32 with TF32, say) is best judged
against the difference between two trainings that differ only in their seed: give the other-seed folder as a second
``--model``.

    python bench/compare_models.py --model OUT_BF16 OUT_FP32_SEED2 --reference OUT_FP32 --dataset_dir DATA \\
        --split validation --output compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compare(models: list[str], reference: str, dataset_dir: str, split: str = "validation", resamples: int = 2000, seed: int = 0,
            batch_size: int = 64, device: str | None = None, max_cells: int | None = None, transformer_alone: bool = False) -> dict:
    """Each of ``models`` against ``reference`` on ``split``: both metrics and the paired bootstrap of the difference, per
    direction. The folders' names key the result (a folder named like ``reference`` is refused)."""
    from dataset_builder.records import load_split_matrices
    from evaluation.runner import evaluate_direction, translator_predictor
    from translator.metrics_core import paired_bootstrap

    names = [Path(m).name for m in models]
    if len(set(names)) != len(names) or "reference" in names:
        raise ValueError(f"--model folders need distinct names other than 'reference', got {names}")
    data = load_split_matrices(dataset_dir, split, max_cells=max_cells)
    predictors = {name: translator_predictor(folder, batch_size=batch_size, device=device, transformer_alone=transformer_alone)
                  for name, folder in [*zip(names, models, strict=True), ("reference", reference)]}
    out: dict = {"models": {n: str(m) for n, m in zip(names, models, strict=True)}, "reference": str(reference),
                 "dataset_dir": str(dataset_dir), "split": split, "n_cells": int(data["gex"].shape[0]),
                 "transformer_alone": transformer_alone, "resamples": resamples, "directions": {}}
    for direction in ("gex2atac", "atac2gex"):
        accs = evaluate_direction(direction, data, predictors, {}, progress=False)
        point = {name: acc.result()["metrics"] for name, acc in accs.items()}
        out["directions"][direction] = {}
        for name in names:
            pair = {"model": accs[name], "reference": accs["reference"]}
            boot = paired_bootstrap(pair, reference="model", resamples=resamples, seed=seed,
                                    point={"model": point[name], "reference": point["reference"]})
            rows = {}
            for key, figures in boot["metrics"].items():
                versus = figures["versus"]["reference"]
                low, high = versus["interval_95"]
                rows[key] = {"model": point[name][key], "reference": point["reference"][key], "difference": versus["difference"],
                             "interval_95": [low, high], "verdict": "tied" if low <= 0.0 <= high else "differ"}
            out["directions"][direction][name] = rows
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Paired bootstrap of two model folders on one split (see the module docstring).")
    parser.add_argument("--model", required=True, nargs="+", help="model folders written by train.py, each compared with --reference")
    parser.add_argument("--reference", required=True, help="the model folder they are compared with")
    parser.add_argument("--dataset_dir", required=True, help="the dataset both were trained on")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the cells")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--batch_size", type=int, default=64, help="cells predicted together")
    parser.add_argument("--device", default=None, help="where the models run (default: a GPU when torch sees one)")
    parser.add_argument("--max_cells", type=int, default=None, help="score at most this many cells (evenly spaced)")
    parser.add_argument("--transformer_alone", action="store_true", help="score each folder's transformer readout without its blend")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    for flag, folder in [*(("--model", m) for m in args.model), ("--reference", args.reference)]:
        if not (Path(folder) / "config.json").exists():
            raise SystemExit(f"{flag} {folder}: no config.json; give a model folder written by train.py")
    start = time.perf_counter()
    out = compare(args.model, args.reference, args.dataset_dir, args.split, args.bootstrap, args.seed, args.batch_size, args.device,
                  args.max_cells, args.transformer_alone)
    out["seconds"] = round(time.perf_counter() - start, 1)
    for direction, by_model in out["directions"].items():
        for name, rows in by_model.items():
            for key, row in rows.items():
                low, high = row["interval_95"]
                print(f"{direction} {key:13s} {name} {row['model']:.6f} reference {row['reference']:.6f} difference "
                      f"{row['difference']:+.6f} [{low:+.6f}, {high:+.6f}] {row['verdict']}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
