"""Fold models for the blend when validation cells are few: their datasets, their statistics, and the run that pools them."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from tests.translator_fixtures import make_dataset_and_tokenizer, tiny_args


def test_a_fold_datasets_statistics_are_the_builders_on_its_train_cells(tmp_path):
    from dataset_builder import build_dataset
    from dataset_builder.simulate import write_simulated
    from translator.folds import split_train_stats

    source = write_simulated(tmp_path / "sim.h5mu", n_cells=300, seed=3)
    build_dataset([source], tmp_path / "ds", test_batches=["sim4"], validation_batches=["sim3"])
    meta = json.loads((tmp_path / "ds" / "cell_sentences.json").read_text())
    got = split_train_stats(datasets.load_from_disk(str(tmp_path / "ds"))["train"], meta)
    for key, value in meta["train_stats"].items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_fold_datasets_split_the_train_and_validation_cells(tmp_path):
    from translator.folds import write_fold_datasets

    data, _ = make_dataset_and_tokenizer(tmp_path, n_cells=90)
    splits = datasets.load_from_disk(str(data))
    folders = write_fold_datasets(splits, data, tmp_path / "folds", 3, seed=0)
    held = [c for f in folders for c in list(datasets.load_from_disk(str(f))["validation"]["cell"])]
    everything = list(splits["train"]["cell"]) + list(splits["validation"]["cell"])
    assert sorted(held) == sorted(everything)  # every cell held out exactly once
    for f in folders:
        fold = datasets.load_from_disk(str(f))
        assert not set(list(fold["train"]["cell"])) & set(list(fold["validation"]["cell"]))
        meta = json.loads((f / "cell_sentences.json").read_text())
        assert meta["splits"]["train"] == len(fold["train"]) and "test" not in fold


def test_few_validation_cells_choose_the_blend_on_every_cell_through_fold_models(tmp_path):
    import train

    data, tok = make_dataset_and_tokenizer(tmp_path, n_cells=96)
    splits = datasets.load_from_disk(str(data))
    n_cells = len(splits["train"]) + len(splits["validation"])
    out = tmp_path / "model"
    assert train.main(tiny_args(data, tok, out, "--max_steps", "3", "--checkpointing_steps", "0", "--blend_folds", "2", blend=True)) == 0
    readout = json.loads((out / "readout.json").read_text())
    for direction, record in readout["blend"].items():
        assert sum(record["held_out"]["pooled_from"]) == n_cells == record["held_out"]["cells"], direction
    assert not any(".folds" in p.name for p in tmp_path.iterdir())
    assert "each read by one of 2 fold models" in (out / "README.md").read_text()


def test_blend_folds_of_one_is_refused(tmp_path):
    import train

    data, tok = make_dataset_and_tokenizer(tmp_path, n_cells=60)
    with pytest.raises(ValueError, match="--blend_folds must be 0"):
        train.main(tiny_args(data, tok, tmp_path / "m", "--blend_folds", "1"))
