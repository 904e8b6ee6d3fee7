"""The profile readout: targets from the dataset, its loss at the mean, learning, calibration and prediction."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from dataset_builder.records import truth_matrices
from tests.translator_fixtures import make_dataset_and_tokenizer
from tokenizer import feature_token_ranges, load_tokenizer
from translator.data import LengthGroupedBatchSampler, TranslationCollator, TranslationExamples
from translator.loss import TranslationLoss, profile_loss
from translator.model import ProfileHead, make_config, make_model, profile_scores
from translator.readout import (
    PROFILE_AGGREGATIONS,
    apply_readout,
    decode_features,
    fit_readout,
    logistic_fit,
    profile_offsets,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    import datasets

    torch.set_num_threads(1)
    data, tok = make_dataset_and_tokenizer(tmp_path_factory.mktemp("profile"), n_cells=360, n_genes=30, n_peaks=90, seed=3)
    meta = json.loads((data / "cell_sentences.json").read_text())
    return datasets.load_from_disk(str(data)), load_tokenizer(tok), meta


def test_profile_targets_are_every_target_feature_of_the_cell(synthetic):
    splits, tokenizer, meta = synthetic
    cells = splits["train"].select(range(5))
    examples = TranslationExamples(cells, tokenizer, max_source_length=8, max_target_length=4)  # caps cut sentences, not profiles
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    truth = truth_matrices(cells, meta)
    batch = TranslationCollator(examples.ranges)([examples[i] for i in range(5)])  # gex2atac examples come first
    assert batch["profile_values"].shape == (5, ranges["atac"][1] - ranges["atac"][0])
    np.testing.assert_array_equal(batch["profile_values"].numpy(), truth["atac"].toarray())
    batch = TranslationCollator(examples.ranges)([examples[i] for i in range(5, 10)])
    np.testing.assert_allclose(batch["profile_values"].numpy(), truth["gex"].toarray(), rtol=0, atol=0)


def test_a_shorter_gex_target_cap_cuts_gex_targets_only(synthetic):
    splits, tokenizer, _ = synthetic
    cells = splits["train"].select(range(20))
    full = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32)
    short = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32, max_gex_target_length=4)
    eos = tokenizer.eos_token_id
    assert max(len(t) for t, d in zip(full.targets, full.directions, strict=True) if d == 1) > 4  # the cap has work to do
    for i in range(len(full)):
        np.testing.assert_array_equal(short.sources[i], full.sources[i])
        np.testing.assert_array_equal(short.profiles[i][1], full.profiles[i][1])  # the profile stays whole
        if full.directions[i] == 0:  # gex2atac: ATAC targets untouched
            np.testing.assert_array_equal(short.targets[i], full.targets[i])
        else:  # atac2gex: the top-ranked genes, then </s>
            n = min(3, len(full.targets[i]) - 1)
            np.testing.assert_array_equal(short.targets[i], np.concatenate([full.targets[i][:n], [eos]]))
    for bad in (1, 33):
        with pytest.raises(ValueError, match="--max_gex_target_length"):
            TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32, max_gex_target_length=bad)


def test_a_gex_target_min_value_keeps_the_rank_prefix_at_or_above_it(synthetic):
    splits, tokenizer, _ = synthetic
    cells = splits["train"].select(range(20))
    full = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32)
    values = [np.asarray(v) for v in cells["gex_value"]]
    threshold = float(np.median(np.concatenate(values)))
    cut = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32, gex_target_min_value=threshold)
    both = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32, gex_target_min_value=threshold, max_gex_target_length=3)
    eos = tokenizer.eos_token_id
    gene_names = {full.targets[i][0] for i in range(len(full)) if full.directions[i] == 1}
    n_cut = []
    for i in range(len(full)):
        np.testing.assert_array_equal(cut.sources[i], full.sources[i])
        np.testing.assert_array_equal(cut.profiles[i][1], full.profiles[i][1])  # the profile stays whole
        if full.directions[i] == 0:
            np.testing.assert_array_equal(cut.targets[i], full.targets[i])
            continue
        cell = i - sum(1 for d in full.directions if d == 0)
        n = int((values[cell] >= threshold).sum())  # counted from the values, not from the sentence
        n_cut.append(n)
        np.testing.assert_array_equal(cut.targets[i], np.concatenate([full.targets[i][:n], [eos]]))
        np.testing.assert_array_equal(both.targets[i], np.concatenate([full.targets[i][: min(n, 2)], [eos]]))
    assert gene_names and len(set(n_cut)) > 1  # lengths vary by cell
    assert min(n_cut) < max(len(t) - 1 for t, d in zip(full.targets, full.directions, strict=True) if d == 1)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="--gex_target_min_value"):
            TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=32, gex_target_min_value=bad)
    with pytest.raises(ValueError, match="--gex_target_min_value needs the dataset's gex_index/gex_value"):
        TranslationExamples(cells.remove_columns(["gex_index", "gex_value"]), tokenizer, max_source_length=64, max_target_length=32, gex_target_min_value=1.0)


def test_profile_loss_with_zero_scores_is_the_loss_of_the_mean():
    rng = np.random.default_rng(0)
    mean = torch.tensor(rng.uniform(0.05, 0.5, 50), dtype=torch.float32)
    values = torch.tensor(rng.random((7, 50)) < mean.numpy(), dtype=torch.float32)
    logit = torch.log(mean) - torch.log1p(-mean)
    got = profile_loss(torch.zeros(7, 50), logit, values, binary=True)
    expected = F.binary_cross_entropy(mean.expand(7, 50), values, reduction="sum")
    torch.testing.assert_close(got, expected)
    gex = torch.tensor(rng.uniform(0, 3, (7, 50)), dtype=torch.float32)
    torch.testing.assert_close(profile_loss(torch.zeros(7, 50), mean, gex, binary=False), ((mean - gex) ** 2).sum())


def _train(splits, tokenizer, meta, steps: int, profile_weight: float, seed: int = 0):
    examples = TranslationExamples(splits["train"], tokenizer, max_source_length=64, max_target_length=64)
    model = make_model(make_config("tiny", len(tokenizer), dropout_rate=0.0), seed=seed)
    module = TranslationLoss(model, n_negatives=0, profile_weight=profile_weight, offsets=profile_offsets(tokenizer, meta)).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    sampler = LengthGroupedBatchSampler(examples.lengths, examples.directions, 32, seed=seed)
    collate = TranslationCollator(examples.ranges)
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for rows in sampler:
            loss = module(**collate([examples[i] for i in rows]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
        epoch += 1
    return model.eval(), module.profile_head.eval()


def _rmse(prediction, truth) -> float:
    return float(np.sqrt(np.mean((prediction - truth.toarray()) ** 2)))


def test_the_profile_readout_learns_what_the_mean_cannot(synthetic):
    """Cells of four programs: the trained profile beats the per-feature mean on held-out cells, both directions."""
    splits, tokenizer, meta = synthetic
    model, head = _train(splits, tokenizer, meta, steps=150, profile_weight=1.0)
    cells = splits["test"]
    truth = truth_matrices(cells, meta)
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    examples = TranslationExamples(cells, tokenizer, max_source_length=64, max_target_length=64)
    n = len(cells)
    for direction, target, mean_key, rows in (("gex2atac", "atac", "atac_mean", slice(0, n)), ("atac2gex", "gex", "gex_mean", slice(n, 2 * n))):
        ids = examples.sources[rows]
        features, sequences = decode_features(model, tokenizer, meta, ids, direction, ranges[target], 64, decode=False, profile_head=head)
        assert set(features) == {"profile", "source_length"} and sequences == [[] for _ in ids]
        np.testing.assert_array_equal(features["source_length"], [len(x) - 2 for x in ids])  # names read, without prefix and </s>
        predicted = apply_readout(features, direction, meta, None)  # the readout as trained, no calibration
        mean = np.broadcast_to(np.asarray(meta["train_stats"][mean_key]), predicted.shape)
        assert _rmse(predicted, truth[target]) < 0.95 * _rmse(mean, truth[target]), direction
        # Batching and padding do not change a cell's scores.
        alone, _ = decode_features(model, tokenizer, meta, ids[:3], direction, ranges[target], 64, batch_size=1, decode=False, profile_head=head)
        np.testing.assert_allclose(alone["profile"], features["profile"][:3], atol=1e-5)


def test_profile_scores_read_the_prefix_step_only(synthetic):
    splits, tokenizer, meta = synthetic
    model = make_model(make_config("tiny", len(tokenizer)), seed=1).eval()
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    examples = TranslationExamples(splits["validation"].select(range(4)), tokenizer)
    ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(s) for s in examples.sources[:4]], batch_first=True)
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        scores = profile_scores(model, hidden, mask, ids, ranges["atac"])
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :1])
    start, stop = ranges["atac"]
    torch.testing.assert_close(scores, out.logits[:, 0, start:stop].float())


def test_profile_calibration_keeps_the_mean_and_the_model():
    rng = np.random.default_rng(2)
    n_peaks, n_genes = 200, 40
    meta = {"train_stats": {"atac_mean": rng.uniform(0.02, 0.3, n_peaks).tolist(), "gex_mean": rng.uniform(0, 1, n_genes).tolist(),
                            "gex_mean_detected": rng.uniform(1, 2, n_genes).tolist(), "rank_value": [1.0]}}
    mean = np.asarray(meta["train_stats"]["atac_mean"])
    shift = rng.normal(0, 1.5, (300, n_peaks))
    logit_mean = np.log(mean) - np.log1p(-mean)
    truth = (rng.random((300, n_peaks)) < 1 / (1 + np.exp(-(logit_mean + shift)))).astype(np.float32)
    fitted = fit_readout({"profile": shift}, sp.csr_matrix(truth), "gex2atac", meta)
    assert fitted["aggregation"] in PROFILE_AGGREGATIONS and fitted["validation_rmse"]["profile"] < fitted["validation_rmse_mean"]
    assert 0.7 < fitted["coef"][0] < 1.3  # the scores were generated as the true residual (profile: a; profile_depth: a on z - u)
    gex_mean = np.asarray(meta["train_stats"]["gex_mean"])
    z = rng.normal(0, 0.5, (100, n_genes))
    truth = np.clip(gex_mean + 0.8 * z, 0, None)
    fitted = fit_readout({"profile": z}, sp.csr_matrix(truth), "atac2gex", meta)
    assert fitted["validation_rmse"]["profile"] < 0.5 * fitted["validation_rmse_mean"]


def test_the_calibration_logistic_fit_reaches_the_penalised_optimum():
    """Newton's method on scikit-learn's LogisticRegression(C) objective: the same optimum as a tightly converged
    scikit-learn fit, a gradient of zero there, and the weights that generated the data."""
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    n = 40_000
    x = np.column_stack([rng.normal(0, 1.5, n), rng.normal(-3, 1, n), rng.normal(0, 0.3, n)])
    truth = np.array([0.8, 1.1, -2.0])
    y = rng.random(n) < expit(x @ truth - 0.5)
    coef, intercept = logistic_fit(x, y, c=1.0)
    reference = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12, max_iter=200).fit(x, y)
    np.testing.assert_allclose(coef, reference.coef_[0], atol=1e-7)
    assert abs(intercept - reference.intercept_[0]) < 1e-7
    gradient = x.T @ (expit(x @ coef + intercept) - y) + coef / 1.0
    assert np.max(np.abs(gradient)) / n < 1e-9 and abs(np.sum(expit(x @ coef + intercept) - y)) / n < 1e-9
    np.testing.assert_allclose(coef, truth, atol=0.1)
    assert abs(intercept + 0.5) < 0.1
    # scikit-learn's default (lbfgs, tol 1e-4) stops short of that optimum: ours is no worse on the objective
    def objective(w, b):
        eta = x @ w + b
        return np.sum(np.logaddexp(0, eta)) - y @ eta + 0.5 * w @ w / 1.0
    default = LogisticRegression(C=1.0).fit(x, y)
    assert objective(coef, intercept) <= objective(default.coef_[0], default.intercept_[0]) + 1e-9


def test_profile_depth_weighs_a_cells_depth_apart_from_its_peaks():
    """Scores whose cell mean is part of the true depth (too small) and whose per-peak part is noise, the rest of
    the depth in the source's size: one weight on the scores cannot fit that."""
    from translator.metrics_core import compute_metrics

    rng = np.random.default_rng(5)
    n_cells, n_peaks = 300, 200
    meta = {"train_stats": {"atac_mean": rng.uniform(0.02, 0.3, n_peaks).tolist()}}
    mean = np.asarray(meta["train_stats"]["atac_mean"])
    depth = rng.normal(0, 0.4, (n_cells, 1))
    size = rng.integers(20, 400, n_cells).astype(np.float32)  # genes in each cell's source sentence
    log_size = np.log1p(size)[:, None] - np.log1p(size).mean()
    scores = depth + rng.normal(0, 1.0, (n_cells, n_peaks))  # the head's residual: depth, plus a per-peak pattern that is noise
    logit_mean = np.log(mean) - np.log1p(-mean)
    truth = (rng.random((n_cells, n_peaks)) < 1 / (1 + np.exp(-(logit_mean + 3.0 * depth + 0.7 * log_size)))).astype(np.float32)
    truth = sp.csr_matrix(truth)
    features = {"profile": scores, "source_length": size}
    fitted = fit_readout(features, truth, "gex2atac", meta)
    assert fitted["aggregation"] == "profile_depth"
    assert fitted["validation_rmse"]["profile_depth"] < fitted["validation_rmse"]["profile"] < fitted["validation_rmse_mean"]
    a, d, e, b = fitted["coef"]
    assert abs(a) < 0.1 and 2.0 < d < 4.0 and 0.4 < e < 1.0 and 0.8 < b < 1.2  # noise dropped, depth scaled up, size found, mean kept
    cell = {name: compute_metrics(apply_readout(features, "gex2atac", meta, params), truth, "atac")["metrics"]
            for name, params in [("depth", fitted), ("one_weight", {"aggregation": "profile", "coef": [1.0, 0.0], "intercept": 0.0})]}
    assert cell["depth"]["auroc_cell"] > cell["one_weight"]["auroc_cell"]  # the noise no longer re-ranks a cell's peaks
    fitted = fit_readout({"profile": scores.astype(np.float32)}, sp.csr_matrix(np.clip(scores, 0, None)), "atac2gex",
                         {"train_stats": {"gex_mean": np.zeros(n_peaks).tolist(), "gex_mean_detected": np.ones(n_peaks).tolist()}})
    assert "profile_depth" not in fitted["validation_rmse"]  # without the source sizes there is no depth term
    only = fit_readout(features, truth, "gex2atac", meta, aggregations=("profile",))  # the candidates can be restricted
    assert only["aggregation"] == "profile" and set(only["validation_rmse"]) == {"profile"}
    with pytest.raises(ValueError, match="unknown readout aggregation"):
        fit_readout(features, truth, "gex2atac", meta, aggregations=("depth",))


def test_gex_profile_depth_finds_the_mean_level_a_cells_source_size_carries():
    """GEX targets: a cell's mean log-norm rises with its depth (more genes detected), which the length-free scores
    miss and the source's size carries; the per-gene pattern of the scores is right. profile_depth keeps the pattern
    (``a`` near 1), finds the size, and beats the one-weight readout on RMSE and per-cell Pearson is not hurt."""
    from translator.metrics_core import compute_metrics

    rng = np.random.default_rng(6)
    n_cells, n_genes = 400, 120
    gex_mean = rng.uniform(0.1, 1.5, n_genes)
    meta = {"train_stats": {"gex_mean": gex_mean.tolist(), "gex_mean_detected": (gex_mean + 1).tolist()}}
    size = rng.integers(30, 600, n_cells).astype(np.float32)  # accessible peaks in each cell's source sentence
    log_size = np.log1p(size) - np.log1p(size).mean()
    pattern = rng.normal(0, 0.4, (n_cells, n_genes))
    scores = pattern - pattern.mean(axis=1, keepdims=True)  # the head gets each cell's per-gene pattern, not its level
    truth = np.clip(gex_mean + pattern + 0.5 * log_size[:, None] + rng.normal(0, 0.2, (n_cells, n_genes)), 0, None)
    truth = sp.csr_matrix(truth)
    features = {"profile": scores.astype(np.float32), "source_length": size}
    fitted = fit_readout(features, truth, "atac2gex", meta)
    assert fitted["aggregation"] == "profile_depth"
    assert fitted["validation_rmse"]["profile_depth"] < 0.95 * fitted["validation_rmse"]["profile"] < fitted["validation_rmse_mean"]
    a, d, e, b, c = fitted["coef"]
    assert 0.8 < a < 1.2 and 0.3 < e < 0.7 and 0.8 < b < 1.2  # pattern kept, size found, mean kept
    only = fit_readout(features, truth, "atac2gex", meta, aggregations=("profile",))
    pearson = {name: compute_metrics(apply_readout(features, "atac2gex", meta, params), truth, "gex")["metrics"]["pearson_cell"]
               for name, params in [("depth", fitted), ("profile", only)]}
    assert pearson["depth"] >= pearson["profile"] - 1e-3


def test_the_aggregation_is_chosen_on_cells_its_fit_did_not_see():
    """Samples of 14 cells and no depth effect: profile_depth's two extra weights always lower the in-sample RMSE (the
    old rule keeps it in every sample), the cross-fitted choice keeps profile in most, and on new cells of the same kind
    its choices are the better ones on average. (One sample alone can mislead either rule: 14 cells is little.)"""
    def cells(rng, n_cells, gex_mean):
        pattern = rng.normal(0, 0.4, (n_cells, len(gex_mean)))
        level = rng.normal(0, 0.3, (n_cells, 1))  # a per-cell level that neither the scores nor the source size carry
        truth = np.clip(gex_mean + pattern + level + rng.normal(0, 0.3, pattern.shape), 0, None)
        features = {"profile": (pattern + rng.normal(0, 0.3, pattern.shape)).astype(np.float32),
                    "source_length": rng.integers(30, 600, n_cells).astype(np.float32)}
        return features, sp.csr_matrix(truth)

    gex_mean = np.random.default_rng(3).uniform(0.1, 1.5, 300)
    meta = {"train_stats": {"gex_mean": gex_mean.tolist(), "gex_mean_detected": (gex_mean + 1).tolist()}}
    new_features, new_truth = cells(np.random.default_rng(99), 500, gex_mean)
    kept, new_rmse = {"in-sample": [], "cross-fitted": []}, {"in-sample": [], "cross-fitted": []}
    for sample in range(12):
        features, truth = cells(np.random.default_rng(100 + sample), 14, gex_mean)
        in_sample = fit_readout(features, truth, "atac2gex", meta, selection_parts=0)
        chosen = fit_readout(features, truth, "atac2gex", meta)
        assert in_sample["selection"] == "in-sample"
        assert in_sample["validation_rmse"]["profile_depth"] < in_sample["validation_rmse"]["profile"]
        assert chosen["selection"] == "cross-fitted over 5 parts of the cells, averaged over 10 random partitions"
        assert chosen["validation_rmse"] == in_sample["validation_rmse"]  # the fits on all cells are the same; only the choice moves
        for rule, params in (("in-sample", in_sample), ("cross-fitted", chosen)):
            kept[rule].append(params["aggregation"])
            new_rmse[rule].append(_rmse(apply_readout(new_features, "atac2gex", meta, params), new_truth))
    assert kept["in-sample"] == ["profile_depth"] * 12
    assert kept["cross-fitted"].count("profile") >= 8  # 10 of 12 when written
    assert np.mean(new_rmse["cross-fitted"]) < np.mean(new_rmse["in-sample"]) - 0.003  # 0.4517 vs 0.4590 when written
    few = fit_readout({k: v[:9] for k, v in features.items()}, truth[:9], "atac2gex", meta)  # fewer than 2 x 5 cells: in-sample
    assert few["selection"] == "in-sample" and "validation_rmse_cross_fitted" not in few
    one = fit_readout(features, truth, "atac2gex", meta, selection_repeats=1)
    assert one["selection"] == "cross-fitted over 5 parts of the cells"


def test_repeated_partitions_average_the_cross_fitted_error_and_steady_the_choice():
    """The repeated cross-fitted RMSE is the root of the mean of each partition's mean squared error; and on 40 cells
    where the depth term is real but small (the 40-partition verdict keeps profile_depth), one partition's verdict often disagrees with that of 40
    partitions, five partitions' verdict less often."""
    from translator.readout import _cross_fitted_rmse

    rng = np.random.default_rng(11)
    n_cells, n_genes = 40, 200
    gex_mean = rng.uniform(0.1, 1.5, n_genes)
    meta = {"train_stats": {"gex_mean": gex_mean.tolist(), "gex_mean_detected": (gex_mean + 1).tolist()}}
    size = rng.integers(30, 600, n_cells).astype(np.float32)
    pattern = rng.normal(0, 0.4, (n_cells, n_genes))
    log_size = np.log1p(size) - np.log1p(size).mean()
    truth = np.clip(gex_mean + pattern + 0.2 * log_size[:, None] + rng.normal(0, 0.3, (n_cells, 1)) + rng.normal(0, 0.3, pattern.shape), 0, None)
    features = {"profile": (pattern + rng.normal(0, 0.3, pattern.shape)).astype(np.float32), "source_length": size}
    def rmse(seed, repeats=1, names=("profile",)):
        scores, done = _cross_fitted_rmse(features, truth, "atac2gex", meta, list(names), 5, seed, 10**6, repeats)
        assert done == repeats
        return scores

    single = [rmse(seed)["profile"] for seed in range(3)]
    assert rmse(0, repeats=3)["profile"] == pytest.approx(np.sqrt(np.mean(np.square(single))), rel=1e-12)

    def verdict(seed, repeats):
        scores = rmse(seed, repeats, ("profile", "profile_depth"))
        return scores["profile_depth"] < scores["profile"]

    reference = verdict(1000, 40)
    disagree = {repeats: sum(verdict(100 * seed, repeats) != reference for seed in range(20)) for repeats in (1, 5)}
    assert disagree[1] >= 4 and disagree[5] <= disagree[1] - 2  # seeds 0-1900: 6 and 3 of 20


def test_an_untrained_profile_head_is_exactly_the_mean(synthetic, tmp_path):
    splits, tokenizer, meta = synthetic
    model = make_model(make_config("tiny", len(tokenizer)), seed=2).eval()
    head = ProfileHead(model.config.vocab_size, 3 * model.config.d_model)
    head.save(tmp_path / "head.safetensors")
    head = ProfileHead.load(tmp_path / "head.safetensors")
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    ids = TranslationExamples(splits["validation"].select(range(5)), tokenizer).sources[:5]
    features, _ = decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 16, decode=False, profile_head=head)
    predicted = apply_readout(features, "gex2atac", meta, None)
    expected = np.broadcast_to(np.asarray(meta["train_stats"]["atac_mean"], dtype=np.float32), predicted.shape)
    np.testing.assert_allclose(predicted, np.clip(expected, 1e-4, 1 - 1e-4), rtol=1e-5)


def test_float32_profile_readout_equals_the_float64_design():
    from translator.readout import _atac_design, _gex_design

    rng = np.random.default_rng(0)
    n = 2000
    meta = {"train_stats": {"atac_mean": rng.uniform(1e-4, 0.5, n).tolist(), "gex_mean": rng.uniform(0, 2, n).tolist(),
                            "gex_mean_detected": rng.uniform(0, 3, n).tolist()}}
    profile = rng.normal(0, 3, (20, n)).astype(np.float32)
    profile[0, :10], profile[1, :10] = -200, 200  # exp overflows in float32: probabilities 0 and 1, no NaN
    features = {"profile": profile}
    atac = {"aggregation": "profile", "coef": [0.9, 0.2], "intercept": -0.1}
    z = _atac_design(features, "profile", meta)
    expected = 1 / (1 + np.exp(-(0.9 * z[0] + 0.2 * z[1] - 0.1)))
    got = apply_readout(features, "gex2atac", meta, atac)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    depth = {"aggregation": "profile_depth", "coef": [0.3, 2.5, -0.4, 0.9], "intercept": 0.2}
    with pytest.raises(ValueError, match="source_length"):
        apply_readout(features, "gex2atac", meta, depth)
    features["source_length"] = rng.integers(0, 600, 20).astype(np.float32)
    columns = _atac_design(features, "profile_depth", meta)
    np.testing.assert_allclose(columns[0] + columns[1], profile.astype(np.float64), atol=1e-9)  # z = (z - u) + u
    np.testing.assert_allclose(columns[2][:, 0], np.log1p(features["source_length"]))
    expected = 1 / (1 + np.exp(-(0.3 * columns[0] + 2.5 * columns[1] - 0.4 * columns[2] + 0.9 * columns[3] + 0.2)))
    got = apply_readout(features, "gex2atac", meta, depth)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    for gex in ({"aggregation": "profile", "coef": [1.1, -0.2, 0.05]}, {"aggregation": "profile_depth", "coef": [0.9, 1.7, 0.3, 1.05, -0.6]}):
        columns = _gex_design(features, gex["aggregation"], meta)
        expected = np.clip(sum(w * x for w, x in zip(gex["coef"], columns, strict=True)), 0, None)
        np.testing.assert_allclose(apply_readout(features, "atac2gex", meta, gex), expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(columns[0] + columns[1], profile.astype(np.float64), atol=1e-9)  # the GEX depth split is the ATAC one
    np.testing.assert_array_equal(features["profile"], profile)  # the input is not modified


def test_the_profile_step_uses_every_torch_thread_and_greedy_decoding_one(synthetic):
    """The encoder and the profile step run on the caller's torch threads (they multiply [batch, length, d_model] and every
    target feature); only the greedy decoding steps of a narrow model drop to one thread."""
    splits, tokenizer, meta = synthetic
    model = make_model(make_config("tiny", len(tokenizer)), seed=2).eval()
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    ids = TranslationExamples(splits["validation"].select(range(4)), tokenizer).sources[:4]
    seen = {"encoder": [], "decoder": []}
    hooks = [getattr(model, part).register_forward_pre_hook(lambda *_, part=part: seen[part].append(torch.get_num_threads()))
             for part in seen]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 8, decode=False)
        batches = len(seen["encoder"])
        assert seen["encoder"] == [2] * batches and seen["decoder"] == [2] * batches  # the profile step: one decoder call a batch
        seen["encoder"].clear()
        seen["decoder"].clear()
        decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 8, decode=True)
        # The profile step of each batch, then its greedy steps: a 64-wide model decodes on one thread.
        assert seen["decoder"].count(2) == batches and seen["decoder"][0] == 2 and set(seen["decoder"]) == {1, 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("tiles", [None, (3, 7)])
def test_the_readout_in_place_and_in_tiles_equals_the_copy(tiles, monkeypatch):
    """Tiles of any size (edges included) give the same matrix; in place it overwrites the profile and nothing else."""
    import translator.metrics_core as metrics_core

    if tiles:
        monkeypatch.setattr(metrics_core, "TILE_ROWS", tiles[0])
        monkeypatch.setattr(metrics_core, "TILE_COLUMNS", tiles[1])
    rng = np.random.default_rng(4)
    n = 50
    meta = {"train_stats": {"atac_mean": rng.uniform(1e-4, 0.5, n).tolist(), "gex_mean": rng.uniform(0, 2, n).tolist(),
                            "gex_mean_detected": rng.uniform(0, 3, n).tolist()}}
    profile = rng.normal(0, 3, (11, n)).astype(np.float32)
    size = rng.integers(0, 600, 11).astype(np.float32)
    for direction, params in (("gex2atac", {"aggregation": "profile_depth", "coef": [0.3, 2.5, -0.4, 0.9], "intercept": 0.2}),
                              ("atac2gex", {"aggregation": "profile_depth", "coef": [0.9, 1.7, 0.3, 1.05, -0.6]}),
                              ("gex2atac", {"aggregation": "profile", "coef": [0.9, 0.2], "intercept": -0.1})):
        copied = apply_readout({"profile": profile, "source_length": size}, direction, meta, params)
        mine = profile.copy()
        features = {"profile": mine, "source_length": size}
        got = apply_readout(features, direction, meta, params, in_place=True)
        assert got is mine
        np.testing.assert_array_equal(got, copied)
        z = profile.astype(np.float64)
        if params["aggregation"] == "profile_depth":
            a, d, e, b, *rest = params["coef"]
            u = z.mean(axis=1, keepdims=True)
            mean = _logit_of(meta, "atac_mean") if direction == "gex2atac" else np.asarray(meta["train_stats"]["gex_mean"])
            value = a * (z - u) + d * u + e * np.log1p(size)[:, None] + b * mean + params.get("intercept", rest[0] if rest else 0.0)
        else:
            a, b = params["coef"]
            value = a * (z + _logit_of(meta, "atac_mean")) + b * _logit_of(meta, "atac_mean") + params["intercept"]
        expected = 1 / (1 + np.exp(-value)) if direction == "gex2atac" else np.maximum(value, 0)
        np.testing.assert_allclose(copied, expected, rtol=0, atol=2e-6)


def _logit_of(meta: dict, key: str) -> np.ndarray:
    p = np.clip(np.asarray(meta["train_stats"][key], dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p) - np.log1p(-p)


def test_reduced_rank_head_projects_the_train_scores_on_their_top_directions():
    from translator.profile_fit import reduce_rank

    rng = np.random.default_rng(0)
    n, d, n_features = 300, 12, 40
    x_train = torch.tensor(rng.normal(size=(n, d)) + 0.5, dtype=torch.float32)
    x_val = torch.tensor(rng.normal(size=(60, d)) + 0.5, dtype=torch.float32)
    signal = rng.normal(size=(n_features, 2)) @ rng.normal(size=(2, d))  # scores truly of rank 2
    w = torch.tensor(signal + 0.3 * rng.normal(size=(n_features, d)), dtype=torch.float32)  # plus per-feature noise
    b = torch.tensor(rng.normal(size=n_features), dtype=torch.float32)
    offset = torch.zeros(n_features)
    y_val = sp.csr_matrix(np.clip(x_val.numpy() @ signal.T + b.numpy(), 0, None))
    w2, b2, report = reduce_rank(x_train, x_val, y_val, w, b, offset, binary=False, ranks=(1, 2, 3, 40))
    assert set(report["validation_rmse"]) == {"0", "1", "2", "3"}  # rank 40 >= the scores' rank (12): skipped
    assert report["rank"] == 2  # the truth's rank wins on validation
    # The folded head equals the explicit projection of the train scores onto their top-2 principal directions.
    z = (x_train @ w.T + b).double().numpy()
    mu = z.mean(0)
    vt = np.linalg.svd(z - mu, full_matrices=False)[2][:2]
    expected = mu + (z - mu) @ vt.T @ vt
    np.testing.assert_allclose((x_train @ w2.T + b2).double().numpy(), expected, atol=1e-4)
    # With validation targets from the full-rank head, no projection is kept (it wins ties too).
    y_full = sp.csr_matrix(np.clip(x_val.numpy() @ w.numpy().T + b.numpy(), 0, None))
    w0, b0, report0 = reduce_rank(x_train, x_val, y_full, w, b, offset, binary=False, ranks=(1, 2, 3))
    assert report0["rank"] == 0 and torch.equal(w0, w) and torch.equal(b0, b)


def test_the_refit_solves_where_it_is_told_and_in_full_fp32_on_a_gpu():
    """fit_profile_rows(device=...) returns CPU tensors equal to the default run's; on a CUDA device its products are
    full fp32 (TF32 off) for the solve and the caller's setting comes back after it (checked on the setting: no GPU here)."""
    from translator.profile_fit import _full_fp32, fit_profile_rows

    rng = np.random.default_rng(1)
    x, xv = torch.randn(120, 8), torch.randn(40, 8)
    y = sp.csr_matrix((rng.random((120, 25)) < 0.2).astype(np.float32))
    yv = sp.csr_matrix((rng.random((40, 25)) < 0.2).astype(np.float32))
    default = fit_profile_rows(x, y, xv, yv, torch.zeros(25), True, (1e-2, 1e-4), chunk_features=10)
    told = fit_profile_rows(x, y, xv, yv, torch.zeros(25), True, (1e-2, 1e-4), chunk_features=10, device="cpu")
    assert torch.equal(default[0], told[0]) and torch.equal(default[1], told[1]) and default[2] == told[2]
    assert told[0].device.type == "cpu" and told[0].shape == (25, 8)
    matmul = torch.backends.cuda.matmul
    key = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, key)
    try:
        setattr(matmul, key, "tf32" if key == "fp32_precision" else True)
        with _full_fp32(torch.device("cuda")):
            assert getattr(matmul, key) in ("ieee", False)
        assert getattr(matmul, key) in ("tf32", True)
        with _full_fp32(torch.device("cpu")):
            assert getattr(matmul, key) in ("tf32", True)
    finally:
        setattr(matmul, key, before)


def _source_rows(rows: int, width: int, gex_prefix: int, atac_prefix: int, eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded sources ``<prefix> 100 101 ... </s>``, GEX and ATAC rows alternating, 1 to ``width - 2`` names each (seed 0)."""
    torch.manual_seed(0)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    lengths = torch.randint(1, width - 1, (rows,))  # names per row; prefix + names + </s> fit in width
    for i, n in enumerate(lengths.tolist()):
        input_ids[i, 0] = gex_prefix if i % 2 == 0 else atac_prefix
        input_ids[i, 1:n + 1] = torch.arange(100, 100 + n)
        input_ids[i, n + 1] = eos
        attention_mask[i, : n + 2] = 1
    return input_ids, attention_mask, lengths


def test_gex_source_truncation_keeps_a_top_ranked_prefix_of_gex_sources_only():
    from translator.loss import truncate_sources

    gex_prefix, eos = 7, 1
    input_ids, attention_mask, lengths = _source_rows(400, 12, gex_prefix, 8, eos)
    mask = truncate_sources(input_ids, attention_mask, gex_prefix, probability=0.5)
    assert torch.equal(mask[1::2], attention_mask[1::2])  # ATAC sources untouched
    assert torch.equal(mask * attention_mask, mask)  # padding stays hidden
    gex = mask[0::2]
    assert (gex[:, 0] == 1).all() and (gex[torch.arange(len(gex)), lengths[0::2] + 1] == 1).all()  # prefix and </s> stay
    names = gex[:, 1:]
    kept = names.sum(1) - 1
    # what stays of the names is a prefix: no hidden name before a visible one
    assert all(int(names[i, : int(kept[i])].sum()) == int(kept[i]) for i in range(len(gex)))
    cut = kept < lengths[0::2]
    assert 0.3 < float(cut.float().mean()) < 0.6  # about half, less the rows whose draw kept everything
    assert (kept >= 1).all()
    assert torch.equal(truncate_sources(input_ids, attention_mask, gex_prefix, probability=0.0), attention_mask)


def test_count_downsampling_thins_and_reranks_gex_sources_only():
    from translator.loss import DOWNSAMPLE_MIN_RATE, downsample_sources

    gex_prefix, eos, rows, width = 7, 1, 600, 12
    input_ids, attention_mask, lengths = _source_rows(rows, width, gex_prefix, 8, eos)  # rank order: name 100 the most expressed
    counts = torch.zeros(rows, width)
    for i, n in enumerate(lengths.tolist()):
        counts[i, 1:n + 1] = torch.linspace(40, 1, n).round() if n > 1 else torch.tensor([3.0])
    new_ids, mask = downsample_sources(input_ids, attention_mask, counts, gex_prefix, probability=1.0)
    assert torch.equal(new_ids[1::2], input_ids[1::2]) and torch.equal(mask[1::2], attention_mask[1::2])  # ATAC untouched
    reordered = 0
    for i in range(0, rows, 2):
        n = int(lengths[i])
        assert new_ids[i, 0] == gex_prefix and new_ids[i, n + 1] == eos and mask[i, 0] == 1 and mask[i, n + 1] == 1
        assert sorted(new_ids[i, 1:n + 1].tolist()) == list(range(100, 100 + n))  # the same names, reordered
        assert torch.equal(mask[i, 1:n + 1], torch.sort(mask[i, 1:n + 1], descending=True).values)  # kept names first, contiguous
        assert (mask[i, n + 2:] == 0).all()
        visible = new_ids[i, 1:n + 1][mask[i, 1:n + 1].bool()].tolist()
        reordered += visible != sorted(visible)
    assert 0 < reordered < rows // 2  # close counts swap ranks after thinning; most rows keep their order
    kept = mask[0::2, 1:].sum(1) - 1  # visible names (the </s> is visible too)
    dropped_share = 1 - float(kept.sum()) / float(lengths[0::2].sum())
    assert 0.05 < dropped_share < 0.6  # count-1 genes vanish at rates 1 - r, r in [0.2, 1)
    # low counts vanish more often than high ones: the last-ranked name (count 1) against the first (count 40)
    long_rows = [i for i in range(0, rows, 2) if lengths[i] >= 6]
    last_lost = np.mean([int(100 + lengths[i] - 1) not in new_ids[i][mask[i].bool()].tolist() for i in long_rows])
    first_lost = np.mean([100 not in new_ids[i][mask[i].bool()].tolist() for i in long_rows])
    assert first_lost < 0.01 and last_lost > 0.25
    assert DOWNSAMPLE_MIN_RATE == 0.2
    same_ids, same_mask = downsample_sources(input_ids, attention_mask, counts, gex_prefix, probability=0.0)
    assert torch.equal(same_ids, input_ids) and torch.equal(same_mask, attention_mask)


def test_estimated_counts_recover_umis_from_log_norm():
    from translator.data import estimated_counts

    counts = np.array([37, 12, 5, 2, 1, 1], dtype=np.float64)
    size_factor = 1.7
    np.testing.assert_array_equal(estimated_counts(np.log1p(counts / size_factor)), counts.astype(np.float32))
    assert estimated_counts([]).shape == (0,)


def test_count_downsampling_runs_in_training_and_refuses_sentences_without_every_gene(tmp_path):
    import datasets

    import train
    from tests.translator_fixtures import tiny_args
    from translator.data import estimated_counts

    torch.set_num_threads(1)
    data, tok = make_dataset_and_tokenizer(tmp_path, n_cells=60, n_genes=20, n_peaks=30)
    split = datasets.load_from_disk(str(data))["train"]
    tokenizer = load_tokenizer(str(tok))
    examples = TranslationExamples(split, tokenizer, ("gex2atac", "atac2gex"), 8, 16, source_counts=True)
    batch = TranslationCollator(examples.ranges)([examples[0], examples[1]])  # two GEX sources, capped at 6 names
    for row in range(2):
        n = len(examples[row]["source"]) - 2
        assert torch.equal(batch["source_counts"][row, 1:1 + n], torch.from_numpy(estimated_counts(split[row]["gex_value"])[:n]))
        assert (batch["source_counts"][row, 1 + n:] == 0).all() and batch["source_counts"][row, 0] == 0
    atac_source = len(split)  # the ATAC-source examples follow the GEX-source ones and carry no counts
    assert "source_counts" not in TranslationCollator(examples.ranges)([examples[atac_source], examples[atac_source + 1]])
    out = tmp_path / "model"
    assert train.main(tiny_args(data, tok, out, "--max_steps", "3", "--checkpointing_steps", "0", "--calibration_cells", "8",
                                "--max_eval_cells", "8", "--gex_source_downsample", "0.5")) == 0
    assert json.loads((out / "training_args.json").read_text())["gex_source_downsample"] == 0.5
    # a GEX sentence that does not list every detected gene (the binary encoding) cannot be thinned by its values:
    # train.py refuses such a dataset by its metadata before writing anything, TranslationExamples by the cells
    binary = tmp_path / "binary"
    shutil.copytree(data, binary)
    meta = json.loads((binary / "cell_sentences.json").read_text())
    (binary / "cell_sentences.json").write_text(json.dumps({**meta, "gex_encoding": "binary"}))
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="--gex_source_downsample needs rank-order GEX sentences.*--gex_encoding rank") as err:
        train.main(tiny_args(binary, tok, refused, "--max_steps", "1", "--gex_source_downsample", "0.5"))
    assert "\n" not in str(err.value) and not refused.exists()
    cut = split.map(lambda row: {"gex_text": " ".join(row["gex_text"].split()[:1])})
    with pytest.raises(ValueError, match="--gex_source_downsample needs rank-order GEX sentences"):
        TranslationExamples(cut, tokenizer, ("gex2atac",), source_counts=True)


def test_a_calibration_pooled_over_models_keeps_each_cells_train_mean():
    """Cells read by two models (two cross-validation folds, two train splits) carry each model's train mean in the
    features: the fit and the readout use each row's own mean, and rows that carry the meta's mean change nothing."""
    rng = np.random.default_rng(11)
    n_cells, n_peaks = 240, 150
    means = [rng.uniform(0.02, 0.3, n_peaks), rng.uniform(0.02, 0.3, n_peaks)]  # two folds' train means, far apart
    meta = {"train_stats": {"atac_mean": means[0].tolist()}}
    half = n_cells // 2
    row_mean = np.concatenate([np.broadcast_to(means[0], (half, n_peaks)), np.broadcast_to(means[1], (half, n_peaks))])
    z = rng.normal(0, 1.0, (n_cells, n_peaks))
    logit = np.log(row_mean) - np.log1p(-row_mean) + 0.8 * z
    truth = sp.csr_matrix((rng.random((n_cells, n_peaks)) < 1 / (1 + np.exp(-logit))).astype(np.float32))
    size = rng.integers(20, 400, n_cells).astype(np.float32)
    features = {"profile": z.astype(np.float32), "source_length": size}
    plain = fit_readout(features, truth, "gex2atac", meta)
    same = fit_readout({**features, "atac_mean": np.broadcast_to(means[0], (n_cells, n_peaks))}, truth, "gex2atac", meta)
    assert same["coef"] == pytest.approx(plain["coef"]) and same["validation_rmse"] == pytest.approx(plain["validation_rmse"])
    pooled = fit_readout({**features, "atac_mean": row_mean}, truth, "gex2atac", meta)
    # with each row's own mean the data are the model itself: the mean term's weight ~1 and a lower RMSE than with one mean
    coef = pooled["coef"]
    mean_weight = coef[0] + coef[1] if pooled["aggregation"] == "profile" else coef[3]  # profile reads z + logit(mean) and logit(mean)
    assert mean_weight == pytest.approx(1.0, abs=0.1) and pooled["validation_rmse"][pooled["aggregation"]] < plain["validation_rmse"][plain["aggregation"]]
    assert pooled["validation_rmse_mean"] < plain["validation_rmse_mean"]  # the mean baseline is each row's own too
    rows = np.arange(half, n_cells)  # the second fold's cells alone, read with their own mean: as if its meta were the meta
    alone = apply_readout({"profile": z[rows].astype(np.float32), "source_length": size[rows]}, "gex2atac",
                          {"train_stats": {"atac_mean": means[1].tolist()}}, pooled)
    carried = apply_readout({"profile": z[rows].astype(np.float32), "source_length": size[rows], "atac_mean": row_mean[rows]}, "gex2atac", meta, pooled)
    np.testing.assert_allclose(carried, alone, rtol=1e-6)


def test_pooled_choice_weighs_each_models_validation_cells():
    """``pooled_choice``: per direction, the L2 and rank with the lowest validation MSE pooled over the models' cells."""
    from translator.profile_fit import pooled_choice

    def report(rmse, ranks, cells):
        return {"atac2gex": {"validation_rmse": rmse, "validation_cells": cells, "reduced_rank": {"validation_rmse": ranks}}}

    # model a (10 cells) prefers 1e-3, model b (30 cells) prefers 1e-4; pooled, b's cells outweigh a's
    a = report({"0.001": 0.50, "0.0001": 0.52}, {"0": 0.50, "4": 0.49}, 10)
    b = report({"0.001": 0.51, "0.0001": 0.50}, {"0": 0.50, "4": 0.51}, 30)
    chosen = pooled_choice([a, b])["atac2gex"]
    assert chosen["l2"] == 1e-4 and chosen["models"] == 2
    assert chosen["validation_mse_pooled"]["l2"]["0.001"] == pytest.approx((10 * 0.50**2 + 30 * 0.51**2) / 40)
    assert chosen["rank"] == 0  # pooled 0.25 vs (10 * 0.49**2 + 30 * 0.51**2) / 40 = 0.255
    # with the cells the other way round the choices turn
    a["atac2gex"]["validation_cells"], b["atac2gex"]["validation_cells"] = 30, 10
    turned = pooled_choice([a, b])["atac2gex"]
    assert turned["l2"] == 1e-3 and turned["rank"] == 4
    # ties: the larger penalty, and no reduction
    tie = report({"0.001": 0.5, "0.0001": 0.5}, {"0": 0.5, "4": 0.5}, 5)
    assert pooled_choice([tie, tie])["atac2gex"]["l2"] == 1e-3 and pooled_choice([tie])["atac2gex"]["rank"] == 0
    with pytest.raises(ValueError, match="no refit reports"):
        pooled_choice([])


def test_project_rank_is_reduce_ranks_candidate():
    """``project_rank(K)`` is the head ``reduce_rank`` keeps when it picks K; scores of the mean train state do not move."""
    import scipy.sparse as sp
    import torch

    from translator.profile_fit import project_rank, reduce_rank

    g = torch.Generator().manual_seed(0)
    x_train, x_val = torch.randn(40, 12, generator=g), torch.randn(15, 12, generator=g)
    w, b = torch.randn(30, 12, generator=g), torch.randn(30, generator=g)
    offset = torch.zeros(30)
    w4, b4 = project_rank(x_train, w, b, 4)
    # a validation truth that the rank-4 head predicts exactly: reduce_rank must choose 4
    truth = sp.csr_matrix((x_val @ w4.T + b4).clamp(min=0).numpy())
    w_k, b_k, report = reduce_rank(x_train, x_val, truth, w, b, offset, binary=False, ranks=(2, 4, 8))
    assert report["rank"] == 4
    torch.testing.assert_close(w_k, w4)
    torch.testing.assert_close(b_k, b4)
    centred = (x_train - x_train.mean(0)) @ w4.T
    assert torch.linalg.matrix_rank(centred.double(), rtol=1e-6) == 4
    torch.testing.assert_close(x_train.mean(0) @ w4.T + b4, x_train.mean(0) @ w.T + b, rtol=1e-4, atol=1e-4)
    for k in (0, 12, 40):  # none, or at least the scores' rank: unchanged
        same_w, same_b = project_rank(x_train, w, b, k)
        assert same_w is w and same_b is b


def test_a_passed_deadline_averages_the_choice_over_one_partition_and_says_so():
    """Under a time budget the readout's cross-fitted choice stops after the partitions it had time for (at least one);
    without one, every partition is averaged, and a deadline that is not reached changes nothing."""
    import time

    rng = np.random.default_rng(7)
    n_cells, n_peaks = 60, 40
    meta = {"train_stats": {"atac_mean": rng.uniform(0.05, 0.3, n_peaks).tolist()}}
    scores = rng.normal(0, 1.0, (n_cells, n_peaks)).astype(np.float32)
    truth = sp.csr_matrix((rng.random((n_cells, n_peaks)) < 1 / (1 + np.exp(-scores))).astype(np.float32))
    features = {"profile": scores, "source_length": rng.integers(20, 400, n_cells).astype(np.float32)}
    full = fit_readout(features, truth, "gex2atac", meta, selection_repeats=3)
    assert full["selection"] == "cross-fitted over 5 parts of the cells, averaged over 3 random partitions"
    late = fit_readout(features, truth, "gex2atac", meta, selection_repeats=3, deadline=time.perf_counter() + 3600)
    assert late == full
    cut = fit_readout(features, truth, "gex2atac", meta, selection_repeats=3, deadline=time.perf_counter() - 1)
    assert cut["selection"] == "cross-fitted over 5 parts of the cells (of 3: the time budget)"
    one = fit_readout(features, truth, "gex2atac", meta, selection_repeats=1)
    assert cut["validation_rmse_cross_fitted"] == one["validation_rmse_cross_fitted"]
    assert cut["validation_rmse_cross_fitted"] != full["validation_rmse_cross_fitted"]


def test_a_bf16_encoder_predicts_as_float32_does(synthetic, monkeypatch):
    """The bf16 copy of the encoder moves a random tiny model's predictions by bf16 rounding only, in both directions,
    through the profile scores and through greedy decoding; ``auto`` picks it on CPUs with hardware bf16 products."""
    import predict
    import translator.decode as decode
    from translator import CellTranslator
    from translator.decode import PRECISIONS, bf16_encoder, resolve_precision

    splits, tokenizer, meta = synthetic
    model = make_model(make_config("tiny", len(tokenizer), dropout_rate=0.0), seed=5).eval()
    head = ProfileHead(len(tokenizer), 3 * model.config.d_model)
    torch.nn.init.normal_(head.weight, std=1.0)
    calibration = {"gex2atac": {"aggregation": "profile", "coef": [1.0, 0.0], "intercept": 0.0},
                   "atac2gex": {"aggregation": "profile", "coef": [1.0, 0.0, 0.0]}}  # the profile readout as trained
    translator = CellTranslator(model, tokenizer, meta, {"max_target_length": 8, "calibration": calibration}, head)
    cells = splits["test"].select(range(24))
    for direction, column in (("gex2atac", "gex_text"), ("atac2gex", "atac_text")):
        exact, sentences = translator.predict_matrix(cells[column], direction, return_sentences=True, precision="float32")
        low, _ = translator.predict_matrix(cells[column], direction, return_sentences=True, precision="bf16")
        assert sentences and all(sentences)
        centred = [m - m.mean(axis=1, keepdims=True) for m in (exact, low)]
        pearson = (centred[0] * centred[1]).sum(1) / np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
        assert pearson.min() > 0.999, direction
        assert np.sqrt(np.mean((low - exact) ** 2)) < 0.01 * exact.std(), direction
        assert not np.array_equal(low, exact), direction  # the bf16 encoder did run
    assert translator.encoder_for("bf16") is translator.encoder_for("bf16")  # one copy, made once
    assert next(bf16_encoder(model).parameters()).dtype == torch.bfloat16 and model.shared.weight.dtype == torch.float32
    monkeypatch.setattr(decode, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16" and resolve_precision("auto", "cuda") == "float32"
    monkeypatch.setattr(decode, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "float32" and translator.encoder_for("auto") is None
    with pytest.raises(ValueError, match="precision 'half' is unknown"):
        translator.predict_matrix(cells["gex_text"], "gex2atac", precision="half")
    assert predict.PRECISIONS == PRECISIONS and predict.parse_args(
        ["--model", "m", "--input", "i.h5ad", "--direction", "gex2atac", "--output", "o.h5ad"]).precision == "auto"


def test_the_longest_sources_are_encoded_without_padding(synthetic):
    """Sources at the longest length are batched apart from shorter ones, so their attention needs no padding mask, and
    a cell's profile scores do not depend on the batches."""
    splits, tokenizer, meta = synthetic
    model = make_model(make_config("tiny", len(tokenizer), dropout_rate=0.0), seed=3).eval()
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    ids = list(TranslationExamples(splits["validation"].select(range(8)), tokenizer).sources[:8])
    longest = max(len(x) for x in ids)
    ids = [ids[int(np.argmax([len(x) for x in ids]))]] * 3 + [x for x in ids if len(x) < longest][:2]
    masks = []
    hook = model.encoder.register_forward_pre_hook(lambda _module, _args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        batched, _ = decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 8, batch_size=8, decode=False)
    finally:
        hook.remove()
    assert masks[0] is None and len(masks) == 2  # the three longest in one batch without a mask, the two shorter in another
    n_peaks = ranges["atac"][1] - ranges["atac"][0]
    given = np.full((len(ids) + 2, n_peaks), np.nan, dtype=np.float32)  # a reused buffer: every row the cells need is written
    alone, _ = decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 8, batch_size=1, decode=False, profile_out=given)
    np.testing.assert_allclose(batched["profile"], alone["profile"], atol=1e-5)
    assert np.shares_memory(alone["profile"], given) and np.isnan(given[len(ids):]).all()
    with pytest.raises(ValueError, match="profile_out must be"):
        decode_features(model, tokenizer, meta, ids, "gex2atac", ranges["atac"], 8, decode=False, profile_out=given[:2])
