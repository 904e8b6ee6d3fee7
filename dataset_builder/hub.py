"""Publish a built dataset folder on the Hugging Face Hub: Parquet splits, a dataset card, the metadata.

`push_dataset_to_hub` pushes the non-empty splits as Parquet (``DatasetDict.push_to_hub``, which writes a card
holding ``dataset_info`` and ``configs``), then one commit that updates that card (``DatasetCard``: license, tags,
text; ``dataset_info`` and ``configs`` kept) and adds ``cell_sentences.json``. The token is passed through,
never printed or written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import h5py
from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, hf_hub_download

from .outputs import META_FILE, write_text_atomic

__all__ = ["render_dataset_card", "dataset_card", "push_dataset_to_hub", "size_category", "recorded_license", "DEFAULT_LICENSE"]

logger = logging.getLogger(__name__)

_SIZE_BOUNDS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
DEFAULT_LICENSE = "unknown"
TAGS = ["single-cell", "multiome", "biology", "cell-sentences", "gene-expression", "chromatin-accessibility"]


def size_category(n_rows: int) -> str:
    """The Hub's ``size_categories`` label for a number of records."""
    for bound, label in _SIZE_BOUNDS:
        if n_rows < bound:
            return label
    return "1M<n<10M"


def recorded_license(paths: Sequence[str | Path]) -> str | None:
    """The license an input file records in ``uns['license']`` (an ``.h5mu`` also in a modality's ``uns``), else None.

    The first one found among ``paths`` wins; files that are not HDF5 (or hold none) are skipped.
    """
    for path in paths:
        try:
            if not h5py.is_hdf5(path):
                continue
            with h5py.File(path, "r") as handle:
                groups = [handle, *(handle["mod"].values() if isinstance(handle.get("mod"), h5py.Group) else ())]
                for group in groups:
                    element = group.get("uns/license") if isinstance(group.get("uns"), h5py.Group) else None
                    if isinstance(element, h5py.Dataset) and element.shape == ():
                        value = element[()]
                        value = value.decode() if isinstance(value, bytes) else str(value)
                        if value.strip():
                            return value.strip()
        except OSError:
            continue
    return None


def _body(meta: dict, repo_id: str, splits: dict[str, int]) -> str:
    encoding = (
        "the detected genes in descending log-normalized expression (ties in feature order)"
        if meta["gex_encoding"] == "rank"
        else f"the genes with log-normalized expression >= {meta['binary_threshold']}, in feature order (the paper's binary encoding)"
    )
    peaks = f"the {meta['top_peaks']:,} peaks most often accessible in train" if meta.get("top_peaks") else "all peaks"
    if meta["split_by"] == "batch":
        split_text = (
            f"held out by batch: test = {', '.join(meta.get('test_batches') or []) or 'none'}, "
            f"validation = {', '.join(meta.get('validation_batches') or []) or 'none'}, train = the other batches"
        )
    elif meta["split_by"] == "batch+hash":
        split_text = (
            f"test held out by batch ({', '.join(meta.get('test_batches') or [])}); validation = a deterministic "
            "10% barcode-hash sample of the other batches' cells; train = the rest"
        )
    else:
        split_text = "by a deterministic hash of the cell barcode (80 / 10 / 10)"
    rows = "\n".join(f"| {name} | {n:,} |" for name, n in splits.items())
    empty = [name for name, n in meta["splits"].items() if not n]
    if empty:
        rows += f"\n\nNo {' or '.join(empty)} split: it holds no cells."
    norm = meta["normalization"]
    return f"""
# Paired GEX and ATAC cell sentences

Single cells measured in both gene expression (GEX) and chromatin accessibility (ATAC), each written as two
"sentences" of feature names, for training a translator between the modalities.

## Source

Built with `cell-sentences-build` (`python -m dataset_builder`, builder version {meta["builder_version"]}) from:
{", ".join(Path(str(s)).name for s in meta["source"])}.
{len(meta["genes"]):,} genes, {len(meta["peaks"]):,} peaks; {meta.get("dropped_cells", 0):,} cells present in only one modality were dropped.

## How the sentences are made

- GEX counts ({norm["counts_source"]}) are normalized as `{norm["gex"]}` with size factor `{norm["size_factor"]}`.
- `gex_text`: {encoding}.
- `atac_text`: {peaks} with `{norm["atac"]}`, in genomic order (natural chromosome order, then start).
- `gex_index` / `gex_value`: every detected gene (indices into the gene list) and its log-normalized value, by descending value.
- `cell_sentences.json` holds the ordered gene and peak lists, the normalization settings and train-split statistics.

## Splits

Cells are split {split_text}.

| split | cells |
|---|---|
{rows}

## Load

```python
from datasets import load_dataset

ds = load_dataset("{repo_id}")
print(ds["train"][0]["gex_text"])
```

To train a translator on it, install the `cell-sentences` package (`pip install .` in a clone of its
repository) and make a dataset folder of it:

```python
from datasets import load_dataset
from huggingface_hub import hf_hub_download

load_dataset("{repo_id}").save_to_disk("DATA")
hf_hub_download("{repo_id}", "cell_sentences.json", repo_type="dataset", local_dir="DATA")
```

then `cell-sentences-tokenize --dataset DATA --output_dir TOK` and
`cell-sentences-train --dataset_dir DATA --tokenizer_dir TOK --output_dir MODEL`.
"""


def dataset_card(meta: dict, repo_id: str, card: DatasetCard | None = None, license: str | None = None) -> DatasetCard:
    """The dataset card: ``card`` (the one ``push_to_hub`` wrote) updated, or a new one.

    Parameters
    ----------
    meta
        The dataset folder's ``cell_sentences.json`` content.
    repo_id
        Hub dataset id, used in the loading example.
    card
        An existing card whose metadata (``dataset_info``, ``configs``, ...) is kept; its text is replaced.
    license
        Hub license id; default the one recorded in ``meta`` (from the input file), else ``unknown``.

    Returns
    -------
    DatasetCard
    """
    card = card if card is not None else DatasetCard("---\n{}\n---\n")
    splits = {name: n for name, n in meta["splits"].items() if n}
    data = card.data
    data.license = license or meta.get("license") or DEFAULT_LICENSE
    data.tags = TAGS + [t for t in data.get("tags") or [] if t not in TAGS]
    data.task_categories = ["translation"]
    data.size_categories = [size_category(sum(splits.values()))]
    data.pretty_name = "Paired GEX and ATAC cell sentences"
    if not data.get("configs"):
        data.configs = [{"config_name": "default", "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits]}]
    card.text = _body(meta, repo_id, splits)
    return card


def render_dataset_card(meta: dict, repo_id: str = "user/cell-sentences", license: str | None = None) -> str:
    """The text of a new dataset card (:func:`dataset_card`): YAML metadata and Markdown."""
    return str(dataset_card(meta, repo_id, license=license))


def push_dataset_to_hub(dataset_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                        license: str | None = None) -> str:
    """Push a built dataset folder to the Hub as Parquet, with its card and ``cell_sentences.json``.

    Empty splits (``--no_validation``) are not pushed: an empty Parquet file would make ``load_dataset`` fail.
    On success the folder's own ``cell_sentences.json`` records ``hub_dataset_id``, so that models trained on it
    name the Hub dataset in their card.

    Parameters
    ----------
    dataset_dir
        Output folder of ``python -m dataset_builder``.
    repo_id
        Hub dataset id (``user/name``).
    token
        Hub token (else the one huggingface_hub finds); never logged.
    private
        Create the repository as private.
    license
        Hub license id for the card (default: the one the input file recorded, else ``unknown``).

    Returns
    -------
    str
        The dataset's Hub URL.
    """
    dataset_dir = Path(dataset_dir)
    meta_path = dataset_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{dataset_dir} has no {META_FILE}: give a folder written by python -m dataset_builder")
    if "/" not in repo_id:
        raise ValueError(f"--hub_dataset_id '{repo_id}' must look like 'user/name'")
    meta = json.loads(meta_path.read_text())
    from .records import load_splits

    loaded = load_splits(dataset_dir)
    dataset = datasets.DatasetDict({name: split for name, split in loaded.items() if len(split)})
    for name in sorted(set(loaded) - set(dataset)):
        logger.info("split '%s' has no cells: not pushed", name)
    dataset.push_to_hub(repo_id, private=private, token=token, commit_message="Upload cell sentences (Parquet)")
    # The card push_to_hub wrote holds dataset_info (features, split sizes) and configs: update it, do not replace it.
    pushed = DatasetCard.load(hf_hub_download(repo_id, "README.md", repo_type="dataset", token=token))
    license = license or meta.get("license") or DEFAULT_LICENSE
    meta = {**meta, "hub_dataset_id": repo_id, "license": license}
    card = dataset_card(meta, repo_id, pushed, license)
    operations = [
        CommitOperationAdd("README.md", str(card).encode()),
        CommitOperationAdd(META_FILE, (json.dumps(meta) + "\n").encode()),
    ]
    HfApi(token=token).create_commit(repo_id, operations, commit_message="Add dataset card and cell_sentences.json", repo_type="dataset")
    write_text_atomic(meta_path, json.dumps(meta) + "\n")
    return f"https://huggingface.co/datasets/{repo_id}"
