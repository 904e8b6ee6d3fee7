"""Assemble an ensemble folder: one model folder whose predictions are the mean of several models' calibrated matrices.

With a few hundred training cells a single model's residual over the per-feature mean is noisy; cross-validation fold
models, each trained on four fifths of the cells, together have seen every cell, and the mean of their calibrated
matrices averages that noise out. This writes such a folder:

- the top level is ``--model`` as it is (a complete ``train.py`` folder: it still loads with ``AutoModelForSeq2SeqLM`` /
  ``AutoTokenizer``, and ``CellTranslator.translate`` writes its sentences);
- ``ensemble/member_<i>/`` holds each ``--members`` folder's model, tokenizer, metadata and profile head, with the top
  model's readout calibration (``--model``'s calibration was fitted on the fold models' readings of the cells they did not
  train on, ``translator.recalibrate --pool``: the same calibration for every member);
- ``readout.json`` lists the members under ``ensemble``; ``CellTranslator.predict_matrix`` (and so ``predict.py`` and
  ``eval.py``) averages the calibrated matrices of the top model and every member.

Usage::

    python -m translator.ensemble --model model_all --members m_0 m_1 m_2 m_3 m_4 --output_dir model_ensemble \
        [--push_to_hub --hub_model_id USER/NAME]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dataset_builder.outputs import META_FILE, check_output, check_replaceable

from .card import set_card_section
from .model import PROFILE_HEAD_FILE

MEMBER_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", META_FILE, PROFILE_HEAD_FILE, "training_args.json")
ENSEMBLE_DIR = "ensemble"


def build_ensemble(model_dir: str | Path, members: Sequence[str | Path], output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the ensemble folder (see the module docstring); returns ``output_dir``. Nothing is left behind on failure."""
    from tokenizer import check_same_features, load_tokenizer, read_meta

    from .api import ENSEMBLE_FIX, ENSEMBLE_REFERENCE, check_model_folder
    from .readout import READOUT_FILE

    top, out = Path(model_dir), Path(output_dir)
    if not members:
        raise ValueError("--members: give at least one model folder to average with --model")
    for flag, folder in [("--model", top), *(("--members", Path(m)) for m in members)]:
        if not folder.is_dir() or not (folder / READOUT_FILE).exists():
            raise FileNotFoundError(f"{flag} {folder}: not a model folder written by train.py")
        check_model_folder(folder)
    check_output(out, {"--model": top, "--members": members}, "--output_dir")
    check_replaceable(out, "--output_dir", "model", overwrite, "--overwrite_output_dir")
    readout = json.loads((top / READOUT_FILE).read_text())
    if readout.get("ensemble"):
        raise ValueError(f"--model {top} is an ensemble already; give a plain model folder")
    if not readout.get("calibration"):
        raise ValueError(f"--model {top} has no readout calibration to give the members; calibrate it first (python -m translator.recalibrate)")
    tokenizer, meta = load_tokenizer(top), read_meta(top)
    for member in members:
        check_same_features(meta, read_meta(member), f"--members {member}", reference=ENSEMBLE_REFERENCE, fix=ENSEMBLE_FIX,
                            tokenizers=(tokenizer, load_tokenizer(member)))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staged = work / "folder"
        shutil.copytree(top, staged)
        names = []
        for i, member in enumerate(members):
            name = f"{ENSEMBLE_DIR}/member_{i}"
            dest = staged / name
            dest.mkdir(parents=True)
            for file in MEMBER_FILES:
                if (Path(member) / file).exists():
                    shutil.copy2(Path(member) / file, dest / file)
            member_readout = json.loads((Path(member) / READOUT_FILE).read_text())
            member_readout.update(calibration=readout["calibration"], calibration_from=top.name, source_folder=Path(member).name)
            (dest / READOUT_FILE).write_text(json.dumps(member_readout, indent=2))
            names.append(name)
        readout.update(ensemble=names, ensemble_from=[Path(m).name for m in members])
        (staged / READOUT_FILE).write_text(json.dumps(readout, indent=2))
        set_card_section(staged / "README.md", "Ensemble", f"Predicted matrices are the mean of this model's and {len(names)} more models' "
                         f"calibrated matrices (`{ENSEMBLE_DIR}/`, from {', '.join(readout['ensemble_from'])}), all with this model's "
                         "calibration; `CellTranslator.predict_matrix` averages them, sentences come from this model.")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the main model folder (calibrated; its calibration is given to every member)")
    parser.add_argument("--members", nargs="+", required=True, help="model folders averaged with it (same dataset and tokenizer)")
    parser.add_argument("--output_dir", required=True, help="the ensemble folder to write")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the ensemble folder (members included) to the Hub")
    parser.add_argument("--hub_model_id", help="Hub repository id user/name (needed with --push_to_hub)")
    parser.add_argument("--hub_private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name")
    out = build_ensemble(args.model, args.members, args.output_dir, args.overwrite_output_dir)
    print(f"wrote {out}: {args.model} + {len(args.members)} members")
    if args.push_to_hub:
        from .hub import push_model_folder

        sent = push_model_folder(out, args.hub_model_id, private=args.hub_private, commit_message="Upload cell translator ensemble")
        print(f"pushed {len(sent)} files to {args.hub_model_id}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    from dataset_builder.cli import run_main

    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
