"""A built wheel installed into a fresh virtual environment gives working commands and the Python API, with no source tree.

The wheel is built from a copy of the tracked files (``pip wheel --no-deps --no-build-isolation``) and installed with
``--no-deps`` into a new venv that sees this environment's site-packages (the dependencies) through a ``.pth`` line, so
nothing is downloaded. Every command then runs from a folder outside the repository.

It takes minutes (a wheel build, then each command imports torch and transformers): it runs when
``CELL_SENTENCES_WHEEL_TEST=1`` is set, e.g. ``CELL_SENTENCES_WHEEL_TEST=1 python -m pytest -q tests/test_wheel.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(os.environ.get("CELL_SENTENCES_WHEEL_TEST") != "1",
                                reason="builds and installs a wheel (minutes): set CELL_SENTENCES_WHEEL_TEST=1 to run it")
COMMANDS = ("cell-sentences-build", "cell-sentences-tokenize", "cell-sentences-train", "cell-sentences-predict", "cell-sentences-eval",
            "cell-sentences-recalibrate", "cell-sentences-ensemble", "cell-sentences-stack")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, a working folder outside the repository, the environment to run in)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout: the wheel is built from the tracked files")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file() and not name.startswith(("tests/", "bench/", "docs/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(source)], root, env)
    wheels = list((root / "dist").glob("cell_sentences-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies from this environment; its .pth files (an editable install of the repository) are not read
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheels[0])], root, env)
    work = root / "work"
    work.mkdir()
    return venv, work, env


@pytest.mark.parametrize("command", COMMANDS)
def test_console_command_from_the_wheel_answers_help(installed, command):
    venv, work, env = installed
    proc = _run([str(venv / "bin" / command), "--help"], work, env)
    assert "usage" in proc.stdout.lower() and "--" in proc.stdout


def test_python_api_from_the_wheel_without_the_source_tree(installed):
    venv, work, env = installed
    listed = ("from importlib.metadata import distribution\n"
              "print(' '.join(sorted(e.name for e in distribution('cell-sentences').entry_points if e.group == 'console_scripts')))")
    assert _run([str(venv / "bin" / "python"), "-c", listed], work, env).stdout.split() == sorted(COMMANDS)
    code = ("import translator, evaluation, dataset_builder, tokenizer, train\n"
            "from translator import CellTranslator\n"
            "from translator.card import TEMPLATE\n"
            "from translator.serving import HANDLER_SOURCE\n"
            "assert TEMPLATE.is_file() and HANDLER_SOURCE.is_file()\n"
            "for module in (translator, evaluation, dataset_builder, tokenizer, train):\n"
            "    print(module.__file__)\n")
    proc = _run([str(venv / "bin" / "python"), "-c", code], work, env)
    paths = proc.stdout.split()
    assert len(paths) == 5 and all(Path(p).resolve().is_relative_to(venv.resolve()) for p in paths), paths
