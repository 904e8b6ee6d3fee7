"""Evaluation of cell translation: metrics core, baselines, data loading, report and plots.

``eval.py`` is the command line; :func:`run_evaluation` is the same run from Python (``train.py`` calls it).
The metrics are also an ``evaluate`` module: :func:`load_metric` loads ``metrics/cell_translation`` by path.

The names below are imported from their modules on first use, so that ``python -m evaluation.report`` (or
``.crossval``) runs its module once, without Python's warning about a module found in ``sys.modules`` before it ran.
"""

from __future__ import annotations

import importlib
from pathlib import Path

METRIC_PATH = Path(__file__).resolve().parents[1] / "metrics" / "cell_translation"

_EXPORTS = {
    "BASELINES": "evaluation.baselines",
    "fit_baselines": "evaluation.baselines",
    "load_split_matrices": "dataset_builder.records",
    "METRIC_KEYS": "translator.metrics_core",
    "MetricAccumulator": "translator.metrics_core",
    "compute_metrics": "translator.metrics_core",
    "metric_keys": "translator.metrics_core",
    "markdown_table": "evaluation.report",
    "merge_model_index": "translator.card",
    "DIRECTIONS": "evaluation.runner",
    "run_evaluation": "evaluation.runner",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")


def load_metric(target: str = "atac"):
    """The local ``evaluate`` module ``metrics/cell_translation`` for a target modality, loaded offline by path."""
    import evaluate

    if target not in ("atac", "gex"):
        raise ValueError(f'target must be "atac" or "gex", got {target!r}')
    return evaluate.load(str(METRIC_PATH), target)


__all__ = [*sorted(_EXPORTS), "METRIC_PATH", "load_metric"]
