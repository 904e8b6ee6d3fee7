"""Score a model folder's blend (``translator.predictor``) and its parts on one split: RMSE and per-cell Pearson of the
blend, of the folder without it (the calibrated model or ensemble), of its kernel and mean, and of eval.py's tuned
``svd_krr`` (``--refit_baselines`` as eval.py). A diagnostic after a read: it chooses nothing.

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
    from dataset_builder.records import load_split_matrices, source_sentences
    from evaluation.baselines import fit_baselines
    from translator import CellTranslator
    from translator.data import SOURCE_MODALITY, TARGET_MODALITY
    from translator.metrics_core import rowwise_pearson
    from translator.source_kernel import source_indicator

    translator = CellTranslator.from_pretrained(model)
    if not translator.blend:
        raise ValueError(f"--model {model} has no blend; fit one first (python -m translator.stack)")
    parts_of = CellTranslator.from_pretrained(model)
    parts_of.blend = {}  # the calibrated model or ensemble alone
    data, train, validation = (load_split_matrices(dataset_dir, s) for s in (split, "train", "validation"))
    out = {}
    for direction, blend in translator.blend.items():
        source, target = SOURCE_MODALITY[direction], TARGET_MODALITY[direction]
        sentences = source_sentences(data, direction, translator.meta)
        truth = data[target].toarray()
        parts = {"blend": translator.predict_matrix(sentences, direction), "transformer": parts_of.predict_matrix(sentences, direction)}
        if blend.kernel is not None:
            parts["kernel"] = blend.kernel.predict(source_indicator(translator.encode_sources(sentences, direction, allow_empty=True), translator.ranges[source]))
        if blend.mean is not None:
            parts["mean"] = np.broadcast_to(blend.mean, truth.shape)
        baselines, _ = fit_baselines(source, target, (train[source], train[target]), (validation[source], validation[target]), ["svd_krr"],
                                     refit=refit_baselines)
        parts["svd_krr"] = np.vstack(list(baselines["svd_krr"].predict_chunks(data[source])))
        out[direction] = {"weights": blend.weights, **{name: {"rmse": float(np.sqrt(((m - truth) ** 2).mean())), "pearson_cell": float(np.nanmean(rowwise_pearson(m, truth)))}
                                                       for name, m in parts.items()}}
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
            if name != "weights":
                print(f"{direction} {name}: RMSE {m['rmse']:.6f}, per-cell Pearson {m['pearson_cell']:.6f}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
