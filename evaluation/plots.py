"""PNG plots of an evaluation (matplotlib, Agg backend): the figures show the data, not decorations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dataset_builder.outputs import atomic_file  # noqa: E402
from tokenizer import DIRECTION_NAMES  # noqa: E402


def _save(fig, path: Path) -> Path:
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_feature_means(means: dict[str, dict[str, np.ndarray]], direction: str, path: Path) -> Path:
    """Scatter of predicted against observed per-feature means, one panel per method."""
    names = list(means)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names, strict=True):
        obs, pred = means[name]["truth"], means[name]["prediction"]
        ax.scatter(obs, pred, s=3, alpha=0.4, rasterized=True)
        hi = float(max(obs.max(), pred.max(), 1e-6))
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        r = np.corrcoef(obs, pred)[0, 1] if obs.std() > 0 and pred.std() > 0 else float("nan")
        ax.set_title(f"{name} (r = {r:.3f})", fontsize=9)
        ax.set_xlabel("observed mean per feature")
        ax.set_ylabel("predicted mean per feature")
    fig.suptitle(f"{DIRECTION_NAMES.get(direction, direction)}: per-feature means over cells", fontsize=10)
    return _save(fig, path)


def plot_cell_example(examples: dict[str, dict[str, np.ndarray]], direction: str, target: str, path: Path) -> Path:
    """One cell: predicted value of every feature against its observed value, one panel per method.

    ATAC: predicted probability of closed and of accessible peaks (box plots with the points);
    GEX: scatter of predicted against observed log-norm expression.
    """
    names = list(examples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False, layout="constrained")
    rng = np.random.default_rng(0)
    for ax, name in zip(axes[0], names, strict=True):
        truth, pred = examples[name]["truth"], examples[name]["prediction"]
        if target == "atac":
            groups = [pred[truth < 0.5], pred[truth >= 0.5]]
            ax.boxplot(groups, showfliers=False)
            for i, values in enumerate(groups, start=1):
                shown = values if values.size <= 3000 else rng.choice(values, 3000, replace=False)
                ax.scatter(i + rng.uniform(-0.15, 0.15, shown.size), shown, s=2, alpha=0.3, rasterized=True)
            ax.set_xticks([1, 2], [f"closed ({groups[0].size})", f"accessible ({groups[1].size})"])
            ax.set_ylabel("predicted accessibility")
        else:
            ax.scatter(truth, pred, s=4, alpha=0.5, rasterized=True)
            hi = float(max(truth.max(), pred.max(), 1e-6))
            ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
            ax.set_xlabel("observed log-norm")
            ax.set_ylabel("predicted log-norm")
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{DIRECTION_NAMES.get(direction, direction)}: one example cell", fontsize=10)
    return _save(fig, path)


def plot_roc_pr(curves: dict[str, dict[str, np.ndarray]], metrics: dict[str, dict], path: Path) -> Path:
    """ROC and precision-recall curves over all cell x peak entries, one line per method."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4))
    for name, curve in curves.items():
        values = metrics.get(name, {})
        roc.plot(curve["fpr"], curve["tpr"], lw=1.2, label=f"{name} (AUROC {values.get('auroc_all', float('nan')):.3f})")
        pr.plot(curve["recall"][1:], curve["precision"][1:], lw=1.2, label=f"{name} (AP {values.get('ap_all', float('nan')):.3f})")
    roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC, all entries", fontsize=10)
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.set_yscale("log")
    pr.set_title("precision-recall, all entries", fontsize=10)
    roc.legend(fontsize=7, loc="lower right")
    pr.legend(fontsize=7, loc="upper right")
    fig.suptitle("GEX to ATAC", fontsize=10)
    return _save(fig, path)


def plot_cell_type_bars(by_type: dict[str, dict[str, dict]], direction: str, path: Path, metric: str = "rmse") -> Path:
    """Grouped bars of ``metric`` per cell type, one bar per method."""
    names = list(by_type)
    types = sorted({t for groups in by_type.values() for t in groups}, key=str)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(types) * max(1, len(names)) / 2), 4))
    x = np.arange(len(types))
    for i, name in enumerate(names):
        heights = [by_type[name].get(t, {}).get(metric, np.nan) for t in types]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
    counts = [int(next((g[t]["n_cells"] for g in by_type.values() if t in g), 0)) for t in types]
    ax.set_xticks(x, [f"{t} ({n})" for t, n in zip(types, counts, strict=True)], rotation=60, ha="right", fontsize=7)
    label = metric.upper() if metric in ("rmse", "mae") else metric
    ax.set_ylabel(label)
    ax.set_title(f"{DIRECTION_NAMES.get(direction, direction)}: {label} by cell type (cells)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
