"""Builder, prediction and evaluation make the same sentence from the same cell (one implementation)."""

from __future__ import annotations

import json

import anndata as ad
import mudata as md
import pytest

from dataset_builder.builder import build_dataset
from dataset_builder.records import load_split_matrices, source_sentences
from dataset_builder.simulate import write_simulated
from tests.conftest import shared_file
from translator.anndata_io import source_sentences_from_anndata

BMMC = "bmmc_starter/openproblems_bmmc_multiome_starter.combined.h5ad"


def _same_sentences(path, in_memory, out, **options) -> None:
    """Every split's stored sentences equal prediction's (from ``in_memory``) and evaluation's for the same cells.

    Evaluation of a model of the other GEX encoding re-encodes the stored cells: that must equal the builder's
    sentences in that encoding.
    """
    encoding = options.pop("gex_encoding", "rank")
    other = "binary" if encoding == "rank" else "rank"
    build_dataset([path], out, gex_encoding=encoding, **options)
    build_dataset([path], out.with_name("other"), gex_encoding=other, **options)
    meta = json.loads((out / "cell_sentences.json").read_text())
    predicted = {}
    for direction in ("gex2atac", "atac2gex"):
        sentences, cells, _ = source_sentences_from_anndata(in_memory, direction, meta)
        predicted[direction] = dict(zip(cells.obs_names, sentences, strict=True))
    checked = 0
    for split in ("train", "validation", "test"):
        if not meta["splits"].get(split):
            continue
        data, rebuilt = load_split_matrices(out, split), load_split_matrices(out.with_name("other"), split)
        for direction, column in (("gex2atac", "gex_text"), ("atac2gex", "atac_text")):
            assert source_sentences(data, direction, meta) == data[column]
            assert [predicted[direction][cell] for cell in data["cells"]] == data[column]
        assert rebuilt["cells"] == data["cells"]
        assert source_sentences(data, "gex2atac", dict(meta, gex_encoding=other)) == rebuilt["gex_text"] != data["gex_text"]
        checked += len(data["cells"])
    assert checked == sum(meta["splits"].values()) > 0
    assert all(any(sentences.values()) for sentences in predicted.values())


@pytest.mark.parametrize("options", [{}, {"gex_encoding": "binary", "top_peaks": 300}])
def test_bmmc_cells_make_the_same_sentences_everywhere(tmp_path, options):
    path = shared_file(BMMC)
    _same_sentences(path, ad.read_h5ad(path), tmp_path / "dataset", test_batches=["s1d2"], **options)


@pytest.mark.parametrize("options", [{}, {"gex_encoding": "binary", "top_peaks": 50}])
def test_simulated_cells_make_the_same_sentences_everywhere(tmp_path, options):
    path = write_simulated(tmp_path / "sim.h5mu")
    _same_sentences(path, md.read_h5mu(path), tmp_path / "dataset", test_batches=["sim4"], **options)
