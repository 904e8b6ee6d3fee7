"""Tokenize benchmark: tokens/s of batched encoding of real MOp sentences (target 2,000,000 tokens/s).

Sentences come from a built MOp dataset (``gex_text`` and ``atac_text`` of the train split; the
dataset is built into /tmp once when ``--dataset`` is not given), the tokenizer from
``tokenizer.build_tokenizer``. Compared, in one process on the same sentences:

- ``tokenizer(texts)`` through transformers (what ``translator/data.py`` calls, ``add_special_tokens=False``),
  then one numpy array a sentence, as ``translator.data.names_to_ids`` does;
- ``tokenizer(texts, padding=True, return_tensors="np")``;
- the raw ``tokenizers`` ``Tokenizer.encode_batch`` and ``encode_batch_fast`` (no offsets), ids read out;
- each with ``TOKENIZERS_PARALLELISM`` on and off (the tests set it off).

    python bench/bench_tokenize.py [--dataset DIR] [--repeat 5]
    python bench/bench_tokenize.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

TARGET_TOKENS_PER_S = 2_000_000
MOP_DATASET_CACHE = Path(tempfile.gettempdir()) / "bench_mop_dataset"


def mop_sentences(dataset: Path | None, quick: bool) -> tuple[list[str], list[str], list[str], list[str], str]:
    """(gex_texts, atac_texts, genes, peaks, where) from a built dataset, or from encode_cells on a few MOp cells (--quick)."""
    import json

    if quick and dataset is None:
        from dataset_builder.readers import read_paired
        from dataset_builder.sentences import encode_cells, library_size_factors

        paired = read_paired([common.MOP_H5MU])
        gex, atac = paired.gex[:300], paired.atac[:300]
        cols = encode_cells(gex, atac, library_size_factors(gex), pa.array(paired.genes), pa.array(paired.peaks))
        return cols["gex_text"].to_pylist(), cols["atac_text"].to_pylist(), paired.genes, paired.peaks, "encode_cells on 300 MOp cells"
    if dataset is None:
        dataset = MOP_DATASET_CACHE
        if not (dataset / "cell_sentences.json").exists():
            from dataset_builder import build_dataset

            print(f"building the MOp dataset into {dataset} (once)")
            build_dataset([common.MOP_H5MU], dataset, test_batches=["09K", "09L"], validation_batches=["09J"], overwrite=True)
    if not (dataset / "cell_sentences.json").exists():
        raise FileNotFoundError(f"--dataset {dataset}: no cell_sentences.json; build it with `python -m dataset_builder --output_dir {dataset}`")
    import datasets

    train = datasets.load_from_disk(str(dataset))["train"]
    meta = json.loads((dataset / "cell_sentences.json").read_text())
    return list(train["gex_text"]), list(train["atac_text"]), meta["genes"], meta["peaks"], f"train split of {dataset}"


def _variants(tok):
    from tokenizers import Tokenizer

    # A private copy: transformers leaves padding switched on in its backend after a padded call.
    core = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.no_padding()
    core.no_truncation()
    vocab = tok.get_vocab()
    unk = tok.unk_token_id
    vocab_array = pa.array(sorted(vocab, key=vocab.get), pa.string())

    def transformers_lists(texts):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return sum(len(x) for x in ids)

    def transformers_names_to_ids(texts):
        # What translator.data.names_to_ids did before tokenizer.encode_names: one numpy array per sentence.
        ids = [np.asarray(x, dtype=np.int64) for x in tok(texts, add_special_tokens=False)["input_ids"]]
        return sum(x.size for x in ids)

    def encode_names_path(texts):
        # What translator.data.names_to_ids does now (tokenizer.encode_names): one Arrow lookup a batch.
        from tokenizer import encode_names

        return sum(x.size for x in encode_names(tok, texts))

    def transformers_padded_np(texts):
        enc = tok(texts, padding=True, return_tensors="np")
        return int(enc["attention_mask"].sum())

    def raw_encode_batch(texts):
        return sum(len(e.ids) for e in core.encode_batch(texts, add_special_tokens=False))

    def raw_encode_batch_fast(texts):
        return sum(len(e.ids) for e in core.encode_batch_fast(texts, add_special_tokens=False))

    def python_split_dict(texts):
        # The same WordLevel lookup in plain Python: one split of the joined batch, one dict lookup a name.
        lengths = np.fromiter((t.count(" ") + 1 if t else 0 for t in texts), dtype=np.int64, count=len(texts))
        ids = np.fromiter((vocab.get(w, unk) for w in " ".join(texts).split()), dtype=np.int64)
        return int(lengths.sum()) if ids.size == lengths.sum() else -1

    def pyarrow_split_index_in(texts):
        # Vectorized in Arrow's C++: split every sentence, look each name up in a hash table of the vocabulary.
        names = pc.split_pattern(pa.array(texts, pa.string()), " ")
        ids = pc.fill_null(pc.index_in(pc.list_flatten(names), value_set=vocab_array), unk)
        offsets = names.offsets.to_numpy()
        return int(offsets[-1] - offsets[0]) if len(ids) == offsets[-1] - offsets[0] else -1

    return {
        "transformers_call_lists": transformers_lists,
        "transformers_call_names_to_ids": transformers_names_to_ids,
        "transformers_call_padded_numpy": transformers_padded_np,
        "tokenizers_encode_batch": raw_encode_batch,
        "tokenizers_encode_batch_fast": raw_encode_batch_fast,
        "python_split_dict_lookup": python_split_dict,
        "pyarrow_split_index_in": pyarrow_split_index_in,
        "tokenizer_encode_names": encode_names_path,
    }


def _time(fn, batches, repeat: int) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        tokens = sum(fn(b) for b in batches)
        best = min(best, time.perf_counter() - t)
    return best, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Tokenize benchmark (see the module docstring).")
    parser.add_argument("--dataset", type=Path, default=None, help="a built dataset folder (default: MOp built into /tmp once)")
    parser.add_argument("--batch_size", type=int, default=1000, help="sentences per call (datasets.map's default batch)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats; the best is kept")
    parser.add_argument("--quick", action="store_true", help="smoke run on 300 MOp cells")
    parser.add_argument("--results_dir", type=Path, default=None, help="where the JSON goes (default bench/results; --quick: a temp folder)")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, not {args.batch_size}")
    repeat = args.repeat or (1 if args.quick else 2)
    from tokenizer import build_tokenizer

    gex, atac, genes, peaks, where = mop_sentences(args.dataset, args.quick)
    tok = build_tokenizer(genes, peaks)
    unk = sum(tok.unk_token_id in ids for ids in tok(gex[:200] + atac[:200], add_special_tokens=False)["input_ids"])
    if unk:
        raise ValueError(f"{unk} sentences hold names unknown to the tokenizer: the dataset and tokenizer disagree")
    figures: dict = {"sentences_from": where, "vocabulary": len(tok), "batch_size": args.batch_size, "texts": {}}
    for column, texts in (("gex_text", gex), ("atac_text", atac)):
        lengths = np.array([t.count(" ") + 1 if t else 0 for t in texts])
        batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
        rows = {}
        for parallel in ("true", "false"):
            os.environ["TOKENIZERS_PARALLELISM"] = parallel
            for name, fn in _variants(tok).items():
                load = common.load_average()
                seconds, tokens = _time(fn, batches, repeat)
                rows[f"{name}/parallel={parallel}"] = {
                    "seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds), "load_average": load,
                }
                print(f"{column:9s} {name:32s} parallel={parallel:5s} {tokens / seconds / 1e6:6.2f} M tokens/s ({tokens:,} tokens)")
        figures["texts"][column] = {"sentences": len(texts), "mean_names": round(float(lengths.mean()), 1), "variants": rows}
    best = max((v["tokens_per_s"], f"{c}:{k}") for c, d in figures["texts"].items() for k, v in d["variants"].items())
    used = min(d["variants"]["tokenizer_encode_names/parallel=true"]["tokens_per_s"] for d in figures["texts"].values())
    figures["best_tokens_per_s"], figures["best_variant"] = best
    figures["translator_path_tokens_per_s_worst_column"] = used
    figures["target_tokens_per_s"] = TARGET_TOKENS_PER_S
    figures["target_met_by_translator_path"] = bool(used >= TARGET_TOKENS_PER_S)
    print(f"translator's path (tokenizer.encode_names): {used / 1e6:.2f} M tokens/s at worst; best variant {best[1]} "
          f"{best[0] / 1e6:.2f} M tokens/s; target {TARGET_TOKENS_PER_S / 1e6:.0f} M")
    common.write_results("tokenize", figures, args.quick, args.results_dir)
    return figures


if __name__ == "__main__":
    main()
