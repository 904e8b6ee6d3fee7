"""train.py on real data: learning, the model folder, resume (clean and after SIGKILL), DDP on CPU, refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.conftest import REPO, shared_file
from tests.translator_fixtures import BMMC_COMBINED, build_real, tiny_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bmmc(tmp_path_factory):
    torch.set_num_threads(1)  # tiny steps: thread hand-offs cost more than they save on 2 shared cores
    return build_real(tmp_path_factory.mktemp("bmmc"), shared_file(BMMC_COMBINED))


def _train(argv: list[str]) -> None:
    import train

    assert train.main(argv) == 0


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert np.array_equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def straight_run(bmmc, tmp_path_factory):
    """A 12-step run with checkpoints every 4 steps (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    _train(tiny_args(*bmmc, out, "--max_steps", "12", "--checkpointing_steps", "4", "--eval_steps", "6", "--calibration_cells", "0"))
    return out


def test_tiny_model_learns_and_the_folder_loads_offline(bmmc, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from translator import CellTranslator

    out = tmp_path / "model"
    _train(tiny_args(*bmmc, out, "--max_steps", "40", "--eval_steps", "10", "--checkpointing_steps", "0", blend=True))
    args = json.loads((out / "training_args.json").read_text())
    losses = [h["validation_loss"] for h in args["validation_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "cell_sentences.json",
            "readout.json", "README.md", "training_args.json"} <= {p.name for p in out.iterdir()}
    text = (out / "training_args.json").read_text() + (out / "README.md").read_text()
    assert str(tmp_path) not in text and "/work/" not in text  # no absolute paths
    readout = json.loads((out / "readout.json").read_text())
    assert set(readout["calibration"]) == {"gex2atac", "atac2gex"}

    import datasets

    cells = datasets.load_from_disk(str(bmmc[0]))["validation"].select(range(6))
    first = CellTranslator.from_pretrained(out)
    atac, sentences = first.predict_matrix(cells["gex_text"], "gex2atac", return_sentences=True)
    gex = first.predict_matrix(cells["atac_text"], "atac2gex")
    assert atac.shape == (6, len(first.meta["peaks"])) and gex.shape == (6, len(first.meta["genes"]))
    assert 0 <= atac.min() and atac.max() <= 1 and gex.min() >= 0
    # Save the loaded model again beside the other files: same predictions.
    copy = tmp_path / "copy"
    first.model.save_pretrained(copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "cell_sentences.json", "readout.json", "profile_head.safetensors", "blend.safetensors"):
        if name != "blend.safetensors" or (out / name).exists():
            (copy / name).write_bytes((out / name).read_bytes())
    second = CellTranslator.from_pretrained(copy)
    np.testing.assert_array_equal(second.predict_matrix(cells["gex_text"], "gex2atac"), atac)
    np.testing.assert_array_equal(second.predict_matrix(cells["atac_text"], "atac2gex"), gex)
    assert second.translate(cells["gex_text"], "gex2atac") == sentences
    # Plain transformers, offline: a generate() gives names without repeats.
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out))
    ids = tok(["<atac2gex> " + cells["atac_text"][0]], return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=20)[0].tolist()
    body = [t for t in generated if t > 1]
    assert len(body) == len(set(body))


def test_resume_ends_with_the_same_weights(bmmc, straight_run, tmp_path):
    out = tmp_path / "resumed"
    base = tiny_args(*bmmc, out, "--max_steps", "12", "--checkpointing_steps", "4", "--eval_steps", "6", "--calibration_cells", "0")
    _train([*base, "--stop_after_steps", "6"])  # stops between checkpoints 4 and 8
    assert not (out / "model.safetensors").exists()
    _train([*base, "--resume_from_checkpoint", "latest"])
    _assert_same_weights(straight_run, out)


def test_interrupted_checkpoint_save_leaves_the_previous_one_usable(bmmc, straight_run, tmp_path):
    from translator.training import resolve_checkpoint

    out = tmp_path / "torn"
    base = tiny_args(*bmmc, out, "--max_steps", "12", "--checkpointing_steps", "4", "--eval_steps", "6", "--calibration_cells", "0")
    _train([*base, "--stop_after_steps", "8"])
    # What a kill during the save of step 12 leaves behind: a half-written temporary folder.
    torn = out / "checkpoints" / ".tmp-step_12"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(out, "latest").name == "step_8"
    _train([*base, "--resume_from_checkpoint", "latest"])
    _assert_same_weights(straight_run, out)


def test_sigkill_during_training_then_resume_matches(bmmc, tmp_path):
    def args(folder: Path) -> list[str]:
        return tiny_args(*bmmc, folder, "--max_steps", "12", "--checkpointing_steps", "4", "--eval_steps", "6", "--calibration_cells", "0")

    def train_in_subprocess(argv: list[str]) -> None:
        subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=300)

    # The reference runs in the same environment as the killed run: OMP_NUM_THREADS=1 and an in-process
    # torch.set_num_threads(1) can pick different CPU kernels, whose float sums differ in the last bits.
    straight = tmp_path / "straight"
    train_in_subprocess(args(straight))
    out = tmp_path / "killed"
    base = args(out)
    proc = subprocess.Popen([sys.executable, "train.py", *base], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_4").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "model.safetensors").exists()
    train_in_subprocess([*base, "--resume_from_checkpoint", "latest"])
    _assert_same_weights(straight, out)


def test_second_run_on_the_same_output_dir_refuses(bmmc, straight_run):
    result = subprocess.run([sys.executable, "train.py", *tiny_args(*bmmc, straight_run, "--max_steps", "2")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "exists" in result.stderr and "--overwrite_output_dir" in result.stderr and "Traceback" not in result.stderr


def test_a_run_in_progress_locks_its_output_dir(bmmc, tmp_path):
    import train
    from translator.training import claim_output_dir

    out = tmp_path / "busy"
    with claim_output_dir(out, replace=False):  # what a run in progress holds
        # Even --overwrite_output_dir must not remove a folder another run is writing.
        with pytest.raises(FileExistsError, match="in use by another train.py run"):
            train.main(tiny_args(*bmmc, out, "--overwrite_output_dir", "--max_steps", "2"))
    assert not list(tmp_path.glob(".*.lock"))  # the lock goes with the run that held it
    assert train.main(tiny_args(*bmmc, out, "--overwrite_output_dir", "--max_steps", "2", "--calibration_cells", "0")) in (0, None)
    assert (out / "model.safetensors").exists()


def test_bad_flags_get_one_line_errors(bmmc, tmp_path):
    import train

    with pytest.raises(ValueError, match="--model_size"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--model_size", "huge", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--per_device_train_batch_size"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--per_device_train_batch_size", "0", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--max_gex_target_length"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--max_gex_target_length", "1", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--gex_target_min_value"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--gex_target_min_value", "-1", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--profile_ranks must be positive"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--profile_ranks", "4", "0", "--max_steps", "2"))
    with pytest.raises(ValueError, match=r"--training_share must be in \(0, 1\]"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--training_share", "0", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--eval_steps must be >= 0, or -1 for the automatic choice"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--eval_steps", "-2", "--max_steps", "2"))
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="--directions"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--directions", "gex2rna", "--max_steps", "2"))
    with pytest.raises(ValueError, match=r"--weight_average_fraction must be in \[0, 1\]"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--weight_average_fraction", "1.5", "--max_steps", "2"))
    with pytest.raises(ValueError, match="--max_train_seconds must be a number of seconds >= 0"):
        train.main(tiny_args(*bmmc, tmp_path / "x", "--max_train_seconds", "-5", "--max_steps", "2"))
    assert not (tmp_path / "x").exists()


def test_weight_averaging_is_the_mean_of_the_last_steps_and_resumes(bmmc, tmp_path):
    """--weight_average_fraction 0.3 of 6 steps: the model folder holds the mean of the weights after steps 5 and 6
    (checkpoints of a plain run), and a run stopped after step 5 and resumed ends with the same bits."""
    import train

    flags = ("--max_steps", "6", "--checkpointing_steps", "1", "--eval_steps", "6", "--calibration_cells", "0")
    base = tiny_args(*bmmc, tmp_path / "plain", *flags)
    _train(base)
    final = _weights(tmp_path / "plain")
    steps = [load_file(str(tmp_path / "plain" / "checkpoints" / f"step_{k}" / "model.safetensors")) for k in (5, 6)]
    _train(tiny_args(*bmmc, tmp_path / "avg", *flags, "--weight_average_fraction", "0.3"))
    got = _weights(tmp_path / "avg")
    compared = 0
    for key, value in got.items():
        if f"model.{key}" in steps[0]:
            expected = (steps[0][f"model.{key}"] + steps[1][f"model.{key}"]) / 2
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=key)
            compared += 1
    assert compared > 10 and not all(np.array_equal(got[k], final[k]) for k in got)
    resumed = tiny_args(*bmmc, tmp_path / "resumed", *flags, "--weight_average_fraction", "0.3")
    _train([*resumed, "--stop_after_steps", "5"])
    _train([*resumed, "--resume_from_checkpoint", "latest"])
    _assert_same_weights(tmp_path / "avg", tmp_path / "resumed")
    with pytest.raises(ValueError, match="was written without --weight_average_fraction"):
        train.main([*base, "--weight_average_fraction", "0.3", "--resume_from_checkpoint", "latest"])


def test_a_time_limit_ends_training_early_and_writes_the_folder(bmmc, tmp_path):
    """--max_train_seconds: a run planned for 300 steps whose limit has passed after its first step writes a complete
    folder with step 1's weights under the planned schedule (those of a checkpoint after step 1 of the plain 300-step run;
    the tail average, not begun, is not applied) and says so in training_args.json. --tf32 is recorded and leaves CPU runs alone."""
    flags = ("--max_steps", "300", "--eval_steps", "0", "--calibration_cells", "0")
    _train(tiny_args(*bmmc, tmp_path / "plain", *flags, "--checkpointing_steps", "1", "--stop_after_steps", "1"))
    cuda_precision = torch.backends.cuda.matmul.fp32_precision
    try:
        _train(tiny_args(*bmmc, tmp_path / "cut", *flags, "--checkpointing_steps", "0", "--max_train_seconds", "1e-9",
                         "--weight_average_fraction", "0.5", "--tf32"))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = cuda_precision
    args = json.loads((tmp_path / "cut" / "training_args.json").read_text())
    assert (args["completed_steps"], args["planned_steps"], args["stopped_by_time_limit"], args["tf32"]) == (1, 300, True, True)
    step1 = load_file(str(tmp_path / "plain" / "checkpoints" / "step_1" / "model.safetensors"))
    got = _weights(tmp_path / "cut")
    compared = 0
    for key, value in got.items():
        if f"model.{key}" in step1:
            assert np.array_equal(value, step1[f"model.{key}"]), key
            compared += 1
    assert compared > 10
    assert (tmp_path / "cut" / "readout.json").exists()
    assert "1 steps (of 300 planned: stopped by --max_train_seconds)" in (tmp_path / "cut" / "README.md").read_text()


def test_a_diverging_run_stops_at_once_and_writes_nothing(bmmc, tmp_path):
    """A learning rate far too high sends the loss to inf / nan within a few steps: train.py stops at the next log line
    with one error naming the flags to change, instead of training on nan and failing later in the readout fit."""
    import train

    out = tmp_path / "diverged"
    with pytest.raises(ValueError, match=r"training diverged by step \d+ \(train loss (nan|inf)\); no model was written to .*--learning_rate"):
        train.main(tiny_args(*bmmc, out, "--learning_rate", "1e6", "--warmup_steps", "0", "--max_steps", "40", "--logging_steps", "1"))
    assert not out.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_run(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL the launcher's process group and any worker still running for ``out`` (torchrun's workers
    can sit in their own process group, and an orphan keeps the output pipes open)."""
    os.killpg(proc.pid, signal.SIGKILL)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if str(out).encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def run_two_processes(cmd: list[str], out: Path, env: dict) -> tuple[str, str]:
    """Run a 2-process launch of train.py writing ``out``; its stdout and stderr once it succeeded, both ranks
    ending with the same parameter checksum (a run still going after DDP_TEST_TIMEOUT seconds is killed)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timeout = float(os.environ.get("DDP_TEST_TIMEOUT", 240))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_run(proc, out)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"2-process run still going after {timeout:.0f} s\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-6000:]}")
    finally:
        if proc.poll() is None:
            _kill_run(proc, out)
            proc.wait()
    assert proc.returncode == 0, stdout[-1000:] + stderr[-3000:]
    sums = dict(re.findall(r"rank (\d) parameter checksum ([0-9a-f]{16})", stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], stdout[-2000:]
    return stdout, stderr


def test_ddp_on_two_cpu_processes_stays_in_step(bmmc, tmp_path):
    # accelerate 1.15: `launch --num_processes 2 --cpu` starts one process; --multi_gpu with ACCELERATE_USE_CPU=1 starts two.
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "train.py",
           *tiny_args(*bmmc, out, "--max_steps", "4", "--checkpointing_steps", "0", "--calibration_cells", "0")]
    stdout, stderr = run_two_processes(cmd, out, {**ENV, "ACCELERATE_USE_CPU": "1"})
    # The DDP wrapper was freed before the process group (else a rank can hang at exit in ~ProcessGroupGloo).
    assert "DDP wrapper is still referenced" not in stderr, stderr[-3000:]
    assert json.loads((out / "training_args.json").read_text())["num_processes"] == 2


def test_gene_order_targets_are_recorded_and_decoded_in_gene_order(bmmc, tmp_path):
    # Also the run of --gex_target_min_value and --profile_ranks (the reduced-rank report lands in readout.json).
    import datasets

    from translator import CellTranslator

    out = tmp_path / "gene_order"
    _train(tiny_args(*bmmc, out, "--max_steps", "6", "--eval_steps", "0", "--checkpointing_steps", "0",
                     "--calibration_cells", "8", "--gex_target_order", "gene", "--gex_target_min_value", "1.0", "--profile_ranks", "2", "4"))
    assert json.loads((out / "cell_sentences.json").read_text())["gex_target_order"] == "gene"
    args = json.loads((out / "training_args.json").read_text())
    assert args["gex_target_min_value"] == 1.0 and args["profile_ranks"] == [2, 4]
    refit = json.loads((out / "readout.json").read_text())["profile_refit"]
    for direction in ("gex2atac", "atac2gex"):
        reduced = refit[direction]["reduced_rank"]
        assert set(reduced["validation_rmse"]) == {"0", "2", "4"} and reduced["rank"] in (0, 2, 4)
        assert reduced["validation_rmse"][str(reduced["rank"])] == min(reduced["validation_rmse"].values())
    translator = CellTranslator.from_pretrained(out)
    cells = datasets.load_from_disk(str(bmmc[0]))["validation"].select(range(4))
    sentences = translator.translate(cells["atac_text"], "atac2gex")
    assert max(len(s.split()) for s in sentences) >= 2  # something to be in order
    for sentence in sentences:
        ids = translator.tokenizer.convert_tokens_to_ids(sentence.split())
        assert all(a < b for a, b in zip(ids, ids[1:], strict=False))  # gene order, as trained


def test_early_stopping_ends_training_and_keeps_the_best_validations_weights(bmmc, tmp_path):
    """Validation every 3 steps at a learning rate too high to keep improving: training ends at the first validation that
    brings no lower loss, and the folder holds the weights of the best one (those of its checkpoint), not the last step's."""
    out = tmp_path / "early"
    _train(tiny_args(*bmmc, out, "--max_steps", "300", "--eval_steps", "3", "--checkpointing_steps", "3", "--early_stopping_patience", "1",
                     "--learning_rate", "3e-2", "--warmup_steps", "0", "--calibration_cells", "0", "--no_profile_refit"))
    args = json.loads((out / "training_args.json").read_text())
    losses = [h["validation_loss"] for h in args["validation_history"]]
    best = int(np.argmin(losses))
    assert args["completed_steps"] < 300 and args["early_stopped_at"] == args["completed_steps"]
    assert best == len(losses) - 2 and losses[-1] >= losses[best]
    assert args["best_validation_step"] == args["validation_history"][best]["step"]
    card = (out / "README.md").read_text()
    assert f"early stopping on the validation loss), the weights of step {args['best_validation_step']} (lowest validation loss)" in card
    saved = load_file(str(out / "checkpoints" / f"step_{args['best_validation_step']}" / "model.safetensors"))
    got = _weights(out)
    assert all(np.array_equal(value, saved[f"model.{key}"]) for key, value in got.items() if f"model.{key}" in saved)


def test_a_setting_that_cannot_fit_in_memory_is_refused_before_anything_is_written(bmmc, tmp_path, monkeypatch):
    import train
    from translator import training

    monkeypatch.setattr(training, "available_memory", lambda: 2.0**30)
    with pytest.raises(ValueError, match=r"^--model_size t5-small with [\d,]+ names, batch 256 and caps 512/512 needs about [\d.]+ GiB of memory "
                                         r"\(activations [\d.]+ GiB\) and 1\.0 GiB are available: lower --per_device_train_batch_size"):
        train.main(tiny_args(*bmmc, tmp_path / "big", "--model_size", "t5-small", "--per_device_train_batch_size", "256",
                             "--max_source_length", "512", "--max_target_length", "512", "--max_steps", "2"))
    assert not (tmp_path / "big").exists()
