"""K-fold cross-validation within one batch (donor), for datasets whose training data hold a single donor.

The BMMC starter's training donor has 221 cells; a validation split of 22 of them cannot rank candidates
whose RMSEs differ by less than its own noise (a paired bootstrap of the 22 cells gives a standard deviation of
0.0028 for the RMSE difference between the model and svd_krr, about the size of the differences being chosen from).
Cross-validation scores every training cell once instead:

1. ``folds``: copy an h5ad file with ``obs['batch']`` of the named batch rewritten as ``<batch>_f0`` ..
   ``<batch>_f<K-1>``, a fold drawn from a CRC-32 hash of each cell's barcode (stable across runs, machines and
   the two files of a two-file layout, so RNA and ATAC files get the same folds);
2. build one dataset folder per fold (``python -m dataset_builder --validation_batches <batch>_fK``), train and
   evaluate each candidate on each (``eval.py --split validation``), and the tuned baselines too;
3. ``pool``: pool the folds' ``eval_results.json``: RMSE over all cells (``sqrt`` of the cell-weighted mean
   squared error), every other metric as the cell-weighted mean of the fold values, and count for each candidate
   the (direction x metric) cells it comes first in against the pooled baselines.

Usage::

    python -m evaluation.crossval folds --input combined.h5ad --batch s1d1 --folds 5 --output folds.h5ad
    python -m evaluation.crossval pool --baselines ev_base_0 ... ev_base_4 \\
        --candidate small50 ev_small50_0 ... ev_small50_4 --output pooled.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dataset_builder.outputs import atomic_file, check_output, write_text_atomic
from evaluation.report import HEADLINE_KEYS, LOWER_IS_BETTER
from tokenizer import DIRECTION_NAMES

TUNED_BASELINES = ("mean", "svd_knn", "svd_krr")


def ranked_keys(metrics: dict) -> list[str]:
    """The headline metrics a direction has (RMSE and per-cell Pearson; AUROC and AP for ATAC targets)."""
    return [key for key in HEADLINE_KEYS if key in metrics]


def fold_labels(cells: Sequence[str], n_folds: int) -> np.ndarray:
    """Fold of each cell, ``crc32(barcode) % n_folds``: the same barcode gets the same fold everywhere."""
    if n_folds < 2:
        raise ValueError(f"--folds must be at least 2, got {n_folds}")
    return np.fromiter((zlib.crc32(str(c).encode()) % n_folds for c in cells), dtype=np.int64, count=len(cells))


def write_fold_file(source: str | Path, output: str | Path, batch: str, n_folds: int, batch_key: str = "batch") -> dict[str, int]:
    """Copy ``source`` (h5ad) to ``output`` with ``obs[batch_key] == batch`` split into folds; returns cells per label.

    The file appears under its final name only once complete.
    """
    import anndata as ad

    source, output = Path(source), Path(output)
    if source.suffix != ".h5ad":
        raise ValueError(f"--input {source}: folds are written for .h5ad files; give each file of a two-file layout in turn")
    if not source.exists():
        raise ValueError(f"--input {source} does not exist")
    check_output(output, {"--input": source}, "--output")
    adata = ad.read_h5ad(source)
    if batch_key not in adata.obs:
        raise ValueError(f"--input {source} has no obs[{batch_key!r}] column; add it or pass --batch_key")
    labels = adata.obs[batch_key].astype(str).to_numpy().copy()
    clash = sorted(set(labels) & {f"{batch}_f{k}" for k in range(n_folds)})
    if clash:
        raise ValueError(f"--input {source} already has batches named like the folds ({', '.join(clash)}); rename them or pick another --batch")
    rows = np.flatnonzero(labels == batch)
    if len(rows) < n_folds:
        found = ", ".join(sorted(set(labels))[:10])
        raise ValueError(f"--batch {batch!r} has {len(rows)} cells in {source}, fewer than --folds {n_folds}; batches found: {found}")
    folds = fold_labels(adata.obs_names[rows], n_folds)
    labels[rows] = [f"{batch}_f{k}" for k in folds]
    adata.obs[batch_key] = labels
    with atomic_file(output, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    names, counts = np.unique(labels, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _load_result(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "eval_results.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist; give eval.py output folders or their eval_results.json")
    data = json.loads(path.read_text())
    if "directions" not in data or "n_cells" not in data:
        raise ValueError(f"{path} is not an eval.py eval_results.json (no 'directions' / 'n_cells')")
    data["_path"] = str(path)
    return data


def _pool(values: Sequence[tuple[int, float]], key: str) -> float:
    n = sum(c for c, _ in values)
    if key == "rmse":
        return math.sqrt(sum(c * v * v for c, v in values) / n)
    return sum(c * v for c, v in values) / n


def _pooled_method(results: Sequence[dict], pick) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for direction in results[0]["directions"]:
        rows = [pick(r["directions"][direction]) for r in results]
        if any(row is None for row in rows):
            continue
        keys = [k for k in rows[0] if all(isinstance(row.get(k), int | float) and row.get(k) is not None for row in rows)]
        out[direction] = {k: _pool([(r["n_cells"], row[k]) for r, row in zip(results, rows, strict=True)], k) for k in keys}
    return out


def _same_cells(run: dict, ref: dict) -> bool:
    """Same dataset, split and cell count, and (where both ran it) the same per-feature mean baseline's RMSE."""
    if run["n_cells"] != ref["n_cells"] or run.get("dataset") != ref.get("dataset") or run.get("split") != ref.get("split"):
        return False
    for direction, entry in run["directions"].items():
        mine = entry.get("baselines", {}).get("mean", {}).get("rmse")
        theirs = ref["directions"].get(direction, {}).get("baselines", {}).get("mean", {}).get("rmse")
        if mine is not None and theirs is not None and not math.isclose(mine, theirs, rel_tol=1e-6):
            return False
    return True


def pool_folds(baselines: Sequence[str | Path], candidates: dict[str, Sequence[str | Path]]) -> dict:
    """Pool per-fold evaluations; ``baselines[i]`` and every candidate's ``i``-th result must score the same cells.

    One evaluation each (a plain validation split) applies the same selection rule without pooling.

    Returns
    -------
    ``{"folds", "cells", "baselines": {name: {direction: {metric: value}}}, "candidates": {name: {"metrics": ...,
    "firsts": n, "rmse_cut_over_mean": summed, "folds_ahead_of_svd_krr": {direction: n}}}}``.
    """
    base = [_load_result(p) for p in baselines]
    if not base:
        raise ValueError("--baselines needs at least one evaluation (one per fold, or one validation split)")
    out = {"folds": len(base), "cells": sum(r["n_cells"] for r in base), "baselines": {}, "candidates": {}}
    for name in (*TUNED_BASELINES, "zeros"):
        pooled = _pooled_method(base, lambda d, name=name: d.get("baselines", {}).get(name))
        if pooled:
            out["baselines"][name] = pooled
    if "mean" not in out["baselines"]:
        raise ValueError(f"{base[0]['_path']} has no 'mean' baseline; run eval.py with the tuned baselines (--baselines, or --skip_model)")
    for name, paths in candidates.items():
        runs = [_load_result(p) for p in paths]
        if len(runs) != len(base):
            raise ValueError(f"--candidate {name}: {len(runs)} evaluations for {len(base)} folds; give one per fold, in the order of --baselines")
        for run, ref in zip(runs, base, strict=True):
            if not _same_cells(run, ref):
                raise ValueError(f"--candidate {name}: {run['_path']} does not score the cells of {ref['_path']}; keep the folds in the same order")
        metrics = _pooled_method(runs, lambda d: d.get("model"))
        firsts, cut, ahead = 0, 0.0, {}
        for direction in metrics:
            for key in ranked_keys(out["baselines"]["mean"][direction]):
                rivals = [out["baselines"][b][direction][key] for b in TUNED_BASELINES if b in out["baselines"] and key in out["baselines"][b].get(direction, {})]
                value = metrics[direction][key]
                firsts += bool(rivals) and (value < min(rivals) if key in LOWER_IS_BETTER else value > max(rivals))
            cut += out["baselines"]["mean"][direction]["rmse"] - metrics[direction]["rmse"]
            if "svd_krr" in out["baselines"]:
                ahead[direction] = sum(
                    run["directions"][direction]["model"]["rmse"] < ref["directions"][direction]["baselines"]["svd_krr"]["rmse"]
                    for run, ref in zip(runs, base, strict=True)
                )
        out["candidates"][name] = {"metrics": metrics, "firsts": int(firsts), "rmse_cut_over_mean": cut, "folds_ahead_of_svd_krr": ahead}
    return out


def pooled_table(pooled: dict) -> str:
    """Markdown table of the ranked metrics: baselines, then candidates with their firsts and summed RMSE cut."""
    columns = [(d, k) for d, metrics in pooled["baselines"]["mean"].items() for k in ranked_keys(metrics)]
    head = "| method | " + " | ".join(f"{DIRECTION_NAMES[d]} {k}" for d, k in columns) + " | firsts | RMSE cut over mean |"
    lines = [head, "|" + "---|" * (len(columns) + 3)]
    rows = [(n, m, None) for n, m in pooled["baselines"].items()] + [(n, c["metrics"], c) for n, c in pooled["candidates"].items()]
    for name, metrics, cand in rows:
        cells = [f"{metrics[d][k]:.6f}" if k in metrics.get(d, {}) else "" for d, k in columns]
        extra = [str(cand["firsts"]), f"{cand['rmse_cut_over_mean']:.6f}"] if cand else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.crossval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    folds = sub.add_parser("folds", help="copy an h5ad with one batch split into hash folds")
    folds.add_argument("--input", required=True, help=".h5ad file (give each file of a two-file layout in turn)")
    folds.add_argument("--output", required=True, help="new .h5ad file")
    folds.add_argument("--batch", required=True, help="the batch (donor) to split, e.g. s1d1")
    folds.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    folds.add_argument("--batch_key", default="batch", help="obs column of the batches (default batch)")
    pool = sub.add_parser("pool", help="pool eval.py results of every fold")
    pool.add_argument("--baselines", nargs="+", required=True, help="eval.py output of the tuned baselines, one per fold (or one: a plain validation split)")
    pool.add_argument("--candidate", nargs="+", action="append", default=[], metavar="NAME EVAL",
                      help="a name, then its eval.py outputs in fold order (repeat for each candidate)")
    pool.add_argument("--output", help="write the pooled figures as JSON here")
    args = parser.parse_args(argv)
    from dataset_builder.cli import run_cli

    def body() -> int:
        if args.command == "folds":
            counts = write_fold_file(args.input, args.output, args.batch, args.folds, args.batch_key)
            print(json.dumps({"output": args.output, "cells": counts}))
            return 0
        candidates = {}
        for entry in args.candidate:
            if len(entry) < 2:
                raise ValueError(f"--candidate {entry[0]}: give a name and then its evaluations")
            candidates[entry[0]] = entry[1:]
        pooled = pool_folds(args.baselines, candidates)
        if args.output:
            write_text_atomic(args.output, json.dumps(pooled, indent=1) + "\n")
        print(pooled_table(pooled))
        return 0

    return run_cli(body, prefix="python -m evaluation.crossval: error:")

if __name__ == "__main__":
    sys.exit(main())
