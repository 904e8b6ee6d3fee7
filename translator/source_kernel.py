"""The source kernel of a stacked model folder (``python -m translator.stack``): an ``svd_krr`` regression kept as plain arrays.

``CellTranslator`` loads it from ``source_kernel.safetensors`` and blends its prediction from the source sentence's names
into the calibrated matrix: ``(1 - w) * model + w * kernel`` (weights in ``readout.json``'s ``source_kernel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

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

    @classmethod
    def from_baseline(cls, krr) -> SourceKernel:
        """From a fitted ``evaluation.baselines.SvdKrrBaseline``."""
        emb = krr.embedding
        arrays = {"reducer_components": emb.reducer.components_[: krr.n_components], "landmarks": krr.mapper.components_,
                  "normalization": krr.mapper.normalization_, "coef": krr.coef, "target_components": krr.target_pca.components_,
                  "target_mean": krr.target_pca.mean_}
        if krr.source == "atac":
            arrays["idf"] = emb.tfidf.idf_
        else:
            arrays.update(inv_sd=emb.inv_sd, reducer_mean=emb.reducer.mean_)
        return cls(arrays, krr.source, krr.target, krr.mapper.gamma, krr.scale)

    def predict(self, source: sp.csr_matrix) -> np.ndarray:
        """Cells x target features (float32), clipped like the baseline ([0, 1] ATAC, >= 0 GEX)."""
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
        values = (phi @ a["coef"]) @ a["target_components"] + a["target_mean"]
        values = np.clip(values, 0.0, 1.0) if self.target == "atac" else np.maximum(values, 0.0)
        return values.astype(np.float32)

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
