"""The packages' layers: the product (dataset_builder, tokenizer, translator) never imports the evaluation harness
(``evaluation/`` or its command line ``eval.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PRODUCT = ("dataset_builder", "tokenizer", "translator")
HARNESS = ("evaluation", "eval")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a Python file imports (anywhere in it, function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PRODUCT)
def test_the_product_does_not_import_evaluation(package):
    files = sorted((REPO / package).glob("*.py"))
    assert files
    offending = {f.name: sorted(m for m in imported_modules(f) if m.split(".")[0] in HARNESS) for f in files}
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_imported_modules_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import numpy as np\n\ndef f():\n    from evaluation.runner import run_evaluation\n    from .x import y\n")
    assert imported_modules(source) == {"numpy", "evaluation.runner"}


def test_metrics_core_stands_alone():
    """``metrics/cell_translation`` serves a copy of the file: it imports only numpy, scipy and the standard library."""
    path = REPO / "translator" / "metrics_core.py"
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))
    assert {m.split(".")[0] for m in imported_modules(path)} <= {"__future__", "collections", "numpy", "scipy"}
    assert (REPO / "metrics" / "cell_translation" / "metrics_core.py").resolve() == path.resolve()
