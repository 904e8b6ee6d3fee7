"""Render the model card (``README.md`` of the model folder) from ``model_card.md``.

The card's YAML front matter carries what the Hub reads: ``library_name``, ``pipeline_tag``, tags,
``datasets``, ``license``, ``widget`` examples made from real input sentences, and ``model-index``
with the evaluation metrics when ``eval_results.json`` is present. Nothing in the card is an
absolute local path or a token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template

import yaml

from tokenizer import META_FILE

TEMPLATE = Path(__file__).resolve().parents[1] / "model_card.md"
MODEL_KEYS = ("translator", "model", "cell_translator", "t5")
DIRECTION_NAMES = {"gex2atac": "GEX to ATAC", "atac2gex": "ATAC to GEX"}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def model_metrics(eval_results: dict | None) -> dict[str, dict[str, float]]:
    """The model's own metrics per direction from an ``eval_results.json``: ``{direction: {metric: value}}``.

    Accepts eval.py's ``{"directions": {direction: {"model": {metric: value}, "baselines": ...}}}``,
    the same under ``"results"`` or at the top level, or ``{direction: {metric: value}}``.
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
        numbers = {k: float(v) for k, v in chosen.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if numbers:
            out[direction] = numbers
    return out


def front_matter(meta: dict, metrics: dict[str, dict[str, float]], examples: list[dict], dataset_name: str, model_name: str, license: str = "mit") -> dict:
    """The card's YAML front matter as a dict."""
    card = {
        "library_name": "transformers",
        "pipeline_tag": "text2text-generation",
        "license": license,
        "tags": ["single-cell", "multiome", "biology", "t5", "cell-sentences", "scATAC-seq", "scRNA-seq"],
        "datasets": [dataset_name],
    }
    if examples:
        card["widget"] = [{"text": ex["text"], "example_title": ex["title"]} for ex in examples]
    if metrics:
        card["model-index"] = [
            {
                "name": model_name,
                "results": [
                    {
                        "task": {"type": "text2text-generation", "name": f"Cell translation {DIRECTION_NAMES[direction]}"},
                        "dataset": {"type": dataset_name, "name": dataset_name, "split": "test"},
                        "metrics": [{"type": name, "name": f"{name} ({direction})", "value": value} for name, value in sorted(values.items())],
                    }
                    for direction, values in metrics.items()
                ],
            }
        ]
    return card


def _evaluation_text(folder: Path, metrics: dict) -> str:
    table = folder / "eval_results.md"
    if table.exists():
        return table.read_text().strip()
    if not metrics:
        return "Not evaluated yet: run `python eval.py --model <this folder> --dataset_dir <dataset>` to add the metrics and baselines."
    lines = ["| direction | metric | value |", "|---|---|---|"]
    for direction, values in metrics.items():
        lines += [f"| {DIRECTION_NAMES[direction]} | {k} | {v:.4f} |" for k, v in sorted(values.items())]
    return "\n".join(lines)


def render_model_card(folder: str | os.PathLike, repo_id: str | None = None, template: str | os.PathLike | None = None) -> str:
    """Write ``folder/README.md`` from the template and the folder's files; return the text.

    Reads ``config.json``, ``cell_sentences.json``, ``readout.json`` (widget examples, caps),
    ``training_args.json``, and ``eval_results.json`` / ``eval_results.md`` when present.
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json") or {}
    meta = _read_json(folder / META_FILE) or {}
    readout = _read_json(folder / "readout.json") or {}
    args = _read_json(folder / "training_args.json") or {}
    metrics = model_metrics(_read_json(folder / "eval_results.json"))
    dataset_name = args.get("dataset_name") or "cell-sentences"
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
    values = {
        "front_matter": yaml.safe_dump(front_matter(meta, metrics, examples, dataset_name, repo_id), sort_keys=False).strip(),
        "title": f"Cell translator: {dataset_name}",
        "model_size": args.get("model_size", "custom"),
        "d_model": config.get("d_model"),
        "num_layers": config.get("num_layers"),
        "num_decoder_layers": config.get("num_decoder_layers"),
        "num_heads": config.get("num_heads"),
        "n_parameters": f"{n_parameters / 1e6:.1f}M" if n_parameters else "unknown",
        "gex_encoding_text": gex_text,
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
            + f", batch {args.get('per_device_train_batch_size', '?')} x "
            f"{args.get('num_processes', 1)} processes, learning rate {args.get('learning_rate', '?')}, "
            f"directions {', '.join(args.get('directions', ['gex2atac', 'atac2gex']))}, seed {args.get('seed', '?')}"
        ),
        "repo_id": repo_id,
        "example_sentence": examples[0]["text"] if examples else "<gex2atac> GENE1 GENE2 ...",
        "evaluation_text": _evaluation_text(folder, metrics),
    }
    text = Template(Path(template or TEMPLATE).read_text()).safe_substitute({k: str(v) for k, v in values.items()})
    tmp = folder / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "README.md")
    return text


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a card (between the first two ``---`` lines)."""
    if not text.startswith("---\n"):
        raise ValueError("the model card does not start with YAML front matter")
    return yaml.safe_load(text.split("---\n", 2)[1])
