"""eval.py end to end on the simulated default dataset: files, keys, plots, model-index merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import yaml

import eval as eval_cli
from dataset_builder.records import load_split_matrices, sentence_matrix
from dataset_builder.sentences import gex_sentences
from evaluation.runner import portable_command, run_evaluation
from translator.api import device_name, resolve_device
from translator.card import merge_model_index
from translator.metrics_core import METRIC_KEYS, metric_keys

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_BASELINES = ("zeros", "mean", "svd_knn")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "dataset"
    subprocess.run([sys.executable, "-m", "dataset_builder", "--output_dir", str(out)], cwd=REPO, check=True, capture_output=True)
    return out


def oracle_predictor(dataset_dir: Path, split: str, noise: float = 0.0, binary: bool = False):
    """A stand-in model: looks the truth up by source sentence, adds noise, returns sentences too.

    With ``binary`` it only knows binary-encoded GEX sentences (as the paper's seed model), so a
    KeyError shows that eval.py did not re-encode its source sentences.
    """
    data = load_split_matrices(dataset_dir, split)
    sources = gex_sentences(data["gex_ranking"], data["genes"], gex_encoding="binary").to_pylist() if binary else data["gex_text"]
    lookup = {
        "gex2atac": {s: i for i, s in enumerate(sources)},
        "atac2gex": {s: i for i, s in enumerate(data["atac_text"])},
    }
    rng = np.random.default_rng(0)
    calls = []

    def predict(sentences, direction):
        calls.append((direction, len(sentences)))
        rows = [lookup[direction][s] for s in sentences]
        target = data["atac" if direction == "gex2atac" else "gex"][rows].toarray()
        matrix = np.clip(target + noise * rng.standard_normal(target.shape), 0, 1 if direction == "gex2atac" else None)
        names = data["peaks" if direction == "gex2atac" else "genes"]
        generated = [" ".join(names[j] for j in np.flatnonzero(row)) for row in target]
        return matrix.astype(np.float32), generated

    predict.calls = calls
    return predict


def test_load_split_matrices_follows_the_contract(dataset_dir):
    data = load_split_matrices(dataset_dir, "test")
    meta = json.loads((dataset_dir / "cell_sentences.json").read_text())
    n = meta["splits"]["test"]
    assert data["gex"].shape == (n, len(meta["genes"])) and data["atac"].shape == (n, len(meta["peaks"]))
    assert sp.issparse(data["gex"]) and sp.issparse(data["atac"])
    assert set(np.unique(data["atac"].data)) <= {1.0}
    # the rank sentence lists the detected genes: same set as the non-zero GEX entries
    genes = np.asarray(meta["genes"])
    first = data["gex"][0].indices
    assert set(data["gex_text"][0].split()) <= set(genes[first])
    assert set(data["atac_text"][0].split()) == set(np.asarray(meta["peaks"])[data["atac"][0].indices])
    assert len(data["cells"]) == n and data["cell_type"] is not None
    small = load_split_matrices(dataset_dir, "test", max_cells=7)
    assert small["gex"].shape[0] == 7
    binary = gex_sentences(data["gex_ranking"], meta["genes"], gex_encoding="binary", threshold=2.0).to_pylist()
    for i, sentence in enumerate(binary[:3]):
        row = data["gex"][i].toarray().ravel()
        assert sentence.split() == [meta["genes"][j] for j in np.flatnonzero(row >= 2.0)]
    with pytest.raises(ValueError, match="not in cell_sentences.json"):
        import pyarrow as pa

        sentence_matrix(pa.array(["chrX-1-2"]), meta["peaks"], "atac_text")
    with pytest.raises(FileNotFoundError, match="cell_sentences.json"):
        load_split_matrices(dataset_dir / "missing", "test")


def test_run_evaluation_writes_every_file_and_key(dataset_dir, tmp_path):
    out = tmp_path / "eval"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    results = run_evaluation(
        model=None, dataset_dir=dataset_dir, split="test", output_dir=out, predictor=oracle_predictor(dataset_dir, "test", 0.1),
        seed_predictor=oracle_predictor(dataset_dir, "test", 0.3, binary=True), baselines=SMALL_BASELINES + ("svd_krr",), progress=False,
    )
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["dataset"] == "dataset" and saved["split"] == "test" and saved["n_cells"] == results["n_cells"] > 0
    for direction, target in (("gex2atac", "atac"), ("atac2gex", "gex")):
        block = saved["directions"][direction]
        methods = {"model": block["model"], **block["baselines"]}
        assert set(block["baselines"]) == {"zeros", "mean", "svd_knn", "svd_krr", "seed_binary"}
        for name, values in methods.items():
            assert set(metric_keys(target)) == set(values), (direction, name)
            assert all(isinstance(values[k], float) for k in METRIC_KEYS if k in values), (direction, name)
        # the near-perfect stand-in beats every baseline; the noisier one sits between
        assert block["model"]["rmse"] < block["baselines"]["seed_binary"]["rmse"] < block["baselines"]["zeros"]["rmse"]
        assert block["baselines"]["mean"]["rmse"] < block["baselines"]["zeros"]["rmse"]
        assert block["model"]["token_f1"] == pytest.approx(1.0)
        assert saved["details"][direction]["model"]["token_source"] == "sentences"
        assert set(saved["by_cell_type"][direction]["model"]) == set(load_split_matrices(dataset_dir, "test")["cell_type"])
        assert saved["baseline_settings"][direction]["svd_knn"]["k"] in (25, 50, 100, 200, 400)
    assert "accuracy_binary" in saved["accuracy_binary_definition"]
    assert not any(part.startswith("/") for part in saved["command"].split())
    assert saved["versions"]["numpy"] and saved["wall_time_s"] > 0
    table = (out / "eval_results.md").read_text()
    assert "| model |" in table and "| svd_krr |" in table and "GEX to ATAC" in table and "ATAC to GEX" in table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [f"{d}_{kind}.png" for d in ("gex2atac", "atac2gex") for kind in ("feature_means", "cell_example", "cell_type_rmse")]
        + ["gex2atac_roc_pr.png"]
    )
    for png in out.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png.name
    assert not list(tmp_path.glob(".eval.*")), "temporary output folder left behind"

    readme = model_dir / "README.md"
    readme.write_text("---\nlicense: mit\ntags:\n- single-cell\n---\n\n# My model\n\nBody text.\n")
    assert merge_model_index(readme, saved, model_name="my-model")
    text = readme.read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "mit" and front["tags"] == ["single-cell"]
    entries = front["model-index"][0]["results"]
    assert front["model-index"][0]["name"] == "my-model" and len(entries) == 2
    rmse = {m["type"]: m["value"] for m in entries[0]["metrics"]}["rmse"]
    assert rmse == pytest.approx(saved["directions"]["gex2atac"]["model"]["rmse"], abs=1e-6)
    assert text.endswith("# My model\n\nBody text.\n")
    merge_model_index(readme, saved, model_name="my-model")
    assert readme.read_text() == text, "merging twice must not change the card"


def test_bootstrap_says_how_firmly_the_model_leads(dataset_dir, tmp_path):
    """eval.py --bootstrap: a near-perfect model is first in every resample; a model no better than the mean (the
    mean plus tiny noise) is first in about half of them on RMSE, with a margin inside its bootstrap sd; the line
    lands in eval_results.md and in the report."""
    from evaluation.report import bootstrap_summary

    out = tmp_path / "boot"
    results = run_evaluation(None, dataset_dir, split="test", output_dir=out, predictor=oracle_predictor(dataset_dir, "test", 0.05),
                             baselines=("zeros", "mean"), progress=False, make_plots=False, bootstrap=300)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["bootstrap"] == json.loads(json.dumps(results["bootstrap"]))
    gex2atac = saved["bootstrap"]["gex2atac"]
    assert gex2atac["resamples"] == 300 and set(gex2atac["metrics"]) == {"rmse", "pearson_cell", "auroc_cell", "ap_cell"}
    assert set(saved["bootstrap"]["atac2gex"]["metrics"]) == {"rmse", "pearson_cell"}
    for direction, boot in saved["bootstrap"].items():
        for key, row in boot["metrics"].items():
            assert row["share_first"] == 1.0, (direction, key)
            assert set(row["versus"]) <= {"zeros", "mean"} and "mean" in row["versus"]
            point = saved["directions"][direction]
            assert row["versus"]["mean"]["difference"] == pytest.approx(point["model"][key] - point["baselines"]["mean"][key])
    assert "Paired bootstrap over the cells (300 resamples): the model is first in RMSE 100.0%" in (out / "eval_results.md").read_text()

    assert bootstrap_summary(saved, "atac2gex").startswith("Paired bootstrap over the cells (300 resamples)")
    assert bootstrap_summary(saved | {"bootstrap": {}}, "atac2gex") == ""


def test_paired_bootstrap_of_two_equally_good_methods_is_a_coin_flip():
    """Two predictions with noise of the same size: neither leads firmly; the margin sits inside two of its sds,
    and the resampled RMSEs centre on the point RMSE."""
    from translator.metrics_core import MetricAccumulator, paired_bootstrap

    rng = np.random.default_rng(5)
    truth = np.clip(rng.normal(1.0, 1.0, (300, 40)), 0, None).astype(np.float32)
    accs = {}
    for name in ("model", "other"):
        accs[name] = MetricAccumulator("gex", 300, 40)
        accs[name].update(np.clip(truth + rng.normal(0, 0.5, truth.shape), 0, None).astype(np.float32), sp.csr_matrix(truth))
    boot = paired_bootstrap(accs, resamples=500, seed=2)
    for key in ("rmse", "pearson_cell"):
        row = boot["metrics"][key]
        assert 0.02 < row["share_first"] < 0.98, key
        assert row["share_first"] == row["versus"]["other"]["share_ahead"]
        assert abs(row["versus"]["other"]["difference"]) < 3 * row["versus"]["other"]["sd"], key
    assert set(boot["metrics"]) == {"rmse", "pearson_cell"}  # AUROC and AP are ATAC metrics


def test_paired_bootstrap_refuses_unpaired_input():
    from translator.metrics_core import MetricAccumulator, paired_bootstrap

    truth = sp.csr_matrix((np.random.default_rng(0).random((6, 5)) > 0.5).astype(np.float32))
    full, half = MetricAccumulator("atac", 6, 5), MetricAccumulator("atac", 6, 5)
    full.update(np.full((6, 5), 0.5, np.float32), truth)
    half.update(np.full((3, 5), 0.5, np.float32), truth[:3])
    with pytest.raises(ValueError, match="same, complete set of cells"):
        paired_bootstrap({"model": full, "mean": half})
    with pytest.raises(ValueError, match="no method named 'model'"):
        paired_bootstrap({"mean": full})
    with pytest.raises(ValueError, match="at least 1 resample"):
        paired_bootstrap({"model": full}, resamples=0)


def test_cli_skip_model_one_direction_and_max_cells(dataset_dir, tmp_path):
    out = tmp_path / "cli"
    results = eval_cli.main(
        ["--skip_model", "--dataset_dir", str(dataset_dir), "--split", "validation", "--output_dir", str(out),
         "--directions", "atac2gex", "--max_cells", "40", "--baselines", *SMALL_BASELINES, "--no_plots"]
    )
    assert results["n_cells"] == 40 and list(results["directions"]) == ["atac2gex"]
    assert "model" not in results["directions"]["atac2gex"]
    assert set(results["directions"]["atac2gex"]["baselines"]) == set(SMALL_BASELINES)
    assert not list(out.glob("*.png")) and (out / "eval_results.md").exists()
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--dataset_dir", str(dataset_dir), "--output_dir", str(out)])


def test_errors_speak_to_the_user(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="directions"):
        run_evaluation(None, dataset_dir, skip_model=True, directions=["gex2rna"], baselines=())
    with pytest.raises(ValueError, match="split"):
        run_evaluation(None, dataset_dir, split="dev", skip_model=True, baselines=())

    def wrong_shape(sentences, direction):
        return np.zeros((len(sentences), 3), dtype=np.float32), None

    with pytest.raises(ValueError, match="expected"):
        run_evaluation(None, dataset_dir, predictor=wrong_shape, baselines=(), output_dir=None, progress=False)
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu" and device_name("cpu") == "cpu"
    assert portable_command(["eval.py", "--model", "/abs/path/model", "--output_dir=/x/y"]) == (
        "python eval.py --model model --output_dir=y"
    )


def test_tiny_trained_model_end_to_end(dataset_dir, tmp_path):
    """train.py (tiny, 2 steps) -> eval.py --model on the folder: model metrics and model-index in its README."""
    if not (REPO / "train.py").exists() or not (REPO / "translator" / "api.py").exists():
        pytest.skip("train.py / translator are not in this checkout")
    model_dir, tokenizer_dir = tmp_path / "tiny", tmp_path / "tokenizer"
    subprocess.run(
        [sys.executable, "-m", "tokenizer", "--dataset", str(dataset_dir), "--output_dir", str(tokenizer_dir)],
        cwd=REPO, check=True, capture_output=True,
    )
    subprocess.run(
        [sys.executable, "train.py", "--model_size", "tiny", "--max_steps", "2", "--dataset_dir", str(dataset_dir),
         "--output_dir", str(model_dir), "--tokenizer_dir", str(tokenizer_dir), "--no_evaluate", "--max_source_length", "32", "--max_target_length", "32",
         "--calibration_cells", "8", "--max_eval_cells", "8", "--eval_steps", "0", "--blend_folds", "0", "--no_blend"],
        cwd=REPO, check=True, capture_output=True,
    )
    out = tmp_path / "eval"
    results = eval_cli.main(
        ["--model", str(model_dir), "--dataset_dir", str(dataset_dir), "--split", "test", "--output_dir", str(out),
         "--max_cells", "12", "--baselines", "zeros", "mean", "--no_plots"]
    )
    for direction, target in (("gex2atac", "atac"), ("atac2gex", "gex")):
        values = results["directions"][direction]["model"]
        assert set(metric_keys(target)) == set(values)
        assert np.isfinite(values["rmse"])
    saved = json.loads((model_dir / "eval_results.json").read_text())
    assert saved["n_cells"] == 12
    assert saved["model_device"] == device_name(resolve_device("auto"))  # "cpu" here, "cuda:0 (its name)" on a GPU machine
    front = yaml.safe_load((model_dir / "README.md").read_text().split("---\n")[1])
    assert front["model-index"][0]["results"][0]["dataset"]["split"] == "test"


def test_model_ranks_and_headline_table_from_results():
    from evaluation.report import headline_table, model_ranks

    results = {"dataset": "d", "directions": {"gex2atac": {
        "model": {"rmse": 0.20, "pearson_cell": 0.5, "auroc_cell": 0.70, "ap_cell": 0.30},
        "baselines": {"mean": {"rmse": 0.21, "pearson_cell": 0.6, "auroc_cell": 0.70, "ap_cell": 0.20},
                      "zeros": {"rmse": 0.30, "pearson_cell": 0.0, "auroc_cell": 0.5, "ap_cell": 0.1}}}}}
    # a tie (AUROC 0.70) does not push the model down; a better baseline (Pearson 0.6) does
    assert model_ranks(results) == {"gex2atac": {"rmse": 1, "pearson_cell": 2, "auroc_cell": 1, "ap_cell": 1}}
    table = headline_table([results])
    assert "| d | gex2atac | model | **0.2000** | 0.5000 | **0.7000** | **0.3000** |" in table
    assert "| d | gex2atac | mean | 0.2100 | **0.6000** | **0.7000** | 0.2000 |" in table


def test_report_cli_runs_without_a_runpy_warning(tmp_path):
    """`python -m evaluation.report` (the README's command) prints the table; the package no longer imports the module first."""
    import subprocess
    import sys

    results = {"dataset": "d", "directions": {"atac2gex": {"model": {"rmse": 0.2, "pearson_cell": 0.5},
                                                           "baselines": {"mean": {"rmse": 0.3, "pearson_cell": 0.4}}}}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "evaluation.report", str(tmp_path / "r.json")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| d | atac2gex | model | **0.2000** | **0.5000** |" in done.stdout and "RuntimeWarning" not in done.stderr
