"""One evaluation run: the model, the paper's binary-GEX model and the baselines on the same cells."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dataset_builder.outputs import apply_umask, check_output, folder_kind, write_text_atomic
from dataset_builder.records import load_split_matrices, source_sentences
from evaluation import plots
from evaluation.baselines import BASELINES, fit_baselines
from evaluation.report import markdown_table, results_json
from tokenizer import DIRECTIONS, SOURCE_MODALITY, TARGET_MODALITY, check_same_features
from translator.metrics_core import MetricAccumulator, default_chunk_cells, iter_row_chunks, paired_bootstrap

ACCURACY_DEFINITION = (
    "accuracy_binary = share of cell x feature entries where the binarized prediction equals the binarized truth; "
    "ATAC: prediction >= 0.5 vs accessible; GEX: prediction > 0 vs detected (log-norm > 0). "
    "accuracy_binary_all_zeros = the same share for an all-zeros prediction (share of closed / undetected entries)."
)
VERSION_PACKAGES = ("numpy", "scipy", "scikit-learn", "evaluate", "datasets", "torch", "transformers", "tokenizers")

# predictor(source_sentences, direction) -> (matrix [cells, target features], generated sentences or None)
Predictor = Callable[[Sequence[str], str], tuple[np.ndarray, Sequence[str] | None]]
ALONE = "transformer_alone"  # the model folder's transformer readout without its blend


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries behind the numbers."""
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def portable_command(argv: Sequence[str]) -> str:
    """The command line with absolute paths shortened to their last component."""
    parts = []
    for arg in argv:
        key, sep, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        if os.path.isabs(value):
            value = Path(value).name
        parts.append(f"{key}{sep}{value}" if sep else value)
    return " ".join(["python"] + parts)


def _device_name(device: str) -> str:
    from translator.api import device_name

    return device_name(device)


def translator_predictor(model: str | os.PathLike, batch_size: int = 64, allow_pickle: bool = False, device: str | None = None,
                         transformer_alone: bool = False) -> tuple[Predictor, dict]:
    """Load a model folder or Hub id onto ``device`` (auto: a GPU when one is visible); return a predictor and the model's metadata.

    ``transformer_alone``: predict with the transformer's calibrated readout only, without the folder's blend with the
    source kernel and the per-feature mean."""
    from translator import CellTranslator

    translator = CellTranslator.from_pretrained(model, device=device, allow_pickle=allow_pickle)
    if transformer_alone:
        translator.blend = {}

    def predict(sentences: Sequence[str], direction: str) -> tuple[np.ndarray, list[str]]:
        return translator.predict_matrix(list(sentences), direction=direction, batch_size=batch_size, return_sentences=True, precision="float32")

    predict.readout = translator.readout

    return predict, translator.meta


def _check_features(model_meta: dict | None, data: dict, name: str) -> None:
    if model_meta:
        check_same_features(data, model_meta, name, reference="the dataset's",
                            fix="evaluate it on a dataset built with the same features (same input and --top_peaks)")


def _accumulate(
    acc: MetricAccumulator, truth, chunks, chunk: int, desc: str, progress: bool, with_sentences: bool = False
) -> None:
    for rows, out in tqdm(
        zip(iter_row_chunks(truth.shape[0], chunk), chunks, strict=True), total=-(-truth.shape[0] // chunk),
        desc=desc, disable=not progress, leave=False,
    ):
        matrix, sentences = out if with_sentences else (out, None)
        matrix = np.asarray(matrix)
        if matrix.shape != (rows.stop - rows.start, truth.shape[1]):
            raise ValueError(
                f"{desc}: prediction has shape {matrix.shape}, expected {(rows.stop - rows.start, truth.shape[1])} "
                "(cells x target features of the dataset)"
            )
        acc.update(matrix, truth[rows], None if sentences is None else list(sentences))


def _model_chunks(predictor: Predictor, sentences: Sequence[str], direction: str, chunk: int):
    for rows in iter_row_chunks(len(sentences), chunk):
        matrix, generated = predictor(sentences[rows], direction)
        yield np.asarray(matrix, dtype=np.float32), generated


def evaluate_direction(
    direction: str,
    data: dict,
    predictors: dict[str, tuple[Predictor, dict | None]],
    baseline_models: dict[str, object],
    chunk_cells: int | None = None,
    progress: bool = True,
) -> dict[str, MetricAccumulator]:
    """Stream every method's predictions for one direction into its own accumulator."""
    target, source = TARGET_MODALITY[direction], SOURCE_MODALITY[direction]
    truth = data[target]
    features = data["peaks"] if target == "atac" else data["genes"]
    chunk = chunk_cells or min(256, default_chunk_cells(truth.shape[1]))
    accs: dict[str, MetricAccumulator] = {}
    for name, (predictor, meta) in predictors.items():
        acc = MetricAccumulator(target, truth.shape[0], truth.shape[1], feature_names=features)
        sentences = source_sentences(data, direction, meta)
        _accumulate(acc, truth, _model_chunks(predictor, sentences, direction, chunk), chunk, f"{direction} {name}", progress, True)
        accs[name] = acc
    for name, model in baseline_models.items():
        acc = MetricAccumulator(target, truth.shape[0], truth.shape[1], feature_names=features)
        _accumulate(acc, truth, model.predict_chunks(data[source], chunk), chunk, f"{direction} {name}", progress)
        accs[name] = acc
    return accs


def check_evaluation_output(output_dir: str | os.PathLike, dataset_dir: str | os.PathLike, seed_model: str | os.PathLike | None) -> None:
    """Refuse an ``--output_dir`` that is, holds or sits inside the dataset (or seed model) folder, or an existing folder
    that is neither an evaluation nor a model folder (the results are written beside what is there)."""
    check_output(output_dir, {"--dataset_dir": dataset_dir, "--seed_model": seed_model if seed_model and Path(seed_model).exists() else None},
                 "--output_dir")
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()) and folder_kind(path) not in ("evaluation", "model"):
        raise ValueError(f"--output_dir {output_dir} exists and holds other files; choose a new or empty folder for the evaluation")


def _write_outputs(output_dir: Path, files: dict[str, str], figures: Callable[[Path], list[Path]]) -> list[str]:
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        written = sorted(files) + sorted(p.name for p in figures(tmp))
        if not output_dir.exists():
            apply_umask(tmp)
            os.replace(tmp, output_dir)
        else:
            for name in written:
                os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def run_evaluation(
    model: str | os.PathLike | None,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    output_dir: str | os.PathLike | None = None,
    directions: Sequence[str] = DIRECTIONS,
    seed_model: str | os.PathLike | None = None,
    max_cells: int | None = None,
    skip_model: bool = False,
    baselines: Sequence[str] = BASELINES,
    predictor: Predictor | None = None,
    seed_predictor: Predictor | None = None,
    batch_size: int = 64,
    chunk_cells: int | None = None,
    dataset_name: str | None = None,
    update_model_folder: bool = True,
    make_plots: bool = True,
    command: str | None = None,
    progress: bool = True,
    seed: int = 0,
    krr_landmarks: int = 1000,
    refit_baselines: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    bootstrap: int = 0,
    transformer_alone: bool = False,
) -> dict:
    """Evaluate a translator and the baselines on one split; write results, table and plots.

    Parameters
    ----------
    model
        Model folder or Hub id (loaded with ``translator.CellTranslator``); ignored with ``skip_model``
        or when ``predictor`` is given.
    dataset_dir, split
        Dataset folder from ``dataset_builder`` and the split to score. Baselines fit on ``train`` and
        choose their settings on ``validation``.
    output_dir
        Where ``eval_results.json``, ``eval_results.md`` and the PNG plots go (None: write nothing).
    directions
        Any of ``("gex2atac", "atac2gex")``.
    seed_model, seed_predictor
        The paper's binary-GEX model (folder / Hub id, or a predictor): reported as baseline ``seed_binary``.
    max_cells
        Score at most this many cells of the split (evenly spaced).
    predictor
        ``predictor(source_sentences, direction) -> (matrix, sentences or None)`` used instead of a model.
    update_model_folder
        When ``model`` is a local folder, copy the results there and merge ``model-index`` into its README.md.
    krr_landmarks
        Nystroem landmarks of the ``svd_krr`` baseline.
    refit_baselines
        Fit the baselines again on train and validation together once tuned (``fit_baselines(refit=True)``): the fair
        comparison for a model trained on every cell of both.
    allow_pickle
        Load pickle weights (``pytorch_model.bin``) of ``model`` / ``seed_model``; they can run code: only for
        trusted folders (safetensors are always preferred).
    device
        Where the model and seed model run: ``auto`` / None (a GPU when torch sees one), ``cpu``, ``cuda[:N]``.
    bootstrap
        With a model and ``bootstrap`` > 0: that many paired bootstrap resamples of the cells
        (:func:`translator.metrics_core.paired_bootstrap`, seeded by ``seed``), recorded per direction under ``bootstrap``:
        how often the model stays first on each headline metric, and its margin over each method with a standard deviation.
    transformer_alone
        Also score ``model``'s transformer readout without its blend (:mod:`translator.predictor`): per direction
        ``transformer_alone`` (its metrics), ``blend_weights`` (the folder's), and with ``bootstrap`` its paired bootstrap
        against the baselines under ``bootstrap_transformer_alone``. It is not a baseline of the model's bootstrap.

    Returns
    -------
    dict
        The ``eval_results.json`` content.
    """
    start = time.perf_counter()
    if bootstrap < 0:
        raise ValueError(f"--bootstrap must be 0 (off) or a number of resamples, got {bootstrap}")
    unknown = sorted(set(directions) - set(DIRECTIONS))
    if unknown or not directions:
        raise ValueError(f"--directions must be among {DIRECTIONS}, got {list(directions)}")
    if output_dir is not None:
        check_evaluation_output(output_dir, dataset_dir, seed_model)
    data = load_split_matrices(dataset_dir, split, max_cells=max_cells)
    predictors, device = _predictors(data, model, seed_model, predictor, seed_predictor, skip_model, batch_size, allow_pickle, device, transformer_alone)
    train = validation = None
    if baselines:
        train = load_split_matrices(dataset_dir, "train")
        validation = load_split_matrices(dataset_dir, "validation")

    results: dict = {
        "dataset": dataset_name or Path(dataset_dir).resolve().name,
        "split": split,
        "n_cells": int(data["gex"].shape[0]),
        "directions": {},
    }
    extras: dict = {"details": {}, "by_cell_type": {}, "baseline_settings": {}}
    plot_data: dict = {}
    for direction in directions:
        source, target = SOURCE_MODALITY[direction], TARGET_MODALITY[direction]
        models, settings = {}, {}
        if baselines:
            models, settings = fit_baselines(
                source, target, (train[source], train[target]), (validation[source], validation[target]), baselines,
                seed=seed, krr_landmarks=krr_landmarks, refit=refit_baselines,
            )
        accs = evaluate_direction(direction, data, predictors, models, chunk_cells, progress)
        plot_data[direction] = _record_direction(direction, data, accs, predictors, results, extras, bootstrap, seed)
        extras["baseline_settings"][direction] = settings

    results.update(
        accuracy_binary_definition=ACCURACY_DEFINITION,
        baseline_fit="fit on train, hyper-parameters chosen on validation by RMSE"
        + (", then fit again on train and validation together" if refit_baselines else "")
        + (" (these very cells: validation numbers of the tuned baselines are optimistic)" if split == "validation" else ""),
        baseline_settings=extras["baseline_settings"],
        by_cell_type=extras["by_cell_type"],
        details=extras["details"],
        versions=library_versions(),
        model_device=_device_name(device) if device else None,
        command=command or portable_command(sys.argv),
        max_cells=max_cells,
        wall_time_s=round(time.perf_counter() - start, 1),
    )
    if output_dir is not None:
        _write_results(results, Path(output_dir), plot_data if make_plots else None, start)
    if update_model_folder and "model" in predictors and predictor is None and model is not None and Path(model).is_dir():
        folder = Path(model)
        write_text_atomic(folder / "eval_results.json", results_json(results))
        write_text_atomic(folder / "eval_results.md", markdown_table(results))
        from translator.card import merge_model_index

        merge_model_index(folder / "README.md", results)
    return results


def _write_results(results: dict, output_dir: Path, plot_data: dict | None, start: float) -> None:
    """``eval_results.json``, ``eval_results.md`` and the plots (``plot_data`` None: none) into ``output_dir``; the JSON then
    lists the files and the full wall time."""
    table = markdown_table(results)
    results["outputs"] = _write_outputs(
        output_dir,
        {"eval_results.json": results_json(results), "eval_results.md": table},
        lambda folder: _make_plots(folder, plot_data) if plot_data is not None else [],
    )
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_text_atomic(output_dir / "eval_results.json", results_json(results))


def _predictors(data: dict, model, seed_model, predictor: Predictor | None, seed_predictor: Predictor | None, skip_model: bool, batch_size: int,
                allow_pickle: bool, device: str | None, transformer_alone: bool = False) -> tuple[dict[str, tuple[Predictor, dict | None]], str | None]:
    """The model (and, with ``transformer_alone``, its transformer readout without the blend) and the seed model as
    predictors (with their metadata, checked against the dataset's features), and the device they run on (None when no
    model is loaded)."""
    predictors: dict[str, tuple[Predictor, dict | None]] = {}
    if (predictor is None and not skip_model and model is not None) or (seed_predictor is None and seed_model is not None):
        from translator.api import resolve_device

        device = resolve_device(device)  # once, before any model is loaded: a bad --device fails first
    else:
        device = None
    if predictor is not None:
        predictors["model"] = (predictor, None)
    elif not skip_model:
        if model is None:
            raise ValueError("give --model DIR (or a Hub id), or --skip_model to score the baselines only")
        predictors["model"] = translator_predictor(model, batch_size, allow_pickle, device)
        _check_features(predictors["model"][1], data, f"model {model}")
        if transformer_alone:
            predictors[ALONE] = translator_predictor(model, batch_size, allow_pickle, device, transformer_alone=True)
    if seed_predictor is not None:
        predictors["seed_binary"] = (seed_predictor, {"gex_encoding": "binary", "binary_threshold": 2.0})
    elif seed_model is not None:
        predictors["seed_binary"] = translator_predictor(seed_model, batch_size, allow_pickle, device)
        _check_features(predictors["seed_binary"][1], data, f"seed model {seed_model}")
        if predictors["seed_binary"][1].get("gex_encoding") != "binary":
            raise ValueError(f"--seed_model {seed_model} was not trained on binary GEX sentences (gex_encoding is not 'binary')")

    return predictors, device


def _record_direction(direction: str, data: dict, accs: dict[str, MetricAccumulator], predictors: dict, results: dict, extras: dict, bootstrap: int,
                      seed: int) -> dict:
    """Put one direction's scores into ``results`` (metrics, bootstrap) and ``extras`` (details, by cell type); return its plot data."""
    outcome = {name: acc.result(cell_types=data["cell_type"]) for name, acc in accs.items()}
    block: dict = {}
    if "model" in outcome:
        block["model"] = outcome["model"]["metrics"]
    if ALONE in outcome:
        block[ALONE] = outcome[ALONE]["metrics"]
        block["blend_weights"] = (predictors["model"][0].readout.get("blend") or {}).get(direction, {}).get("weights")
    block["baselines"] = {name: out["metrics"] for name, out in outcome.items() if name not in ("model", ALONE)}
    results["directions"][direction] = block
    points = {name: out["metrics"] for name, out in outcome.items()}
    for reference, key in (("model", "bootstrap"), (ALONE, "bootstrap_transformer_alone")):
        if bootstrap and reference in accs:
            others = {name: acc for name, acc in accs.items() if name not in ("model", ALONE) or name == reference}
            results.setdefault(key, {})[direction] = paired_bootstrap(others, reference, bootstrap, seed, point=points)
    extras["details"][direction] = {name: out["details"] for name, out in outcome.items()}
    if data["cell_type"] is not None:
        extras["by_cell_type"][direction] = {name: out["by_cell_type"] for name, out in outcome.items()}
    return {
        "means": {n: a.feature_means() for n, a in accs.items() if n != "zeros"},
        "examples": {n: a.example for n, a in accs.items() if n != "zeros"},
        "curves": {n: a.curves() for n, a in accs.items() if n != "zeros"} if TARGET_MODALITY[direction] == "atac" else None,
        "metrics": {n: o["metrics"] for n, o in outcome.items()},
        "by_type": {n: o["by_cell_type"] for n, o in outcome.items() if "by_cell_type" in o and n != "zeros"},
    }


def _make_plots(folder: Path, plot_data: dict) -> list[Path]:
    paths = []
    for direction, pdata in plot_data.items():
        if pdata["means"]:
            paths.append(plots.plot_feature_means(pdata["means"], direction, folder / f"{direction}_feature_means.png"))
        examples = {n: e for n, e in pdata["examples"].items() if e}
        if examples:
            paths.append(plots.plot_cell_example(examples, direction, TARGET_MODALITY[direction], folder / f"{direction}_cell_example.png"))
        if pdata["curves"]:
            paths.append(plots.plot_roc_pr(pdata["curves"], pdata["metrics"], folder / f"{direction}_roc_pr.png"))
        if pdata["by_type"]:
            paths.append(plots.plot_cell_type_bars(pdata["by_type"], direction, folder / f"{direction}_cell_type_rmse.png"))
    return paths
