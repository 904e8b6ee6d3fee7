"""A final model trained on every cell of the training donor, its settings taken from cross-validation fold models.

``dataset_builder --no_validation`` -> ``train.py --profile_choices_from FOLD_MODELS`` -> ``translator.recalibrate --pool``
-> ``eval.py --refit_baselines``, on the BMMC starter (two folds of donor s1d1, tiny models, a few steps each).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_in_process, shared_file
from tests.test_train import ENV
from tests.translator_fixtures import BMMC_COMBINED, tiny_args


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """Two fold datasets and fold models of s1d1 (validation fold 0 / fold 1), and the every-cell dataset."""
    import train
    from dataset_builder import build_dataset
    from evaluation.crossval import write_fold_file
    from tokenizer import build_from_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("final")
    source = shared_file(BMMC_COMBINED)  # skips with a reason when ../shared is absent
    write_fold_file(source, root / "folds.h5ad", "s1d1", 2)
    out = {"root": root}
    for k in (0, 1):
        build_dataset([root / "folds.h5ad"], root / f"f{k}", test_batches=["s1d2"], validation_batches=[f"s1d1_f{k}"])
    build_dataset([root / "folds.h5ad"], root / "all", test_batches=["s1d2"], no_validation=True)
    build_from_dataset(root / "f0", root / "tok")
    for k in (0, 1):
        assert train.main(tiny_args(root / f"f{k}", root / "tok", root / f"m{k}", "--max_steps", "6", "--checkpointing_steps", "0",
                                    "--profile_ranks", "4", "8", blend=k == 0)) == 0  # m0 heads the ensemble, whose blend it keeps
    out.update(tok=root / "tok", models=[root / "m0", root / "m1"], data=[root / "f0", root / "f1"], all=root / "all")
    return out


def test_no_validation_trains_on_every_cell_outside_the_test_batches(folds):
    import datasets

    every = datasets.load_from_disk(str(folds["all"]))
    f0, f1 = (datasets.load_from_disk(str(d)) for d in folds["data"])
    assert len(every["validation"]) == 0 and len(every["train"]) == 221 and len(every["test"]) == 279
    assert sorted(every["train"]["cell"]) == sorted([*f0["train"]["cell"], *f0["validation"]["cell"]])
    assert len(f0["validation"]) + len(f1["validation"]) == 221
    meta = json.loads((folds["all"] / "cell_sentences.json").read_text())
    assert meta["splits"]["validation"] == 0 and meta["split_by"] == "batch"


def test_the_final_model_takes_its_refit_settings_from_the_fold_models_and_is_calibrated_on_their_readings(folds, tmp_path):
    import train
    from translator import CellTranslator
    from translator.profile_fit import pooled_choice
    from translator.recalibrate import recalibrate

    out = tmp_path / "final"
    assert train.main(tiny_args(folds["all"], folds["tok"], out, "--max_steps", "6", "--checkpointing_steps", "0",
                                "--profile_choices_from", *map(str, folds["models"]))) == 0
    readout = json.loads((out / "readout.json").read_text())
    reports = [json.loads((m / "readout.json").read_text())["profile_refit"] for m in folds["models"]]
    expected = pooled_choice(reports)
    assert set(expected) == {"gex2atac", "atac2gex"}
    for direction, refit in readout["profile_refit"].items():
        assert refit["chosen_beforehand"] == json.loads(json.dumps(expected[direction]))
        assert refit["l2"] == expected[direction]["l2"] and refit["reduced_rank"]["rank"] == expected[direction]["rank"]
        assert refit["train_cells"] == 221 and refit["validation_cells"] == 0 and refit["validation_rmse_mean"] is None
    assert readout["calibration"] == {}  # no validation cells: calibrated by the next stage
    assert json.loads((out / "training_args.json").read_text())["profile_choices_from"] == ["m0", "m1"]

    # Without --pool there is nothing to calibrate on: one line, the folder untouched.
    before = (out / "readout.json").read_bytes()
    result = subprocess.run([sys.executable, "-m", "translator.recalibrate", "--model", str(out), "--dataset_dir", str(folds["all"])],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--dataset_dir" in lines[0] and "--pool" in lines[0], result.stderr[-2000:]
    assert (out / "readout.json").read_bytes() == before

    recalibrate(out, folds["all"], calibration_cells=500, pool=list(zip(folds["models"], folds["data"], strict=True)))
    calibration = json.loads((out / "readout.json").read_text())["calibration"]
    for params in calibration.values():
        assert params["pooled_from"] == [["m0", "f0"], ["m1", "f1"]]
        assert sum(params["pooled_cells"]) == params["n_cells"] == 221
    translator = CellTranslator.from_pretrained(out)
    sentences = ["chr1-1677585-1678477 " + " ".join(translator.meta["peaks"][1:40:3])]
    matrix = translator.predict_matrix(sentences, "atac2gex")
    assert matrix.shape == (1, len(translator.meta["genes"])) and np.isfinite(matrix).all() and matrix.min() >= 0

    # eval.py --refit_baselines: the baselines of a model trained on every cell fit on train and validation together
    result = subprocess.run([sys.executable, "eval.py", "--model", str(out), "--dataset_dir", str(folds["data"][0]), "--split", "test",
                             "--max_cells", "40", "--baselines", "mean", "svd_krr", "--refit_baselines", "--no_plots",
                             "--no_update_model_folder", "--output_dir", str(tmp_path / "ev")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert "fit again on train and validation together" in results["baseline_fit"]
    for direction in ("gex2atac", "atac2gex"):
        assert results["baseline_settings"][direction]["svd_krr"]["refit_cells"] == 221
        assert results["directions"][direction]["model"]["rmse"] > 0


def test_bad_final_model_flags_get_one_line_errors(folds, tmp_path, capsys, monkeypatch):
    """train.py's and the builder's command lines run in this process (tests/test_train.py and tests/test_dataset_builder.py
    run them as commands)."""
    import train
    from dataset_builder.__main__ import main as build

    def train_cli(argv: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])  # cli() reads --debug from the command line
        return train.cli()

    cases = [
        (["--profile_choices_from", str(tmp_path / "missing")], "--profile_choices_from"),
        (["--profile_choices_from", str(folds["models"][0]), "--no_profile_refit"], "--profile_choices_from"),
    ]
    for extra, flag in cases:
        out = tmp_path / "out"
        result = run_in_process(train_cli, tiny_args(folds["all"], folds["tok"], out, "--max_steps", "2", *extra), capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr[-2000:]
        assert not out.exists()
    for extra, flag in [(["--test_batches", "s1d2", "--validation_batches", "s1d1_f0", "--no_validation"], "--no_validation"),
                        (["--no_validation"], "--no_validation")]:
        result = run_in_process(build, ["--input", str(folds["root"] / "folds.h5ad"), "--output_dir", str(tmp_path / "ds"), *extra], capsys)
        lines = [line for line in result.stderr.strip().splitlines() if "error:" in line or "Traceback" in line]  # logs may come first
        assert result.returncode == 2 and len(lines) == 1 and flag in lines[0], result.stderr[-2000:]
        assert not (tmp_path / "ds").exists()


def test_an_ensemble_folder_averages_its_members_calibrated_matrices(folds, tmp_path, monkeypatch, capsys):
    """``python -m translator.ensemble``: the top model plus members, each with the top's calibration; the mean of their matrices."""
    import shutil

    from transformers import AutoModelForSeq2SeqLM

    from translator import CellTranslator

    m0, m1 = folds["models"]
    out = tmp_path / "ens"
    result = subprocess.run([sys.executable, "-m", "translator.ensemble", "--model", str(m0), "--members", str(m1), "--output_dir", str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    readout = json.loads((out / "readout.json").read_text())
    assert readout["ensemble"] == ["ensemble/member_0"] and readout["ensemble_from"] == ["m1"]
    member_readout = json.loads((out / "ensemble" / "member_0" / "readout.json").read_text())
    assert member_readout["calibration"] == readout["calibration"] and member_readout["calibration_from"] == "m0"
    assert "## Ensemble" in (out / "README.md").read_text()
    # the member as the ensemble holds it: m1's weights with m0's calibration
    alone = tmp_path / "m1_with_m0_calibration"
    shutil.copytree(m1, alone)
    (alone / "readout.json").write_text(json.dumps(member_readout))
    ensemble, top, member = (CellTranslator.from_pretrained(p) for p in (out, m0, alone))
    assert len(ensemble.members) == 1 and not top.members
    assert ensemble.blend.keys() == top.blend.keys()  # the top's blend, applied to the members' mean
    ensemble.blend = top.blend = member.blend = {}  # here: the mean of the calibrated matrices, before any blend
    import datasets

    test = datasets.load_from_disk(str(folds["data"][0]))["test"].select(range(20))
    for direction, column in (("gex2atac", "gex_text"), ("atac2gex", "atac_text")):
        sentences = list(test[column])
        expected = np.mean([top.predict_matrix(sentences, direction), member.predict_matrix(sentences, direction)], axis=0)
        np.testing.assert_allclose(ensemble.predict_matrix(sentences, direction), expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(expected, top.predict_matrix(sentences, direction))
    assert ensemble.translate(list(test["gex_text"][:2]), "gex2atac") == top.translate(list(test["gex_text"][:2]), "gex2atac")
    assert AutoModelForSeq2SeqLM.from_pretrained(str(out)).config.d_model == top.model.config.d_model  # still a plain Hub folder at the top

    # bad input: one line naming the flag, nothing written
    other = tmp_path / "other"
    shutil.copytree(m1, other)
    meta = json.loads((other / "cell_sentences.json").read_text())
    meta["genes"] = meta["genes"][::-1]
    (other / "cell_sentences.json").write_text(json.dumps(meta))
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(m0, uncalibrated)
    (uncalibrated / "readout.json").write_text(json.dumps({**readout, "calibration": {}, "ensemble": []}))
    cases = [
        (["--model", str(m0), "--members", str(other), "--output_dir", str(tmp_path / "bad")], "--members"),
        (["--model", str(m0), "--members", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "bad")], "--members"),
        (["--model", str(out), "--members", str(m1), "--output_dir", str(tmp_path / "bad")], "--model"),
        (["--model", str(uncalibrated), "--members", str(m1), "--output_dir", str(tmp_path / "bad")], "--model"),
        (["--model", str(m0), "--members", str(m1), "--output_dir", str(out)], "--output_dir"),
    ]
    from translator.ensemble import cli as ensemble_cli

    for args, flag in cases:  # the command itself ran above; its refusals run in this process
        result = run_in_process(ensemble_cli, args, capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # --push_to_hub sends the whole folder, members included (the upload calls replaced, nothing leaves the machine)
    import huggingface_hub

    from tests.fake_hub import LocalHub
    from translator.ensemble import main as ensemble_main
    from translator.hub import hub_files

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api_class())
    assert ensemble_main(["--model", str(m0), "--members", str(m1), "--output_dir", str(tmp_path / "pushed"), "--push_to_hub",
                          "--hub_model_id", "user/ens"]) == 0
    upload = next(call for call in hub.calls if call["call"] == "upload_folder")
    assert upload["repo_id"] == "user/ens" and any(call["call"] == "create_repo" for call in hub.calls)
    assert {"model.safetensors", "readout.json", "ensemble/member_0/model.safetensors", "ensemble/member_0/readout.json",
            "ensemble/member_0/profile_head.safetensors"} <= set(upload["files"])
    assert upload["files"] == hub_files(tmp_path / "pushed")
    # an ensemble folder missing a member says so
    shutil.rmtree(out / "ensemble" / "member_0")
    with pytest.raises(FileNotFoundError, match="member_0"):
        CellTranslator.from_pretrained(out)


def test_the_source_kernel_predicts_what_svd_krr_predicts():
    """``SourceKernel`` (plain arrays in the folder) gives the fitted ``svd_krr`` regression's predictions, both source modalities."""
    import scipy.sparse as sp

    from translator.source_kernel import SourceKernel, SvdKrrBaseline, source_indicator

    def binary(shape, seed):
        x = sp.random(*shape, density=0.06, random_state=seed, format="csr", dtype=np.float32)
        x.data[:] = 1.0
        return x

    for source, target in (("atac", "gex"), ("gex", "atac")):
        x, x_new = binary((120, 300), 1), binary((30, 300), 3)
        y = binary((120, 50), 2) if target == "atac" else sp.random(120, 50, density=0.2, random_state=2, format="csr", dtype=np.float32) * 4
        krr = SvdKrrBaseline(source, target, n_components=32, gamma_scale=1.0, alpha=1.0, max_landmarks=50).refit(x, y, embed_components=64)
        expected = np.vstack(list(krr.predict_chunks(x_new)))
        got = SourceKernel.from_baseline(krr).predict(x_new)
        assert got.dtype == np.float32 and got.shape == expected.shape and expected.std() > 0.01
        np.testing.assert_allclose(got, expected, atol=1e-5)
    ids = [np.array([0, 7, 9, 7, 12, 1]), np.array([2, 1]), np.array([11, 8])]  # range [7, 12): names 7, 9, 11, 8 (12 and specials outside)
    assert source_indicator(ids, (7, 12)).toarray().tolist() == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]]


def test_a_stacked_folder_blends_its_matrix_with_the_source_kernel_and_the_mean(folds, tmp_path, capsys):
    """``python -m translator.stack --pool``: weights chosen on fold models' held-out readings; at predict time
    ``w_t * model + w_k * kernel + w_m * mean``, the kernel and the mean fitted on the folder's cells."""
    import shutil

    import datasets
    from transformers import AutoModelForSeq2SeqLM

    from dataset_builder.records import load_split_matrices
    from translator import CellTranslator
    from translator.predictor import BLEND_FILE
    from translator.source_kernel import source_indicator

    m0, m1 = folds["models"]
    ens = tmp_path / "ens"
    assert subprocess.run([sys.executable, "-m", "translator.ensemble", "--model", str(m0), "--members", str(m1), "--output_dir", str(ens)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300).returncode == 0
    out = tmp_path / "stacked"
    shutil.copytree(ens, out)
    pool = ["--pool", str(m0), str(folds["data"][0]), "--pool", str(m1), str(folds["data"][1])]
    result = subprocess.run([sys.executable, "-m", "translator.stack", "--model", str(out), "--dataset_dir", str(folds["all"]), *pool],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len([line for line in result.stdout.splitlines() if "held-out RMSE" in line]) == 2
    readout = json.loads((out / "readout.json").read_text())
    plain, stacked = CellTranslator.from_pretrained(ens), CellTranslator.from_pretrained(out)
    plain.blend = {}  # the ensemble's calibrated matrix: the transformer part
    n_val = [len(datasets.load_from_disk(str(d))["validation"]) for d in folds["data"]]
    mean_fit = {t: np.asarray(load_split_matrices(folds["all"], "train")[t].mean(axis=0)).ravel() for t in ("gex", "atac")}
    test = datasets.load_from_disk(str(folds["data"][0]))["test"].select(range(20))
    for direction, column in (("gex2atac", "gex_text"), ("atac2gex", "atac_text")):
        record = readout["blend"][direction]
        w, held = record["weights"], record["held_out"]
        assert held["cells"] == sum(n_val) == 221 and held["pooled_from"] == n_val and record["mean_fit_cells"] == 221
        assert held["rmse"]["blend"] <= held["rmse"]["mean"] + 1e-12 and held["pearson"]["blend"] >= held["pearson"]["mean"] - 1e-12
        assert sum(w.values()) == pytest.approx(1.0)
        sentences = list(test[column])
        expected = w["transformer"] * plain.predict_matrix(sentences, direction) + w["mean"] * mean_fit["atac" if direction == "gex2atac" else "gex"]
        if w["kernel"] > 0:
            assert record["kernel"]["fit_cells"] == 221
            ids = stacked.encode_sources(sentences, direction, allow_empty=True)
            expected += w["kernel"] * stacked.blend[direction].kernel.predict(source_indicator(ids, stacked.ranges["gex" if direction == "gex2atac" else "atac"]))
        np.testing.assert_allclose(stacked.predict_matrix(sentences, direction), expected, rtol=1e-5, atol=1e-6)
    assert "| gex2atac |" in (out / "README.md").read_text().split("## The shipped predictor")[1]
    assert AutoModelForSeq2SeqLM.from_pretrained(str(out)).config.d_model == plain.model.config.d_model

    # bad input: one line naming the flag, the folder untouched
    before = (out / "readout.json").read_bytes()
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(m0, uncalibrated)
    (uncalibrated / "readout.json").write_text(json.dumps({**json.loads((m0 / "readout.json").read_text()), "calibration": {}}))
    from translator.stack import cli as stack_cli

    for args, flag in [([], "--pool"), (["--weight_step", "0.3", *pool], "--weight_step"), (["--pool", str(tmp_path / "missing"), str(folds["data"][0])], "--pool"),
                       (["--model", str(uncalibrated), *pool], "--model")]:
        result = run_in_process(stack_cli, ["--model", str(out), "--dataset_dir", str(folds["all"]), *args], capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr[-2000:]
    assert (out / "readout.json").read_bytes() == before and not [p for p in out.iterdir() if p.name.startswith(".")]
    if any(r["weights"]["kernel"] > 0 or r["weights"]["mean"] > 0 for r in readout["blend"].values()):
        (out / BLEND_FILE).unlink()
        with pytest.raises(FileNotFoundError, match=BLEND_FILE):
            CellTranslator.from_pretrained(out)
