"""Model side: bad input to train.py, predict.py, eval.py and the translator API.

One tiny model (2 steps) on a synthetic dataset serves the whole module. Every refusal is checked for a
one-line message naming the flag or file, exit code 2 for the CLIs, and no output left behind; the cases
handled without refusal (unknown genes, another peak set, all-zero cells) are checked for their counts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tests.conftest import REPO
from tests.test_train import ENV
from tests.translator_fixtures import make_dataset, make_dataset_and_tokenizer, tiny_args

SMALL = {"n_cells": 60, "n_genes": 20, "n_peaks": 30}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset, tokenizer, model folder, a dataset of other genes, a GEX .h5ad, an ATAC .h5ad) for the whole module."""
    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_model")
    data, tok = make_dataset_and_tokenizer(root, **SMALL)
    other = make_dataset(root / "other_data", n_cells=60, n_genes=24, n_peaks=30)  # another vocabulary
    model = root / "model"
    assert train.main(_tiny(data, tok, model, blend=True)) == 0  # the shipped predictor, blend included
    meta = json.loads((model / "cell_sentences.json").read_text())
    rng = np.random.default_rng(0)
    gex = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, size=(6, len(meta["genes"]))).astype(np.float32)),
                     obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]), var=pd.DataFrame(index=meta["genes"]))
    gex.write_h5ad(root / "gex.h5ad")
    atac = ad.AnnData(X=sp.csr_matrix((rng.random((6, len(meta["peaks"]))) < 0.3).astype(np.float32)),
                      obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]), var=pd.DataFrame(index=meta["peaks"]))
    atac.write_h5ad(root / "atac.h5ad")
    return {"data": data, "tok": tok, "model": model, "other": other, "gex": gex, "atac": atac, "root": root}


def _tiny(data: Path, tok: Path, out: Path, *extra: str, blend: bool = False) -> list[str]:
    return tiny_args(data, tok, out, "--max_steps", "2", "--checkpointing_steps", "0", "--calibration_cells", "8",
                     "--max_eval_cells", "8", *extra, blend=blend)


def _cli(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of an in-process CLI (argparse exits included)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _one_line(code: int, lines: list[str], *words: str) -> None:
    errors = [line for line in lines if line.startswith("error:")]  # progress bars may precede the error
    assert code == 2, lines
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    for word in words:
        assert word in errors[0], errors


def _copy_without(model: Path, dest: Path, *names: str) -> Path:
    dest.mkdir()
    for path in model.iterdir():
        if path.is_file() and path.name not in names:
            shutil.copy(path, dest / path.name)
    return dest


# -- a dataset built for another tokenizer ---------------------------------------------------------------

def test_train_cli_refuses_a_dataset_of_another_vocabulary(setup, tmp_path):
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "train.py", *_tiny(setup["other"], setup["tok"], out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "another vocabulary" in lines[0] and "other_data" in lines[0] and "python -m tokenizer" in lines[0]
    assert not out.exists()  # refused before anything was written


def test_eval_refuses_a_dataset_of_another_vocabulary(setup, tmp_path, capsys):
    import eval as eval_cli

    out = tmp_path / "eval"
    code, lines = _cli(eval_cli.cli, ["--model", str(setup["model"]), "--dataset_dir", str(setup["other"]),
                                      "--output_dir", str(out), "--baselines", "--no_plots"], capsys)
    _one_line(code, lines, "its genes (20) differ from the dataset", "same features")
    assert not out.exists()


# -- model folders with files missing, pickle weights -------------------------------------------------------

@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "cell_sentences.json", "config.json"])
def test_model_folder_with_a_file_missing_is_refused(setup, tmp_path, capsys, missing):
    import eval as eval_cli
    import predict
    from translator import CellTranslator

    broken = _copy_without(setup["model"], tmp_path / "broken", missing)
    with pytest.raises(FileNotFoundError, match=f"lacks {missing}"):
        CellTranslator.from_pretrained(broken)
    output = tmp_path / "pred.h5ad"
    code, lines = _cli(predict.main, ["--model", str(broken), "--input", str(setup["root"] / "gex.h5ad"),
                                      "--direction", "gex2atac", "--output", str(output)], capsys)
    _one_line(code, lines, str(broken), missing)
    assert not output.exists() and not list(tmp_path.glob(".pred*"))
    code, lines = _cli(eval_cli.cli, ["--model", str(broken), "--dataset_dir", str(setup["data"]),
                                      "--output_dir", str(tmp_path / "eval"), "--baselines", "--no_plots"], capsys)
    _one_line(code, lines, missing)
    assert not (tmp_path / "eval").exists()


def test_missing_model_folder_is_refused(tmp_path):
    from translator import CellTranslator

    with pytest.raises(FileNotFoundError, match="not found"):
        CellTranslator.from_pretrained(tmp_path / "no_such_model")


def test_pickle_weights_load_only_when_asked(setup, tmp_path, capsys):
    import predict
    from translator import CellTranslator

    pickled = _copy_without(setup["model"], tmp_path / "pickled", "model.safetensors")
    reference = CellTranslator.from_pretrained(setup["model"])
    torch.save(reference.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights"):
        CellTranslator.from_pretrained(pickled)
    argv = ["--model", str(pickled), "--input", str(setup["root"] / "gex.h5ad"), "--direction", "gex2atac",
            "--output", str(tmp_path / "pred.h5ad")]
    code, lines = _cli(predict.main, argv, capsys)
    _one_line(code, lines, "pickle", "--allow_pickle")
    assert not (tmp_path / "pred.h5ad").exists()
    assert _cli(predict.main, [*argv, "--allow_pickle"], capsys)[0] == 0  # the user asked: loaded, same predictions
    expected = reference.predict_anndata(setup["gex"], "gex2atac")
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "pred.h5ad").X, expected.X, rtol=1e-5, atol=1e-6)
    # eval.py: refused the same way, loaded with --allow_pickle
    import eval as eval_cli

    eval_argv = ["--model", str(pickled), "--dataset_dir", str(setup["data"]), "--output_dir", str(tmp_path / "eval"),
                 "--baselines", "--no_plots", "--no_update_model_folder", "--directions", "gex2atac"]
    code, lines = _cli(eval_cli.cli, eval_argv, capsys)
    _one_line(code, lines, "pickle", "--allow_pickle")
    assert not (tmp_path / "eval").exists()
    assert _cli(eval_cli.cli, [*eval_argv, "--allow_pickle"], capsys)[0] == 0
    assert (tmp_path / "eval" / "eval_results.json").exists()


# -- empty sentences ----------------------------------------------------------------------------------------

def test_empty_sentences(setup):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    genes = tr.meta["genes"]
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        tr.translate([genes[0], "  "], "gex2atac")
    with pytest.raises(ValueError, match="not one string"):
        tr.translate(f"{genes[0]} {genes[1]}", "gex2atac")
    with pytest.raises(ValueError, match="direction 'rna2atac' is unknown"):
        tr.predict_matrix([genes[0]], "rna2atac")
    # predict_matrix keeps all-zero cells: an empty sentence is predicted from the direction prefix alone.
    matrix = tr.predict_matrix(["", genes[0]], "gex2atac")
    assert matrix.shape == (2, len(tr.meta["peaks"])) and np.isfinite(matrix).all()
    unknown_only = tr.predict_matrix(["NotAGene OtherUnknown"], "gex2atac")
    assert tr.last_stats["unknown_source_names"] == 2
    np.testing.assert_allclose(unknown_only[0], matrix[0], rtol=1e-5, atol=1e-6)  # batch padding changes float sums


# -- invalid CLI values ---------------------------------------------------------------------------------------

TRAIN_BAD_FLAGS = [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1"),
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be >= 1"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1"),
    (["--learning_rate", "-1"], "--learning_rate must be a positive number"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number"),
    (["--max_source_length", "0"], "--max_source_length must be >= 1"),
    (["--max_target_length", "-4"], "--max_target_length must be >= 1"),
    (["--logging_steps", "0"], "--logging_steps must be >= 1"),
    (["--checkpointing_steps", "-1"], "--checkpointing_steps must be >= 0"),
    (["--warmup_steps", "-2"], "--warmup_steps must be >= 0, or -1 for the automatic choice"),
    (["--calibration_cells", "-1"], "--calibration_cells must be >= 0"),
    (["--calibration_selection_parts", "1"], "--calibration_selection_parts must be 0 (in-sample) or at least 2"),
    (["--calibration_selection_repeats", "0"], "--calibration_selection_repeats must be at least 1"),
    (["--dropout_rate", "1.5"], "--dropout_rate must be in [0, 1)"),
    (["--gex_source_truncation", "1"], "--gex_source_truncation must be in [0, 1)"),
    (["--gex_source_downsample", "-0.1"], "--gex_source_downsample must be in [0, 1)"),
    (["--mixed_precision", "fp8"], "--mixed_precision 'fp8' is unknown"),
    (["--model_size", "huge"], "--model_size 'huge' is unknown"),
    (["--directions", "gex2rna"], "--directions"),
    (["--max_steps", "-5", "--num_train_epochs", "0"], "--num_train_epochs > 0"),
]


@pytest.mark.parametrize(("flags", "message"), TRAIN_BAD_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_BAD_FLAGS])
def test_train_refuses_invalid_values(setup, tmp_path, flags, message):
    import train

    out = tmp_path / "model"
    with pytest.raises(ValueError) as err:
        train.main(_tiny(setup["data"], setup["tok"], out, *flags))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_train_accepts_negative_max_steps_as_use_epochs_and_parses_errors_in_one_line(setup, tmp_path, capsys):
    import train

    args = train.parse_args(_tiny(setup["data"], setup["tok"], tmp_path / "m", "--max_steps", "-5"))
    train.check_args(*args)  # -5 means: train for --num_train_epochs
    code, lines = _cli(train.main, _tiny(setup["data"], setup["tok"], tmp_path / "m", "--max_steps", "abc"), capsys)
    _one_line(code, lines, "--max_steps", "abc")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--direction", "rna2atac"], "invalid choice: 'rna2atac'"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--output_csv"], "unrecognized arguments"),
])
def test_predict_refuses_invalid_values(setup, tmp_path, capsys, flags, message):
    import predict

    argv = ["--model", str(setup["model"]), "--input", str(setup["root"] / "gex.h5ad"), "--direction", "gex2atac",
            "--output", str(tmp_path / "pred.h5ad"), *flags]
    _one_line(*_cli(predict.main, argv, capsys), message)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("flags", "message"), [
    (["--directions", "rna2atac"], "invalid choice: 'rna2atac'"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--max_cells", "-3"], "--max_cells must be positive"),
    (["--krr_landmarks", "0"], "--krr_landmarks must be >= 1"),
    (["--bootstrap", "-5"], "--bootstrap must be 0 (off) or a number of resamples"),
    (["--split", "dev"], "invalid choice: 'dev'"),
])
def test_eval_refuses_invalid_values(setup, tmp_path, capsys, flags, message):
    import eval as eval_cli

    argv = ["--model", str(setup["model"]), "--dataset_dir", str(setup["data"]), "--output_dir", str(tmp_path / "eval"), *flags]
    _one_line(*_cli(eval_cli.cli, argv, capsys), message)
    assert not (tmp_path / "eval").exists()


def test_eval_missing_dataset_is_one_line(tmp_path, capsys):
    import eval as eval_cli

    code, lines = _cli(eval_cli.cli, ["--skip_model", "--dataset_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "e")], capsys)
    _one_line(code, lines, "nope")


def test_a_truncated_cell_sentences_json_is_one_line_saying_rebuild(tmp_path, capsys):
    import eval as eval_cli
    from tokenizer.__main__ import main as tokenizer_cli

    made = make_dataset(tmp_path / "made", n_cells=20, n_genes=8, n_peaks=9)
    # A copy of the dataset whose cell_sentences.json is cut short, as an interrupted copy leaves it.
    data = Path(shutil.copytree(made, tmp_path / "data", ignore=shutil.ignore_patterns("cell_sentences.json")))
    meta = data / "cell_sentences.json"
    text = (made / "cell_sentences.json").read_text()
    meta.write_text(text[: len(text) // 2])
    code, lines = _cli(tokenizer_cli, ["--dataset", str(data), "--output_dir", str(tmp_path / "tok")], capsys)
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    assert str(meta) in errors[0] and "rebuild it with `python -m dataset_builder" in errors[0]
    assert not (tmp_path / "tok").exists()
    code, lines = _cli(eval_cli.cli, ["--skip_model", "--dataset_dir", str(data), "--output_dir", str(tmp_path / "e")], capsys)
    _one_line(code, lines, str(meta), "rebuild it")


def test_a_model_folder_with_a_truncated_json_is_one_line(setup, tmp_path, capsys):
    import predict

    broken = _copy_without(setup["model"], tmp_path / "broken", "cell_sentences.json")
    text = (setup["model"] / "cell_sentences.json").read_text()
    (broken / "cell_sentences.json").write_text(text[: len(text) // 2])
    output = tmp_path / "pred.h5ad"
    argv = ["--model", str(broken), "--input", str(setup["root"] / "gex.h5ad"), "--direction", "gex2atac", "--output", str(output)]
    _one_line(*_cli(predict.main, argv, capsys), str(broken / "cell_sentences.json"), "copy or download it again")
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


# -- output folders that exist ----------------------------------------------------------------------------------

def test_train_refuses_an_existing_output_dir_unless_told(setup, tmp_path):
    import train

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("previous work")
    with pytest.raises(ValueError, match="is not a model folder"):
        train.main(_tiny(setup["data"], setup["tok"], out))
    assert (out / "keep.txt").read_text() == "previous work"
    with pytest.raises(ValueError, match="is not a model folder"):  # not this tool's: never replaced
        train.main(_tiny(setup["data"], setup["tok"], out, "--overwrite_output_dir"))
    assert (out / "keep.txt").read_text() == "previous work"
    shutil.copytree(setup["model"], tmp_path / "again")
    assert train.main(_tiny(setup["data"], setup["tok"], tmp_path / "again", "--overwrite_output_dir")) == 0
    assert (tmp_path / "again" / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):  # this tool's folder: replaced only when asked
        train.main(_tiny(setup["data"], setup["tok"], tmp_path / "again"))


def test_predict_refuses_an_existing_output_unless_told(setup, tmp_path, capsys):
    import predict

    output = tmp_path / "pred.h5ad"
    output.write_bytes(b"previous")
    argv = ["--model", str(setup["model"]), "--input", str(setup["root"] / "gex.h5ad"), "--direction", "gex2atac", "--output", str(output)]
    _one_line(*_cli(predict.main, [*argv, "--overwrite"], capsys), str(output), "not a prediction file")  # not ours: never replaced
    assert output.read_bytes() == b"previous"
    output.unlink()
    assert _cli(predict.main, argv, capsys)[0] == 0
    _one_line(*_cli(predict.main, argv, capsys), str(output), "--overwrite")
    assert _cli(predict.main, [*argv, "--overwrite"], capsys)[0] == 0
    assert ad.read_h5ad(output).shape == (6, len(setup["atac"].var_names))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad"]  # no temporary left behind


# -- inputs that share too few features with the model ---------------------------------------------------------

def _renamed(adata: ad.AnnData, names: list[str], **var_columns: list[str]) -> ad.AnnData:
    return ad.AnnData(X=adata.X.copy(), obs=adata.obs[[]].copy(), var=pd.DataFrame(var_columns, index=names))


@pytest.mark.parametrize(("case", "direction", "words"), [
    ("lower_case", "gex2atac", ["0 of the model's 20 genes", "if case were ignored", "var_names"]),
    ("ensembl_ids", "gex2atac", ["0 of the model's 20 genes", "Ensembl id", "gene symbols"]),
    ("ensembl_ids_symbols_in_var", "gex2atac", ["0 of the model's 20 genes", "var['gene_symbols'] names 20 of them",
                                                "adata.var_names = adata.var['gene_symbols']"]),
    ("peaks_without_chr", "atac2gex", ["0 of the model's 30 peaks", "lack the 'chr' prefix", "'chr' + adata.var_names"]),
    ("other_regions", "atac2gex", ["0 of the model's 30 peaks", "genome assembly"]),
])
def test_predict_refuses_an_input_sharing_few_features_with_the_model(setup, tmp_path, capsys, case, direction, words):
    import predict

    gex, atac = setup["gex"], setup["atac"]
    source = {
        "lower_case": lambda: _renamed(gex, [g.lower() for g in gex.var_names]),
        "ensembl_ids": lambda: _renamed(gex, [f"ENSG{i:011d}" for i in range(gex.n_vars)]),
        "ensembl_ids_symbols_in_var": lambda: _renamed(gex, [f"ENSG{i:011d}" for i in range(gex.n_vars)],
                                                       gene_symbols=list(gex.var_names)),
        "peaks_without_chr": lambda: _renamed(atac, [p.removeprefix("chr") for p in atac.var_names]),
        "other_regions": lambda: _renamed(atac, [f"chr7-{100 * i}-{100 * i + 50}" for i in range(atac.n_vars)]),
    }[case]()
    source.write_h5ad(tmp_path / "cells.h5ad")
    before = (tmp_path / "cells.h5ad").read_bytes()
    output = tmp_path / "pred.h5ad"
    argv = ["--model", str(setup["model"]), "--input", str(tmp_path / "cells.h5ad"), "--direction", direction, "--output", str(output)]
    _one_line(*_cli(predict.main, argv, capsys), "cells.h5ad", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]  # no output, no temporary file
    assert (tmp_path / "cells.h5ad").read_bytes() == before


def test_an_input_with_half_the_genes_is_predicted_with_a_warning_and_counted(setup, tmp_path, caplog):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    gex = setup["gex"]
    half = gex[:, : gex.n_vars // 2].copy()
    caplog.set_level("INFO")
    out = tr.predict_anndata(half, "gex2atac")
    stats = out.uns["cell_translation"]
    assert (stats["model_features"], stats["model_features_found"]) == (gex.n_vars, gex.n_vars // 2)
    assert f"has {gex.n_vars // 2} of the model's {gex.n_vars} genes ({gex.n_vars - gex.n_vars // 2} missing)" in caplog.text
    complete = tr.predict_anndata(gex, "gex2atac").uns["cell_translation"]
    assert complete["model_features_found"] == complete["model_features"] == gex.n_vars
    assert f"has all {gex.n_vars} of the model's genes" in caplog.text
    with pytest.raises(ValueError, match=f"has only {gex.n_vars // 2 - 1} of the model's {gex.n_vars} genes"):
        tr.predict_anndata(gex[:, : gex.n_vars // 2 - 1].copy(), "gex2atac")


def test_cells_without_a_batch_label_are_predicted_and_keep_it_missing(setup, tmp_path, capsys):
    import predict

    gex = setup["gex"].copy()
    gex.obs["batch"] = pd.Categorical(["s1", None, "s2", "s1", None, "s2"])
    gex.write_h5ad(tmp_path / "cells.h5ad")
    output = tmp_path / "pred.h5ad"
    argv = ["--model", str(setup["model"]), "--input", str(tmp_path / "cells.h5ad"), "--direction", "gex2atac", "--output", str(output)]
    assert _cli(predict.main, argv, capsys)[0] == 0
    batch = ad.read_h5ad(output).obs["batch"]
    assert batch.isna().tolist() == [False, True, False, False, True, False]  # missing, not a label 'nan'
    assert batch.dropna().tolist() == ["s1", "s2", "s1", "s2"]


def test_a_broad_input_peak_reaches_every_model_peak_it_overlaps(setup, caplog):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    atac = setup["atac"]
    model_peaks = list(atac.var_names)
    # One broad input peak over each pair of neighbouring model peaks (0-1, 2-3, ...) of a chromosome.
    pairs = [(i, i + 1) for i in range(0, len(model_peaks) - 1, 2) if model_peaks[i].split("-")[0] == model_peaks[i + 1].split("-")[0]]
    broad = [f"{model_peaks[a].rsplit('-', 2)[0]}-{model_peaks[a].split('-')[1]}-{model_peaks[b].split('-')[2]}" for a, b in pairs]
    opened = (np.random.default_rng(3).random((atac.n_obs, len(pairs))) < 0.5).astype(np.float32)
    opened[0] = 1  # at least one cell with every broad peak open
    caplog.set_level("WARNING")
    out = tr.predict_anndata(ad.AnnData(X=sp.csr_matrix(opened), obs=atac.obs[[]], var=pd.DataFrame(index=broad)), "atac2gex")
    stats = out.uns["cell_translation"]
    reached = 2 * len(pairs)
    assert (stats["mapped_peaks"], stats["model_features_found"], stats["model_features"]) == (len(pairs), reached, len(model_peaks))
    if reached < len(model_peaks):
        assert f"overlap {reached} of the model's {len(model_peaks)} peaks ({len(model_peaks) - reached} reached by no input peak)" in caplog.text
    # The same cells given on the model's own peaks, both peaks of a pair open where the broad peak is.
    own = np.zeros((atac.n_obs, len(model_peaks)), dtype=np.float32)
    for k, (a, b) in enumerate(pairs):
        own[:, a] = own[:, b] = opened[:, k]
    expected = tr.predict_anndata(ad.AnnData(X=sp.csr_matrix(own), obs=atac.obs[[]], var=pd.DataFrame(index=model_peaks)), "atac2gex")
    np.testing.assert_allclose(out.X, expected.X, rtol=1e-5, atol=1e-6)


# -- handled, not refused -----------------------------------------------------------------------------------------

def test_unknown_genes_are_ignored_and_counted(setup, caplog):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    gex = setup["gex"]
    extra = ad.AnnData(X=sp.csr_matrix(np.full((gex.n_obs, 3), 4.0, dtype=np.float32)), obs=gex.obs[[]],
                       var=pd.DataFrame(index=["NotAGene1", "NotAGene2", "NotAGene3"]))
    caplog.set_level("WARNING")
    out = tr.predict_anndata(ad.concat([gex, extra], axis=1), "gex2atac")
    assert out.uns["cell_translation"]["unknown_genes"] == 3 and out.n_obs == gex.n_obs
    assert "3 of" in caplog.text and "unknown to the model" in caplog.text


def test_peaks_of_another_peak_set_are_mapped_by_overlap(setup, caplog):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    atac = setup["atac"]
    shifted = [f"{c}:{int(s) + 100}-{int(e) + 100}" for c, s, e in (n.split("-") for n in atac.var_names)]
    counts = sp.hstack([atac.X, sp.csr_matrix(np.ones((atac.n_obs, 2), dtype=np.float32))]).tocsr()
    other = ad.AnnData(X=counts, obs=atac.obs[[]], var=pd.DataFrame(index=[*shifted, "chr9-5-50", "chrX-1-20"]))
    caplog.set_level("WARNING")
    out = tr.predict_anndata(other, "atac2gex")
    stats = out.uns["cell_translation"]
    assert stats["mapped_peaks"] == atac.n_vars and stats["unmapped_peaks"] == 2
    assert stats["model_features_found"] == stats["model_features"] == atac.n_vars
    assert "2 of" in caplog.text and "overlap no model peak" in caplog.text
    np.testing.assert_allclose(out.X, tr.predict_anndata(atac, "atac2gex").X, rtol=1e-5, atol=1e-6)


def test_all_zero_cells_are_kept_and_counted(setup):
    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(setup["model"])
    gex = setup["gex"].copy()
    x = gex.X.toarray()
    x[2] = 0
    gex.X = sp.csr_matrix(x)
    out = tr.predict_anndata(gex, "gex2atac", precision="float32")  # float32: a cell's values do not depend on its batch
    assert out.n_obs == gex.n_obs and list(out.obs_names) == list(gex.obs_names)
    assert out.uns["cell_translation"]["empty_cells"] == 1 and np.isfinite(out.X).all()
    np.testing.assert_allclose(out.X[2], tr.predict_matrix([""], "gex2atac", precision="float32")[0], rtol=1e-5, atol=1e-6)


# -- safety of what train.py writes ---------------------------------------------------------------------------------

def test_model_folder_holds_only_safetensors_and_no_absolute_paths(setup):
    model = setup["model"]
    files = {p.name for p in model.rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "auto_map" not in json.loads((model / "config.json").read_text())  # loads without trust_remote_code
    for name in ("training_args.json", "README.md", "readout.json", "config.json"):
        text = (model / name).read_text()
        assert str(setup["root"]) not in text and str(Path.home()) not in text and "/tmp/" not in text, name
