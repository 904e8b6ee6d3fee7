"""Baselines that translate one modality's matrix into the other's, fit on train, tuned on validation.

- ``zeros``: predicts nothing accessible / expressed.
- ``mean``: the per-feature mean of the train target.
- ``svd_knn``: PCA of the scaled source (TF-IDF + TruncatedSVD for ATAC), cosine k nearest train
  neighbours, average of their targets shrunk toward the mean (like LS_lab, best GEX to ATAC in 2021).
- ``svd_krr``: the same source embedding, PCA of the target, RBF kernel ridge regression between the two
  (Nystroem features when the train split is large), mapped back through the target PCA
  (like Guanlab).

Sources: log-normalized GEX (CSR) or binary ATAC (CSR). Predictions are clipped to the valid range
([0, 1] for ATAC, >= 0 for GEX). Hyper-parameters are chosen on validation by RMSE.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from translator.metrics_core import default_chunk_cells, iter_row_chunks
from translator.source_kernel import (  # noqa: F401 -- svd_krr and the source embedding live with the shipped kernel
    KRR_GRID,
    MODALITIES,
    SourceEmbedding,
    SvdKrrBaseline,
    check_modality,
    clip_prediction,
    rmse,
)

BASELINES = ("zeros", "mean", "svd_knn", "svd_krr")

KNN_GRID = {"n_components": (32, 64), "k": (25, 50, 100, 200, 400), "prior": (0.0, 25.0, 100.0, 400.0)}


class ZerosBaseline:
    """Predicts zeros everywhere (nothing accessible, nothing expressed)."""

    name = "zeros"

    def __init__(self, source: str, target: str) -> None:
        check_modality("target", target)
        self.target = target

    def fit(self, source_train: sp.csr_matrix, target_train: sp.csr_matrix) -> ZerosBaseline:
        self.n_features = target_train.shape[1]
        return self

    def predict_chunks(self, source: sp.csr_matrix, chunk_cells: int | None = None) -> Iterator[np.ndarray]:
        for rows in iter_row_chunks(source.shape[0], chunk_cells or default_chunk_cells(self.n_features)):
            yield np.zeros((rows.stop - rows.start, self.n_features), dtype=np.float32)

    def settings(self) -> dict:
        return {}


class MeanBaseline(ZerosBaseline):
    """Predicts the per-feature mean of the train target for every cell."""

    name = "mean"

    def fit(self, source_train: sp.csr_matrix, target_train: sp.csr_matrix) -> MeanBaseline:
        self.n_features = target_train.shape[1]
        self.mean = np.asarray(target_train.mean(axis=0), dtype=np.float32).ravel()
        return self

    def predict_chunks(self, source: sp.csr_matrix, chunk_cells: int | None = None) -> Iterator[np.ndarray]:
        for rows in iter_row_chunks(source.shape[0], chunk_cells or default_chunk_cells(self.n_features)):
            yield np.broadcast_to(self.mean, (rows.stop - rows.start, self.n_features)).copy()


class SvdKnnBaseline:
    """Average target of the ``k`` nearest train cells (cosine) in the SVD / PCA space of the source (:class:`SourceEmbedding`).

    ``prior`` adds that many pseudo-neighbours holding the train mean: ``(sum of k targets + prior * mean)
    / (k + prior)``. It shrinks sparse neighbour averages toward the per-feature mean and breaks the many
    ties at zero that a plain average leaves in sparse ATAC (``prior = 0`` is the plain average).
    """

    name = "svd_knn"

    def __init__(
        self, source: str, target: str, n_components: int = 64, k: int = 25, prior: float = 0.0, seed: int = 0
    ) -> None:
        check_modality("target", target)
        self.source, self.target = source, target
        self.n_components, self.k, self.prior, self.seed = int(n_components), int(k), float(prior), seed

    def fit(self, source_train: sp.csr_matrix, target_train: sp.csr_matrix) -> SvdKnnBaseline:
        self.embedding = SourceEmbedding(self.source, self.n_components, self.seed).fit(source_train)
        self.target_train = sp.csr_matrix(target_train, dtype=np.float32)
        self.mean = np.asarray(self.target_train.mean(axis=0), dtype=np.float32).ravel()
        self._z_train = self.embedding.transform(source_train)
        self._fit_index(self.n_components)
        return self

    def refit(self, source: sp.csr_matrix, target: sp.csr_matrix) -> SvdKnnBaseline:
        """Fit again on other cells with the settings chosen (the embedding as wide as when tuned, then cut)."""
        chosen, self.n_components = self.n_components, self.embedding.n_components
        self.fit(source, target)
        self._fit_index(chosen)
        return self

    def _fit_index(self, n_components: int) -> None:
        # euclidean distance between L2-normalized rows ranks neighbours as cosine similarity does
        self.n_components = min(n_components, self._z_train.shape[1])
        self.index = NearestNeighbors(metric="euclidean").fit(normalize(self._z_train[:, : self.n_components]))

    def neighbours(self, source: sp.csr_matrix, k: int) -> np.ndarray:
        z = normalize(self.embedding.transform(source, self.n_components))
        k = min(k, self.target_train.shape[0])
        return self.index.kneighbors(z, n_neighbors=k, return_distance=False)

    def predict_from_neighbours(self, neighbours: np.ndarray, k: int, prior: float) -> np.ndarray:
        n, k = neighbours.shape[0], min(k, neighbours.shape[1])
        weights = sp.csr_matrix(
            (np.full(n * k, 1.0, dtype=np.float32), neighbours[:, :k].ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, self.target_train.shape[0]),
        )
        values = np.asarray((weights @ self.target_train).toarray(), dtype=np.float32)
        values += prior * self.mean
        values /= k + prior
        return clip_prediction(values, self.target)

    def predict_chunks(self, source: sp.csr_matrix, chunk_cells: int | None = None) -> Iterator[np.ndarray]:
        chunk = chunk_cells or default_chunk_cells(self.target_train.shape[1])
        for rows in iter_row_chunks(source.shape[0], chunk):
            yield self.predict_from_neighbours(self.neighbours(source[rows], self.k), self.k, self.prior)

    def settings(self) -> dict:
        return {
            "n_components": self.n_components,
            "k": self.k,
            "prior": self.prior,
            "tfidf": self.source == "atac",
            "metric": "cosine",
        }

    @classmethod
    def tune(
        cls,
        source: str,
        target: str,
        train: tuple[sp.csr_matrix, sp.csr_matrix],
        validation: tuple[sp.csr_matrix, sp.csr_matrix],
        grid: dict[str, Sequence] | None = None,
        seed: int = 0,
    ) -> tuple[SvdKnnBaseline, list[dict]]:
        """Fit on train for every grid point, keep the lowest validation RMSE; returns (model, trials)."""
        grid = grid or KNN_GRID
        model = cls(source, target, n_components=max(grid["n_components"]), k=max(grid["k"]), seed=seed)
        model.fit(train[0], train[1])
        val_source, val_target = validation
        chunk = default_chunk_cells(val_target.shape[1])
        trials = []
        for n_comp in sorted(grid["n_components"]):
            model._fit_index(n_comp)
            neighbours = [model.neighbours(val_source[rows], max(grid["k"])) for rows in iter_row_chunks(val_source.shape[0], chunk)]
            for k, prior in itertools.product(sorted(grid["k"]), grid.get("prior", (0.0,))):
                score = rmse((model.predict_from_neighbours(nb, k, prior) for nb in neighbours), val_target, chunk)
                trials.append({"n_components": n_comp, "k": k, "prior": prior, "validation_rmse": score})
        best = min(trials, key=lambda t: t["validation_rmse"])
        model._fit_index(best["n_components"])
        model.k, model.prior = best["k"], best["prior"]
        return model, trials


def fit_baselines(
    source: str,
    target: str,
    train: tuple[sp.csr_matrix, sp.csr_matrix],
    validation: tuple[sp.csr_matrix, sp.csr_matrix],
    names: Sequence[str] = BASELINES,
    seed: int = 0,
    knn_grid: dict[str, Sequence] | None = None,
    krr_grid: dict[str, Sequence] | None = None,
    krr_landmarks: int = 1000,
    refit: bool = False,
) -> tuple[dict[str, object], dict[str, dict]]:
    """Fit every named baseline on train, tuning the SVD ones on validation by RMSE (then, with ``refit``, fit again on
    train and validation together with the settings chosen: the baselines of a model trained on every cell).

    Parameters
    ----------
    source, target
        Modalities (``"gex"`` / ``"atac"``) of the input and of the predicted matrix.
    train, validation
        ``(source_matrix, target_matrix)`` CSR pairs.
    names
        Baselines to fit, among :data:`BASELINES`.
    knn_grid, krr_grid
        Hyper-parameter grids (default :data:`KNN_GRID`, :data:`KRR_GRID`).
    krr_landmarks
        Nystroem landmarks of ``svd_krr`` (exact kernel ridge when the train split is not larger).
    refit
        After the tuning, fit every baseline again on train and validation together, with the settings chosen.

    Returns
    -------
    (models, settings)
        ``models[name]`` has ``predict_chunks(source, chunk_cells)``; ``settings[name]`` holds the chosen
        hyper-parameters, the validation RMSE of every grid point and the fit time in seconds.
    """
    check_modality("source", source)
    check_modality("target", target)
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose among {BASELINES}")
    if train[0].shape[0] != train[1].shape[0] or validation[0].shape[0] != validation[1].shape[0]:
        raise ValueError("source and target matrices must list the same cells")
    models: dict[str, object] = {}
    settings: dict[str, dict] = {}
    for name in names:
        start = time.perf_counter()
        trials: list[dict] = []
        if name == "zeros":
            model = ZerosBaseline(source, target).fit(*train)
        elif name == "mean":
            model = MeanBaseline(source, target).fit(*train)
        elif name == "svd_knn":
            model, trials = SvdKnnBaseline.tune(source, target, train, validation, grid=knn_grid, seed=seed)
        else:
            model, trials = SvdKrrBaseline.tune(
                source, target, train, validation, grid=krr_grid, max_landmarks=krr_landmarks, seed=seed
            )
        if refit:
            both = (sp.vstack([train[0], validation[0]]).tocsr(), sp.vstack([train[1], validation[1]]).tocsr())
            model = model.refit(*both) if hasattr(model, "refit") else model.fit(*both)
        models[name] = model
        settings[name] = {**model.settings(), "fit_seconds": round(time.perf_counter() - start, 2)}
        if refit:
            settings[name]["refit_cells"] = int(train[0].shape[0] + validation[0].shape[0])
        if trials:
            settings[name]["grid"] = trials
            settings[name]["validation_rmse"] = min(t["validation_rmse"] for t in trials)
    return models, settings
