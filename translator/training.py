"""Pieces of a training run that are not the loop itself: checkpoints, calibration, the model folder.

Checkpoints (``accelerator.save_state``) are written to a hidden temporary folder and renamed, so a
kill during a save leaves the previous checkpoint usable. The model folder's files are written to a
temporary folder and moved in one by one (each ``os.replace`` is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from dataset_builder.outputs import apply_umask, check_room_for
from tokenizer import PREFIX, feature_token_ranges, save_tokenizer

from .data import SOURCE_COLUMN, TARGET_MODALITY, names_to_ids, source_ids
from .modeling import PROFILE_HEAD_FILE
from .readout import (
    AGGREGATIONS,
    READOUT_FILE,
    SELECTION_PARTS,
    SELECTION_REPEATS,
    decode_features,
    fit_readout,
    truth_matrices,
    with_row_stats,
)
from .serving import write_serving_files

logger = logging.getLogger("train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
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


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step_N``, then rename to ``step_N``; keep the last ``keep``."""
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
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoint_steps(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def calibration_features(model, tokenizer, meta: dict, split, directions: Sequence[str], max_source_length: int, max_target_length: int,
                         max_cells: int = 500, batch_size: int = 64, profile_head=None, row_stats: bool = False) -> dict:
    """What a calibration is fitted on: ``{direction: (features, truth)}`` for (up to ``max_cells`` evenly spaced) cells of ``split``.

    ``row_stats``: the features also carry the model's per-feature train statistics as one row per cell
    (:data:`translator.readout.ROW_STATS`), so that readings of several models (cross-validation fold models, each
    with its own train split) can be pooled into one calibration.
    """
    n = len(split)
    rows = np.unique(np.linspace(0, n - 1, min(n, max_cells)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    cells = split.select(rows.tolist())
    truth = truth_matrices(cells, meta)
    ranges = feature_token_ranges(tokenizer, n_genes=len(meta["genes"]))
    out = {}
    for direction in directions:
        names = names_to_ids(tokenizer, cells[SOURCE_COLUMN[direction]])
        ids = [source_ids(x, direction, tokenizer, max_source_length) for x in names]
        target = TARGET_MODALITY[direction]
        features, _ = decode_features(model, tokenizer, meta, ids, direction, ranges[target], max_target_length, batch_size, profile_head=profile_head)
        if row_stats:
            with_row_stats(features, meta, len(rows))
        out[direction] = (features, truth[target])
    return out


def calibrate(model, tokenizer, meta: dict, split, directions: Sequence[str], max_source_length: int, max_target_length: int, max_cells: int = 500, batch_size: int = 64, seed: int = 0, profile_head=None,
              aggregations: Sequence[str] = AGGREGATIONS, selection_parts: int = SELECTION_PARTS, selection_repeats: int = SELECTION_REPEATS,
              pool: Sequence[dict] = ()) -> dict:
    """Fit the readout calibration of each direction on (up to ``max_cells`` evenly spaced) cells of ``split``, choosing among ``aggregations``
    (by RMSE cross-fitted over ``selection_parts`` parts of the cells, averaged over ``selection_repeats`` random partitions; 0 parts:
    in-sample, see :func:`translator.readout.fit_readout`).

    ``pool``: more cells to fit on, as other models read them (:func:`calibration_features` with ``row_stats=True``, one dict
    per model: the other folds of a cross-validation, each read by the fold model that did not train on it); each cell
    keeps the train statistics of the model that read it. The coefficients are then fitted on all of them together.
    ``split`` None: on ``pool`` alone (a model trained on every cell, whose fold models read the cells it trained on).
    """
    import scipy.sparse as sp

    if split is None and not pool:
        raise ValueError("a calibration needs cells: a split, or readings to pool")
    own = calibration_features(model, tokenizer, meta, split, directions, max_source_length, max_target_length, max_cells, batch_size,
                               profile_head, row_stats=bool(pool)) if split is not None else None
    out = {}
    for direction in directions:
        parts = [*([own[direction]] if own is not None else []), *(extra[direction] for extra in pool)]
        features, truth = parts[0]
        if pool:  # one features dict and one truth matrix over every model's cells
            features = {key: np.concatenate([np.asarray(f[key]) for f, _ in parts]) for key in features}
            truth = sp.vstack([t for _, t in parts]).tocsr()
        out[direction] = fit_readout(features, truth, direction, meta, seed=seed, aggregations=aggregations, selection_parts=selection_parts,
                                     selection_repeats=selection_repeats)
        if pool:
            out[direction]["pooled_cells"] = [int(t.shape[0]) for _, t in parts]
    return out


def widget_examples(tokenizer, split, directions: Sequence[str], n_names: int = 50, n_cells: int = 2) -> list[dict]:
    """Real input sentences for the card's widget: prefix and the first ``n_names`` names of validation cells."""
    examples = []
    for direction in directions:
        for i in range(min(n_cells, len(split))):
            names = split[i][SOURCE_COLUMN[direction]].split()[:n_names]
            examples.append({"text": " ".join([PREFIX[direction], *names]), "title": f"{direction} cell {split[i]['cell']}"})
    return examples


def write_model_folder(output_dir: str | os.PathLike, model, tokenizer, meta: dict, readout: dict, training_args: dict, max_target_length: int, profile_head=None) -> list[str]:
    """Write the Hub-ready files into ``output_dir``: weights (safetensors), configs, tokenizer, metadata, readout, args.

    ``profile_head`` (a :class:`translator.modeling.ProfileHead`) goes to ``profile_head.safetensors``.

    Files are written to a temporary folder in ``output_dir`` and moved in one by one.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
    try:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            max_length=int(max_target_length),
            no_repeat_ngram_size=1,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        write_serving_files(tmp, model.generation_config, tokenizer, len(meta["genes"]))
        if profile_head is not None:
            profile_head.save(tmp / PROFILE_HEAD_FILE)
        save_tokenizer(tokenizer, tmp, meta)
        (tmp / READOUT_FILE).write_text(json.dumps(readout, indent=2))
        (tmp / "training_args.json").write_text(json.dumps(training_args, indent=2))
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            apply_umask(tmp / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


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
