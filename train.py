"""Train the cell translator: one T5 for both directions, with accelerate.

    python train.py                                    # the main job on the simulated default data
    accelerate launch train.py --dataset_dir DATA --tokenizer_dir TOK --output_dir OUT --model_size small
    python train.py configs/default.yaml ...           # the same arguments from a JSON/YAML file (the recipe)

The run, top to bottom: arguments (``translator/arguments.py``) -> Accelerator -> examples (both directions, capped,
length-grouped) -> model -> AdamW with warmup and linear decay -> the loop with validation loss and checkpoints
(``translator/loop.py``) -> head refit and readout calibration on validation (``translator/finishing.py``) -> the
Hub-ready model folder -> the blend it ships (``translator/predictor.py``) -> evaluation (when eval.py is present)
-> optional push. ``--resume_from_checkpoint latest`` continues a killed run to the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from dataset_builder.cli import run_cli
from dataset_builder.records import load_splits
from tokenizer import PREFIX, check_vocabulary, load_tokenizer, read_meta
from translator.arguments import DataArguments, ModelArguments, RunArguments, check_args, demo_arguments, parse_args
from translator.data import LengthGroupedBatchSampler, TranslationCollator, TranslationExamples
from translator.finishing import (
    finish_readout,
    read_refit_choices,
    training_record,
    write_model_folder,
)
from translator.folds import remove_fold_models, train_fold_models, wants_folds
from translator.loop import TrainingLoop, make_optimizer, plan_steps, release_ddp, resume
from translator.loss import TranslationLoss
from translator.model import cuda_tf32, make_config, make_model
from translator.predictor import fit_blend
from translator.readout import profile_offsets
from translator.streaming import StreamingExamples, StreamingLoader, open_split, sample_rows
from translator.training import (
    BestWeights,
    Budget,
    LinearSchedule,
    TailAverage,
    check_free_space,
    check_run_memory,
    claim_output_dir,
    parameter_checksum,
)

logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    """Train one model folder (see the module docstring); return the exit code."""
    with contextlib.ExitStack() as cleanup:
        return train(argv, cleanup)


def read_inputs(model_args: ModelArguments, data_args: DataArguments) -> tuple[dict, object, dict | None, datasets.DatasetDict]:
    """The dataset's metadata, the tokenizer (checked against it), the refit settings of ``--profile_choices_from`` and the
    splits: read and checked before anything is written, so that a wrong input leaves no output folder behind."""
    # The model folder's cell_sentences.json says in which order this model writes GEX sentences (decoding follows it).
    meta = {**read_meta(data_args.dataset_dir), "gex_target_order": data_args.gex_target_order}
    tokenizer = load_tokenizer(data_args.tokenizer_dir) if data_args.tokenizer_dir else None
    if tokenizer is None:
        raise ValueError("--tokenizer_dir is required; build one with `python -m tokenizer --dataset DIR --output_dir TOK`")
    check_vocabulary(tokenizer, meta, what=f"dataset {data_args.dataset_dir}")
    if model_args.gex_source_downsample > 0 and "gex2atac" in data_args.directions and meta.get("gex_encoding", "rank") != "rank":
        raise ValueError(f"--gex_source_downsample needs rank-order GEX sentences of every detected gene, and dataset {data_args.dataset_dir} "
                         f"has gex_encoding {meta.get('gex_encoding')!r}; build the dataset with --gex_encoding rank or drop the flag")
    refit_choices = read_refit_choices(model_args.profile_choices_from, meta, data_args.directions) if model_args.profile_choices_from else None
    if data_args.streaming:
        # The train split stays in its files; the train cells held in memory (the embeddings' LSI, the head refit) are an
        # evenly spaced sample of it.
        splits = load_splits(data_args.dataset_dir, ("validation", "test"))
        train = open_split(data_args.dataset_dir, "train")
        splits["train"] = train.dataset(sample_rows(len(train), data_args.streaming_sample_cells))
    else:
        splits = load_splits(data_args.dataset_dir)
    if "validation" not in splits:  # a dataset pushed without its empty validation split and saved back to disk
        splits["validation"] = splits["train"].select([])
    return meta, tokenizer, refit_choices, splits


def make_accelerator(run: RunArguments) -> Accelerator:
    """The run's ``Accelerator`` (trackers under OUTPUT_DIR/logs), and logs on the main process only."""
    accelerator = Accelerator(
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        mixed_precision=run.mixed_precision,
        # Batches must stay whole (one direction each); the sampler makes their count a multiple of the processes.
        dataloader_config=DataLoaderConfiguration(even_batches=False),
        log_with=None if run.report_to == "none" else run.report_to,
        project_config=ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if run.tf32:
        cuda_tf32(True)  # for the rest of the process: training, refit features, calibration
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor": T5's tied embeddings
    return accelerator


def make_loaders(splits, tokenizer, data_args: DataArguments, model_args: ModelArguments, run: RunArguments, num_processes: int):
    """Both directions of each cell as examples; length-grouped batches of one direction each (``--max_eval_cells``
    validation cells for the validation loss). Returns the train and validation examples, the validation cells and the
    two loaders."""
    caps = (data_args.max_source_length, data_args.max_target_length)
    targets = (data_args.gex_target_order, data_args.max_gex_target_length, data_args.gex_target_min_value)
    train_examples = TranslationExamples(splits["train"], tokenizer, data_args.directions, *caps, *targets, source_counts=model_args.gex_source_downsample > 0)
    validation = splits["validation"].select(range(min(len(splits["validation"]), data_args.max_eval_cells)))
    eval_examples = TranslationExamples(validation, tokenizer, data_args.directions, *caps, *targets)
    collator = TranslationCollator(train_examples.ranges)
    sampler = LengthGroupedBatchSampler(train_examples.lengths, train_examples.directions, run.per_device_train_batch_size, run.seed, num_shards=num_processes)
    eval_sampler = LengthGroupedBatchSampler(eval_examples.lengths, eval_examples.directions, run.per_device_eval_batch_size, shuffle=False)
    loaders = DataLoader(train_examples, batch_sampler=sampler, collate_fn=collator), DataLoader(eval_examples, batch_sampler=eval_sampler, collate_fn=collator)
    return train_examples, eval_examples, validation, *loaders


def stream_loader(data_args: DataArguments, model_args: ModelArguments, run: RunArguments, tokenizer, accelerator: Accelerator) -> StreamingLoader:
    """``--streaming``: this process's share of the train split, streamed from its Arrow or Parquet files as length-grouped batches."""
    stream = StreamingExamples(open_split(data_args.dataset_dir, "train"), tokenizer, run.per_device_train_batch_size, run.seed,
                               accelerator.process_index, accelerator.num_processes, data_args.directions, max_source_length=data_args.max_source_length,
                               max_target_length=data_args.max_target_length, gex_target_order=data_args.gex_target_order,
                               max_gex_target_length=data_args.max_gex_target_length, gex_target_min_value=data_args.gex_target_min_value,
                               source_counts=model_args.gex_source_downsample > 0)
    # On a GPU a worker process reads and tokenizes ahead of the step; on CPU cores it would compete with the step.
    return StreamingLoader(stream, accelerator.device, workers=int(accelerator.device.type == "cuda"))


def make_loss_module(config, model_args: ModelArguments, run: RunArguments, train_split, tokenizer, meta: dict) -> TranslationLoss:
    """The T5 (name embeddings from latent semantic analysis of the train sentences, unless resumed or ``--embedding_init
    random``) inside the training loss, which holds the profile head."""
    model = make_model(config, seed=run.seed)
    if model_args.embedding_init == "lsi" and not run.resume_from_checkpoint:
        from tokenizer import feature_token_ranges
        from translator.data import names_to_ids
        from translator.embedding_init import init_embeddings_from_lsi

        started = time.perf_counter()
        used = init_embeddings_from_lsi(model, {"gex": names_to_ids(tokenizer, train_split["gex_text"]), "atac": names_to_ids(tokenizer, train_split["atac_text"])},
                                        feature_token_ranges(tokenizer, n_genes=len(meta["genes"])), seed=run.seed)
        logger.info("name embeddings from LSI of the train sentences (%s components) in %.1f s", used, time.perf_counter() - started)
    return TranslationLoss(model, model_args.n_negatives, run.label_smoothing, model_args.profile_weight,
                           profile_offsets(tokenizer, meta), model_args.source_dropout, model_args.gex_source_truncation,
                           tokenizer.convert_tokens_to_ids(PREFIX["gex2atac"]), gex_source_downsample=model_args.gex_source_downsample,
                           max_scored_targets=model_args.max_scored_targets)


def train(argv: list[str] | None, cleanup: contextlib.ExitStack) -> int:
    """The run itself; ``cleanup`` owns the output folder's lock and its clean-up on failure."""
    # Arguments, and the inputs they name.
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, run = parse_args(argv or demo_arguments())
    check_args(model_args, data_args, run)
    budget = Budget(run.max_train_seconds)  # the whole job, from here to the model folder
    meta, tokenizer, refit_choices, splits = read_inputs(model_args, data_args)
    config = make_config(model_args.model_size, len(tokenizer), model_args.dropout_rate, data_args.max_target_length)
    estimate = check_run_memory(config, model_args, data_args, run, meta, len(splits["validation"]))
    accelerator = make_accelerator(run)
    logger.info("estimated peak memory %.1f GiB (%s)", estimate["total"] / 2**30, ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items() if k != "total"))
    out = Path(run.output_dir)
    cleanup.enter_context(claim_output_dir(out, replace=run.overwrite_output_dir and not run.resume_from_checkpoint, enabled=accelerator.is_main_process))
    accelerator.wait_for_everyone()
    set_seed(run.seed)
    if run.cpu_threads > 0:
        torch.set_num_threads(run.cpu_threads)

    # Data. With --streaming each process streams its share of the train split (``splits["train"]`` holds a sample of it).
    train_examples, eval_examples, validation, train_loader, eval_loader = make_loaders(splits, tokenizer, data_args, model_args, run, accelerator.num_processes)
    if data_args.streaming:
        train_loader = stream_loader(data_args, model_args, run, tokenizer, accelerator)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)  # a StreamingLoader passes through unchanged

    # Model, optimizer, schedule.
    loss_module = make_loss_module(config, model_args, run, splits["train"], tokenizer, meta)
    if run.torch_compile:
        loss_module.compile_step(run.torch_compile_mode)
    n_params = sum(p.numel() for p in loss_module.model.parameters())
    optimizer = make_optimizer(loss_module, run.learning_rate, run.weight_decay)
    plan = plan_steps(len(train_loader), run)
    # The schedule counts the prepared scheduler's steps: one per process per optimizer step.
    schedule = LinearSchedule(plan.warmup_steps * accelerator.num_processes, plan.max_steps * accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_module, optimizer, scheduler = accelerator.prepare(loss_module, optimizer, scheduler)
    average = None
    if run.weight_average_fraction > 0:
        average = TailAverage(accelerator.unwrap_model(loss_module), plan.max_steps - math.ceil(run.weight_average_fraction * plan.max_steps))
        accelerator.register_for_checkpointing(average)
    best = None
    if len(eval_examples) and (run.early_stopping_patience > 0 or run.load_best_model_at_end):
        best = BestWeights(accelerator.unwrap_model(loss_module), run.early_stopping_patience)
    if run.report_to != "none":
        accelerator.init_trackers("cell_translator", config={k: v for k, v in {**asdict(model_args), **asdict(run)}.items() if isinstance(v, int | float | str | bool)})
    position = resume(accelerator, run, len(train_loader), average, best)

    # The loop.
    if accelerator.is_main_process:
        check_free_space(out, n_params, checkpoints=run.checkpointing_steps > 0)
    logger.info("%d train examples, at most %d steps (%d epochs), validation every %d steps, %.1fM parameters, %d processes", train_loader.stream.n_examples if data_args.streaming else len(train_examples), plan.max_steps,
                plan.num_epochs, plan.eval_steps, n_params / 1e6, accelerator.num_processes)
    loop = TrainingLoop(accelerator, loss_module, optimizer, scheduler, schedule, train_loader, eval_loader, plan, run, budget, average, best, len(eval_examples) > 0)
    finished = loop.run(*position)
    wrapper = weakref.ref(loss_module)
    if finished:
        model, profile_head, tokens_total = final_weights(accelerator, loop, run, average, best)
    else:
        accelerator.print(f"stopped after step {loop.completed_steps} of {plan.max_steps}; resume with --resume_from_checkpoint latest")
    # The process group ends here for every rank together; what follows runs on the main process alone.
    loss_module = loop.loss_module = None  # the last references to the DDP wrapper
    release_ddp(accelerator, wrapper)
    accelerator.end_training()
    if not finished or not accelerator.is_main_process:
        return 0

    # Finish the folder, and the optional push.
    steps, elapsed = loop.completed_steps, loop.elapsed
    facts = dict(mixed_precision=accelerator.mixed_precision, dataset_name=Path(data_args.dataset_dir).name, n_parameters=n_params, completed_steps=steps,
                 num_processes=accelerator.num_processes, train_tokens_per_second=round(tokens_total / max(elapsed, 1e-9), 1),
                 validation_history=loop.history, train_seconds=round(elapsed, 1), planned_steps=plan.max_steps,
                 stopped_by_time_limit=bool(loop.time_cut) or (steps < plan.max_steps and not loop.early_stop), early_stopped_at=loop.early_stop or None,
                 best_validation_step=best.best_step if best is not None and run.load_best_model_at_end and average is None else None)
    device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")
    finish_folder(model_args, data_args, run, model.to(device).eval(), profile_head.to(device).eval() if profile_head is not None else None,
                  tokenizer, meta, splits, refit_choices, (validation, train_examples, eval_examples), budget, facts, device)
    logger.info("model folder written to %s (%.0f train tokens/s)", run.output_dir, tokens_total / max(elapsed, 1e-9))
    if run.push_to_hub:
        from translator.hub import push_model_folder

        files = push_model_folder(run.output_dir, run.hub_model_id)
        logger.info("pushed %d files to %s", len(files), run.hub_model_id)
    return 0


def final_weights(accelerator: Accelerator, loop: TrainingLoop, run: RunArguments, average: TailAverage | None, best: BestWeights | None):
    """The weights the folder keeps (the tail average, else the best validation's, else the last step's): returns the model,
    its profile head and the train tokens of every process."""
    accelerator.wait_for_everyone()
    if average is not None and average.count:
        average.copy_to_module()
        logger.info("weights: the mean of the last %d steps", average.count)
    elif average is not None:
        logger.warning("weights: the last step's (--max_train_seconds ended training before the averaging began)")
    elif best is not None and run.load_best_model_at_end and best.best_step != loop.completed_steps:
        best.restore()
        logger.info("weights: those of step %d, the lowest validation loss (%.4f)", best.best_step, best.best_loss)
    unwrapped = accelerator.unwrap_model(loop.loss_module)
    # Every rank prints its own checksum: equal lines prove the ranks ended in step.
    # One write, framed by newlines, so that two ranks writing at once into one pipe cannot run their lines together.
    sys.stdout.write(f"\nrank {accelerator.process_index} parameter checksum {parameter_checksum(unwrapped.model)}\n")
    sys.stdout.flush()
    tokens_total = accelerator.reduce(torch.as_tensor(loop.tokens, dtype=torch.long, device=accelerator.device), reduction="sum").item()
    accelerator.wait_for_everyone()
    return unwrapped.model, unwrapped.profile_head, tokens_total


def finish_folder(model_args: ModelArguments, data_args: DataArguments, run: RunArguments, model, profile_head, tokenizer, meta: dict, splits,
                  refit_choices: dict | None, examples: tuple, budget: Budget, facts: dict, device: torch.device) -> None:
    """The model folder from the final weights: head refit and readout calibration (``examples``: the validation cells, the
    train and validation examples), the files, the blend it ships, the evaluation on the test split and the card."""
    validation, train_examples, eval_examples = examples
    readout, held_out_cap = finish_readout(model, profile_head, tokenizer, meta, splits, validation, train_examples, eval_examples, model_args, data_args, run,
                                           budget, refit_choices, device)
    saved = training_record(model_args, data_args, run, **facts, job_seconds_before_finishing=round(budget.elapsed(), 1))
    write_model_folder(run.output_dir, model, tokenizer, meta, readout, saved, data_args.max_target_length, profile_head)
    if run.blend:
        try:
            pool = []
            if wants_folds(len(splits["validation"]), run, data_args.streaming) and readout["calibration"]:
                pool = train_fold_models(model_args, data_args, run, splits, facts["best_validation_step"] or facts["completed_steps"], readout, budget)
            fit_blend(run.output_dir, data_args.dataset_dir, data_args.directions, run.per_device_eval_batch_size, run.seed, pool=pool,
                      **held_out_cap, max_seconds=budget.left() if budget.limited else None)
        finally:
            remove_fold_models(run.output_dir)
    evaluate_folder(run, data_args)
    from translator.card import render_model_card

    render_model_card(run.output_dir, repo_id=run.hub_model_id)


def evaluate_folder(run: RunArguments, data_args: DataArguments) -> None:
    """Evaluate the finished folder on the test split with eval.py's ``run_evaluation`` when it is importable."""
    if not run.evaluate:
        return
    try:
        from eval import run_evaluation
    except ImportError:
        logger.info("eval.py not available: skipping evaluation")
        return
    try:
        # eval.py copies eval_results.json/.md into the model folder; its plots stay in OUT/eval (not pushed).
        run_evaluation(model=run.output_dir, dataset_dir=data_args.dataset_dir, split="test", output_dir=str(Path(run.output_dir) / "eval"),
                       directions=data_args.directions, dataset_name=Path(data_args.dataset_dir).name, batch_size=run.per_device_eval_batch_size)
    except Exception as err:  # the model folder is complete and usable; a failed evaluation must not lose it
        logger.warning("evaluation failed (%s: %s); run eval.py on %s later", type(err).__name__, err, run.output_dir)


def cli() -> int:
    """``main`` for the command line (``cell-sentences-train``): bad input gives one ``error:`` line and a non-zero exit code."""
    return run_cli(main, debug="--debug" in sys.argv, errors=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(cli())
