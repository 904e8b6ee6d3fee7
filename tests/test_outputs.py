"""Outputs never destroy inputs, and every command fails in one line: overwrite flags, full disks, Ctrl-C, locks, modes.

Each command is pointed at its own inputs (the folder holding them, the input file itself, a folder inside an input)
with and without its overwrite flag: it must refuse in one line and leave every input byte for byte as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dataset_builder.cli import environment_error, run_cli
from dataset_builder.outputs import (
    apply_umask,
    atomic_file,
    check_output,
    check_replaceable,
    folder_kind,
    write_text_atomic,
)
from tests.conftest import REPO
from tests.translator_fixtures import make_dataset_and_tokenizer, tiny_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) -> the sha256 of its bytes."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _one_error_line(stderr: str, *needles: str) -> str:
    """The last stderr line names the problem; nothing but progress logs comes before it, and no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("dataset_builder.") and "%|" not in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A user's folder of input files, a dataset, a tokenizer and a trained tiny model."""
    import train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("outputs")
    data, tok = make_dataset_and_tokenizer(root, n_cells=60, n_genes=20, n_peaks=30)
    model = root / "model"
    assert train.main(tiny_args(data, tok, model, "--max_steps", "2", "--checkpointing_steps", "0", "--calibration_cells", "8",
                                "--max_eval_cells", "8")) == 0
    import json

    meta = json.loads((model / "cell_sentences.json").read_text())
    rng = np.random.default_rng(0)
    userdata = root / "userdata"
    userdata.mkdir()
    cells = pd.DataFrame({"batch": ["b1"] * 4 + ["b2"] * 4 + ["b3"] * 4}, index=[f"c{i}" for i in range(12)])
    gex = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, size=(12, len(meta["genes"]))).astype(np.float32)), obs=cells,
                     var=pd.DataFrame(index=meta["genes"]))
    atac = ad.AnnData(X=sp.csr_matrix((rng.random((12, len(meta["peaks"]))) < 0.3).astype(np.float32)), obs=cells,
                      var=pd.DataFrame(index=meta["peaks"]))
    gex.write_h5ad(userdata / "base_rna.h5ad")
    atac.write_h5ad(userdata / "base_atac.h5ad")
    (userdata / "notes.txt").write_text("a user's own notes")
    return {"root": root, "data": data, "tok": tok, "model": model, "userdata": userdata}


# -- the path checks themselves ------------------------------------------------------------------------------------------

def test_check_output_refuses_an_input_a_folder_holding_one_and_a_path_inside_one(tmp_path):
    source = tmp_path / "in" / "data.h5ad"
    source.parent.mkdir()
    source.write_bytes(b"x")
    folder = tmp_path / "dataset"
    folder.mkdir()
    (tmp_path / "link").symlink_to(source)
    cases = {source: "is the input", tmp_path / "in": "contains the input", folder / "sub": "is inside the input", tmp_path / "link": "is the input"}
    for output, relation in cases.items():
        with pytest.raises(ValueError, match=relation) as err:
            check_output(output, {"--input": [source], "--dataset": folder}, "--output_dir")
        assert "\n" not in str(err.value)
    check_output(tmp_path / "new", {"--input": [source], "--dataset": folder, "--unused": None}, "--output_dir")


def test_overwrite_replaces_only_what_this_tool_wrote(setup, tmp_path):
    assert folder_kind(setup["data"]) == "dataset" and folder_kind(setup["tok"]) == "tokenizer" and folder_kind(setup["model"]) == "model"
    assert folder_kind(setup["userdata"]) is None
    for kind in ("dataset", "tokenizer", "model"):
        with pytest.raises(ValueError, match="never replaces it"):
            check_replaceable(setup["userdata"], "--output_dir", kind, True, "--overwrite_output_dir")
    with pytest.raises(ValueError, match="not a tokenizer folder"):
        check_replaceable(setup["model"], "--output_dir", "tokenizer", True, "--overwrite_output_dir")
    with pytest.raises(FileExistsError, match="pass --overwrite_output_dir"):
        check_replaceable(setup["data"], "--output_dir", "dataset", False, "--overwrite_output_dir")
    check_replaceable(setup["data"], "--output_dir", "dataset", True, "--overwrite_output_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty, "--output_dir", "model", False, "--overwrite_output_dir")
    with pytest.raises(ValueError, match="not a prediction file"):
        check_replaceable(setup["userdata"] / "base_rna.h5ad", "--output", "prediction", True, "--overwrite")


# -- every command line, pointed at its own inputs ---------------------------------------------------------------------

def _default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt, even when the suite runs where SIGINT is ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, preexec_fn=_default_sigint)


def _cli(args: list[str], capsys) -> subprocess.CompletedProcess:
    """``_run``'s result for a command run in this process (``-m dataset_builder``, ``-m tokenizer``, ``predict.py``, ``eval.py``)."""
    import eval as eval_cli
    import predict
    from dataset_builder.__main__ import main as build
    from tokenizer.__main__ import main as tokenize

    mains = {"dataset_builder": build, "tokenizer": tokenize, "predict.py": predict.main, "eval.py": eval_cli.cli}
    name, argv = (args[1], args[2:]) if args[0] == "-m" else (args[0], args[1:])
    capsys.readouterr()
    try:
        code = mains[name](argv)
    except SystemExit as exit_:
        code = exit_.code
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def test_the_builder_never_writes_over_its_inputs(setup, tmp_path, capsys):
    user = setup["userdata"]
    before = _digest(user)
    rna, atac = str(user / "base_rna.h5ad"), str(user / "base_atac.h5ad")
    inputs = ["-m", "dataset_builder", "--input", rna, "--input", atac]
    for output, relation in ((user, "contains the input"), (user / "base_rna.h5ad", "is the input"), (user / "base_rna.h5ad" / "x", "is inside")):
        for flags in ([], ["--overwrite_output_dir"]):
            proc = _cli([*inputs, "--output_dir", str(output), *flags], capsys)
            assert proc.returncode == 2
            _one_error_line(proc.stderr, relation)
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("mine")
    proc = _cli([*inputs, "--output_dir", str(foreign), "--overwrite_output_dir"], capsys)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "is not a dataset folder")
    assert (foreign / "table.csv").read_text() == "mine"
    assert _digest(user) == before and sorted(p.name for p in user.iterdir()) == ["base_atac.h5ad", "base_rna.h5ad", "notes.txt"]
    # Its own folder is replaced when asked.
    built = tmp_path / "ds"
    assert _cli([*inputs, "--output_dir", str(built)], capsys).returncode == 0
    assert _cli([*inputs, "--output_dir", str(built), "--overwrite_output_dir"], capsys).returncode == 0
    assert folder_kind(built) == "dataset" and _digest(user) == before


def test_the_tokenizer_never_writes_over_its_dataset(setup, tmp_path, capsys):
    before = _digest(setup["data"])
    for output in (setup["data"], setup["data"] / "train"):
        proc = _cli(["-m", "tokenizer", "--dataset", str(setup["data"]), "--output_dir", str(output), "--overwrite_output_dir"], capsys)
        assert proc.returncode == 2
        _one_error_line(proc.stderr, "--dataset")
    proc = _cli(["-m", "tokenizer", "--dataset", str(setup["data"]), "--output_dir", str(setup["model"]), "--overwrite_output_dir"], capsys)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "not a tokenizer folder")
    assert _digest(setup["data"]) == before


def test_train_never_writes_over_its_dataset_or_tokenizer(setup, tmp_path):
    import train

    before = {**_digest(setup["data"]), **_digest(setup["tok"])}
    for output, flag in ((setup["data"], "--dataset_dir"), (setup["tok"], "--tokenizer_dir"), (setup["data"] / "model", "--dataset_dir")):
        with pytest.raises(ValueError, match=f"the input {flag}"):
            train.main(tiny_args(setup["data"], setup["tok"], output, "--overwrite_output_dir", "--max_steps", "2"))
    with pytest.raises(ValueError, match="is not a model folder"):
        train.main(tiny_args(setup["data"], setup["tok"], setup["userdata"], "--overwrite_output_dir", "--max_steps", "2"))
    # A tokenizer given as the dataset is refused before the output folder exists.
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="--dataset_dir .* is not a dataset folder"):
        train.main(tiny_args(setup["tok"], setup["tok"], out, "--max_steps", "2"))
    assert not out.exists() and not list(tmp_path.glob(".*lock"))
    assert {**_digest(setup["data"]), **_digest(setup["tok"])} == before


def test_predict_and_eval_never_write_over_their_inputs(setup, tmp_path, capsys):
    user = setup["userdata"]
    before = _digest(user)
    rna = str(user / "base_rna.h5ad")
    argv = ["predict.py", "--model", str(setup["model"]), "--input", rna, "--direction", "gex2atac"]
    proc = _cli([*argv, "--output", rna, "--overwrite"], capsys)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "is the input --input")
    other = tmp_path / "other.h5ad"
    ad.read_h5ad(rna).write_h5ad(other)  # the user's data, not given as input
    proc = _cli([*argv, "--output", str(other), "--overwrite"], capsys)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "not a prediction file")
    assert _digest(user) == before
    # A prediction is replaced when asked, and gets the umask's mode like any new file.
    pred = tmp_path / "pred.h5ad"
    assert _cli([*argv, "--output", str(pred)], capsys).returncode == 0
    assert _cli([*argv, "--output", str(pred), "--overwrite"], capsys).returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    assert pred.stat().st_mode & 0o777 == 0o666 & ~mask
    proc = _cli(["eval.py", "--skip_model", "--dataset_dir", str(setup["data"]), "--output_dir", str(setup["data"] / "eval"), "--no_plots"], capsys)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "is inside the input --dataset_dir")
    assert not (setup["data"] / "eval").exists()


def test_outputs_made_through_temporary_files_get_the_umask(setup, tmp_path):
    from tokenizer import build_from_dataset

    mask = os.umask(0o027)
    try:
        build_from_dataset(setup["data"], tmp_path / "tok")
        single = tmp_path / "f"
        single.write_text("x")
        os.chmod(single, 0o600)
        apply_umask(single)
    finally:
        os.umask(mask)
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o750
    assert single.stat().st_mode & 0o777 == 0o640


# -- one way to fail ---------------------------------------------------------------------------------------------------

def test_a_wrapped_full_disk_or_permission_error_is_one_line(capsys):
    class LibraryError(Exception):
        pass

    def full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/out/part-0.arrow")
        except OSError as err:
            raise LibraryError("An error occurred while generating the dataset") from err

    assert run_cli(full) == 1
    _one_error_line(capsys.readouterr().err, "no space left", "/data/out/part-0.arrow")
    # safetensors reports the disk in its message only
    assert "no space left" in environment_error(RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'))
    def not_allowed():
        raise PermissionError(errno.EACCES, "Permission denied", "/shared/lab/out")

    assert run_cli(not_allowed) == 1
    _one_error_line(capsys.readouterr().err, "permission denied", "/shared/lab/out")
    with pytest.raises(ZeroDivisionError):  # a defect still shows its traceback
        run_cli(lambda: 1 / 0)


def test_ctrl_c_is_one_line_and_exit_code_130(capsys):
    cleaned = []

    def body():
        try:
            raise KeyboardInterrupt
        finally:
            cleaned.append(True)

    assert run_cli(body) == 130 and cleaned == [True]
    _one_error_line(capsys.readouterr().err, "interrupted")


def test_a_full_disk_while_the_builder_writes_leaves_nothing_behind(setup, tmp_path):
    out = tmp_path / "built" / "ds"
    script = (
        "import errno, sys\n"
        "import dataset_builder.builder as b\n"
        "def full(split, path):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "b._save_split = full\n"
        "from dataset_builder.__main__ import main\n"
        "sys.exit(main(['--input', sys.argv[1], '--input', sys.argv[2], '--output_dir', sys.argv[3]]))\n"
    )
    user = setup["userdata"]
    proc = _run(["-c", script, str(user / "base_rna.h5ad"), str(user / "base_atac.h5ad"), str(out)])
    assert proc.returncode == 1
    _one_error_line(proc.stderr, "no space left")
    assert not out.exists() and list((tmp_path / "built").iterdir()) == []


def test_real_ctrl_c_during_a_build_leaves_nothing_behind(setup, tmp_path):
    out = tmp_path / "built" / "ds"
    script = (
        "import os, signal, sys\n"
        "import dataset_builder.builder as b\n"
        "digest = b.content_digest\n"
        "def interrupting(plan):\n"
        "    value = digest(plan)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return value\n"
        "b.content_digest = interrupting\n"
        "from dataset_builder.__main__ import main\n"
        "sys.exit(main(['--input', sys.argv[1], '--input', sys.argv[2], '--output_dir', sys.argv[3]]))\n"
    )
    user = setup["userdata"]
    proc = _run(["-c", script, str(user / "base_rna.h5ad"), str(user / "base_atac.h5ad"), str(out)])
    assert proc.returncode == 130, proc.stderr[-2000:]
    _one_error_line(proc.stderr, "interrupted")
    assert not out.exists() and list((tmp_path / "built").iterdir()) == []


def test_real_ctrl_c_during_training_keeps_the_checkpoint_and_drops_the_lock(setup, tmp_path):
    out = tmp_path / "run"
    argv = tiny_args(setup["data"], setup["tok"], out, "--max_steps", "400", "--checkpointing_steps", "2", "--calibration_cells", "0")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_2").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert (out / "checkpoints").is_dir() and not (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".*.lock"))


def test_a_full_disk_at_the_final_save_keeps_the_checkpoint(setup, tmp_path, capsys):
    import train

    out = tmp_path / "run"

    def full(*args, **kwargs):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    saved = train.write_model_folder
    train.write_model_folder = full
    try:
        code = run_cli(lambda: train.main(tiny_args(setup["data"], setup["tok"], out, "--max_steps", "2", "--checkpointing_steps", "2",
                                                    "--calibration_cells", "0")))
    finally:
        train.write_model_folder = saved
    assert code == 1
    assert "no space left" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_2").is_dir() and not list(tmp_path.glob(".*.lock"))


def test_train_refuses_to_start_without_room_for_its_folder(setup, tmp_path, monkeypatch):
    import shutil

    import train

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="MiB free and the output .the model folder"):
        train.main(tiny_args(setup["data"], setup["tok"], out, "--max_steps", "2"))
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_predict_refuses_in_one_line_when_the_disk_cannot_hold_the_prediction(setup, tmp_path, monkeypatch):
    import shutil

    import predict

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    output = tmp_path / "pred.h5ad"
    argv = ["--model", str(setup["model"]), "--input", str(setup["userdata"] / "base_rna.h5ad"), "--direction", "gex2atac", "--output", str(output)]
    assert predict.main(argv) == 2
    assert not output.exists() and not list(tmp_path.iterdir())


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that allows the mount; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or made.returncode}); the monkeypatched tests cover the same paths")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_gives_one_line_and_leaves_it_empty(setup, tmp_path, full_disk):
    rng = np.random.default_rng(2)
    user = tmp_path / "big"
    user.mkdir()
    cells = pd.DataFrame(index=[f"c{i}" for i in range(4000)])
    genes = ad.read_h5ad(setup["userdata"] / "base_rna.h5ad").var_names
    ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, size=(4000, len(genes))).astype(np.float32)), obs=cells, var=pd.DataFrame(index=genes)).write_h5ad(user / "rna.h5ad")
    peaks = pd.DataFrame(index=[f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(1, 1201)])
    atac = sp.random(4000, len(peaks), density=0.05, format="csr", dtype=np.float32, random_state=2)
    atac.data[:] = 1
    ad.AnnData(X=atac, obs=cells, var=peaks).write_h5ad(user / "atac.h5ad")
    proc = _run(["-m", "dataset_builder", "--input", str(user / "rna.h5ad"), "--input", str(user / "atac.h5ad"), "--output_dir", str(full_disk / "ds")])
    assert proc.returncode == 1
    _one_error_line(proc.stderr, "no space left")
    proc = _run(["predict.py", "--model", str(setup["model"]), "--input", str(user / "rna.h5ad"), "--direction", "gex2atac", "--output", str(full_disk / "p.h5ad")])
    assert proc.returncode == 2
    assert "MiB free" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert list(full_disk.iterdir()) == []


def test_atomic_file_replaces_only_when_the_writer_finishes(tmp_path):
    target = tmp_path / "sub" / "fold.h5ad"
    with atomic_file(target, suffix=".h5ad") as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".h5ad" and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["fold.h5ad"]
    write_text_atomic(target, b"bytes")
    assert target.read_bytes() == b"bytes" and sorted(p.name for p in target.parent.iterdir()) == ["fold.h5ad"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_reads_a_dataset_folder_that_has_no_validation_split(setup, tmp_path):
    """A dataset pushed without validation cells comes back from the Hub with train and test only."""
    import shutil

    import datasets

    import train

    splits = datasets.load_from_disk(str(setup["data"]))
    folder = tmp_path / "from_hub"
    datasets.DatasetDict({"train": splits["train"], "test": splits["test"]}).save_to_disk(str(folder))
    shutil.copy(setup["data"] / "cell_sentences.json", folder / "cell_sentences.json")
    out = tmp_path / "model"
    assert train.main(tiny_args(folder, setup["tok"], out, "--max_steps", "2", "--checkpointing_steps", "0")) == 0
    assert (out / "model.safetensors").exists()
