"""The model folder is the Hub repository: push with the upload calls replaced, the card, and no token leaks."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch

from tests.conftest import shared_file
from tests.fake_hub import LocalHub
from tests.translator_fixtures import BMMC_COMBINED, build_real, tiny_args

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
HUB_FILES = {"README.md", "cell_sentences.json", "config.json", "generation_config.json", "model.safetensors",
             "readout.json", "tokenizer.json", "tokenizer_config.json", "training_args.json", "eval_results.json",
             "profile_head.safetensors", "blend.safetensors", "gex2atac_generation_config.json", "atac2gex_generation_config.json", "handler.py"}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A tiny BMMC model trained with --push_to_hub into a local-folder Hub: (folder, the run's output and logs, the hub)."""
    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("push")
    data, tok = build_real(root, shared_file(BMMC_COMBINED))
    out = root / "model"

    def fake_evaluation(run, data_args):  # what eval.py leaves in the folder, in its format
        results = {"directions": {d: {"model": {"rmse": 0.25, "pearson": 0.4}, "baselines": {"mean": {"rmse": 0.26}}} for d in data_args.directions}}
        (out / "eval_results.json").write_text(json.dumps(results))

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    argv = tiny_args(data, tok, out, "--max_steps", "4", "--checkpointing_steps", "2", "--push_to_hub", "--hub_model_id", "someone/tiny-translator",
                      blend=True)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
            hub = LocalHub(root / "hub").install(monkeypatch)
            monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
            monkeypatch.setattr(train, "evaluate_folder", fake_evaluation)
            assert train.main(argv) == 0
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    return out, logs.getvalue(), hub


def test_push_sends_exactly_the_model_files(pushed):
    from translator.hub import hub_files

    out, _, hub = pushed
    create, upload = hub.calls
    assert create["call"] == "create_repo" and create["repo_id"] == "someone/tiny-translator"
    assert upload["call"] == "upload_folder" and upload["token"] == FAKE_TOKEN  # the token came from HF_TOKEN
    blend = {"blend.safetensors"} if (out / "blend.safetensors").exists() else set()  # the kernel and mean the blend weighs
    assert set(upload["files"]) == HUB_FILES | blend == set(hub_files(out))
    assert (out / "checkpoints").is_dir()  # kept locally, never sent


def test_what_was_pushed_loads_and_serves(pushed):
    """The pushed folder, loaded the way a user of the Hub repository loads it: CellTranslator, the card, handler.py."""
    import importlib.util

    import datasets
    from huggingface_hub import ModelCard

    from translator import CellTranslator

    out, _, hub = pushed
    sent = hub.folder("someone/tiny-translator")
    sentences = datasets.load_from_disk(str(out.parent / "data"))["test"]["gex_text"][:2]
    local = CellTranslator.from_pretrained(out).predict_matrix(sentences, "gex2atac")
    assert np.array_equal(CellTranslator.from_pretrained(sent).predict_matrix(sentences, "gex2atac"), local)
    assert set(ModelCard.load(sent / "README.md").data.to_dict()["model-index"][0]["results"][0]) >= {"task", "dataset", "metrics"}
    spec = importlib.util.spec_from_file_location("handler", sent / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer = module.EndpointHandler(str(sent))({"inputs": sentences, "parameters": {"direction": "gex2atac", "values": True}})
    assert np.allclose([a["values"] for a in answer], local, atol=1e-6)


def test_card_metadata_holds_the_model_metrics(pushed):
    from huggingface_hub import ModelCard

    out, _, _ = pushed
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
    out, logs, _ = pushed
    assert FAKE_TOKEN not in logs
    for path in out.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    saved = json.loads((out / "training_args.json").read_text())
    assert not any(key in ("token", "hub_token", "use_auth_token") for key in saved)
