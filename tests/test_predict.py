"""predict.py and CellTranslator.predict_anndata on the bmmc_starter competition split."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tests.conftest import REPO, shared_file
from tests.test_train import ENV
from tests.translator_fixtures import BMMC_COMBINED, build_real, tiny_args

TEST_MOD1 = "bmmc_starter/openproblems_bmmc_multiome_starter.test_mod1.h5ad"  # GEX of donor s1d2
TEST_MOD2 = "bmmc_starter/openproblems_bmmc_multiome_starter.test_mod2.h5ad"  # ATAC of donor s1d2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model trained on the competition's train donor (s1d1) only."""
    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bmmc_split")
    data, tok = build_real(root, shared_file(BMMC_COMBINED), test_batches=["s1d2"])
    out = root / "model"
    assert train.main(tiny_args(data, tok, out, "--max_steps", "8", "--checkpointing_steps", "0", blend=True)) == 0  # predictions go through the blend
    return out


def test_predict_cli_matches_the_held_out_truth(model_dir, tmp_path):
    output = tmp_path / "pred.h5ad"
    cmd = [sys.executable, "predict.py", "--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)),
           "--direction", "gex2atac", "--output", str(output), "--text"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    pred, truth = ad.read_h5ad(output), ad.read_h5ad(shared_file(TEST_MOD2))
    assert pred.shape == truth.shape
    assert list(pred.obs_names) == list(truth.obs_names)
    assert sorted(pred.var_names) == sorted(truth.var_names)
    assert (pred.var["feature_types"] == "ATAC").all()
    x = np.asarray(pred.X)
    assert x.dtype == np.float32 and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    peaks = set(pred.var_names)
    first = pred.obs["translation"].iloc[0].split()
    assert first and set(first) <= peaks
    assert pred.uns["cell_translation"]["unknown_genes"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_sigterm_mid_write_leaves_no_partial_file(model_dir, tmp_path):
    """SIGTERM after the first chunk is written: exit 143, no output, no temporary file."""
    script = (
        "import os, signal, sys\n"
        "from translator import CellTranslator\n"
        "original, calls = CellTranslator._predict_ids, []\n"
        "def predict_ids(self, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return original(self, *args, **kwargs)\n"
        "CellTranslator._predict_ids = predict_ids\n"
        "import predict\n"
        "sys.exit(predict.main(sys.argv[1:]))\n"
    )
    output = tmp_path / "pred.h5ad"
    cmd = [sys.executable, "-c", script, "--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)),
           "--direction", "gex2atac", "--output", str(output), "--chunk_cells", "64"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]  # a chunk's prediction (every path goes through _predict_ids) was reached twice
    assert "terminated by SIGTERM" in result.stderr
    assert list(tmp_path.iterdir()) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("umask, terminal, flags", [(0o022, True, []), (0o002, True, ["--no_progress"]), (0o077, False, [])])
def test_output_mode_follows_the_umask_and_the_bar_shows_on_a_terminal(model_dir, tmp_path, monkeypatch, umask, terminal, flags):
    import predict

    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    output = tmp_path / "pred.h5ad"
    previous = os.umask(umask)
    try:
        code = predict.main(["--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)), "--direction", "gex2atac",
                             "--output", str(output), "--chunk_cells", "100", *flags])
    finally:
        os.umask(previous)
    assert code == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask
    shown = "predicting gex2atac" in stderr.getvalue()
    assert shown == (terminal and not flags)
    if shown:
        assert "279/279" in stderr.getvalue()  # every cell of the test donor counted
    assert [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]


def test_gene_token_ids_make_the_source_ids_of_their_sentences(model_dir):
    """GEX sources given as their genes' token ids (predict_h5ad's path) are the ids encode_sources makes of the sentences:
    prefix, the top-ranked names under the cap, </s>; an empty cell is prefix and </s>."""
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model_dir)
    tr.max_source_length = 6
    genes = tr.meta["genes"]
    cells = [genes[:9], [], genes[20:23], genes[5:9][::-1]]
    offsets = np.cumsum([0, *(len(c) for c in cells)])
    tokens = np.asarray(tr.tokenizer.convert_tokens_to_ids([g for c in cells for g in c]))
    got = tr.gene_source_ids(offsets, tokens, "gex2atac")
    expected = tr.encode_sources([" ".join(c) for c in cells], "gex2atac", allow_empty=True)
    assert [x.tolist() for x in got] == [x.tolist() for x in expected]
    assert [len(x) for x in got] == [6, 2, 5, 6] and tr.last_stats == {"cells": 4, "unknown_source_names": 0}


@pytest.mark.parametrize("direction, source", [("gex2atac", TEST_MOD1), ("atac2gex", TEST_MOD2)])
def test_chunked_h5ad_equals_the_in_memory_prediction(model_dir, tmp_path, direction, source):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model_dir)
    # float32: equal to rounding whatever the batches; a bf16 encoder's results move by its rounding with the batches' padding.
    whole = tr.predict_anndata(shared_file(source), direction, return_sentences=True, precision="float32")
    stats = tr.predict_h5ad(shared_file(source), direction, tmp_path / "chunked.h5ad", chunk_cells=64, return_sentences=True,
                            precision="float32")  # 279 cells: 5 chunks
    chunked = ad.read_h5ad(tmp_path / "chunked.h5ad")
    assert chunked.n_obs == whole.n_obs == 279
    np.testing.assert_allclose(np.asarray(chunked.X), np.asarray(whole.X), rtol=1e-5, atol=1e-6)
    tr.predict_h5ad(shared_file(source), direction, tmp_path / "bf16.h5ad", chunk_cells=64, precision="bf16")
    np.testing.assert_allclose(np.asarray(ad.read_h5ad(tmp_path / "bf16.h5ad").X), np.asarray(whole.X), rtol=0, atol=2e-3)
    assert list(chunked.obs_names) == list(whole.obs_names) and list(chunked.var_names) == list(whole.var_names)
    assert list(chunked.obs["translation"]) == list(whole.obs["translation"])
    pd.testing.assert_frame_equal(chunked.var, whole.var)
    pd.testing.assert_frame_equal(chunked.obs, whole.obs)
    provenance = {key: whole.uns["cell_translation"][key] for key in ("values", "model", "package_version")}
    assert dict(chunked.uns["cell_translation"]) == dict(whole.uns["cell_translation"]) == {**stats, "direction": direction, **provenance}
    with pytest.raises(ValueError, match="--chunk_cells"):
        tr.predict_h5ad(shared_file(source), direction, tmp_path / "bad.h5ad", chunk_cells=0)


@pytest.mark.parametrize("layout", ["anndata", "mudata"])
def test_an_object_in_memory_predicts_as_its_file_without_a_temporary_file(model_dir, tmp_path, monkeypatch, layout):
    import tempfile

    import mudata

    from translator import CellTranslator

    gex = ad.read_h5ad(shared_file(TEST_MOD1))[:40].copy()
    gex.obsm["X_umap"] = np.arange(80, dtype=np.float32).reshape(40, 2)
    if layout == "mudata":
        cells, path = mudata.MuData({"rna": gex, "atac": ad.read_h5ad(shared_file(TEST_MOD2))[:40].copy()}), tmp_path / "cells.h5mu"
        cells.obs["donor"] = "s1d2"
        cells.write_h5mu(path)
    else:
        cells, path = gex, tmp_path / "cells.h5ad"
        cells.write_h5ad(path)
    tr = CellTranslator.from_pretrained(model_dir)
    from_file = tr.predict_anndata(path, "gex2atac")

    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file was made")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    in_memory = tr.predict_anndata(cells, "gex2atac")
    np.testing.assert_array_equal(np.asarray(in_memory.X), np.asarray(from_file.X))
    assert list(in_memory.obs_names) == list(from_file.obs_names) and list(in_memory.var_names) == list(from_file.var_names)
    pd.testing.assert_frame_equal(in_memory.obs.astype(str), from_file.obs.astype(str))
    np.testing.assert_array_equal(in_memory.obsm["X_umap"], from_file.obsm["X_umap"])
    assert dict(in_memory.uns["cell_translation"]) == dict(from_file.uns["cell_translation"])


def test_atac_to_gex_from_another_peak_set_is_mapped_by_overlap(model_dir, tmp_path):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model_dir)
    atac = ad.read_h5ad(shared_file(TEST_MOD2))[:20].copy()
    # Another peak caller: the same regions shifted by 50 bp and named chr:start-end, plus one peak the model lacks.
    names = [f"{c}:{int(s) + 50}-{int(e) + 50}" for c, s, e in (n.split("-") for n in atac.var_names)]
    counts = sp.hstack([sp.csr_matrix(atac.layers["counts"]), sp.csr_matrix(np.ones((20, 1)))]).tocsr()
    other = ad.AnnData(X=counts, obs=pd.DataFrame(index=atac.obs_names), var=pd.DataFrame(index=[*names, "chr1-1-20"]))
    shifted = tr.predict_anndata(other, "atac2gex")
    stats = shifted.uns["cell_translation"]
    assert stats["mapped_peaks"] == atac.n_vars and stats["unmapped_peaks"] == 1
    reference = tr.predict_anndata(atac, "atac2gex")
    np.testing.assert_allclose(np.asarray(shifted.X), np.asarray(reference.X), rtol=1e-5, atol=1e-6)
    assert shifted.shape == (20, len(tr.meta["genes"])) and list(shifted.var_names) == tr.meta["genes"]


def test_a_cellranger_h5_with_repeated_gene_symbols_predicts(model_dir, tmp_path):
    from tests.test_readers import write_10x_h5
    from translator import CellTranslator

    gex, atac = ad.read_h5ad(shared_file(TEST_MOD1)), ad.read_h5ad(shared_file(TEST_MOD2))
    gex.X, atac.X = gex.layers["counts"], atac.layers["counts"]
    symbols = list(gex.var_names)
    symbols[5] = symbols[0]  # a repeated symbol, as in human 10x references
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(path, gex, atac, gene_names=symbols, gene_ids=[f"ENSG{i:011d}" for i in range(len(symbols))])
    output = tmp_path / "pred.h5ad"
    cmd = [sys.executable, "predict.py", "--model", str(model_dir), "--input", str(path), "--direction", "gex2atac", "--output", str(output)]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "renamed 1" in result.stderr
    pred = ad.read_h5ad(output)
    assert list(pred.obs_names) == list(gex.obs_names)
    # The renamed copy ('NAME-1') is unknown to the model; the first keeps its name and its counts.
    assert pred.uns["cell_translation"]["unknown_genes"] == 1
    reference = CellTranslator.from_pretrained(model_dir).predict_anndata(gex[:, [i for i in range(gex.n_vars) if i != 5]].copy(), "gex2atac")
    np.testing.assert_allclose(np.asarray(pred.X), np.asarray(reference.X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_cli", [True, False])
def test_mudata_with_other_modality_names_predicts(model_dir, tmp_path, use_cli):
    import mudata

    from translator import CellTranslator

    gex, atac = ad.read_h5ad(shared_file(TEST_MOD1))[:30].copy(), ad.read_h5ad(shared_file(TEST_MOD2))[:30].copy()
    mdata = mudata.MuData({"expression": gex, "peaks": atac})
    tr = CellTranslator.from_pretrained(model_dir)
    reference = tr.predict_anndata(gex, "gex2atac")
    if use_cli:
        path = tmp_path / "cells.h5mu"
        mdata.write_h5mu(path)
        output = tmp_path / "pred.h5ad"
        cmd = [sys.executable, "predict.py", "--model", str(model_dir), "--input", str(path), "--direction", "gex2atac",
               "--output", str(output), "--gex_modality", "expression", "--atac_modality", "peaks"]
        result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        pred = ad.read_h5ad(output)
        # Without the flag the error names it, and predict.py has it.
        cmd = [*cmd[:9], str(tmp_path / "other.h5ad")]
        result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "pass the GEX modality's name with --gex_modality" in result.stderr
        assert "--gex_modality" in subprocess.run([sys.executable, "predict.py", "--help"], cwd=REPO, env=ENV, capture_output=True, text=True).stdout
    else:
        pred = tr.predict_anndata(mdata, "atac2gex", gex_modality="expression", atac_modality="peaks")
        assert pred.shape == (30, len(tr.meta["genes"]))
        np.testing.assert_allclose(np.asarray(pred.X), np.asarray(tr.predict_anndata(atac, "atac2gex").X), rtol=1e-5, atol=1e-6)
        pred = tr.predict_anndata(mdata, "gex2atac", gex_modality="expression", atac_modality="peaks")
    assert list(pred.obs_names) == list(gex.obs_names)
    np.testing.assert_allclose(np.asarray(pred.X), np.asarray(reference.X), rtol=1e-5, atol=1e-6)


def test_unknown_genes_are_ignored_and_counted(model_dir):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model_dir)
    gex = ad.read_h5ad(shared_file(TEST_MOD1))[:10].copy()
    extra = ad.AnnData(X=sp.csr_matrix(np.full((10, 2), 3.0)), obs=pd.DataFrame(index=gex.obs_names), var=pd.DataFrame(index=["NotAGene1", "NotAGene2"]))
    gex_plus = ad.concat([ad.AnnData(X=sp.csr_matrix(gex.layers["counts"]), obs=gex.obs[[]], var=gex.var[[]]), extra], axis=1)
    out = tr.predict_anndata(gex_plus, "gex2atac")
    assert out.uns["cell_translation"]["unknown_genes"] == 2 and out.n_obs == 10


def test_predict_refuses_bad_input_with_one_line(model_dir, tmp_path, capsys):
    import predict

    def run(*args):
        try:
            code = predict.main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "t5"}))
    cases = [
        (["--model", str(broken), "--input", str(shared_file(TEST_MOD1)), "--direction", "gex2atac", "--output", str(tmp_path / "a.h5ad")], "lacks"),
        (["--model", str(model_dir), "--input", str(tmp_path / "missing.h5ad"), "--direction", "gex2atac", "--output", str(tmp_path / "b.h5ad")], "does not exist"),
        (["--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)), "--direction", "rna2atac", "--output", str(tmp_path / "c.h5ad")], "invalid choice"),
        (["--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)), "--direction", "atac2gex", "--output", str(tmp_path / "d.h5ad")], "not the ATAC modality"),
        (["--model", str(model_dir), "--input", str(shared_file(TEST_MOD1)), "--direction", "gex2atac", "--output", str(tmp_path / "e.h5ad"),
          "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    ]
    for args, message in cases:
        result = run(*args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("*.h5ad"))


def test_pickle_weights_are_refused(model_dir, tmp_path):
    from translator import CellTranslator

    folder = tmp_path / "pickled"
    folder.mkdir()
    for p in model_dir.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            (folder / p.name).write_bytes(p.read_bytes())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        CellTranslator.from_pretrained(folder)


def test_api_rejects_empty_sentences_and_unknown_directions(model_dir):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="empty"):
        tr.translate([""], "gex2atac")
    with pytest.raises(ValueError, match="direction"):
        tr.translate(["CD74"], "rna2atac")


@pytest.mark.parametrize("direction, single", [("gex2atac", "rna"), ("atac2gex", "atac")])
def test_a_combined_file_gives_the_sentences_of_its_single_modality_file(model_dir, direction, single):
    from translator import CellTranslator
    from translator.anndata_io import source_sentences_from_anndata

    meta = CellTranslator.from_pretrained(model_dir).meta
    # The combined file is split for the source modality only (the other one's entries are skipped, not copied).
    combined = source_sentences_from_anndata(shared_file(BMMC_COMBINED), direction, meta)
    alone = source_sentences_from_anndata(shared_file(f"bmmc_starter/openproblems_bmmc_multiome_starter.{single}.h5ad"), direction, meta)
    assert combined[0] == alone[0] and len(combined[0]) == 500 and sum(map(len, combined[0])) > 0
    assert combined[2] == alone[2]


def test_recalibrate_is_the_last_stage_of_train_py_and_upgrades_an_old_folder(model_dir, tmp_path):
    """`python -m translator.recalibrate` refits exactly what train.py fitted; a folder without profile_depth gains it."""
    import shutil

    from translator.recalibrate import recalibrate

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    trained = json.loads((folder / "readout.json").read_text())
    assert "profile_depth" in trained["calibration"]["gex2atac"]["validation_rmse"]
    old = json.loads(json.dumps(trained))  # a folder written before profile_depth: its calibration knew three aggregations
    del old["calibration"]["gex2atac"]["validation_rmse"]["profile_depth"]
    old["calibration"]["gex2atac"].update(aggregation="noisy_or", coef=[1.0, 0.0], intercept=0.0)
    (folder / "readout.json").write_text(json.dumps(old))
    summary = recalibrate(folder, model_dir.parent / "data")
    assert json.loads((folder / "readout.json").read_text()) == trained  # the same fits on the same cells, to the bit
    assert summary["gex2atac"]["before"] == "noisy_or" and summary["gex2atac"]["after"] == trained["calibration"]["gex2atac"]["aggregation"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    recalibrate(folder, model_dir.parent / "data", aggregations=["noisy_or", "sum", "profile"])  # the same folder without profile_depth
    restricted = json.loads((folder / "readout.json").read_text())["calibration"]
    assert set(restricted["gex2atac"]["validation_rmse"]) == {"noisy_or", "sum", "profile"}
    assert restricted["gex2atac"]["validation_rmse"]["profile"] == trained["calibration"]["gex2atac"]["validation_rmse"]["profile"]
    recalibrate(folder, model_dir.parent / "data", selection_parts=0)  # the in-sample choice, as folders trained with --calibration_selection_parts 0
    in_sample = json.loads((folder / "readout.json").read_text())["calibration"]
    for direction, params in in_sample.items():
        assert params["selection"] == "in-sample" and "validation_rmse_cross_fitted" not in params
        assert params["aggregation"] == min(params["validation_rmse"], key=params["validation_rmse"].get)
        assert params["validation_rmse"] == trained["calibration"][direction]["validation_rmse"]
        assert trained["calibration"][direction]["selection"].startswith("cross-fitted")
    # --pool: the same model reading the same cells a second time doubles every cell: the pooled fit sees each twice
    pooled_summary = recalibrate(folder, model_dir.parent / "data", selection_parts=0, pool=[(model_dir, model_dir.parent / "data")])
    pooled = json.loads((folder / "readout.json").read_text())["calibration"]
    for direction, params in pooled.items():
        n = in_sample[direction]["n_cells"]
        assert params["n_cells"] == 2 * n and params["pooled_cells"] == [n, n]
        assert params["pooled_from"] == [[folder.name, "data"], [model_dir.name, "data"]]
        assert params["aggregation"] == in_sample[direction]["aggregation"] == pooled_summary[direction]["after"]
        assert params["validation_rmse"] == pytest.approx(in_sample[direction]["validation_rmse"], rel=1e-6)  # duplicated cells: the same fit
        assert "pooled_cells" not in in_sample[direction]


def test_recalibrate_refuses_bad_input_with_one_line(model_dir, tmp_path, capsys):
    import shutil

    from tests.conftest import run_in_process
    from tests.translator_fixtures import make_dataset_and_tokenizer
    from translator.recalibrate import cli

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = (folder / "readout.json").read_bytes()
    other, _ = make_dataset_and_tokenizer(tmp_path / "other", n_cells=40)
    cases = [
        (["--model", str(tmp_path / "missing"), "--dataset_dir", str(model_dir.parent / "data")], "--model"),
        (["--model", str(folder), "--dataset_dir", str(other)], "--dataset_dir"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--calibration_cells", "0"], "--calibration_cells"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--aggregations", "depth"], "--aggregations"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--selection_parts", "1"], "--selection_parts"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--selection_repeats", "0"], "--selection_repeats"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--pool", str(tmp_path / "missing"), str(model_dir.parent / "data")], "--pool"),
        (["--model", str(folder), "--dataset_dir", str(model_dir.parent / "data"), "--pool", str(model_dir), str(other)], "--pool"),
    ]
    for i, (args, flag) in enumerate(cases):
        if i == 0:  # the command line itself once; the other cases run its cli() in this process
            result = subprocess.run([sys.executable, "-m", "translator.recalibrate", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        else:
            result = run_in_process(cli, args, capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr[-2000:]
    assert (folder / "readout.json").read_bytes() == before  # untouched
