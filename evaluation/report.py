"""Write evaluation results: ``eval_results.json`` and the Markdown tables (the card's ``model-index``: ``translator.card``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tokenizer import DIRECTION_NAMES
from translator.metrics_core import METRIC_KEYS

TABLE_KEYS = METRIC_KEYS + ("accuracy_binary_all_zeros",)
HEADERS = {
    "rmse": "RMSE",
    "mae": "MAE",
    "pearson_cell": "Pearson cell",
    "pearson_feature": "Pearson feature",
    "spearman_cell": "Spearman cell",
    "spearman_feature": "Spearman feature",
    "auroc_cell": "AUROC cell",
    "ap_cell": "AP cell",
    "auroc_all": "AUROC all",
    "ap_all": "AP all",
    "token_f1": "token F1",
    "token_jaccard": "token Jaccard",
    "accuracy_binary": "accuracy (binary)",
    "accuracy_binary_all_zeros": "accuracy of all zeros",
}
LOWER_IS_BETTER = {"rmse", "mae"}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return value


def results_json(results: dict) -> str:
    """``eval_results.json`` text (NaN written as null, keys in insertion order)."""
    return json.dumps(_json_safe(results), indent=2) + "\n"


def _methods(block: dict) -> list[tuple[str, dict]]:
    rows = []
    if isinstance(block.get("model"), dict):
        rows.append(("model", block["model"]))
    if isinstance(block.get("transformer_alone"), dict):
        rows.append(("model: transformer alone", block["transformer_alone"]))
    rows += [(name, values) for name, values in block.get("baselines", {}).items()]
    return rows


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    # small values (RMSE of sparse ATAC) differ in the fourth decimal: keep four significant digits
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.1 else f"{value:.5f}"


def markdown_table(results: dict) -> str:
    """Method x metric table for each direction; the best value of each column is in bold."""
    lines = [
        f"Dataset `{results.get('dataset')}`, split `{results.get('split')}`, {results.get('n_cells')} cells. "
        "RMSE and MAE: lower is better; all other columns: higher is better. "
        "accuracy (binary): share of cell x feature entries right after binarizing (ATAC prediction >= 0.5, "
        "GEX prediction > 0, against accessible / detected); an all-zeros guess scores the last column.",
        "",
    ]
    for direction, block in results.get("directions", {}).items():
        rows = _methods(block)
        if not rows:
            continue
        keys = [k for k in TABLE_KEYS if any(k in values for _, values in rows)]
        lines.append(f"**{DIRECTION_NAMES.get(direction, direction)}**")
        lines.append("")
        lines.append("| method | " + " | ".join(HEADERS[k] for k in keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        best = {}
        for key in keys:
            if key == "accuracy_binary_all_zeros":
                continue
            values = [v.get(key) for _, v in rows if isinstance(v.get(key), int | float) and math.isfinite(v.get(key))]
            if values:
                best[key] = min(values) if key in LOWER_IS_BETTER else max(values)
        for name, values in rows:
            cells = []
            for key in keys:
                text = _fmt(values.get(key))
                cells.append(f"**{text}**" if key in best and values.get(key) == best[key] else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        summary = bootstrap_summary(results, direction)
        if summary:
            lines.extend([summary, ""])
    return "\n".join(lines).rstrip() + "\n"


def bootstrap_summary(results: dict, direction: str) -> str:
    """One line of a direction's paired bootstrap (``eval.py --bootstrap``): how often the model is first on each
    headline metric, and the method closest to it with the margin's standard deviation; ``""`` when none was run."""
    boot = results.get("bootstrap", {}).get(direction)
    if not boot:
        return ""
    parts = []
    for key, row in boot["metrics"].items():
        text = f"{HEADERS.get(key, key)} {100 * row['share_first']:.1f}%"
        if row["versus"]:
            sign = 1 if key in LOWER_IS_BETTER else -1
            name, closest = min(row["versus"].items(), key=lambda item: sign * -item[1]["difference"])
            text += f" (closest: {name}, margin {closest['difference']:+.6f}, sd {closest['sd']:.6f})"
        parts.append(text)
    return f"Paired bootstrap over the cells ({boot['resamples']} resamples): the model is first in " + "; ".join(parts) + "."


HEADLINE_KEYS = ("rmse", "pearson_cell", "auroc_cell", "ap_cell")


def model_ranks(results: dict) -> dict[str, dict[str, int]]:
    """Rank (1 = best) of ``model`` among every method of each direction, on the headline metrics."""
    out = {}
    for direction, block in results.get("directions", {}).items():
        rows = _methods(block)
        if "model" not in dict(rows):
            continue
        ranks = {}
        for key in HEADLINE_KEYS:
            values = {name: v[key] for name, v in rows if isinstance(v.get(key), int | float) and math.isfinite(v[key])}
            if "model" not in values:
                continue
            sign = 1 if key in LOWER_IS_BETTER else -1
            ranks[key] = 1 + sum(sign * value < sign * values["model"] for name, value in values.items() if name != "model")
        out[direction] = ranks
    return out


def headline_table(results_list: list[dict]) -> str:
    """The README's table: dataset x direction x method on RMSE, per-cell Pearson, AUROC and AP, best in bold,
    plus the model's RMSE cut over the per-feature mean."""
    lines = ["| dataset | direction | method | RMSE | Pearson (cell) | AUROC (cell) | AP (cell) |", "|---|---|---|---|---|---|---|"]
    for results in results_list:
        for direction, block in results.get("directions", {}).items():
            rows = _methods(block)
            best = {}
            for key in HEADLINE_KEYS:
                values = [v[key] for _, v in rows if isinstance(v.get(key), int | float) and math.isfinite(v[key])]
                if values:
                    best[key] = min(values) if key in LOWER_IS_BETTER else max(values)
            for name, values in rows:
                cells = []
                for key in HEADLINE_KEYS:
                    text = _fmt(values.get(key)) if key in values else ""
                    cells.append(f"**{text}**" if text and values.get(key) == best.get(key) else text)
                lines.append(f"| {results.get('dataset')} | {direction} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.report eval_results.json ...``: the headline table and the model's ranks."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", nargs="+", help="eval_results.json files")
    args = parser.parse_args(argv)
    loaded = [json.loads(Path(p).read_text()) for p in args.results]
    print(headline_table(loaded))
    for results in loaded:
        for direction, ranks in model_ranks(results).items():
            mean = results["directions"][direction].get("baselines", {}).get("mean", {}).get("rmse")
            cut = f", RMSE cut over the mean {100 * (1 - results['directions'][direction]['model']['rmse'] / mean):.2f}%" if mean else ""
            print(f"{results.get('dataset')} {direction}: model rank " + ", ".join(f"{k} {v}" for k, v in ranks.items()) + cut)
            summary = bootstrap_summary(results, direction)
            if summary:
                print(f"  {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
