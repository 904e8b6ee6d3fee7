"""Peak names: normalized to ``chrN-start-end`` and ordered along the genome."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["PEAK_RE", "normalize_peak_names", "genomic_order", "looks_like_peaks"]

PEAK_RE = re.compile(r"^([A-Za-z0-9._]+?)[:_-](\d+)[-_](\d+)$")


def normalize_peak_names(names: Sequence[str], path: str | Path = "input") -> list[str]:
    """Normalize peak names to ``chr-start-end``.

    Parameters
    ----------
    names
        Peak names as ``chr:start-end``, ``chr_start_end`` or ``chr-start-end``.
    path
        File the names come from (for the error message).

    Returns
    -------
    list[str]
        ``chrN-start-end`` names, same order.
    """
    parts = pd.Series(list(names), dtype=object).astype(str).str.extract(PEAK_RE)
    bad = parts[0].isna()
    if bad.any():
        example = list(names)[int(np.flatnonzero(bad.to_numpy())[0])]
        raise ValueError(
            f"{int(bad.sum())} peak names in {path} are not genomic intervals (e.g. '{example}'): "
            "name peaks 'chr1-100-200', 'chr1:100-200' or 'chr1_100_200'"
        )
    start = parts[1].astype(np.int64)
    end = parts[2].astype(np.int64)
    if (end < start).any():
        example = list(names)[int(np.flatnonzero((end < start).to_numpy())[0])]
        raise ValueError(f"peak names in {path} have end < start (e.g. '{example}'): fix the peak coordinates")
    return (parts[0] + "-" + start.astype(str) + "-" + end.astype(str)).tolist()


def _chromosome_key(contig: str) -> tuple:
    name = contig[3:] if contig.lower().startswith("chr") else contig
    if name.isdigit():
        return (0, int(name), "")
    special = {"X": 1, "Y": 2, "M": 3, "MT": 3}
    if name.upper() in special:
        return (special[name.upper()], 0, "")
    return (4, 0, contig)


def genomic_order(peaks: Sequence[str]) -> np.ndarray:
    """Permutation sorting normalized peak names by natural chromosome order (1..22, X, Y, M, others), start, end."""
    parts = pd.Series(list(peaks), dtype=object).str.rsplit("-", n=2, expand=True)
    contigs = parts[0].to_numpy()
    unique = sorted(set(contigs), key=_chromosome_key)
    rank = pd.Index(unique).get_indexer(contigs)
    return np.lexsort((parts[2].astype(np.int64).to_numpy(), parts[1].astype(np.int64).to_numpy(), rank))


def looks_like_peaks(names: Sequence[str]) -> bool:
    sample = list(names[:1000])
    if not sample:
        return False
    hits = sum(bool(PEAK_RE.match(str(n))) for n in sample)
    return hits / len(sample) > 0.9
