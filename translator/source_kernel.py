"""The kernel ridge regression on the source names: fitted (``svd_krr``) and kept as plain arrays.

- :class:`SvdKrrBaseline`: an RBF kernel ridge regression from the source's SVD / PCA space (:class:`SourceEmbedding`) to the
  target's PCA, fitted on train and tuned on validation: ``eval.py``'s ``svd_krr`` baseline, and the ``kernel`` part of the
  shipped predictor (:mod:`translator.predictor`).
- :class:`SourceKernel`: a fitted regression as plain arrays (``blend.safetensors``); ``CellTranslator`` predicts with it
  from the names of a source sentence (:func:`source_indicator`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.kernel_approximation import Nystroem

from .metrics_core import default_chunk_cells, iter_row_chunks

if TYPE_CHECKING:
    import torch

MODALITIES = ("gex", "atac")
KRR_GRID = {"n_components": (32, 64), "gamma_scale": (0.1, 0.3, 1.0, 3.0), "alpha": (0.1, 1.0, 10.0, 100.0)}


def check_modality(name: str, value: str) -> None:
    """Refuse a modality name other than ``gex`` / ``atac`` (``name``: what it was given as)."""
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
        check_modality("source", source)
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
        check_modality("target", target)
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
        sample = np.asarray(z[rng.choice(z.shape[0], size=min(1000, z.shape[0]), replace=False)], dtype=np.float64)
        sq = (sample**2).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * sample @ sample.T, 0.0)
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
        self.embedding_cells = source_train.shape[0]

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
        deadline: float | None = None,
    ) -> tuple[SvdKrrBaseline, list[dict]]:
        """Fit on train for every grid point, keep the lowest validation RMSE; returns (model, trials).

        The kernel widths are tried from the middle of the grid outwards (every alpha of a width costs one fit). With
        ``deadline`` (a ``time.perf_counter()`` value), no further width is tried once it has passed: at least one is.
        The model keeps every fitted point (:meth:`use`) and ``fit_seconds``, the time of the embedding and the first width.
        """
        grid = grid or KRR_GRID
        started = time.perf_counter()
        model = cls(
            source, target, n_components=max(grid["n_components"]), target_components=target_components,
            max_landmarks=max_landmarks, seed=seed,
        )
        model._prepare(*train)
        val_source, val_target = validation
        chunk = default_chunk_cells(val_target.shape[1])
        trials, fitted = [], {}
        for n_comp, gamma_scale in _middle_out(grid):
            if trials and deadline is not None and time.perf_counter() > deadline:
                break
            model.n_components = n_comp
            mapper, phi = model._features(model._embed(train[0], n_comp), n_comp, gamma_scale)
            coefs = model._solve(phi, model.y_train, grid["alpha"])
            for alpha, coef in coefs.items():
                model.mapper, model.coef = mapper, coef
                score = rmse(model.predict_chunks(val_source, chunk), val_target, chunk)
                trials.append({"n_components": n_comp, "gamma_scale": gamma_scale, "alpha": alpha, "validation_rmse": score})
                fitted[(n_comp, gamma_scale, alpha)] = (mapper, coef)
            if len(fitted) == len(coefs):
                model.fit_seconds = time.perf_counter() - started
        model.fitted = fitted
        best = min(trials, key=lambda t: t["validation_rmse"])
        model.use((best["n_components"], best["gamma_scale"], best["alpha"]))
        return model, trials

    @property
    def seconds_per_cell(self) -> float:
        """:meth:`tune`'s pace: ``fit_seconds`` over the cells the embedding was fitted on."""
        return self.fit_seconds / max(1, self.embedding_cells)

    def use(self, settings: tuple) -> SvdKrrBaseline:
        """Predict with the grid point ``(n_components, gamma_scale, alpha)`` fitted by :meth:`tune`."""
        self.n_components, self.gamma_scale, self.alpha = settings
        self.mapper, self.coef = self.fitted[tuple(settings)]
        return self


def _middle_out(grid: dict[str, Sequence]) -> list[tuple[int, float]]:
    """``(n_components, gamma_scale)`` pairs of ``grid``: the middle kernel width first, the widest embedding first."""
    gammas = sorted(grid["gamma_scale"])
    middle = np.log(gammas[len(gammas) // 2])
    order = sorted(gammas, key=lambda g: (abs(np.log(g) - middle), g))
    return [(n, g) for g in order for n in sorted(grid["n_components"], reverse=True)]


KERNEL_FILE = "source_kernel.safetensors"
_EMBED_KEYS = {"atac": ("idf",), "gex": ("inv_sd", "reducer_mean")}
_KEYS = ("reducer_components", "landmarks", "normalization", "coef", "target_components", "target_mean")


def source_indicator(ids: Sequence[np.ndarray], source_range: tuple[int, int]) -> sp.csr_matrix:
    """Cells x source features: 1 where the feature's name is in the cell's token ids (other tokens ignored)."""
    start, stop = source_range
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if lengths.sum() else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(ids)), lengths)
    keep = (flat >= start) & (flat < stop)
    matrix = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep], flat[keep] - start)), shape=(len(ids), stop - start))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


class SourceKernel:
    """A fitted ``svd_krr`` regression as plain arrays: predicts the target matrix from a source matrix."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str, target: str, gamma: float, scale: float) -> None:
        missing = [k for k in (*_KEYS, *_EMBED_KEYS[source]) if k not in arrays]
        if missing:
            raise ValueError(f"source kernel arrays lack {', '.join(missing)}")
        self.arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        self.source, self.target, self.gamma, self.scale = source, target, float(gamma), float(scale)
        self._expand = None

    @classmethod
    def from_baseline(cls, krr) -> SourceKernel:
        """From a fitted :class:`SvdKrrBaseline`."""
        emb = krr.embedding
        arrays = {"reducer_components": emb.reducer.components_[: krr.n_components], "landmarks": krr.mapper.components_,
                  "normalization": krr.mapper.normalization_, "coef": krr.coef, "target_components": krr.target_pca.components_,
                  "target_mean": krr.target_pca.mean_}
        if krr.source == "atac":
            arrays["idf"] = emb.tfidf.idf_
        else:
            arrays.update(inv_sd=emb.inv_sd, reducer_mean=emb.reducer.mean_)
        return cls(arrays, krr.source, krr.target, krr.mapper.gamma, krr.scale)

    def latent(self, source: sp.csr_matrix) -> np.ndarray:
        """The regression's output in the target's PCA space, ``[cells, target components]`` (float64)."""
        a = self.arrays
        x = sp.csr_matrix(source, dtype=np.float64)
        if self.source == "atac":  # TF-IDF (l2 rows), as sklearn's TfidfTransformer
            x = sp.csr_matrix(x @ sp.diags(a["idf"]))
            norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
            x = sp.csr_matrix(sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x)
            z = x @ a["reducer_components"].T
        else:
            x = sp.csr_matrix(x @ sp.diags(a["inv_sd"]))
            np.minimum(x.data, 10.0, out=x.data)
            z = x @ a["reducer_components"].T - a["reducer_mean"] @ a["reducer_components"].T
        z = np.asarray(z) / self.scale
        d2 = (z**2).sum(1)[:, None] + (a["landmarks"] ** 2).sum(1)[None, :] - 2.0 * z @ a["landmarks"].T
        phi = np.exp(-self.gamma * np.maximum(d2, 0.0)) @ a["normalization"].T
        return phi @ a["coef"]

    def tile(self, latent: torch.Tensor, columns: slice) -> torch.Tensor:
        """The prediction of target features ``columns`` (float32, clipped like the baseline) from :meth:`latent`'s rows
        (a float32 tensor): the one place the kernel's ``[cells, features]`` values are made."""
        import torch

        if self._expand is None:  # float32 copies, features first: a tile's columns are contiguous rows
            self._expand = (torch.from_numpy(np.ascontiguousarray(self.arrays["target_components"].T, dtype=np.float32)),
                            torch.from_numpy(self.arrays["target_mean"].astype(np.float32)))
        components, mean = self._expand
        values = torch.addmm(mean[columns], latent, components[columns].T)
        return values.clamp_(0.0, 1.0) if self.target == "atac" else values.clamp_(min=0.0)

    def predict(self, source: sp.csr_matrix) -> np.ndarray:
        """Cells x target features (float32), clipped like the baseline ([0, 1] ATAC, >= 0 GEX)."""
        import torch

        from .metrics_core import iter_tiles

        latent = torch.from_numpy(self.latent(source).astype(np.float32))
        out = np.empty((latent.shape[0], self.arrays["target_mean"].shape[0]), dtype=np.float32)
        matrix = torch.from_numpy(out)
        for rows, columns in iter_tiles(*out.shape):
            matrix[rows, columns] = self.tile(latent[rows], columns)
        return out

    def settings(self) -> dict:
        return {"source": self.source, "target": self.target, "gamma": self.gamma, "scale": self.scale,
                "n_components": int(self.arrays["reducer_components"].shape[0]), "landmarks": int(self.arrays["landmarks"].shape[0])}


def load_kernels(folder: Path, records: dict) -> dict[str, tuple[float, SourceKernel]]:
    """``{direction: (weight, kernel)}`` for the directions of ``readout.json``'s ``source_kernel`` with a weight above 0."""
    from safetensors.numpy import load_file

    used = {d: r for d, r in (records or {}).items() if r.get("weight", 0) > 0}
    if not used:
        return {}
    path = folder / KERNEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"model folder {folder} names a source kernel but lacks {KERNEL_FILE}; copy the whole folder")
    arrays = load_file(str(path))
    out = {}
    for direction, record in used.items():
        mine = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{direction}.")}
        out[direction] = (float(record["weight"]), SourceKernel(mine, record["source"], record["target"], record["gamma"], record["scale"]))
    return out
