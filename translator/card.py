"""The model card (``README.md`` of the model folder), built with huggingface_hub's ``ModelCard``.

:func:`render_model_card` writes the whole card from ``model_card.md`` and the folder's files;
:func:`merge_model_index` sets only the evaluation results of an existing card (``eval.py``). Both build the
``model-index`` with :func:`eval_results` and write through :func:`write_card`. Each direction's results differ
in ``EvalResult.unique_identifier`` (the task type is the direction), so a round trip through
``ModelCard.load(...).data`` or ``metadata_update`` keeps both. Nothing in the card is an absolute local path or a token.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from string import Template

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dataset_builder import META_FILE
from tokenizer import DIRECTION_NAMES

from .predictor import card_text

TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
MODEL_KEYS = ("translator", "model", "cell_translator", "t5")
# Scores eval.py records beside the model's own for context: the all-zero prediction's accuracy is a baseline's.
REFERENCE_KEYS = ("accuracy_binary_all_zeros",)
TAGS = ["single-cell", "multiome", "biology", "t5", "cell-sentences", "scATAC-seq", "scRNA-seq"]
DEFAULT_LICENSE = "unknown"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def model_metrics(eval_results: dict | None) -> dict[str, dict[str, float]]:
    """The model's own metrics per direction from an ``eval_results.json``: ``{direction: {metric: value}}``.

    Accepts eval.py's ``{"directions": {direction: {"model": {metric: value}, "baselines": ...}}}``,
    the same under ``"results"`` or at the top level, or ``{direction: {metric: value}}``. Baselines' scores
    (``baselines``, :data:`REFERENCE_KEYS`) and non-finite values are left out.
    """
    if not eval_results:
        return {}
    results = eval_results.get("directions") or eval_results.get("results") or eval_results
    out: dict[str, dict[str, float]] = {}
    for direction in DIRECTION_NAMES:
        block = results.get(direction)
        if not isinstance(block, dict):
            continue
        methods = block.get("methods", block)
        chosen = next((methods[k] for k in MODEL_KEYS if isinstance(methods.get(k), dict)), methods)
        numbers = {
            k: float(v)
            for k, v in chosen.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in REFERENCE_KEYS and math.isfinite(v)
        }
        if numbers:
            out[direction] = numbers
    return out


def eval_results(metrics: dict[str, dict[str, float]], dataset_id: str, dataset_name: str | None = None, split: str = "test") -> list[EvalResult]:
    """The ``model-index`` entries of the model's metrics, one ``EvalResult`` per direction and metric.

    Parameters
    ----------
    metrics
        ``{direction: {metric: value}}`` (:func:`model_metrics`).
    dataset_id
        The dataset's Hub id when known, else its name.
    dataset_name
        A readable name for the dataset (default: ``dataset_id``).
    split
        The split that was scored.

    Returns
    -------
    list[EvalResult]
        The task type is the direction (``gex2atac`` / ``atac2gex``), so the two directions stay two results.
    """
    return [
        EvalResult(
            task_type=direction,
            task_name=f"Cell translation {DIRECTION_NAMES[direction]}",
            dataset_type=dataset_id,
            dataset_name=dataset_name or dataset_id,
            dataset_split=split,
            metric_type=name,
            metric_name=f"{name} ({direction})",
            metric_value=round(value, 6),
        )
        for direction, values in metrics.items()
        for name, value in sorted(values.items())
    ]


def write_card(path: str | os.PathLike, card: ModelCard) -> None:
    """Write ``card`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    from dataset_builder.outputs import write_text_atomic

    write_text_atomic(path, str(card))


def set_card_section(readme_path: str | os.PathLike, heading: str, text: str) -> None:
    """Set the section ``## heading`` of a model card to ``text``: replaced where the card has it, else appended.

    The metadata and the other sections stay as they are; a folder without a card is left without one.
    """
    readme_path = Path(readme_path)
    if not readme_path.exists():
        return
    card = ModelCard(readme_path.read_text(encoding="utf-8"))
    title = f"## {heading}"
    lines = card.text.rstrip("\n").split("\n")
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [title, "", text.strip(), ""] if end < len(lines) else [title, "", text.strip()]
    else:
        lines += ["", title, "", text.strip()]
    card.text = "\n".join(lines) + "\n"
    write_card(readme_path, card)


def _dataset(meta: dict, args: dict, results: dict | None = None) -> tuple[str | None, str]:
    """The training dataset's Hub id (None when it was never pushed) and a readable name."""
    hub_id = meta.get("hub_dataset_id")
    name = hub_id or (results or {}).get("dataset") or args.get("dataset_name") or "cell-sentences"
    return hub_id, name


def merge_model_index(readme_path: str | os.PathLike, results: dict, model_name: str | None = None) -> bool:
    """Set the evaluation results (``model-index``) of a model card; keep everything else as is.

    Parameters
    ----------
    readme_path
        ``README.md`` of a model folder (created with only metadata when absent).
    results
        The ``eval_results.json`` dict.
    model_name
        Name of the model in the index (default: the card's, else the folder name).

    Returns
    -------
    bool
        False when the results hold no model metrics (nothing written).
    """
    readme_path = Path(readme_path)
    metrics = model_metrics(results)
    if not metrics:
        return False
    text = readme_path.read_text(encoding="utf-8") if readme_path.exists() else ""
    if not text.startswith("---"):
        text = "---\n{}\n---\n" + (f"\n{text}" if text else "")
    card = ModelCard(text)
    meta = _read_json(readme_path.parent / META_FILE) or {}
    hub_id, name = _dataset(meta, {}, results)
    card.data.eval_results = eval_results(metrics, hub_id or name, name, results.get("split") or "test")
    card.data.model_name = model_name or card.data.model_name or readme_path.parent.resolve().name
    write_card(readme_path, card)
    return True


def _evaluation_text(folder: Path, metrics: dict) -> str:
    table = folder / "eval_results.md"
    if table.exists():
        return table.read_text().strip()
    if not metrics:
        return "Not evaluated yet: run `cell-sentences-eval --model <this folder> --dataset_dir <dataset>` to add the metrics and baselines."
    lines = ["| direction | metric | value |", "|---|---|---|"]
    for direction, values in metrics.items():
        lines += [f"| {DIRECTION_NAMES[direction]} | {k} | {v:.4f} |" for k, v in sorted(values.items())]
    return "\n".join(lines)


def card_license(license: str | None, meta: dict, args: dict) -> str:
    """The card's license: the one given, else the one recorded at training or in the dataset's metadata, else ``unknown``."""
    return license or args.get("license") or meta.get("license") or DEFAULT_LICENSE


def render_model_card(folder: str | os.PathLike, repo_id: str | None = None, template: str | os.PathLike | None = None,
                      license: str | None = None) -> str:
    """Write ``folder/README.md`` from the template and the folder's files; return the text.

    Reads ``config.json``, ``cell_sentences.json``, ``readout.json`` (usage example, caps),
    ``training_args.json``, and ``eval_results.json`` / ``eval_results.md`` when present. ``license`` (a Hub
    license id) overrides the one recorded in ``training_args.json`` or the dataset's metadata.
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json") or {}
    meta = _read_json(folder / META_FILE) or {}
    readout = _read_json(folder / "readout.json") or {}
    args = _read_json(folder / "training_args.json") or {}
    results = _read_json(folder / "eval_results.json")
    metrics = model_metrics(results)
    hub_dataset, dataset_name = _dataset(meta, args, results)
    repo_id = repo_id or args.get("hub_model_id") or folder.name
    examples = readout.get("examples", [])
    splits = meta.get("splits", {})
    splits_text = ", ".join(f"{k} {v} cells" for k, v in splits.items()) or "unknown"
    if meta.get("split_by") == "batch":
        splits_text += f" (split by batch: test {meta.get('test_batches')}, validation {meta.get('validation_batches')})"
    encoding = meta.get("gex_encoding", "rank")
    gex_text = (
        "the detected genes in descending order of log-normalized expression (rank encoding)"
        if encoding == "rank"
        else f"the genes with log-normalized expression >= {meta.get('binary_threshold', 2.0)} in feature order (binary encoding)"
    )
    norm = meta.get("normalization", {})
    n_parameters = args.get("n_parameters")
    example = next((ex["text"].split() for ex in examples if ex["text"].startswith("<gex2atac>")), None)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="translation",
        license=card_license(license, meta, args),
        tags=TAGS,
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id,
        eval_results=eval_results(metrics, hub_dataset or dataset_name, dataset_name, (results or {}).get("split") or "test") or None,
    )
    values = {
        "title": f"Cell translator: {dataset_name}",
        "model_size": args.get("model_size", "custom"),
        "d_model": config.get("d_model"),
        "num_layers": config.get("num_layers"),
        "num_decoder_layers": config.get("num_decoder_layers"),
        "num_heads": config.get("num_heads"),
        "n_parameters": f"{n_parameters / 1e6:.1f}M" if n_parameters else "unknown",
        "gex_encoding_text": gex_text,
        "dataset_text": f"[{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset
        else f"`{dataset_name}`, a local dataset folder not published on the Hub",
        "dataset_name": dataset_name,
        "n_genes": len(meta.get("genes", [])),
        "n_peaks": len(meta.get("peaks", [])),
        "source_files": ", ".join(os.path.basename(str(s)) for s in meta.get("source", [])) or "simulated",
        "splits_text": splits_text,
        "gex_normalization": norm.get("gex", "log1p(counts / size_factor)"),
        "atac_normalization": norm.get("atac", "counts > 0"),
        "max_source_length": readout.get("max_source_length", args.get("max_source_length")),
        "max_target_length": readout.get("max_target_length", args.get("max_target_length")),
        "training_text": (
            f"{args.get('completed_steps', '?')} steps"
            + (f" (of {args.get('planned_steps')} planned: stopped by --max_train_seconds)" if args.get("stopped_by_time_limit") else "")
            + (f" (of {args.get('planned_steps')} planned: early stopping on the validation loss)" if args.get("early_stopped_at") else "")
            + (f", the weights of step {args['best_validation_step']} (lowest validation loss)"
               if args.get("best_validation_step") and args["best_validation_step"] != args.get("completed_steps") else "")
            + f", batch {args.get('per_device_train_batch_size', '?')} x "
            f"{args.get('num_processes', 1)} processes, learning rate {args.get('learning_rate', '?')}, "
            f"directions {', '.join(args.get('directions', ['gex2atac', 'atac2gex']))}, seed {args.get('seed', '?')}"
        ),
        "repo_id": repo_id,
        # translate() takes the source names alone; the direction argument adds the prefix.
        "example_sentence": " ".join(example[1:9]) if example else "GENE1 GENE2 GENE3",
        "evaluation_text": _evaluation_text(folder, metrics),
        "predictor_text": card_text(readout),
    }
    body = Template(Path(template or TEMPLATE).read_text()).safe_substitute({k: str(v) for k, v in values.items()})
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    write_card(folder / "README.md", card)
    return str(card)
