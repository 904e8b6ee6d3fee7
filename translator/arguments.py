"""train.py's arguments: three groups (model, data, run) with their help, read from the command line or a recipe file
(``configs/default.yaml``), and checked before anything is written.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

from dataset_builder.outputs import check_output, check_replaceable, folder_kind
from tokenizer import DIRECTIONS

from .compiled import COMPILE_MODES
from .data import GEX_TARGET_ORDERS, check_gex_target_cap, check_gex_target_min_value
from .model import MODEL_SHAPES
from .profile_fit import RANK_GRID
from .readout import SELECTION_REPEATS, check_selection_parts, check_selection_repeats
from .training import AUTO_EVAL_STEPS, AUTO_WARMUP_STEPS


@dataclass
class ModelArguments:
    """The model's shape, its output layer and profile readout, and the training augmentations."""

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
    """The dataset and tokenizer folders, the directions, the sentence caps, and the validation cells used."""

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
    streaming: bool = field(default=False, metadata={"help": "stream the train split from its Arrow files a window of cells at a time, each process reading its own share "
                                                           "(every cell once per epoch), instead of holding every train example in memory: for datasets larger than "
                                                           "memory and for training on many machines (docs/multinode.md)"})
    streaming_sample_cells: int = field(default=10000, metadata={"help": "with --streaming: the evenly spaced train cells held in memory for the name embeddings' LSI and the head refit"})


@dataclass
class RunArguments:
    """The output folder, the optimization and its length, the time budget, checkpoints, tracking and the Hub push."""

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
    torch_compile: bool = field(default=False, metadata={"help": "compile the training step's forward and backward with torch.compile: far fewer operators a "
                                                                 "step; the first steps compile (minutes on a CPU, again for new batch shapes), so off by default"})
    torch_compile_mode: str = field(default="default", metadata={"help": f"torch.compile mode with --torch_compile: {' | '.join(COMPILE_MODES)} "
                                                                         "(reduce-overhead replays CUDA graphs on a GPU)"})
    early_stopping_patience: int = field(default=3, metadata={"help": "end training after this many validations in a row without a lower validation loss (0: never)"})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "finish with the weights of the validation with the lowest loss (not with --weight_average_fraction)"})
    seed: int = field(default=42, metadata={"help": "random seed (weights, batches, dropout)"})
    eval_steps: int = field(default=-1, metadata={"help": f"validation loss every N steps (0: only at the end; -1: once per epoch, at least every {AUTO_EVAL_STEPS} steps)"})
    checkpointing_steps: int = field(default=200, metadata={"help": "checkpoint every N steps (0: none)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or `latest` in --output_dir"})
    logging_steps: int = field(default=20, metadata={"help": "log the train loss every N steps"})
    blend: bool = field(default=True, metadata={"help": "ship the transformer's readout blended with a kernel regression on the source names and the per-feature mean, "
                                                       "weights chosen on held-out cells (--no_blend: the readout alone)"})
    blend_folds: int = field(default=5, metadata={"help": "with fewer than 100 validation cells, train this many fold models of the same recipe on the train and "
                                                         "validation cells so that the blend is chosen on every one of them (0: off)"})
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
    if run.torch_compile_mode not in COMPILE_MODES:
        raise ValueError(f"--torch_compile_mode must be one of {', '.join(COMPILE_MODES)}, got {run.torch_compile_mode!r}")
    if data_args.gex_target_order not in GEX_TARGET_ORDERS:
        raise ValueError(f"--gex_target_order must be one of {', '.join(GEX_TARGET_ORDERS)}, got {data_args.gex_target_order!r}")
    check_gex_target_cap(data_args.max_gex_target_length, data_args.max_target_length)
    check_gex_target_min_value(data_args.gex_target_min_value)
    for name in ("max_eval_cells", "calibration_cells"):
        if getattr(data_args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(data_args, name)}")
    if data_args.streaming_sample_cells < 1:
        raise ValueError(f"--streaming_sample_cells must be >= 1, got {data_args.streaming_sample_cells}")
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
    if run.blend_folds < 0 or run.blend_folds == 1:
        raise ValueError(f"--blend_folds must be 0 (off) or at least 2, got {run.blend_folds}")
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
