"""Training examples from a dataset folder: token ids with length caps, a length-grouped sampler, a collator.

Every cell gives one example per direction: ``<gex2atac> gex_text </s> -> atac_text </s>`` and
``<atac2gex> atac_text </s> -> gex_text </s>``. Caps keep steps bounded:

- a GEX sentence longer than its cap keeps its first (top-ranked) genes;
- an ATAC sentence longer than its cap keeps an evenly spaced, deterministic subsample, so every
  chromosome stays represented (cutting a genomic-order sentence would drop the last chromosomes).
  Prefer ``--top_peaks`` at dataset build time, which keeps whole informative peaks instead.

Batches hold one direction each (so one target range scores the whole batch) and cells of
similar length (little padding); their order depends only on ``(seed, epoch)``, which makes a
resumed run see the same batches as a straight one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tokenizer import DIRECTIONS, PREFIX, SOURCE_MODALITY, TARGET_MODALITY, encode_names, feature_token_ranges

SOURCE_COLUMN = {"gex2atac": "gex_text", "atac2gex": "atac_text"}
TARGET_COLUMN = {"gex2atac": "atac_text", "atac2gex": "gex_text"}


def cap_names(ids: np.ndarray, cap: int, modality: str) -> np.ndarray:
    """Keep at most ``cap`` name ids: the first ones for GEX (top ranks), an even subsample for ATAC."""
    if cap < 0:
        raise ValueError(f"a sentence cap must be >= 0, got {cap}")
    if len(ids) <= cap:
        return ids
    if modality == "gex":
        return ids[:cap]
    keep = np.unique(np.linspace(0, len(ids) - 1, cap).round().astype(np.int64))
    return ids[keep]


def names_to_ids(tokenizer, sentences: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each sentence's names (no prefix, no ``</s>``); raises on names the tokenizer does not know."""
    sentences = list(sentences)
    if not sentences:
        return []
    out = encode_names(tokenizer, sentences)
    unk = tokenizer.unk_token_id
    for i, ids in enumerate(out):
        if (ids == unk).any():
            raise ValueError(
                f"sentence {i} holds names unknown to the tokenizer; the dataset was built for another vocabulary "
                "(rebuild the tokenizer with `python -m tokenizer --dataset DIR --output_dir TOK`)"
            )
    return out


def source_ids(names: np.ndarray, direction: str, tokenizer, max_source_length: int) -> np.ndarray:
    """``<prefix> names... </s>`` with the names capped to ``max_source_length - 2``."""
    prefix = tokenizer.convert_tokens_to_ids(PREFIX[direction])
    names = cap_names(names, max(0, max_source_length - 2), SOURCE_MODALITY[direction])
    return np.concatenate([[prefix], names, [tokenizer.eos_token_id]]).astype(np.int64)


GEX_TARGET_ORDERS = ("rank", "gene")


def check_gex_target_cap(max_gex_target_length: int, max_target_length: int) -> None:
    """``--max_gex_target_length`` is 0 (off) or in ``[2, max_target_length]``."""
    if max_gex_target_length != 0 and not 2 <= max_gex_target_length <= max_target_length:
        raise ValueError(f"--max_gex_target_length must be 0 (off) or between 2 and --max_target_length ({max_target_length}), got {max_gex_target_length}")


def check_gex_target_min_value(gex_target_min_value: float) -> None:
    """``--gex_target_min_value`` is 0 (off) or a positive, finite log-norm value."""
    if not (np.isfinite(gex_target_min_value) and gex_target_min_value >= 0):
        raise ValueError(f"--gex_target_min_value must be 0 (off) or a positive log-norm value such as 2.0, got {gex_target_min_value}")


def target_ids(names: np.ndarray, direction: str, tokenizer, max_target_length: int, gex_target_order: str = "rank") -> np.ndarray:
    """``names... </s>`` with the names capped to ``max_target_length - 1``.

    With ``gex_target_order="gene"`` a GEX target keeps its top-ranked genes (the same cap) but lists them
    in gene order (increasing token id), like ATAC's genomic order: a set to name rather than a ranking.
    """
    if gex_target_order not in GEX_TARGET_ORDERS:
        raise ValueError(f"--gex_target_order must be one of {', '.join(GEX_TARGET_ORDERS)}, got {gex_target_order!r}")
    names = cap_names(names, max(0, max_target_length - 1), TARGET_MODALITY[direction])
    if gex_target_order == "gene" and TARGET_MODALITY[direction] == "gex":
        names = np.sort(names)
    return np.concatenate([names, [tokenizer.eos_token_id]]).astype(np.int64)


def estimated_counts(log_norm: Sequence[float]) -> np.ndarray:
    """A cell's UMI counts from its detected genes' ``log1p(counts / size_factor)`` values (float32, same order).

    ``expm1`` of the values is ``counts / size_factor``; the least expressed detected gene of a cell nearly always
    has one count, so dividing by the smallest ``expm1`` and rounding recovers the counts (exactly when it has one).
    """
    scaled = np.expm1(np.asarray(log_norm, dtype=np.float64))
    if not len(scaled):
        return np.zeros(0, dtype=np.float32)
    return np.maximum(np.rint(scaled / scaled.min()), 1).astype(np.float32)


class TranslationExamples(Dataset):
    """Both directions of every cell of one split, as token ids.

    Parameters
    ----------
    split
        A ``datasets.Dataset`` with ``gex_text`` and ``atac_text`` columns.
    tokenizer
        The project tokenizer (``tokenizer.load_tokenizer``).
    directions
        Subset of ``("gex2atac", "atac2gex")``.
    max_source_length, max_target_length
        Caps in tokens, prefix and ``</s>`` included.
    gex_target_order
        ``rank`` (GEX targets in descending expression, as the dataset writes them) or ``gene``
        (the same capped genes in gene order); GEX sources always keep rank order.
    max_gex_target_length
        A shorter cap for GEX targets (``atac2gex``) only, in tokens with ``</s>``; 0: ``max_target_length``.
        Short GEX targets (the top-expressed genes) weigh the profile loss more against the sentence loss.
    gex_target_min_value
        GEX targets (``atac2gex``) keep only the genes with log-norm value >= this (0: off): a prefix of the
        rank-order sentence whose length varies by cell, the gene set of the paper's binary sentence (at 2.0)
        in rank order. Needs the ``gex_index``/``gex_value`` columns; combines with ``max_gex_target_length``.
    source_counts
        Also keep, for each GEX source (``gex2atac``), the estimated UMI count of each name it holds
        (:func:`estimated_counts`), given to the collator as ``source_counts`` for the count down-sampling
        augmentation (``TranslationLoss(gex_source_downsample=...)``). Needs the ``gex_value`` column.
    """

    def __init__(self, split, tokenizer, directions: Sequence[str] = DIRECTIONS, max_source_length: int = 512, max_target_length: int = 512,
                 gex_target_order: str = "rank", max_gex_target_length: int = 0, gex_target_min_value: float = 0.0, source_counts: bool = False):
        for direction in directions:
            if direction not in DIRECTIONS:
                raise ValueError(f"--directions {direction!r} is unknown; choose from {', '.join(DIRECTIONS)}")
        if max_source_length < 3 or max_target_length < 2:
            raise ValueError("--max_source_length must be >= 3 and --max_target_length >= 2")
        check_gex_target_cap(max_gex_target_length, max_target_length)
        check_gex_target_min_value(gex_target_min_value)
        ranges = feature_token_ranges(tokenizer)
        names = {"gex_text": names_to_ids(tokenizer, split["gex_text"]), "atac_text": names_to_ids(tokenizer, split["atac_text"])}
        self.sources: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.directions: list[int] = []
        # The whole target profile of each cell, uncapped, for the profile readout: feature positions
        # within the target range and their values (GEX log-norm of every detected gene; ATAC 1).
        self.profiles: list[tuple[np.ndarray, np.ndarray]] = []
        self.ranges = [ranges[TARGET_MODALITY[d]] for d in DIRECTIONS]
        gex_profiles = None
        columns = split.column_names if hasattr(split, "column_names") else list(split)
        if "atac2gex" in directions and gex_target_min_value > 0 and not {"gex_index", "gex_value"} <= set(columns):
            raise ValueError("--gex_target_min_value needs the dataset's gex_index/gex_value columns; rebuild it with `python -m dataset_builder`")
        if source_counts and "gex2atac" in directions and "gex_value" not in columns:
            raise ValueError("--gex_source_downsample needs the dataset's gex_value column; rebuild it with `python -m dataset_builder`")
        self.source_counts: list[np.ndarray] | None = [] if source_counts and "gex2atac" in directions else None
        cell_counts = [estimated_counts(v) for v in split["gex_value"]] if self.source_counts is not None else None
        if "atac2gex" in directions and "gex_index" in columns:
            gex_profiles = [(np.asarray(ix, dtype=np.int64), np.asarray(v, dtype=np.float32)) for ix, v in zip(split["gex_index"], split["gex_value"], strict=True)]
        for direction in directions:
            code = DIRECTIONS.index(direction)
            start = self.ranges[code][0]
            cap = max_gex_target_length if direction == "atac2gex" and max_gex_target_length else max_target_length
            for i, (src, tgt) in enumerate(zip(names[SOURCE_COLUMN[direction]], names[TARGET_COLUMN[direction]], strict=True)):
                if direction == "atac2gex" and gex_target_min_value > 0:
                    # gex_value is in the sentence's (descending) order: the genes at or above the value are a prefix.
                    tgt = tgt[: int(np.count_nonzero(gex_profiles[i][1] >= gex_target_min_value))]
                self.sources.append(source_ids(src, direction, tokenizer, max_source_length))
                if self.source_counts is not None:
                    # GEX sources keep their top-ranked names (a prefix), so the first len - 2 values are theirs.
                    counts = cell_counts[i] if direction == "gex2atac" else np.zeros(0, dtype=np.float32)
                    if direction == "gex2atac" and len(counts) != len(src):
                        raise ValueError(f"--gex_source_downsample needs rank-order GEX sentences of every detected gene (cell {i}: {len(src)} names, "
                                         f"{len(counts)} values); build the dataset with --gex_encoding rank")
                    self.source_counts.append(counts[: len(self.sources[-1]) - 2])
                self.targets.append(target_ids(tgt, direction, tokenizer, cap, gex_target_order))
                self.directions.append(code)
                if direction == "atac2gex" and gex_profiles is not None:
                    self.profiles.append(gex_profiles[i])
                else:
                    self.profiles.append(((tgt - start).astype(np.int64), np.ones(len(tgt), dtype=np.float32)))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        example = {"source": self.sources[index], "target": self.targets[index], "direction": self.directions[index], "profile": self.profiles[index]}
        if self.source_counts is not None:
            example["source_counts"] = self.source_counts[index]
        return example

    @property
    def lengths(self) -> np.ndarray:
        """Source plus target tokens of each example."""
        return np.array([len(s) + len(t) for s, t in zip(self.sources, self.targets, strict=True)], dtype=np.int64)

    def n_tokens(self) -> int:
        return int(self.lengths.sum())


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of one direction and similar lengths, shuffled by ``(seed, epoch)``.

    Indices of each direction are shuffled, cut into mega-batches of ``batch_size * group_factor``,
    sorted by length inside each mega-batch and cut into batches; the batch order is shuffled.
    With ``num_shards`` processes the last ``len % num_shards`` batches are dropped, so that every
    process gets the same number of whole batches. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        directions: Sequence[int],
        batch_size: int,
        seed: int = 0,
        group_factor: int = 50,
        shuffle: bool = True,
        num_shards: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.directions = np.asarray(directions)
        self.batch_size = batch_size
        self.seed = seed
        self.group_factor = group_factor
        self.shuffle = shuffle
        self.num_shards = num_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        mega = self.batch_size * self.group_factor
        for code in np.unique(self.directions):
            idx = np.flatnonzero(self.directions == code)
            if self.shuffle:
                idx = rng.permutation(idx)
            for begin in range(0, len(idx), mega):
                group = idx[begin : begin + mega]
                group = group[np.argsort(-self.lengths[group], kind="stable")]
                batches.extend(group[i : i + self.batch_size].tolist() for i in range(0, len(group), self.batch_size))
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches[: len(batches) - len(batches) % self.num_shards]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        mega = self.batch_size * self.group_factor
        total = 0
        for code in np.unique(self.directions):
            n = int((self.directions == code).sum())
            full, rest = divmod(n, mega)
            total += full * -(-mega // self.batch_size) + -(-rest // self.batch_size)
        return total - total % self.num_shards


@dataclass
class TranslationCollator:
    """Pads a list of examples of one direction: ``input_ids``/``attention_mask`` with 0, ``labels`` with -100; the target
    names' id range is ``target_start`` / ``target_stop`` (Python ints).

    Examples that carry a ``profile`` also give ``profile_values`` ``[B, n_features]`` (dense, zeros elsewhere);
    GEX-source examples that carry ``source_counts`` give ``source_counts`` ``[B, source length]`` (each name's count
    at its position, 0 at the prefix, ``</s>`` and padding).
    """

    ranges: Sequence[tuple[int, int]]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        codes = {ex["direction"] for ex in examples}
        if len(codes) != 1:
            raise ValueError("a batch mixes directions; use LengthGroupedBatchSampler")
        start, stop = self.ranges[codes.pop()]
        src_len = max(len(ex["source"]) for ex in examples)
        tgt_len = max(len(ex["target"]) for ex in examples)
        input_ids = torch.zeros(len(examples), src_len, dtype=torch.long)
        attention_mask = torch.zeros(len(examples), src_len, dtype=torch.long)
        labels = torch.full((len(examples), tgt_len), -100, dtype=torch.long)
        for row, ex in enumerate(examples):
            input_ids[row, : len(ex["source"])] = torch.from_numpy(ex["source"])
            attention_mask[row, : len(ex["source"])] = 1
            labels[row, : len(ex["target"])] = torch.from_numpy(ex["target"])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "target_start": int(start),  # ints, not tensors: reading the range on a GPU would wait for the device
            "target_stop": int(stop),
        }
        if all("profile" in ex for ex in examples):
            values = torch.zeros(len(examples), stop - start, dtype=torch.float32)
            for row, ex in enumerate(examples):
                index, value = ex["profile"]
                values[row, torch.from_numpy(index)] = torch.from_numpy(value)
            batch["profile_values"] = values
        if all("source_counts" in ex for ex in examples) and any(len(ex["source_counts"]) for ex in examples):
            counts = torch.zeros(len(examples), src_len, dtype=torch.float32)
            for row, ex in enumerate(examples):
                counts[row, 1 : 1 + len(ex["source_counts"])] = torch.from_numpy(ex["source_counts"])
            batch["source_counts"] = counts
        return batch
