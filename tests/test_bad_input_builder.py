"""Bad input to `python -m dataset_builder`: one-line error, exit code 2, no output left behind.

Every case of the builder's rows in docs/bad_input.md is tried here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import anndata as ad
import datasets
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dataset_builder import META_FILE
from dataset_builder.__main__ import main
from dataset_builder.simulate import simulate_paired
from tests.conftest import REPO

md.set_options(pull_on_update=False)


@pytest.fixture
def pair():
    """A small valid (rna, atac) pair to damage."""
    return simulate_paired(n_cells=40, n_genes=12, peaks_per_gene=2, n_batches=2)


def _write(tmp_path, rna: ad.AnnData, atac: ad.AnnData) -> list[str]:
    rna.write_h5ad(tmp_path / "rna.h5ad")
    atac.write_h5ad(tmp_path / "atac.h5ad")
    return [str(tmp_path / "rna.h5ad"), str(tmp_path / "atac.h5ad")]


def _fails(tmp_path, capsys, inputs: list[str] | None, *extra: str, match: str) -> str:
    """Run the CLI; assert exit 2, one stderr line matching ``match``, and no output or temp folder."""
    out = tmp_path / "out"
    argv = [a for path in inputs or [] for a in ("--input", path)] + ["--output_dir", str(out), *extra]
    before = {p.name for p in tmp_path.iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert re.search(match, errors[0]), errors[0]
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == before  # no partial or temporary folder
    return errors[0]


def test_missing_file(tmp_path, capsys):
    _fails(tmp_path, capsys, [str(tmp_path / "nope.h5ad")], match=r"nope\.h5ad does not exist.*--input")


def test_not_hdf5(tmp_path, capsys):
    (tmp_path / "table.h5ad").write_text("cell,gene\nA,1\n")
    _fails(tmp_path, capsys, [str(tmp_path / "table.h5ad")], match=r"table\.h5ad is not an HDF5 file")


def test_truncated_h5ad(tmp_path, capsys, pair):
    rna, atac = pair
    rna.write_h5ad(tmp_path / "rna.h5ad")
    data = (tmp_path / "rna.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    (tmp_path / "rna.h5ad").unlink()
    atac.write_h5ad(tmp_path / "atac.h5ad")
    _fails(
        tmp_path,
        capsys,
        [str(tmp_path / "cut.h5ad"), str(tmp_path / "atac.h5ad")],
        match=r"cut\.h5ad.*(truncated|not an HDF5)",
    )


def test_h5mu_without_atac_modality(tmp_path, capsys, pair):
    md.MuData({"rna": pair[0]}).write(tmp_path / "only_rna.h5mu")
    _fails(tmp_path, capsys, [str(tmp_path / "only_rna.h5mu")], match=r"no 'atac' modality.*--atac_modality")


def test_h5mu_modality_names_are_overridable(tmp_path, capsys, pair):
    md.MuData({"GEX": pair[0], "peaks": pair[1]}).write(tmp_path / "renamed.h5mu")
    argv = ["--input", str(tmp_path / "renamed.h5mu"), "--gex_modality", "GEX", "--atac_modality", "peaks"]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0


def _combined(pair, labels=True) -> ad.AnnData:
    rna, atac = pair
    combined = ad.concat([rna, atac], axis=1, merge="first")
    combined.obs = rna.obs.copy()
    if labels:
        combined.var["feature_types"] = ["GEX"] * rna.n_vars + ["ATAC"] * atac.n_vars
    else:
        combined.var = combined.var.drop(columns=[c for c in combined.var.columns])
    return combined


def test_combined_without_feature_types(tmp_path, capsys, pair):
    _combined(pair, labels=False).write_h5ad(tmp_path / "both.h5ad")
    _fails(tmp_path, capsys, [str(tmp_path / "both.h5ad")], match=r"both\.h5ad .*without var\['feature_types'\]")


def test_combined_with_unknown_labels(tmp_path, capsys, pair):
    combined = _combined(pair)
    combined.var["feature_types"] = ["GEX"] * pair[0].n_vars + ["Antibody Capture"] * pair[1].n_vars
    combined.write_h5ad(tmp_path / "both.h5ad")
    _fails(tmp_path, capsys, [str(tmp_path / "both.h5ad")], match=r"unknown labels \['Antibody Capture'\]")


def test_no_shared_barcodes(tmp_path, capsys, pair):
    rna, atac = pair
    atac.obs_names = [f"other-{i}" for i in range(atac.n_obs)]
    _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=r"no shared cell barcodes between .*rna\.h5ad")


def test_duplicate_barcodes(tmp_path, capsys, pair):
    rna, atac = pair
    names = list(rna.obs_names)
    names[5] = names[4]
    rna.obs_names = names
    _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=r"duplicate cell barcodes in .*rna\.h5ad")


def test_duplicate_gene_names(tmp_path, capsys, pair):
    rna, atac = pair
    genes = list(rna.var_names)
    genes[3] = genes[2]
    rna.var_names = genes
    _fails(
        tmp_path,
        capsys,
        _write(tmp_path, rna, atac),
        match=r"duplicate gene names in .*rna\.h5ad.*var_names_make_unique",
    )


def test_malformed_peak_names(tmp_path, capsys, pair):
    rna, atac = pair
    atac.var["feature_types"] = "ATAC"
    peaks = list(atac.var_names)
    peaks[0] = "peak_one"
    atac.var_names = peaks
    _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=r"not genomic intervals \(e\.g\. 'peak_one'\)")


@pytest.mark.parametrize("bad, match", [(-1.0, "negative"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")])
def test_negative_nan_inf_values(tmp_path, capsys, pair, bad, match):
    rna, atac = pair
    rna.X = rna.X.astype(np.float32)
    rna.X.data[0] = bad
    _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=rf"GEX values \(X\) in .*rna\.h5ad contain {match}")


def test_non_integer_counts_say_how_to_pass_normalized_data(tmp_path, capsys, pair):
    rna, atac = pair
    rna.X = rna.X.astype(np.float32)
    rna.X.data = np.log1p(rna.X.data)
    _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=r"not integers .*store them in layers\['counts'\]")
    # ...and the fix works: normalized X beside raw counts in layers['counts'].
    rna.layers["counts"] = sp.csr_matrix(np.expm1(rna.X.toarray()).round())
    inputs = _write(tmp_path, rna, atac)
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / META_FILE).read_text())["normalization"]["counts_source"] == "layers/counts"


def test_other_labs_obs_columns_and_counts_layer_are_named_by_flags(tmp_path, capsys, pair):
    rna, atac = pair
    rna.obs = rna.obs.rename(columns={"batch": "library", "cell_type": "celltype"})
    atac.obs = atac.obs[[]]
    rna.layers["raw"] = rna.X.copy()
    rna.X = rna.X.astype(np.float32)
    rna.X.data = np.log1p(rna.X.data)
    inputs = _write(tmp_path, rna, atac)
    files = ["--input", inputs[0], "--input", inputs[1]]
    _fails(tmp_path, capsys, inputs, match=r"X looks normalized.*--counts_layer NAME")
    _fails(tmp_path, capsys, inputs, "--counts_layer", "counts", match=r"--counts_layer counts: .*rna\.h5ad has no layers\['counts'\] \(layers: \['raw'\]\)")
    _fails(tmp_path, capsys, inputs, "--counts_layer", "raw", "--batch_key", "donor",
           match=r"--batch_key donor: .*has no obs column 'donor' \(columns: \['celltype', 'library'\]\)")
    _fails(tmp_path, capsys, inputs, "--counts_layer", "raw", "--test_batches", "sim2", match=r"--batch_key")
    out = tmp_path / "ok"
    flags = ["--counts_layer", "raw", "--batch_key", "library", "--cell_type_key", "celltype", "--test_batches", "sim2"]
    assert main([*files, *flags, "--output_dir", str(out)]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["normalization"]["counts_source"] == "layers/raw" and meta["split_by"] == "batch+hash"
    test = datasets.load_from_disk(str(out / "test"))
    library = dict(zip(rna.obs_names, rna.obs["library"], strict=True))
    celltype = dict(zip(rna.obs_names, rna.obs["celltype"], strict=True))
    assert len(test) == int((rna.obs["library"] == "sim2").sum()) and set(test["batch"]) == {"sim2"}
    assert test["cell_type"] == [celltype[c] for c in test["cell"]] and {library[c] for c in test["cell"]} == {"sim2"}


def test_barcodes_with_a_modality_suffix_per_file_are_paired(tmp_path, caplog, pair):
    rna, atac = pair
    cells = list(rna.obs_names)  # 10x-style, ending in -1
    atac = atac[5:].copy()
    rna.obs_names = [f"{c}_rna" for c in cells]
    atac.obs_names = [f"{c}_atac" for c in cells[5:]]
    inputs = _write(tmp_path, rna, atac)
    with caplog.at_level("WARNING", logger="dataset_builder.readers"):
        assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "out")]) == 0
    assert "paired 35 cells after removing the suffix '_rna' from rna.h5ad and '_atac' from atac.h5ad" in caplog.text
    built = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(c for split in built.values() for c in split["cell"]) == sorted(cells[5:])


def test_non_binary_atac_values_are_binarized_with_a_log_line(tmp_path, caplog, pair):
    rna, atac = pair
    inputs = _write(tmp_path, rna, atac)
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "counts")]) == 0
    atac.X = atac.X.astype(np.float32) * 0.5  # e.g. normalized or half-step values
    (tmp_path / "atac.h5ad").unlink()
    inputs = _write(tmp_path, rna, atac)
    with caplog.at_level("INFO", logger="dataset_builder.readers"):
        assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "halves")]) == 0
    assert "are not integers (e.g. 0.5; normalized?): binarized, a peak is accessible in a cell where its value is > 0" in caplog.text
    for split in ("train", "test"):
        halves, counts = (datasets.load_from_disk(str(tmp_path / name / split)) for name in ("halves", "counts"))
        assert halves["atac_text"] == counts["atac_text"] and any(halves["atac_text"])


def test_modality_with_zero_features(tmp_path, capsys, pair):
    rna, atac = pair
    empty = ad.AnnData(sp.csr_matrix((atac.n_obs, 0), dtype=np.float32), obs=atac.obs.copy())
    empty.var["feature_types"] = np.array([], dtype=object)
    rna.var["feature_types"] = "GEX"
    combined = _combined((rna, empty))
    combined.write_h5ad(tmp_path / "both.h5ad")
    _fails(tmp_path, capsys, [str(tmp_path / "both.h5ad")], match=r"ATAC modality in .*both\.h5ad has zero features")


def test_all_cells_empty_in_a_modality(tmp_path, capsys, pair):
    rna, atac = pair
    atac.X = sp.csr_matrix(atac.shape, dtype=np.float32)
    _fails(
        tmp_path, capsys, _write(tmp_path, rna, atac), match=r"all cells are empty in the ATAC modality of .*atac\.h5ad"
    )


def test_unknown_test_batch(tmp_path, capsys, pair):
    inputs = _write(tmp_path, *pair)
    _fails(tmp_path, capsys, inputs, "--test_batches", "sim9", match=r"--test_batches names batches \['sim9'\].*sim1")


def test_output_folder_exists(tmp_path, capsys, pair):
    inputs = _write(tmp_path, *pair)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(out)]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # Not a dataset folder: the overwrite flag does not replace it either.
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(out), "--overwrite_output_dir"]) == 2
    assert "is not a dataset folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(out)]) == 0
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert (out / META_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atac.h5ad", "out", "rna.h5ad"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top_peaks", "-3"], r"--top_peaks: must be a positive number, not -3"),
        (["--chunk_size", "0"], r"--chunk_size: must be a positive number"),
        (["--gex_encoding", "counts"], r"--gex_encoding: invalid choice"),
        (["--push_to_hub"], r"--push_to_hub needs --hub_dataset_id"),
    ],
)
def test_invalid_cli_values(tmp_path, capsys, pair, extra, match):
    _fails(tmp_path, capsys, _write(tmp_path, *pair), *extra, match=match)


def test_cells_in_only_one_file_are_dropped_and_counted(tmp_path, caplog, pair):
    rna, atac = pair
    inputs = _write(tmp_path, rna, atac[:-7].copy())
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["dropped_cells"] == 7 and sum(meta["splits"].values()) == rna.n_obs - 7
    assert "dropped 7 cells present in only one modality" in caplog.text


def test_all_zero_cells_are_kept_with_empty_sentences(tmp_path, caplog, pair):
    rna, atac = pair
    gex = rna.X.toarray()
    gex[[0, 1]] = 0
    rna.X = sp.csr_matrix(gex)
    peaks = atac.X.toarray()
    peaks[[1, 2]] = 0
    atac.X = sp.csr_matrix(peaks)
    inputs = _write(tmp_path, rna, atac)
    assert main(["--input", inputs[0], "--input", inputs[1], "--output_dir", str(tmp_path / "out")]) == 0
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "out"))
    rows = {r["cell"]: r for split in ds.values() for r in split}
    cells = list(rna.obs_names)
    assert rows[cells[0]]["gex_text"] == "" and rows[cells[0]]["atac_text"] != "" and rows[cells[0]]["n_genes"] == 0
    assert rows[cells[1]]["gex_text"] == "" and rows[cells[1]]["atac_text"] == ""
    assert rows[cells[2]]["atac_text"] == "" and rows[cells[2]]["n_peaks"] == 0
    empty = {"gex": int((gex.sum(axis=1) == 0).sum()), "atac": int((peaks.sum(axis=1) == 0).sum())}
    assert empty["gex"] == 2 and empty["atac"] >= 2
    assert sum(r["atac_text"] == "" for r in rows.values()) == empty["atac"]
    assert json.loads((tmp_path / "out" / META_FILE).read_text())["empty_cells"] == empty
    assert (
        f"kept all-zero cells with empty sentences: 2 without GEX counts, {empty['atac']} without ATAC counts"
        in caplog.text
    )


def test_module_exit_code_and_debug_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dataset_builder",
        "--input",
        str(tmp_path / "missing.h5mu"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m dataset_builder: error: ")
    debug = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "o").exists()


def test_run_cli_turns_sigterm_into_cleanup_and_exit_143(capsys):
    import os
    import signal

    from dataset_builder.cli import TERMINATED_EXIT_CODE, run_cli

    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0) if hasattr(signal, "sigtimedwait") else None
            for _ in range(1000):  # the handler runs between bytecodes
                pass
            raise AssertionError("SIGTERM was not raised in the main thread")
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(body) == TERMINATED_EXIT_CODE == 143
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    assert "terminated by SIGTERM" in capsys.readouterr().err
    assert run_cli(lambda: 7) == 7 and run_cli(lambda: None) == 0


def test_sigterm_during_a_build_leaves_nothing_behind(tmp_path):
    """A real SIGTERM while the records are written: exit 143, no output folder, no temporary folder."""
    from dataset_builder.simulate import write_simulated

    source = write_simulated(tmp_path / "sim.h5mu")
    out = tmp_path / "built" / "ds"
    # The signal comes from the digest thread, after the temporary folder exists and while records are being made.
    script = (
        "import os, signal, sys\n"
        "import dataset_builder.builder as b\n"
        "digest = b.content_digest\n"
        "def signalling(plan):\n"
        "    value = digest(plan)\n"
        "    assert any(p.name.startswith('.ds.tmp-') for p in os.scandir(os.path.dirname(sys.argv[-1])))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return value\n"
        "b.content_digest = signalling\n"
        "from dataset_builder.__main__ import main\n"
        "sys.exit(main(['--input', sys.argv[1], '--output_dir', sys.argv[2]]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(source), str(out)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "terminated by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and list((tmp_path / "built").iterdir()) == []


# -- names, batch labels, older and unusual files -----------------------------------------------------------------


@pytest.mark.parametrize(("modality", "bad"), [("rna", "CD3 E"), ("rna", "CD3E\t"), ("rna", ""), ("atac", "chr1-100-200 ")])
def test_feature_names_with_whitespace_or_empty_are_refused(tmp_path, capsys, pair, modality, bad):
    rna, atac = pair
    adata = rna if modality == "rna" else atac
    names = list(adata.var_names)
    names[1] = bad
    adata.var_names = names
    kind = "gene" if modality == "rna" else "peak"
    _fails(
        tmp_path,
        capsys,
        _write(tmp_path, rna, atac),
        match=rf"1 {kind} names in .*{modality}\.h5ad are empty or contain whitespace \(e\.g\. {re.escape(repr(bad))}\)",
    )


def test_cells_without_a_batch_label_are_refused_with_the_count(tmp_path, capsys, pair):
    rna, atac = pair
    batch = rna.obs["batch"].astype(object).to_numpy()
    batch[[3, 7, 8]] = np.nan
    rna.obs["batch"] = pd.Categorical(batch)
    line = _fails(tmp_path, capsys, _write(tmp_path, rna, atac), match=r"3 of 40 cells in .*rna\.h5ad have no batch label")
    assert "notna()" in line


def test_h5mu_whose_global_batch_has_nan_is_refused_with_the_count(tmp_path, capsys, pair):
    rna, atac = pair
    batch = rna.obs["batch"].astype(object).to_numpy()
    batch[[0, 5]] = np.nan
    del rna.obs["batch"], atac.obs["batch"]
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["batch"] = pd.Categorical(batch)
    mdata.write(tmp_path / "cells.h5mu")
    _fails(
        tmp_path,
        capsys,
        [str(tmp_path / "cells.h5mu")],
        match=r"2 of 40 cells in .*cells\.h5mu have no batch label \(NaN in the MuData's global obs\['batch'\]\)",
    )


def test_h5mu_of_axis_1_is_refused(tmp_path, capsys, pair):
    md.MuData({"rna": pair[0], "atac": pair[1]}, axis=1).write(tmp_path / "cells.h5mu")
    _fails(tmp_path, capsys, [str(tmp_path / "cells.h5mu")], match=r"cells\.h5mu is a MuData with axis=1 .*axis=0")


def _write_anndata_06(adata: ad.AnnData, path) -> None:
    """``adata`` in the layout anndata 0.6 wrote: obs/var as compound datasets, categories in uns, X as a CSR group."""
    x = sp.csr_matrix(adata.X)
    with h5py.File(path, "w") as f:
        group = f.create_group("X")
        group.attrs["h5sparse_format"] = "csr"
        group.attrs["h5sparse_shape"] = np.array(x.shape)
        group["data"], group["indices"], group["indptr"] = x.data, x.indices, x.indptr
        codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int8)
        obs = np.array(list(zip(adata.obs_names.str.encode("utf-8"), codes, strict=True)), dtype=[("index", "S40"), ("batch", "i1")])
        f.create_dataset("obs", data=obs)
        f.create_dataset("var", data=np.array([(n.encode(),) for n in adata.var_names], dtype=[("index", "S40")]))
        f.create_group("uns")["batch_categories"] = adata.obs["batch"].cat.categories.to_numpy().astype("S")


def test_an_anndata_06_file_is_read_through_anndata(tmp_path, pair):
    from dataset_builder.readers import read_modality, read_paired

    rna, atac = pair
    rna.obs["batch"] = rna.obs["batch"].astype("category")
    _write_anndata_06(rna, tmp_path / "old_rna.h5ad")
    atac.write_h5ad(tmp_path / "atac.h5ad")
    rna.write_h5ad(tmp_path / "rna.h5ad")
    old = read_paired([tmp_path / "old_rna.h5ad", tmp_path / "atac.h5ad"])
    new = read_paired([tmp_path / "rna.h5ad", tmp_path / "atac.h5ad"])
    assert old.genes == new.genes and list(old.cells) == list(new.cells)
    assert (old.gex != new.gex).nnz == 0 and (old.atac != new.atac).nnz == 0
    assert old.obs["batch"].tolist() == new.obs["batch"].tolist()
    # prediction reads the source modality the same way
    assert read_modality([tmp_path / "old_rna.h5ad"], "GEX").features == list(rna.var_names)
    argv = ["--input", str(tmp_path / "old_rna.h5ad"), "--input", str(tmp_path / "atac.h5ad")]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 0


def _unsigned_indices(path) -> None:
    with h5py.File(path, "r+") as f:
        for key, dtype in (("indices", np.uint32), ("indptr", np.uint64)):
            values = f["X"][key][()].astype(dtype)
            del f["X"][key]
            f["X"][key] = values


@pytest.mark.parametrize("layout", ["two files", "combined"])
def test_unsigned_index_arrays_are_cast(tmp_path, pair, layout):
    from dataset_builder.readers import read_paired

    rna, atac = pair
    if layout == "two files":
        inputs = _write(tmp_path, rna, atac)
        reference = read_paired(inputs)
        rna.write_h5ad(tmp_path / "rna_unsigned.h5ad")
        _unsigned_indices(tmp_path / "rna_unsigned.h5ad")
        inputs = [str(tmp_path / "rna_unsigned.h5ad"), inputs[1]]
    else:
        _combined(pair).write_h5ad(tmp_path / "both.h5ad")
        reference = read_paired([tmp_path / "both.h5ad"])
        _combined(pair).write_h5ad(tmp_path / "both_unsigned.h5ad")
        _unsigned_indices(tmp_path / "both_unsigned.h5ad")
        inputs = [str(tmp_path / "both_unsigned.h5ad")]
    paired = read_paired(inputs)
    assert (paired.gex != reference.gex).nnz == 0 and (paired.atac != reference.atac).nnz == 0
    assert main([*(a for p in inputs for a in ("--input", p)), "--output_dir", str(tmp_path / "out")]) == 0


def test_an_input_locked_by_another_process_is_not_called_truncated(tmp_path, capsys, pair):
    inputs = _write(tmp_path, *pair)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(120)", inputs[0]],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        try:
            h5py.File(inputs[0], "r").close()
            pytest.skip("HDF5 file locking is off here (HDF5_USE_FILE_LOCKING=FALSE or a file system without locks)")
        except OSError:
            pass
        before = (tmp_path / "rna.h5ad").read_bytes()  # as the holding process left it
        line = _fails(tmp_path, capsys, inputs, match=r"rna\.h5ad is locked by another process")
        assert "truncated" not in line and "re-download" not in line
        assert (tmp_path / "rna.h5ad").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_an_unreadable_input_is_a_permission_error(tmp_path, capsys, pair, monkeypatch):
    import dataset_builder.readers as readers

    inputs = _write(tmp_path, *pair)

    def denied(path, mode="r", **kwargs):
        raise PermissionError(13, f"Unable to synchronously open file (unable to open file: name = '{path}', errno = 13, error message = 'Permission denied')")

    monkeypatch.setattr(readers.h5py, "File", denied)
    line = _fails(tmp_path, capsys, inputs, match=r"rna\.h5ad cannot be read: permission denied; make it readable")
    assert "truncated" not in line
