"""Cross-validation within one donor: hash folds of an h5ad, and pooling of per-fold evaluations."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from evaluation.crossval import fold_labels, main, pool_folds, write_fold_file


def _adata(n: int = 40):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    obs = pd.DataFrame({"batch": ["d1"] * (n - 10) + ["d2"] * 10}, index=[f"AAAC{i:04d}-1" for i in range(n)])
    return ad.AnnData(X=sp.random(n, 5, density=0.3, format="csr", dtype=np.float32, random_state=0), obs=obs)


def test_fold_labels_hash_each_barcode_alone():
    cells = [f"cell{i}" for i in range(500)]
    folds = fold_labels(cells, 5)
    assert folds.tolist() == [zlib.crc32(c.encode()) % 5 for c in cells]
    assert fold_labels(cells[::-1], 5).tolist() == folds[::-1].tolist()  # a cell's fold does not depend on the others
    assert set(folds.tolist()) == set(range(5)) and np.bincount(folds).min() > 60
    with pytest.raises(ValueError, match="at least 2"):
        fold_labels(cells, 1)


def test_write_fold_file_splits_only_the_named_batch(tmp_path):
    import anndata as ad

    source = tmp_path / "in.h5ad"
    _adata().write_h5ad(source)
    counts = write_fold_file(source, tmp_path / "out.h5ad", "d1", 3)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    expected = {f"d1_f{k}" for k in fold_labels(out.obs_names[:30], 3)}
    assert set(out.obs["batch"][:30]) == expected and (out.obs["batch"][30:] == "d2").all()
    assert sum(counts.values()) == 40 and counts["d2"] == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert np.allclose(out.X.toarray(), ad.read_h5ad(source).X.toarray())


def test_write_fold_file_rejects_bad_input_without_writing(tmp_path):
    source = tmp_path / "in.h5ad"
    adata = _adata()
    adata.write_h5ad(source)
    with pytest.raises(ValueError, match=r"--batch 'd9' has 0 cells.*batches found: d1, d2"):
        write_fold_file(source, tmp_path / "out.h5ad", "d9", 3)
    with pytest.raises(ValueError, match="no obs\\['donor'\\]"):
        write_fold_file(source, tmp_path / "out.h5ad", "d1", 3, batch_key="donor")
    with pytest.raises(ValueError, match="is the input --input"):
        write_fold_file(source, source, "d1", 3)
    adata.obs["batch"] = ["d1"] * 30 + ["d1_f2"] * 10
    adata.write_h5ad(tmp_path / "clash.h5ad")
    with pytest.raises(ValueError, match="already has batches named like the folds"):
        write_fold_file(tmp_path / "clash.h5ad", tmp_path / "out.h5ad", "d1", 3)
    assert not (tmp_path / "out.h5ad").exists()


def _result(folder: Path, n: int, model: dict | None, baselines: dict) -> Path:
    directions = {}
    for direction in ("gex2atac", "atac2gex"):
        entry = {"baselines": {name: values[direction] for name, values in baselines.items()}}
        if model is not None:
            entry["model"] = model[direction]
        directions[direction] = entry
    folder.mkdir(parents=True)
    (folder / "eval_results.json").write_text(json.dumps({"dataset": "toy", "split": "validation", "n_cells": n, "directions": directions}))
    return folder


def _metrics(rmse: float, pearson: float, auroc: float = 0.7, ap: float = 0.3) -> dict:
    return {"gex2atac": {"rmse": rmse, "pearson_cell": pearson, "auroc_cell": auroc, "ap_cell": ap},
            "atac2gex": {"rmse": 2 * rmse, "pearson_cell": pearson}}


def test_pool_folds_weights_cells_and_counts_firsts(tmp_path):
    base = {"mean": (_metrics(0.30, 0.40), _metrics(0.50, 0.20)), "svd_knn": (_metrics(0.29, 0.41), _metrics(0.52, 0.22)),
            "svd_krr": (_metrics(0.28, 0.42), _metrics(0.51, 0.21))}
    sizes = (10, 30)
    baselines = [_result(tmp_path / f"b{i}", n, None, {k: v[i] for k, v in base.items()}) for i, n in enumerate(sizes)]
    # ahead of svd_krr on fold 0 only; pooled RMSE behind it, pooled Pearson ahead
    model = [_result(tmp_path / f"m{i}", n, m, {"mean": base["mean"][i]}) for i, (n, m) in enumerate(zip(sizes, (_metrics(0.27, 0.5), _metrics(0.52, 0.3)), strict=True))]
    pooled = pool_folds(baselines, {"m": model})
    assert pooled["cells"] == 40 and pooled["folds"] == 2
    krr = pooled["baselines"]["svd_krr"]["gex2atac"]["rmse"]
    assert krr == pytest.approx(math.sqrt((10 * 0.28**2 + 30 * 0.51**2) / 40))
    got = pooled["candidates"]["m"]
    assert got["metrics"]["gex2atac"]["pearson_cell"] == pytest.approx((10 * 0.5 + 30 * 0.3) / 40)
    assert got["metrics"]["gex2atac"]["rmse"] == pytest.approx(math.sqrt((10 * 0.27**2 + 30 * 0.52**2) / 40))
    assert got["folds_ahead_of_svd_krr"] == {"gex2atac": 1, "atac2gex": 1}
    # firsts: Pearson in both directions (0.35 > the best pooled baseline's); RMSE, AUROC and AP not (ties lose)
    assert got["firsts"] == 2
    mean_rmse = sum(pooled["baselines"]["mean"][d]["rmse"] for d in ("gex2atac", "atac2gex"))
    assert got["rmse_cut_over_mean"] == pytest.approx(mean_rmse - sum(got["metrics"][d]["rmse"] for d in ("gex2atac", "atac2gex")))


def test_pool_of_one_validation_split_applies_the_rule_unpooled(tmp_path):
    base = _result(tmp_path / "b", 12, None, {"mean": _metrics(0.30, 0.40), "svd_krr": _metrics(0.29, 0.45)})
    model = _result(tmp_path / "m", 12, _metrics(0.285, 0.44, 0.8, 0.35), {"mean": _metrics(0.30, 0.40)})
    pooled = pool_folds([base], {"m": [model]})
    got = pooled["candidates"]["m"]
    assert pooled["folds"] == 1 and got["metrics"]["gex2atac"]["rmse"] == pytest.approx(0.285)
    # RMSE first in both directions, AUROC and AP first; Pearson behind svd_krr in both
    assert got["firsts"] == 4 and got["rmse_cut_over_mean"] == pytest.approx(0.015 + 0.030)
    with pytest.raises(ValueError, match="at least one evaluation"):
        pool_folds([], {"m": [model]})


def test_pool_cli_writes_json_and_rejects_mismatched_folds(tmp_path, capsys):
    means = [_metrics(0.3, 0.4), _metrics(0.31, 0.4)]
    base = [_result(tmp_path / f"b{i}", 10, None, {"mean": means[i], "svd_krr": _metrics(0.29, 0.41)}) for i in range(2)]
    model = [_result(tmp_path / f"m{i}", 10, _metrics(0.2, 0.5, 0.8, 0.4), {"mean": means[i]}) for i in range(2)]
    assert main(["pool", "--baselines", *map(str, base), "--candidate", "good", *map(str, model), "--output", str(tmp_path / "p.json")]) == 0
    table = capsys.readouterr().out
    assert "| good |" in table and json.loads((tmp_path / "p.json").read_text())["candidates"]["good"]["firsts"] == 6
    assert main(["pool", "--baselines", *map(str, base), "--candidate", "swapped", str(model[1]), str(model[0])]) == 2
    assert "does not score the cells of" in capsys.readouterr().err
    assert main(["pool", "--baselines", *map(str, base), "--candidate", "short", str(model[0])]) == 2
    assert "1 evaluations for 2 folds" in capsys.readouterr().err
    other = _result(tmp_path / "other", 11, _metrics(0.2, 0.5), {})
    assert main(["pool", "--baselines", *map(str, base), "--candidate", "sizes", str(model[0]), str(other)]) == 2
    assert "does not score the cells of" in capsys.readouterr().err
    assert main(["pool", "--baselines", str(tmp_path / "nowhere"), str(base[0])]) == 2
    assert "does not exist" in capsys.readouterr().err
