"""Run the tutorial (docs/tutorial.md) end to end and draw its figures.

    pip install -e ".[tutorial]"
    python docs/tutorial/make_tutorial.py --h5mu ../shared/data/mop_snareseq/mop_snare.h5mu --work_dir tutorial_run \
        --max_train_seconds 900

Runs the same commands the tutorial shows (build from an .h5mu, tokenize, train, predict the held-out library
in both directions, evaluate), then writes into ``docs/tutorial/``:

- ``umap_atac.png`` / ``umap_gex.png``: a UMAP of the measured and one of the predicted profiles of the held-out
  cells, side by side, coloured by cell type;
- ``cell_type_scores.png``: per-cell-type RMSE of the model and of the per-feature mean on those cells;
- ``one_cell.png``: one held-out cell's predicted against measured profile, both directions;
- ``figures.json``: the figures' numbers (cells, scores, the commands, the commit) for the tutorial text.

The held-out cells are one library, the tutorial dataset's test split: no part of the model (training, calibration,
the blend's weights, kernel or mean) saw them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)


def embed(matrix: np.ndarray, binary: bool, seed: int = 0) -> np.ndarray:
    """UMAP coordinates of the rows: LSI (TF-IDF, truncated SVD, first component dropped) for measured binary
    accessibility, PCA of standardized features otherwise; each matrix gets its own embedding."""
    import umap
    from sklearn.decomposition import PCA, TruncatedSVD

    x = np.asarray(matrix, dtype=np.float32)
    if binary:
        tf = x / np.maximum(x.sum(1, keepdims=True), 1)
        idf = np.log1p(len(x) / np.maximum(x.sum(0), 1))
        reduced = TruncatedSVD(n_components=31, random_state=seed).fit_transform(tf * idf)[:, 1:]
    else:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        reduced = PCA(n_components=min(30, x.shape[1] - 1), random_state=seed).fit_transform(x)
    return umap.UMAP(n_neighbors=30, min_dist=0.3, random_state=seed).fit_transform(reduced)


def plot_umaps(path: Path, title: str, measured_xy: np.ndarray, predicted_xy: np.ndarray, cell_types: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted(set(cell_types))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(types), 2)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    for ax, xy, name in ((axes[0], measured_xy, "measured"), (axes[1], predicted_xy, "predicted from the other modality")):
        for color, kind in zip(colors, types, strict=False):
            rows = cell_types == kind
            ax.scatter(xy[rows, 0], xy[rows, 1], s=4, color=color, label=kind)
        ax.set_title(f"{title}: {name}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h5mu", required=True, help="the MOp SNARE-seq .h5mu (modalities rna and atac, obs batch and cell_type)")
    parser.add_argument("--work_dir", required=True, help="where the dataset, tokenizer, model and predictions go")
    parser.add_argument("--heldout_batch", default="09J", help="the library held out as the test split, predicted and scored")
    parser.add_argument("--validation_batch", default="09I", help="the library the model calibrates and chooses its blend on")
    parser.add_argument("--max_train_seconds", type=float, default=900)
    parser.add_argument("--figures_dir", default=str(HERE))
    args = parser.parse_args(argv)

    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mudata as md

    work, figures = Path(args.work_dir).resolve(), Path(args.figures_dir)
    work.mkdir(parents=True, exist_ok=True)
    data, tok, model = work / "mop", work / "mop_tokenizer", work / "mop_model"
    commands = [
        ["-m", "dataset_builder", "--input", args.h5mu, "--output_dir", str(data), "--test_batches", args.heldout_batch,
         "--validation_batches", args.validation_batch],
        ["-m", "tokenizer", "--dataset", str(data), "--output_dir", str(tok)],
        ["train.py", "--dataset_dir", str(data), "--tokenizer_dir", str(tok), "--output_dir", str(model),
         "--max_train_seconds", str(args.max_train_seconds), "--evaluate", "false"],
    ]
    for command, done in zip(commands, (data, tok, model / "model.safetensors"), strict=True):
        if not done.exists():
            run(command)

    # The held-out library as its own .h5mu, the way a user would cut one out of their file.
    mdata = md.read_h5mu(args.h5mu)
    heldout_cells = mdata.obs_names[(mdata["rna"].obs["batch"] == args.heldout_batch).to_numpy()]
    heldout = work / "heldout.h5mu"
    if not heldout.exists():
        mdata[heldout_cells].copy().write_h5mu(heldout)
    predictions = {}
    for direction in ("gex2atac", "atac2gex"):
        out = work / f"predicted_{direction}.h5ad"
        if not out.exists():
            run(["predict.py", "--model", str(model), "--input", str(heldout), "--direction", direction, "--output", str(out)])
        predictions[direction] = ad.read_h5ad(out)
    eval_dir = work / "eval_heldout"
    if not (eval_dir / "eval_results.json").exists():
        run(["eval.py", "--model", str(model), "--dataset_dir", str(data), "--split", "test", "--output_dir", str(eval_dir),
             "--baselines", "mean", "--no_update_model_folder", "--no_plots"])
    results = json.loads((eval_dir / "eval_results.json").read_text())

    # Measured profiles on the model's features, in the scale the model predicts.
    sub = md.read_h5mu(heldout)
    rna, atac = sub["rna"], sub["atac"]
    pred_atac, pred_gex = predictions["gex2atac"], predictions["atac2gex"]
    measured_atac = (atac[pred_atac.obs_names, list(pred_atac.var_names)].X > 0).astype(np.float32).toarray()
    counts = rna[pred_gex.obs_names, list(pred_gex.var_names)].X.toarray().astype(np.float64)
    library = np.asarray(rna[pred_gex.obs_names].X.sum(1)).ravel()
    measured_gex = np.log1p(counts / np.maximum(library, 1)[:, None] * np.median(library))
    predicted_atac, predicted_gex = np.asarray(pred_atac.X), np.asarray(pred_gex.X)
    types_atac = rna.obs.loc[pred_atac.obs_names, "cell_type"].astype(str).to_numpy()
    types_gex = rna.obs.loc[pred_gex.obs_names, "cell_type"].astype(str).to_numpy()

    plot_umaps(figures / "umap_atac.png", "ATAC", embed(measured_atac, binary=True), embed(predicted_atac, binary=False), types_atac)
    plot_umaps(figures / "umap_gex.png", "GEX", embed(measured_gex, binary=False), embed(predicted_gex, binary=False), types_gex)

    # Per-cell-type RMSE of the model and of the per-feature mean, from eval.py's results.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    scores = {}
    for ax, direction, label in ((axes[0], "gex2atac", "GEX to ATAC"), (axes[1], "atac2gex", "ATAC to GEX")):
        by_type = results["by_cell_type"][direction]
        kinds = sorted(by_type["model"], key=lambda k: -by_type["model"][k]["n_cells"])
        model_rmse = [by_type["model"][k]["rmse"] for k in kinds]
        mean_rmse = [by_type["mean"][k]["rmse"] for k in kinds]
        x = np.arange(len(kinds))
        ax.bar(x - 0.2, model_rmse, 0.4, label="model")
        ax.bar(x + 0.2, mean_rmse, 0.4, label="per-feature mean")
        ax.set_xticks(x, [f"{k} ({int(by_type['model'][k]['n_cells'])})" for k in kinds], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("RMSE (lower is better)")
        ax.set_title(label)
        ax.legend(fontsize=8)
        scores[direction] = {k: {"model": round(m, 4), "mean": round(b, 4), "cells": int(by_type["model"][k]["n_cells"])}
                             for k, m, b in zip(kinds, model_rmse, mean_rmse, strict=True)}
    fig.savefig(figures / "cell_type_scores.png", dpi=100)
    plt.close(fig)

    # One held-out cell: the one whose predicted ATAC correlates with its measured ATAC at the median.
    r = [np.corrcoef(a, b)[0, 1] if a.std() and b.std() else 0.0 for a, b in zip(measured_atac, predicted_atac, strict=True)]
    cell = int(np.argsort(r)[len(r) // 2])
    name = pred_atac.obs_names[cell]
    g = list(pred_gex.obs_names).index(name)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    order = np.argsort(-predicted_atac[cell])[:200]
    axes[0].bar(np.arange(len(order)), predicted_atac[cell, order], color="tab:blue", label="predicted probability")
    opened = np.flatnonzero(measured_atac[cell, order] > 0)
    axes[0].scatter(opened, np.full(len(opened), predicted_atac[cell, order].max() * 1.05), marker="v", color="tab:red", s=12,
                    label="measured open")
    axes[0].set_xlabel("the 200 peaks predicted most accessible")
    axes[0].set_title(f"cell {name} ({types_atac[cell]}): ATAC from GEX")
    axes[0].legend(fontsize=8)
    axes[1].scatter(measured_gex[g], predicted_gex[g], s=8)
    axes[1].set_xlabel("measured log-normalized expression")
    axes[1].set_ylabel("predicted")
    axes[1].set_title(f"same cell: GEX from ATAC (Pearson {np.corrcoef(measured_gex[g], predicted_gex[g])[0, 1]:.2f})")
    fig.savefig(figures / "one_cell.png", dpi=100)
    plt.close(fig)

    summary = {
        "heldout_batch": args.heldout_batch,
        "heldout_cells": int(len(heldout_cells)),
        "scores": {d: {"model": results["directions"][d]["model"], "mean": results["directions"][d]["baselines"]["mean"]}
                   for d in ("gex2atac", "atac2gex")},
        "by_cell_type_rmse": scores,
        "one_cell": {"name": str(name), "cell_type": str(types_atac[cell]), "atac_pearson": round(float(r[cell]), 4)},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "commands": [" ".join(["python", *c]) for c in commands],
    }
    (figures / "figures.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({d: {k: summary["scores"][d]["model"].get(k) for k in ("rmse", "pearson_cell")} for d in summary["scores"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
