"""LSI initialisation of the name embeddings: the average of a cell's name vectors is its LSI embedding."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from translator.embedding_init import init_embeddings_from_lsi, lsi_vectors
from translator.model import make_config, make_model


def _cells(rng, n_cells=200, n_features=80, offset=7):
    programs = rng.integers(0, 3, n_cells)
    rates = rng.beta(0.5, 4.0, (3, n_features))
    present = rng.random((n_cells, n_features)) < rates[programs]
    return [np.flatnonzero(row) + offset for row in present], present, programs


def test_sum_of_name_vectors_is_the_sklearn_lsi_embedding():
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    rng = np.random.default_rng(0)
    sentences, present, _ = _cells(rng)
    vectors = lsi_vectors(sentences, 80, 7, n_components=10, seed=0)
    x = sp.csr_matrix(present.astype(np.float32))
    tfidf = TfidfTransformer(norm="l2").fit_transform(x)
    expected = TruncatedSVD(10, algorithm="randomized", n_iter=5, random_state=0).fit_transform(tfidf)
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel() * 0 + 1)  # tfidf rows are unit norm
    idf = TfidfTransformer(norm=None).fit(x).idf_
    raw_norm = np.sqrt((present * idf**2).sum(axis=1))
    got = np.stack([vectors[s - 7].sum(axis=0) for s in sentences]) / raw_norm[:, None] * norms[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_embedding_rows_keep_their_scale_and_specials():
    rng = np.random.default_rng(1)
    sentences, _, _ = _cells(rng, offset=5)
    model = make_model(make_config("tiny", 5 + 80), seed=0)
    before = model.get_input_embeddings().weight.detach().clone()
    used = init_embeddings_from_lsi(model, {"gex": sentences}, {"gex": (5, 85)}, seed=0)
    weight = model.get_input_embeddings().weight.detach()
    assert used == {"gex": 64}
    assert torch.equal(weight[:5], before[:5])  # special tokens untouched
    rms_before, rms_after = before[5:].pow(2).mean().sqrt(), weight[5:].pow(2).mean().sqrt()
    assert abs(float(rms_after / rms_before) - 1) < 1e-3
    # Names never seen in train keep their random rows.
    unseen = init_embeddings_from_lsi(model, {"gex": [np.array([5, 6]), np.array([6])]}, {"gex": (5, 85)}, seed=0)
    assert unseen == {"gex": 1}
    assert torch.equal(model.get_input_embeddings().weight[7:85], weight[7:85])
