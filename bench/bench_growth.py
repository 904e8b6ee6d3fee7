"""Growth benchmark: build time (and, with a model, predict time) against cells and against sentence length.

Cells: the first 1k, 10k and 69,249 cells of the simulated full-size file (``bench/make_large.py``),
each written as its own combined h5ad subset (rows copied with h5py, counts only) and built with
``python -m dataset_builder`` in a subprocess; time per cell should stay flat if cost grows linearly.
Sentence length: files of the same number of cells with 1/4, 1/2, 1 and 2 times the detected genes and
accessible peaks a cell. Predict (``--model DIR``, a model trained on the full-size file's features): ``python
predict.py`` on the same subsets in each direction (h5ad in, h5ad out), seconds per cell and peak RSS; with
``--predict_in_memory_at N`` also the whole-matrix path predict.py used before it wrote chunk by chunk.

    python bench/bench_growth.py                          # 1k, 10k, 69,249 cells; lengths at 5k cells
    python bench/bench_growth.py --reuse_full_build       # take the 69,249-cell build from results/build.json
    python bench/bench_growth.py --skip_build --model OUT --predict_sizes 1000 10000 69249 --predict_in_memory_at 10000
    python bench/bench_growth.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np
from anndata.io import read_elem, write_elem

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import make_large  # noqa: E402
from bench_build import LARGE_SPLITS, bench_cli_build  # noqa: E402


def write_subset(source: Path, target: Path, n_cells: int) -> Path:
    """Copy the first ``n_cells`` rows of a combined h5ad (counts layer, obs, var) into ``target``; cached."""
    if target.exists():
        with h5py.File(target, "r") as f:
            if int(f["layers/counts"].attrs["shape"][0]) == n_cells:
                return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with h5py.File(source, "r") as src, h5py.File(tmp, "w") as dst:
        dst.attrs.update(dict(src.attrs))
        counts = src["layers/counts"]
        indptr = counts["indptr"][: n_cells + 1]
        end = int(indptr[-1])
        layers = dst.create_group("layers")
        layers.attrs.update(dict(src["layers"].attrs))
        out = layers.create_group("counts")
        out.attrs.update(dict(counts.attrs))
        out.attrs["shape"] = np.array([n_cells, counts.attrs["shape"][1]], dtype=np.int64)
        out.create_dataset("indptr", data=indptr)
        # Copy in slices so memory stays bounded.
        for name in ("data", "indices"):
            ds = out.create_dataset(name, shape=(end,), dtype=counts[name].dtype)
            for start in range(0, end, 1 << 26):
                ds[start : min(end, start + (1 << 26))] = counts[name][start : min(end, start + (1 << 26))]
        write_elem(dst, "obs", read_elem(src["obs"]).iloc[:n_cells])
        write_elem(dst, "var", read_elem(src["var"]))
        for name in ("obsm", "varm", "obsp", "varp", "uns"):
            write_elem(dst, name, {})
    os.replace(tmp, target)
    return target


def _splits_for(path: Path) -> list[str]:
    """Batch splits when the subset holds the named batches, else a hash split (no flags)."""
    with h5py.File(path, "r") as f:
        batches = set(read_elem(f["obs/batch"]).astype(str))
    wanted = [b for b in LARGE_SPLITS if not b.startswith("--")]
    return LARGE_SPLITS if set(wanted) <= batches else []


def grow_cells(large: Path, sizes: list[int], workdir: Path, cache_dir: Path, reuse_full: dict | None) -> list[dict]:
    rows = []
    n_full = int(h5py.File(large, "r")["layers/counts"].attrs["shape"][0])
    for n in sizes:
        if n >= n_full and reuse_full is not None:
            figures = dict(reuse_full)
        else:
            path = large if n >= n_full else write_subset(large, cache_dir / f"bench_large_{n}.h5ad", n)
            figures = bench_cli_build(path, workdir / f"cells_{n}", _splits_for(path), min(n, n_full))
            shutil.rmtree(workdir / f"cells_{n}", ignore_errors=True)
        figures["seconds_per_1k_cells"] = round(figures["build_seconds"] / figures["cells"] * 1000, 3)
        rows.append(figures)
        print(f"{figures['cells']:>7,} cells: {figures['build_seconds']:.1f} s build, {figures['seconds_per_1k_cells']:.3f} s per 1k cells, "
              f"peak RSS {figures['peak_rss_mb'] / 1024:.2f} GB")
    return rows


def grow_length(spec: make_large.LargeSpec, scales: list[float], workdir: Path, cache_dir: Path) -> list[dict]:
    rows = []
    for scale in scales:
        s = replace(spec, genes_per_cell=spec.genes_per_cell * scale, peaks_per_cell=spec.peaks_per_cell * scale, with_x=False)
        path = make_large.write_large(cache_dir / f"bench_length_{s.n_cells}_{scale:g}.h5ad", s)
        nnz = json.loads(path.with_name(path.name + ".json").read_text())["nnz"]
        figures = bench_cli_build(path, workdir / f"length_{scale:g}", LARGE_SPLITS, s.n_cells)
        shutil.rmtree(workdir / f"length_{scale:g}", ignore_errors=True)
        figures.update({
            "length_scale": scale,
            "nonzeros_per_cell": round(nnz / s.n_cells, 1),
            "microseconds_per_nonzero": round(figures["build_seconds"] / nnz * 1e6, 4),
        })
        rows.append(figures)
        print(f"length x{scale:g} ({nnz / s.n_cells:,.0f} names a cell): {figures['build_seconds']:.1f} s, "
              f"{figures['microseconds_per_nonzero']:.4f} us per name")
    return rows


def _predict_cmd(model: Path, input_path: Path, direction: str, output: Path, batch_size: int, chunk_cells: int) -> list[str]:
    return [sys.executable, "predict.py", "--model", str(model), "--input", str(input_path), "--direction", direction,
            "--output", str(output), "--batch_size", str(batch_size), "--chunk_cells", str(chunk_cells), "--overwrite"]


# The code path predict.py had before it wrote chunk by chunk: the whole cells x features matrix in memory.
IN_MEMORY = ("import sys; from translator import CellTranslator; "
             "CellTranslator.from_pretrained(sys.argv[1]).predict_anndata(sys.argv[2], sys.argv[3], batch_size=int(sys.argv[5])).write_h5ad(sys.argv[4])")


def grow_predict(model: Path, large: Path, sizes: list[int], workdir: Path, cache_dir: Path, batch_size: int, chunk_cells: int,
                 in_memory_at: list[int]) -> list[dict]:
    """``python predict.py`` (h5ad in, h5ad out) on the first N cells of the full-size file, in each direction.

    Wall seconds less Python start-up and the model load (measured on 1 cell), per 1k cells, and peak RSS.
    ``in_memory_at``: cell counts at which the pre-chunking path (``predict_anndata`` + ``write_h5ad``) also runs.
    """
    n_full = int(h5py.File(large, "r")["layers/counts"].attrs["shape"][0])
    rows = []
    one = write_subset(large, cache_dir / "bench_large_1.h5ad", 1)
    out = workdir / "pred.h5ad"
    for direction in ("gex2atac", "atac2gex"):
        startup = min(common.run_measured(_predict_cmd(model, one, direction, out, batch_size, chunk_cells), cwd=common.REPO)["seconds"] for _ in range(2))
        for n in sizes:
            path = large if n >= n_full else write_subset(large, cache_dir / f"bench_large_{n}.h5ad", n)
            cells = min(n, n_full)
            variants = [("chunked", _predict_cmd(model, path, direction, out, batch_size, chunk_cells))]
            if n in in_memory_at:
                variants.append(("in_memory", [sys.executable, "-c", IN_MEMORY, str(model), str(path), direction, str(out), str(batch_size)]))
            for mode, cmd in variants:
                load = common.load_average()
                run = common.run_measured(cmd, cwd=common.REPO)
                seconds = max(run["seconds"] - startup, 1e-9)
                row = {"direction": direction, "mode": mode, "cells": cells, "wall_seconds": round(run["seconds"], 2),
                       "startup_and_model_load_seconds": round(startup, 2), "predict_seconds": round(seconds, 2),
                       "cells_per_s": round(cells / seconds, 1), "seconds_per_1k_cells": round(seconds / cells * 1000, 3),
                       "peak_rss_mb": round(run["peak_rss_mb"], 1), "output_bytes": out.stat().st_size, "load_average_before": load,
                       "chunk_cells": chunk_cells if mode == "chunked" else None}
                out.unlink()
                rows.append(row)
                print(f"predict {direction} {mode:>9} {cells:>7,} cells: {seconds:.1f} s ({cells / seconds:,.1f} cells/s, "
                      f"{row['seconds_per_1k_cells']:.2f} s per 1k), peak RSS {run['peak_rss_mb'] / 1024:.2f} GB, "
                      f"output {row['output_bytes'] / 1e9:.2f} GB")
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Growth benchmark (see the module docstring).")
    parser.add_argument("--large", type=Path, default=make_large.DEFAULT_OUTPUT, help="the simulated full-size .h5ad (made if absent)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="cell counts (default 1000 10000 69249)")
    parser.add_argument("--length_cells", type=int, default=None, help="cells of each sentence-length file (default 5000)")
    parser.add_argument("--length_scales", type=float, nargs="+", default=None, help="sentence length factors (default 0.25 0.5 1 2)")
    parser.add_argument("--reuse_full_build", action="store_true", help="take the full-size build from bench/results/build.json")
    parser.add_argument("--model", type=Path, default=None, help="a model folder trained on the full-size file's features: also time predict.py")
    parser.add_argument("--predict_sizes", type=int, nargs="+", default=None, help="cell counts for predict (default: --sizes)")
    parser.add_argument("--predict_in_memory_at", type=int, nargs="*", default=[], help="cell counts at which the whole-matrix path runs too")
    parser.add_argument("--skip_build", action="store_true", help="predict growth only")
    parser.add_argument("--batch_size", type=int, default=64, help="predict batch size")
    parser.add_argument("--chunk_cells", type=int, default=1024, help="predict.py --chunk_cells")
    parser.add_argument("--cache_dir", type=Path, default=Path(tempfile.gettempdir()), help="where subset files are cached")
    parser.add_argument("--quick", action="store_true", help="smoke run at tiny sizes")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    args = parser.parse_args(argv)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_growth_") as tmp:
        workdir = Path(tmp)
        if args.quick:
            spec = make_large.LargeSpec.quick()
            large = make_large.write_large(workdir / "bench_small.h5ad", spec)
            sizes, cache_dir = args.sizes or [200, 800], workdir
            length_spec, scales = replace(spec, n_cells=args.length_cells or 300), args.length_scales or [0.5, 1.0]
        else:
            spec = make_large.LargeSpec()
            large = make_large.write_large(args.large, spec)
            sizes, cache_dir = args.sizes or [1_000, 10_000, spec.n_cells], args.cache_dir
            length_spec, scales = replace(spec, n_cells=args.length_cells or 5_000), args.length_scales or [0.25, 0.5, 1.0, 2.0]
        reuse = None
        if args.reuse_full_build:
            found = [p for p in (common.RESULTS_DIR / "build.json", common.RESULTS_DIR / "build_large.json") if p.exists()]
            if not found:
                raise FileNotFoundError(f"--reuse_full_build: no build.json or build_large.json in {common.RESULTS_DIR}; run bench/bench_build.py first")
            saved = max(found, key=lambda p: p.stat().st_mtime)
            reuse = {**json.loads(saved.read_text())["large"]["build"], "reused_from": f"bench/results/{saved.name}"}
        if not args.skip_build:
            figures["cells"] = grow_cells(large, sorted(sizes), workdir, cache_dir, reuse)
            per = [r["seconds_per_1k_cells"] for r in figures["cells"]]
            # A tiny smoke build can finish within the start-up time it is corrected for (0 s): no ratio then.
            figures["cells_time_per_1k_ratio_largest_over_smallest"] = round(per[-1] / per[0], 2) if per[0] > 0 else None
            figures["length"] = grow_length(length_spec, scales, workdir, cache_dir)
            figures["length_spec"] = asdict(length_spec)
        if args.model is not None:
            figures["predict"] = grow_predict(args.model, large, sorted(args.predict_sizes or sizes), workdir, cache_dir, args.batch_size,
                                              args.chunk_cells, args.predict_in_memory_at)
    common.write_results("growth_predict" if args.skip_build else "growth", figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
