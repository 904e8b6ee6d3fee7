"""Build benchmark: the paper's preprocessing vs ours on MOp, and a GSE194122-size input end to end.

(a) MOp (``mop_snare.h5mu``), in one process and run: the paper's reference (dense matrices, a Python
    loop over cells and features, one dict of strings a cell, a .txt) against ``dataset_builder``'s
    vectorized sentence making (``encode_cells``) on the same cells with the same (binary) encoding,
    then the rank encoding; the outputs are compared cell by cell. Then the end-to-end CLI build in a
    subprocess: cells/s and peak RSS.
(b) The simulated full-size file of ``bench/make_large.py`` (69,249 cells, 129,921 features): the CLI
    build from file to saved records in a subprocess (seconds, peak RSS), and the I/O floor measured in
    the same run: reading the file's count matrix, plus writing Arrow records of the saved size.

    python bench/bench_build.py                 # (a) and (b); (b) builds /tmp/bench_large.h5ad first if absent
    python bench/bench_build.py --skip_large    # (a) only
    python bench/bench_build.py --quick         # smoke run: 300 MOp cells and a tiny simulated file
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import make_large  # noqa: E402
import paper_reference  # noqa: E402

TARGET_RATIO = 100.0
TARGET_LARGE_SECONDS = 120.0
TARGET_LARGE_RSS_GB = 6.0
TARGET_FLOOR_FACTOR = 2.0
MOP_SPLITS = ["--test_batches", "09K", "09L", "--validation_batches", "09J"]
LARGE_SPLITS = ["--test_batches", "s4d1", "s4d8", "s4d9", "--validation_batches", "s3d7"]


def _ours(paired, encoding: str, repeats: int) -> tuple[dict, float]:
    """Our matrices -> sentences step (size factors + encode_cells); best wall time of ``repeats``."""
    from dataset_builder.sentences import encode_cells, library_size_factors

    genes, peaks = pa.array(paired.genes, pa.string()), pa.array(paired.peaks, pa.string())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        sf = library_size_factors(paired.gex)
        columns = encode_cells(paired.gex, paired.atac, sf, genes, peaks, gex_encoding=encoding)
        best = min(best, time.perf_counter() - t)
    return columns, best


def _subset(paired, n_cells: int):
    from dataclasses import replace

    n = min(n_cells, paired.n_cells)
    return replace(paired, cells=paired.cells[:n], gex=paired.gex[:n], atac=paired.atac[:n], obs=paired.obs.iloc[:n],
                   size_factors=None)


def bench_mop(path: Path, n_cells: int, repeats: int, workdir: Path) -> dict:
    """Part (a): paper reference vs ours, same process, same cells; then the end-to-end CLI build."""
    from dataset_builder.readers import read_paired

    t = time.perf_counter()
    paired = _subset(read_paired([path]), n_cells)
    read_seconds = time.perf_counter() - t
    n = paired.n_cells
    print(f"MOp: {n:,} cells, {len(paired.genes):,} genes, {len(paired.peaks):,} peaks (read in {read_seconds:.1f} s)")

    load_before = common.load_average()
    ref = paper_reference.paper_preprocess(paired.gex, paired.atac, paired.genes, paired.peaks, workdir / "paper_cells.txt")
    ref_seconds = ref["seconds"]
    ref_sentences = ref_seconds["dense"] + ref_seconds["normalize"] + ref_seconds["loop"]
    binary, ours_binary = _ours(paired, "binary", repeats)
    rank, ours_rank = _ours(paired, "rank", repeats)
    load_after = common.load_average()

    gex_ours = binary["gex_text"].to_pylist()
    atac_ours = binary["atac_text"].to_pylist()
    gex_mismatch = sum(a != c["gex"] for a, c in zip(gex_ours, ref["cells"], strict=True))
    atac_mismatch = sum(a != c["atac"] for a, c in zip(atac_ours, ref["cells"], strict=True))
    ratio_binary = ref_sentences / ours_binary
    figures = {
        "cells": n,
        "genes": len(paired.genes),
        "peaks": len(paired.peaks),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "paper_reference_seconds": {**{k: round(v, 4) for k, v in ref_seconds.items()}, "matrices_to_sentences": round(ref_sentences, 4)},
        "paper_reference_cells_per_s": round(n / ref_sentences, 1),
        "ours_binary_seconds": round(ours_binary, 4),
        "ours_rank_seconds": round(ours_rank, 4),
        "ours_binary_cells_per_s": round(n / ours_binary, 1),
        "ours_rank_cells_per_s": round(n / ours_rank, 1),
        "ratio_binary_like_for_like": round(ratio_binary, 1),
        "ratio_paper_binary_vs_ours_rank": round(ref_sentences / ours_rank, 1),
        "ratio_paper_with_txt_vs_ours_binary": round((ref_sentences + ref_seconds["write"]) / ours_binary, 1),
        "target_ratio": TARGET_RATIO,
        "ratio_target_met": bool(ratio_binary >= TARGET_RATIO),
        "binary_output_mismatching_cells": {"gex": gex_mismatch, "atac": atac_mismatch},
        "ours_repeats": repeats,
    }
    print(f"paper reference: {ref_sentences:.2f} s matrices->sentences (+{ref_seconds['write']:.2f} s .txt) = {n / ref_sentences:,.0f} cells/s")
    print(f"ours (binary):   {ours_binary:.4f} s = {n / ours_binary:,.0f} cells/s  ->  {ratio_binary:,.0f}x (target >= {TARGET_RATIO:.0f}x)")
    print(f"ours (rank):     {ours_rank:.4f} s = {n / ours_rank:,.0f} cells/s")
    print(f"binary sentences differing from the paper's: gex {gex_mismatch}, atac {atac_mismatch} of {n} cells")
    del ref, binary, rank
    return figures


def _cli(input_path: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "dataset_builder", "--input", str(input_path), "--output_dir", str(out), *extra]


_STARTUP: list[float] = []


def _startup_seconds() -> float:
    """Wall time of starting Python and importing dataset_builder (subtracted to give build time proper).

    Measured once per process (the fastest of two runs), then reused.
    """
    if not _STARTUP:
        cmd = [sys.executable, "-c", "import dataset_builder, dataset_builder.__main__, tqdm.auto"]
        _STARTUP.append(min(common.run_measured(cmd, cwd=common.REPO)["seconds"] for _ in range(2)))
    return _STARTUP[0]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_cli_build(input_path: Path, out: Path, extra: list[str], n_cells: int) -> dict:
    """Run ``python -m dataset_builder`` in a subprocess; wall seconds, peak RSS and cells/s."""
    if out.exists():
        shutil.rmtree(out)
    load_before = common.load_average()
    startup = _startup_seconds()
    run = common.run_measured(_cli(input_path, out, extra), cwd=common.REPO)
    build = max(run["seconds"] - startup, 1e-9)
    figures = {
        "command": " ".join(["python", "-m", "dataset_builder", *_cli(input_path, out, extra)[3:]]),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "wall_seconds": round(run["seconds"], 2),
        "cpu_seconds": run["cpu_seconds"],
        "python_startup_and_import_seconds": round(startup, 2),
        "build_seconds": round(build, 2),
        "cells": n_cells,
        "cells_per_s": round(n_cells / build, 1),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "output_bytes": _dir_bytes(out),
    }
    print(f"build: {run['seconds']:.1f} s wall ({startup:.1f} s of it Python start + imports), {n_cells / build:,.0f} cells/s, "
          f"peak RSS {run['peak_rss_mb'] / 1024:.2f} GB, output {figures['output_bytes'] / 1e9:.2f} GB")
    return figures


def read_floor(path: Path) -> dict:
    """Time to read the file's raw count matrix (data, indices, indptr) into memory with h5py."""
    t = time.perf_counter()
    nbytes = 0
    with h5py.File(path, "r") as f:
        group = f["layers/counts"] if "layers" in f and "counts" in f["layers"] else f["X"]
        for name in ("indptr", "indices", "data"):
            array = group[name][...]
            nbytes += array.nbytes
            del array
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 4), "bytes": nbytes, "gb_per_s": round(nbytes / seconds / 1e9, 2)}


def write_floor(dataset_dir: Path, total_bytes: int, workdir: Path) -> dict:
    """Time to write ``total_bytes`` of Arrow records: real record batches from the built dataset, written again and again.

    One batch (up to 1,000 cells) is read into memory first, so the timing holds writing only.
    """
    arrow_files = sorted(p for p in dataset_dir.rglob("*.arrow"))
    if not arrow_files:
        raise FileNotFoundError(f"no .arrow files under {dataset_dir}: the build did not save records")
    with pa.memory_map(str(arrow_files[0])) as source:
        table = pa.ipc.open_stream(source).read_all()
    # Copy the rows out of the memory map so that writing does not page the source in.
    sink_buffer = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink_buffer, table.schema) as writer:
        writer.write_table(table.slice(0, min(1_000, table.num_rows)))
    batch = pa.ipc.open_stream(sink_buffer.getvalue()).read_all()
    del table
    batch_bytes = max(batch.nbytes, 1)
    target = workdir / "floor.arrow"
    t = time.perf_counter()
    written = 0
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        while written < total_bytes:
            writer.write_table(batch)
            written += batch_bytes
    seconds = time.perf_counter() - t
    target.unlink()
    return {"seconds": round(seconds, 4), "bytes": written, "gb_per_s": round(written / seconds / 1e9, 2)}


def bench_large(path: Path, workdir: Path, spec: make_large.LargeSpec) -> dict:
    """Part (b): file -> saved records for the GSE194122-size file, with the I/O floor of the same run."""
    make_large.write_large(path, spec)
    dense_bytes = spec.n_cells * (spec.n_genes + spec.n_peaks) * 8
    out = workdir / "large_dataset"
    # Read twice: the first read may come from disk, the second from the page cache, as the build's read
    # right after it does; the faster one is the floor (the stricter comparison).
    reads = [read_floor(path), read_floor(path)]
    floor_read = min(reads, key=lambda r: r["seconds"])
    floor_read["all_seconds"] = [r["seconds"] for r in reads]
    print(f"I/O floor, read counts: {floor_read['seconds']:.1f} s ({floor_read['bytes'] / 1e9:.2f} GB; reads took "
          f"{', '.join(f'{r:.1f}' for r in floor_read['all_seconds'])} s)")
    # Dirty pages of earlier writes are flushed first, so neither the build nor the write floor pays for the
    # other's writeback.
    os.sync()
    build = bench_cli_build(path, out, LARGE_SPLITS, spec.n_cells)
    arrow_bytes = sum(p.stat().st_size for p in out.rglob("*.arrow"))
    os.sync()
    floor_write = write_floor(out, arrow_bytes, workdir)
    print(f"I/O floor, write {arrow_bytes / 1e9:.2f} GB of Arrow: {floor_write['seconds']:.1f} s")
    floor = floor_read["seconds"] + floor_write["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    # The quick smoke file reads and writes in well under a millisecond: keep the ratio finite.
    factor = build["build_seconds"] / max(floor, 1e-4)
    figures = {
        "input": str(path),
        "input_bytes": path.stat().st_size,
        "spec": {k: v for k, v in vars(spec).items()} if hasattr(spec, "__dict__") else str(spec),
        "build": build,
        "arrow_bytes": arrow_bytes,
        "io_floor": {"read_counts": floor_read, "write_arrow": floor_write, "seconds": round(floor, 2)},
        "build_over_floor": round(factor, 2),
        "paper_dense_float64_bytes": dense_bytes,
        "paper_dense_float64_gb": round(dense_bytes / 1e9, 1),
        "paper_dense_float64_gib": round(dense_bytes / 2**30, 1),
        "targets": {
            "seconds": TARGET_LARGE_SECONDS, "peak_rss_gb": TARGET_LARGE_RSS_GB, "floor_factor": TARGET_FLOOR_FACTOR,
            "seconds_met": bool(build["build_seconds"] < TARGET_LARGE_SECONDS),
            "peak_rss_met": bool(build["peak_rss_mb"] / 1024 < TARGET_LARGE_RSS_GB),
            "floor_factor_met": bool(factor <= TARGET_FLOOR_FACTOR),
        },
    }
    print(f"large build: {build['build_seconds']:.1f} s (target < {TARGET_LARGE_SECONDS:.0f}), peak RSS "
          f"{build['peak_rss_mb'] / 1024:.2f} GB (target < {TARGET_LARGE_RSS_GB:.0f}), {factor:.2f}x the I/O floor of {floor:.1f} s")
    print(f"the paper's dense float64 matrices would need {dense_bytes / 1e9:.1f} GB ({dense_bytes / 2**30:.1f} GiB) before any copy")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Build benchmark (see the module docstring).")
    parser.add_argument("--mop", type=Path, default=common.MOP_H5MU, help="the MOp .h5mu (../shared/data/mop_snareseq/mop_snare.h5mu)")
    parser.add_argument("--n_cells", type=int, default=None, help="MOp cells for the side-by-side comparison (default all)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of our (fast) side; the best is kept")
    parser.add_argument("--large", type=Path, default=make_large.DEFAULT_OUTPUT, help="the simulated full-size .h5ad (made if absent)")
    parser.add_argument("--skip_large", action="store_true", help="skip part (b)")
    parser.add_argument("--skip_mop", action="store_true", help="skip part (a)")
    parser.add_argument("--quick", action="store_true", help="smoke run at tiny sizes")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    args = parser.parse_args(argv)
    if not args.skip_mop and not args.mop.exists():
        raise FileNotFoundError(f"--mop {args.mop} not found: point it at mop_snare.h5mu or pass --skip_mop")
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        workdir = Path(tmp)
        if not args.skip_mop:
            n_cells = args.n_cells or (300 if args.quick else 10**9)
            figures["mop_side_by_side"] = bench_mop(args.mop, n_cells, args.repeats, workdir)
            if not args.quick:  # the CLI builds all 10,309 cells; the quick run builds the tiny simulated file below
                figures["mop_cli_build"] = bench_cli_build(
                    args.mop, workdir / "mop_dataset", MOP_SPLITS, _mop_cells(args.mop))
        if not args.skip_large:
            spec = make_large.LargeSpec.quick() if args.quick else make_large.LargeSpec()
            large = args.large if not args.quick else workdir / "bench_small.h5ad"
            figures["large"] = bench_large(large, workdir, spec)
    name = "build" if not (args.skip_mop or args.skip_large) else "build_large" if args.skip_mop else "build_mop"
    common.write_results(name, figures, args.quick, args.results_dir)
    return figures


def _mop_cells(path: Path) -> int:
    with h5py.File(path, "r") as f:
        obs = f["mod/rna/obs"] if "mod" in f else f["obs"]
        index_key = obs.attrs.get("_index", "_index")
        return int(obs[index_key].shape[0])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
