"""The training loop: optimizer steps over length-grouped batches with accelerate, the train loss logged, the validation
loss with early stopping, tail averaging, checkpoints, and the time budget that may end the loop (and its learning-rate
decay) sooner.

``train.py`` builds the parts (:func:`make_optimizer`, :func:`plan_steps`, :func:`resume`) and runs
:class:`TrainingLoop`. A run resumed from a checkpoint repeats the batches, dropout and negative sampling of the run it
continues: they depend only on the seed, the epoch, the micro-step and the rank.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from .streaming import StreamingLoader
from .training import (
    AVERAGE_STATE_FILE,
    BEST_WEIGHTS_FILE,
    BestWeights,
    Budget,
    LinearSchedule,
    TailAverage,
    auto_eval_steps,
    auto_warmup_steps,
    resolve_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger("train")


def make_optimizer(loss_module: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with ``weight_decay`` on every weight but the layer norms and biases.

    The fused implementation (one operator per group of parameters instead of about a dozen per parameter, and no wait
    for the device) where torch has it for the parameters' device; the same update otherwise.
    """
    decay = [p for n, p in loss_module.named_parameters() if "layer_norm" not in n and not n.endswith("bias")]
    no_decay = [p for n, p in loss_module.named_parameters() if "layer_norm" in n or n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    params = decay + no_decay
    fused = bool(params) and all(p.device.type in _get_fused_kernels_supported_devices() and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused or None)


@dataclass
class StepPlan:
    """How long the run is: optimizer steps per epoch, at most ``max_steps`` steps over ``num_epochs`` epochs, the warmup,
    and a validation every ``eval_steps`` steps (0: only at the end)."""

    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    warmup_steps: int
    eval_steps: int


def plan_steps(n_batches: int, run) -> StepPlan:
    """The step plan of ``n_batches`` micro-batches an epoch under ``run``'s arguments (-1: the automatic choices)."""
    steps_per_epoch = math.ceil(n_batches / run.gradient_accumulation_steps)
    max_steps = run.max_steps if run.max_steps > 0 else math.ceil(run.num_train_epochs * steps_per_epoch)
    return StepPlan(steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch),
                    run.warmup_steps if run.warmup_steps >= 0 else auto_warmup_steps(max_steps),
                    run.eval_steps if run.eval_steps >= 0 else auto_eval_steps(steps_per_epoch))


def resume(accelerator: Accelerator, run, n_batches: int, average: TailAverage | None, best: BestWeights | None) -> tuple[int, int, int]:
    """Model, optimizer, scheduler and RNG from ``--resume_from_checkpoint``; returns the data position
    ``(completed_steps, starting_epoch, batches into that epoch)`` (zeros without the flag)."""
    if not run.resume_from_checkpoint:
        return 0, 0, 0
    path = resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)
    if (average is not None) != (path / AVERAGE_STATE_FILE).exists():
        raise ValueError(f"{path} was written {'without' if average is not None else 'with'} --weight_average_fraction; resume with the flags it was started with")
    accelerator.load_state(str(path))
    if best is not None and (path / BEST_WEIGHTS_FILE).exists():
        best.load_state_dict(torch.load(path / BEST_WEIGHTS_FILE, weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    starting_epoch, resume_batches = divmod(state["batches_seen"], n_batches)
    accelerator.print(f"resumed from {path.name} at step {state['completed_steps']}")
    return state["completed_steps"], starting_epoch, resume_batches


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float) -> torch.Tensor | None:
    """Scale the gradients down to a total 2-norm of at most ``max_norm``, as ``accelerator.clip_grad_norm_`` does; returns
    the norm before clipping.

    On one device and under DDP (every gradient whole on this process's device) three multi-tensor operators do it,
    where torch's ``clip_grad_norm_`` also dispatches one conversion per parameter; FSDP, DeepSpeed and the others go
    through accelerate.
    """
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients()
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def train_step(accelerator: Accelerator, loss_module: torch.nn.Module, optimizer, scheduler, batch: dict) -> torch.Tensor:
    """One micro-batch: forward, backward and, at the end of a gradient accumulation, the clipped optimizer step.

    Returns the loss (a device tensor; nothing here waits for the device).
    """
    unwrapped = accelerator.unwrap_model(loss_module)
    cuda_graphs = getattr(unwrapped, "cuda_graphs", False)
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's outputs may be overwritten
    with accelerator.accumulate(loss_module):
        loss = loss_module(**batch)
        if cuda_graphs:  # copies that outlive the next replay, for the loop's logging
            loss, unwrapped.last_parts = loss.clone(), {k: v.clone() for k, v in unwrapped.last_parts.items()}
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip_gradients(accelerator, loss_module.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss


def validation_loss(loss_module, loader, accelerator) -> dict[str, float]:
    """Token-weighted mean validation loss (and its sentence / profile parts) over all processes.

    Runs the unwrapped module: ranks may see unequal batches.
    """
    loss_module = accelerator.unwrap_model(loss_module)
    loss_module.eval()
    total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            n = (batch["labels"] != -100).sum().double()
            loss = loss_module(**batch).double()
            parts = loss_module.last_parts
            zero = torch.zeros((), dtype=torch.float64, device=n.device)
            total += torch.stack([loss * n, n, parts.get("sentence", zero).double() * n, parts.get("profile", zero).double() * n])
    loss_module.train()
    total = accelerator.reduce(total, reduction="sum")
    n = total[1].clamp(min=1)
    return {"validation_loss": float(total[0] / n), "validation_sentence_loss": float(total[2] / n), "validation_profile_loss": float(total[3] / n)}


def out_of_time(accelerator: Accelerator, started: float, limit: float) -> bool:
    """Whether ``limit`` seconds have passed since ``started``; with several processes, on any of them (all ranks stop together)."""
    over = time.perf_counter() - started > limit
    if accelerator.num_processes == 1:
        return over
    return bool(accelerator.reduce(torch.tensor(float(over), device=accelerator.device), reduction="sum").item() > 0)


def release_ddp(accelerator: Accelerator, wrapper: weakref.ref) -> None:
    """Free the DDP wrapper (its C++ ``Reducer``) while the process group is still registered.

    Otherwise the ``Reducer`` is the last owner of the Gloo process group and frees it at interpreter exit,
    joining Gloo's worker threads while holding the GIL; a worker still destroying the last collective's
    Python-owned tensors needs that GIL, and the rank hangs forever (seen on CPU DDP: rank 1 stuck in
    ``~ProcessGroupGloo`` after its last barrier). ``destroy_process_group`` (in ``end_training``) then frees
    the group through the Python binding, which releases the GIL first.
    """
    accelerator.free_memory()  # accelerate's own references to the prepared (wrapped) module
    gc.collect()
    if accelerator.num_processes > 1 and wrapper() is not None:
        logger.warning("the DDP wrapper is still referenced at the end of training; the process may hang at exit")


@dataclass
class TrainingLoop:
    """One run's loop over the prepared parts; :meth:`run` trains and says whether the run reached its end.

    After :meth:`run`: ``completed_steps``, ``history`` (the validations), ``tokens`` (this process's, a tensor),
    ``elapsed`` (seconds), ``time_cut`` / ``early_stop`` (the step at which the time budget or early stopping ended
    training, else 0).
    """

    accelerator: Accelerator
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    schedule: LinearSchedule
    train_loader: object
    eval_loader: object
    plan: StepPlan
    run_args: object
    budget: Budget
    average: TailAverage | None = None
    best: BestWeights | None = None
    has_validation: bool = True
    completed_steps: int = 0
    history: list = field(default_factory=list)
    tokens: object = 0
    elapsed: float = 0.0
    time_cut: int = 0
    early_stop: int = 0

    def run(self, completed_steps: int = 0, starting_epoch: int = 0, resume_batches: int = 0) -> bool:
        """Train from the resumed position; False when ``--stop_after_steps`` (or an interruption) ended the loop early."""
        acc, args = self.accelerator, self.run_args
        self.completed_steps, self.started, self.running, self.parts = completed_steps, time.perf_counter(), [], []
        self.progress = tqdm(total=self.plan.max_steps, initial=completed_steps, disable=not acc.is_local_main_process, desc="train")
        self.training_seconds = args.training_share * args.max_train_seconds - self.budget.elapsed()  # what the loop may use of the budget
        self.first_step, self.announced = completed_steps, False
        self.micro_step = starting_epoch * len(self.train_loader) + resume_batches  # batches seen by this process
        self.loss_module.train()
        for epoch in range(starting_epoch, self.plan.num_epochs):
            skip = resume_batches if epoch == starting_epoch else 0
            if isinstance(self.train_loader, StreamingLoader):  # skips without reading what it skips
                loader = self.train_loader
                loader.set_epoch(epoch, skip)
            else:
                loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                loader.set_epoch(epoch)  # the batch order depends only on (seed, epoch)
            for batch in loader:
                if self._micro_step(batch) and self._after_step(epoch):
                    break
            if self._total_reached() or self.completed_steps == args.stop_after_steps or self.time_cut or self.early_stop:
                break
        self.progress.close()
        self.elapsed = time.perf_counter() - self.started
        return self._total_reached() or bool(self.time_cut or self.early_stop)

    def _total_reached(self) -> bool:
        return self.completed_steps >= self.schedule.total // self.accelerator.num_processes

    def _micro_step(self, batch: dict) -> bool:
        """Forward, backward and (at the end of an accumulation) the optimizer step; True when that step was taken."""
        acc = self.accelerator
        # Dropout and negative sampling depend only on (seed, micro-step, rank): a resumed run repeats them exactly.
        torch.manual_seed(self.run_args.seed * 1_000_003 + self.micro_step * 101 + acc.process_index)
        self.micro_step += 1
        loss = train_step(acc, self.loss_module, self.optimizer, self.scheduler, batch)
        self.tokens += batch["attention_mask"].sum() + (batch["labels"] != -100).sum()  # a device tensor: summed without waiting
        self.running.append(loss.detach())
        self.parts.append(acc.unwrap_model(self.loss_module).last_parts)
        return acc.sync_gradients

    def _after_step(self, epoch: int) -> bool:
        """Logging, the time budget, validation and checkpoint after an optimizer step; True when the loop ends here."""
        args = self.run_args
        self.completed_steps += 1
        step = self.completed_steps
        self.progress.update(1)
        if self.average is not None and step > self.average.start_step:
            self.average.update()
        if step % args.logging_steps == 0 or step == self.plan.max_steps:
            self._log_train_loss()
        end = self.schedule.total // self.accelerator.num_processes  # max_steps, or sooner when the time budget shortened the schedule
        if self.budget.limited:
            end = self._follow_budget(end)
        last = step >= end or bool(self.time_cut)
        if self.has_validation and ((self.plan.eval_steps > 0 and step % self.plan.eval_steps == 0) or last):
            self._validate(last)
        if args.checkpointing_steps > 0 and step % args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, args.output_dir, step, {"completed_steps": step, "epoch": epoch, "batches_seen": self.micro_step},
                            best=self.best)
        return bool(last or self.early_stop or step == args.stop_after_steps)

    def _log_train_loss(self) -> None:
        """Log the mean train loss since the last log; a diverged run (inf / nan) stops on every rank before it writes anything."""
        acc, args, step = self.accelerator, self.run_args, self.completed_steps
        mean_loss = torch.stack(self.running).mean()
        if float(acc.reduce((~torch.isfinite(mean_loss)).float(), reduction="sum")) > 0:
            acc.wait_for_everyone()
            out = Path(args.output_dir)
            if acc.is_main_process and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # made by this run and still empty: leave nothing behind
            raise ValueError(
                f"training diverged by step {step} (train loss {float(mean_loss)}); no model was written to "
                f"{args.output_dir}: lower --learning_rate (now {args.learning_rate:g}), raise --warmup_steps, or train with --mixed_precision no"
            )
        train_loss = float(mean_loss)
        part_means = {f"train_{k}_loss": float(sum(p.get(k, 0.0) for p in self.parts)) / max(1, len(self.parts)) for k in ("sentence", "profile")}
        self.running, self.parts = [], []
        self.progress.set_postfix(loss=f"{train_loss:.3f}")
        acc.log({"train_loss": train_loss, "lr": self.scheduler.get_last_lr()[0], **part_means}, step=step)
        logger.info("step %d train_loss %.4f (sentence %.4f, profile %.4f)", step, train_loss, part_means["train_sentence_loss"], part_means["train_profile_loss"])

    def _follow_budget(self, end: int) -> int:
        """Under a time budget: end the loop when its share is spent, and end the learning-rate decay at the steps that fit
        in the rest of it at the pace so far (validations included). Returns the step the loop now ends at."""
        acc, args, step, max_steps = self.accelerator, self.run_args, self.completed_steps, self.plan.max_steps
        if step < end and out_of_time(acc, self.started, self.training_seconds):
            logger.warning("--max_train_seconds %g: the training loop's share (%.0f s) is spent; training ends at step %d of %d",
                           args.max_train_seconds, self.training_seconds, step, max_steps)
            self.time_cut = step
        if step % args.logging_steps == 0 and step - self.first_step >= args.logging_steps:
            # The decay ends where the pace says the loop's share ends, later again if the pace improves (the first steps
            # are the slowest), never past max_steps.
            pace = (time.perf_counter() - self.started) / (step - self.first_step)
            reachable = step + int(max(0.0, self.training_seconds - (time.perf_counter() - self.started)) / pace)
            if acc.num_processes > 1:  # every rank keeps the same schedule: the slowest rank's
                reachable = int(acc.gather(torch.tensor([reachable], device=acc.device)).min())
            if self.schedule.move_end(reachable * acc.num_processes):
                end = self.schedule.total // acc.num_processes
                if not self.announced:
                    self.announced = True
                    logger.info("--max_train_seconds %g: at %.2f s a step, the learning rate now decays to 0 by step %d of %d "
                                "(moved as the pace changes)", args.max_train_seconds, pace, end, max_steps)
        return end

    def _validate(self, last: bool) -> None:
        step = self.completed_steps
        val = validation_loss(self.loss_module, self.eval_loader, self.accelerator)
        self.history.append({"step": step, **val})
        self.accelerator.log(val, step=step)
        logger.info("step %d validation_loss %.4f (sentence %.4f, profile %.4f)", step, *val.values())
        if self.best is not None and self.best.update(val["validation_loss"], step) and not last:
            logger.info("early stopping at step %d: no lower validation loss in %d validations (best %.4f at step %d)",
                        step, self.run_args.early_stopping_patience, self.best.best_loss, self.best.best_step)
            self.early_stop = step
