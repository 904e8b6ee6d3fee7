"""The WordLevel tokenizer: one token a name, deterministic order, offline loading, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from tokenizer import (
    PREFIX,
    SPECIAL_TOKENS,
    build_from_dataset,
    build_tokenizer,
    check_same_features,
    check_vocabulary,
    encode_names,
    feature_token_ranges,
    save_tokenizer,
)
from tokenizer.__main__ import main as tokenizer_cli

from .conftest import shared_file


def _mop_names_and_sentence():
    import anndata as ad

    rna = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_rna.h5ad"))
    atac = ad.read_h5ad(shared_file("mop_snareseq/mop_snare_atac.h5ad"), backed="r")
    genes = list(map(str, rna.var_names))
    peaks = list(map(str, atac.var_names))
    row = rna.X[0]
    order = np.lexsort((row.indices, -row.data))  # descending count, ties in feature order
    sentence = " ".join(genes[i] for i in row.indices[order])
    return genes, peaks, sentence, len(row.indices)


def test_real_gene_sentence_is_one_id_per_name(tmp_path):
    genes, peaks, sentence, n_detected = _mop_names_and_sentence()
    meta = {"genes": genes, "peaks": peaks}
    save_tokenizer(build_tokenizer(genes, peaks), tmp_path / "tok", meta)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok(f"{PREFIX['gex2atac']} {sentence}").input_ids
    assert len(ids) == n_detected + 2  # prefix + one per gene + </s>
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.convert_tokens_to_ids(PREFIX["gex2atac"]) and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    ranges = feature_token_ranges(tok)
    assert ranges["gex"] == (len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(genes))
    assert ranges["atac"][1] == len(tok) == len(SPECIAL_TOKENS) + len(genes) + len(peaks)
    assert all(ranges["gex"][0] <= i < ranges["gex"][1] for i in ids[1:-1])
    check_vocabulary(tok, meta)


def test_vocabulary_order_is_deterministic_and_unknown_names_are_unk():
    a = build_tokenizer(["G1", "G2"], ["chr1-10-20", "chr2-5-9"])
    b = build_tokenizer(["G1", "G2"], ["chr1-10-20", "chr2-5-9"])
    assert a.get_vocab() == b.get_vocab()
    assert [a.convert_ids_to_tokens(i) for i in range(len(a))] == [*SPECIAL_TOKENS, "G1", "G2", "chr1-10-20", "chr2-5-9"]
    assert a("G2 NOPE").input_ids == [6, a.unk_token_id, a.eos_token_id]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="occurs twice"):
        build_tokenizer(["G1", "G1"], ["chr1-10-20"])


def test_vocabulary_mismatch_is_reported(tmp_path):
    tok = build_tokenizer(["G1", "G2"], ["chr1-10-20"])
    with pytest.raises(ValueError, match="another vocabulary"):
        check_vocabulary(tok, {"genes": ["G1", "G3"], "peaks": ["chr1-10-20"]})


def test_feature_lists_of_two_folders_are_compared_in_order():
    meta = {"genes": ["G1", "G2"], "peaks": ["chr1-10-20", "chr1-30-40"]}
    check_same_features(meta, dict(meta), "--pool M D", reference="--model's", fix="pool folds")
    check_same_features(meta, {"gex_encoding": "binary"}, "seed", reference="the dataset's", fix="x")  # lists it lacks are not compared
    with pytest.raises(ValueError, match=r"^--pool M D: its peaks \(2\) differ from --model's \(2\); pool folds$"):
        check_same_features(meta, dict(meta, peaks=meta["peaks"][::-1]), "--pool M D", reference="--model's", fix="pool folds")
    with pytest.raises(ValueError, match="its genes \\(1\\) differ"):
        check_same_features(meta, dict(meta, genes=["G1"]), "--pool M D", reference="--model's", fix="pool folds")
    tok, other = build_tokenizer(meta["genes"], meta["peaks"]), build_tokenizer(["G2", "G1"], meta["peaks"])
    check_same_features(meta, meta, "member", reference="the main model's", fix="f", tokenizers=(tok, tok))
    with pytest.raises(ValueError, match="token ids differ"):
        check_same_features(meta, meta, "member", reference="the main model's", fix="f", tokenizers=(tok, other))


def test_cli_builds_from_dataset_metadata_and_refuses_existing_output(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    meta = {"genes": ["G1", "G2", "G3"], "peaks": ["chr1-10-20", "chr1-30-40"]}
    (ds / "cell_sentences.json").write_text(json.dumps(meta))
    assert tokenizer_cli(["--dataset", str(ds), "--output_dir", str(tmp_path / "tok")]) == 0
    tok = build_from_dataset(ds, tmp_path / "tok2")
    assert feature_token_ranges(tok) == {"gex": (5, 8), "atac": (8, 10)}
    assert tokenizer_cli(["--dataset", str(ds), "--output_dir", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite_output_dir" in err and len(err.strip().splitlines()) == 1
    assert tokenizer_cli(["--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "t3")]) == 2
    assert not (tmp_path / "t3").exists()


def test_encode_names_gives_the_tokenizers_ids(tmp_path):
    genes, peaks, sentence, _ = _mop_names_and_sentence()
    tok = build_tokenizer(genes, peaks)
    atac = " ".join(peaks[i] for i in range(0, len(peaks), 97))
    sentences = [sentence, atac, "", "   ", f"  {genes[3]}   NOT_A_GENE {peaks[5]} ", genes[0]]
    reference = tok(sentences, add_special_tokens=False)["input_ids"]
    got = encode_names(tok, sentences)
    assert [list(map(int, ids)) for ids in got] == reference
    assert got[4].tolist() == [tok.convert_tokens_to_ids(genes[3]), tok.unk_token_id, tok.convert_tokens_to_ids(peaks[5])]
    assert encode_names(tok, []) == []
