"""The shipped predictor: the transformer's readout, the source kernel and the per-feature mean, blended on held-out cells."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp

from translator.metrics_core import rowwise_pearson
from translator.predictor import BLEND_FILE, cell_stats, choose_weights, score_weights, simplex_grid


def programs(n_cells: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells drawn from four programs: (expected values, observed truth, the per-feature mean of other cells like them)."""
    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 1.0, size=(4, n_features))
    label = rng.integers(0, 4, size=n_cells)
    expected = profiles[label]
    truth = rng.poisson(expected).astype(np.float64)
    train = rng.poisson(profiles[rng.integers(0, 4, size=5 * n_cells)])
    return expected, truth, train.mean(axis=0)


def test_the_scores_of_a_weighting_are_its_rmse_and_per_cell_pearson():
    rng = np.random.default_rng(0)
    parts = [rng.random((30, 17)), rng.random((30, 17)), rng.random(17)]
    truth = (rng.random((30, 17)) < 0.3).astype(np.float64)
    truth[3] = 0.0  # a cell with nothing observed: no Pearson
    stats = cell_stats(parts, sp.csr_matrix(truth), chunk_cells=7)
    weights = np.array([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    squared, pearson = score_weights(stats, weights)
    for column, w in enumerate(weights):
        blend = w[0] * parts[0] + w[1] * parts[1] + w[2] * parts[2]
        np.testing.assert_allclose(squared[:, column], ((blend - truth) ** 2).sum(axis=1), rtol=1e-10)
        np.testing.assert_allclose(pearson[:, column], rowwise_pearson(np.broadcast_to(blend, truth.shape), truth), rtol=1e-9, atol=1e-12)
    assert np.isnan(pearson[3]).all()


def test_a_transformer_of_pure_noise_gets_no_weight():
    expected, truth, mean = programs(300, 60, seed=1)
    rng = np.random.default_rng(2)
    kernel = expected + rng.normal(0, 0.5, expected.shape).clip(-expected, None)
    noise = expected[rng.permutation(len(expected))]  # another cell's profile: right in scale, unrelated to this cell
    choice = choose_weights(cell_stats([noise, kernel, mean], truth), simplex_grid(3), mean_part=2)
    assert choice["weights"][0] == 0.0, choice
    assert choice["weights"][1] > 0.5 and choice["rmse"] < choice["mean_rmse"]  # the kernel is worth having here


def test_an_informative_transformer_gets_real_weight():
    expected, truth, mean = programs(300, 60, seed=3)
    rng = np.random.default_rng(4)
    kernel = (0.5 * expected + 0.5 * mean + rng.normal(0, 0.8, expected.shape)).clip(0, None)
    transformer = expected * rng.lognormal(0, 0.1, expected.shape)
    choice = choose_weights(cell_stats([transformer, kernel, mean], truth), simplex_grid(3), mean_part=2)
    assert choice["weights"][0] >= 0.5, choice
    assert choice["rmse"] < choice["mean_rmse"] and choice["pearson"] > choice["mean_pearson"]


def test_parts_that_cannot_beat_the_mean_leave_the_mean_alone():
    expected, truth, mean = programs(200, 50, seed=5)
    rng = np.random.default_rng(6)
    shuffled = [expected[rng.permutation(len(expected))] for _ in range(2)]
    choice = choose_weights(cell_stats([*shuffled, mean], truth), simplex_grid(3), mean_part=2)
    assert list(choice["weights"]) == [0.0, 0.0, 1.0]


def test_a_blend_that_wins_rmse_by_losing_per_cell_pearson_is_refused():
    # Cells differ in depth, which the mean misses; the "transformer" knows each cell's depth but blurs which features are high.
    rng = np.random.default_rng(0)
    n_cells, n_features = 400, 80
    profile = rng.gamma(0.8, 1.0, n_features)
    depth = rng.lognormal(0, 0.8, n_cells)[:, None]
    truth = rng.poisson(depth * profile).astype(np.float64)
    mean = rng.poisson(rng.lognormal(0, 0.8, (2000, 1)) * profile).mean(0)
    transformer = depth * profile * rng.lognormal(0, 0.3, (n_cells, n_features))
    stats = cell_stats([transformer, mean], truth)
    candidates = simplex_grid(2)
    squared, pearson = score_weights(stats, candidates)
    rmse = np.sqrt(squared.sum(0) / truth.size)
    lowest, mean_only = int(np.argmin(rmse)), int(np.flatnonzero(candidates[:, 1] == 1.0)[0])
    assert rmse[lowest] < 0.8 * rmse[mean_only] and pearson[:, lowest].mean() < pearson[:, mean_only].mean()  # the trap is real
    choice = choose_weights(stats, candidates, mean_part=1)
    assert choice["pearson"] >= choice["mean_pearson"] and choice["rmse"] > rmse[lowest]


def ranking_trap(seed: int = 0):
    """Binary truth; a "kernel" that ranks each cell's features right but is off in scale, a "transformer" that knows each
    cell's depth but ranks its features by the average profile, and the mean."""
    rng = np.random.default_rng(seed)
    n_cells, n_features = 300, 120
    programs_ = rng.gamma(0.5, 1.0, (4, n_features))
    label = rng.integers(0, 4, n_cells)
    depth = rng.lognormal(0, 0.7, (n_cells, 1))
    p = np.clip(0.08 * depth * programs_[label], 0, 1)
    truth = (rng.random(p.shape) < p).astype(np.float64)
    mean = truth.mean(0)
    kernel = 0.3 * programs_[label] / programs_.mean()
    transformer = depth * mean
    return [transformer, kernel, mean], truth


def test_a_blend_that_wins_rmse_by_ranking_peaks_worse_than_the_kernel_is_refused():
    from translator.predictor import rank_scorer

    parts, truth = ranking_trap()
    stats = cell_stats(parts, truth)
    ranks, n = rank_scorer([[p] for p in parts], [sp.csr_matrix(truth)], max_cells=1000)
    assert n == len(truth)
    plain = choose_weights(stats, simplex_grid(3), mean_part=2)
    kernel_auroc = ranks(np.array([0.0, 1.0, 0.0]))["auroc"]
    assert ranks(plain["weights"])["auroc"] < kernel_auroc  # the trap is real: RMSE alone picks a worse ranking
    guarded = choose_weights(stats, simplex_grid(3), mean_part=2, references=(1, 2), rank_scores=ranks)
    assert guarded["matches_references"]
    for key in ("auroc", "ap"):
        assert guarded["ranks"][key] >= guarded["reference_ranks"][key] - 1e-12
    assert guarded["ranks"]["auroc"] >= kernel_auroc - 1e-12 and guarded["rmse"] >= plain["rmse"]


def test_the_rank_scorer_reads_the_blend_of_evenly_spaced_cells_across_groups():
    from translator.metrics_core import rowwise_auroc, rowwise_average_precision
    from translator.predictor import rank_scorer

    parts, truth = ranking_trap(seed=1)
    groups = [slice(0, 100), slice(100, 300)]
    by_group = [[p[g] for g in groups] for p in parts[:2]] + [[truth[g].mean(0) for g in groups]]  # a mean per group
    ranks, n = rank_scorer(by_group, [sp.csr_matrix(truth[g]) for g in groups], max_cells=50)
    rows = np.unique(np.linspace(0, 299, 50).round().astype(int))
    assert n == len(rows)
    w = np.array([0.2, 0.5, 0.3])
    means = np.where(rows[:, None] < 100, truth[:100].mean(0), truth[100:].mean(0))
    blend = w[0] * parts[0][rows] + w[1] * parts[1][rows] + w[2] * means
    got = ranks(w)
    np.testing.assert_allclose(got["auroc"], np.nanmean(rowwise_auroc(blend, truth[rows] > 0)), rtol=1e-5)
    np.testing.assert_allclose(got["ap"], np.nanmean(rowwise_average_precision(blend, truth[rows] > 0)), rtol=1e-5)


def test_a_blend_below_the_kernels_per_cell_pearson_is_refused():
    parts, truth = ranking_trap(seed=2)
    stats = cell_stats(parts, truth)
    _, pearson = score_weights(stats, np.eye(3))
    kernel_pearson = np.nanmean(pearson[:, 1])
    assert choose_weights(stats, simplex_grid(3), mean_part=2)["pearson"] < kernel_pearson  # the trap is real
    choice = choose_weights(stats, simplex_grid(3), mean_part=2, references=(1, 2))
    assert choice["pearson"] >= kernel_pearson - 1e-12


def test_the_weight_grid_is_the_simplex():
    grid = simplex_grid(3, 0.05)
    assert len(grid) == 231 and np.allclose(grid.sum(1), 1.0) and (grid >= 0).all()
    with pytest.raises(ValueError, match="--weight_step must divide 1"):
        simplex_grid(3, 0.3)


# -- a model folder ---------------------------------------------------------------------------------------------------------
def model_folder(root, data, tok, head_scale: float):
    """An untrained tiny model folder whose profile head has random weights of ``head_scale``, calibrated on validation."""
    import datasets
    import torch

    from tokenizer import load_tokenizer, read_meta
    from translator.finishing import calibrate, write_model_folder
    from translator.model import PROFILE_INPUTS, ProfileHead, make_config, make_model

    tokenizer, meta = load_tokenizer(tok), read_meta(data)
    model = make_model(make_config("tiny", len(tokenizer), 0.0, 64), seed=0).eval()
    head = ProfileHead(model.config.vocab_size, PROFILE_INPUTS * model.config.d_model)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * head_scale)
    splits = datasets.load_from_disk(str(data))
    calibration = calibrate(model, tokenizer, meta, splits["validation"], ["gex2atac", "atac2gex"], 64, 64, 500, 32, 0, head,
                            aggregations=("profile",))
    readout = {"max_source_length": 64, "max_target_length": 64, "calibration": calibration, "examples": []}
    out = root / "model"
    write_model_folder(out, model, tokenizer, meta, readout, {"directions": ["gex2atac", "atac2gex"]}, 64, head)
    return out


def shuffle_pairs(data):
    """The same dataset with each split's ATAC and GEX of different cells: nothing in a source predicts its target."""
    import datasets

    splits = datasets.load_from_disk(str(data))
    shuffled = {}
    for name, split in splits.items():
        order = np.random.default_rng(len(name)).permutation(len(split)).tolist()
        atac = split.select(order)["atac_text"]
        shuffled[name] = split.remove_columns("atac_text").add_column("atac_text", atac)
    out = data.parent / "shuffled"
    datasets.DatasetDict(shuffled).save_to_disk(str(out))
    (out / "cell_sentences.json").write_text((data / "cell_sentences.json").read_text())
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.translator_fixtures import make_dataset_and_tokenizer

    return make_dataset_and_tokenizer(tmp_path_factory.mktemp("blend"), n_cells=240, n_genes=30, n_peaks=90)


@pytest.mark.parametrize("few_cells", [100, 0])  # 40 validation cells: k-fold for the kernel's part, or the simplex on validation
def test_the_shipped_predictor_is_the_recorded_blend_of_its_parts(dataset, tmp_path, few_cells):
    from dataset_builder.records import load_split_matrices, source_sentences
    from translator import CellTranslator
    from translator.predictor import fit_blend
    from translator.source_kernel import source_indicator

    data, tok = dataset
    folder = model_folder(tmp_path, data, tok, head_scale=0.05)
    records = fit_blend(folder, data, batch_size=32, few_cells=few_cells, grid={"n_components": (8,), "gamma_scale": (0.3, 1.0), "alpha": (0.1, 10.0)})
    readout = json.loads((folder / "readout.json").read_text())
    assert readout["blend"] == json.loads(json.dumps(records))
    test = load_split_matrices(data, "test")
    shipped = CellTranslator.from_pretrained(folder)
    parts = CellTranslator.from_pretrained(folder)
    parts.blend = {}
    train, validation = load_split_matrices(data, "train"), load_split_matrices(data, "validation")
    for direction, record in records.items():
        w = record["weights"]
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
        held = record["held_out"]
        assert held["cells"] == 40 and set(held["rmse"]) == {"blend", "mean", "kernel", "transformer"}
        assert held["rmse"]["blend"] <= held["rmse"]["mean"] + 1e-12 and held["pearson"]["blend"] >= held["pearson"]["mean"] - 1e-12
        assert ("kernel_against_mean" in record) == (few_cells > 40)
        assert set(held.get("auroc", {})) == ({"blend", "mean", "kernel", "transformer"} if direction == "gex2atac" else set())
        sentences = source_sentences(test, direction, shipped.meta)
        target = "atac" if direction == "gex2atac" else "gex"
        expected = w["transformer"] * parts.predict_matrix(sentences, direction)
        if w["kernel"] > 0:
            expected += w["kernel"] * shipped.blend[direction].kernel.predict(source_indicator(shipped.encode_sources(sentences, direction, allow_empty=True),
                                                                                             shipped.ranges["gex" if target == "atac" else "atac"]))
        mean = np.asarray(sp.vstack([train[target], validation[target]]).mean(axis=0)).ravel()
        expected += w["mean"] * mean
        np.testing.assert_allclose(shipped.predict_matrix(sentences, direction), expected, rtol=1e-5, atol=1e-6)
    assert (folder / BLEND_FILE).exists() == any(r["weights"]["kernel"] > 0 or r["weights"]["mean"] > 0 for r in records.values())


def test_a_predictor_that_cannot_beat_the_mean_ships_the_mean_with_a_warning(dataset, tmp_path, caplog):
    from dataset_builder.records import load_split_matrices, source_sentences
    from translator import CellTranslator
    from translator.predictor import fit_blend

    data = shuffle_pairs(dataset[0])
    folder = model_folder(tmp_path, data, dataset[1], head_scale=1.0)
    with caplog.at_level(logging.WARNING, logger="translator.predictor"):
        records = fit_blend(folder, data, directions=["gex2atac"], batch_size=32, grid={"n_components": (8,), "gamma_scale": (1.0,), "alpha": (1.0,)})
    record = records["gex2atac"]
    assert record["weights"] == {"transformer": 0.0, "kernel": 0.0, "mean": 1.0} and record["predicts_the_mean"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "predicts the per-feature mean" in warnings[0] and "\n" not in warnings[0]
    test = load_split_matrices(data, "test")
    shipped = CellTranslator.from_pretrained(folder)
    matrix = shipped.predict_matrix(source_sentences(test, "gex2atac", shipped.meta), "gex2atac")
    mean = np.asarray(sp.vstack([load_split_matrices(data, s)["atac"] for s in ("train", "validation")]).mean(axis=0)).ravel()
    np.testing.assert_allclose(matrix, np.broadcast_to(mean, matrix.shape), rtol=1e-6)


def kernel_data(n_cells: int = 120, seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n_cells)
    x = sp.csr_matrix((rng.random((n_cells, 40)) < 0.2 + 0.2 * (label[:, None] == np.arange(40) % 3)).astype(np.float32))
    y = sp.csr_matrix(rng.poisson(0.5 + label[:, None] * (np.arange(25) % 2)).astype(np.float32))
    return x, y


def test_the_kernel_tuning_stops_at_its_deadline_after_one_width_and_keeps_every_fitted_point():
    import time

    from translator.source_kernel import SvdKrrBaseline

    x, y = kernel_data()
    grid = {"n_components": (4, 8), "gamma_scale": (0.1, 0.3, 1.0, 3.0), "alpha": (0.1, 1.0, 10.0)}
    train, held = (x[:90], y[:90]), (x[90:], y[90:])
    full, trials = SvdKrrBaseline.tune("gex", "gex", train, held, grid=grid, max_landmarks=50)
    assert len(trials) == 2 * 4 * 3 and len(full.fitted) == len(trials)
    short, cut = SvdKrrBaseline.tune("gex", "gex", train, held, grid=grid, max_landmarks=50, deadline=time.perf_counter() - 1.0)
    assert {(t["n_components"], t["gamma_scale"]) for t in cut} == {(8, 1.0)} and len(cut) == 3  # the middle width, every alpha
    assert short.fit_seconds > 0
    # A fitted point predicts as a model refitted with its settings.
    refit = SvdKrrBaseline("gex", "gex", n_components=4, gamma_scale=0.3, alpha=10.0, max_landmarks=50).refit(*train, embed_components=8)
    np.testing.assert_allclose(np.vstack(list(full.use((4, 0.3, 10.0)).predict_chunks(held[0]))), np.vstack(list(refit.predict_chunks(held[0]))),
                               rtol=1e-5, atol=1e-6)


def test_the_shipped_kernel_is_fitted_on_the_cells_the_time_left_allows():
    import time

    from translator.predictor import MIN_FIT_CELLS, _affordable_rows

    pace = 2e-3  # seconds a cell
    assert _affordable_rows(5000, pace, None) is None and _affordable_rows(5000, None, time.perf_counter() + 1.0) is None
    assert _affordable_rows(5000, pace, time.perf_counter() + 60.0) is None  # 5000 cells: about 10 s
    rows = _affordable_rows(5000, pace, time.perf_counter() + 4.0)
    assert 1500 <= len(rows) <= 2000 and np.all(np.diff(rows) > 0) and rows[0] == 0 and rows[-1] == 4999
    assert len(_affordable_rows(5000, pace, time.perf_counter() - 1.0)) == MIN_FIT_CELLS


def test_a_kernel_that_cannot_be_refitted_on_as_many_cells_as_it_was_scored_with_ships_as_tuned():
    """The blend's weights were chosen on the tuned kernel's held-out predictions: a refit on fewer cells (a short time
    budget) would ship a weaker kernel than the one scored, so that kernel ships as tuned; with time, the refit uses
    every fit cell."""
    import time

    from translator.predictor import MIN_FIT_CELLS, shipped_kernel
    from translator.source_kernel import SvdKrrBaseline

    x, y = kernel_data(n_cells=2 * MIN_FIT_CELLS + 60)
    grid = {"n_components": (4, 8), "gamma_scale": (0.3, 1.0), "alpha": (1.0,)}
    n_tune = MIN_FIT_CELLS + 40
    tuned, _ = SvdKrrBaseline.tune("gex", "gex", (x[:n_tune], y[:n_tune]), (x[n_tune:], y[n_tune:]), grid=grid, max_landmarks=50)
    settings = (4, 0.3, 1.0)
    expected = np.vstack(list(SvdKrrBaseline.tune("gex", "gex", (x[:n_tune], y[:n_tune]), (x[n_tune:], y[n_tune:]), grid=grid,
                                                  max_landmarks=50)[0].use(settings).predict_chunks(x[n_tune:])))
    late = shipped_kernel(tuned, settings, x, y, grid, 50, 0, deadline=time.perf_counter() - 1.0)  # a refit could use MIN_FIT_CELLS
    assert late is tuned and late.embedding_cells == n_tune
    np.testing.assert_allclose(np.vstack(list(late.predict_chunks(x[n_tune:]))), expected, rtol=1e-6, atol=1e-7)
    free = shipped_kernel(tuned, settings, x, y, grid, 50, 0)
    assert free is not tuned and free.embedding_cells == x.shape[0] and (free.n_components, free.gamma_scale, free.alpha) == settings


def _kernel_reference(kernel, source: sp.csr_matrix) -> np.ndarray:
    """The kernel's prediction computed whole in float64, as its formula reads."""
    a = kernel.arrays
    x = source.toarray().astype(np.float64)
    if kernel.source == "atac":
        x = x * a["idf"]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
        z = x @ a["reducer_components"].T
    else:
        z = (np.minimum(x * a["inv_sd"], 10.0) - a["reducer_mean"]) @ a["reducer_components"].T
    z = z / kernel.scale
    d2 = ((z[:, None, :] - a["landmarks"][None]) ** 2).sum(-1)
    values = (np.exp(-kernel.gamma * d2) @ a["normalization"].T @ a["coef"]) @ a["target_components"] + a["target_mean"]
    return np.clip(values, 0.0, 1.0) if kernel.target == "atac" else np.maximum(values, 0.0)


@pytest.mark.parametrize("tiles", [None, (4, 9)])
@pytest.mark.parametrize("source", ["gex", "atac"])
def test_the_blend_and_its_kernel_in_tiles_equal_the_whole_float64_formula(source, tiles, monkeypatch):
    """Made tile by tile in float32 (edges included), in place or not, the blend is its parts' formula to float32 rounding."""
    import translator.metrics_core as metrics_core
    from translator.predictor import DirectionBlend
    from translator.source_kernel import SourceKernel

    if tiles:
        monkeypatch.setattr(metrics_core, "TILE_ROWS", tiles[0])
        monkeypatch.setattr(metrics_core, "TILE_COLUMNS", tiles[1])
    rng = np.random.default_rng(5)
    n_cells, n_source, n_target, components, landmarks, target_components = 23, 40, 31, 6, 12, 5
    arrays = {"reducer_components": rng.normal(size=(components, n_source)), "landmarks": rng.normal(size=(landmarks, components)),
              "normalization": rng.normal(size=(landmarks, landmarks)) / landmarks, "coef": rng.normal(size=(landmarks, target_components)),
              "target_components": rng.normal(size=(target_components, n_target)) * 0.2, "target_mean": rng.uniform(0.0, 0.6, n_target)}
    if source == "atac":
        arrays["idf"] = rng.uniform(1.0, 3.0, n_source)
    else:
        arrays.update(inv_sd=rng.uniform(0.5, 2.0, n_source), reducer_mean=rng.uniform(0.0, 0.3, n_source))
    target = "gex" if source == "atac" else "atac"
    kernel = SourceKernel(arrays, source, target, gamma=0.3, scale=1.7)
    indicator = sp.csr_matrix((rng.random((n_cells, n_source)) < 0.3).astype(np.float32))
    expected_kernel = _kernel_reference(kernel, indicator)
    got = kernel.predict(indicator)
    assert got.dtype == np.float32 and got.shape == (n_cells, n_target)
    np.testing.assert_allclose(got, expected_kernel, rtol=1e-5, atol=1e-5)

    transformer = rng.uniform(0.0, 1.0, (n_cells, n_target)).astype(np.float32)
    mean = rng.uniform(0.0, 0.5, n_target).astype(np.float32)
    blend = DirectionBlend({"transformer": 0.55, "kernel": 0.3, "mean": 0.15}, kernel, mean)
    expected = 0.55 * transformer.astype(np.float64) + 0.3 * expected_kernel + 0.15 * mean
    copied = blend.combine(transformer, indicator)
    assert copied is not transformer and copied.dtype == np.float32
    np.testing.assert_allclose(copied, expected, rtol=1e-5, atol=1e-5)
    mine = transformer.copy()
    assert blend.combine(mine, indicator, in_place=True) is mine
    np.testing.assert_array_equal(mine, copied)
    alone = DirectionBlend({"transformer": 0.0, "kernel": 0.7, "mean": 0.3}, kernel, mean).combine(None, indicator)
    np.testing.assert_allclose(alone, 0.7 * expected_kernel + 0.3 * mean, rtol=1e-5, atol=1e-5)
