"""The default recipe's parts: schedule, early stopping, time budget, memory check, the shipped config file."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import get_linear_schedule_with_warmup

from tests.conftest import REPO
from translator.finishing import MIN_CALIBRATION_CELLS, calibration_cell_cap, refit_cell_cap, refit_seconds
from translator.model import make_config
from translator.profile_fit import CHOICE_CHUNKS, fit_profile_rows, refit_cost, refit_solves
from translator.training import (
    BestWeights,
    Budget,
    LinearSchedule,
    auto_eval_steps,
    auto_warmup_steps,
    check_memory,
    estimate_memory,
)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_the_schedule_is_transformers_linear_schedule_and_can_end_sooner():
    weight = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([weight], lr=1.0)
    ours = torch.optim.SGD([weight], lr=1.0)
    expected = _lrs(get_linear_schedule_with_warmup(reference, 5, 40), reference, 40)
    schedule = LinearSchedule(5, 40)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, schedule)
    assert _lrs(scheduler, ours, 40) == pytest.approx(expected)
    # Moved at step 10 to end at 20: the rate decays to 0 by step 20; the end moves later again, never past the planned
    # end nor into the warmup.
    schedule = LinearSchedule(5, 40)
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, schedule)
    _lrs(scheduler, ours, 10)
    assert schedule.move_end(20) and not schedule.move_end(20) and schedule.total == 20
    rates = _lrs(scheduler, ours, 10)  # the first was set before the change
    assert rates[1] == pytest.approx(9 / 15) and rates[-1] == pytest.approx(1 / 15) and _lrs(scheduler, ours, 1) == [0.0]
    assert schedule.move_end(30) and schedule.total == 30 and schedule.move_end(100) and schedule.total == 40
    schedule.move_end(2)
    assert schedule.total == 6
    # The shortened end is saved with the scheduler (a resumed run keeps it).
    state = scheduler.state_dict()
    fresh = LinearSchedule(5, 40)
    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([weight], lr=1.0), fresh).load_state_dict(state)
    assert fresh.total == 6


def test_automatic_warmup_and_validation_interval_follow_the_data():
    assert auto_warmup_steps(50) == 5 and auto_warmup_steps(5400) == 100 and auto_warmup_steps(3) == 1
    assert auto_eval_steps(13) == 13 and auto_eval_steps(6250) == 500


def test_early_stopping_keeps_the_best_weights_and_waits_patience_validations():
    module = torch.nn.Linear(2, 1)
    best = BestWeights(module, patience=2)
    losses = {10: 3.0, 20: 2.0, 30: 2.5, 40: 2.0, 50: 2.1}
    stops = []
    for step, loss in losses.items():
        with torch.no_grad():
            module.weight.fill_(step)
        stops.append(best.update(loss, step))
    assert stops == [False, False, False, True, True]  # a tie is no improvement
    assert (best.best_step, best.best_loss) == (20, 2.0)
    state = best.state_dict()
    best.restore()
    assert torch.all(module.weight == 20)
    again = BestWeights(module, patience=2)
    again.load_state_dict(state)
    assert (again.best_step, again.since_best) == (20, 3) and torch.equal(again.weights["weight"], best.weights["weight"])
    # Patience 0: never stops, still keeps the best.
    never = BestWeights(module, patience=0)
    assert not any(never.update(loss, step) for step, loss in losses.items()) and never.best_step == 20


def test_a_budget_counts_from_its_start_and_none_means_no_limit():
    assert not Budget(0).limited and Budget(0).left() == math.inf
    budget = Budget(100.0, started=0.0)
    assert budget.limited and budget.left() < 0  # perf_counter has long passed 100 s since its origin 0
    assert refit_cell_cap(None, 12, [500]) is None
    # A spent budget keeps the trained head (0: even the refit's solves on a few cells would overrun); a long one, many cells.
    assert refit_cell_cap(1e-3, 12, [500]) == 0
    assert refit_cell_cap(1e6, 12, [500]) > 10_000
    assert refit_cell_cap(1e-3, 192, [36505, 13431]) == 0
    assert refit_cell_cap(1e9, 192, [36505, 13431]) > 10**6


def test_the_refit_gets_what_is_left_after_the_calibration_and_the_blend_need():
    # 700 s left, a calibration of 500 cells at 0.05 s a cell and a blend reading 900 of them again: the refit gets the rest.
    seconds = refit_seconds(700.0, 0.05, 500, 900)
    assert seconds == pytest.approx(0.85 * 700 - 0.05 * (750 + 900))
    assert refit_seconds(700.0, 0.0, 500, 900) > seconds > refit_seconds(700.0, 0.1, 500, 900)
    assert refit_seconds(10.0, 1.0, 500, 900) == 0.0  # nothing left: the refit gets nothing
    # The calibration then decodes as many cells as its share of what is left allows, never fewer than a few.
    assert calibration_cell_cap(0.0, 0.05) == MIN_CALIBRATION_CELLS
    assert calibration_cell_cap(600.0, 0.05) > calibration_cell_cap(300.0, 0.05) > calibration_cell_cap(300.0, 0.1)


def test_the_memory_estimate_grows_with_vocabulary_and_batch_and_refuses_in_one_line():
    small = estimate_memory(make_config("tiny", 5_000), 1_000_000, 32, 512, 128, 4_000, 500)
    large = estimate_memory(make_config("tiny", 130_000), 30_000_000, 32, 512, 128, 116_000, 500)
    wide = estimate_memory(make_config("t5-small", 130_000), 90_000_000, 32, 512, 512, 116_000, 500)
    assert small["total"] < large["total"] < wide["total"]
    assert wide["activations"] > 10 * large["activations"]
    check_memory(small, 64 * 2**30, "tiny")  # fits: no error
    with pytest.raises(ValueError, match=r"^t5-small needs about [\d.]+ GiB of memory \(activations [\d.]+ GiB\) and 4\.0 GiB are available: "
                                         r"lower --per_device_train_batch_size") as err:
        check_memory(wide, 4 * 2**30, "t5-small")
    assert "\n" not in str(err.value)
    # The blend's held-out matrices count: few validation cells add a k-fold's fold.
    from translator.predictor import held_out_cells

    assert held_out_cells(5000) == 1000 and held_out_cells(40) > 40
    blend = estimate_memory(make_config("tiny", 130_000), 30_000_000, 32, 512, 128, 116_000, 500, held_out_cells(5000))
    assert blend["blend"] > 0 and blend["total"] == pytest.approx(large["total"] + blend["blend"])


def test_many_features_choose_the_l2_on_a_sample_of_chunks_and_fit_the_rest_with_it():
    """Past CHOICE_CHUNKS chunks, the penalties are tried on evenly spaced chunks only: those rows are the full grid's rows,
    the others are solved once with the chosen penalty; the cost counts that."""
    rng = np.random.default_rng(0)
    n_train, n_val, d, chunk = 60, 30, 4, 3
    n_features = chunk * (CHOICE_CHUNKS + 4)
    x_train = torch.from_numpy(rng.normal(size=(n_train, d)).astype(np.float32))
    x_val = torch.from_numpy(rng.normal(size=(n_val, d)).astype(np.float32))
    w_true = rng.normal(size=(n_features, d))
    y_train = sp.csr_matrix((rng.random((n_train, n_features)) < 1 / (1 + np.exp(-(x_train.numpy() @ w_true.T - 1)))).astype(np.float32))
    y_val = sp.csr_matrix((rng.random((n_val, n_features)) < 1 / (1 + np.exp(-(x_val.numpy() @ w_true.T - 1)))).astype(np.float32))
    offset = torch.full((n_features,), -1.0)
    grid = (1e-1, 1e-3)
    w, b, report = fit_profile_rows(x_train, y_train, x_val, y_val, offset, True, grid, chunk_features=chunk)
    assert report["choice_features"] == CHOICE_CHUNKS * chunk and w.shape == (n_features, d)
    sampled = np.concatenate([np.arange(s * chunk, (s + 1) * chunk) for s in np.linspace(0, n_features // chunk - 1, CHOICE_CHUNKS).round().astype(int)])
    # The sampled chunks alone, through the full grid: the same rows and the same choice.
    w_s, b_s, report_s = fit_profile_rows(x_train, y_train[:, sampled], x_val, y_val[:, sampled], offset[sampled], True, grid, chunk_features=chunk)
    assert report_s["l2"] == report["l2"]
    torch.testing.assert_close(w[sampled], w_s)
    assert torch.count_nonzero(w) == w.numel()  # every row fitted
    assert refit_cost(10, n_features, len(grid), chunk) == 10 * (CHOICE_CHUNKS * chunk * len(grid) + n_features)
    assert refit_cost(10, 2 * chunk, len(grid), chunk) == 10 * 2 * chunk * len(grid)
    assert refit_solves(n_features, len(grid), chunk) == CHOICE_CHUNKS * len(grid) + n_features // chunk
    assert refit_solves(2 * chunk, len(grid), chunk) == 2 * len(grid)


def test_the_shipped_config_is_the_default_recipe_and_flags_override_it(tmp_path):
    import train

    shipped = train.parse_args([str(REPO / "configs" / "default.yaml")])
    assert [asdict(group) for group in shipped] == [asdict(group) for group in train.parse_args([])]
    model_args, _, run = train.parse_args([str(REPO / "configs" / "default.yaml"), "--learning_rate", "1e-4", "--no_profile_refit"])
    assert run.learning_rate == 1e-4 and not model_args.profile_refit and model_args.model_size == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown argument\(s\) learning_rat; see `python train.py --help`"):
        train.parse_args([str(bad)])
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml not found"):
        train.parse_args([str(tmp_path / "missing.yaml")])


def test_a_refit_whose_solves_would_overrun_its_deadline_stops_after_the_first():
    """The refit counts its solves against its deadline: one that has passed stops it after the first solve; without one
    every solve runs."""
    from translator.profile_fit import RefitOverBudget, SolvePace

    rng = np.random.default_rng(3)
    x_train, x_val = (torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32)) for n in (40, 20))
    y_train, y_val = (sp.csr_matrix((rng.random((n, 30)) < 0.2).astype(np.float32)) for n in (40, 20))
    offset, grid = torch.full((30,), -1.0), (1e-1, 1e-2, 1e-3)
    late = SolvePace(time.perf_counter() - 1.0, refit_solves(30, len(grid)))
    with pytest.raises(RefitOverBudget, match="2 of 3 solves left"):
        fit_profile_rows(x_train, y_train, x_val, y_val, offset, True, grid, pace=late)
    assert late.done == 1
    free = SolvePace(None, refit_solves(30, len(grid)))
    fit_profile_rows(x_train, y_train, x_val, y_val, offset, True, grid, pace=free)
    assert free.done == 3


def test_a_refit_that_would_overrun_starts_again_on_fewer_cells_or_keeps_the_trained_rows(monkeypatch):
    """When the first solve's pace says the refit would end after its deadline, the refit starts again on as many evenly
    spaced train cells as fit at that pace; when too few would, the direction keeps its trained rows."""
    from translator import profile_fit
    from translator.model import ProfileHead
    from translator.profile_fit import MIN_REFIT_CELLS, RefitOverBudget, refit_profile_head

    rng = np.random.default_rng(5)
    n_train, n_val, d, n_peaks = 400, 40, 6, 20
    states = {n: torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32)) for n in (n_train, n_val)}
    monkeypatch.setattr(profile_fit, "profile_states", lambda model, ids, batch_size=64: states[len(ids)])
    truth = {n: sp.csr_matrix((rng.random((n, n_peaks)) < 0.3).astype(np.float32)) for n in (n_train, n_val)}
    sources = {"gex2atac": ([np.zeros(1)] * n_train, [np.zeros(1)] * n_val)}
    offsets = {0: (torch.full((n_peaks,), -1.0), True)}
    model = torch.nn.Linear(1, 1)
    assert RefitOverBudget("", 2.0, 10).cells_within(1000, 10.0) == 400  # 10 s fit a fifth of 20 s of solves, at 0.8 of that
    assert RefitOverBudget("", 0.0, 0).cells_within(1000, 10.0) == 0

    def pace_that_overruns(cells_within: int):
        """A SolvePace whose first count raises with a pace at which ``cells_within`` of the train cells fit; later ones count freely."""
        made = []

        class Pace(profile_fit.SolvePace):
            def __init__(self, deadline, total):
                super().__init__(None, total)
                made.append(self)

            def solved(self):
                super().solved()
                if len(made) == 1:
                    per_solve = 0.8 * 100.0 * n_train / (cells_within * self.total)
                    raise RefitOverBudget("over", per_solve, self.total)

        return Pace, made

    Pace, made = pace_that_overruns(120)
    monkeypatch.setattr(profile_fit, "SolvePace", Pace)
    head = ProfileHead(n_peaks, d)
    reports = refit_profile_head(model, head, sources, {"gex2atac": (truth[n_train], truth[n_val])}, {"gex2atac": (0, n_peaks)}, offsets,
                                 l2_grid=(1e-2, 1e-3), deadline=time.perf_counter() + 100.0)
    assert len(made) == 2 and reports["gex2atac"]["train_cells"] in (119, 120)
    assert torch.count_nonzero(head.weight) > 0

    Pace, made = pace_that_overruns(MIN_REFIT_CELLS // 2)
    monkeypatch.setattr(profile_fit, "SolvePace", Pace)
    head = ProfileHead(n_peaks, d)
    reports = refit_profile_head(model, head, sources, {"gex2atac": (truth[n_train], truth[n_val])}, {"gex2atac": (0, n_peaks)}, offsets,
                                 l2_grid=(1e-2, 1e-3), deadline=time.perf_counter() + 100.0)
    assert reports == {} and len(made) == 1 and torch.count_nonzero(head.weight) == 0
