"""Paired single-cell GEX + ATAC files -> cell sentences, as a `datasets.DatasetDict` folder.

Where a cell becomes a sentence: `readers` (files -> paired raw counts; `combined` splits a matrix holding both
modalities, `peaks` normalizes and orders peak names), `sentences` (CSR -> sentences), `plan` (splits, kept peaks,
train statistics), `builder` (the `datasets` builder and `build_dataset`), `simulate` (the built-in default data),
`hub` (dataset card and Parquet push), `cli` (what every command line does on bad input and on SIGTERM).
"""

from __future__ import annotations

from .builder import BUILDER_VERSION, CellSentencesBuilder, CellSentencesConfig, build_dataset
from .outputs import META_FILE
from .readers import PairedCounts, genomic_order, normalize_peak_names, read_paired
from .sentences import BINARY_THRESHOLD, encode_cells, rank_genes

__all__ = [
    "BINARY_THRESHOLD",
    "BUILDER_VERSION",
    "META_FILE",
    "CellSentencesBuilder",
    "CellSentencesConfig",
    "PairedCounts",
    "build_dataset",
    "encode_cells",
    "genomic_order",
    "normalize_peak_names",
    "rank_genes",
    "read_paired",
]
