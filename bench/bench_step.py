"""Training-step benchmark: operators dispatched and seconds per step of the default recipe's step, per model shape.

The step is ``translator.loop.train_step`` (forward of ``TranslationLoss``, backward, gradient clipping, AdamW from
``make_optimizer``, the scheduler) with the default recipe's loss settings (profile readout, label smoothing 0.1, source
dropout 0.1, 256 off-modality names, a sampled softmax above 16,384 target names). Batches are synthetic full-size cells at
the default recipe's caps: every GEX source holds 512 tokens (the prefix, 510 genes, ``</s>``) as a cell of about 1,500
genes does, every ATAC target 128, every GEX target 6; the vocabulary has GSE194122's 13,431 genes and 116,490 peaks
(129,926 names with the special tokens). The directions alternate, one batch each.

After ``--warmup_steps`` steps, ``--steps`` timed steps give seconds per step and train tokens per second; then the
torch profiler records two more steps (one per direction) and counts the ``aten::`` operators dispatched a step: all of
them (``aten_ops``, nested ones included, as the profiler lists them) and those called from Python or compiled code
rather than from inside another operator (``top_level_ops``). With ``--torch_compile`` the compiled graphs' own kernels
count too (``compiled_kernels``). On a GPU (``--device cuda``) the profiler also counts the kernels that ran on the
device (``device_kernels``) and the launches the host asked for (``kernel_launches``: kernel launches plus CUDA graph
replays), and the step's model FLOPs utilisation over ``--peak_tflops`` (:func:`step_flops`: every weight product of the
step, and the older count of ``bench_train.py``).

    python bench/bench_step.py                              # tiny (batch 32) and t5-small (batch 8), CPU
    python bench/bench_step.py --shapes t5-small --torch_compile
    python bench/bench_step.py --device cuda --mixed_precision bf16 --shapes t5-small --batch_size 256 \
        --torch_compile --torch_compile_mode reduce-overhead --tag bf16_compiled
    python bench/bench_step.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_common as common  # noqa: E402

N_GENES, N_PEAKS = 13_431, 116_490  # GSE194122
GENES_PER_CELL, PEAKS_PER_CELL = 1_500, 4_000
N_SPECIAL = 5  # <pad> </s> <unk> <gex2atac> <atac2gex>
GEX_PREFIX, ATAC_PREFIX = 3, 4
DEFAULT_BATCH = {"tiny": 32, "small": 32, "t5-small": 8}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


def synthetic_batches(batch_size: int, n_genes: int, n_peaks: int, caps: tuple[int, int, int], seed: int = 0) -> list[dict]:
    """Two full-size batches, GEX to ATAC then ATAC to GEX, in the layout of ``TranslationCollator``.

    ``caps`` = (source, ATAC target, GEX target) lengths in tokens, ``</s>`` included.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    genes = (N_SPECIAL, N_SPECIAL + n_genes)
    peaks = (genes[1], genes[1] + n_peaks)

    def names(rng: tuple[int, int], k: int) -> torch.Tensor:
        k = min(k, rng[1] - rng[0])
        return torch.rand(batch_size, rng[1] - rng[0], generator=gen).topk(k, dim=1).indices + rng[0]

    def sentence(prefix: int | None, body: torch.Tensor) -> torch.Tensor:
        eos = torch.ones(batch_size, 1, dtype=torch.long)
        parts = ([torch.full((batch_size, 1), prefix)] if prefix is not None else []) + [body, eos]
        return torch.cat(parts, dim=1)

    source_len, atac_len, gex_len = caps
    batches = []
    for prefix, src, tgt, tgt_len, binary, per_cell in ((GEX_PREFIX, genes, peaks, atac_len, True, PEAKS_PER_CELL),
                                                      (ATAC_PREFIX, peaks, genes, gex_len, False, GENES_PER_CELL)):
        source = sentence(prefix, names(src, source_len - 2))
        labels = sentence(None, names(tgt, tgt_len - 1))
        n_target = tgt[1] - tgt[0]
        detected = torch.rand(batch_size, n_target, generator=gen) < min(1.0, per_cell / n_target)
        values = detected.float() if binary else detected * torch.rand(batch_size, n_target, generator=gen) * 4
        batches.append({"input_ids": source, "attention_mask": torch.ones_like(source), "labels": labels,
                        "target_start": tgt[0], "target_stop": tgt[1], "profile_values": values})
    return batches


def count_ops(prof, n_steps: int, rows: int = 12) -> dict:
    """Per step: every ``aten::`` event, those not nested in another ``aten::`` event, and compiled kernels; on a GPU the
    kernels run on the device and the launches asked for by the host; the most frequent top-level operators, the nested
    events by the top-level operator they run inside, and where the time goes (each operator's share of the profiled self
    CPU time)."""
    from collections import Counter

    from torch.autograd import DeviceType

    aten = kernels = device_kernels = launches = 0
    top: Counter = Counter()
    nested: Counter = Counter()
    for event in prof.events():
        name = event.name
        if event.device_type == DeviceType.CUDA:
            device_kernels += 1
            continue
        if name in LAUNCHES:
            launches += 1
        if name.startswith("aten::"):
            aten += 1
            outer, parent = None, event.cpu_parent
            while parent is not None:
                if parent.name.startswith("aten::"):
                    outer = parent.name
                parent = parent.cpu_parent
            if outer is None:
                top[name] += 1
            else:
                nested[outer] += 1
        elif "cpp_fused" in name or name.startswith("triton_"):
            kernels += 1
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    by_time = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {"aten_ops": aten / n_steps, "top_level_ops": sum(top.values()) / n_steps, "compiled_kernels": kernels / n_steps,
            "device_kernels": device_kernels / n_steps, "kernel_launches": launches / n_steps,
            "top_level_by_op": {k: v / n_steps for k, v in top.most_common(rows)},
            "nested_by_outer_op": {k: v / n_steps for k, v in nested.most_common(rows)},
            "self_cpu_share_by_op": {e.key: round(e.self_cpu_time_total / total, 4) for e in by_time}}


def step_flops(model, batches: list[dict], steps: int, seconds: float, peak_tflops: float, n_negatives: int, max_scored: int) -> dict:
    """Model FLOPs a second and utilisation of ``steps`` steps (the batches alternate) that took ``seconds``.

    ``mfu``: 6 x the multiply-adds of every matrix product the step runs with weights: the encoder's parameters (embeddings
    aside) on the source tokens, the decoder's and the output rows scored (the target names, sampled down to
    ``max_scored``, and the negatives) on the target tokens, and the profile head's rows of the target modality on each
    cell. ``mfu_bench_train``: the count of ``bench_train.py`` (6 x parameters x tokens, output rows = twice the
    negatives), which the earlier H100 rows used. Attention's score products are in neither."""
    named = list(model.named_parameters())
    encoder = sum(p.numel() for n, p in named if n.startswith("encoder.") and "embed" not in n)
    decoder = sum(p.numel() for n, p in named if n.startswith("decoder.") and "embed" not in n)
    d_model = model.config.d_model
    full = old = 0.0
    for b in batches:
        source, target = int(b["attention_mask"].sum()), int((b["labels"] != -100).sum())
        n_target = int(b["target_stop"]) - int(b["target_start"])
        rows = min(max_scored, n_target) + n_negatives
        full += 6 * (encoder * source + (decoder + d_model * rows) * target + 3 * d_model * n_target * b["input_ids"].shape[0])
        old += 6 * (encoder * source + (decoder + d_model * 2 * n_negatives) * target)
    per_step = steps / len(batches)
    return {"model_tflops_per_s": round(full * per_step / seconds / 1e12, 2), "mfu": round(full * per_step / seconds / (peak_tflops * 1e12), 4),
            "mfu_bench_train": round(old * per_step / seconds / (peak_tflops * 1e12), 4), "peak_tflops": peak_tflops}


def run_shape(shape: str, args: argparse.Namespace) -> dict:
    import torch
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    from translator.loop import make_optimizer, train_step
    from translator.loss import TranslationLoss
    from translator.model import make_config, make_model

    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    n_genes, n_peaks = (args.n_genes, args.n_peaks)
    vocab = N_SPECIAL + n_genes + n_peaks
    batch_size = args.batch_size or DEFAULT_BATCH[shape]
    caps = (args.max_source_length, args.max_target_length, args.max_gex_target_length)
    accelerator = Accelerator(cpu=not cuda, mixed_precision=args.mixed_precision)
    device = accelerator.device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in synthetic_batches(batch_size, n_genes, n_peaks, caps, args.seed)]
    config_kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    config = make_config(shape, vocab, 0.2, args.max_target_length, **config_kwargs)
    model = make_model(config, seed=args.seed)
    rate = min(0.5, PEAKS_PER_CELL / n_peaks)
    offsets = {N_SPECIAL: (torch.full((n_genes,), 1.0), False), N_SPECIAL + n_genes: (torch.full((n_peaks,), math.log(rate / (1 - rate))), True)}
    max_scored = 16_384
    loss_module = TranslationLoss(model, 256, 0.1, 1.0, offsets, 0.1, max_scored_targets=max_scored)
    if args.torch_compile:
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True  # the compiled C++ kernels show in the profile
        loss_module.compile_step(args.torch_compile_mode)
    loss_module.to(device)
    optimizer = make_optimizer(loss_module, 2e-3, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_module, optimizer, scheduler = accelerator.prepare(loss_module, optimizer, scheduler)
    loss_module.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(i: int) -> torch.Tensor:
        torch.manual_seed(args.seed * 1_000_003 + i * 101)  # as the training loop seeds each micro-step
        return train_step(accelerator, loss_module, optimizer, scheduler, batches[i % 2])

    started = time.perf_counter()
    warmup_losses = [float(step(i).detach()) for i in range(args.warmup_steps)]
    sync()
    warmup_seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    load = common.load_average()
    started = time.perf_counter()
    losses = [step(args.warmup_steps + i).detach() for i in range(args.steps)]
    sync()
    seconds = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            step(args.warmup_steps + args.steps + i)
        sync()
    # tokens a step (the two directions' batches alternate): real source and target tokens
    source_tokens = sum(int(b["attention_mask"].sum()) for b in batches) / 2
    target_tokens = sum(int((b["labels"] != -100).sum()) for b in batches) / 2
    tokens = source_tokens + target_tokens
    row = {
        "shape": shape,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else common.machine()["processor"],
        "mixed_precision": accelerator.mixed_precision,
        "tf32": bool(args.tf32) if cuda else None,
        "batch_size": batch_size,
        "vocab_size": vocab,
        "caps": list(caps),
        "attn_implementation": model.config._attn_implementation,
        "torch_compile": bool(args.torch_compile),
        "torch_compile_mode": args.torch_compile_mode if args.torch_compile else None,
        "parameters": sum(p.numel() for p in accelerator.unwrap_model(loss_module).parameters()),
        "warmup_steps": args.warmup_steps,
        "warmup_seconds": round(warmup_seconds, 2),
        "warmup_losses": [round(x, 5) for x in warmup_losses],
        "timed_steps": args.steps,
        "seconds_per_step": round(seconds / max(1, args.steps), 4),
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens * args.steps / seconds, 1) if seconds else None,
        "losses": [round(float(x), 5) for x in losses],
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load,
        **count_ops(prof, 2),
    }
    if cuda:
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row.update(step_flops(model, batches, args.steps, seconds, args.peak_tflops, n_negatives=256, max_scored=max_scored))
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Ops dispatched and seconds per training step (see the module docstring).")
    parser.add_argument("--shapes", nargs="+", default=None, help="model shapes (default tiny t5-small; --quick: tiny)")
    parser.add_argument("--batch_size", type=int, default=None, help="cells per step (default: 32 for tiny, 8 for t5-small on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4; --quick 1)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default 2, one per direction)")
    parser.add_argument("--max_source_length", type=int, default=512, help="source cap (the default recipe's)")
    parser.add_argument("--max_target_length", type=int, default=128, help="ATAC target cap (the default recipe's)")
    parser.add_argument("--max_gex_target_length", type=int, default=6, help="GEX target cap (the default recipe's)")
    parser.add_argument("--n_genes", type=int, default=N_GENES, help="genes in the vocabulary (GSE194122: 13,431)")
    parser.add_argument("--n_peaks", type=int, default=N_PEAKS, help="peaks in the vocabulary (GSE194122: 116,490)")
    parser.add_argument("--attn_implementation", default=None, help="eager | sdpa | flex_attention (default: the model's)")
    parser.add_argument("--torch_compile", action="store_true", help="compile the step's forward and backward (torch.compile)")
    parser.add_argument("--torch_compile_mode", default="default", help="torch.compile mode: default | reduce-overhead (CUDA graphs on a GPU) | max-autotune")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "bf16", "fp16"), help="accelerate's mixed precision (train.py --mixed_precision)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matrix products in fp32 (train.py --tf32)")
    parser.add_argument("--peak_tflops", type=float, default=common.H100_BF16_DENSE_TFLOPS, help="device peak for the MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default=None, help="suffix of the result name: results/step_DEVICE_TAG.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, a small vocabulary and short sentences")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu")
    if args.tf32:
        from translator.model import cuda_tf32

        cuda_tf32(True)
    if args.quick:
        args.n_genes, args.n_peaks = min(args.n_genes, 300), min(args.n_peaks, 2_000)
        args.max_source_length, args.max_target_length = min(args.max_source_length, 64), min(args.max_target_length, 32)
        args.batch_size = args.batch_size or 4
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 4)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else 2
    rows = []
    for shape in args.shapes or (["tiny"] if args.quick else ["tiny", "t5-small"]):
        row = run_shape(shape, args)
        rows.append(row)
        print(f"{shape:9s} batch {row['batch_size']:3d} {row['attn_implementation']:8s} compile {str(row['torch_compile']):5s} "
              f"{row['seconds_per_step']:8.3f} s/step  {row['aten_ops']:8,.0f} aten ops ({row['top_level_ops']:,.0f} top-level, "
              f"{row['compiled_kernels']:,.0f} compiled kernels) a step, {row['tokens_per_s']:,.0f} tokens/s"
              + (f", {row['device_kernels']:,.0f} device kernels, {row['kernel_launches']:,.0f} launches, MFU {row['mfu']:.1%}" if "mfu" in row else ""),
              flush=True)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    figures = {"device": device, "runs": rows}
    common.write_results(f"step_{device}" + (f"_{args.tag}" if args.tag else ""), figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
