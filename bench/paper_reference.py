"""Reference implementation of the paper's preprocessing, kept as the baseline to beat.

"Translating the Code of Life" turned every cell into a Python dict of two strings and wrote
the dicts to a ``.txt`` file ("an extremely slow process", about 22,000 dicts). This module does
what the paper describes, written plainly and without artificial slowness:

1. the count matrices are made dense (``.toarray()``);
2. GEX is log-normalized (``log1p(counts / size_factor)``, size factor = library size / median
   library size -- the same normalization as ``dataset_builder`` so that outputs can be compared);
3. a Python loop over cells, and inside it a loop over features, keeps the genes with log-norm
   value >= 2.0 (binarized GEX) and the peaks with count > 0, in feature order;
4. each cell becomes ``{"gex": "...", "atac": "..."}``;
5. the dicts are written as lines of a ``.txt`` file.

It is used only by ``bench/bench_build.py``; it is not part of the tool.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

BINARY_THRESHOLD = 2.0


def paper_log_norm(gex_counts_dense: np.ndarray) -> np.ndarray:
    """Dense log1p(counts / size_factor) with size factor = library size / median library size."""
    library = gex_counts_dense.sum(axis=1)
    size_factor = library / np.median(library)
    size_factor[size_factor == 0] = 1.0
    return np.log1p(gex_counts_dense / size_factor[:, None])


def paper_sentence_dicts(
    gex_log_norm: np.ndarray,
    atac_counts: np.ndarray,
    genes: Sequence[str],
    peaks: Sequence[str],
    threshold: float = BINARY_THRESHOLD,
) -> list[dict[str, str]]:
    """The paper's loop: one dict of two strings per cell, built feature by feature."""
    cells = []
    for i in range(gex_log_norm.shape[0]):
        gex_words = []
        for gene, value in zip(genes, gex_log_norm[i]):
            if value >= threshold:
                gex_words.append(gene)
        atac_words = []
        for peak, value in zip(peaks, atac_counts[i]):
            if value > 0:
                atac_words.append(peak)
        cells.append({"gex": " ".join(gex_words), "atac": " ".join(atac_words)})
    return cells


def write_txt(cells: list[dict[str, str]], path: str | os.PathLike) -> None:
    """Write one dict per line, as the paper's .txt."""
    with open(path, "w") as fh:
        for cell in cells:
            fh.write(json.dumps(cell) + "\n")


def paper_preprocess(gex_counts, atac_counts, genes, peaks, txt_path, threshold: float = BINARY_THRESHOLD) -> dict:
    """Run the whole paper pipeline from sparse (or dense) counts to a .txt; return the dicts and stage times.

    Returns
    -------
    ``{"cells": list[dict], "seconds": {"dense": s, "normalize": s, "loop": s, "write": s}}``
    """
    seconds = {}
    t = time.perf_counter()
    gex = gex_counts.toarray() if hasattr(gex_counts, "toarray") else np.asarray(gex_counts)
    atac = atac_counts.toarray() if hasattr(atac_counts, "toarray") else np.asarray(atac_counts)
    seconds["dense"] = time.perf_counter() - t
    t = time.perf_counter()
    gex_log_norm = paper_log_norm(gex.astype(np.float64))
    seconds["normalize"] = time.perf_counter() - t
    t = time.perf_counter()
    cells = paper_sentence_dicts(gex_log_norm, atac, genes, peaks, threshold)
    seconds["loop"] = time.perf_counter() - t
    t = time.perf_counter()
    write_txt(cells, txt_path)
    seconds["write"] = time.perf_counter() - t
    return {"cells": cells, "seconds": seconds}
