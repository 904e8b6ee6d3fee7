"""Evaluation of cell translation: metrics core, baselines, data loading, report and plots.

``eval.py`` is the command line; :func:`run_evaluation` is the same run from Python (``train.py`` calls it).
The metrics are also an ``evaluate`` module: :func:`load_metric` loads ``metrics/cell_translation`` by path.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.baselines import BASELINES, fit_baselines
from evaluation.data import load_split_matrices
from evaluation.metrics_core import METRIC_KEYS, MetricAccumulator, compute_metrics, metric_keys
from evaluation.report import markdown_table, merge_model_index
from evaluation.runner import DIRECTIONS, run_evaluation

METRIC_PATH = Path(__file__).resolve().parents[1] / "metrics" / "cell_translation"


def load_metric(target: str = "atac"):
    """The local ``evaluate`` module ``metrics/cell_translation`` for a target modality, loaded offline by path."""
    import evaluate

    if target not in ("atac", "gex"):
        raise ValueError(f'target must be "atac" or "gex", got {target!r}')
    return evaluate.load(str(METRIC_PATH), target)


__all__ = [
    "BASELINES",
    "DIRECTIONS",
    "METRIC_KEYS",
    "METRIC_PATH",
    "MetricAccumulator",
    "compute_metrics",
    "fit_baselines",
    "load_metric",
    "load_split_matrices",
    "markdown_table",
    "merge_model_index",
    "metric_keys",
    "run_evaluation",
]
