"""Training examples streamed from a split's record files: only the cells of one window are ever in memory.

The in-memory path (:class:`translator.data.TranslationExamples` over a whole split) holds every cell's token ids;
this one reads a split's files (the Arrow stream files of the ``save_to_disk`` layout that ``python -m dataset_builder``
writes, or the Parquet shards of its ``--file_format parquet``)
a window of cells at a time, tokenizes them on the fly and yields collated batches. Use it for splits larger than
memory and for many processes or machines.

An epoch, for ``world_size`` processes:

1. the split's rows are cut into blocks of ``block_cells`` contiguous rows, and the blocks are put in an order
   drawn from ``(seed, epoch)`` (blocks keep the reads contiguous on disk);
2. the rows in that order are cut into ``world_size`` contiguous shares whose sizes differ by at most one cell:
   every process reads a disjoint share, and together they read every cell exactly once;
3. each process cuts its share into windows of ``group_factor`` batches, shuffles each window's cells, builds
   both directions' examples, sorts each direction by length and cuts it into batches (one direction each,
   little padding), and yields the window's batches in an order drawn from ``(seed, epoch, rank, window)``.

Every process yields the same number of batches per epoch (DDP steps together): the shares' batches are sized
so that a share one cell shorter gets one cell fewer in a batch, never a batch fewer. The position in the stream
is ``(epoch, batches yielded)``; :meth:`StreamingExamples.state_dict` saves it and a restored stream continues
with exactly the batches an uninterrupted one would have yielded, reading only the window it resumes in.

``datasets.IterableDataset`` (``to_iterable_dataset`` + ``split_dataset_by_node``) does not meet these needs:
its shuffle buffer's content is lost on resume (``IterableDataset.state_dict``'s documentation says so) and its
per-node shares may differ by whole batches, on which DDP ranks wait for each other forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset_builder.records import split_files
from tokenizer import DIRECTIONS

from .data import TranslationCollator, TranslationExamples

STRING_COLUMNS = ("gex_text", "atac_text")
LIST_COLUMNS = ("gex_index", "gex_value")
READ_CELLS = 256


class SplitFiles:
    """Rows of one split's record files, read by row index; a subclass indexes its files' record batches (``batch_file``,
    ``batch_start``) and reads one of them (:meth:`_read_batch`)."""

    files: list[Path]
    schema: pa.Schema
    batch_file: np.ndarray
    batch_start: np.ndarray

    def __len__(self) -> int:
        return int(self.batch_start[-1])

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def _read_batch(self, b: int, columns: list[str], sources: dict) -> pa.Table:
        """Record batch ``b`` of the split, only ``columns``; ``sources``: the files opened so far, closed by :meth:`read`."""
        raise NotImplementedError

    def read(self, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Rows ``rows`` (indices into the split, any order) of ``columns``, as a table in that order, copied out of the files."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)})")
        order = np.argsort(rows, kind="stable")  # read each record batch once, in file order
        batch_of = np.searchsorted(self.batch_start, rows[order], side="right") - 1
        pieces, sources = [], {}
        try:
            for b in np.unique(batch_of):
                batch = self._read_batch(int(b), list(columns), sources)
                pieces.append(batch.take(pa.array(rows[order][batch_of == b] - self.batch_start[b])))
            schema = pa.schema([self.schema.field(name) for name in columns])
            table = pa.concat_tables(pieces).cast(schema) if pieces else schema.empty_table()
            # take() copied the rows out of the maps: closing them unmaps the pages read, so they leave the RSS.
            return table.take(pa.array(np.argsort(order, kind="stable")))
        finally:
            for source in sources.values():
                source.close()

    def dataset(self, rows: np.ndarray):
        """Rows ``rows`` of every column as an in-memory ``datasets.Dataset`` (e.g. an evenly spaced sample of the split)."""
        import datasets

        table = self.read(rows, self.column_names)
        return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(table.schema)))


class ArrowSplit(SplitFiles):
    """Rows of one split's Arrow stream files (the ``save_to_disk`` layout); a file is memory-mapped only while it is read.

    Parameters
    ----------
    files
        The split's Arrow stream files in row order (``data-00000-of-0000N.arrow``).

    Opening indexes the record batches (their byte offsets and row counts) from the files' message headers,
    without reading the cells.
    """

    def __init__(self, files: Sequence[str | Path]):
        if not files:
            raise ValueError("an Arrow split needs at least one file")
        self.files = [Path(f) for f in files]
        self.schema: pa.Schema | None = None
        file_of, offsets, lengths = [], [], []
        for i, path in enumerate(self.files):
            try:
                with pa.memory_map(str(path)) as source:
                    reader = pa.ipc.open_stream(source)
                    if self.schema is not None and not reader.schema.equals(self.schema):
                        raise ValueError(f"{path}: its columns differ from those of {self.files[0]}; rebuild the dataset with `python -m dataset_builder`")
                    self.schema = reader.schema
                    while True:
                        position = source.tell()
                        try:
                            batch = reader.read_next_batch()
                        except StopIteration:
                            break
                        file_of.append(i)
                        offsets.append(position)
                        lengths.append(batch.num_rows)
            except (OSError, pa.ArrowInvalid) as err:
                raise ValueError(f"{path} is not an Arrow stream file ({err}); give a dataset folder written by `python -m dataset_builder`") from None
        self.batch_file = np.asarray(file_of, dtype=np.int64)
        self.batch_offset = np.asarray(offsets, dtype=np.int64)
        self.batch_start = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def _read_batch(self, b: int, columns: list[str], sources: dict) -> pa.Table:
        file = int(self.batch_file[b])
        if file not in sources:
            sources[file] = pa.memory_map(str(self.files[file]))
        source = sources[file]
        source.seek(int(self.batch_offset[b]))
        return pa.Table.from_batches([pa.ipc.read_record_batch(pa.ipc.read_message(source), self.schema).select(columns)])


class ParquetSplit(SplitFiles):
    """Rows of one split's Parquet files, read by whole row groups (``python -m dataset_builder --file_format parquet``
    writes row groups of 64 cells, the streamed blocks); opening reads only the files' footers, once.

    Parameters
    ----------
    files
        The split's Parquet files in row order (``data-00000-of-0000N.parquet``).
    """

    def __init__(self, files: Sequence[str | Path]):
        import pyarrow.parquet as pq

        if not files:
            raise ValueError("a Parquet split needs at least one file")
        self.files = [Path(f) for f in files]
        self.schema = None
        file_of, groups, lengths, self.metadata = [], [], [], []
        for i, path in enumerate(self.files):
            try:
                parquet = pq.ParquetFile(path)
                self.metadata.append(parquet.metadata)
            except (OSError, pa.ArrowInvalid) as err:
                raise ValueError(f"{path} is not a Parquet file ({err}); give a dataset folder written by `python -m dataset_builder`") from None
            schema = parquet.schema_arrow
            if self.schema is not None and not schema.equals(self.schema):
                raise ValueError(f"{path}: its columns differ from those of {self.files[0]}; rebuild the dataset with `python -m dataset_builder`")
            self.schema = schema
            for g in range(parquet.metadata.num_row_groups):
                file_of.append(i)
                groups.append(g)
                lengths.append(parquet.metadata.row_group(g).num_rows)
        self.batch_file = np.asarray(file_of, dtype=np.int64)
        self.batch_group = np.asarray(groups, dtype=np.int64)
        self.batch_start = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def _read_batch(self, b: int, columns: list[str], sources: dict) -> pa.Table:
        import pyarrow.parquet as pq

        file = int(self.batch_file[b])
        if file not in sources:
            sources[file] = pq.ParquetFile(self.files[file], metadata=self.metadata[file])
        return sources[file].read_row_group(int(self.batch_group[b]), columns=columns)


def open_split(dataset_dir: str | Path, split: str = "train") -> SplitFiles:
    """The split ``split`` of a dataset folder from ``python -m dataset_builder``: its Arrow stream files (``DIR/split/state.json``
    lists them) or its Parquet files (``--file_format parquet``)."""
    kind, files = split_files(dataset_dir, split)
    return ArrowSplit(files) if kind == "arrow" else ParquetSplit(files)


def table_columns(table: pa.Table) -> dict[str, list]:
    """The columns :class:`translator.data.TranslationExamples` reads: sentences as ``str``, list columns as one array per cell."""
    out: dict[str, list] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name in LIST_COLUMNS:
            values = np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False))  # writable: torch.from_numpy warns on read-only
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
            out[name] = np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
        else:
            out[name] = column.to_pylist()
    return out


def share_bounds(n_cells: int, world_size: int) -> np.ndarray:
    """Start and end (``world_size + 1`` values) of each process's contiguous share of ``n_cells``; sizes differ by at most one."""
    return (np.arange(world_size + 1, dtype=np.int64) * n_cells) // world_size


def batch_sizes(n_cells: int, n_batches: int, batch_size: int) -> np.ndarray:
    """Sizes of ``n_batches`` batches of at most ``batch_size`` that hold ``n_cells``: full batches, the shortfall taken from the last ones."""
    if not n_batches <= n_cells <= n_batches * batch_size:
        raise ValueError(f"{n_cells} cells cannot fill {n_batches} batches of 1 to {batch_size} cells")
    sizes = np.full(n_batches, batch_size, dtype=np.int64)
    shortfall = n_batches * batch_size - n_cells
    for i in range(n_batches - 1, -1, -1):
        if not shortfall:
            break
        take = min(shortfall, batch_size - 1)
        sizes[i] -= take
        shortfall -= take
    return sizes


class StreamingExamples(IterableDataset):
    """Collated training batches of one process's share of a split, streamed from its files.

    Parameters
    ----------
    split
        The split's files (:class:`ArrowSplit` or :class:`ParquetSplit`, e.g. ``open_split(DIR, "train")``).
    tokenizer
        The project tokenizer.
    batch_size
        Cells per batch (per process).
    seed
        Seed of the block order and the shuffles; each epoch (:meth:`set_epoch`) draws a new order from ``(seed, epoch)``.
    rank, world_size
        This process's index and the number of processes (``accelerator.process_index``, ``accelerator.num_processes``).
    directions
        Directions of the examples (each cell gives one example per direction).
    group_factor
        Batches per direction in a window: the cells shuffled, length-sorted and batched together.
    block_cells
        Contiguous rows read together; the epoch's order shuffles blocks, each window shuffles its cells. A Parquet
        split's row groups are this size (``dataset_builder --file_format parquet`` writes 64).
    read_cells
        Cells turned into Python strings and tokenized at a time while a window is built (the window's cells are
        read from the files in one call; its text is freed once tokenized).
    shuffle
        False: the split's row order, batches in window order (still length-grouped).
    **example_args
        Caps and target options of :class:`translator.data.TranslationExamples` (``max_source_length``,
        ``max_target_length``, ``gex_target_order``, ``max_gex_target_length``, ``gex_target_min_value``,
        ``source_counts``).

    Iterating yields the batches of :class:`translator.data.TranslationCollator` (use ``DataLoader(stream,
    batch_size=None)``); ``len`` is the number of batches per epoch, the same on every process.
    """

    def __init__(self, split: SplitFiles, tokenizer, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 directions: Sequence[str] = DIRECTIONS, group_factor: int = 50, block_cells: int = 64, read_cells: int = READ_CELLS, shuffle: bool = True,
                 **example_args):
        if min(batch_size, group_factor, block_cells, read_cells) < 1:
            raise ValueError(f"batch size, group factor, block and read sizes must be >= 1, got {batch_size}, {group_factor}, {block_cells}, {read_cells}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.split, self.tokenizer = split, tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.directions = list(directions)
        self.group_factor, self.block_cells, self.read_cells, self.shuffle = group_factor, block_cells, read_cells, shuffle
        self.example_args = example_args
        self.columns = [c for c in (*STRING_COLUMNS, *LIST_COLUMNS) if c in split.column_names]
        if not set(STRING_COLUMNS) <= set(self.columns):
            raise ValueError(f"the split's files have no {' / '.join(sorted(set(STRING_COLUMNS) - set(self.columns)))} column; rebuild the dataset with `python -m dataset_builder`")
        # The directions, caps and needed columns are checked now, on no cells, rather than in the middle of an epoch.
        probe = TranslationExamples({c: [] for c in self.columns}, tokenizer, self.directions, **example_args)
        self.collator = TranslationCollator(probe.ranges)
        n_cells = len(split)
        self.shares = share_bounds(n_cells, world_size)
        self.batches_per_direction = math.ceil(math.ceil(n_cells / world_size) / batch_size)
        share = int(np.diff(self.shares).min())
        if share < self.batches_per_direction:
            raise ValueError(f"{n_cells} train cells cannot give {world_size} processes the same number of batches of {batch_size}: "
                             f"raise --per_device_train_batch_size or use fewer processes")
        self.epoch = 0
        self.position = 0  # batches of this epoch already yielded

    def __len__(self) -> int:
        return len(self.directions) * self.batches_per_direction

    @property
    def n_examples(self) -> int:
        """Examples per epoch over all processes: one per cell and direction."""
        return len(self.directions) * len(self.split)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def skip(self, n_batches: int) -> None:
        """Start the current epoch after its first ``n_batches`` batches (none of them is read)."""
        if not 0 <= n_batches <= len(self):
            raise ValueError(f"cannot skip {n_batches} batches of an epoch of {len(self)}")
        self.position = int(n_batches)

    def state_dict(self) -> dict:
        """The stream's position: the epoch and the batches of it already yielded."""
        return {"epoch": self.epoch, "batches": self.position, "seed": self.seed, "world_size": self.world_size, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same split, seed, batch size and number of processes."""
        mine = self.state_dict()
        changed = [k for k in ("seed", "world_size", "batches_per_epoch") if state[k] != mine[k]]
        if changed:
            raise ValueError(f"the saved stream position was taken with other settings ({', '.join(f'{k} {state[k]} now {mine[k]}' for k in changed)}); "
                             "resume with the dataset, --seed, --per_device_train_batch_size and number of processes it was started with")
        self.epoch = int(state["epoch"])
        self.skip(int(state["batches"]))

    def share_rows(self, epoch: int) -> np.ndarray:
        """Rows of the split this process reads in ``epoch``, in stream order."""
        n = len(self.split)
        if self.shuffle:
            blocks = np.random.default_rng([self.seed, epoch]).permutation(math.ceil(n / self.block_cells))
            rows = (blocks[:, None] * self.block_cells + np.arange(self.block_cells)).ravel()
            rows = rows[rows < n]
        else:
            rows = np.arange(n, dtype=np.int64)
        return rows[self.shares[self.rank] : self.shares[self.rank + 1]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("a streaming dataset is read by one DataLoader worker per process (num_workers 0 or 1); more would repeat its cells")
        rows = self.share_rows(self.epoch)
        sizes = batch_sizes(len(rows), self.batches_per_direction, self.batch_size)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        per_window = len(self.directions) * self.group_factor
        window, skip = divmod(self.position, per_window)
        for first in range(window * self.group_factor, self.batches_per_direction, self.group_factor):
            last = min(first + self.group_factor, self.batches_per_direction)
            parts, groups = self._window(rows[starts[first] : starts[last]], sizes[first:last], first // self.group_factor)
            for group in groups[skip:]:
                self.position += 1
                yield self.collator([parts[p][i] for p, i in group])
            skip = 0

    def _window(self, rows: np.ndarray, sizes: np.ndarray, window: int) -> tuple[list[TranslationExamples], list[list[tuple[int, int]]]]:
        """One window's examples, built ``read_cells`` cells at a time, and its batches as ``(chunk, example)`` pairs, in the order they are yielded.

        The window's cells are read in one call, so each record batch (a Parquet row group is decoded whole) is read once."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, window])
        if self.shuffle:
            rows = rows[rng.permutation(len(rows))]
        table = self.split.read(rows, self.columns)
        parts = [TranslationExamples(table_columns(table.slice(i, self.read_cells)), self.tokenizer, self.directions, **self.example_args)
                 for i in range(0, len(rows), self.read_cells)]
        part = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
        local = np.concatenate([np.arange(len(p)) for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        codes = np.concatenate([np.asarray(p.directions, dtype=np.int64) for p in parts])
        cut = np.cumsum(sizes)[:-1]
        groups = []
        for code in dict.fromkeys(codes.tolist()):
            idx = np.flatnonzero(codes == code)
            groups.extend(np.split(idx[np.argsort(-lengths[idx], kind="stable")], cut))
        order = rng.permutation(len(groups)) if self.shuffle else np.arange(len(groups))
        return parts, [list(zip(part[groups[g]].tolist(), local[groups[g]].tolist(), strict=True)) for g in order]


def sample_rows(n_rows: int, max_cells: int) -> np.ndarray:
    """At most ``max_cells`` evenly spaced rows of ``n_rows``: the train cells a streamed run keeps in memory for the
    steps that read train cells outside the loop (the embeddings' LSI, the head refit)."""
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, max_cells)).round().astype(np.int64)) if n_rows else np.zeros(0, np.int64)


class StreamingLoader(DataLoaderStateMixin):
    """The training loop's loader over a :class:`StreamingExamples`: batches on ``device``, one epoch per iteration.

    Not passed through ``accelerator.prepare`` (that would read the stream on one process and split its batches,
    while here each process reads its own share); it registers with accelerate's gradient state like a prepared
    loader, so that ``accelerator.accumulate`` still steps the optimizer at the end of each epoch.
    ``workers=1`` reads and tokenizes in a worker process, ahead of the training step (on a GPU the step then
    does not wait for the CPU); the batches are the same.
    """

    _drop_last = True

    def __init__(self, stream: StreamingExamples, device: torch.device | str = "cpu", workers: int = 0):
        if workers not in (0, 1):
            raise ValueError(f"a streaming loader reads in the main process (0) or one worker (1), got {workers}")
        self.stream, self.device = stream, device
        self.gradient_state = GradientState()
        # Pinned memory makes the copy to a GPU asynchronous.
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                                 prefetch_factor=4 if workers else None)

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``skip`` batches (a resumed run; they are not read)."""
        self.stream.set_epoch(epoch)
        self.stream.skip(skip)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.begin()
        try:
            # Counted here: a worker advances its own copy of the stream's position.
            seen = self.stream.position
            for batch in self.loader:
                seen += 1
                self.end_of_dataloader = seen == len(self.stream)
                yield send_to_device(batch, self.device, non_blocking=True)
        finally:
            self.end()
