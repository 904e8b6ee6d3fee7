"""The cross-dataset benchmark: each paired input built, tokenized, trained with the default recipe, scored against the baselines.

    python -m evaluation.benchmark --input pbmc=pbmc.h5mu --input bmmc=rna.h5ad,atac.h5ad \\
        --build_args bmmc="--test_batches s1d2" --time_budget_s 900 --output_dir bench_out

For each ``NAME=FILE[,FILE2]``: ``python -m dataset_builder`` (its split options from ``--build_args NAME=...``; without
batch options the cells are split 80/10/10 by a hash of the barcode), ``python -m tokenizer``, ``python train.py`` with
no recipe flags and ``--max_train_seconds`` = ``--time_budget_s``, then :func:`evaluation.runner.run_evaluation` on
``--split`` against zeros / mean / svd_knn / svd_krr (and seed_binary, the same recipe on binary GEX sentences, with
``--seed_binary``) with the paired bootstrap. ``OUT/benchmark.json`` and ``OUT/benchmark.md`` hold one table across
datasets: dataset x direction x metric, the model's margin over the best baseline (positive: the model is better) with
its 95% bootstrap interval, and a verdict: ``ahead`` or ``behind`` where the interval excludes zero, else ``tied``.
Each dataset's folders (data, tokenizer, model, evaluation) stay under ``OUT/NAME``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from dataset_builder.outputs import check_output, write_text_atomic
from evaluation.baselines import BASELINES
from evaluation.report import results_json
from evaluation.runner import library_versions, portable_command
from tokenizer import DIRECTION_NAMES

REPO = Path(__file__).resolve().parents[1]
METRIC_NAMES = {"rmse": "RMSE", "pearson_cell": "per-cell Pearson", "auroc_cell": "per-cell AUROC", "ap_cell": "per-cell AP"}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m evaluation.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="NAME=FILE[,FILE2]",
                        help="a paired dataset: one combined file, or RNA and ATAC files; repeat for more datasets")
    parser.add_argument("--build_args", action="append", default=[], metavar="NAME=ARGS",
                        help="dataset_builder options for dataset NAME, e.g. bmmc=\"--test_batches s1d2 --top_peaks 10000\"")
    parser.add_argument("--time_budget_s", type=float, default=900.0, help="train.py's --max_train_seconds for each model (the whole training job)")
    parser.add_argument("--output_dir", required=True, help="where benchmark.json, benchmark.md and each dataset's folders go")
    parser.add_argument("--split", default="validation", choices=("validation", "test"), help="the split scored")
    parser.add_argument("--seed_binary", action="store_true", help="also train the recipe on binary GEX sentences (baseline seed_binary)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the scored cells")
    parser.add_argument("--train_args", default="", help="extra train.py flags for every model (experiments; the benchmark of the default passes none)")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="rebuild and retrain datasets whose folders exist under --output_dir")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    args.inputs = parse_inputs(args.input)
    args.builder = parse_build_args(args.build_args, args.inputs)
    if not args.time_budget_s > 0:
        parser.error(f"--time_budget_s must be a positive number of seconds, got {args.time_budget_s}")
    if args.bootstrap < 1:
        parser.error(f"--bootstrap must be a number of resamples >= 1, got {args.bootstrap}")
    return args


def parse_inputs(values: Sequence[str]) -> dict[str, list[Path]]:
    """``NAME=FILE[,FILE2]`` -> ``{NAME: [files]}``, each file checked to exist."""
    inputs: dict[str, list[Path]] = {}
    for value in values:
        name, sep, files = value.partition("=")
        if not sep or not name or not files:
            raise ValueError(f"--input {value!r}: write NAME=FILE or NAME=RNA_FILE,ATAC_FILE")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"--input {value!r}: the name {name!r} names a folder; use letters, digits, - and _")
        if name in inputs:
            raise ValueError(f"--input: the name {name!r} is given twice; give each dataset its own name")
        paths = [Path(f) for f in files.split(",")]
        if len(paths) > 2:
            raise ValueError(f"--input {value!r}: at most two files (RNA, ATAC), got {len(paths)}")
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"--input {name}: {path} not found")
        inputs[name] = paths
    return inputs


def parse_build_args(values: Sequence[str], inputs: dict[str, list[Path]]) -> dict[str, list[str]]:
    """``NAME=ARGS`` -> ``{NAME: [dataset_builder flags]}`` for names among ``inputs``."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, flags = value.partition("=")
        if not sep or name not in inputs:
            raise ValueError(f"--build_args {value!r}: write NAME=\"FLAGS\" with NAME one of the --input names ({', '.join(inputs)})")
        out[name] = shlex.split(flags)
    return out


def _run(command: list[str], log: Path, what: str) -> float:
    """Run one step of the benchmark with its output in ``log``; its wall time, or one line naming the step and the log."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(no output)"]
        raise ValueError(f"{what} failed (exit {done.returncode}): {tail[0]} -- see {log}")
    return time.perf_counter() - started


def prepare_dataset(name: str, files: list[Path], builder_flags: list[str], folder: Path, budget: float, train_flags: list[str],
                    binary: bool = False, overwrite: bool = False) -> dict:
    """Build, tokenize and train one dataset under ``folder`` (kept when already complete, unless ``overwrite``); the steps' wall times."""
    suffix = "_binary" if binary else ""
    data, tok, model = folder / f"data{suffix}", folder / f"tokenizer{suffix}", folder / f"model{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    times = {}
    if overwrite or not (data / "cell_sentences.json").exists():
        command = [sys.executable, "-m", "dataset_builder", *[a for f in files for a in ("--input", str(f))], "--output_dir", str(data),
                   "--overwrite_output_dir", *builder_flags, *(["--gex_encoding", "binary"] if binary else [])]
        times["build_s"] = _run(command, folder / f"build{suffix}.log", f"{name}: dataset_builder")
    if overwrite or not (tok / "tokenizer.json").exists():
        command = [sys.executable, "-m", "tokenizer", "--dataset", str(data), "--output_dir", str(tok), "--overwrite_output_dir"]
        times["tokenizer_s"] = _run(command, folder / f"tokenizer{suffix}.log", f"{name}: tokenizer")
    if overwrite or not (model / "training_args.json").exists():
        command = [sys.executable, "train.py", "--dataset_dir", str(data), "--tokenizer_dir", str(tok), "--output_dir", str(model),
                   "--overwrite_output_dir", "--max_train_seconds", f"{budget:g}", "--evaluate", "false", *train_flags]
        times["train_s"] = _run(command, folder / f"train{suffix}.log", f"{name}: train.py")
    return {"data": data, "model": model, "times": {k: round(v, 1) for k, v in times.items()}}


def verdicts(results: dict) -> list[dict]:
    """One row per direction and headline metric: the model's value, the best baseline's, the margin and its 95% interval, the verdict.

    The margin is oriented so that positive means the model is better (baseline minus model for RMSE, model minus
    baseline otherwise); the interval is the paired bootstrap's 2.5 and 97.5 percentiles of that margin.
    """
    rows = []
    for direction, boot in results.get("bootstrap", {}).items():
        block = results["directions"][direction]
        for metric, entry in boot["metrics"].items():
            baselines = {name: values[metric] for name, values in block["baselines"].items() if name in entry["versus"]}
            if not baselines:
                continue
            lower_better = metric == "rmse"
            best = min(baselines, key=baselines.get) if lower_better else max(baselines, key=baselines.get)
            versus = entry["versus"][best]
            sign = -1.0 if lower_better else 1.0
            low, high = sorted(sign * q for q in versus["interval_95"])
            verdict = "ahead" if low > 0 else "behind" if high < 0 else "tied"
            rows.append({"direction": direction, "metric": metric, "model": block["model"][metric], "best_baseline": best,
                         "baseline": baselines[best], "margin": sign * versus["difference"], "interval_95": [low, high], "verdict": verdict,
                         "share_first": entry["share_first"]})
    return rows


def with_transformer_alone(rows: list[dict], results: dict) -> list[dict]:
    """``rows`` (:func:`verdicts`) with the transformer's readout alone beside each: its value, margin over the best baseline,
    interval and verdict (``transformer_alone``), and the blend's weights of the direction (``weights``)."""
    blocks = {d: {"model": b["transformer_alone"], "baselines": b["baselines"]} for d, b in results["directions"].items() if "transformer_alone" in b}
    alone = {(r["direction"], r["metric"]): r for r in verdicts({"bootstrap": results.get("bootstrap_transformer_alone", {}), "directions": blocks})}
    out = []
    for row in rows:
        other = alone.get((row["direction"], row["metric"]))
        weights = results["directions"][row["direction"]].get("blend_weights")
        out.append({**row, "transformer_alone": other and {k: other[k] for k in ("model", "best_baseline", "margin", "interval_95", "verdict")},
                    "weights": weights})
    return out


def compact_table(summary: dict) -> str:
    """One line per dataset and direction: each headline metric's margin over the best baseline and verdict, and the
    blend's weights (the README's table)."""
    lines = ["| dataset | test cells | direction | RMSE | per-cell Pearson | per-cell AUROC | per-cell AP | weights t/k/m |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["datasets"].items():
        by_direction: dict[str, dict] = {}
        for row in entry["rows"]:
            by_direction.setdefault(row["direction"], {})[row["metric"]] = row
        for direction, rows in by_direction.items():
            cells = [f"{rows[m]['margin']:+.5f} {rows[m]['verdict']}" if m in rows else "-" for m in METRIC_NAMES]
            weights = next(iter(rows.values())).get("weights")
            weight_cell = "/".join(f"{weights[p]:.2f}" for p in ("transformer", "kernel", "mean")) if weights else "-"
            lines.append(f"| {name} | {entry['n_cells']} | {DIRECTION_NAMES[direction]} | {' | '.join(cells)} | {weight_cell} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    """The table across datasets."""
    lines = [f"Split: {summary['split']}; {summary['bootstrap']} paired bootstrap resamples of the cells; margin = the model's lead over the "
             "best baseline (positive: the model is better; for RMSE, baseline minus model); verdict `ahead` / `behind` only where the "
             "95% interval excludes zero.", "",
             "The transformer alone: the model folder's transformer readout without the blend, against the same baselines; weights: "
             "the blend's transformer / kernel / mean weights, chosen on held-out training cells.", "",
             "| dataset | cells | direction | metric | model | best baseline | margin | 95% interval | verdict | transformer alone | its margin "
             "[95% interval] | its verdict | weights t/k/m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["datasets"].items():
        for row in entry["rows"]:
            low, high = row["interval_95"]
            alone, weights = row.get("transformer_alone"), row.get("weights")
            alone_cells = (f"{alone['model']:.6f} | {alone['margin']:+.6f} [{alone['interval_95'][0]:+.6f}, {alone['interval_95'][1]:+.6f}] | "
                           f"{alone['verdict']}") if alone else "- | - | -"
            weight_cell = "/".join(f"{weights[p]:.2f}" for p in ("transformer", "kernel", "mean")) if weights else "-"
            lines.append(f"| {name} | {entry['n_cells']} | {DIRECTION_NAMES[row['direction']]} | {METRIC_NAMES.get(row['metric'], row['metric'])} | "
                         f"{row['model']:.6f} | {row['best_baseline']} {row['baseline']:.6f} | {row['margin']:+.6f} | [{low:+.6f}, {high:+.6f}] | "
                         f"{row['verdict']} | {alone_cells} | {weight_cell} |")
    lines.append("")
    for name, entry in summary["datasets"].items():
        train = entry["training"]
        lines.append(f"- {name}: {train['completed_steps']} steps in {train['train_seconds']} s (train.py job {entry['times'].get('train_s', '-')} s; "
                     f"budget {summary['time_budget_s']:g} s){'; stopped early at step ' + str(train['early_stopped_at']) if train.get('early_stopped_at') else ''}")
    return "\n".join(lines) + "\n"


def run_benchmark(args: argparse.Namespace) -> dict:
    from evaluation.runner import run_evaluation

    started = time.perf_counter()
    out = Path(args.output_dir)
    check_output(out, {"--input": [f for files in args.inputs.values() for f in files]}, "--output_dir")
    out.mkdir(parents=True, exist_ok=True)
    train_flags = shlex.split(args.train_args)
    summary: dict = {"split": args.split, "bootstrap": args.bootstrap, "time_budget_s": args.time_budget_s, "train_args": train_flags,
                     "command": portable_command(sys.argv), "versions": library_versions(), "datasets": {}}
    for name, files in args.inputs.items():
        folder = out / name
        flags = args.builder.get(name, [])
        print(f"{name}: building, training ({args.time_budget_s:g} s budget) ...", flush=True)
        made = prepare_dataset(name, files, flags, folder, args.time_budget_s, train_flags, overwrite=args.overwrite_output_dir)
        seed = prepare_dataset(name, files, flags, folder, args.time_budget_s, train_flags, binary=True, overwrite=args.overwrite_output_dir) if args.seed_binary else None
        results = run_evaluation(model=str(made["model"]), dataset_dir=str(made["data"]), split=args.split, output_dir=str(folder / f"eval_{args.split}"),
                                 seed_model=str(seed["model"]) if seed else None, baselines=BASELINES, dataset_name=name, update_model_folder=False,
                                 make_plots=False, progress=False, bootstrap=args.bootstrap, command=portable_command(sys.argv),
                                 transformer_alone=True)
        training = json.loads((made["model"] / "training_args.json").read_text())
        summary["datasets"][name] = {
            "files": [f.name for f in files], "build_args": flags, "n_cells": results["n_cells"], "rows": with_transformer_alone(verdicts(results), results),
            "times": {**made["times"], "evaluation_s": results["wall_time_s"]},
            "training": {k: training.get(k) for k in ("completed_steps", "planned_steps", "train_seconds", "early_stopped_at", "best_validation_step",
                                                      "stopped_by_time_limit", "n_parameters")},
        }
        write_outputs(out, summary)  # after each dataset: a long run shows what it has so far
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    write_outputs(out, summary)
    print(markdown(summary))
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'} ({summary['wall_time_s']} s)")
    return summary


def write_outputs(out: Path, summary: dict) -> None:
    write_text_atomic(out / "benchmark.json", results_json(summary))
    write_text_atomic(out / "benchmark.md", markdown(summary))


def main(argv: Sequence[str] | None = None) -> int:
    from dataset_builder.cli import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        run_benchmark(parse_args(argv))
        return 0

    return run_cli(body, debug="--debug" in argv, errors=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
