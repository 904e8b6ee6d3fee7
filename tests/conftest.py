"""Shared fixtures: the real multiome data in ../shared/data, skipped with a reason when absent."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELL_SENTENCES_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not found at {path}: the test needs ../shared/data beside the checkout")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (a fresh clone elsewhere lacks ../shared/data)")
    return SHARED_DATA


def run_in_process(cli: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """What ``python -m MODULE ARGV`` would give (exit code, stderr) for a command whose ``cli(argv)`` this process runs:
    the same one-line errors without a new interpreter importing torch (argparse's exits included)."""
    capsys.readouterr()
    try:
        code = cli(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    return subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)
