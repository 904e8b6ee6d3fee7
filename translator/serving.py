"""What a model folder ships for serving outside ``CellTranslator``: one generation config per direction and ``handler.py``.

A direction's config (``gex2atac_generation_config.json``) is the folder's ``generation_config.json`` with the other
modality's names, both direction prefixes, ``<pad>`` and ``<unk>`` in ``suppress_tokens``, so that a plain
``AutoModelForSeq2SeqLM.generate(..., generation_config=config)`` writes only target names. ``handler.py`` is
:mod:`translator.endpoint` (Hugging Face Inference Endpoints' custom handler).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import GenerationConfig

from tokenizer import DIRECTIONS, PAD, PREFIX, SOURCE_MODALITY, UNK, feature_token_ranges

HANDLER_FILE = "handler.py"
HANDLER_SOURCE = Path(__file__).resolve().parent / "endpoint.py"


def generation_config_file(direction: str) -> str:
    """The file name of a direction's generation config, e.g. ``gex2atac_generation_config.json``."""
    return f"{direction}_generation_config.json"


def direction_generation_config(base: GenerationConfig, tokenizer, n_genes: int, direction: str) -> GenerationConfig:
    """``base`` with every token that is not a target name nor ``</s>`` suppressed, for ``direction``."""
    start, stop = feature_token_ranges(tokenizer, n_genes=n_genes)[SOURCE_MODALITY[direction]]
    special = tokenizer.convert_tokens_to_ids([PAD, UNK, *PREFIX.values()])
    config = GenerationConfig.from_dict(base.to_dict())
    config.suppress_tokens = sorted({*special, *range(start, stop)})
    return config


def write_serving_files(folder: str | os.PathLike, base: GenerationConfig, tokenizer, n_genes: int) -> list[str]:
    """Write both directions' generation configs and ``handler.py`` into ``folder``; return the file names."""
    folder = Path(folder)
    names = []
    for direction in DIRECTIONS:
        name = generation_config_file(direction)
        direction_generation_config(base, tokenizer, n_genes, direction).save_pretrained(folder, config_file_name=name)
        names.append(name)
    shutil.copyfile(HANDLER_SOURCE, folder / HANDLER_FILE)
    return [*names, HANDLER_FILE]
