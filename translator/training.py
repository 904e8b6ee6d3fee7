"""Pieces of a training run around the loop: the recipe's schedule, early stopping, tail averaging, the time budget,
the memory and disk checks, checkpoints, the output folder's lock. The loop: :mod:`translator.loop`; after it (head
refit, calibration, the model folder's files): :mod:`translator.finishing`.

Checkpoints (``accelerator.save_state``) are written to a hidden temporary folder and renamed, so a
kill during a save leaves the previous checkpoint usable. The model folder's files are written to a
temporary folder and moved in one by one (each ``os.replace`` is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dataset_builder.outputs import check_room_for

from .model import PROFILE_INPUTS

logger = logging.getLogger("train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS_FILE = "best_weights.pt"
AUTO_EVAL_STEPS = 500  # validation at least this often on data whose epochs are long
AUTO_WARMUP_STEPS = 100
AUTO_WARMUP_FRACTION = 0.1
AVERAGE_STATE_FILE = "custom_checkpoint_0.pkl"  # accelerate's file for the first registered object: the TailAverage


def checkpoint_steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.glob("step_*"):
            if (path / STATE_FILE).exists() and path.name[5:].isdigit():
                found.append((int(path.name[5:]), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str) -> Path:
    """The checkpoint folder for ``--resume_from_checkpoint`` (a path, or ``latest`` in ``output_dir``)."""
    if resume_from_checkpoint == "latest":
        found = checkpoint_steps(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}")
        return found[-1][1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict, keep: int = 2, best: BestWeights | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step_N``, then rename to ``step_N``; keep the last ``keep``.

    ``best``: the early-stopping state (best weights so far) goes into the checkpoint too, so a resumed run keeps it.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    tmp = root / f".tmp-step_{step}"
    final = root / f"step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if best is not None:
            torch.save(best.state_dict(), tmp / BEST_WEIGHTS_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoint_steps(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def auto_warmup_steps(planned_steps: int) -> int:
    """Warmup of a run of ``planned_steps`` steps: a tenth of it, at most :data:`AUTO_WARMUP_STEPS`."""
    return max(1, min(AUTO_WARMUP_STEPS, math.ceil(AUTO_WARMUP_FRACTION * planned_steps)))


def auto_eval_steps(steps_per_epoch: int) -> int:
    """Validation interval: once per epoch, and at least every :data:`AUTO_EVAL_STEPS` steps."""
    return max(1, min(steps_per_epoch, AUTO_EVAL_STEPS))


class LinearSchedule:
    """Learning-rate factor: linear warmup over ``warmup`` scheduler steps, then linear decay to 0 at ``total``.

    The same factors as ``transformers.get_linear_schedule_with_warmup``, but the end may move while training
    (:meth:`move_end`: under a time budget the decay ends where the budget's pace says training will end, sooner or
    later as the pace changes, never past the planned ``total``). A callable object, so ``LambdaLR.state_dict`` saves the
    end with the checkpoint and a resumed run continues the same schedule.
    """

    def __init__(self, warmup: int, total: int):
        self.warmup = int(warmup)
        self.total = self.planned = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def move_end(self, total: int) -> bool:
        """End the decay at ``total`` scheduler steps (never into the warmup, never past the planned end); True when it moved."""
        total = min(max(int(total), self.warmup + 1), self.planned)
        if total == self.total:
            return False
        self.total = total
        return True


class BestWeights:
    """Early stopping on the validation loss, keeping the weights of the best evaluation.

    :meth:`update` after each validation: a loss below the best so far copies the module's state (to the CPU);
    it returns True once ``patience`` validations in a row brought no new best (0: never). :meth:`restore` puts
    the best weights back. ``state_dict`` / ``load_state_dict`` carry it through a checkpoint.
    """

    def __init__(self, module: torch.nn.Module, patience: int):
        self.module = module
        self.patience = int(patience)
        self.best_loss = math.inf
        self.best_step = 0
        self.since_best = 0
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, loss: float, step: int) -> bool:
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = float(loss), int(step), 0
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        else:
            self.since_best += 1
        return self.patience > 0 and self.since_best >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        if self.weights is not None:
            self.module.load_state_dict(self.weights)

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "since_best": self.since_best, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step, self.since_best = float(state["best_loss"]), int(state["best_step"]), int(state["since_best"])
        self.weights = state["weights"]


class Budget:
    """The job's time budget (``--max_train_seconds``): seconds left of it, measured from ``started``; no limit when 0."""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds = float(seconds)
        self.started = time.perf_counter() if started is None else started

    @property
    def limited(self) -> bool:
        return self.seconds > 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed() if self.limited else math.inf


# What one training process holds besides the model, measured as the peak RSS of short CPU runs (python, torch,
# transformers, datasets, the tokenizer) and the bytes per element of what grows with the model and the batch.
BASE_BYTES = 1.5 * 2**30
PARAMETER_BYTES = 16  # float32 weight, gradient and AdamW's two moments
HIDDEN_BYTES = 48  # per sequence position and model width, per layer: the activations autograd keeps
FF_BYTES = 12  # per position and feed-forward width, per layer
ATTENTION_BYTES = 12  # per head and pair of positions, per attention block: scores, probabilities, dropout
PROFILE_BYTES = 16  # per cell of a batch and target feature: the profile readout's scores, loss and gradients
READOUT_BYTES = 56  # per validation cell and feature in the calibration: the decoded features and the truth, float64
BLEND_BYTES = 24  # per held-out cell and feature in the blend's choice: the transformer's, the kernel's and the true matrices


def estimate_memory(config, n_parameters: int, batch_size: int, max_source_length: int, max_target_length: int, n_features: int,
                    calibration_cells: int, held_out_cells: int = 0) -> dict[str, float]:
    """Peak memory of a training run in bytes, by part: ``{"base", "parameters", "activations", "profile", "calibration", "blend",
    "total"}``.

    ``config`` is the T5 config (width, feed-forward width, heads, layers), ``n_parameters`` counts the model and the
    profile head, ``n_features`` is the larger modality (genes or peaks), ``calibration_cells`` the cells the readout
    calibration decodes, ``held_out_cells`` those the blend is chosen on (with a k-fold's fold, see
    :mod:`translator.predictor`). The activations are those of one micro-batch of full-length sources and targets: an upper bound
    on what a length-grouped batch holds.
    """
    b, s, t = batch_size, max_source_length, max_target_length
    d, ff, heads = config.d_model, config.d_ff, config.num_heads
    layers_enc, layers_dec = config.num_layers, config.num_decoder_layers
    hidden = b * (layers_enc * s + layers_dec * t) * (d * HIDDEN_BYTES + ff * FF_BYTES)
    attention = b * heads * ATTENTION_BYTES * (layers_enc * s * s + layers_dec * (t * t + t * s))
    parts = {
        "base": BASE_BYTES,
        "parameters": float(n_parameters * PARAMETER_BYTES),
        "activations": float(hidden + attention),
        "profile": float(b * n_features * PROFILE_BYTES),
        "calibration": float(calibration_cells * n_features * READOUT_BYTES),
        "blend": float(held_out_cells * n_features * BLEND_BYTES),
    }
    parts["total"] = sum(parts.values())
    return parts


def available_memory() -> float:
    """Bytes this process may still use: the system's available memory, or the cgroup's limit when that is lower."""
    import psutil

    available = float(psutil.virtual_memory().available)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            available = min(available, float(int(limit) - int(usage)))
        break
    return available


def check_memory(estimate: dict[str, float], available: float, what: str) -> None:
    """Refuse, in one line before training starts, a run whose estimated peak does not fit in ``available`` bytes."""
    if estimate["total"] <= available:
        return
    gib = 2**30
    largest = max((k for k in estimate if k not in ("total", "base")), key=estimate.get)
    fixes = {
        "activations": "lower --per_device_train_batch_size or --max_source_length / --max_target_length, or choose --model_size tiny",
        "parameters": "choose --model_size tiny, or build the dataset with --top_peaks N to shrink the vocabulary",
        "profile": "lower --per_device_train_batch_size, or build the dataset with --top_peaks N",
        "calibration": "lower --calibration_cells, or build the dataset with --top_peaks N",
        "blend": "build the dataset with --top_peaks N",
    }
    raise ValueError(f"{what} needs about {estimate['total'] / gib:.1f} GiB of memory ({largest} {estimate[largest] / gib:.1f} GiB) and "
                      f"{available / gib:.1f} GiB are available: {fixes[largest]}")


def check_run_memory(config, model_args, data_args, run, meta: dict, n_validation: int) -> dict[str, float]:
    """Estimate the run's peak memory from the vocabulary, the model's shape and the batch (bytes by part, see
    :func:`estimate_memory`), and refuse in one line what cannot fit."""
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):  # shapes only: no memory, no time
        n_params = sum(p.numel() for p in T5ForConditionalGeneration(config).parameters())
    if model_args.profile_weight > 0:
        n_params += config.vocab_size * (PROFILE_INPUTS * config.d_model + 1)
    n_features = max(len(meta["genes"]), len(meta["peaks"]))
    calibration_cells = min(n_validation, data_args.calibration_cells)
    from .predictor import held_out_cells

    estimate = estimate_memory(config, n_params, run.per_device_train_batch_size, data_args.max_source_length, data_args.max_target_length, n_features, calibration_cells,
                               held_out_cells(n_validation))
    what = (f"--model_size {model_args.model_size} with {config.vocab_size:,} names, batch {run.per_device_train_batch_size} and caps "
            f"{data_args.max_source_length}/{data_args.max_target_length}")
    if torch.cuda.is_available():  # the model trains on the GPU; the host keeps the data and the calibration
        device = {k: estimate[k] for k in ("parameters", "activations", "profile")}
        check_memory({**device, "total": sum(device.values())}, float(torch.cuda.mem_get_info()[0]), what + " (GPU)")
        host = {k: estimate[k] for k in ("base", "parameters", "calibration", "blend")}
        check_memory({**host, "total": sum(host.values())}, available_memory(), what)
    else:
        check_memory(estimate, available_memory(), what)
    return estimate


class TailAverage:
    """Running mean of a module's parameters over the last steps of training (tail / checkpoint averaging).

    ``update()`` after each optimizer step from ``start_step`` on; ``copy_to_module()`` at the end puts the mean in
    place of the last weights. Registered with ``accelerator.register_for_checkpointing``, so a resumed run carries
    the partial mean on (``state_dict`` / ``load_state_dict``). Every rank of a DDP run holds the same weights, so
    every rank computes the same mean.
    """

    def __init__(self, module: torch.nn.Module, start_step: int):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.start_step = start_step
        self.count = 0
        self.mean: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        if self.count == 1:
            self.mean = [p.detach().float().clone() for p in self.params]
            return
        for mean, p in zip(self.mean, self.params, strict=True):
            mean.add_(p.detach().float() - mean, alpha=1.0 / self.count)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        for mean, p in zip(self.mean, self.params, strict=True):
            p.copy_(mean.to(p.dtype))

    def state_dict(self) -> dict:
        return {"count": self.count, "start_step": self.start_step, "mean": [m.cpu() for m in self.mean]}

    def load_state_dict(self, state: dict) -> None:
        if state["start_step"] != self.start_step:
            raise ValueError(f"the checkpoint averages weights from step {state['start_step']}, this run from step {self.start_step}; "
                             "resume with the --weight_average_fraction and --max_steps it was started with")
        device = self.params[0].device
        self.count, self.mean = state["count"], [m.to(device) for m in state["mean"]]


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes (in name order): equal only for bitwise equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def claim_output_dir(out: str | os.PathLike, *, replace: bool, enabled: bool = True) -> Iterator[None]:
    """Own ``out`` for one training run: a lock beside it, the old folder removed when ``replace``, clean-up on failure.

    The lock file (``.NAME.train.lock``, beside the folder: the folder may be replaced and the Hub upload must not
    see it) makes a second run on the same folder refuse; it is removed when the run ends, however it ends. If the
    run fails, a folder this run created and left empty is removed; one holding checkpoints is kept and the log
    says how to resume from it. ``enabled=False`` (the other processes of a multi-process run) does nothing.
    """
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.train.lock"
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FileExistsError(f"--output_dir {out} is in use by another train.py run; wait for it or choose another --output_dir") from None
    created = not out.exists()
    try:
        if replace and out.exists():
            shutil.rmtree(out)
            created = True
        out.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif checkpoint_steps(out):
            logger.warning("the last checkpoint (%s) is kept: resume with --resume_from_checkpoint latest", checkpoint_steps(out)[-1][1])
        raise
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: no other run can own this file in between
        lock.release()


def check_free_space(out: str | os.PathLike, n_parameters: int, checkpoints: bool) -> None:
    """Refuse to start training when ``out``'s disk cannot hold the final folder (and, with ``checkpoints``, two checkpoints).

    A model folder holds the fp32 weights once; a checkpoint holds them with AdamW's two moments (about 3x) and
    ``save_checkpoint`` keeps two, one being written while the other stays.
    """
    weights = 4 * n_parameters
    what = "the model folder and two checkpoints" if checkpoints else "the model folder"
    check_room_for(Path(out) / "model.safetensors", int(1.1 * weights) + (2 * 3 * weights if checkpoints else 0), what)
