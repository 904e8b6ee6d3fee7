"""Wall time of each step of one `build_dataset` run: read, plan, digest, records (prepare), save.

The steps are timed by wrapping `dataset_builder.builder`'s own functions, in this process; the content digest
runs in a thread beside the records, so its time overlaps theirs and the steps do not add up to the total.

    python bench/build_stages.py --input /tmp/bench_large.h5ad --test_batches s4d1 s4d8 s4d9 --validation_batches s3d7
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

STEPS = ("read_paired", "make_plan", "content_digest", "_save_dataset_dict")


def time_build(input_path: Path, output_dir: Path, **options) -> dict:
    """Build ``input_path`` into ``output_dir`` with each step of `build_dataset` timed (seconds)."""
    import dataset_builder.builder as builder

    seconds: dict[str, float] = {}

    def timed(name, function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

        return run

    originals = {name: getattr(builder, name) for name in STEPS}
    prepare = builder.CellSentencesBuilder.download_and_prepare
    try:
        for name, function in originals.items():
            setattr(builder, name, timed(name, function))
        builder.CellSentencesBuilder.download_and_prepare = timed("records (download_and_prepare)", prepare)
        start = time.perf_counter()
        builder.build_dataset([input_path], output_dir, overwrite=True, **options)
        seconds["total"] = time.perf_counter() - start
    finally:
        for name, function in originals.items():
            setattr(builder, name, function)
        builder.CellSentencesBuilder.download_and_prepare = prepare
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cpu_user_seconds": round(usage.ru_utime, 2),
        "cpu_system_seconds": round(usage.ru_stime, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Time each step of one dataset build (see the module docstring).")
    parser.add_argument("--input", type=Path, required=True, help="an input file of python -m dataset_builder")
    parser.add_argument("--test_batches", nargs="*", default=None)
    parser.add_argument("--validation_batches", nargs="*", default=None)
    parser.add_argument("--chunk_size", type=int, default=None, help="cells per chunk (default: the builder's)")
    parser.add_argument("--name", default="build_stages", help="results file name")
    parser.add_argument("--quick", action="store_true", help="smoke run (results to a temp folder)")
    parser.add_argument("--results_dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.input.exists():
        raise FileNotFoundError(f"--input {args.input} not found: make it with bench/make_large.py or pass another file")
    options = {"test_batches": args.test_batches, "validation_batches": args.validation_batches}
    if args.chunk_size:
        options["chunk_size"] = args.chunk_size
    with tempfile.TemporaryDirectory(prefix="build_stages_") as tmp:
        figures = time_build(args.input, Path(tmp) / "dataset", **options)
        shutil.rmtree(Path(tmp) / "dataset", ignore_errors=True)
    figures.update(input=str(args.input), options=options)
    print(" ".join(f"{k} {v:.2f} s" for k, v in figures["seconds"].items()),
          f"| user {figures['cpu_user_seconds']} s, system {figures['cpu_system_seconds']} s, peak RSS {figures['peak_rss_gb']} GB")
    common.write_results(args.name, figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
