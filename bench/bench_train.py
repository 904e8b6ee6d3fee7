"""Train benchmark: tokens/s and peak memory of training steps, per model shape and setting.

Each configuration runs in its own subprocess (clean peak memory): the MOp train split (built into
/tmp once, or ``--dataset``) becomes ``translator.data.TranslationExamples`` (both directions), batched
by ``LengthGroupedBatchSampler`` (``--group_factor 1`` = random batches within a direction, for the
effect of length grouping), collated by ``TranslationCollator``, and trained with
``translator.loss.TranslationLoss`` and AdamW as ``train.py`` does. After warm-up steps, timed
steps give tokens/s (real tokens: source + target, padding excluded) and padded tokens/s.

Settings compared: shapes ``tiny`` and ``t5-small``; length-grouped vs random batches; the restricted
output-layer loss (``n_negatives`` sampled off-modality names) vs the full-vocabulary softmax.
Peak memory: the child's peak RSS on CPU; ``torch.cuda.max_memory_allocated`` with ``--device cuda``
(bf16 autocast there, and ``--vocab_size 130000`` pads the vocabulary with extra peak names to the size
of a full multiome vocabulary). Model FLOPs utilisation on GPU uses 6 x parameters x tokens (encoder
parameters on source tokens, decoder + restricted output rows on target tokens) over ``--peak_tflops``.

    python bench/bench_train.py                                  # CPU: tiny and t5-small
    python bench/bench_train.py --device cuda --vocab_size 130000 --shapes t5-small --batch_size 64
    python bench/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402


def load_split(dataset: Path | None, quick: bool, n_cells: int | None):
    """(split with gex_text/atac_text, genes, peaks): a dataset's train split, or 64 MOp cells for --quick."""
    from bench_tokenize import mop_sentences

    gex, atac, genes, peaks, where = mop_sentences(dataset, quick)
    if n_cells:
        gex, atac = gex[:n_cells], atac[:n_cells]
    return {"gex_text": gex, "atac_text": atac}, genes, peaks, where


def run_one(cfg: dict) -> dict:
    """One configuration, in this process: returns its figures."""
    import torch
    from torch.utils.data import DataLoader

    from tokenizer import build_tokenizer, save_tokenizer
    from translator.data import LengthGroupedBatchSampler, TranslationCollator, TranslationExamples
    from translator.loss import TranslationLoss, default_chunk_elements
    from translator.model import make_config, make_model

    torch.manual_seed(0)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    split, genes, peaks, where = load_split(Path(cfg["dataset"]) if cfg["dataset"] else None, cfg["quick"], cfg["n_cells"])
    extra = max(0, cfg["vocab_size"] - (len(genes) + len(peaks) + 5)) if cfg["vocab_size"] else 0
    all_peaks = list(peaks) + [f"chrUn-{i}-{i + 1}" for i in range(extra)]
    tok = build_tokenizer(genes, all_peaks)
    with tempfile.TemporaryDirectory() as tmp:  # feature_token_ranges reads n_genes from a saved tokenizer
        save_tokenizer(tok, tmp, {"genes": genes, "peaks": all_peaks})
        from tokenizer import load_tokenizer

        tok = load_tokenizer(tmp)
    t = time.perf_counter()
    examples = TranslationExamples(split, tok, max_source_length=cfg["max_length"], max_target_length=cfg["max_length"])
    examples_seconds = time.perf_counter() - t
    sampler = LengthGroupedBatchSampler(examples.lengths, examples.directions, cfg["batch_size"], seed=0, group_factor=cfg["group_factor"])
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=TranslationCollator(examples.ranges))
    device = torch.device(cfg["device"])
    model = make_model(make_config(cfg["shape"], len(tok), dropout_rate=0.1, max_length=cfg["max_length"]), seed=0).to(device)
    loss_module = TranslationLoss(model, n_negatives=cfg["n_negatives"], chunk_elements=cfg.get("chunk_elements") or None).to(device).train()
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    d_model = model.config.d_model
    embed = model.shared.weight.numel()
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and "embed" not in n)
    decoder_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    use_bf16 = device.type == "cuda" and cfg["bf16"]

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if use_bf16:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                loss = loss_module(**batch, full_vocabulary=cfg["full_vocabulary"])
        else:
            loss = loss_module(**batch, full_vocabulary=cfg["full_vocabulary"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            batches = iter(loader)
            return next(batches)

    for _ in range(cfg["warmup_steps"]):
        step(next_batch())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = padded = source_real = target_real = 0
    load = common.load_average()
    t = time.perf_counter()
    for _ in range(cfg["steps"]):
        batch = next_batch()
        source_real += int(batch["attention_mask"].sum())
        target_real += int((batch["labels"] != -100).sum())
        padded += batch["input_ids"].numel() + batch["labels"].numel()
        step(batch)
    sync()
    seconds = time.perf_counter() - t
    real = source_real + target_real
    out = {
        **{k: cfg[k] for k in ("shape", "device", "batch_size", "group_factor", "n_negatives", "full_vocabulary", "max_length", "bf16")},
        "chunk_elements": cfg.get("chunk_elements") or default_chunk_elements(device),
        "sentences_from": where,
        "vocab_size": len(tok),
        "parameters": n_params,
        "embedding_parameters": embed,
        "examples": len(examples),
        "examples_build_seconds": round(examples_seconds, 2),
        "timed_steps": cfg["steps"],
        "seconds": round(seconds, 3),
        "tokens": real,
        "tokens_per_s": round(real / seconds, 1),
        "padded_tokens_per_s": round(padded / seconds, 1),
        "padding_fraction": round(1 - real / padded, 4),
        "steps_per_s": round(cfg["steps"] / seconds, 3),
        "load_average": load,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["device_name"] = torch.cuda.get_device_name()
        # 6 x params x tokens (forward + backward); output layer: d_model x (target rows + negatives) per target token.
        head = d_model * (2 * cfg["n_negatives"] + (len(tok) if cfg["full_vocabulary"] else 0))
        flops = 6 * (encoder_params * source_real + (decoder_params + head) * target_real)
        out["model_tflops_per_s"] = round(flops / seconds / 1e12, 2)
        out["mfu"] = round(flops / seconds / (cfg["peak_tflops"] * 1e12), 4)
    if cfg.get("profile"):
        out["profile"] = profile_steps(step, next_batch, sync, device.type, cfg["profile"])
    return out


def profile_steps(step, next_batch, sync, device_type: str, n_steps: int, rows: int = 20) -> dict:
    """The torch profiler over ``n_steps`` more steps: the top operators by self time (where the step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step(next_batch())
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    table = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 3), "share": round(getattr(e, key) / total, 4),
              "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in top]
    # Host-side cost: every aten op (views included) is dispatched by Python, autograd and the dispatcher in turn.
    aten_ops = sum(e.count for e in events if e.key.startswith("aten::")) / n_steps
    return {"steps": n_steps, "sorted_by": key, "self_total_ms": round(total / 1e3, 2), "aten_ops_per_step": aten_ops, "top": table}


def _child(cfg: dict) -> dict:
    """One configuration in a fresh interpreter (its own peak memory); its figures come back in a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(cfg), "--_result", str(result)]
        run = common.run_measured(cmd, cwd=common.REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if not result.exists():
            raise RuntimeError(f"bench_train child for {cfg['shape']} wrote no figures; its output ended:\n{run['output_tail']}")
        figures = json.loads(result.read_text())
    figures["child_peak_rss_mb"] = round(run["peak_rss_mb"], 1)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train benchmark (see the module docstring).")
    parser.add_argument("--dataset", type=Path, default=None, help="a built dataset folder (default: MOp built into /tmp once)")
    parser.add_argument("--shapes", nargs="+", default=None, help="model shapes (default tiny t5-small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per step (default 16 on CPU, 64 on cuda)")
    parser.add_argument("--max_length", type=int, default=512, help="source and target cap in tokens (train.py's default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick 2)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    parser.add_argument("--n_negatives", type=int, default=256, help="off-modality names of the restricted loss (train.py's default)")
    parser.add_argument("--vocab_size", type=int, default=None, help="pad the vocabulary with extra peak names up to this size")
    parser.add_argument("--n_cells", type=int, default=None, help="use only the first N train cells")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_bf16", action="store_true", help="fp32 on cuda")
    parser.add_argument("--peak_tflops", type=float, default=common.H100_BF16_DENSE_TFLOPS, help="device peak for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--skip_ablations", action="store_true", help="only the default setting per shape")
    parser.add_argument("--ablations_for", nargs="+", default=None, help="shapes that also run the ablations (default: all)")
    parser.add_argument("--profile", type=int, default=0, help="after the timed steps, profile this many more steps of each default setting (torch profiler)")
    parser.add_argument("--tag", default=None, help="suffix of the result name: results/train_cpu_TAG.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 2 steps on 64 MOp cells")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one is not None:
        Path(args._result).write_text(json.dumps(run_one(json.loads(args._one))))
        return {}
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu")
    cuda = args.device.startswith("cuda")
    base = {
        "dataset": str(args.dataset) if args.dataset else None,
        "quick": args.quick,
        "device": args.device,
        "batch_size": args.batch_size or (64 if cuda else 16),
        "max_length": args.max_length,
        "steps": args.steps or (2 if args.quick else 10),
        "warmup_steps": args.warmup_steps if args.warmup_steps is not None else (1 if args.quick else 2),
        "n_negatives": args.n_negatives,
        "vocab_size": args.vocab_size,
        "n_cells": args.n_cells or (64 if args.quick else None),
        "threads": args.threads,
        "bf16": cuda and not args.no_bf16,
        "peak_tflops": args.peak_tflops,
        "group_factor": 50,
        "full_vocabulary": False,
        "profile": 0,
    }
    shapes = args.shapes or (["tiny"] if args.quick else ["tiny", "t5-small"])
    rows = []
    for shape in shapes:
        settings = [{}]
        if not args.skip_ablations and not args.quick and (args.ablations_for is None or shape in args.ablations_for):
            settings += [{"group_factor": 1}, {"full_vocabulary": True}]
            if cuda:  # the CPU's chunk of the restricted loss, on the GPU: the effect of the output layer's memory bound
                settings += [{"chunk_elements": 2**23}]
        for change in settings:
            cfg = {**base, "shape": shape, **change, "profile": 0 if change else args.profile}
            # The smoke run stays in this process (no fresh interpreter, no peak-memory figure).
            figures = run_one(cfg) if args.quick else _child(cfg)
            rows.append(figures)
            memory = figures.get("peak_memory_mb", figures.get("child_peak_rss_mb", float("nan")))
            label = ("random batches" if change.get("group_factor") == 1 else "full-vocabulary loss" if change.get("full_vocabulary")
                     else f"chunk 2**{change['chunk_elements'].bit_length() - 1} logits" if change.get("chunk_elements") else "default")
            print(f"{shape:9s} {label:21s} {figures['tokens_per_s']:>10,.0f} tokens/s  padding {figures['padding_fraction']:.1%}  "
                  f"peak {'GPU' if cuda else 'RSS'} {memory:,.0f} MB" + (f"  MFU {figures['mfu']:.1%}" if "mfu" in figures else ""))
            if "profile" in figures:
                print(f"    profile: {figures['profile']['aten_ops_per_step']:,.0f} aten ops a step")
            for r in figures.get("profile", {}).get("top", [])[:12]:
                print(f"    profile {r['op'][:52]:52s} {r['calls']:>6d} calls {r['self_ms']:>10.2f} ms {r['share']:>6.1%}")
    figures = {"device": args.device, "runs": rows}
    if cuda:
        figures["target_tokens_per_s_h100_t5_small_bf16"] = 300_000
    name = f"train_{'cuda' if cuda else 'cpu'}" + (f"_{args.tag}" if args.tag else "")
    common.write_results(name, figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
