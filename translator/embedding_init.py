"""Start the name embeddings from the train split's latent semantic analysis (TF-IDF + truncated SVD).

A cell's sentence is a bag of names for the encoder; averaging randomly initialised embeddings
says little about the cell until training has shaped them, which takes far more steps than a CPU
affords (on MOp the readout of a randomly initialised tiny model stayed at the per-feature mean for
3 epochs). Latent semantic analysis of the same sentences is what the strongest baselines embed
cells with (``svd_knn``, ``svd_krr``): each name gets its right singular vector scaled by its
inverse document frequency, so that the average of a cell's name embeddings is, up to a per-cell
scale, the cell's LSI coordinates. Only train-split sentences are used; the embeddings are then
trained like any others (they are also T5's tied output layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch


def lsi_vectors(sentences: Sequence[np.ndarray], n_features: int, offset: int, n_components: int, seed: int = 0) -> np.ndarray:
    """``[n_features, n_components]`` name vectors: ``idf * V`` of a TF-IDF + SVD of the cells' name sets.

    Parameters
    ----------
    sentences
        Token ids of each train cell's names (one modality).
    n_features, offset
        The modality's names are token ids ``offset .. offset + n_features``.
    n_components
        Columns wanted; components beyond ``min(cells, features) - 1`` are left zero.
    """
    from sklearn.decomposition import TruncatedSVD

    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = (np.concatenate(sentences) - offset) if len(sentences) and lengths.sum() else np.zeros(0, np.int64)
    x = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(sentences), n_features))
    x.sum_duplicates()
    x.data[:] = 1.0
    document_frequency = np.asarray((x > 0).sum(axis=0)).ravel()
    idf = np.log((1 + x.shape[0]) / (1 + document_frequency)) + 1.0  # sklearn's smooth idf
    out = np.zeros((n_features, n_components), dtype=np.float32)
    k = min(n_components, x.shape[0] - 1, n_features - 1)
    if k < 1 or x.nnz == 0:
        return out
    tfidf = sp.csr_matrix(x @ sp.diags(idf.astype(np.float32)))
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
    tfidf = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ tfidf)
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=seed).fit(tfidf)
    out[:, :k] = (svd.components_.T * idf[:, None]).astype(np.float32)
    return out


@torch.no_grad()
def init_embeddings_from_lsi(model, sentences: dict[str, Sequence[np.ndarray]], ranges: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, int]:
    """Overwrite the rows of each modality's names in ``model.shared`` with scaled LSI vectors.

    Each modality's block is scaled to the RMS of the existing rows (T5 initialises them with std 1),
    so the residual stream keeps its scale. Names never seen in train keep their random rows.

    Returns
    -------
    ``{modality: n_components used}``.
    """
    weight = model.get_input_embeddings().weight
    d_model = weight.shape[1]
    used = {}
    for modality, (start, stop) in ranges.items():
        vectors = lsi_vectors(sentences[modality], stop - start, start, d_model, seed)
        seen = np.abs(vectors).sum(axis=1) > 0
        if not seen.any():
            used[modality] = 0
            continue
        rms = float(weight[start:stop].float().pow(2).mean().sqrt())
        block = vectors[seen]
        block *= rms / max(float(np.sqrt((block**2).mean())), 1e-12)
        rows = torch.from_numpy(np.flatnonzero(seen) + start)
        weight[rows] = torch.from_numpy(block).to(weight.dtype)
        used[modality] = int((np.abs(vectors).sum(axis=0) > 0).sum())
    return used
