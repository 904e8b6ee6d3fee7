"""train.py flags that follow accelerate and the Hub: mixed precision from the accelerate config, trackers, license."""

from __future__ import annotations

import json

import pytest
import torch

import train
from tests.translator_fixtures import make_dataset_and_tokenizer, tiny_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return make_dataset_and_tokenizer(tmp_path_factory.mktemp("flags"))


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process; a run with another mixed precision needs it reset (and the next test file too)."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _train(data, out, *extra) -> dict:
    _reset_accelerate()
    assert train.main(tiny_args(*data, out, "--max_steps", "2", "--eval_steps", "0", "--checkpointing_steps", "0", *extra)) == 0
    return json.loads((out / "training_args.json").read_text())


def test_accelerate_config_mixed_precision_stands_unless_the_flag_is_given(data, tmp_path, monkeypatch):
    # `accelerate launch` passes the config's mixed precision to the script in this variable
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert _train(data, tmp_path / "config")["mixed_precision"] == "bf16"
    assert _train(data, tmp_path / "flag", "--mixed_precision", "no")["mixed_precision"] == "no"


def test_model_card_license_flag(data, tmp_path):
    from huggingface_hub import ModelCard

    _train(data, tmp_path / "model", "--license", "cc-by-4.0")
    assert ModelCard.load(tmp_path / "model" / "README.md").data.license == "cc-by-4.0"


@pytest.mark.parametrize("tracker", ["tensorboard", "all"])
def test_report_to_a_tracker_that_is_not_installed_is_refused(data, tmp_path, monkeypatch, capsys, tracker):
    import accelerate.tracking
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"install the \[tracking\] extra"):
        train.main(tiny_args(*data, tmp_path / "model", "--report_to", tracker))
    assert not (tmp_path / "model").exists()
