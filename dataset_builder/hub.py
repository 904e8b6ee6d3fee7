"""Publish a built dataset folder on the Hugging Face Hub: Parquet splits, a dataset card, the metadata.

`push_dataset_to_hub` pushes the `DatasetDict` as Parquet (``DatasetDict.push_to_hub``), then one commit
with the card ``README.md`` (rendered by `render_dataset_card`) and ``cell_sentences.json``.
The token is passed through, never printed or written.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import yaml
from huggingface_hub import CommitOperationAdd, HfApi

from .builder import META_FILE

__all__ = ["render_dataset_card", "push_dataset_to_hub", "size_category"]

_SIZE_BOUNDS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


def size_category(n_rows: int) -> str:
    """The Hub's ``size_categories`` label for a number of records."""
    for bound, label in _SIZE_BOUNDS:
        if n_rows < bound:
            return label
    return "1M<n<10M"


def render_dataset_card(meta: dict, repo_id: str = "user/cell-sentences") -> str:
    """Render the dataset card (YAML front matter + text) from ``cell_sentences.json`` metadata.

    Parameters
    ----------
    meta
        The dataset folder's ``cell_sentences.json`` content.
    repo_id
        Hub dataset id, used in the loading example.

    Returns
    -------
    str
        ``README.md`` text.
    """
    splits = meta["splits"]
    header = {
        "license": "mit",
        "tags": ["single-cell", "multiome", "biology", "cell-sentences", "gene-expression", "chromatin-accessibility"],
        "task_categories": ["translation"],
        "size_categories": [size_category(sum(splits.values()))],
        "pretty_name": "Paired GEX and ATAC cell sentences",
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits],
            }
        ],
    }
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
    norm = meta["normalization"]
    body = f"""
# Paired GEX and ATAC cell sentences

Single cells measured in both gene expression (GEX) and chromatin accessibility (ATAC), each written as two
"sentences" of feature names, for training a translator between the modalities.

## Source

Built with `python -m dataset_builder` (builder version {meta["builder_version"]}) from: {", ".join(meta["source"])}.
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
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body


def push_dataset_to_hub(dataset_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Push a built dataset folder to the Hub as Parquet, with its card and ``cell_sentences.json``.

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
    dataset = datasets.load_from_disk(str(dataset_dir))
    dataset.push_to_hub(repo_id, private=private, token=token, commit_message="Upload cell sentences (Parquet)")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd("README.md", render_dataset_card(meta, repo_id).encode()),
        CommitOperationAdd(META_FILE, str(meta_path)),
    ]
    api.create_commit(
        repo_id, operations, commit_message="Add dataset card and cell_sentences.json", repo_type="dataset"
    )
    return f"https://huggingface.co/datasets/{repo_id}"
