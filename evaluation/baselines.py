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
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.kernel_approximation import Nystroem
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from evaluation.metrics_core import default_chunk_cells, iter_row_chunks

BASELINES = ("zeros", "mean", "svd_knn", "svd_krr")
MODALITIES = ("gex", "atac")

KNN_GRID = {"n_components": (32, 64), "k": (25, 50, 100, 200, 400), "prior": (0.0, 25.0, 100.0, 400.0)}
KRR_GRID = {"n_components": (32, 64), "gamma_scale": (0.1, 0.3, 1.0, 3.0), "alpha": (0.1, 1.0, 10.0, 100.0)}


def _check_modality(name: str, value: str) -> None:
    if value not in MODALITIES:
        raise ValueError(f"{name} must be one of {MODALITIES}, got {value!r}")


def clip_prediction(values: np.ndarray, target: str) -> np.ndarray:
    """Clip predictions into the valid range of the target modality (in place, returned)."""
    if target == "atac":
        return np.clip(values, 0.0, 1.0, out=values)
    return np.maximum(values, 0.0, out=values)


def rmse(prediction_chunks: Iterator[np.ndarray], truth: sp.csr_matrix, chunk_cells: int) -> float:
    """RMSE of predictions given chunk by chunk (rows in order) against a sparse truth."""
    sse = 0.0
    for rows, pred in zip(iter_row_chunks(truth.shape[0], chunk_cells), prediction_chunks, strict=True):
        diff = np.asarray(pred, dtype=np.float64) - truth[rows].toarray()
        sse += float(np.einsum("ij,ij->", diff, diff))
    return float(np.sqrt(sse / (truth.shape[0] * truth.shape[1])))


class SourceEmbedding:
    """Low-dimensional embedding of a source matrix, fit on train.

    GEX: log-norm scaled to unit variance per gene (values capped at 10, as scanpy's ``scale``), then PCA
    (centring stays implicit, so the matrix stays sparse). ATAC: TF-IDF, then TruncatedSVD (LSI).
    """

    def __init__(self, source: str, n_components: int, seed: int = 0) -> None:
        _check_modality("source", source)
        self.source, self.n_components, self.seed = source, int(n_components), seed

    def _prepare(self, x: sp.csr_matrix) -> sp.csr_matrix:
        x = sp.csr_matrix(x, dtype=np.float32)
        if self.source == "atac":
            return self.tfidf.transform(x)
        x = sp.csr_matrix(x @ sp.diags(self.inv_sd))
        np.minimum(x.data, 10.0, out=x.data)
        return x

    def fit(self, x: sp.csr_matrix) -> SourceEmbedding:
        x = sp.csr_matrix(x, dtype=np.float32)
        n_comp = max(1, min(self.n_components, min(x.shape) - 1))
        if self.source == "atac":
            self.tfidf = TfidfTransformer(norm="l2").fit(x)
            self.reducer = TruncatedSVD(n_components=n_comp, n_iter=7, random_state=self.seed)
        else:
            mean = np.asarray(x.mean(axis=0)).ravel()
            var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
            self.inv_sd = (1.0 / (np.sqrt(np.maximum(var, 0.0)) + 1e-3)).astype(np.float32)
            self.reducer = PCA(n_components=n_comp, svd_solver="arpack", random_state=self.seed)
        self.reducer.fit(self._prepare(x))
        return self

    def transform(self, x: sp.csr_matrix, n_components: int | None = None) -> np.ndarray:
        z = self.reducer.transform(self._prepare(x))
        return z[:, : n_components or z.shape[1]]


class ZerosBaseline:
    """Predicts zeros everywhere (nothing accessible, nothing expressed)."""

    name = "zeros"

    def __init__(self, source: str, target: str) -> None:
        _check_modality("target", target)
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
        _check_modality("target", target)
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


class SvdKrrBaseline:
    """RBF kernel ridge regression from a source SVD space to a target PCA space (Nystroem features).

    The kernel width is ``gamma = gamma_scale / median squared distance`` between train embeddings,
    so the grid does not depend on the scale of the data.
    """

    name = "svd_krr"

    def __init__(
        self,
        source: str,
        target: str,
        n_components: int = 64,
        target_components: int = 64,
        gamma_scale: float = 1.0,
        alpha: float = 1.0,
        max_landmarks: int = 1000,
        seed: int = 0,
    ) -> None:
        _check_modality("target", target)
        self.source, self.target = source, target
        self.n_components, self.target_components = int(n_components), int(target_components)
        self.gamma_scale, self.alpha = float(gamma_scale), float(alpha)
        self.max_landmarks, self.seed = int(max_landmarks), seed

    def _fit_target(self, target_train: sp.csr_matrix) -> np.ndarray:
        target_train = sp.csr_matrix(target_train, dtype=np.float32)
        n_comp = max(1, min(self.target_components, min(target_train.shape) - 1))
        # arpack PCA centres the sparse target implicitly (no dense copy)
        self.target_pca = PCA(n_components=n_comp, svd_solver="arpack", random_state=self.seed).fit(target_train)
        return self.target_pca.transform(target_train)

    def _embed(self, source: sp.csr_matrix, n_components: int) -> np.ndarray:
        return self.embedding.transform(source, n_components) / self.scale

    def _features(self, z: np.ndarray, n_components: int, gamma_scale: float) -> tuple[Nystroem, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        sample = z[rng.choice(z.shape[0], size=min(1000, z.shape[0]), replace=False)]
        d2 = ((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1)
        median = float(np.median(d2[np.triu_indices(sample.shape[0], 1)])) or 1.0
        m = min(self.max_landmarks, z.shape[0])
        mapper = Nystroem(kernel="rbf", gamma=gamma_scale / median, n_components=m, random_state=self.seed).fit(z)
        return mapper, mapper.transform(z)

    def _solve(self, phi: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> dict[float, np.ndarray]:
        # ridge in the Nystroem feature space, one eigendecomposition for every alpha
        gram = phi.T @ phi
        evals, evecs = np.linalg.eigh(gram)
        proj = evecs.T @ (phi.T @ y)
        return {a: evecs @ (proj / (np.maximum(evals, 0.0) + a)[:, None]) for a in alphas}

    def fit(self, source_train: sp.csr_matrix, target_train: sp.csr_matrix) -> SvdKrrBaseline:
        self._prepare(source_train, target_train)
        z = self._embed(source_train, self.n_components)
        self.mapper, phi = self._features(z, self.n_components, self.gamma_scale)
        self.coef = self._solve(phi, self.y_train, [self.alpha])[self.alpha]
        return self

    def refit(self, source: sp.csr_matrix, target: sp.csr_matrix, embed_components: int | None = None) -> SvdKrrBaseline:
        """Fit again on other cells with the settings chosen (the embedding as wide as when tuned, then cut).

        ``embed_components``: that width for a model never tuned (default: the tuned embedding's).
        """
        chosen, self.n_components = self.n_components, embed_components or self.embedding.n_components
        self._prepare(source, target)
        self.n_components = chosen
        self.mapper, phi = self._features(self._embed(source, chosen), chosen, self.gamma_scale)
        self.coef = self._solve(phi, self.y_train, [self.alpha])[self.alpha]
        return self

    def _prepare(self, source_train: sp.csr_matrix, target_train: sp.csr_matrix) -> None:
        self.embedding = SourceEmbedding(self.source, self.n_components, self.seed).fit(source_train)
        z = self.embedding.transform(source_train)
        self.scale = float(np.sqrt((z**2).sum(axis=1).mean())) or 1.0
        self.y_train = self._fit_target(target_train)
        self.n_features = target_train.shape[1]

    def _predict_rows(self, source: sp.csr_matrix) -> np.ndarray:
        latent = self.mapper.transform(self._embed(source, self.n_components)) @ self.coef
        values = self.target_pca.inverse_transform(latent).astype(np.float32)
        return clip_prediction(values, self.target)

    def predict_chunks(self, source: sp.csr_matrix, chunk_cells: int | None = None) -> Iterator[np.ndarray]:
        for rows in iter_row_chunks(source.shape[0], chunk_cells or default_chunk_cells(self.n_features)):
            yield self._predict_rows(source[rows])

    def settings(self) -> dict:
        return {
            "n_components": self.n_components,
            "target_components": int(self.target_pca.n_components_),
            "gamma_scale": self.gamma_scale,
            "gamma": float(self.mapper.gamma),
            "alpha": self.alpha,
            "landmarks": int(self.mapper.n_components),
            "tfidf": self.source == "atac",
        }

    @classmethod
    def tune(
        cls,
        source: str,
        target: str,
        train: tuple[sp.csr_matrix, sp.csr_matrix],
        validation: tuple[sp.csr_matrix, sp.csr_matrix],
        grid: dict[str, Sequence] | None = None,
        target_components: int = 64,
        max_landmarks: int = 1000,
        seed: int = 0,
    ) -> tuple[SvdKrrBaseline, list[dict]]:
        """Fit on train for every grid point, keep the lowest validation RMSE; returns (model, trials)."""
        grid = grid or KRR_GRID
        model = cls(
            source, target, n_components=max(grid["n_components"]), target_components=target_components,
            max_landmarks=max_landmarks, seed=seed,
        )
        model._prepare(*train)
        val_source, val_target = validation
        chunk = default_chunk_cells(val_target.shape[1])
        trials, fitted = [], {}
        for n_comp, gamma_scale in itertools.product(sorted(grid["n_components"]), grid["gamma_scale"]):
            model.n_components = n_comp
            mapper, phi = model._features(model._embed(train[0], n_comp), n_comp, gamma_scale)
            coefs = model._solve(phi, model.y_train, grid["alpha"])
            for alpha, coef in coefs.items():
                model.mapper, model.coef = mapper, coef
                score = rmse(model.predict_chunks(val_source, chunk), val_target, chunk)
                trials.append({"n_components": n_comp, "gamma_scale": gamma_scale, "alpha": alpha, "validation_rmse": score})
                fitted[(n_comp, gamma_scale, alpha)] = (mapper, coef)
        best = min(trials, key=lambda t: t["validation_rmse"])
        model.n_components, model.gamma_scale, model.alpha = best["n_components"], best["gamma_scale"], best["alpha"]
        model.mapper, model.coef = fitted[(best["n_components"], best["gamma_scale"], best["alpha"])]
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
    _check_modality("source", source)
    _check_modality("target", target)
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
