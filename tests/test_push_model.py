"""The model folder is the Hub repository: push with the upload calls replaced, the card, and no token leaks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import shared_file
from tests.translator_fixtures import BMMC_COMBINED, build_real, tiny_args

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
HUB_FILES = {"README.md", "cell_sentences.json", "config.json", "generation_config.json", "model.safetensors",
             "readout.json", "tokenizer.json", "tokenizer_config.json", "training_args.json", "eval_results.json",
             "profile_head.safetensors", "gex2atac_generation_config.json", "atac2gex_generation_config.json", "handler.py"}


class FakeHfApi:
    """Records what would be sent; applies the ignore patterns as huggingface_hub does."""

    calls: list[dict] = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append({"call": "create_repo", "repo_id": repo_id, "token": self.token})

    def upload_folder(self, folder_path, repo_id, ignore_patterns=None, allow_patterns=None, **kwargs):
        from pathlib import Path

        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        FakeHfApi.calls.append({"call": "upload_folder", "repo_id": repo_id, "files": sent, "token": self.token})


@pytest.fixture
def pushed(tmp_path_factory, monkeypatch, caplog, capsys):
    import huggingface_hub

    import train

    torch.set_num_threads(1)
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    root = tmp_path_factory.mktemp("push")
    data, tok = build_real(root, shared_file(BMMC_COMBINED))
    out = root / "model"

    def fake_evaluation(run, data_args):  # what eval.py leaves in the folder, in its format
        results = {"directions": {d: {"model": {"rmse": 0.25, "pearson": 0.4}, "baselines": {"mean": {"rmse": 0.26}}} for d in data_args.directions}}
        (out / "eval_results.json").write_text(json.dumps(results))

    monkeypatch.setattr(train, "evaluate_folder", fake_evaluation)
    caplog.set_level(logging.DEBUG)
    argv = tiny_args(data, tok, out, "--max_steps", "4", "--checkpointing_steps", "2", "--push_to_hub", "--hub_model_id", "someone/tiny-translator")
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    return out, captured.out + captured.err + caplog.text


def test_push_sends_exactly_the_model_files(pushed):
    from translator.hub import hub_files

    out, _ = pushed
    create, upload = FakeHfApi.calls
    assert create["call"] == "create_repo" and create["repo_id"] == "someone/tiny-translator"
    assert upload["call"] == "upload_folder" and upload["token"] == FAKE_TOKEN  # the token came from HF_TOKEN
    assert set(upload["files"]) == HUB_FILES == set(hub_files(out))
    assert (out / "checkpoints").is_dir()  # kept locally, never sent


def test_card_metadata_holds_the_model_metrics(pushed):
    from huggingface_hub import ModelCard

    out, _ = pushed
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "translation"
    assert {"single-cell", "multiome", "biology"} <= set(data["tags"]) and data["license"]
    results = data["model-index"][0]["results"]
    values = {(r["task"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert values[("Cell translation GEX to ATAC", "rmse")] == 0.25
    assert values[("Cell translation ATAC to GEX", "pearson")] == 0.4
    text = str(card)
    assert "someone/tiny-translator" in text and "$" not in card.text.replace("$ ", "")


def test_token_is_never_written_or_logged(pushed):
    out, logs = pushed
    assert FAKE_TOKEN not in logs
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    saved = json.loads((out / "training_args.json").read_text())
    assert not any(key in ("token", "hub_token", "use_auth_token") for key in saved)
