"""`python -m dataset_builder --file_format parquet`: the records of the Arrow build in zstd Parquet shards, read back by
every command (`load_splits`), streamed by row group (`ParquetSplit`) and trained on by `train.py --streaming`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dataset_builder import build_dataset
from dataset_builder import builder as builder_module
from dataset_builder.outputs import folder_kind
from dataset_builder.records import load_split_matrices, load_splits, split_files
from dataset_builder.simulate import SIMULATED_TEST_BATCHES, SIMULATED_VALIDATION_BATCHES, write_simulated
from tokenizer import build_from_dataset, load_tokenizer
from translator.streaming import ArrowSplit, ParquetSplit, StreamingExamples, open_split

SPLITS = {"test_batches": list(SIMULATED_TEST_BATCHES), "validation_batches": list(SIMULATED_VALIDATION_BATCHES), "chunk_size": 128}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The simulated default data built twice, as Arrow and as Parquet (shards closed after every row group)."""
    root = tmp_path_factory.mktemp("formats")
    source = write_simulated(root / "simulated.h5mu")
    build_dataset([source], root / "arrow", **SPLITS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder_module, "PARQUET_SHARD_BYTES", 1)
        meta = build_dataset([source], root / "parquet", file_format="parquet", load=False, **SPLITS)
    build_from_dataset(root / "parquet", root / "tok")
    return root, source, meta


def test_a_parquet_build_holds_the_records_and_metadata_of_the_arrow_build(folders):
    root, _, meta = folders
    arrow, parquet = root / "arrow", root / "parquet"
    assert folder_kind(parquet) == "dataset"
    assert (parquet / "cell_sentences.json").read_text() == (arrow / "cell_sentences.json").read_text()
    assert meta == json.loads((parquet / "cell_sentences.json").read_text())
    kind, files = split_files(parquet, "train")
    n_rows = meta["splits"]["train"]
    assert kind == "parquet" and len(files) == -(-n_rows // 128) > 1  # a shard a chunk of 128 cells (the shard size is patched to 1 byte)
    assert open_split(parquet, "train").batch_start.tolist() == list(range(0, n_rows, 64)) + [n_rows]  # row groups of 64 cells
    assert [f.name for f in files] == [f"data-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
    first = pq.ParquetFile(files[0]).metadata
    assert first.num_row_groups == 2 and first.num_rows == 128 and first.row_group(0).column(0).compression == "ZSTD"
    loaded_arrow, loaded_parquet = load_splits(arrow), load_splits(parquet)
    assert list(loaded_parquet) == list(loaded_arrow) == ["train", "validation", "test"]
    for split in loaded_arrow:
        assert loaded_parquet[split].features == loaded_arrow[split].features
        assert loaded_parquet[split].data.table.to_pydict() == loaded_arrow[split].data.table.to_pydict()
    a, p = load_split_matrices(arrow, "validation"), load_split_matrices(parquet, "validation")
    assert (a["gex"] != p["gex"]).nnz == 0 and (a["atac"] != p["atac"]).nnz == 0 and a["cells"] == p["cells"]


def test_an_empty_parquet_split_loads_as_an_empty_table_of_the_same_columns(folders, tmp_path):
    root, source, _ = folders
    build_dataset([source], tmp_path / "parquet", test_batches=list(SIMULATED_TEST_BATCHES), no_validation=True, file_format="parquet", load=False)
    splits = load_splits(tmp_path / "parquet")
    assert len(splits["validation"]) == 0 and len(splits["train"]) > 0
    assert splits["validation"].features == load_splits(root / "arrow")["validation"].features


def test_a_parquet_split_reads_and_streams_the_cells_of_the_arrow_split(folders):
    root, _, _ = folders
    arrow, parquet = open_split(root / "arrow", "train"), open_split(root / "parquet", "train")
    assert isinstance(arrow, ArrowSplit) and isinstance(parquet, ParquetSplit)
    assert len(arrow) == len(parquet) and arrow.column_names == parquet.column_names
    rows = np.random.default_rng(0).permutation(len(arrow))[:90]
    assert parquet.read(rows, ["atac_text", "gex_index"]).to_pydict() == arrow.read(rows, ["atac_text", "gex_index"]).to_pydict()
    sample = parquet.dataset(rows[:10])
    assert sample["cell"] == arrow.read(rows[:10], ["cell"]).column("cell").to_pylist()
    tokenizer = load_tokenizer(root / "tok")
    for rank in (0, 1):
        streams = [StreamingExamples(split, tokenizer, 8, seed=5, rank=rank, world_size=2, max_source_length=48, max_target_length=32)
                   for split in (arrow, parquet)]
        batches = [list(stream) for stream in streams]
        assert len(batches[0]) == len(batches[1]) == len(streams[0]) > 0
        assert all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(*batches, strict=True))


def test_train_py_streams_a_parquet_dataset_to_a_model_folder(folders, tmp_path):
    import train
    from tests.translator_fixtures import tiny_args
    from translator import CellTranslator

    root, _, _ = folders
    out = tmp_path / "model"
    assert train.main(tiny_args(root / "parquet", root / "tok", out, "--streaming", "--streaming_sample_cells", "60", "--max_steps", "6",
                                "--cpu_threads", "1")) == 0
    assert folder_kind(out) == "model"
    predicted = CellTranslator.from_pretrained(out).predict_matrix(load_splits(root / "parquet", ["test"])["test"]["gex_text"][:3], "gex2atac")
    assert predicted.shape[0] == 3


def test_the_cli_writes_parquet_and_refuses_an_unknown_format(folders, tmp_path, capsys):
    from dataset_builder.__main__ import main as cli

    root, source, _ = folders
    assert cli(["--input", str(source), "--output_dir", str(tmp_path / "cli"), "--file_format", "parquet",
                "--test_batches", *SIMULATED_TEST_BATCHES]) == 0
    assert split_files(tmp_path / "cli", "train")[0] == "parquet"
    assert cli(["--input", str(source), "--output_dir", str(tmp_path / "other"), "--file_format", "feather"]) == 2
    assert "--file_format" in capsys.readouterr().err
    assert not Path(tmp_path / "other").exists()
