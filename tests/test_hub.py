"""Hub round trips: what is pushed loads back the way a user loads it (a local folder stands in for the Hub)."""

from __future__ import annotations

import json
import shutil

import datasets
import h5py
import pytest
from huggingface_hub import DatasetCard, ModelCard

from dataset_builder import META_FILE, build_dataset
from dataset_builder.simulate import write_simulated
from tests.fake_hub import LocalHub


@pytest.fixture
def simulated(tmp_path):
    return write_simulated(tmp_path / "sim.h5mu")


def test_dataset_without_validation_loads_from_the_pushed_folder(tmp_path, monkeypatch, simulated):
    import dataset_builder.hub as hub_module

    hub = LocalHub(tmp_path / "hub").install(monkeypatch, hub_module)
    build_dataset([simulated], tmp_path / "ds", test_batches=["sim4"], no_validation=True)
    url = hub_module.push_dataset_to_hub(tmp_path / "ds", "someone/sim-sentences", token="hf_fake", private=True)
    assert url.endswith("datasets/someone/sim-sentences")
    folder = hub.folder("someone/sim-sentences", "dataset")
    assert not list(folder.glob("data/validation-*")), "an empty split must not be pushed"
    loaded = datasets.load_dataset(str(folder))
    local = datasets.load_from_disk(str(tmp_path / "ds"))
    assert set(loaded) == {"train", "test"}
    for split in ("train", "test"):
        assert loaded[split]["cell"] == local[split]["cell"] and loaded[split]["gex_text"] == local[split]["gex_text"]
    assert hub.calls[0]["call"] == "create_repo" and hub.calls[0]["private"] is True
    assert all(c["token"] == "hf_fake" for c in hub.calls)


def test_dataset_card_keeps_dataset_info_and_names_the_license(tmp_path, monkeypatch, simulated):
    import dataset_builder.hub as hub_module

    with h5py.File(simulated, "a") as handle:  # a file that records its license, as a data portal's might
        handle["uns"].create_dataset("license", data="cc-by-4.0")
    hub = LocalHub(tmp_path / "hub").install(monkeypatch, hub_module)
    build_dataset([simulated], tmp_path / "ds", test_batches=["sim4"], validation_batches=["sim3"])
    assert json.loads((tmp_path / "ds" / META_FILE).read_text())["license"] == "cc-by-4.0"
    hub_module.push_dataset_to_hub(tmp_path / "ds", "someone/sim-sentences", token="hf_fake")
    folder = hub.folder("someone/sim-sentences", "dataset")
    card = DatasetCard.load(folder / "README.md")
    data = card.data.to_dict()
    info = data["dataset_info"]
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == {"train": 200, "validation": 100, "test": 100}
    assert {f["name"] for f in info["features"]} >= {"cell", "gex_text", "atac_text"}
    assert data["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    assert data["license"] == "cc-by-4.0" and {"single-cell", "multiome"} <= set(data["tags"])
    assert data["task_categories"] == ["translation"] and data["size_categories"] == ["n<1K"]
    text = card.text
    assert 'load_dataset("someone/sim-sentences")' in text and "sim4" in text and "pip install" in text
    assert "hf_fake" not in str(card) and str(tmp_path) not in str(card)
    pushed_meta = json.loads((folder / META_FILE).read_text())
    assert pushed_meta["hub_dataset_id"] == "someone/sim-sentences"
    # the local folder now knows where it was published: models trained on it name the Hub dataset
    assert json.loads((tmp_path / "ds" / META_FILE).read_text())["hub_dataset_id"] == "someone/sim-sentences"
    # the card's recipe for a training folder: the pushed splits saved to disk beside the pushed metadata
    from tokenizer import build_from_dataset

    assert "save_to_disk" in text and "cell_sentences.json" in text
    datasets.load_dataset(str(folder)).save_to_disk(str(tmp_path / "DATA"))
    shutil.copyfile(hub.download("someone/sim-sentences", META_FILE, repo_type="dataset"), tmp_path / "DATA" / META_FILE)
    assert datasets.load_from_disk(str(tmp_path / "DATA"))["validation"].num_rows == 100
    assert len(build_from_dataset(tmp_path / "DATA", tmp_path / "TOK")) == 5 + len(pushed_meta["genes"]) + len(pushed_meta["peaks"])


def test_dataset_license_flag_wins_and_defaults_to_unknown(tmp_path, simulated):
    from dataset_builder.hub import render_dataset_card

    build_dataset([simulated], tmp_path / "ds")
    meta = json.loads((tmp_path / "ds" / META_FILE).read_text())
    assert meta["license"] is None
    assert DatasetCard(render_dataset_card(meta)).data.license == "unknown"
    assert DatasetCard(render_dataset_card(meta, license="cc0-1.0")).data.license == "cc0-1.0"


def _eval_results(directions=("gex2atac", "atac2gex")) -> dict:
    """eval.py's eval_results.json shape: the model's metrics, baselines', and the all-zeros reference accuracy."""
    return {
        "dataset": "bmmc_ds",
        "split": "test",
        "directions": {
            d: {
                "model": {"rmse": 0.25 + i / 100, "pearson_cell": 0.4 + i / 100, "accuracy_binary": 0.9, "accuracy_binary_all_zeros": 0.8},
                "baselines": {"mean": {"rmse": 0.3, "pearson_cell": 0.1}},
            }
            for i, d in enumerate(directions)
        },
    }


def _model_folder(path, meta: dict | None = None):
    path.mkdir(parents=True)
    (path / META_FILE).write_text(json.dumps(meta or {"genes": ["A", "B"], "peaks": ["chr1-10-20"], "splits": {"train": 3}}))
    (path / "eval_results.json").write_text(json.dumps(_eval_results()))
    (path / "readout.json").write_text(json.dumps({"examples": [{"text": "<gex2atac> A B", "title": "cell"}]}))
    (path / "training_args.json").write_text(json.dumps({"dataset_name": "bmmc_ds", "model_size": "tiny"}))
    return path


def _results_by_direction(card: ModelCard) -> dict:
    index = card.data.to_dict()["model-index"]
    return {r["task"]["type"]: {m["type"]: m["value"] for m in r["metrics"]} for r in index[0]["results"]}


def test_model_card_survives_a_round_trip_with_both_directions(tmp_path):
    from translator.card import render_model_card

    folder = _model_folder(tmp_path / "model")
    render_model_card(folder, repo_id="someone/tiny")
    card = ModelCard.load(folder / "README.md")
    results = _results_by_direction(card)
    assert results == {"gex2atac": {"rmse": 0.25, "pearson_cell": 0.4, "accuracy_binary": 0.9},
                       "atac2gex": {"rmse": 0.26, "pearson_cell": 0.41, "accuracy_binary": 0.9}}
    # saved and loaded again (what metadata_update does): still two results, nothing merged
    card.save(tmp_path / "again.md")
    assert _results_by_direction(ModelCard.load(tmp_path / "again.md")) == results
    data = card.data.to_dict()
    assert data["license"] == "unknown" and "datasets" not in data  # no Hub id known: no dataset claimed
    assert "pip install" in card.text and "handler.py" in card.text and "text2text-generation" in card.text
    assert 'translate(["A B"], direction="gex2atac")' in card.text


def test_model_card_names_the_hub_dataset_and_its_license(tmp_path):
    from translator.card import render_model_card

    meta = {"genes": ["A"], "peaks": ["chr1-10-20"], "splits": {}, "hub_dataset_id": "someone/bmmc-sentences", "license": "cc-by-4.0"}
    folder = _model_folder(tmp_path / "model", meta)
    render_model_card(folder, repo_id="someone/tiny")
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["datasets"] == ["someone/bmmc-sentences"] and data["license"] == "cc-by-4.0"
    assert {r["dataset"]["type"] for r in data["model-index"][0]["results"]} == {"someone/bmmc-sentences"}
    render_model_card(folder, repo_id="someone/tiny", license="mit")
    assert ModelCard.load(folder / "README.md").data.license == "mit"


def test_merge_model_index_keeps_the_rest_of_the_card(tmp_path):
    from translator.card import merge_model_index

    folder = _model_folder(tmp_path / "model")
    readme = folder / "README.md"
    readme.write_text("---\nlicense: mit\ntags:\n- single-cell\n---\n\n# My model\n\nBody text.\n")
    assert merge_model_index(readme, _eval_results(), model_name="my-model")
    text = readme.read_text()
    card = ModelCard.load(readme)
    assert card.data.license == "mit" and card.data.tags == ["single-cell"] and card.data.model_name == "my-model"
    assert set(_results_by_direction(card)) == {"gex2atac", "atac2gex"} and text.endswith("# My model\n\nBody text.\n")
    merge_model_index(readme, _eval_results())
    assert readme.read_text() == text, "merging twice must not change the card"
    assert not merge_model_index(readme, {"directions": {"gex2atac": {"baselines": {"mean": {"rmse": 0.3}}}}})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model trained a few steps on the synthetic paired data, as train.py writes it."""
    import torch

    import train
    from tests.translator_fixtures import make_dataset_and_tokenizer, tiny_args

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    data, tok = make_dataset_and_tokenizer(root)
    out = root / "model"
    assert train.main(tiny_args(data, tok, out, "--max_steps", "60", "--eval_steps", "0", "--checkpointing_steps", "0")) == 0
    return out, data


def test_direction_generation_config_generates_only_target_names(tiny_model):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    folder, data = tiny_model
    meta = json.loads((folder / META_FILE).read_text())
    test = datasets.load_from_disk(str(data))["test"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()
    for direction, source, target in (("gex2atac", "gex_text", meta["peaks"]), ("atac2gex", "atac_text", meta["genes"])):
        config = GenerationConfig.from_pretrained(str(folder), f"{direction}_generation_config.json")
        sentences = [f"<{direction}> {s}" for s in test[source][:6]]
        batch = tokenizer(sentences, return_tensors="pt", padding=True)
        generated = model.generate(**batch, generation_config=config)
        names = [tokenizer.convert_ids_to_tokens(row) for row in generated.tolist()]
        words = [w for row in names for w in row if w not in ("<pad>", "</s>")]
        assert words and set(words) <= set(target), direction
        assert config.no_repeat_ngram_size == 1 and config.max_length == model.generation_config.max_length


def test_tokenizer_config_does_not_bind_loads_to_the_local_cache(tiny_model):
    folder, _ = tiny_model
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and "is_local" not in saved and saved["n_genes"] == 40


def _handler(folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(path=str(folder))


def test_endpoint_handler_answers_both_directions_as_the_runtime_calls_it(tiny_model):
    from translator import CellTranslator

    folder, data = tiny_model
    handler = _handler(folder)
    meta = json.loads((folder / META_FILE).read_text())
    test = datasets.load_from_disk(str(data))["test"]
    translator = CellTranslator.from_pretrained(folder)
    for direction, source, target in (("gex2atac", "gex_text", meta["peaks"]), ("atac2gex", "atac_text", meta["genes"])):
        sentences = test[source][:3]
        answer = handler({"inputs": sentences, "parameters": {"direction": direction, "top_k": 5, "values": True}})
        expected, translations = translator.predict_matrix(sentences, direction, return_sentences=True)
        assert [a["translation"] for a in answer] == translations
        for row, item in zip(expected, answer, strict=True):
            assert set(item["translation"].split()) <= set(target)
            assert item["values"] == pytest.approx(row.tolist(), abs=1e-6) and len(item["values"]) == len(target)
            tops = [t["value"] for t in item["top_features"]]
            assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(float(row.max()), abs=1e-6)
            assert all(row[target.index(t["feature"])] == pytest.approx(t["value"], abs=1e-6) for t in item["top_features"])
        # one sentence with its prefix: the direction comes from the prefix; without top_k / values only the translation
        single = handler({"inputs": f"<{direction}> {sentences[0]}"})
        assert single == [{"translation": translations[0]}]
    for bad in ({"inputs": []}, {"inputs": "Gene1 Gene2"}, {"inputs": "Gene1", "parameters": {"direction": "rna2atac"}},
                {"inputs": "Gene1", "parameters": {"direction": "gex2atac", "top_k": -1}}, {"text": "Gene1"},
                {"inputs": "<atac2gex> chr1-1000-1500", "parameters": {"direction": "gex2atac"}}):
        with pytest.raises(ValueError):
            handler(bad)


def test_card_sections_added_later_replace_their_old_text(tmp_path):
    """translator.ensemble / translator.stack add a section to a finished card; doing it again replaces it."""
    from translator.card import render_model_card, set_card_section

    folder = _model_folder(tmp_path / "model")
    render_model_card(folder, repo_id="someone/tiny")
    readme = folder / "README.md"
    before = ModelCard.load(readme)
    set_card_section(readme, "Source-kernel stack", "weights gex2atac 0.30")
    set_card_section(readme, "Ensemble", "the mean of 3 models")
    set_card_section(readme, "Source-kernel stack", "weights gex2atac 0.55")
    after = ModelCard.load(readme)
    assert after.data.to_dict() == before.data.to_dict()
    assert after.text.startswith(before.text.rstrip("\n"))
    assert after.text.count("## Source-kernel stack") == 1 and "0.55" in after.text and "0.30" not in after.text
    assert after.text.index("## Source-kernel stack") < after.text.index("## Ensemble") and after.text.endswith("the mean of 3 models\n")
    set_card_section(tmp_path / "none" / "README.md", "Ensemble", "text")
    assert not (tmp_path / "none").exists()
