"""Smoke runs of every benchmark in bench/ at tiny sizes (--quick): they run, agree with themselves, write JSON.

No timing is asserted: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_file

sys.path.insert(0, str(REPO / "bench"))

import bench_build  # noqa: E402
import bench_common  # noqa: E402
import bench_growth  # noqa: E402
import bench_predict  # noqa: E402
import bench_step  # noqa: E402
import bench_stream  # noqa: E402
import bench_tokenize  # noqa: E402
import bench_train  # noqa: E402
import build_stages  # noqa: E402
import make_large  # noqa: E402
import paper_reference  # noqa: E402
import readout_diagnostics  # noqa: E402


def _results(tmp_path: Path, name: str) -> dict:
    data = json.loads((tmp_path / f"{name}.quick.json").read_text())
    assert data["quick"] is True and data["benchmark"] == name
    assert len(data["load_average_at_end"]) == 3 and "numpy" in data["versions"]
    return data


def test_paper_reference_matches_its_description(tmp_path):
    import numpy as np
    import scipy.sparse as sp

    gex = sp.csr_matrix(np.array([[0, 30, 1, 0], [5, 0, 0, 5], [0, 0, 0, 0]], dtype=np.float32))
    atac = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [0, 3, 0]], dtype=np.float32))
    out = paper_reference.paper_preprocess(gex, atac, ["g0", "g1", "g2", "g3"], ["p0", "p1", "p2"], tmp_path / "cells.txt")
    # Library sizes 31, 10, 0 -> median 10; log1p(30 / 3.1) >= 2 keeps g1 only; log1p(5 / 1) = 1.79 < 2 keeps none.
    assert out["cells"] == [{"gex": "g1", "atac": "p0 p2"}, {"gex": "", "atac": ""}, {"gex": "", "atac": "p1"}]
    lines = (tmp_path / "cells.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == out["cells"]


def test_make_large_writes_a_combined_h5ad_like_gse194122(tmp_path):
    import anndata as ad

    spec = make_large.LargeSpec(n_cells=300, n_genes=400, n_peaks=2_000, genes_per_cell=60.0, peaks_per_cell=150.0, chunk_cells=128)
    path = make_large.write_large(tmp_path / "large.h5ad", spec)
    adata = ad.read_h5ad(path)
    assert adata.shape == (300, 2_400)
    assert set(adata.var["feature_types"]) == {"GEX", "ATAC"}
    counts = adata.layers["counts"]
    assert counts.has_sorted_indices and counts.data.min() >= 1 and float(counts.data.max()).is_integer()
    gex = counts[:, : spec.n_genes]
    assert 40 < (gex > 0).sum(axis=1).mean() < 90
    assert adata.X.nnz == counts.nnz
    # Cached: the same spec reuses the file, another spec rebuilds it.
    mtime = path.stat().st_mtime_ns
    assert make_large.write_large(path, spec).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="outside the repository"):
        make_large.main(["--quick", "--output", str(REPO / "bench" / "x.h5ad")])


def test_bench_build_quick(tmp_path):
    shared_file("mop_snareseq/mop_snare.h5mu")
    figures = bench_build.main(["--quick", "--results_dir", str(tmp_path)])
    data = _results(tmp_path, "build")
    side = data["mop_side_by_side"]
    assert side["cells"] == 300 and side["binary_output_mismatching_cells"] == {"gex": 0, "atac": 0}
    assert side["ratio_binary_like_for_like"] > 1
    large = figures["large"]
    assert large["build"]["cells"] == make_large.LargeSpec.quick().n_cells and large["build"]["peak_rss_mb"] > 0
    assert large["arrow_bytes"] > 0 and large["io_floor"]["write_arrow"]["bytes"] >= large["arrow_bytes"]
    assert large["paper_dense_float64_bytes"] == 1_200 * 14_000 * 8


def test_build_stages_quick(tmp_path):
    from dataset_builder.simulate import write_simulated

    path = write_simulated(tmp_path / "sim.h5mu")
    figures = build_stages.main(["--input", str(path), "--test_batches", "sim4", "--quick", "--results_dir", str(tmp_path)])
    data = _results(tmp_path, "build_stages")
    steps = data["seconds"]
    assert set(steps) >= {"read_paired", "make_plan", "content_digest", "records (download_and_prepare)", "total"}
    assert steps["read_paired"] + steps["records (download_and_prepare)"] <= steps["total"]
    assert figures["peak_rss_gb"] > 0
    import dataset_builder.builder as builder

    assert not hasattr(builder.read_paired, "__wrapped__")  # the timers are removed afterwards


def test_bench_tokenize_quick(tmp_path):
    shared_file("mop_snareseq/mop_snare.h5mu")
    bench_tokenize.main(["--quick", "--results_dir", str(tmp_path)])
    data = _results(tmp_path, "tokenize")
    for column in ("gex_text", "atac_text"):
        variants = data["texts"][column]["variants"]
        unpadded = {v["tokens"] for k, v in variants.items() if "padded" not in k}
        assert len(unpadded) == 1, f"every unpadded variant must count the same tokens: {variants}"


def test_bench_growth_quick(tmp_path):
    bench_growth.main(["--quick", "--results_dir", str(tmp_path)])
    data = _results(tmp_path, "growth")
    assert [row["cells"] for row in data["cells"]] == [200, 800]
    lengths = [row["nonzeros_per_cell"] for row in data["length"]]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


@pytest.mark.parametrize("file_format, compression", [("arrow", None), ("parquet", "gzip")])
def test_bench_stream_quick(tmp_path, file_format, compression):
    bench_stream.main(["--quick", "--workdir", str(tmp_path / "work"), "--results_dir", str(tmp_path), "--file_format", file_format,
                       *(["--compression", compression] if compression else [])])
    data = _results(tmp_path, "stream_scale" if file_format == "arrow" else f"stream_scale_{file_format}")
    (row,) = data["sizes"]
    assert data["spec"]["compression"] == compression and row["file_format"] == file_format and row["dataset_bytes"] > 0
    assert row["cells"] == 300 and 0 < row["train_cells"] < 300 and row["build_cpu_seconds"] > 0
    assert row["stream_examples"] == 2 * row["train_cells"] and row["stream_batches"] >= row["stream_examples"] / 32
    assert row["stream_tokens"] > row["stream_examples"] and row["stream_peak_rss_mb"] > 0 and row["build_peak_rss_mb"] > 0
    assert not any((tmp_path / "work").iterdir())  # inputs and datasets deleted after the size
    with pytest.raises(ValueError, match="write them outside the repository"):
        bench_stream.main(["--quick", "--workdir", str(REPO / "bench" / "results")])


def test_results_name_scripts_relative_to_the_repository():
    """A script run by its absolute path is recorded as bench/NAME.py in the JSON's command; paths elsewhere stay."""
    assert bench_common._repo_relative(str(REPO / "bench" / "bench_train.py")) == "bench/bench_train.py"
    assert bench_common._repo_relative("/elsewhere/script.py") == "/elsewhere/script.py"


def test_bench_train_quick(tmp_path):
    shared_file("mop_snareseq/mop_snare.h5mu")
    bench_train.main(["--quick", "--steps", "1", "--n_cells", "16", "--max_length", "64", "--profile", "1", "--results_dir", str(tmp_path)])
    run = _results(tmp_path, "train_cpu")["runs"][0]
    assert run["shape"] == "tiny" and run["tokens"] > 0 and 0 <= run["padding_fraction"] < 1
    assert run["profile"]["aten_ops_per_step"] > 100  # a tiny T5 step still dispatches hundreds of ops
    top = run["profile"]["top"]  # where a step's time goes: operators by self time, largest first
    assert top and all(a["self_ms"] >= b["self_ms"] for a, b in zip(top, top[1:], strict=False)) and any(r["op"] == "aten::mm" for r in top)


def test_bench_step_quick(tmp_path):
    figures = bench_step.main(["--quick", "--results_dir", str(tmp_path)])
    run = _results(tmp_path, "step_cpu")["runs"][0]
    assert run == figures["runs"][0] and run["shape"] == "tiny" and run["attn_implementation"] == "sdpa" and not run["torch_compile"]
    assert run["timed_steps"] == 1 and run["seconds_per_step"] > 0 and all(x == x for x in run["losses"])  # finite, not nan
    # Every operator the profiler saw is counted once; the top-level ones are a part of them.
    assert run["aten_ops"] > run["top_level_ops"] > 100 and run["compiled_kernels"] == 0
    assert 0 < sum(run["top_level_by_op"].values()) <= run["top_level_ops"] and "aten::mm" in run["top_level_by_op"]
    assert 0 < sum(run["nested_by_outer_op"].values()) <= run["aten_ops"] - run["top_level_ops"]
    shares = list(run["self_cpu_share_by_op"].values())
    assert 0 < sum(shares) <= 1.0001 and shares == sorted(shares, reverse=True)
    batches = bench_step.synthetic_batches(3, 40, 500, (20, 9, 6))
    gex_to_atac, atac_to_gex = batches
    assert gex_to_atac["input_ids"].shape == (3, 20) and gex_to_atac["labels"].shape == (3, 9) and atac_to_gex["labels"].shape == (3, 6)
    assert bool((gex_to_atac["input_ids"][:, 1:-1] < 45).all()) and bool((gex_to_atac["labels"][:, :-1] >= 45).all())
    assert gex_to_atac["profile_values"].shape == (3, 500) and atac_to_gex["profile_values"].shape == (3, 40)


def test_bench_predict_quick(tmp_path):
    bench_predict.main(["--quick", "--cells", "4", "--results_dir", str(tmp_path)])
    rows = _results(tmp_path, "predict_cpu")["predict_matrix"]
    assert [(r["direction"], r["mode"]) for r in rows] == [
        ("gex2atac", "matrix"), ("gex2atac", "matrix+sentences"), ("atac2gex", "matrix"), ("atac2gex", "matrix+sentences")]
    assert all(r["cells"] == 4 and r["output_shape"][0] == 4 for r in rows)


def test_readout_diagnostics_quick(tmp_path):
    """kernel / centre / bootstrap on a 2-step tiny model of synthetic cells in two batches."""
    import datasets
    import numpy as np
    import torch

    import train
    from tests.translator_fixtures import make_dataset_and_tokenizer, tiny_args

    torch.set_num_threads(1)
    data, tok = make_dataset_and_tokenizer(tmp_path, n_cells=90, n_genes=20, n_peaks=30)
    model = tmp_path / "model"
    assert train.main(tiny_args(data, tok, model, "--max_steps", "2", "--checkpointing_steps", "0", "--calibration_cells", "8",
                                "--max_eval_cells", "8")) == 0
    with pytest.raises(SystemExit, match="has no batch column"):
        readout_diagnostics.main(["centre", "--model", str(model), "--dataset_dir", str(data), "--quick", "--results_dir", str(tmp_path)])
    splits = datasets.load_from_disk(str(data))
    batched = tmp_path / "batched"
    datasets.DatasetDict({name: split.add_column("batch", [f"b{i % 2}" for i in range(len(split))]) for name, split in splits.items()}
                         ).save_to_disk(str(batched))
    (batched / "cell_sentences.json").write_text((data / "cell_sentences.json").read_text())
    for command in ("kernel", "centre", "bootstrap"):
        assert readout_diagnostics.main([command, "--model", str(model), "--dataset_dir", str(batched), "--quick", "--results_dir", str(tmp_path)]) == 0
    assert readout_diagnostics.main(["ensemble", "--model", str(model), "--members", str(model), "--dataset_dir", str(data), "--quick",
                                     "--results_dir", str(tmp_path)]) == 0
    for rows in _results(tmp_path, "readout_ensemble")["directions"].values():  # a model averaged with itself is itself
        assert rows["ensemble"] == pytest.approx(rows["member_0"]) and rows["member_1"] == rows["member_0"]
    crossfit_dir = tmp_path / "crossfit"
    assert readout_diagnostics.main(["crossfit", "--model", str(model), "--dataset_dir", str(data), "--parts", "3", "--dataset_name", "syn",
                                     "--output_dir", str(crossfit_dir), "--quick", "--results_dir", str(tmp_path)]) == 0
    crossfit = _results(tmp_path, "readout_crossfit")["directions"]
    assert crossfit["gex2atac"]["profile"]["aggregation_per_part"] == ["profile"] * 3
    for rows in crossfit.values():  # the arm with more candidates keeps the lowest in-sample RMSE of them
        assert rows["profile,profile_depth"]["aggregation_in_sample"] in ("profile", "profile_depth")
        assert rows["profile,profile_depth"]["in_sample"]["rmse"] <= rows["profile"]["in_sample"]["rmse"] + 1e-7
    import eval as eval_script
    from evaluation.crossval import pool_folds

    eval_script.main(["--skip_model", "--dataset_dir", str(data), "--dataset_name", "syn", "--split", "validation", "--no_plots",
                      "--output_dir", str(tmp_path / "ev_base")])
    pooled = pool_folds([tmp_path / "ev_base"], {"depth": [crossfit_dir / "profile,profile_depth"]})  # crossval pool reads them
    for direction, rows in crossfit.items():
        assert pooled["candidates"]["depth"]["metrics"][direction]["rmse"] == pytest.approx(rows["profile,profile_depth"]["cross_fitted"]["rmse"])
        assert rows["profile"]["cross_fitted"]["rmse"] != rows["profile"]["in_sample"]["rmse"]  # held-out cells, not the fitted ones
    # foldpool with two identical folds: each fold's "others" calibration is fitted on the same cells as the same model reads them,
    # i.e. the in-sample fit; "pooled" sees each cell twice less a part of one copy
    foldpool_dir = tmp_path / "foldpool"
    assert readout_diagnostics.main(["foldpool", "--model", str(model), "--dataset_dir", str(data), "--members", str(model), "--member_dataset_dirs",
                                     str(data), "--arms", "profile", "--parts", "3", "--dataset_name", "syn", "--output_dir", str(foldpool_dir),
                                     "--quick", "--results_dir", str(tmp_path)]) == 0
    folds = _results(tmp_path, "readout_foldpool")["directions"]
    assert set(folds) == {"fold_0", "fold_1"} and folds["fold_0"] == folds["fold_1"]
    for direction, row in folds["fold_0"]["others"]["profile"].items():
        assert row["metrics"]["rmse"] == pytest.approx(crossfit[direction]["profile"]["in_sample"]["rmse"], rel=1e-5)
        assert folds["fold_0"]["pooled"]["profile"][direction]["aggregations"] == ["profile"] * 3
    pooled = pool_folds([tmp_path / "ev_base"] * 2, {"pooled": [foldpool_dir / f"fold_{k}" / "pooled" / "profile" for k in (0, 1)]})
    assert pooled["candidates"]["pooled"]["metrics"]["gex2atac"]["rmse"] == pytest.approx(folds["fold_0"]["pooled"]["profile"]["gex2atac"]["metrics"]["rmse"])
    with pytest.raises(SystemExit, match="--member_dataset_dirs"):
        readout_diagnostics.main(["foldpool", "--model", str(model), "--dataset_dir", str(data), "--members", str(model), "--results_dir", str(tmp_path)])
    assert readout_diagnostics.main(["sampled", "--model", str(model), "--dataset_dir", str(data), "--parts", "3", "--samples", "3",
                                     "--quick", "--results_dir", str(tmp_path)]) == 0
    for direction, rows in _results(tmp_path, "readout_sampled")["directions"].items():
        for arm in ("sampled share", "sampled paths"):  # the blend's grid holds both ends: no worse than either readout alone
            assert rows[f"best blend, {arm}"]["cross_fitted"]["rmse"] <= min(
                rows[arm]["cross_fitted"]["rmse"], rows["profile,profile_depth"]["cross_fitted"]["rmse"]) + 1e-6
            assert len(rows[arm]["aggregation_per_part"]) == 3
        assert rows["profile,profile_depth"]["cross_fitted"]["rmse"] == pytest.approx(crossfit[direction]["profile,profile_depth"]["cross_fitted"]["rmse"])
        assert 0 < rows["sampled share"]["mean_names_per_draw"] <= 128 and 0 <= rows["greedy"]["mean_names"] <= 128
    # the two estimates from the same draws: the share of 3 draws is a multiple of 1/3; the paths' noisy-or a probability
    from translator.api import CellTranslator

    translator = CellTranslator.from_pretrained(str(model))
    ids = translator.encode_sources(splits["validation"]["gex_text"][:4], "gex2atac")
    drawn = readout_diagnostics.sampled_features(translator, ids, "gex2atac", samples=3, temperature=1.0)
    share, paths = drawn["share"]["noisy_or"], drawn["paths"]["noisy_or"]
    assert np.allclose(share * 3, np.round(share * 3), atol=1e-5) and share.max() <= 1 + 1e-6 and share.sum() > 0
    assert paths.shape == share.shape and 0 < paths.min() and paths.max() < 1
    assert drawn["share"]["profile"] is drawn["paths"]["profile"]  # one profile pass serves both
    with pytest.raises(SystemExit, match="--samples must be at least 1"):
        readout_diagnostics.main(["sampled", "--model", str(model), "--dataset_dir", str(data), "--samples", "0", "--results_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--parts must be from 2"):
        readout_diagnostics.main(["crossfit", "--model", str(model), "--dataset_dir", str(data), "--parts", "1", "--quick", "--results_dir", str(tmp_path)])
    kernel = _results(tmp_path, "readout_kernel")["directions"]
    for row in kernel.values():
        assert len(row["grid"]) == 4 and row["best"]["residual"]["validation_rmse"] > 0  # 2 fits x 1 width x 2 ridges
        assert row["mean_validation_rmse"] > 0 and row["model_validation_rmse"] > 0
    centre = _results(tmp_path, "readout_centre")["directions"]
    assert all(row["train_batches"] == ["b0", "b1"] and row["plain"]["validation_rmse"] > 0 for row in centre.values())
    boot = _results(tmp_path, "readout_bootstrap")["directions"]
    for rows in boot.values():
        assert set(rows) == {"mean", "svd_knn", "svd_krr"}
        for row in rows.values():
            assert row["difference"] == pytest.approx(row["model_rmse"] - row["baseline_rmse"])
            assert row["bootstrap_sd"] >= 0 and 0 <= row["share_model_ahead"] <= 1


def test_gpu_t5small_script_smoke(tmp_path):
    """bench/gpu/t5small_mop.sh end to end on CPU (SMOKE=1: a 4-step tiny model) from a staged data.tgz: what comes back."""
    import os
    import shutil
    import subprocess
    import tarfile

    from tests.translator_fixtures import make_dataset_and_tokenizer

    data, tok = make_dataset_and_tokenizer(tmp_path / "src", n_cells=90, n_genes=20, n_peaks=30)
    stage = tmp_path / "gpu"
    stage.mkdir()
    with tarfile.open(stage / "data.tgz", "w:gz") as archive:
        archive.add(data, arcname="mop")
        archive.add(tok, arcname="mop_tok")
    out = tmp_path / "out"
    out.mkdir()
    # An earlier run whose validation RMSE this one beats in both directions: test is scored (TEST_IF_BETTER_THAN).
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"directions": {d: {"model": {"rmse": 9.0}} for d in ("gex2atac", "atac2gex")}}))
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "GPU_DIR": str(stage), "SMOKE": "1",
           "EVAL_CELLS_SMOKE": "15", "TEST_IF_BETTER_THAN": str(reference)}  # 15 validation cells: enough for the cross-fitted choice (>= 10)
    script = REPO / "bench" / "gpu" / "t5small_mop.sh"
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all done" in done.stdout and "validation RMSE, this run vs the reference" in done.stdout
    assert {"train.log", "eval_validation.log", "eval_test.log", "env.log", "readout.json", "training_args.json",
            "eval_validation.json", "eval_test.json"} <= {p.name for p in out.iterdir()}
    for split in ("validation", "test"):
        result = json.loads((out / f"eval_{split}.json").read_text())
        assert result["split"] == split and set(result["directions"]) == {"gex2atac", "atac2gex"}
        assert "mean" in result["directions"]["gex2atac"]["baselines"] and "rmse" in result["directions"]["gex2atac"]["model"]
    readout = json.loads((out / "readout.json").read_text())
    assert "averaged over 2 random partitions" in readout["calibration"]["gex2atac"]["selection"]
    shutil.rmtree(tmp_path / "work")
    missing = subprocess.run(["bash", str(script)], cwd=REPO, env={**env, "GPU_DIR": str(tmp_path / "nowhere")}, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "data.tgz is missing" in missing.stderr


def test_gpu_speed_script_smoke(tmp_path):
    """bench/gpu/speed.sh end to end on CPU (SMOKE=1: every part at toy sizes) from a staged data.tgz: what comes back."""
    import os
    import subprocess
    import tarfile

    from tests.translator_fixtures import make_dataset_and_tokenizer

    data, tok = make_dataset_and_tokenizer(tmp_path / "src", n_cells=90, n_genes=20, n_peaks=30)
    large = tmp_path / "large.h5ad"
    make_large.main(["--quick", "--n_cells", "300", "--no_x", "--output", str(large)])
    names = tmp_path / "large_ds"
    from dataset_builder import build_dataset

    build_dataset([large], names, test_batches=["s4d1", "s4d8", "s4d9"], validation_batches=["s3d7"])
    stage = tmp_path / "gpu"
    stage.mkdir()
    with tarfile.open(stage / "data.tgz", "w:gz") as archive:
        archive.add(data, arcname="mop")
        archive.add(tok, arcname="mop_tok")
        archive.add(names / "cell_sentences.json", arcname="large/cell_sentences.json")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "GPU_DIR": str(stage), "SMOKE": "1"}
    script = REPO / "bench" / "gpu" / "speed.sh"
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all done" in done.stdout, done.stdout
    # the compiled step is left out on a CPU (SMOKE_COMPILE=1 runs it: minutes of compilation)
    assert {"step_eager.json", "predict.json", "stability.json", "compare.json", "env.log", "logs.tgz"} == {p.name for p in out.iterdir()}
    eager = json.loads((out / "step_eager.json").read_text())["runs"][0]
    assert eager["mixed_precision"] == "bf16" and eager["tokens_per_s"] > 0 and eager["top_level_ops"] > 100
    predicted = json.loads((out / "predict.json").read_text())["runs"]
    assert set(predicted) == {"predict_default", "predict_b512", "predict_b512_bf16"}
    for run in predicted.values():
        assert run["completed"] and run["cells"] == 64 and run["cells_per_s"] > 0 and run["features"] == 12_000
    stability = json.loads((out / "stability.json").read_text())
    assert set(stability) == {"bf16", "fp32", "fp32_seed2"}
    for run in stability.values():
        assert run["completed_steps"] == 4 and not run["nan_in_log"] and run["validation_history"] and run["logged_losses_finite"] is True
    assert [(stability[k]["mixed_precision"], stability[k]["tf32"], stability[k]["seed"]) for k in ("bf16", "fp32", "fp32_seed2")] == [
        ("bf16", False, 42), ("no", True, 42), ("no", True, 2)]
    compared = json.loads((out / "compare.json").read_text())
    assert compared["split"] == "validation" and compared["reference"].endswith("fp32") and set(compared["models"]) == {"bf16", "fp32_seed2"}
    for by_model in compared["directions"].values():
        assert set(by_model) == {"bf16", "fp32_seed2"}
        for rows in by_model.values():
            assert {"rmse", "pearson_cell"} <= set(rows)
            for row in rows.values():
                low, high = row["interval_95"]
                assert row["difference"] == pytest.approx(row["model"] - row["reference"])
                assert low <= high and row["verdict"] == ("tied" if low <= 0 <= high else "differ")
    with tarfile.open(out / "logs.tgz") as archive:
        logs = {Path(name).name for name in archive.getnames()}
    assert {"train_bf16.log", "train_fp32.log", "train_fp32_seed2.log", "predict_default.log", "predict_profile_top.txt", "step_eager.log"} <= logs


def test_random_batches_write_a_seeded_split_into_each_modality(tmp_path):
    import mudata as md
    import numpy as np
    import random_batches

    from dataset_builder.simulate import write_simulated

    source = write_simulated(tmp_path / "sim.h5mu", n_cells=120, seed=0)
    random_batches.main(["--input", str(source), "--output", str(tmp_path / "split.h5mu"), "--seed", "2"])
    data = md.read_h5mu(tmp_path / "split.h5mu")
    labels = np.asarray(data["rna"].obs["batch"])
    assert (labels == np.asarray(data["atac"].obs["batch"])).all()
    assert {name: int((labels == name).sum()) for name in ("train", "validation", "test")} == {"train": 96, "validation": 12, "test": 12}
    assert (labels == random_batches.random_batches(120, 0.1, 0.1, seed=2)).all()


def test_the_timing_model_of_bench_predict_runs_every_part_of_the_prediction(tmp_path):
    """The random-weights folder has the default recipe's parts, and its prediction is the blend of all three of them."""
    import numpy as np

    from tests.translator_fixtures import make_dataset_and_tokenizer
    from translator import CellTranslator

    data, _ = make_dataset_and_tokenizer(tmp_path, n_cells=40, n_genes=30, n_peaks=90, seed=1)
    bench_predict.main(["--dataset", str(data), "--write_timing_model", str(tmp_path / "timing")])
    tr = CellTranslator.from_pretrained(tmp_path / "timing")
    assert tr.profile_head is not None and tr.readout["calibration"]["gex2atac"]["aggregation"] == "profile_depth"
    blend = tr.blend["gex2atac"]
    assert blend.needs_transformer and blend.kernel is not None and blend.mean is not None
    sentences = [" ".join(tr.meta["genes"][i:i + 5]) for i in range(4)]
    matrix = tr.predict_matrix(sentences, "gex2atac")
    assert matrix.shape == (4, len(tr.meta["peaks"])) and matrix.dtype == np.float32
    assert np.isfinite(matrix).all() and (matrix >= 0).all() and (matrix <= 1).all() and matrix.std(axis=0).max() > 0
