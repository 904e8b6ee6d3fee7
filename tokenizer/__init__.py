"""WordLevel tokenizer over gene and peak names: every name is exactly one token.

Vocabulary order is deterministic: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, one prefix token per
direction (``<gex2atac>`` 3, ``<atac2gex>`` 4), then the genes in the dataset's feature order,
then the peaks in genomic order. Gene and peak tokens therefore form two contiguous id ranges,
which the model uses to restrict its output layer to the target modality.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dataset_builder.outputs import META_FILE, apply_umask, check_output, check_replaceable

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
DIRECTIONS = ("gex2atac", "atac2gex")
PREFIX = {"gex2atac": "<gex2atac>", "atac2gex": "<atac2gex>"}
DIRECTION_NAMES = {"gex2atac": "GEX to ATAC", "atac2gex": "ATAC to GEX"}
SOURCE_MODALITY = {"gex2atac": "gex", "atac2gex": "atac"}
TARGET_MODALITY = {"gex2atac": "atac", "atac2gex": "gex"}
SPECIAL_TOKENS = (PAD, EOS, UNK, PREFIX["gex2atac"], PREFIX["atac2gex"])
# init kwargs that transformers records when it loads a tokenizer from a local folder
LOADING_KWARGS = ("local_files_only", "is_local")

__all__ = [
    "DIRECTIONS",
    "PREFIX",
    "DIRECTION_NAMES",
    "SOURCE_MODALITY",
    "TARGET_MODALITY",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "feature_token_ranges",
    "check_vocabulary",
    "check_same_features",
    "load_tokenizer",
    "save_tokenizer",
    "build_from_dataset",
    "encode_names",
]


def build_tokenizer(genes: Sequence[str], peaks: Sequence[str]) -> PreTrainedTokenizerFast:
    """Make the WordLevel tokenizer for one gene list and one (genomically ordered) peak list.

    Parameters
    ----------
    genes, peaks
        Feature names, in the order of the dataset's ``cell_sentences.json``.

    Returns
    -------
    A ``PreTrainedTokenizerFast`` that splits on whitespace, maps each name to one id and
    appends ``</s>``.
    """
    names = [*SPECIAL_TOKENS, *genes, *peaks]
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"feature name {dup!r} occurs twice among the genes, peaks and special tokens; names must be unique")
    if any(not n or any(c.isspace() for c in n) for n in names):
        raise ValueError("a gene or peak name is empty or holds whitespace; names must be single words")
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[PREFIX[d] for d in DIRECTIONS],
        model_max_length=100_000,
        padding_side="right",
    )


def feature_token_ranges(tokenizer: PreTrainedTokenizerFast, n_genes: int | None = None) -> dict[str, tuple[int, int]]:
    """Half-open token-id ranges of the gene and peak names: ``{"gex": (a, b), "atac": (b, c)}``.

    ``n_genes`` is read from the tokenizer's ``init_kwargs`` when it was saved by :func:`save_tokenizer`.
    """
    if n_genes is None:
        n_genes = tokenizer.init_kwargs.get("n_genes")
        if n_genes is None:
            raise ValueError("the tokenizer does not record n_genes; save it with tokenizer.save_tokenizer or pass n_genes")
    start = len(SPECIAL_TOKENS)
    return {"gex": (start, start + int(n_genes)), "atac": (start + int(n_genes), len(tokenizer))}


def check_vocabulary(tokenizer: PreTrainedTokenizerFast, meta: dict, what: str = "dataset") -> None:
    """Raise a clear error when ``meta`` (a dataset's ``cell_sentences.json``) lists other features than ``tokenizer``."""
    expected = [*SPECIAL_TOKENS, *meta["genes"], *meta["peaks"]]
    vocab = tokenizer.get_vocab()
    if len(vocab) != len(expected) or any(vocab.get(name) != i for i, name in enumerate(expected)):
        missing = sum(name not in vocab for name in expected)
        raise ValueError(
            f"the {what} was built for another vocabulary ({len(expected)} names, {missing} unknown to the tokenizer "
            f"of {len(vocab)}); rebuild the tokenizer with `python -m tokenizer --dataset DIR --output_dir TOK`"
        )


def check_same_features(meta: dict, other: dict, what: str, *, reference: str, fix: str, tokenizers: tuple | None = None) -> None:
    """Raise a one-line ``ValueError`` unless ``other`` lists the same genes and peaks, in the same order, as ``meta``.

    Parameters
    ----------
    meta, other
        ``cell_sentences.json`` contents (or any dict with ``genes`` / ``peaks``); a list ``other`` lacks is not compared.
    what, reference
        Who ``other`` and ``meta`` are, for the message (e.g. ``"--pool MODEL DATA"``, ``"--model's"``).
    fix
        What the user should do instead.
    tokenizers
        ``(tokenizer of meta, tokenizer of other)``: their token ids must agree too.
    """
    for key in ("genes", "peaks"):
        if key in other and list(other[key]) != list(meta[key]):
            raise ValueError(f"{what}: its {key} ({len(other[key])}) differ from {reference} ({len(meta[key])}); {fix}")
    if tokenizers is not None and tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise ValueError(f"{what}: its token ids differ from {reference}; {fix}")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike, meta: dict) -> None:
    """Save ``tokenizer`` and a copy of the dataset metadata so ``AutoTokenizer.from_pretrained`` loads it offline.

    How this tokenizer was last loaded (``local_files_only``, ``is_local``) is not saved: it would bind every later
    load of the folder, on the Hub too, to the local cache.
    """
    for key in LOADING_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.init_kwargs["n_genes"] = len(meta["genes"])
    tokenizer.save_pretrained(output_dir)
    with open(Path(output_dir) / META_FILE, "w") as fh:
        json.dump(meta, fh)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer folder (offline)."""
    if not (Path(path) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json; build one with `python -m tokenizer --dataset DIR --output_dir {path}`")
    return AutoTokenizer.from_pretrained(str(path))


def read_meta(dataset_dir: str | os.PathLike) -> dict:
    """Read a dataset folder's ``cell_sentences.json``."""
    path = Path(dataset_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the dataset with `python -m dataset_builder --output_dir {dataset_dir}`")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not readable JSON ({err}); the dataset folder is incomplete or damaged: "
            f"rebuild it with `python -m dataset_builder --output_dir {dataset_dir} --overwrite_output_dir`"
        ) from None


def build_from_dataset(dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> PreTrainedTokenizerFast:
    """Build and save the tokenizer for a dataset folder; the folder appears whole or not at all."""
    out = Path(output_dir)
    check_output(out, {"--dataset": dataset_dir}, "--output_dir")
    check_replaceable(out, "--output_dir", "tokenizer", overwrite, "--overwrite_output_dir")
    meta = read_meta(dataset_dir)
    tokenizer = build_tokenizer(meta["genes"], meta["peaks"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_tokenizer(tokenizer, tmp, meta)
        apply_umask(tmp)
        if out.exists():
            check_replaceable(out, "--output_dir", "tokenizer", overwrite, "--overwrite_output_dir")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_tokenizer(out)


def encode_names(tokenizer: PreTrainedTokenizerFast, sentences: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each sentence's names (no prefix, no ``</s>``), unknown names as ``<unk>``.

    The same ids as ``tokenizer(sentences, add_special_tokens=False)``, which a WordLevel model over
    whitespace-split names allows us to compute as one vectorized Arrow lookup: several times faster
    than the tokenizers library's per-sentence path on long cell sentences (bench/bench_tokenize.py).
    """
    vocab = getattr(tokenizer, "_cell_sentences_vocab", None)
    if vocab is None or len(vocab) != len(tokenizer):
        names = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        if [i for _, i in names] != list(range(len(names))):
            raise ValueError("the tokenizer's ids are not contiguous; rebuild it with `python -m tokenizer`")
        vocab = pa.array([name for name, _ in names], pa.string())
        tokenizer._cell_sentences_vocab = vocab
    text = pc.utf8_trim_whitespace(pa.array(list(sentences), pa.string()))
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)  # "" would split into [""]
    words = pc.utf8_split_whitespace(text)
    lengths = pc.fill_null(pc.list_value_length(words), 0).to_numpy(zero_copy_only=False)
    ids = pc.fill_null(pc.index_in(pc.list_flatten(words), value_set=vocab), tokenizer.unk_token_id)
    ids = ids.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.split(ids, np.cumsum(lengths)[:-1]) if len(lengths) else []
