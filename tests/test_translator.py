"""Unit tests of the translator package: loss, decoding, caps, sampler, readout, peak mapping, API errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from translator.anndata_io import peak_overlaps
from translator.data import LengthGroupedBatchSampler, TranslationCollator, cap_names, target_ids
from translator.decode import constrained_decode
from translator.loss import full_vocabulary_loss, restricted_lm_loss, sampled_targets
from translator.model import make_config, make_model
from translator.readout import apply_readout, fit_readout

N_SPECIAL, N_GENES, N_PEAKS = 5, 30, 200
GEX = (N_SPECIAL, N_SPECIAL + N_GENES)
ATAC = (N_SPECIAL + N_GENES, N_SPECIAL + N_GENES + N_PEAKS)


@pytest.fixture(scope="module")
def model():
    return make_model(make_config("tiny", N_SPECIAL + N_GENES + N_PEAKS), seed=0).eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(*ATAC, (3, 9), generator=g)
    labels[0, 6:] = -100
    return {"input_ids": torch.randint(*GEX, (3, 12), generator=g), "attention_mask": torch.ones(3, 12, dtype=torch.long), "labels": labels}


def test_restricted_loss_is_cross_entropy_over_the_scored_ids(model):
    batch = _batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    ids = torch.cat([torch.tensor([1]), torch.arange(*ATAC)])
    position = torch.full((model.config.vocab_size,), -100)
    position[ids] = torch.arange(len(ids))
    keep = batch["labels"] != -100
    expected = F.cross_entropy(out.logits[keep][:, ids], position[batch["labels"][keep]])
    got = restricted_lm_loss(model, batch, ATAC, n_negatives=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The full-vocabulary reference is the usual transformers loss.
    assert abs(float(full_vocabulary_loss(model, batch).detach()) - float(out.loss.detach())) < 1e-5


def test_chunked_loss_and_gradients_match_unchunked(model):
    batch = _batch(1)
    grads = []
    for chunk in (2**24, 7 * 40):
        model.zero_grad()
        loss = restricted_lm_loss(model, batch, ATAC, n_negatives=0, chunk_elements=chunk)
        loss.backward()
        grads.append((float(loss.detach()), model.lm_head.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_negatives_change_the_loss_only_through_off_modality_ids(model):
    batch = _batch(2)
    g = torch.Generator().manual_seed(0)
    with_neg = restricted_lm_loss(model, batch, ATAC, n_negatives=20, generator=g)
    without = restricted_lm_loss(model, batch, ATAC, n_negatives=0)
    assert float(with_neg.detach()) > float(without.detach())  # more competitors, larger partition function


def test_a_sampled_softmax_scores_every_label_and_stands_for_the_whole_range(model):
    """Above --max_scored_targets the loss scores the batch's target names and names drawn from the rest, each drawn name's
    logit raised by log(rest / drawn): over draws the loss stays near the loss over every name, and the cap changes nothing
    when the range is smaller."""
    batch = _batch(4)
    labels = batch["labels"][batch["labels"] != -100]
    g = torch.Generator().manual_seed(0)
    ids, offset = sampled_targets(ATAC, labels, 120, g)
    present = labels.unique()
    assert len(ids) == 120 and set(present.tolist()) <= set(ids.tolist()) and len(set(ids.tolist())) == 120
    n_rest = N_PEAKS - len(present)
    assert torch.all(offset[: len(present)] == 0)
    torch.testing.assert_close(offset[len(present):], torch.full((120 - len(present),), float(np.log(n_rest / (120 - len(present))))))
    with torch.no_grad():
        full = float(restricted_lm_loss(model, batch, ATAC, n_negatives=0))
        assert float(restricted_lm_loss(model, batch, ATAC, n_negatives=0, max_targets=N_PEAKS)) == full
        draws = [float(restricted_lm_loss(model, batch, ATAC, n_negatives=0, max_targets=60, generator=g)) for _ in range(40)]
    assert abs(np.mean(draws) - full) < 0.02 * full
    assert np.std(draws) > 0  # the draws differ


def test_constrained_decoding_gives_valid_sentences(model):
    batch = _batch(3)
    atac = constrained_decode(model, batch["input_ids"], batch["attention_mask"], ATAC, ordered=True, max_new_tokens=15)
    for seq in atac.sequences:
        assert all(ATAC[0] <= t < ATAC[1] for t in seq)
        assert all(a < b for a, b in zip(seq, seq[1:], strict=False))  # genomic order, no repeats
    gex = constrained_decode(model, batch["input_ids"], batch["attention_mask"], GEX, ordered=False, max_new_tokens=40, step_weight=lambda t: 1.0)
    for seq in gex.sequences:
        assert all(GEX[0] <= t < GEX[1] for t in seq) and len(set(seq)) == len(seq)
    s, total = gex.aggregates["noisy_or"], gex.aggregates["sum"]
    assert s.shape == (3, N_GENES) and float(s.min()) >= 0 and float(s.max()) <= 1
    assert bool((total >= s - 1e-5).all())  # a union bound
    torch.testing.assert_close(gex.aggregates["weighted"], total)


def test_cached_decoding_matches_a_full_forward_pass(model):
    batch = _batch(4)
    result = constrained_decode(model, batch["input_ids"][:1], batch["attention_mask"][:1], GEX, ordered=False, max_new_tokens=6)
    seq = result.sequences[0]
    decoder_input = torch.tensor([[0, *seq]])
    logits = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], decoder_input_ids=decoder_input).logits[0]
    for step, token in enumerate(seq):
        scores = logits[step, GEX[0] : GEX[1]].clone()
        scores[[t - GEX[0] for t in seq[:step]]] = -float("inf")
        assert int(scores.argmax()) + GEX[0] == token


def test_sampled_decoding_is_valid_seeded_and_follows_the_step_distribution(model):
    batch = _batch(3)

    def draw(seed, **kw):
        return constrained_decode(model, batch["input_ids"], batch["attention_mask"], ATAC, ordered=True, max_new_tokens=15,
                                  generator=torch.Generator().manual_seed(seed), **kw).sequences

    for seq in draw(0):
        assert all(ATAC[0] <= t < ATAC[1] for t in seq) and all(a < b for a, b in zip(seq, seq[1:], strict=False))
    assert draw(0) == draw(0)  # the generator alone decides the draw
    assert len({str(draw(seed)) for seed in range(6)}) > 1  # an untrained model's steps are spread out: draws differ
    assert draw(0, temperature=1e-4) == draw(5, temperature=1e-4)  # near 0 every seed takes the most likely step
    # the first step's draws follow its distribution: the empirical frequencies approach the first-step probabilities
    first = constrained_decode(model, batch["input_ids"][:1], batch["attention_mask"][:1], ATAC, ordered=True, max_new_tokens=1)
    p = first.aggregates["sum"][0].numpy()
    g = torch.Generator().manual_seed(1)
    counts = np.zeros_like(p)
    ids, mask = batch["input_ids"][:1].repeat(400, 1), batch["attention_mask"][:1].repeat(400, 1)
    for seq in constrained_decode(model, ids, mask, ATAC, ordered=True, max_new_tokens=1, generator=g).sequences:
        for t in seq:
            counts[t - ATAC[0]] += 1
    assert abs(counts.sum() / 400 - p.sum()) < 0.1  # the share of draws that name a peak rather than </s>
    assert np.abs(counts / 400 - p).max() < 0.1


def test_caps_keep_top_genes_and_spread_peaks():
    ids = np.arange(100, 200)
    assert cap_names(ids, 10, "gex").tolist() == list(range(100, 110))
    kept = cap_names(ids, 10, "atac")
    assert len(kept) == 10 and kept[0] == 100 and kept[-1] == 199 and np.all(np.diff(kept) > 0)
    assert cap_names(ids, 500, "atac") is ids


class _Tok:
    eos_token_id = 1


def test_gene_order_targets_keep_the_top_ranked_genes_in_gene_order():
    ranked = np.array([40, 12, 33, 7, 25, 18])  # gene token ids, highest expression first
    rank = target_ids(ranked, "atac2gex", _Tok(), max_target_length=4)
    gene = target_ids(ranked, "atac2gex", _Tok(), max_target_length=4, gex_target_order="gene")
    assert rank.tolist() == [40, 12, 33, 1]  # the cap keeps the top 3 genes, </s> last
    assert gene.tolist() == [12, 33, 40, 1]  # the same genes, increasing id
    peaks = np.array([3, 5, 9])
    assert target_ids(peaks, "gex2atac", _Tok(), 8, "gene").tolist() == [3, 5, 9, 1]  # ATAC targets are unaffected
    with pytest.raises(ValueError, match="--gex_target_order"):
        target_ids(ranked, "atac2gex", _Tok(), 4, "alphabetical")


def test_length_grouped_sampler_is_deterministic_and_one_direction_per_batch():
    rng = np.random.default_rng(0)
    lengths, directions = rng.integers(5, 300, 203), np.repeat([0, 1], [103, 100])
    sampler = LengthGroupedBatchSampler(lengths, directions, batch_size=8, seed=3, group_factor=4)
    first = list(sampler)
    assert len(first) == len(sampler)
    assert sorted(i for b in first for i in b) == list(range(203))
    assert all(len({directions[i] for i in b}) == 1 for b in first)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sharded = LengthGroupedBatchSampler(lengths, directions, batch_size=8, seed=3, num_shards=2)
    assert len(list(sharded)) == len(sharded) and len(sharded) % 2 == 0


def test_collator_pads_and_refuses_mixed_directions():
    collate = TranslationCollator([ATAC, GEX])  # target ranges of gex2atac (0) and atac2gex (1)
    examples = [{"source": np.array([3, 7, 1]), "target": np.array([40, 1]), "direction": 0},
                {"source": np.array([3, 1]), "target": np.array([41, 42, 1]), "direction": 0}]
    batch = collate(examples)
    assert batch["input_ids"].tolist() == [[3, 7, 1], [3, 1, 0]]
    assert batch["labels"].tolist() == [[40, 1, -100], [41, 42, 1]]
    assert (int(batch["target_start"]), int(batch["target_stop"])) == ATAC
    with pytest.raises(ValueError, match="mixes directions"):
        collate([examples[0], {**examples[1], "direction": 1}])


def _meta(n_genes: int, n_peaks: int, rng) -> dict:
    return {"train_stats": {"atac_mean": rng.uniform(0.01, 0.3, n_peaks).tolist(), "gex_mean": rng.uniform(0, 1, n_genes).tolist(),
                            "gex_mean_detected": rng.uniform(1, 2, n_genes).tolist(), "rank_value": [2.0, 1.5, 1.0]}}


def test_atac_calibration_uses_the_model_and_falls_back_to_the_mean():
    rng = np.random.default_rng(0)
    meta = _meta(5, 300, rng)
    mean = np.asarray(meta["train_stats"]["atac_mean"])
    truth = (rng.random((200, 300)) < mean).astype(np.float32)
    informative = {"noisy_or": np.clip(0.7 * truth + 0.1 * rng.random(truth.shape), 0, 1), "sum": np.clip(truth * 0.5, 0, 1)}
    fitted = fit_readout(informative, sp.csr_matrix(truth), "gex2atac", meta)
    assert fitted["validation_rmse"][fitted["aggregation"]] < 0.8 * fitted["validation_rmse_mean"]
    noise = {"noisy_or": rng.random(truth.shape), "sum": rng.random(truth.shape)}
    fitted = fit_readout(noise, sp.csr_matrix(truth), "gex2atac", meta)
    assert abs(fitted["coef"][0]) < 0.1 and fitted["coef"][1] > 0.5  # weight moves to the per-peak mean
    assert min(fitted["validation_rmse"].values()) <= fitted["validation_rmse_mean"] * 1.01
    pred = apply_readout(noise, "gex2atac", meta, fitted)
    assert pred.dtype == np.float32 and pred.min() >= 0 and pred.max() <= 1


def test_gex_calibration_is_least_squares_on_expected_value_and_means():
    rng = np.random.default_rng(1)
    meta = _meta(40, 5, rng)
    e = rng.uniform(0, 2, (100, 40))
    truth = 0.5 * e + 0.3 * np.asarray(meta["train_stats"]["gex_mean"])
    feats = {"weighted": e, "noisy_or": rng.random(e.shape), "sum": rng.random(e.shape)}
    fitted = fit_readout(feats, sp.csr_matrix(truth), "atac2gex", meta)
    np.testing.assert_allclose(fitted["coef"], [0.5, 0.0, 0.3, 0.0], atol=1e-6)
    np.testing.assert_allclose(apply_readout(feats, "atac2gex", meta, fitted), truth, atol=1e-5)


def test_peaks_map_by_genomic_overlap():
    reference = ["chr1-100-200", "chr1-300-400", "chr2-100-200", "chrX-50-60", "chr1-350-360", "chr1-500-500"]
    query = ["chr1-150-250", "chr1-200-300", "chr1-390-500", "chr2-100-200", "chr3-1-1000", "chrX-10-51", "chr1-1-100",
             "chr1-150-355", "chr1-500-500"]
    pairs = list(zip(*(a.tolist() for a in peak_overlaps(query, reference)), strict=True))
    # A broad query peak reaches every model peak it overlaps (7: three of them), not only the first.
    assert pairs == [(0, 0), (2, 1), (3, 2), (5, 3), (7, 0), (7, 1), (7, 4), (8, 5)]
