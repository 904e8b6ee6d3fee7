"""Fit a model folder's blend of the transformer, the source kernel and the per-feature mean (:mod:`translator.predictor`).

``train.py`` does this at the end of every run, on the folder's own validation cells. This command does it again for a folder
whose held-out readings come from elsewhere: a model trained on every cell (no validation cells) or an ensemble, with the
weights chosen on cross-validation fold models' readings of the cells they did not train on (``--pool MODEL DATASET_DIR``,
as ``translator.recalibrate --pool``), each against a kernel and mean fitted on that fold's train cells; or after
``translator.recalibrate`` changed the calibration the blend was chosen for.

Usage::

    python -m translator.stack --model model_ensemble --dataset_dir all --pool m_0 f0 --pool m_1 f1 --pool m_2 f2 --pool m_3 f3 --pool m_4 f4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .predictor import BLEND_FILE, WEIGHT_STEP, check_weight_step, fit_blend, summary_lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model or ensemble folder, calibrated (rewritten in place: readout.json, blend.safetensors)")
    parser.add_argument("--dataset_dir", required=True, help="the dataset the folder was trained on: the shipped kernel and mean fit on its train and validation cells")
    parser.add_argument("--pool", nargs=2, action="append", default=[], metavar=("MODEL", "DATASET_DIR"),
                        help="choose the weights on DATASET_DIR's validation cells as MODEL reads them with the folder's calibration "
                             "(repeatable; cross-validation fold models); default: the folder's own validation cells")
    parser.add_argument("--directions", nargs="+", choices=("gex2atac", "atac2gex"), help="default: every calibrated direction")
    parser.add_argument("--weight_step", type=float, default=WEIGHT_STEP, help="step of the weights' grid on the simplex (default 0.05)")
    parser.add_argument("--krr_landmarks", type=int, default=1000, help="Nystroem landmarks of the kernel (as eval.py's svd_krr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    check_weight_step(args.weight_step)
    records = fit_blend(args.model, args.dataset_dir, args.directions, pool=[tuple(p) for p in args.pool], max_landmarks=args.krr_landmarks,
                        seed=args.seed, step=args.weight_step, require_held_out=True)
    for line in summary_lines({"blend": records}):
        print(line)
    print(f"rewrote {Path(args.model) / 'readout.json'}" + (f" and {Path(args.model) / BLEND_FILE}" if (Path(args.model) / BLEND_FILE).exists() else ""))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    from dataset_builder.cli import run_main

    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
