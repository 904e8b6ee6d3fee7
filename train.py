"""Train the cell translator: one T5 for both directions, with accelerate.

    python train.py                                    # the main job on the simulated default data
    accelerate launch train.py --dataset_dir DATA --tokenizer_dir TOK --output_dir OUT --model_size small
    python train.py config.yaml                        # the same arguments from a JSON/YAML file

The run: arguments -> Accelerator -> examples (both directions, capped, length-grouped) -> model ->
AdamW with warmup and linear decay -> loop with validation loss and checkpoints -> readout
calibration on validation -> the Hub-ready model folder -> evaluation (when eval.py is present)
-> optional push. ``--resume_from_checkpoint latest`` continues a killed run to the same weights.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from dataset_builder.cli import run_cli
from dataset_builder.outputs import check_output, check_replaceable, folder_kind
from tokenizer import DIRECTIONS, PREFIX, check_same_features, check_vocabulary, load_tokenizer, read_meta
from translator.data import (
    GEX_TARGET_ORDERS,
    LengthGroupedBatchSampler,
    TranslationCollator,
    TranslationExamples,
    check_gex_target_cap,
    check_gex_target_min_value,
)
from translator.loss import TranslationLoss
from translator.model import MODEL_SHAPES, PROFILE_INPUTS, cuda_tf32, make_config, make_model
from translator.predictor import HELD_OUT_CELLS, fit_blend, held_out_cells
from translator.profile_fit import RANK_GRID
from translator.readout import SELECTION_REPEATS, check_selection_parts, check_selection_repeats, profile_offsets
from translator.training import (
    AUTO_EVAL_STEPS,
    AUTO_WARMUP_STEPS,
    AVERAGE_STATE_FILE,
    BEST_WEIGHTS_FILE,
    BestWeights,
    Budget,
    LinearSchedule,
    TailAverage,
    auto_eval_steps,
    auto_warmup_steps,
    available_memory,
    calibrate,
    calibration_cell_cap,
    check_free_space,
    check_memory,
    claim_output_dir,
    estimate_memory,
    parameter_checksum,
    refit_cell_cap,
    resolve_checkpoint,
    save_checkpoint,
    widget_examples,
    write_model_folder,
)

logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": f"model shape: {' | '.join(MODEL_SHAPES)}"})
    dropout_rate: float = field(default=0.2, metadata={"help": "dropout of the T5 layers"})
    n_negatives: int = field(default=256, metadata={"help": "off-modality names scored per batch by the restricted loss"})
    max_scored_targets: int = field(default=16384, metadata={"help": "a target modality with more names than this is scored in training by a sampled softmax: "
                                                                     "the batch's target names and names drawn from the rest, this many in all (its cost no "
                                                                     "longer grows with the number of peaks); 0: every name"})
    profile_weight: float = field(default=1.0, metadata={"help": "weight of the profile readout's loss (every target feature of a cell, as a residual over the train mean); 0: sentences only"})
    profile_refit: bool = field(default=True, metadata={"help": "refit the profile head in closed form on the train split after training (L2 chosen on validation)"})
    profile_ranks: list[int] = field(default_factory=lambda: list(RANK_GRID), metadata={"help": "after the refit, try projecting the head's scores on their top-K train principal directions for each K given; K or none chosen on validation; ignored with --no_profile_refit"})
    profile_choices_from: list[str] = field(default_factory=list, metadata={"help": "model folders of this recipe (cross-validation fold models) whose refits choose the refit's L2 and reduced rank here, by their validation error pooled over their validation cells; the refit then needs no validation split (a final model trained on every cell, dataset built with --no_validation)"})
    embedding_init: str = field(default="lsi", metadata={"help": "name embeddings at the start: lsi (TF-IDF + SVD of the train sentences) | random"})
    source_dropout: float = field(default=0.1, metadata={"help": "probability of hiding each source name in training (augmentation)"})
    gex_source_truncation: float = field(default=0.0, metadata={"help": "probability of cutting a training GEX source to its top k genes, k log-uniform in [1, n] (augmentation: short sentences of the most expressed genes); 0: off"})
    gex_source_downsample: float = field(default=0.0, metadata={"help": "probability of thinning a training GEX source's UMI counts (keep rate uniform in [0.2, 1)) and writing it again in the thinned rank order (augmentation: a shallower cell); 0: off"})


@dataclass
class DataArguments:
    dataset_dir: str | None = field(default=None, metadata={"help": "dataset folder from `python -m dataset_builder`"})
    tokenizer_dir: str | None = field(default=None, metadata={"help": "tokenizer folder from `python -m tokenizer` (default: build it into OUTPUT_DIR/.tokenizer)"})
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS), metadata={"help": "directions to train: gex2atac atac2gex"})
    max_source_length: int = field(default=512, metadata={"help": "source cap in tokens (GEX keeps top-ranked genes; ATAC an even subsample; prefer --top_peaks at build time)"})
    max_target_length: int = field(default=128, metadata={"help": "target cap in tokens, also the decoding length"})
    max_gex_target_length: int = field(default=6, metadata={"help": "shorter cap for GEX targets (atac2gex) only, in tokens; 0: --max_target_length. Short targets weigh the profile loss more"})
    gex_target_min_value: float = field(default=0.0, metadata={"help": "GEX targets (atac2gex) keep only genes with log-norm >= this, in rank order (2.0: the binary sentence's genes); 0: off"})
    gex_target_order: str = field(default="rank", metadata={"help": "order of GEX target sentences: rank (descending expression) | gene (the same genes in gene order); sources keep rank order"})
    max_eval_cells: int = field(default=1000, metadata={"help": "validation cells used for the validation loss"})
    calibration_cells: int = field(default=500, metadata={"help": "validation cells used to fit the readout calibration"})
    calibration_selection_parts: int = field(default=5, metadata={"help": "the calibration keeps the readout with the lowest RMSE cross-fitted over this many parts of its cells; 0: the lowest in-sample RMSE"})
    calibration_selection_repeats: int = field(default=SELECTION_REPEATS, metadata={"help": "that cross-fitted RMSE is averaged over this many random partitions of the cells; 1: one partition"})


@dataclass
class RunArguments:
    output_dir: str | None = field(default=None, metadata={"help": "model folder to write (= the Hub repository)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing --output_dir"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --num_train_epochs when > 0"})
    num_train_epochs: float = field(default=10.0, metadata={"help": "epochs over the train split at most (the learning rate decays over them); early stopping usually ends sooner"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "examples per device and micro-batch"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "examples per device for validation and decoding"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=-1, metadata={"help": f"linear warmup steps (-1: a tenth of the planned steps, at most {AUTO_WARMUP_STEPS})"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the loss"})
    weight_average_fraction: float = field(default=0.0, metadata={"help": "average the weights after every step of this last fraction of training "
                                                                            "(tail averaging, e.g. 0.25; 0: off); the refit and calibration use the mean"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    mixed_precision: str | None = field(default=None, metadata={"help": "no | fp16 | bf16; overrides the accelerate config (`accelerate config`), "
                                                                      "which stands when the flag is not given (else no)"})
    tf32: bool = field(default=False, metadata={"help": "let fp32 matrix products use TF32 tensor cores on NVIDIA Ampere or newer GPUs (weights, "
                                                       "optimizer and range stay fp32; several times faster than plain fp32); no effect on CPU"})
    max_train_seconds: float = field(default=0.0, metadata={"help": "time budget of the whole job in seconds, from start to model folder (0: none): the training loop "
                                                                     "gets --training_share of it (its learning rate then decays to 0 by the end it can reach), the head "
                                                                     "refit and the calibration the rest, with their work cut to fit"})
    training_share: float = field(default=0.6, metadata={"help": "share of --max_train_seconds for the training loop"})
    early_stopping_patience: int = field(default=3, metadata={"help": "end training after this many validations in a row without a lower validation loss (0: never)"})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "finish with the weights of the validation with the lowest loss (not with --weight_average_fraction)"})
    seed: int = field(default=42, metadata={"help": "random seed (weights, batches, dropout)"})
    eval_steps: int = field(default=-1, metadata={"help": f"validation loss every N steps (0: only at the end; -1: once per epoch, at least every {AUTO_EVAL_STEPS} steps)"})
    checkpointing_steps: int = field(default=200, metadata={"help": "checkpoint every N steps (0: none)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or `latest` in --output_dir"})
    logging_steps: int = field(default=20, metadata={"help": "log the train loss every N steps"})
    evaluate: bool = field(default=True, metadata={"help": "run eval.py's evaluation on the test split at the end when available"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the model folder to --hub_model_id (token: HF_TOKEN or cached login)"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id, e.g. user/cell-translator"})
    report_to: str = field(default="none", metadata={"help": "tracker of the losses (OUTPUT_DIR/logs): none | tensorboard | all (every installed "
                                                          "tracker); tensorboard needs the [tracking] extra: pip install '.[tracking]'"})
    license: str | None = field(default=None, metadata={"help": "Hub license id of the model card, e.g. cc-by-4.0 (default: the dataset's recorded license, else unknown)"})
    cpu_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default); 1 is fastest for tiny/small models on busy cores"})
    stop_after_steps: int = field(default=0, metadata={"help": "stop after N steps without writing the model folder, as an interruption would (resume with --resume_from_checkpoint latest)"})
    debug: bool = field(default=False, metadata={"help": "show tracebacks"})


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, RunArguments]:
    """The three argument groups from the command line; a first argument ending in .yaml/.yml/.json is a file of
    arguments (``configs/default.yaml``: the recipe), which the flags after it override."""
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments))
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, no usage block
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        parser.set_defaults(**read_config(argv[0]))
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def read_config(path: str) -> dict:
    """The arguments in a YAML or JSON file, checked against train.py's argument names."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found; give a YAML/JSON file of train.py arguments such as configs/default.yaml")
    text = Path(path).read_text()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {str(err).splitlines()[0]}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must map argument names to values, e.g. `learning_rate: 0.002`")
    known = {f.name for group in (ModelArguments, DataArguments, RunArguments) for f in fields(group)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown argument(s) {', '.join(unknown)}; see `python train.py --help` for the names")
    return values


def check_args(model_args: ModelArguments, data_args: DataArguments, run: RunArguments) -> None:
    if not data_args.dataset_dir or not run.output_dir:
        raise ValueError("--dataset_dir and --output_dir are required (run `python train.py` alone for the simulated demo)")
    if model_args.model_size not in MODEL_SHAPES:
        raise ValueError(f"--model_size {model_args.model_size!r} is unknown; choose one of {', '.join(MODEL_SHAPES)}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(run, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(run, name)}")
    for name, value in (("max_source_length", data_args.max_source_length), ("max_target_length", data_args.max_target_length), ("logging_steps", run.logging_steps)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("warmup_steps", "eval_steps"):
        if getattr(run, name) < -1:
            raise ValueError(f"--{name} must be >= 0, or -1 for the automatic choice; got {getattr(run, name)}")
    for name in ("checkpointing_steps", "stop_after_steps", "cpu_threads", "weight_decay", "early_stopping_patience"):
        if getattr(run, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(run, name)}")
    if data_args.gex_target_order not in GEX_TARGET_ORDERS:
        raise ValueError(f"--gex_target_order must be one of {', '.join(GEX_TARGET_ORDERS)}, got {data_args.gex_target_order!r}")
    check_gex_target_cap(data_args.max_gex_target_length, data_args.max_target_length)
    check_gex_target_min_value(data_args.gex_target_min_value)
    for name in ("max_eval_cells", "calibration_cells"):
        if getattr(data_args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(data_args, name)}")
    check_selection_parts(data_args.calibration_selection_parts, "--calibration_selection_parts")
    check_selection_repeats(data_args.calibration_selection_repeats, "--calibration_selection_repeats")
    if any(k < 1 for k in model_args.profile_ranks):
        raise ValueError(f"--profile_ranks must be positive ranks such as 4 8 16, got {' '.join(map(str, model_args.profile_ranks))}")
    if model_args.profile_choices_from and not model_args.profile_refit:
        raise ValueError("--profile_choices_from chooses the refit's settings; drop --no_profile_refit or --profile_choices_from")
    for name in ("n_negatives", "max_scored_targets"):
        if getattr(model_args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(model_args, name)}")
    if not (math.isfinite(run.learning_rate) and run.learning_rate > 0):
        raise ValueError(f"--learning_rate must be a positive number, got {run.learning_rate}")
    if model_args.embedding_init not in ("lsi", "random"):
        raise ValueError(f"--embedding_init {model_args.embedding_init!r} is unknown; choose lsi or random")
    if not (math.isfinite(model_args.profile_weight) and model_args.profile_weight >= 0):
        raise ValueError(f"--profile_weight must be a number >= 0, got {model_args.profile_weight}")
    for name, value in (("dropout_rate", model_args.dropout_rate), ("label_smoothing", run.label_smoothing), ("source_dropout", model_args.source_dropout),
                        ("gex_source_truncation", model_args.gex_source_truncation), ("gex_source_downsample", model_args.gex_source_downsample)):
        if not 0 <= value < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {value}")
    if not 0 <= run.weight_average_fraction <= 1:
        raise ValueError(f"--weight_average_fraction must be in [0, 1] (0: off), got {run.weight_average_fraction}")
    if run.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision {run.mixed_precision!r} is unknown; choose no, fp16 or bf16")
    if run.max_steps <= 0 and run.num_train_epochs <= 0:
        raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
    if not (math.isfinite(run.max_train_seconds) and run.max_train_seconds >= 0):
        raise ValueError(f"--max_train_seconds must be a number of seconds >= 0 (0: off), got {run.max_train_seconds}")
    if not 0 < run.training_share <= 1:
        raise ValueError(f"--training_share must be in (0, 1], got {run.training_share}")
    if not set(data_args.directions) <= set(DIRECTIONS) or not data_args.directions:
        raise ValueError(f"--directions {data_args.directions} must be a non-empty subset of {DIRECTIONS}")
    if run.push_to_hub and not run.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name")
    check_report_to(run.report_to)
    check_output(run.output_dir, {"--dataset_dir": data_args.dataset_dir, "--tokenizer_dir": data_args.tokenizer_dir,
                                  "--profile_choices_from": model_args.profile_choices_from}, "--output_dir")
    if data_args.dataset_dir and folder_kind(data_args.dataset_dir) != "dataset":
        raise ValueError(f"--dataset_dir {data_args.dataset_dir} is not a dataset folder; give the folder written by `python -m dataset_builder`")
    if not run.resume_from_checkpoint:
        check_replaceable(run.output_dir, "--output_dir", "model", run.overwrite_output_dir, "--overwrite_output_dir")
    elif folder_kind(run.output_dir) != "model":
        raise ValueError(f"--resume_from_checkpoint: --output_dir {run.output_dir} is not a model folder of an earlier train.py run")


def check_report_to(report_to: str) -> None:
    """Refuse a tracker that would log nothing because it is not installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import is_tensorboard_available

    if report_to == "tensorboard" and not is_tensorboard_available():
        raise ValueError("--report_to tensorboard: tensorboard is not installed; install the [tracking] extra (pip install '.[tracking]' "
                         "in the repository, or pip install tensorboard), or drop the flag")
    if report_to == "all" and not get_available_trackers():
        raise ValueError("--report_to all: no tracker is installed; install the [tracking] extra for tensorboard (pip install '.[tracking]' "
                         "in the repository, or pip install tensorboard), or drop the flag")




def demo_arguments() -> list[str]:
    """The main job: simulated dataset and tokenizer under ./outputs, the default recipe, the folder ./outputs/simulated."""
    from dataset_builder import build_dataset  # noqa: F401  (fails clearly when the builder is missing)

    data, tok = Path("outputs/simulated_data"), Path("outputs/simulated_tokenizer")
    if not (data / "cell_sentences.json").exists():
        import subprocess

        subprocess.run([sys.executable, "-m", "dataset_builder", "--output_dir", str(data), "--overwrite_output_dir"], check=True)
    if not (tok / "tokenizer.json").exists():
        from tokenizer import build_from_dataset

        build_from_dataset(data, tok, overwrite=True)
    return ["--dataset_dir", str(data), "--tokenizer_dir", str(tok), "--output_dir", "outputs/simulated", "--overwrite_output_dir", "--cpu_threads", "1"]


def read_refit_choices(folders: list[str], meta: dict, directions: list[str]) -> dict:
    """``--profile_choices_from``: the refit settings pooled over these model folders' refits (:func:`translator.profile_fit.pooled_choice`)."""
    from translator.profile_fit import pooled_choice
    from translator.readout import READOUT_FILE

    reports = []
    for folder in folders:
        path = Path(folder) / READOUT_FILE
        if not path.exists():
            raise FileNotFoundError(f"--profile_choices_from {folder}: no {READOUT_FILE}; give model folders written by train.py")
        folder_meta = read_meta(folder)
        check_same_features(meta, folder_meta, f"--profile_choices_from {folder}", reference="the dataset's", fix="give fold models of this dataset")
        refit = json.loads(path.read_text()).get("profile_refit") or {}
        missing = [d for d in directions if not refit.get(d, {}).get("validation_cells")]
        if missing:
            raise ValueError(f"--profile_choices_from {folder}: no head refit scored on validation cells for {', '.join(missing)}; "
                             "give models trained with a validation split (and without --no_profile_refit)")
        reports.append(refit)
    return pooled_choice(reports)


def refit_head(model, profile_head, tokenizer, meta, train_split, validation, train_examples, eval_examples, batch_size: int, ranks=(),
               choices: dict | None = None, max_cells: int | None = None) -> dict:
    """Closed-form refit of the profile head on the train split (``translator.profile_fit``); L2 chosen on validation, or given
    (``choices``, then validation may be empty). ``max_cells``: at most this many train cells, evenly spaced (a time budget)."""
    import numpy as np

    from dataset_builder.records import truth_matrices
    from tokenizer import feature_token_ranges
    from translator.data import TARGET_MODALITY
    from translator.profile_fit import refit_profile_head
    from translator.readout import profile_offsets

    started = time.perf_counter()
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    truth_train, truth_val = truth_matrices(train_split, meta), truth_matrices(validation, meta)
    sources, truths, target_ranges = {}, {}, {}
    for code, direction in enumerate(DIRECTIONS):
        rows = np.flatnonzero(np.asarray(train_examples.directions) == code)  # this direction's examples, in cell order
        val_rows = np.flatnonzero(np.asarray(eval_examples.directions) == code)
        cells = np.arange(len(rows))
        if max_cells is not None and len(rows) > max_cells:
            cells = np.unique(np.linspace(0, len(rows) - 1, max_cells).round().astype(np.int64))
            logger.info("%s head refit on %d of %d train cells (--max_train_seconds)", direction, len(cells), len(rows))
        if not len(rows) or not (len(val_rows) or (choices and direction in choices)):
            continue
        target = TARGET_MODALITY[direction]
        sources[direction] = ([train_examples.sources[i] for i in rows[cells]], [eval_examples.sources[i] for i in val_rows])
        truths[direction] = (truth_train[target][cells], truth_val[target])
        target_ranges[direction] = ranges[target]
    reports = refit_profile_head(model, profile_head, sources, truths, target_ranges, profile_offsets(tokenizer, meta), batch_size=batch_size,
                                 ranks=ranks, choices=choices)
    for report in reports.values():
        report["seconds"] = round(time.perf_counter() - started, 1)
    return reports


def check_run_memory(config, model_args: ModelArguments, data_args: DataArguments, run: RunArguments, meta: dict, n_validation: int) -> dict[str, float]:
    """Estimate the run's peak memory from the vocabulary, the model's shape and the batch (bytes by part, see
    :func:`translator.training.estimate_memory`), and refuse in one line what cannot fit."""
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):  # shapes only: no memory, no time
        n_params = sum(p.numel() for p in T5ForConditionalGeneration(config).parameters())
    if model_args.profile_weight > 0:
        n_params += config.vocab_size * (PROFILE_INPUTS * config.d_model + 1)
    n_features = max(len(meta["genes"]), len(meta["peaks"]))
    calibration_cells = min(n_validation, data_args.calibration_cells)
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


def main(argv: list[str] | None = None) -> int:
    """Train one model folder (see the module docstring); return the exit code."""
    with contextlib.ExitStack() as cleanup:
        return train(argv, cleanup)


def train(argv: list[str] | None, cleanup: contextlib.ExitStack) -> int:
    """The run itself; ``cleanup`` owns the output folder's lock and its clean-up on failure."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = demo_arguments()
    model_args, data_args, run = parse_args(argv)
    check_args(model_args, data_args, run)
    budget = Budget(run.max_train_seconds)  # the whole job, from here to the model folder
    # Inputs are checked before anything is written: a wrong dataset or tokenizer leaves no output folder behind.
    meta = read_meta(data_args.dataset_dir)
    # The model folder's cell_sentences.json says in which order this model writes GEX sentences (decoding follows it).
    meta = {**meta, "gex_target_order": data_args.gex_target_order}
    tokenizer = load_tokenizer(data_args.tokenizer_dir) if data_args.tokenizer_dir else None
    if tokenizer is None:
        raise ValueError("--tokenizer_dir is required; build one with `python -m tokenizer --dataset DIR --output_dir TOK`")
    check_vocabulary(tokenizer, meta, what=f"dataset {data_args.dataset_dir}")
    if model_args.gex_source_downsample > 0 and "gex2atac" in data_args.directions and meta.get("gex_encoding", "rank") != "rank":
        raise ValueError(f"--gex_source_downsample needs rank-order GEX sentences of every detected gene, and dataset {data_args.dataset_dir} "
                         f"has gex_encoding {meta.get('gex_encoding')!r}; build the dataset with --gex_encoding rank or drop the flag")
    refit_choices = read_refit_choices(model_args.profile_choices_from, meta, data_args.directions) if model_args.profile_choices_from else None
    config = make_config(model_args.model_size, len(tokenizer), model_args.dropout_rate, data_args.max_target_length)
    splits = datasets.load_from_disk(data_args.dataset_dir)
    if "validation" not in splits:  # a dataset pushed without its empty validation split and saved back to disk
        splits["validation"] = splits["train"].select([])
    estimate = check_run_memory(config, model_args, data_args, run, meta, len(splits["validation"]))
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
    logger.info("estimated peak memory %.1f GiB (%s)", estimate["total"] / 2**30, ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items() if k != "total"))
    out = Path(run.output_dir)
    cleanup.enter_context(claim_output_dir(out, replace=run.overwrite_output_dir and not run.resume_from_checkpoint, enabled=accelerator.is_main_process))
    accelerator.wait_for_everyone()
    set_seed(run.seed)
    if run.cpu_threads > 0:
        torch.set_num_threads(run.cpu_threads)

    # Data: both directions of each cell, length-grouped batches (tokenizer, metadata and splits were read above).
    caps = (data_args.max_source_length, data_args.max_target_length)
    train_examples = TranslationExamples(splits["train"], tokenizer, data_args.directions, *caps, data_args.gex_target_order, data_args.max_gex_target_length,
                                        data_args.gex_target_min_value, source_counts=model_args.gex_source_downsample > 0)
    validation = splits["validation"].select(range(min(len(splits["validation"]), data_args.max_eval_cells)))
    eval_examples = TranslationExamples(validation, tokenizer, data_args.directions, *caps, data_args.gex_target_order, data_args.max_gex_target_length,
                                        data_args.gex_target_min_value)
    collator = TranslationCollator(train_examples.ranges)
    sampler = LengthGroupedBatchSampler(train_examples.lengths, train_examples.directions, run.per_device_train_batch_size, run.seed, num_shards=accelerator.num_processes)
    train_loader = DataLoader(train_examples, batch_sampler=sampler, collate_fn=collator)
    eval_sampler = LengthGroupedBatchSampler(eval_examples.lengths, eval_examples.directions, run.per_device_eval_batch_size, shuffle=False)
    eval_loader = DataLoader(eval_examples, batch_sampler=eval_sampler, collate_fn=collator)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)

    # Model, optimizer, schedule.
    model = make_model(config, seed=run.seed)
    n_params = sum(p.numel() for p in model.parameters())
    if model_args.embedding_init == "lsi" and not run.resume_from_checkpoint:
        from tokenizer import feature_token_ranges
        from translator.data import names_to_ids
        from translator.embedding_init import init_embeddings_from_lsi

        started_init = time.perf_counter()
        train_split = splits["train"]
        used = init_embeddings_from_lsi(model, {"gex": names_to_ids(tokenizer, train_split["gex_text"]), "atac": names_to_ids(tokenizer, train_split["atac_text"])},
                                        feature_token_ranges(tokenizer, n_genes=len(meta["genes"])), seed=run.seed)
        logger.info("name embeddings from LSI of the train sentences (%s components) in %.1f s", used, time.perf_counter() - started_init)
    loss_module = TranslationLoss(model, model_args.n_negatives, run.label_smoothing, model_args.profile_weight,
                                  profile_offsets(tokenizer, meta), model_args.source_dropout, model_args.gex_source_truncation,
                                  tokenizer.convert_tokens_to_ids(PREFIX["gex2atac"]), gex_source_downsample=model_args.gex_source_downsample,
                                  max_scored_targets=model_args.max_scored_targets)
    decay = [p for n, p in loss_module.named_parameters() if "layer_norm" not in n and not n.endswith("bias")]
    no_decay = [p for n, p in loss_module.named_parameters() if "layer_norm" in n or n.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=run.learning_rate)
    steps_per_epoch = math.ceil(len(train_loader) / run.gradient_accumulation_steps)
    max_steps = run.max_steps if run.max_steps > 0 else math.ceil(run.num_train_epochs * steps_per_epoch)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup_steps = run.warmup_steps if run.warmup_steps >= 0 else auto_warmup_steps(max_steps)
    eval_steps = run.eval_steps if run.eval_steps >= 0 else auto_eval_steps(steps_per_epoch)
    # The schedule counts the prepared scheduler's steps: one per process per optimizer step.
    schedule = LinearSchedule(warmup_steps * accelerator.num_processes, max_steps * accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_module, optimizer, scheduler = accelerator.prepare(loss_module, optimizer, scheduler)
    average = None
    if run.weight_average_fraction > 0:
        average = TailAverage(accelerator.unwrap_model(loss_module), max_steps - math.ceil(run.weight_average_fraction * max_steps))
        accelerator.register_for_checkpointing(average)
    best = None
    if len(eval_examples) and (run.early_stopping_patience > 0 or run.load_best_model_at_end):
        best = BestWeights(accelerator.unwrap_model(loss_module), run.early_stopping_patience)
    if run.report_to != "none":
        accelerator.init_trackers("cell_translator", config={k: v for k, v in {**asdict(model_args), **asdict(run)}.items() if isinstance(v, int | float | str | bool)})

    # Resume: model, optimizer, scheduler and RNG from the checkpoint; the data position from the step count.
    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if run.resume_from_checkpoint:
        path = resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)
        if (average is not None) != (path / AVERAGE_STATE_FILE).exists():
            raise ValueError(f"{path} was written {'without' if average is not None else 'with'} --weight_average_fraction; resume with the flags it was started with")
        accelerator.load_state(str(path))
        if best is not None and (path / BEST_WEIGHTS_FILE).exists():
            best.load_state_dict(torch.load(path / BEST_WEIGHTS_FILE, weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text())
        completed_steps = state["completed_steps"]
        starting_epoch, resume_batches = divmod(state["batches_seen"], len(train_loader))
        accelerator.print(f"resumed from {path.name} at step {completed_steps}")

    if accelerator.is_main_process:
        check_free_space(out, n_params, checkpoints=run.checkpointing_steps > 0)
    logger.info("%d train examples, at most %d steps (%d epochs), validation every %d steps, %.1fM parameters, %d processes", len(train_examples), max_steps, num_epochs,
                eval_steps, n_params / 1e6, accelerator.num_processes)
    progress = tqdm(total=max_steps, initial=completed_steps, disable=not accelerator.is_local_main_process, desc="train")
    history, tokens, started, running, parts, time_cut, early_stop = [], 0, time.perf_counter(), [], [], 0, 0
    training_seconds = run.training_share * run.max_train_seconds - budget.elapsed()  # what the loop may use of the budget
    first_step, announced = completed_steps, False
    micro_step = starting_epoch * len(train_loader) + resume_batches  # batches seen by this process
    loss_module.train()
    for epoch in range(starting_epoch, num_epochs):
        loader = accelerator.skip_first_batches(train_loader, resume_batches) if epoch == starting_epoch and resume_batches else train_loader
        loader.set_epoch(epoch)  # the batch order depends only on (seed, epoch)
        for batch in loader:
            # Dropout and negative sampling depend only on (seed, micro-step, rank): a resumed run repeats them exactly.
            torch.manual_seed(run.seed * 1_000_003 + micro_step * 101 + accelerator.process_index)
            micro_step += 1
            with accelerator.accumulate(loss_module):
                loss = loss_module(**batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(loss_module.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += batch["attention_mask"].sum() + (batch["labels"] != -100).sum()  # a device tensor: summed without waiting
            running.append(loss.detach())
            parts.append(accelerator.unwrap_model(loss_module).last_parts)
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if average is not None and completed_steps > average.start_step:
                average.update()
            if completed_steps % run.logging_steps == 0 or completed_steps == max_steps:
                mean_loss = torch.stack(running).mean()
                # A diverged run (loss inf / nan) stops here, on every rank, before it writes anything.
                if float(accelerator.reduce((~torch.isfinite(mean_loss)).float(), reduction="sum")) > 0:
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process and out.is_dir() and not any(out.iterdir()):
                        out.rmdir()  # made by this run and still empty: leave nothing behind
                    raise ValueError(
                        f"training diverged by step {completed_steps} (train loss {float(mean_loss)}); no model was written to "
                        f"{run.output_dir}: lower --learning_rate (now {run.learning_rate:g}), raise --warmup_steps, or train with --mixed_precision no"
                    )
                train_loss = float(mean_loss)
                part_means = {f"train_{k}_loss": float(sum(p.get(k, 0.0) for p in parts)) / max(1, len(parts)) for k in ("sentence", "profile")}
                running, parts = [], []
                progress.set_postfix(loss=f"{train_loss:.3f}")
                accelerator.log({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0], **part_means}, step=completed_steps)
                logger.info("step %d train_loss %.4f (sentence %.4f, profile %.4f)", completed_steps, train_loss, part_means["train_sentence_loss"], part_means["train_profile_loss"])
            end = schedule.total // accelerator.num_processes  # max_steps, or sooner when the time budget shortened the schedule
            if budget.limited and completed_steps < end and out_of_time(accelerator, started, training_seconds):
                logger.warning("--max_train_seconds %g: the training loop's share (%.0f s) is spent; training ends at step %d of %d",
                               run.max_train_seconds, training_seconds, completed_steps, max_steps)
                time_cut = completed_steps
            if budget.limited and completed_steps % run.logging_steps == 0 and completed_steps - first_step >= run.logging_steps:
                # Steps that fit in the rest of the loop's share at the pace so far (validations included): the decay ends there,
                # later again if the pace improves (the first steps are the slowest), never past max_steps.
                pace = (time.perf_counter() - started) / (completed_steps - first_step)
                reachable = completed_steps + int(max(0.0, training_seconds - (time.perf_counter() - started)) / pace)
                if accelerator.num_processes > 1:  # every rank keeps the same schedule: the slowest rank's
                    reachable = int(accelerator.gather(torch.tensor([reachable], device=accelerator.device)).min())
                if schedule.move_end(reachable * accelerator.num_processes):
                    end = schedule.total // accelerator.num_processes
                    if not announced:
                        announced = True
                        logger.info("--max_train_seconds %g: at %.2f s a step, the learning rate now decays to 0 by step %d of %d "
                                    "(moved as the pace changes)", run.max_train_seconds, pace, end, max_steps)
            last = completed_steps >= end or bool(time_cut)
            if len(eval_examples) and ((eval_steps > 0 and completed_steps % eval_steps == 0) or last):
                val = validation_loss(loss_module, eval_loader, accelerator)
                history.append({"step": completed_steps, **val})
                accelerator.log(val, step=completed_steps)
                logger.info("step %d validation_loss %.4f (sentence %.4f, profile %.4f)", completed_steps, *val.values())
                if best is not None and best.update(val["validation_loss"], completed_steps) and not last:
                    logger.info("early stopping at step %d: no lower validation loss in %d validations (best %.4f at step %d)",
                                completed_steps, run.early_stopping_patience, best.best_loss, best.best_step)
                    early_stop = completed_steps
            if run.checkpointing_steps > 0 and completed_steps % run.checkpointing_steps == 0:
                save_checkpoint(accelerator, run.output_dir, completed_steps, {"completed_steps": completed_steps, "epoch": epoch, "batches_seen": micro_step},
                                best=best)
            if last or early_stop or completed_steps == run.stop_after_steps:
                break
        if completed_steps >= schedule.total // accelerator.num_processes or completed_steps == run.stop_after_steps or time_cut or early_stop:
            break
    progress.close()
    if completed_steps < schedule.total // accelerator.num_processes and not (time_cut or early_stop):
        accelerator.print(f"stopped after step {completed_steps} of {max_steps}; resume with --resume_from_checkpoint latest")
        wrapper = weakref.ref(loss_module)
        loss_module = loss = batch = None  # noqa: F841 -- see below
        release_ddp(accelerator, wrapper)
        accelerator.end_training()
        return 0
    elapsed = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if average is not None and average.count:
        average.copy_to_module()
        logger.info("weights: the mean of the last %d steps", average.count)
    elif average is not None:
        logger.warning("weights: the last step's (--max_train_seconds ended training before the averaging began)")
    elif best is not None and run.load_best_model_at_end and best.best_step != completed_steps:
        best.restore()
        logger.info("weights: those of step %d, the lowest validation loss (%.4f)", best.best_step, best.best_loss)
    profile_head = accelerator.unwrap_model(loss_module).profile_head
    model = accelerator.unwrap_model(loss_module).model
    # Every rank prints its own checksum: equal lines prove the ranks ended in step.
    # One write, framed by newlines, so that two ranks writing at once into one pipe cannot run their lines together.
    sys.stdout.write(f"\nrank {accelerator.process_index} parameter checksum {parameter_checksum(model)}\n")
    sys.stdout.flush()
    tokens_total = accelerator.reduce(torch.as_tensor(tokens, dtype=torch.long, device=accelerator.device), reduction="sum").item()
    accelerator.wait_for_everyone()
    # The process group ends here for every rank together; what follows runs on the main process alone.
    wrapper = weakref.ref(loss_module)
    loss_module = loss = batch = None  # noqa: F841 -- the last references to the DDP wrapper and its graph
    release_ddp(accelerator, wrapper)
    accelerator.end_training()

    if accelerator.is_main_process:
        # The refit and the calibration decode every validation cell: on the main process's GPU when there is one.
        device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")
        model = model.to(device).eval()
        profile_head = profile_head.to(device).eval() if profile_head is not None else None
        calibration, refit, held_out_cap = {}, {}, {}
        if profile_head is not None and model_args.profile_refit and (len(validation) or refit_choices):
            targets = [len(meta["peaks" if d == "gex2atac" else "genes"]) for d in data_args.directions]
            refit_cells = refit_cell_cap(budget, profile_head.weight.shape[1], targets, device)
            refit = refit_head(model, profile_head, tokenizer, meta, splits["train"], validation, train_examples, eval_examples, run.per_device_eval_batch_size,
                               model_args.profile_ranks, refit_choices, refit_cells)
        if not len(splits["validation"]):
            logger.warning("the validation split is empty: no validation loss, and the readout stays uncalibrated "
                           "(calibrate it on fold models' readings: python -m translator.recalibrate --model OUT --dataset_dir DATA --pool MODEL DATASET_DIR ...)")
        elif data_args.calibration_cells > 0:
            calibration_cells = min(len(splits["validation"]), data_args.calibration_cells)
            cap = calibration_cell_cap(budget, model, tokenizer, meta, splits["validation"], data_args.directions, *caps, run.per_device_eval_batch_size, profile_head)
            if cap is not None:
                held_out_cap = {"max_cells": min(cap, HELD_OUT_CELLS)}  # the blend decodes validation cells again: at most as many as the budget allows
            if cap is not None and cap < calibration_cells:
                logger.info("--max_train_seconds: %.0f s left, the calibration and the blend decode %d of %d validation cells (the readout chosen on one partition)", budget.left(), cap, calibration_cells)
                calibration_cells = cap
                selection_repeats = 1  # one partition: the readout's cross-fitted choice costs a tenth
            else:
                selection_repeats = data_args.calibration_selection_repeats
            logger.info("calibrating the readout on %s validation cells", calibration_cells)
            calibration = calibrate(model, tokenizer, meta, splits["validation"], data_args.directions, *caps, calibration_cells, run.per_device_eval_batch_size, run.seed, profile_head,
                                    selection_parts=data_args.calibration_selection_parts, selection_repeats=selection_repeats)
            for direction, params in calibration.items():
                cross = params.get("validation_rmse_cross_fitted")
                logger.info("%s readout: %s (chosen by %s validation RMSE: %s; per-feature mean %.6f)", direction, params["aggregation"],
                            "cross-fitted" if cross else "in-sample", ", ".join(f"{name} {value:.6f}" for name, value in (cross or params["validation_rmse"]).items()),
                            params["validation_rmse_mean"])
        examples_split = splits["validation"] if len(splits["validation"]) else splits["train"]
        readout = {"max_source_length": caps[0], "max_target_length": caps[1], "calibration": calibration, "profile_refit": refit,
                   "examples": widget_examples(tokenizer, examples_split, data_args.directions)}
        saved = {**asdict(model_args), **asdict(data_args), **asdict(run)}
        for key in ("dataset_dir", "tokenizer_dir", "output_dir", "resume_from_checkpoint"):
            saved[key] = Path(saved[key]).name if saved[key] else None
        saved["profile_choices_from"] = [Path(f).name for f in model_args.profile_choices_from]
        saved.update(mixed_precision=accelerator.mixed_precision, dataset_name=Path(data_args.dataset_dir).name, n_parameters=n_params, completed_steps=completed_steps,
                     num_processes=accelerator.num_processes, train_tokens_per_second=round(tokens_total / max(elapsed, 1e-9), 1),
                     validation_history=history, train_seconds=round(elapsed, 1), planned_steps=max_steps, stopped_by_time_limit=bool(time_cut) or (completed_steps < max_steps and not early_stop),
                     early_stopped_at=early_stop or None, best_validation_step=best.best_step if best is not None and run.load_best_model_at_end and average is None else None,
                     job_seconds_before_finishing=round(budget.elapsed(), 1))
        write_model_folder(run.output_dir, model, tokenizer, meta, readout, saved, caps[1], profile_head)
        fit_blend(run.output_dir, data_args.dataset_dir, data_args.directions, run.per_device_eval_batch_size, run.seed, **held_out_cap,
                  max_seconds=budget.left() if budget.limited else None)
        evaluate_folder(run, data_args)
        from translator.card import render_model_card

        render_model_card(run.output_dir, repo_id=run.hub_model_id)
        logger.info("model folder written to %s (%.0f train tokens/s)", run.output_dir, tokens_total / max(elapsed, 1e-9))
        if run.push_to_hub:
            from translator.hub import push_model_folder

            files = push_model_folder(run.output_dir, run.hub_model_id)
            logger.info("pushed %d files to %s", len(files), run.hub_model_id)
    return 0


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
