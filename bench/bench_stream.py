"""Scale benchmark: simulated paired data with GSE194122's feature counts, built and streamed through one epoch.

For each number of cells: ``bench/make_large.py`` writes a combined h5ad (13,431 genes with about 1,500 detected a
cell, 116,490 peaks with about 4,000 accessible a cell; counts only, gzip-compressed with ``--compression gzip``),
``python -m dataset_builder`` builds it (the batch splits of ``bench_build.py``; ``--file_format``: Arrow or zstd
Parquet), ``python -m tokenizer`` makes its vocabulary, and a fresh process streams one
training epoch of the train split with :class:`translator.streaming.StreamingExamples` (read, tokenize, cap,
length-group, collate: the data loading of a training run, no model step) at the default recipe's caps and batch.
Wall time, CPU time and peak RSS (GNU ``time``) of the build and of the epoch are reported per size, with seconds per
1,000 cells to show whether time grows linearly. Inputs are written under ``--workdir`` (default /tmp) and deleted after
each size; a size whose files would not fit on that disk is refused before anything is written.

    python bench/bench_stream.py                               # 10k and 100k cells, Arrow
    python bench/bench_stream.py --sizes 10000 100000 1000000 --file_format parquet --compression gzip
                                                               # 1M then needs about 62 GB of free disk (Arrow: 210 GB)
    python bench/bench_stream.py --quick                       # a tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import make_large  # noqa: E402
from bench_build import LARGE_SPLITS, bench_cli_build  # noqa: E402

# Disk a size needs, in bytes per cell, measured on 4k to 10k runs (h5ad of counts only, plain or gzip; all splits), rounded up.
INPUT_BYTES_PER_CELL = {None: 50_000, "gzip": 12_000, "lzf": 15_000}
DATASET_BYTES_PER_CELL = {"arrow": 135_000, "parquet": 50_000}
RECIPE = {"batch_size": 32, "max_source_length": 512, "max_target_length": 128, "max_gex_target_length": 6}


def stream_epoch(dataset_dir: Path, tokenizer_dir: Path, batch_size: int, max_source_length: int, max_target_length: int,
                 max_gex_target_length: int, seed: int = 0) -> dict:
    """One epoch of the train split's streamed batches; counts of cells, batches, tokens and the epoch's seconds."""
    from tokenizer import load_tokenizer
    from translator.streaming import StreamingExamples, open_split

    started = time.perf_counter()
    split = open_split(dataset_dir, "train")
    stream = StreamingExamples(split, load_tokenizer(tokenizer_dir), batch_size, seed=seed, max_source_length=max_source_length,
                               max_target_length=max_target_length, max_gex_target_length=max_gex_target_length)
    opened = time.perf_counter() - started
    batches = examples = tokens = 0
    started = time.perf_counter()
    for batch in stream:
        batches += 1
        examples += len(batch["input_ids"])
        tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
    seconds = time.perf_counter() - started
    if batches != len(stream) or examples != 2 * len(split):
        raise RuntimeError(f"the epoch gave {batches} batches and {examples} examples; expected {len(stream)} and {2 * len(split)}")
    return {"train_cells": len(split), "batches": batches, "examples": examples, "tokens": tokens, "open_seconds": round(opened, 3),
            "epoch_seconds": round(seconds, 2), "cells_per_second": round(len(split) / max(seconds, 1e-9), 1)}


def check_disk(workdir: Path, n_cells: int, compression: str | None, file_format: str) -> None:
    """Refuse a size whose input file and dataset would not fit on ``workdir``'s disk (an input already written counts as written)."""
    need = n_cells * DATASET_BYTES_PER_CELL[file_format]
    if not (workdir / f"stream_{n_cells}" / "input.h5ad").exists():
        need += n_cells * INPUT_BYTES_PER_CELL[compression]
    free = shutil.disk_usage(workdir).free
    if need > 0.9 * free:
        raise ValueError(f"{n_cells:,} cells need about {need / 1e9:.0f} GB in {workdir} and {free / 1e9:.0f} GB are free; "
                         "give --workdir on a larger disk or drop this size from --sizes")


def bench_size(spec: make_large.LargeSpec, workdir: Path, recipe: dict, keep: bool, file_format: str = "arrow") -> dict:
    """Write, build, tokenize and stream one size; the build's and the epoch's wall time, CPU time and peak RSS."""
    check_disk(workdir, spec.n_cells, spec.compression, file_format)
    folder = workdir / f"stream_{spec.n_cells}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = make_large.write_large(folder / "input.h5ad", spec)
        write_seconds = json.loads(path.with_name(path.name + ".json").read_text())["seconds"]  # also when an earlier run wrote it
        data, tok = folder / "data", folder / "tok"
        splits = LARGE_SPLITS if spec.n_cells >= 2 * len(make_large.BATCHES) else []
        build = bench_cli_build(path, data, [*splits, "--file_format", file_format], spec.n_cells)
        subprocess.run([sys.executable, "-m", "tokenizer", "--dataset", str(data), "--output_dir", str(tok)], cwd=common.REPO, check=True,
                       stdout=subprocess.DEVNULL)
        load_before = common.load_average()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stream", str(data), "--tokenizer", str(tok),
               *[f"--{k}={v}" for k, v in recipe.items()]]
        run = common.run_measured(cmd, env={**common.os.environ, "OMP_NUM_THREADS": "1"}, cwd=common.REPO)
        epoch = json.loads(run["output_tail"].strip().splitlines()[-1])
        row = {
            "cells": spec.n_cells,
            "train_cells": epoch["train_cells"],
            "file_format": file_format,
            "input_bytes": path.stat().st_size,
            "dataset_bytes": sum(p.stat().st_size for p in data.rglob(f"*.{file_format}")),
            "write_input_seconds": round(write_seconds, 1),
            "build_wall_seconds": build["wall_seconds"],
            "build_cpu_seconds": build["cpu_seconds"],
            "build_peak_rss_mb": build["peak_rss_mb"],
            "stream_wall_seconds": round(run["seconds"], 2),
            "stream_cpu_seconds": run["cpu_seconds"],
            "stream_peak_rss_mb": round(run["peak_rss_mb"], 1),
            "stream_load_average_before": load_before,
            "stream_load_average_after": common.load_average(),
            **{f"stream_{k}": v for k, v in epoch.items() if k != "train_cells"},
            "build_seconds_per_1k_cells": round(1000 * build["wall_seconds"] / spec.n_cells, 3),
            "stream_seconds_per_1k_train_cells": round(1000 * epoch["epoch_seconds"] / epoch["train_cells"], 3),
        }
        print(f"{spec.n_cells:,} cells: build {row['build_wall_seconds']:.1f} s, {row['build_peak_rss_mb']:.0f} MB; "
              f"epoch of {row['train_cells']:,} train cells {epoch['epoch_seconds']:.1f} s ({row['stream_wall_seconds']:.1f} s with start-up), "
              f"{row['stream_peak_rss_mb']:.0f} MB peak RSS", flush=True)
        return row
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="numbers of cells")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_stream", help="where inputs and datasets go (outside the repository)")
    parser.add_argument("--keep", action="store_true", help="keep each size's input, dataset and tokenizer")
    parser.add_argument("--quick", action="store_true", help="tiny files with few features (the smoke test)")
    parser.add_argument("--file_format", choices=["arrow", "parquet"], default="arrow", help="the dataset's files (dataset_builder --file_format)")
    parser.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="compress the input h5ad's count arrays")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    parser.add_argument("--stream", type=Path, default=None, help="only stream one epoch of this dataset folder's train split and print its figures as JSON")
    parser.add_argument("--tokenizer", type=Path, default=None, help="the tokenizer folder of --stream")
    for name, value in RECIPE.items():
        parser.add_argument(f"--{name}", type=int, default=value, help=f"data loading setting (default: the recipe's {value})")
    args = parser.parse_args(argv)
    recipe = {name: getattr(args, name) for name in RECIPE}
    if args.stream is not None:
        if args.tokenizer is None:
            raise ValueError("--stream needs --tokenizer TOK")
        print(json.dumps(stream_epoch(args.stream, args.tokenizer, **recipe)))
        return
    if Path(args.workdir).resolve().is_relative_to(common.REPO):
        raise ValueError(f"--workdir {args.workdir}: the simulated files are GBs; write them outside the repository (e.g. /tmp)")
    base = replace(make_large.LargeSpec.quick(), chunk_cells=200) if args.quick else make_large.LargeSpec()
    base = replace(base, with_x=False, compression=args.compression)
    sizes = [300] if args.quick else args.sizes
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [bench_size(replace(base, n_cells=n), args.workdir, recipe, args.keep, args.file_format) for n in sizes]
    common.write_results("stream_scale" if args.file_format == "arrow" else f"stream_scale_{args.file_format}", {"spec": {k: v for k, v in asdict(base).items() if k != "n_cells"}, "recipe": recipe, "sizes": rows},
                         args.quick, args.results_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
