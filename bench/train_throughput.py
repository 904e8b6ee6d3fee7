"""Training throughput (source + target tokens per second) of the model shapes, restricted vs full-vocabulary loss.

    PYTHONPATH=. python bench/train_throughput.py --dataset_dir DATA --tokenizer_dir TOK \
        [--sizes tiny small t5-small] [--steps 2] [--threads 1]

For each shape and loss, a fresh process times forward + backward + AdamW on real length-grouped
train batches (batch 32), ``--steps`` batches of each direction after one warm-up batch of each
(target ATAC = gex2atac, target GEX = atac2gex), and reports tokens/s per direction and overall,
and the peak memory: the process's max RSS above its level before the model was built (CPU), or
``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(args: argparse.Namespace, size: str, full: bool) -> dict:
    import datasets

    from tokenizer import load_tokenizer
    from translator.data import LengthGroupedBatchSampler, TranslationCollator, TranslationExamples
    from translator.loss import TranslationLoss
    from translator.model import make_config, make_model

    tok = load_tokenizer(args.tokenizer_dir)
    split = datasets.load_from_disk(args.dataset_dir)["train"].select(range(args.cells))
    examples = TranslationExamples(split, tok, max_source_length=args.max_length, max_target_length=args.max_length)
    sampler = LengthGroupedBatchSampler(examples.lengths, examples.directions, args.batch_size, seed=0)
    collate = TranslationCollator(examples.ranges)
    batches = {0: [], 1: []}
    for b in sampler:
        direction = examples.directions[b[0]]
        if len(b) == args.batch_size and len(batches[direction]) < args.steps + 1:
            batches[direction].append(collate([examples[i] for i in b]))
    device = torch.device(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module = TranslationLoss(make_model(make_config(size, len(tok)), seed=0)).to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    row = {"size": size, "loss": "full" if full else "restricted", "vocab": len(tok), "batch": args.batch_size,
           "threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    all_tokens, all_seconds = 0, 0.0
    for direction, name in ((0, "gex2atac"), (1, "atac2gex")):
        tokens, seconds = 0, 0.0
        for i, batch in enumerate(batches[direction]):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(**batch, full_vocabulary=full).backward()
            optimizer.step()
            optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first batch of each direction warms up
                seconds += time.perf_counter() - start
                tokens += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        row[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        all_tokens, all_seconds = all_tokens + tokens, all_seconds + seconds
    row["tokens_per_s"] = round(all_tokens / all_seconds, 1)
    row["s_per_step"] = round(all_seconds / (2 * args.steps), 3)
    if device.type == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        row["peak_rss_growth_mib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--tokenizer_dir", required=True)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "t5-small"])
    parser.add_argument("--losses", nargs="+", default=["restricted", "full"])
    parser.add_argument("--steps", type=int, default=2, help="timed batches per direction (after one warm-up batch each)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cells", type=int, default=1000, help="train cells to draw batches from")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._one:
        size, loss = args._one.split(":")
        print(json.dumps(measure(args, size, loss == "full")), flush=True)
        return
    for size in args.sizes:
        for loss in args.losses:
            child = [a for a in sys.argv[1:]] + ["--_one", f"{size}:{loss}"]
            subprocess.run([sys.executable, __file__, *child], check=True)


if __name__ == "__main__":
    main()
