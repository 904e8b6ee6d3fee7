"""Evaluate a cell translator against strong baselines on one split of a dataset folder.

    python eval.py --model OUT --dataset_dir DATA --split test --output_dir OUT/eval \
        [--directions gex2atac atac2gex] [--seed_model SEED_OUT] [--max_cells N] [--skip_model]

Writes ``eval_results.json`` (every metric of the model and of each baseline), ``eval_results.md``
(the table the model card embeds) and PNG plots to ``--output_dir``; when ``--model`` is a local
folder, also copies the results there and merges ``model-index`` into its ``README.md``.
Baselines fit on the train split and choose their settings on the validation split.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dataset_builder.cli import run_main
from evaluation.baselines import BASELINES
from evaluation.runner import run_evaluation
from tokenizer import DIRECTIONS

__all__ = ["cli", "main", "parse_args", "run_evaluation"]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="model folder written by train.py, or a Hub id")
    model.add_argument("--seed_model", help="model trained on --gex_encoding binary sentences (baseline seed_binary)")
    model.add_argument("--skip_model", action="store_true", help="score the baselines only")
    model.add_argument("--batch_size", type=int, default=64, help="cells per generation batch")
    model.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when torch sees one), cpu, cuda[:N]")
    model.add_argument("--allow_pickle", action="store_true", help="load pickle weights (pytorch_model.bin); they can run code: only for trusted folders")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_dir", required=True, help="folder written by `python -m dataset_builder`")
    data.add_argument("--dataset_name", help="name recorded in the results (default: the folder name)")
    data.add_argument("--split", default="test", choices=("train", "validation", "test"))
    data.add_argument("--max_cells", type=int, help="score at most this many cells (evenly spaced)")
    data.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="where eval_results.json, eval_results.md and plots go")
    run.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES, help="baselines to fit")
    run.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--no_update_model_folder", action="store_true", help="leave the model folder untouched")
    run.add_argument("--seed", type=int, default=0, help="random seed of the SVD baselines")
    run.add_argument("--krr_landmarks", type=int, default=1000, help="Nystroem landmarks of the svd_krr baseline")
    run.add_argument("--refit_baselines", action="store_true", help="after tuning on validation, fit the baselines again on train and "
                     "validation together (for a model trained on every cell: train.py on a dataset built with --no_validation)")
    run.add_argument("--bootstrap", type=int, default=0, help="paired bootstrap resamples of the cells (e.g. 2000): how often the model "
                     "stays first on each headline metric, and its margins with standard deviations; 0: off")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.skip_model and not args.model:
        parser.error("give --model DIR (or a Hub id), or --skip_model to score the baselines only")
    if args.max_cells is not None and args.max_cells <= 0:
        parser.error("--max_cells must be positive")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 (off) or a number of resamples, got {args.bootstrap}")
    for name in ("batch_size", "krr_landmarks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run_evaluation(
        model=None if args.skip_model else args.model,
        dataset_dir=args.dataset_dir,
        split=args.split,
        output_dir=args.output_dir,
        directions=args.directions,
        seed_model=args.seed_model,
        max_cells=args.max_cells,
        skip_model=args.skip_model,
        baselines=args.baselines,
        batch_size=args.batch_size,
        dataset_name=args.dataset_name,
        update_model_folder=not args.no_update_model_folder,
        make_plots=not args.no_plots,
        seed=args.seed,
        krr_landmarks=args.krr_landmarks,
        refit_baselines=args.refit_baselines,
        allow_pickle=args.allow_pickle,
        device=args.device,
        bootstrap=args.bootstrap,
    )
    for direction, block in results["directions"].items():
        rows = ([("model", block["model"])] if "model" in block else []) + list(block["baselines"].items())
        print(f"{direction}: " + ", ".join(f"{name} RMSE {values['rmse']:.4f}" for name, values in rows))
    print(f"wrote {args.output_dir}/eval_results.json ({results['wall_time_s']} s)")
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` for the command line: bad input gives one ``error:`` line and exit code 2 (a traceback with ``--debug``)."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
