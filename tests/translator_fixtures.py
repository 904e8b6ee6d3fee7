"""Small dataset folders for the translator tests, written to the dataset-folder contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tokenizer import build_from_dataset


def make_dataset(path: Path, n_cells: int = 120, n_genes: int = 40, n_peaks: int = 120, seed: int = 0) -> Path:
    """A synthetic paired dataset in which ATAC follows GEX (cell programs), saved like `dataset_builder` does."""
    import datasets

    rng = np.random.default_rng(seed)
    genes = [f"Gene{i}" for i in range(n_genes)]
    peaks = [f"chr{c}-{1000 * (i + 1)}-{1000 * (i + 1) + 500}" for c in (1, 2, 3) for i in range(n_peaks // 3)]
    programs = rng.integers(0, 4, size=n_cells)
    gex_rate = rng.gamma(0.5, 1.0, size=(4, n_genes))
    atac_rate = np.clip(rng.beta(0.3, 3.0, size=(4, len(peaks))) * 2, 0, 0.9)
    counts = rng.poisson(gex_rate[programs] * 3)
    log_norm = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * np.median(counts.sum(1)))
    atac = rng.random((n_cells, len(peaks))) < atac_rate[programs]
    rows = {"cell": [], "gex_text": [], "atac_text": [], "gex_index": [], "gex_value": [], "n_genes": [], "n_peaks": [], "cell_type": []}
    for i in range(n_cells):
        detected = np.flatnonzero(log_norm[i] > 0)
        order = detected[np.lexsort((detected, -log_norm[i, detected]))]
        open_peaks = np.flatnonzero(atac[i])
        rows["cell"].append(f"cell{i}")
        rows["gex_text"].append(" ".join(genes[g] for g in order))
        rows["atac_text"].append(" ".join(peaks[p] for p in open_peaks))
        rows["gex_index"].append(order.astype(np.int32).tolist())
        rows["gex_value"].append(log_norm[i, order].astype(np.float32).tolist())
        rows["n_genes"].append(len(order))
        rows["n_peaks"].append(len(open_peaks))
        rows["cell_type"].append(f"type{programs[i]}")
    table = datasets.Dataset.from_dict(rows)
    n_val = n_test = max(2, n_cells // 6)
    n_train = n_cells - n_val - n_test
    splits = datasets.DatasetDict(
        train=table.select(range(n_train)),
        validation=table.select(range(n_train, n_train + n_val)),
        test=table.select(range(n_train + n_val, n_cells)),
    )
    splits.save_to_disk(str(path))
    train = slice(0, n_train)
    train_lengths = [len(x) for x in rows["gex_index"][train]]
    rank_value = [
        float(np.mean([v[r] for v in rows["gex_value"][train] if len(v) > r])) for r in range(max(train_lengths))
    ]
    detected = log_norm[train] > 0
    meta = {
        "genes": genes,
        "peaks": peaks,
        "gex_encoding": "rank",
        "binary_threshold": 2.0,
        "top_peaks": None,
        "normalization": {"gex": "log1p(counts / size_factor)", "size_factor": "library_size / median_library_size", "atac": "counts > 0", "counts_source": "X"},
        "splits": {"train": n_train, "validation": n_val, "test": n_test},
        "split_by": "hash",
        "dropped_cells": 0,
        "train_stats": {
            "gex_mean": log_norm[train].mean(0).tolist(),
            "gex_detect_rate": detected.mean(0).tolist(),
            "gex_mean_detected": (log_norm[train].sum(0) / np.maximum(detected.sum(0), 1)).tolist(),
            "atac_mean": atac[train].mean(0).tolist(),
            "rank_value": rank_value,
        },
        "source": ["synthetic"],
        "builder_version": "test",
    }
    (path / "cell_sentences.json").write_text(json.dumps(meta))
    return path


def make_dataset_and_tokenizer(root: Path, **kwargs) -> tuple[Path, Path]:
    data = make_dataset(root / "data", **kwargs)
    build_from_dataset(data, root / "tok")
    return data, root / "tok"


BMMC_COMBINED = "bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad"


def build_real(root: Path, input_file: Path, **kwargs) -> tuple[Path, Path]:
    """A dataset folder and tokenizer built from a real file with dataset_builder (hash split unless told)."""
    from dataset_builder import build_dataset

    build_dataset([input_file], root / "data", **kwargs)
    build_from_dataset(root / "data", root / "tok")
    return root / "data", root / "tok"


def tiny_args(data: Path, tok: Path, out: Path, *extra: str, blend: bool = False) -> list[str]:
    """train.py arguments of a fast tiny run.

    The blend's kernel tuning takes most of a tiny run's time (minutes on the real files), so it is off unless ``blend``:
    the tests that check what the blend ships, or that predict through it, ask for it.
    """
    return [
        "--dataset_dir", str(data), "--tokenizer_dir", str(tok), "--output_dir", str(out),
        "--model_size", "tiny", "--per_device_train_batch_size", "16", "--max_source_length", "96",
        "--max_target_length", "96", "--learning_rate", "3e-3", "--warmup_steps", "4", "--logging_steps", "5",
        "--calibration_cells", "30", "--max_eval_cells", "40", "--evaluate", "false", "--blend_folds", "0",
        *(() if blend else ("--no_blend",)), *extra,
    ]
