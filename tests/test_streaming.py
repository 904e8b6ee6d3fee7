"""Streamed training examples: every cell once per epoch in disjoint shares (also under 2-process gloo), reshuffled by
(seed, epoch), and a restored position that continues with exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.translator_fixtures import make_dataset_and_tokenizer
from tokenizer import load_tokenizer
from translator.data import TranslationExamples
from translator.streaming import StreamingExamples, batch_sizes, open_split

CAPS = {"max_source_length": 24, "max_target_length": 16}


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    """The train split (80 cells) rewritten as 3 Arrow stream files of 7-row record batches, in the save_to_disk layout."""
    import datasets

    root = tmp_path_factory.mktemp("stream")
    data, tok = make_dataset_and_tokenizer(root)
    table = datasets.load_from_disk(str(data))["train"].data.table
    folder = root / "sharded" / "train"
    folder.mkdir(parents=True)
    names = []
    for i, (start, stop) in enumerate([(0, 30), (30, 31), (31, len(table))]):
        names.append(f"data-{i:05d}-of-00003.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(start, stop - start), max_chunksize=7)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return folder.parent, data, load_tokenizer(tok)


def _stream(split_files, **kwargs) -> StreamingExamples:
    folder, _, tokenizer = split_files
    settings = {"batch_size": 8, "seed": 3, "group_factor": 2, "read_cells": 5, **CAPS, **kwargs}
    return StreamingExamples(open_split(folder, "train"), tokenizer, **settings)


def _examples(batch: dict) -> list[tuple[int, ...]]:
    """Each example of a collated batch as its unpadded source ids (prefix, names, </s>)."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def _reference(split_files) -> Counter:
    import datasets

    _, data, tokenizer = split_files
    examples = TranslationExamples(datasets.load_from_disk(str(data))["train"], tokenizer, **CAPS)
    return Counter(tuple(s.tolist()) for s in examples.sources)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(a, b, strict=True))


def test_arrow_split_reads_rows_in_any_order_across_files_and_record_batches(split_files):
    import datasets

    folder, data, _ = split_files
    split = open_split(folder, "train")
    reference = datasets.load_from_disk(str(data))["train"]
    assert len(split) == len(reference) == 80 and len(split.batch_offset) == 5 + 1 + 7  # 30 rows, 1 row, 49 rows in 7-row batches
    rows = np.array([79, 0, 30, 29, 31, 6, 7, 30, 50])
    table = split.read(rows, ["gex_text", "gex_value"])
    assert table.column("gex_text").to_pylist() == [reference[int(r)]["gex_text"] for r in rows]
    assert table.column("gex_value").to_pylist() == [pytest.approx(reference[int(r)]["gex_value"]) for r in rows]
    with pytest.raises(IndexError):
        split.read(np.array([80]), ["gex_text"])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_example_once_per_epoch_in_disjoint_equal_length_shares(split_files, world_size):
    reference = _reference(split_files)
    seen, lengths = Counter(), set()
    for rank in range(world_size):
        stream = _stream(split_files, rank=rank, world_size=world_size)
        stream.set_epoch(1)
        batches = list(stream)
        lengths.add((len(batches), len(stream)))
        for batch in batches:
            assert 1 <= len(batch["input_ids"]) <= 8
            assert len(set(batch["input_ids"][:, 0].tolist())) == 1  # one direction (its prefix) per batch
            seen.update(_examples(batch))
    assert seen == reference  # every example of the split, each exactly once over all processes
    assert len(lengths) == 1 and len({n for pair in lengths for n in pair}) == 1  # every process the same number of batches


def test_each_epoch_draws_a_new_order_from_the_seed(split_files):
    def epoch(seed: int, number: int) -> list[dict]:
        stream = _stream(split_files, seed=seed)
        stream.set_epoch(number)
        return list(stream)

    first, again, second, other_seed = epoch(3, 0), epoch(3, 0), epoch(3, 1), epoch(4, 0)
    assert _same(first, again)
    assert not _same(first, second) and not _same(first, other_seed)
    assert Counter(e for b in first for e in _examples(b)) == Counter(e for b in second for e in _examples(b))


@pytest.mark.parametrize("stop_after", [3, 4, 9])
def test_a_restored_position_continues_with_the_batches_of_an_uninterrupted_run(split_files, stop_after):
    """Stop after k batches (inside a window, at a window's end, in the last window), save the position, restore it
    into a new stream: the rest of the epoch and the next epoch equal an uninterrupted run's, on both processes."""
    for rank in range(2):
        straight = _stream(split_files, rank=rank, world_size=2)
        expected = []
        for number in (0, 1):
            straight.set_epoch(number)
            expected += list(straight)
        cut = _stream(split_files, rank=rank, world_size=2)
        cut.set_epoch(0)
        head = []
        for batch in cut:
            head.append(batch)
            if len(head) == stop_after:
                break
        state = json.loads(json.dumps(cut.state_dict()))  # as a checkpoint stores it
        assert state["epoch"] == 0 and state["batches"] == stop_after
        resumed = _stream(split_files, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        rest = list(resumed)
        resumed.set_epoch(1)
        rest += list(resumed)
        assert _same(head + rest, expected)


def test_batch_sizes_fill_every_batch_and_hold_every_cell():
    for n_cells, n_batches, size in [(80, 10, 8), (79, 10, 8), (71, 10, 8), (10, 10, 8), (26, 4, 8)]:
        sizes = batch_sizes(n_cells, n_batches, size)
        assert len(sizes) == n_batches and sizes.sum() == n_cells and sizes.min() >= 1 and sizes.max() <= size
    with pytest.raises(ValueError, match="cannot fill"):
        batch_sizes(9, 10, 8)


def test_refusals_name_the_fix(split_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no train split"):
        open_split(tmp_path, "train")
    with pytest.raises(ValueError, match="raise --per_device_train_batch_size or use fewer processes"):
        _stream(split_files, batch_size=1, world_size=3)  # 80 cells: shares of 27, 27, 26 cannot all give 27 batches of one cell
    state = _stream(split_files, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size 2 now 1"):
        _stream(split_files).load_state_dict(state)
    import train
    from tests.translator_fixtures import tiny_args

    _, data, _ = split_files
    with pytest.raises(ValueError, match="--streaming_sample_cells must be >= 1, got 0"):
        train.main(tiny_args(data, data.parent / "tok", tmp_path / "out", "--streaming", "--streaming_sample_cells", "0"))
    assert not (tmp_path / "out").exists()


def _gloo_rank(rank: int, world_size: int, port: int, folder: str, tokenizer_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        stream = StreamingExamples(open_split(folder, "train"), load_tokenizer(tokenizer_dir), 8, seed=3, rank=rank,
                                   world_size=world_size, group_factor=2, **CAPS)
        examples = []
        for batch in stream:
            examples += _examples(batch)
            dist.all_reduce(torch.ones(1))  # as DDP's gradient reduction: a rank with fewer batches would hang here
        shares = [None] * world_size
        dist.all_gather_object(shares, examples)
        if rank == 0:
            Path(out).write_text(json.dumps(shares))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_read_disjoint_shares_that_cover_the_split(split_files, tmp_path):
    import socket

    import torch.multiprocessing as mp

    folder, data, _ = split_files
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "shares.json"
    mp.spawn(_gloo_rank, args=(2, port, str(folder), str(data.parent / "tok"), str(out)), nprocs=2, join=True)
    shares = [Counter(tuple(e) for e in share) for share in json.loads(out.read_text())]
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == _reference(split_files)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_marks_the_epochs_last_batch_for_gradient_accumulation(split_files, workers):
    """Each process reads its own share, so the loader is not prepared by accelerate; it still tells accelerate's
    gradient state where an epoch ends (``accumulate`` steps the optimizer there), also in a resumed epoch, and a
    worker process yields the batches the main process would."""
    from accelerate.state import GradientState

    from translator.streaming import StreamingLoader

    loader, state = StreamingLoader(_stream(split_files), workers=workers), GradientState()
    loader.set_epoch(2)
    batches, ends = [], []
    for batch in loader:
        batches.append(batch)
        ends.append(state.end_of_dataloader)
    assert len(ends) == len(loader) and ends == [False] * (len(loader) - 1) + [True]
    assert state.active_dataloader is None
    reference = _stream(split_files)
    reference.set_epoch(2)
    assert _same(batches, list(reference))
    loader.set_epoch(2, skip=len(loader) - 2)
    assert [state.end_of_dataloader for _ in loader] == [False, True]


def test_train_py_streaming_resumes_inside_an_epoch_to_the_same_weights(split_files, tmp_path):
    """train.py --streaming: a run stopped after step 12 and resumed from its checkpoint of step 7 (inside the first
    epoch of 10 batches) reaches step 14 with the weights of an uninterrupted run (checkpoints of step 14 compared; no
    run finishes a model folder: tests/test_multinode.py trains one with --streaming on two processes)."""
    from safetensors.numpy import load_file

    import train
    from tests.translator_fixtures import tiny_args

    _, data, _ = split_files

    def args(out: Path, *extra: str) -> list[str]:
        return tiny_args(data, data.parent / "tok", out, "--streaming", "--streaming_sample_cells", "50", "--max_steps", "20",
                         "--checkpointing_steps", "7", "--eval_steps", "7", "--cpu_threads", "1", *extra)

    assert train.main(args(tmp_path / "straight", "--stop_after_steps", "14")) == 0
    assert train.main(args(tmp_path / "resumed", "--stop_after_steps", "12")) == 0
    step_7 = tmp_path / "resumed" / "checkpoints" / "step_7"
    assert train.main(args(tmp_path / "resumed", "--stop_after_steps", "14", "--resume_from_checkpoint", str(step_7))) == 0
    straight, resumed = (load_file(str(tmp_path / run / "checkpoints" / "step_14" / "model.safetensors")) for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(np.array_equal(straight[k], resumed[k]) for k in straight)
