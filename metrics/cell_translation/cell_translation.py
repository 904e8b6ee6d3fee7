"""Cell translation metrics: the NeurIPS 2021 predict-modality scores and more, as an `evaluate` module.

Load it by path, offline: ``evaluate.load("metrics/cell_translation", "atac")`` (or ``"gex"``). The folder is
self-contained (numpy / scipy): the numbers come from ``metrics_core.py`` beside this script, which is the
package's ``translator/metrics_core.py`` (a link to it in the repository; a copy of it wherever the folder is
published or copied).
"""

import datasets
import evaluate
import numpy as np

from .metrics_core import compute_metrics

_DESCRIPTION = """
Scores a translated cells x features matrix against the observed one. Configuration "atac" (binary
accessibility, predictions are probabilities in [0, 1]) or "gex" (log-normalized expression).

Keys: rmse, mae (over all entries; RMSE ranked the NeurIPS 2021 predict-modality task); pearson_cell,
spearman_cell (per cell, mean over cells with non-constant truth; a constant prediction scores 0);
pearson_feature, spearman_feature (per feature, mean over features with non-constant truth); for
"atac" also auroc_cell, ap_cell (per cell, mean over cells with both classes) and auroc_all, ap_all
(over all entries, from 10,000-bin score histograms: scores within 1e-4 count as tied);
token_precision, token_recall, token_f1, token_jaccard (token sets of the generated sentences, or of
the binarized prediction when no sentences are given, against the observed non-zero features);
accuracy_binary (share of entries right after binarizing: ATAC prediction >= 0.5, GEX prediction > 0,
against truth >= 0.5 / > 0) and accuracy_binary_all_zeros (the same share for an all-zeros guess).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted row (list of floats, one value per target feature) per cell.
    references: the observed row of each cell (same length).
    prediction_matrix / reference_matrix: instead of the two above, a dense [cells, features] prediction
        and a dense or scipy.sparse truth, passed as keyword arguments (no Arrow copy: use these for
        large splits; the work is chunked over cells).
    predicted_sentences: optional generated sentences (space-separated target feature names), one a cell.
    feature_names: target feature names (needed with predicted_sentences).
    cell_types: optional label of each cell: adds a "by_cell_type" breakdown.
    chunk_cells: cells per chunk (default: about 4 million entries a chunk).
    return_details: also return "details" (cell / feature counts behind each mean).
    target: "atac" or "gex" when the module was loaded without a configuration name.
Returns:
    dict of metric name -> float (plus "by_cell_type" and "details" when asked).
Examples:
    >>> metric = evaluate.load("metrics/cell_translation", "atac")
    >>> metric.compute(predictions=[[0.9, 0.1, 0.2]], references=[[1, 0, 0]])["auroc_cell"]
    1.0
"""

_CITATION = """
@inproceedings{luecken2021sandbox,
  title={A sandbox for prediction and integration of DNA, RNA, and proteins in single cells},
  author={Luecken, Malte D and others},
  booktitle={NeurIPS Datasets and Benchmarks},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellTranslation(evaluate.Metric):
    """Translation metrics over a cells x target-features matrix (config "atac" or "gex")."""

    def _info(self):
        if self.config_name not in ("atac", "gex", "default"):
            raise ValueError(
                f'cell_translation config must be "atac" or "gex" (the target modality), got {self.config_name!r}'
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://openproblems.bio/neurips_2021/"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Score rows added with ``add``/``add_batch``/``compute``, or whole matrices given as keywords."""
        if kwargs.get("prediction_matrix") is not None or kwargs.get("reference_matrix") is not None:
            if predictions is not None or references is not None:
                raise ValueError("give either predictions/references or prediction_matrix/reference_matrix, not both")
            # whole matrices skip the Arrow cache: a large split is scored chunk by chunk, never copied
            return self._compute(**kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions=None,
        references=None,
        prediction_matrix=None,
        reference_matrix=None,
        predicted_sentences=None,
        feature_names=None,
        cell_types=None,
        chunk_cells=None,
        return_details=False,
        target=None,
    ):
        target = target or (self.config_name if self.config_name in ("atac", "gex") else None)
        if target not in ("atac", "gex"):
            raise ValueError('say which modality is predicted: evaluate.load(path, "atac") or compute(..., target="gex")')
        if prediction_matrix is not None or reference_matrix is not None:
            if prediction_matrix is None or reference_matrix is None:
                raise ValueError("give both prediction_matrix and reference_matrix")
            pred, ref = np.asarray(prediction_matrix, dtype=np.float32), reference_matrix
        else:
            if predictions is None or len(predictions) == 0:
                raise ValueError("no cells to score: pass predictions/references or prediction_matrix/reference_matrix")
            pred = np.asarray(predictions, dtype=np.float32)
            ref = np.asarray(references, dtype=np.float32)
        result = compute_metrics(
            pred,
            ref,
            target,
            predicted_sentences=predicted_sentences,
            feature_names=feature_names,
            cell_types=cell_types,
            chunk_cells=chunk_cells,
        )
        out = dict(result["metrics"])
        if "by_cell_type" in result:
            out["by_cell_type"] = result["by_cell_type"]
        if return_details:
            out["details"] = result["details"]
        return out
