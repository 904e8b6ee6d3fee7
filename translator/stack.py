"""Source-kernel stack: blend a model folder's calibrated matrix with a kernel ridge regression on its source names.

The translator's readout is a linear map of pooled states; the ``svd_krr`` baseline is an RBF kernel regression on the
latent semantic analysis of the same source. Their errors differ: on BMMC's nested cross-validation
(docs/results/cv/bmmc_starter_nested_stack.json) the weighted mean of the two predicted the held-out cells better than either. This fits that mean into a
model folder, from the model's own input (the names in its source sentence, as a bag of names):

- the kernel: the ``svd_krr`` regression (``evaluation.baselines.SvdKrrBaseline``: TF-IDF + truncated SVD for ATAC
  names, scaled PCA for GEX names; RBF kernel ridge to the target's PCA), its settings (components, width, ridge) chosen
  on its grid by the validation error pooled over the ``--pool`` entries, each fitted on its own train cells;
- the weight ``w`` per direction (0, 0.05, ..., 1): the lowest pooled RMSE of ``(1 - w) * model + w * kernel`` on
  cells neither saw in training: each ``--pool MODEL DATASET_DIR`` entry's validation cells, read by ``MODEL`` with the
  folder's calibration and predicted by a kernel fitted on ``DATASET_DIR``'s train cells (cross-validation fold models,
  as ``translator.recalibrate --pool``); without ``--pool``, the folder's own validation cells;
- the folder's kernel: fitted with those settings on ``--dataset_dir``'s train and validation cells, written to
  ``source_kernel.safetensors``; ``readout.json`` records the weights and settings under ``source_kernel``.

``CellTranslator.predict_matrix`` (so ``predict.py`` and ``eval.py``) applies it after the calibration (after an
ensemble's mean). ``w = 0`` in a direction leaves that direction as it was. The folder stays loadable with the Auto classes.

Usage::

    python -m translator.stack --model bmmc_ens --dataset_dir all --pool m_0 f0 --pool m_1 f1 --pool m_2 f2 --pool m_3 f3 --pool m_4 f4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0.0, 1.0, 21), 2))


def stack(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, pool: Sequence[tuple[str | os.PathLike, str | os.PathLike]] = (),
          directions: Sequence[str] | None = None, weights: Sequence[float] = WEIGHTS, grid: dict | None = None,
          max_landmarks: int = 1000, seed: int = 0, batch_size: int = 64) -> dict:
    """Fit the source kernel and its weights into ``model_dir`` (see the module docstring); returns ``readout.json``'s new
    ``source_kernel`` entry. The folder changes only at the end (``source_kernel.safetensors``, then ``readout.json``)."""
    import datasets
    from safetensors.numpy import save

    from dataset_builder.outputs import write_text_atomic
    from evaluation.baselines import KRR_GRID, SvdKrrBaseline
    from evaluation.data import load_split_matrices
    from evaluation.runner import source_sentences
    from tokenizer import check_vocabulary, load_tokenizer, read_meta

    from .api import CellTranslator
    from .card import set_card_section
    from .data import SOURCE_MODALITY, TARGET_MODALITY
    from .predictor import BLEND_FILE
    from .readout import READOUT_FILE
    from .recalibrate import check_pool
    from .source_kernel import KERNEL_FILE, SourceKernel, source_indicator

    folder = Path(model_dir)
    readout_path = folder / READOUT_FILE
    if not folder.is_dir() or not readout_path.exists():
        raise FileNotFoundError(f"--model {folder}: not a model folder written by train.py")
    readout = json.loads(readout_path.read_text())
    calibration = readout.get("calibration") or {}
    if not calibration:
        raise ValueError(f"--model {folder} has no readout calibration; calibrate it first (python -m translator.recalibrate)")
    weights = sorted({float(w) for w in weights})
    if not weights or weights[0] < 0 or weights[-1] > 1:
        raise ValueError(f"--weights must lie in [0, 1], got {weights}")
    directions = list(directions or calibration)
    unknown = [d for d in directions if d not in calibration]
    if unknown:
        raise ValueError(f"--directions {unknown}: the folder has no calibration for them; choose among {sorted(calibration)}")
    meta = read_meta(folder)
    check_vocabulary(load_tokenizer(folder), read_meta(dataset_dir), what=f"--dataset_dir {dataset_dir}")
    own = datasets.load_from_disk(str(dataset_dir))
    if not pool:
        if "validation" not in own or not len(own["validation"]):
            raise ValueError(f"--dataset_dir {dataset_dir} has no validation cells to choose the weight on; give --pool MODEL DATASET_DIR (fold models)")
        pool = [(folder, dataset_dir)]
    check_pool(pool, meta)
    grid = grid or KRR_GRID
    widest = max(grid["n_components"])
    started = time.perf_counter()
    top = CellTranslator.from_pretrained(folder)
    top.blend = {}  # read the folder as it is without any blend it holds already
    readers = []
    for pool_model, pool_data in pool:
        if Path(pool_model).resolve() == folder.resolve():
            reader = top
        else:
            reader = CellTranslator.from_pretrained(pool_model)
            reader.readout = {**reader.readout, "calibration": calibration}
            reader.blend, reader.members = {}, []
        readers.append((reader, load_split_matrices(pool_data, "train"), load_split_matrices(pool_data, "validation")))
    every = [load_split_matrices(dataset_dir, s) for s in ("train", "validation") if s in own and len(own[s])]

    def indicator(reader, data, direction):
        ids = reader.encode_sources(source_sentences(data, direction, reader.meta), direction, allow_empty=True)
        return source_indicator(ids, reader.ranges[SOURCE_MODALITY[direction]])

    records, arrays = {}, {}
    for direction in directions:
        src, tgt = SOURCE_MODALITY[direction], TARGET_MODALITY[direction]
        entries, sse = [], {}
        for reader, train, validation in readers:
            x_train, x_val = indicator(reader, train, direction), indicator(reader, validation, direction)
            _, trials = SvdKrrBaseline.tune(src, tgt, (x_train, train[tgt]), (x_val, validation[tgt]), grid=grid, max_landmarks=max_landmarks, seed=seed)
            for t in trials:
                key = (t["n_components"], t["gamma_scale"], t["alpha"])
                sse[key] = sse.get(key, 0.0) + t["validation_rmse"] ** 2 * validation[tgt].shape[0]
            entries.append((reader, train, validation, x_train, x_val))
        n_comp, gamma_scale, alpha = min(sse, key=sse.get)

        chosen = functools.partial(SvdKrrBaseline, src, tgt, n_components=n_comp, gamma_scale=gamma_scale, alpha=alpha,
                                   max_landmarks=max_landmarks, seed=seed)

        # pooled (1 - w) * model + w * kernel: sum (m - t + w (k - m))^2 = a + 2 w b + w^2 c
        a = b = c = 0.0
        n_cells = 0
        for reader, train, validation, x_train, x_val in entries:
            k = np.vstack(list(chosen().refit(x_train, train[tgt], embed_components=widest).predict_chunks(x_val))).astype(np.float64)
            m = np.asarray(reader.predict_matrix(source_sentences(validation, direction, reader.meta), direction, batch_size), dtype=np.float64)
            r, d = m - validation[tgt].toarray(), k - m
            a, b, c = a + float((r * r).sum()), b + float((r * d).sum()), c + float((d * d).sum())
            n_cells += m.shape[0]
        n_values = n_cells * len(meta["genes" if tgt == "gex" else "peaks"])
        rmse = {w: float(np.sqrt(max(a + 2 * w * b + w * w * c, 0.0) / n_values)) for w in weights}
        w = min(weights, key=lambda v: (rmse[v], v))
        x_all = sp.vstack([indicator(top, d, direction) for d in every]).tocsr()
        fitted = SourceKernel.from_baseline(chosen().refit(x_all, sp.vstack([d[tgt] for d in every]).tocsr(), embed_components=widest))
        records[direction] = {"weight": w, **fitted.settings(), "gamma_scale": gamma_scale, "alpha": alpha, "fit_cells": int(x_all.shape[0]),
                              "pooled_cells": n_cells, "pooled_rmse": {"model": float(np.sqrt(a / n_values)), "kernel": float(np.sqrt(max(a + 2 * b + c, 0.0) / n_values)),
                                                                       "stack": rmse[w]},
                              "pooled_rmse_by_weight": {f"{v:.2f}": rmse[v] for v in weights},
                              "pooled_from": [[Path(p).name, Path(d).name] for p, d in pool]}
        if w > 0:  # a direction at weight 0 predicts as before and keeps no arrays
            for key, value in fitted.arrays.items():
                arrays[f"{direction}.{key}"] = np.ascontiguousarray(value, dtype=np.float32)
    readout["source_kernel"] = records
    readout.pop("blend", None)  # the stack replaces a blend fitted by train.py
    if arrays:
        write_text_atomic(folder / KERNEL_FILE, save(arrays))
    write_text_atomic(readout_path, json.dumps(readout, indent=2))
    if not arrays:
        (folder / KERNEL_FILE).unlink(missing_ok=True)  # a kernel of an earlier stack, now unused
    (folder / BLEND_FILE).unlink(missing_ok=True)
    set_card_section(folder / "README.md", "Source-kernel stack", "Predicted matrices are `(1 - w) * model + w * kernel`, the kernel an RBF "
                     f"kernel ridge regression on the source sentence's names (`{KERNEL_FILE}`, `python -m translator.stack`); weights per direction: "
                     + ", ".join(f"{d} {r['weight']:.2f}" for d, r in records.items()) + " (`readout.json`, `source_kernel`).")
    records["seconds"] = round(time.perf_counter() - started, 1)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model or ensemble folder, calibrated (rewritten in place: readout.json, source_kernel.safetensors)")
    parser.add_argument("--dataset_dir", required=True, help="the dataset the folder was trained on: the kernel fits on its train and validation cells")
    parser.add_argument("--pool", nargs=2, action="append", default=[], metavar=("MODEL", "DATASET_DIR"),
                        help="choose the kernel's settings and weight on DATASET_DIR's validation cells as MODEL reads them with the folder's calibration "
                             "(repeatable; cross-validation fold models); default: the folder's own validation cells")
    parser.add_argument("--directions", nargs="+", choices=("gex2atac", "atac2gex"), help="default: every calibrated direction")
    parser.add_argument("--weights", nargs="+", type=float, default=list(WEIGHTS), help="kernel weights to choose among (default 0, 0.05, ..., 1)")
    parser.add_argument("--krr_landmarks", type=int, default=1000, help="Nystroem landmarks of the kernel (as eval.py's svd_krr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    records = stack(args.model, args.dataset_dir, [tuple(p) for p in args.pool], args.directions, args.weights, max_landmarks=args.krr_landmarks, seed=args.seed)
    for direction, r in records.items():
        if direction != "seconds":
            p = r["pooled_rmse"]
            print(f"{direction}: weight {r['weight']:.2f}, pooled RMSE on {r['pooled_cells']} cells: model {p['model']:.6f}, kernel {p['kernel']:.6f}, "
                  f"stack {p['stack']:.6f}")
    print(f"rewrote {Path(args.model) / 'readout.json'} and {Path(args.model) / 'source_kernel.safetensors'} ({records['seconds']} s)")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    from dataset_builder.cli import run_main

    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
