"""Predict benchmark: cells/s in each direction, in-process (``CellTranslator.predict_matrix``) and end to end
(``python predict.py``: h5ad in, h5ad out, in a subprocess with its peak RSS).

The model is ``--model DIR`` (a folder written by ``train.py``); without it a tiny model is trained once on the
MOp dataset (``train.py --model_size tiny``, cached in /tmp) -- its throughput is representative of decoding
at MOp sentence lengths, not of its accuracy. Source sentences are the test split of the dataset; the
end-to-end input is the first ``--e2e_cells`` cells of the MOp RNA / ATAC h5ad files.
Target: 10,000 cells/s GEX to ATAC on one H100 or H200 (``--device cuda``) for full-size cells; the CPU figure is reported too.

    python bench/bench_predict.py [--model OUT] [--cells 256] [--batch_size 64]
    python bench/bench_predict.py --device cuda --cells 4096 --batch_size 256
    python bench/bench_predict.py --quick
    python bench/bench_predict.py --dataset DATASET --write_timing_model OUT   # random weights, the default recipe's shape
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

TARGET_H100_GEX2ATAC_CELLS_PER_S = 10_000
MODEL_CACHE = Path(tempfile.gettempdir()) / "bench_mop_model"
MOP_RNA = common.MOP_H5MU.with_name("mop_snare_rna.h5ad")
MOP_ATAC = common.MOP_H5MU.with_name("mop_snare_atac.h5ad")


def _train_args(dataset: Path, tokenizer_dir: Path, output: Path, steps: int) -> list[str]:
    args = [sys.executable, str(common.REPO / "train.py"), "--dataset_dir", str(dataset), "--tokenizer_dir", str(tokenizer_dir),
            "--output_dir", str(output),
            "--overwrite_output_dir", "--model_size", "tiny", "--max_steps", str(steps), "--learning_rate", "2e-3",
            "--warmup_steps", str(max(1, steps // 10)), "--eval_steps", "0", "--checkpointing_steps", "0", "--evaluate", "false",
            "--max_source_length", "256", "--max_target_length", "256", "--per_device_train_batch_size", "16",
            "--max_eval_cells", "64", "--calibration_cells", "64"]
    return args


def ensure_model(model: Path | None, dataset: Path, steps: int, quick: bool, workdir: Path) -> tuple[Path, dict | None]:
    """The model folder to benchmark: ``model``, or a tiny one trained on ``dataset`` (cached unless --quick)."""
    if model is not None:
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"--model {model}: no config.json; pass a folder written by train.py")
        return model, None
    target = workdir / "model" if quick else MODEL_CACHE
    if quick:
        return _untrained_folder(dataset, target), None
    if (target / "config.json").exists() and not quick:
        return target, None
    from tokenizer import build_from_dataset

    tokenizer_dir = target.with_name(target.name + "_tokenizer")
    build_from_dataset(dataset, tokenizer_dir, overwrite=True)
    print(f"training a tiny model on {dataset} for {steps} steps into {target}")
    run = common.run_measured(_train_args(dataset, tokenizer_dir, target, steps), cwd=common.REPO)
    return target, {"train_seconds": round(run["seconds"], 1), "steps": steps}


def _untrained_folder(dataset: Path, target: Path) -> Path:
    """A randomly initialised tiny model folder, written as train.py writes one (for the smoke run only)."""
    import json

    from tokenizer import build_tokenizer
    from translator.finishing import write_model_folder
    from translator.model import make_config, make_model

    meta = json.loads((dataset / "cell_sentences.json").read_text())
    tok = build_tokenizer(meta["genes"], meta["peaks"])
    model = make_model(make_config("tiny", len(tok), max_length=64), seed=0)
    readout = {"max_source_length": 64, "max_target_length": 64}
    write_model_folder(target, model, tok, meta, readout, {"note": "untrained, bench smoke run"}, max_target_length=64)
    return target


def timing_folder(dataset: Path, target: Path, seed: int = 0) -> Path:
    """A folder of the default recipe's shape with random weights, for timing ``predict.py`` at full size: the ``tiny`` T5
    over ``dataset``'s names, a profile head, the ``profile_depth`` calibration of both directions, and the blend of all
    three parts (transformer, a source kernel of 64 components and 1,000 landmarks, the mean), as ``train.py`` ships them.
    Its predictions mean nothing; every part of the prediction path runs, at its real size."""
    import json

    import torch
    from safetensors.numpy import save_file

    from tokenizer import build_tokenizer
    from translator.finishing import write_model_folder
    from translator.model import ProfileHead, make_config, make_model

    meta = json.loads((dataset / "cell_sentences.json").read_text())
    tok = build_tokenizer(meta["genes"], meta["peaks"])
    model = make_model(make_config("tiny", len(tok), max_length=512), seed=seed)
    head = ProfileHead(len(tok), 3 * model.config.d_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5, generator=generator)
        head.bias.normal_(0.0, 0.3, generator=generator)
    rng = np.random.default_rng(seed)
    readout = {"max_source_length": 512, "max_target_length": 128,
               "calibration": {"gex2atac": {"aggregation": "profile_depth", "coef": [0.28, 0.09, 1.1, 0.91], "intercept": -5.68},
                               "atac2gex": {"aggregation": "profile_depth", "coef": [0.9, 1.7, 0.3, 1.05, -0.6]}},
               "blend": {}}
    arrays = {}
    n_genes, n_peaks = len(meta["genes"]), len(meta["peaks"])
    for direction, (source, target_modality, n_source, n_target) in {"gex2atac": ("gex", "atac", n_genes, n_peaks),
                                                                     "atac2gex": ("atac", "gex", n_peaks, n_genes)}.items():
        kernel = {"reducer_components": rng.normal(size=(64, n_source)) / np.sqrt(n_source), "landmarks": rng.normal(size=(1000, 64)),
                  "normalization": rng.normal(size=(1000, 1000)) / 1000, "coef": rng.normal(size=(1000, 64)) * 0.1,
                  "target_components": rng.normal(size=(64, n_target)) * 0.01, "target_mean": rng.uniform(0.0, 0.3, n_target)}
        kernel.update({"idf": rng.uniform(1.0, 3.0, n_source)} if source == "atac"
                      else {"inv_sd": rng.uniform(0.5, 2.0, n_source), "reducer_mean": rng.uniform(0.0, 0.3, n_source)})
        arrays.update({f"{direction}.kernel.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in kernel.items()})
        arrays[f"{direction}.mean"] = rng.uniform(0.0, 0.3, n_target).astype(np.float32)
        readout["blend"][direction] = {"weights": {"transformer": 0.5, "kernel": 0.3, "mean": 0.2}, "predicts_the_mean": False,
                                       "kernel": {"source": source, "target": target_modality, "gamma": 0.05, "scale": 1.0}}
    write_model_folder(target, model, tok, meta, readout, {"note": "random weights of the default recipe's shape, for timing only"}, 128,
                       profile_head=head)
    save_file(arrays, str(target / "blend.safetensors"))
    return target


def ensure_dataset(dataset: Path | None, quick: bool, workdir: Path) -> Path:
    """A dataset folder: ``dataset``, MOp built into /tmp once, or (--quick) the small simulated default."""
    if dataset is not None:
        return dataset
    if quick:
        out = workdir / "simulated_dataset"
        common.run_measured([sys.executable, "-m", "dataset_builder", "--output_dir", str(out)], cwd=common.REPO)
        return out
    from bench_tokenize import MOP_DATASET_CACHE

    if not (MOP_DATASET_CACHE / "cell_sentences.json").exists():
        from dataset_builder import build_dataset

        build_dataset([common.MOP_H5MU], MOP_DATASET_CACHE, test_batches=["09K", "09L"], validation_batches=["09J"], overwrite=True)
    return MOP_DATASET_CACHE


def in_process(model: Path, dataset: Path, cells: int, batch_size: int, device: str, precision: str = "auto") -> list[dict]:
    import datasets
    import torch

    from translator import CellTranslator

    tr = CellTranslator.from_pretrained(model, device=device)
    test = datasets.load_from_disk(str(dataset))["test"]
    n = min(cells, len(test))
    rows = []
    for direction, column in (("gex2atac", "gex_text"), ("atac2gex", "atac_text")):
        sentences = list(test.select(range(n))[column])
        source = np.array([len(s.split()) for s in sentences])
        tr.predict_matrix(sentences[: min(4, n)], direction=direction, batch_size=batch_size, precision=precision)  # warm-up
        # "matrix": what predict.py does without --text (the profile readout needs one decoder step);
        # "matrix+sentences": greedy decoding too (eval.py, predict.py --text).
        for mode in ("matrix", "matrix+sentences"):
            with_sentences = mode == "matrix+sentences"
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            load = common.load_average()
            t = time.perf_counter()
            out = tr.predict_matrix(sentences, direction=direction, batch_size=batch_size, return_sentences=with_sentences, precision=precision)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            matrix, translated = out if with_sentences else (out, None)
            row = {
                "direction": direction, "mode": mode, "cells": n, "batch_size": batch_size, "device": device, "precision": precision,
                "seconds": round(seconds, 3), "cells_per_s": round(n / seconds, 2),
                "mean_source_names": round(float(source.mean()), 1), "output_shape": list(matrix.shape), "load_average": load,
            }
            note = ""
            if with_sentences:
                generated = np.array([len(s.split()) for s in translated])
                row["mean_generated_names"] = round(float(generated.mean()), 1)
                row["generated_tokens_per_s"] = round(float(generated.sum() + n) / seconds, 1)
                note = f", {generated.mean():.0f} generated a cell"
            if device.startswith("cuda"):
                row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                row["device_name"] = torch.cuda.get_device_name()
            rows.append(row)
            print(f"predict_matrix {direction} ({mode}): {n} cells in {seconds:.2f} s = {n / seconds:,.1f} cells/s "
                  f"(sources {source.mean():.0f} names{note})")
    return rows


def end_to_end(model: Path, cells: int, batch_size: int, workdir: Path, quick: bool, dataset: Path, precision: str = "auto") -> list[dict]:
    """``python predict.py`` on the first ``cells`` cells of each MOp modality file (subprocess, peak RSS)."""
    import anndata as ad

    rows = []
    for direction, source in (("gex2atac", MOP_RNA), ("atac2gex", MOP_ATAC)):
        if quick:  # the simulated model knows the simulated features: feed it its own source file
            source = next(dataset.parent.glob(f"{dataset.name}*sim*/simulated.h5mu"), None) or source
        subset = workdir / f"{direction}_input.h5ad"
        if source.suffix == ".h5ad":
            adata = ad.read_h5ad(source)
            adata[:cells].copy().write_h5ad(subset)
            n = min(cells, adata.n_obs)
        else:
            continue
        out = workdir / f"{direction}_output.h5ad"
        cmd = [sys.executable, str(common.REPO / "predict.py"), "--model", str(model), "--input", str(subset), "--direction", direction,
               "--output", str(out), "--batch_size", str(batch_size), "--overwrite", "--precision", precision]
        load = common.load_average()
        run = common.run_measured(cmd, cwd=common.REPO)
        written = ad.read_h5ad(out, backed="r")
        rows.append({"direction": direction, "cells": n, "wall_seconds": round(run["seconds"], 2), "cells_per_s_wall": round(n / run["seconds"], 2),
                     "peak_rss_mb": round(run["peak_rss_mb"], 1), "output_shape": list(written.shape), "load_average": load})
        print(f"predict.py {direction}: {n} cells, {run['seconds']:.1f} s wall (start-up included), peak RSS {run['peak_rss_mb']:,.0f} MB")
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Predict benchmark (see the module docstring).")
    parser.add_argument("--model", type=Path, default=None, help="model folder from train.py (default: a tiny MOp model, trained once)")
    parser.add_argument("--dataset", type=Path, default=None, help="dataset folder whose test split gives the sources (default: MOp)")
    parser.add_argument("--cells", type=int, default=None, help="cells per direction (default 256; --quick 8)")
    parser.add_argument("--e2e_cells", type=int, default=None, help="cells for the predict.py run (default 256; --quick 8)")
    parser.add_argument("--batch_size", type=int, default=64, help="cells decoded together")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bf16"),
                        help="the encoder's precision (predict.py --precision): auto is bf16 on a CPU with hardware bf16 products")
    parser.add_argument("--train_steps", type=int, default=None, help="steps of the tiny model trained when --model is absent (default 100)")
    parser.add_argument("--skip_e2e", action="store_true", help="skip the predict.py subprocess runs")
    parser.add_argument("--write_timing_model", type=Path, default=None,
                        help="only write a random-weights folder of the default recipe's shape over --dataset's names (profile head, "
                             "calibration, blend of all three parts) into this folder, for timing predict.py, and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: the simulated dataset, a 3-step tiny model, 8 cells")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu")
    if args.write_timing_model is not None:
        if args.dataset is None:
            raise ValueError("--write_timing_model needs --dataset (a built dataset whose names the folder uses)")
        print(f"wrote {timing_folder(args.dataset, args.write_timing_model)}")
        return {}
    cells = args.cells or (8 if args.quick else 256)
    import torch

    from translator.decode import resolve_precision

    figures: dict = {"device": args.device, "precision": args.precision, "precision_used": resolve_precision(args.precision, args.device),
                     "torch_threads": torch.get_num_threads(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        workdir = Path(tmp)
        dataset = ensure_dataset(args.dataset, args.quick, workdir)
        model, trained = ensure_model(args.model, dataset, args.train_steps or (3 if args.quick else 100), args.quick, workdir)
        figures.update({"model": str(model), "trained_here": trained, "dataset": str(dataset)})
        figures["predict_matrix"] = in_process(model, dataset, cells, args.batch_size, args.device, args.precision)
        if not args.skip_e2e and not args.quick:
            figures["predict_py"] = end_to_end(model, args.e2e_cells or 256, args.batch_size, workdir, args.quick, dataset, args.precision)
    if args.device.startswith("cuda"):
        figures["target_h100_gex2atac_cells_per_s"] = TARGET_H100_GEX2ATAC_CELLS_PER_S
    common.write_results(f"predict_{'cuda' if args.device.startswith('cuda') else 'cpu'}", figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
