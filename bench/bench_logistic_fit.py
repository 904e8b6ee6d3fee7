"""The readout calibration's logistic fit against scikit-learn's ``LogisticRegression(solver="newton-cholesky")``.

Same objective (``C`` = ``translator.readout.LOGISTIC_C``, unpenalised intercept, tolerance 1e-10), on simulated
calibration-shaped data: ``--rows`` entries (the calibration draws at most 2,000,000), ``--columns`` features,
few positives as in ATAC. Prints each fit's seconds and the largest coefficient difference, for float32 input
(what the calibration passes) and float64 input.

    python bench/bench_logistic_fit.py [--rows 2000000] [--columns 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from translator.readout import LOGISTIC_C, logistic_fit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = np.column_stack([rng.normal(0, 1 + i, args.rows) for i in range(args.columns)]).astype(np.float32)
    y = rng.random(args.rows) < expit(x @ rng.normal(0, 1, args.columns) - 4)
    print(f"{args.rows:,} rows x {args.columns} columns, {y.mean():.3f} positive")
    for rep in range(args.repeat):
        started = time.perf_counter()
        coef, intercept = logistic_fit(x, y)
        line = f"repeat {rep}: logistic_fit {time.perf_counter() - started:.2f} s"
        for dtype in (np.float32, np.float64):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                started = time.perf_counter()
                model = LogisticRegression(C=LOGISTIC_C, solver="newton-cholesky", tol=1e-10, max_iter=100).fit(x.astype(dtype), y)
                seconds = time.perf_counter() - started
            diff = max(np.max(np.abs(coef - model.coef_[0])), abs(intercept - model.intercept_[0]))
            line += f"; sklearn {np.dtype(dtype).name} {seconds:.2f} s (max |diff| {diff:.1e}, {len(caught)} warnings)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
