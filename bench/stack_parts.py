"""Score a stacked model folder (``python -m translator.stack``) and its two parts on one split: RMSE and per-cell Pearson
of the stack, of the folder without its kernel (the calibrated model or ensemble), of the kernel alone, and of eval.py's
tuned ``svd_krr`` (``--refit_baselines`` as eval.py). A diagnostic after a read: it chooses nothing.

    python bench/stack_parts.py --model bmmc_T50rsd1ds5_ens6_stack_v12 --dataset_dir f0 --split test --refit_baselines

Prints one line per direction and part; ``--output`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def stack_parts(model: str, dataset_dir: str, split: str = "test", refit_baselines: bool = False) -> dict:
    from evaluation.baselines import fit_baselines
    from evaluation.data import load_split_matrices
    from evaluation.metrics_core import rowwise_pearson
    from evaluation.runner import source_sentences
    from translator import CellTranslator
    from translator.data import SOURCE_MODALITY, TARGET_MODALITY
    from translator.source_kernel import source_indicator

    translator = CellTranslator.from_pretrained(model)
    if not translator.blend:
        raise ValueError(f"--model {model} has no source kernel with a weight above 0; stack it first (python -m translator.stack)")
    data, train, validation = (load_split_matrices(dataset_dir, s) for s in (split, "train", "validation"))
    out = {}
    for direction, blend in translator.blend.items():
        weight, kernel = blend.weights["kernel"], blend.kernel
        source, target = SOURCE_MODALITY[direction], TARGET_MODALITY[direction]
        sentences = source_sentences(data, direction, translator.meta)
        truth = data[target].toarray()
        stacked = translator.predict_matrix(sentences, direction)
        kernel_matrix = kernel.predict(source_indicator(translator.encode_sources(sentences, direction, allow_empty=True), translator.ranges[source]))
        model_part = (stacked - weight * kernel_matrix) / (1.0 - weight) if weight < 1 else None
        baselines, _ = fit_baselines(source, target, (train[source], train[target]), (validation[source], validation[target]), ["svd_krr"],
                                     refit=refit_baselines)
        svd_krr = np.vstack(list(baselines["svd_krr"].predict_chunks(data[source])))
        parts = {"stack": stacked, "model_part": model_part, "kernel": kernel_matrix, "svd_krr": svd_krr}
        out[direction] = {"weight": weight, **{name: {"rmse": float(np.sqrt(((m - truth) ** 2).mean())), "pearson_cell": float(np.nanmean(rowwise_pearson(m, truth)))}
                                                for name, m in parts.items() if m is not None}}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--refit_baselines", action="store_true", help="svd_krr fitted again on train and validation once tuned (as eval.py)")
    parser.add_argument("--output", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    result = stack_parts(args.model, args.dataset_dir, args.split, args.refit_baselines)
    for direction, row in result.items():
        for name, m in row.items():
            if name != "weight":
                print(f"{direction} (w {row['weight']:.2f}) {name}: RMSE {m['rmse']:.6f}, per-cell Pearson {m['pearson_cell']:.6f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
